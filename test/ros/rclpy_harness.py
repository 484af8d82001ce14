"""A real rclpy context for the node under test: the PdlmLifecycleNode, a peer node that plays camera, detector and
listener, and a multi-threaded executor spinning both in a thread (as `ros2 run` would). Nothing is mocked: messages
go through rmw_cyclonedds_cpp on this machine."""

from __future__ import annotations

import itertools
import threading
import time
from collections import defaultdict
from typing import Any

import rclpy
from rclpy.executors import MultiThreadedExecutor
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

from pdlm_ros.ros import messages as M
from pdlm_ros.ros.transport_rclpy import PdlmLifecycleNode, _ros_type, _to_ros

RELIABLE = QoSProfile(reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST, depth=50)
LATCHED = QoSProfile(reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST, depth=1,
                     durability=DurabilityPolicy.TRANSIENT_LOCAL)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# rcl keeps one /rosout publisher per logger name in a process: a node named like a destroyed one may log into the
# old, dead publisher. Each harness node gets a name of its own.
_NAMES = itertools.count()


class Harness:
    def __init__(self, cli_args: list[str], *, loader: Any = None, namespace: str = "/t",
                 listen: tuple[str, ...] = ("captions", "annotations", "/diagnostics", "/rosout"),
                 cameras: tuple[str, ...] = ()) -> None:
        """`cameras`: the peer publishes CAMERA/image and CAMERA/detections of each and `listen` may name
        CAMERA/captions (the node needs `-p cameras:=[...]` to match)."""
        self.ctx = rclpy.Context()
        rclpy.init(context=self.ctx)
        kwargs = {"loader": loader} if loader is not None else {}
        self.node = PdlmLifecycleNode(f"pdlm_node_{next(_NAMES)}", namespace=namespace, context=self.ctx,
                                      cli_args=["--ros-args", *cli_args], **kwargs)
        self.peer = rclpy.create_node(f"peer_{self.node.get_name()}", namespace=namespace, context=self.ctx)
        self.received: dict[str, list[Any]] = defaultdict(list)
        self._lock = threading.Lock()
        types = {"captions": M.CAPTION_ARRAY, "annotations": M.IMAGE_ANNOTATIONS, "/diagnostics": M.DIAGNOSTIC_ARRAY,
                 "/rosout": "rcl_interfaces/msg/Log", "model_info": M.MODEL_INFO}
        for topic in listen:
            qos = LATCHED if topic in ("model_info", "/rosout") else RELIABLE
            if topic == "/rosout":  # rosout is transient local with depth 1000 on the publishing side
                qos = QoSProfile(reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST,
                                 depth=1000, durability=DurabilityPolicy.TRANSIENT_LOCAL)
            self.peer.create_subscription(_ros_type(types[topic.rsplit("/", 1)[-1] if topic[0] != "/" else topic]),
                                          topic, self._keep(topic), qos)
        self.pubs = {cam: (self.peer.create_publisher(_ros_type(M.IMAGE), f"{cam}/image" if cam else "image",
                                                      RELIABLE),
                           self.peer.create_publisher(_ros_type(M.DETECTION_ARRAY),
                                                      f"{cam}/detections" if cam else "detections", RELIABLE))
                     for cam in cameras or ("",)}
        self.executor = MultiThreadedExecutor(num_threads=3, context=self.ctx)
        self.executor.add_node(self.node)
        self.executor.add_node(self.peer)
        self._spin = threading.Thread(target=self.executor.spin, daemon=True)
        self._spin.start()
        if "/rosout" in listen:  # the node's log publisher matched, so its first log lines are not missed

            def heard() -> bool:
                self.node.get_logger().info("harness: /rosout connected")
                return bool(self.rosout("harness: /rosout connected"))

            wait_for(heard, 20, "the node's /rosout publisher")

    def _keep(self, topic: str):
        def cb(msg: Any) -> None:
            with self._lock:
                self.received[topic].append(msg)
        return cb

    def got(self, topic: str) -> list[Any]:
        with self._lock:
            return list(self.received[topic])

    def clear(self, topic: str) -> None:
        with self._lock:
            self.received[topic].clear()

    def publish_frame(self, image: Any, detections: Any, camera: str = "") -> None:
        image_pub, det_pub = self.pubs[camera]
        image_pub.publish(_to_ros(image))
        det_pub.publish(_to_ros(detections))

    def rosout(self, text: str) -> list[Any]:
        return [m for m in self.got("/rosout") if text in m.msg]

    def call(self, client: Any, request: Any, timeout: float = 30.0) -> Any:
        assert client.wait_for_service(timeout_sec=10.0), f"service {client.srv_name} not available"
        future = client.call_async(request)
        wait_for(future.done, timeout, f"a response from {client.srv_name}")
        return future.result()

    def close(self) -> None:
        try:
            if self.node.core is not None:
                self.node.core.shutdown()
        finally:
            self.executor.shutdown()
            self.node.destroy_node()
            self.peer.destroy_node()
            rclpy.shutdown(context=self.ctx)
