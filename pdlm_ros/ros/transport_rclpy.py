"""rclpy transport: the node as a ROS 2 managed (lifecycle) node. Imported only when this transport is chosen.

A thin adapter around `NodeCore`: parameters declared from `params.PARAMS` with descriptors (ranges, choices),
lifecycle callbacks mapped onto the core's transitions, inputs subscribed with `raw=True` and decoded by rosbags (the
same code path as the DDS transport and bag replay; no per-field Python copy of image data), outputs published as
serialized CDR bytes through lifecycle publishers, so they only go out while the node is active. Sync is the core's
`StampSync`, not message_filters (whose callback runs inside the subscription callback under its lock).

QoS: inputs `input.qos` (sensor_data: best effort, keep last `input.depth`, volatile; or reliable); outputs reliable,
keep last `output.depth`, volatile. Inputs have their own callback group on a multi-threaded executor, so lifecycle
and parameter services are never starved by image traffic.

Status: written against the rclpy Humble/Jazzy API (rclpy.lifecycle, raw subscriptions, publish(bytes)) but not run
here: no ROS 2 install on the development machines. See docs/ros.md.
"""

from __future__ import annotations

import importlib
import logging
import sys
import threading
from collections.abc import Sequence
from typing import Any

import rclpy
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

from pdlm_ros.errors import PDLMError
from pdlm_ros.ros import messages as M
from pdlm_ros.ros.node_core import OUTPUT_TOPICS, NodeCore, input_topics
from pdlm_ros.ros.params import PARAMS, NodeParams
from pdlm_ros.ros.transport import Transport

__all__ = ["PdlmLifecycleNode", "RclpyTransport", "qos_profile"]

log = logging.getLogger("pdlm_ros.rclpy")


def qos_profile(reliable: bool, depth: int) -> QoSProfile:
    return QoSProfile(reliability=ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT,
                      history=HistoryPolicy.KEEP_LAST, depth=depth, durability=DurabilityPolicy.VOLATILE)


def _ros_type(msgtype: str) -> Any:
    """`sensor_msgs/msg/Image` -> the generated rclpy class (type support for the middleware)."""
    pkg, sub, name = msgtype.split("/")
    return getattr(importlib.import_module(f"{pkg}.{sub}"), name)


def _descriptor(spec: Any) -> ParameterDescriptor:
    d = ParameterDescriptor(description=spec.description)
    if spec.range is not None and spec.type is int:
        d.integer_range = [IntegerRange(from_value=int(spec.range[0]), to_value=int(spec.range[1]), step=0)]
    elif spec.range is not None and spec.type is float:
        d.floating_point_range = [FloatingPointRange(from_value=float(spec.range[0]),
                                                     to_value=float(spec.range[1]), step=0.0)]
    if spec.choices:
        d.additional_constraints = "one of: " + ", ".join(repr(c) for c in spec.choices)
    return d


class _Outputs:
    """NodeCore's outputs on lifecycle publishers; messages go out as serialized CDR (publish(bytes))."""

    def __init__(self, node: PdlmLifecycleNode) -> None:
        self.node = node
        self.publishers: dict[str, Any] = {}

    def publish(self, topic: str, msg: Any) -> None:
        pub = self.publishers.get(topic)
        if pub is not None:
            pub.publish(bytes(M.typestore().serialize_cdr(msg, msg.__msgtype__)))

    def subscriber_count(self, topic: str) -> int:
        pub = self.publishers.get(topic)
        return pub.get_subscription_count() if pub is not None else 0


class PdlmLifecycleNode(LifecycleNode):
    def __init__(self, node_name: str = "pdlm_node") -> None:
        super().__init__(node_name)
        for spec in PARAMS:
            self.declare_parameter(spec.name, spec.default, _descriptor(spec))
        self.core: NodeCore | None = None
        self.outputs = _Outputs(self)
        self._input_subs: list[Any] = []
        self._inputs_group = MutuallyExclusiveCallbackGroup()

    def _params(self) -> NodeParams:
        return NodeParams.from_values({spec.name: self.get_parameter(spec.name).value for spec in PARAMS})

    # -- lifecycle ------------------------------------------------------------------------------------------------
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.get_logger().info("configuring")
        try:
            params = self._params()
            self.core = NodeCore(params, self.outputs, name=self.get_name())
            self.core.configure()
        except PDLMError as err:
            self.get_logger().error(f"configure failed: {err}")
            self.core = None
            return TransitionCallbackReturn.FAILURE
        for spec in OUTPUT_TOPICS:
            self.outputs.publishers[spec.name] = self.create_lifecycle_publisher(
                _ros_type(spec.msgtype), spec.name, qos_profile(True, params.output_depth))
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        assert self.core is not None  # the lifecycle state machine only activates a configured node
        try:
            self.core.activate()
        except PDLMError as err:
            self.get_logger().error(f"activate failed: {err}")
            return TransitionCallbackReturn.FAILURE
        p = self.core.params
        for spec in input_topics(p):
            callback = self._raw_callback(spec.msgtype, getattr(self.core, spec.handler))
            self._input_subs.append(self.create_subscription(
                _ros_type(spec.msgtype), spec.name, callback, qos_profile(p.input_qos == "reliable", p.input_depth),
                callback_group=self._inputs_group, raw=True))
        self.get_logger().info("active: " + ", ".join(s.topic_name for s in self._input_subs))
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        for sub in self._input_subs:
            self.destroy_subscription(sub)
        self._input_subs.clear()
        if self.core is not None and self.core.state == "active":
            self.core.deactivate()
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        for pub in self.outputs.publishers.values():
            self.destroy_lifecycle_publisher(pub)
        self.outputs.publishers.clear()
        if self.core is not None:
            self.core.cleanup()
            self.core = None
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        for sub in self._input_subs:
            self.destroy_subscription(sub)
        self._input_subs.clear()
        if self.core is not None:
            self.core.shutdown()
        return TransitionCallbackReturn.SUCCESS

    def _raw_callback(self, msgtype: str, handler: Any) -> Any:
        store = M.typestore()

        def callback(data: bytes) -> None:
            try:
                msg = store.deserialize_cdr(data, msgtype)
            except Exception as err:  # noqa: BLE001 - undecodable bytes are bad input, not a reason to stop
                if self.core is not None:
                    self.core.health.error("deserialize")
                    self.core.throttle.warning("deserialize", "cannot decode a %s: %s", msgtype, err)
                return
            handler(msg)

        return callback


class RclpyTransport(Transport):
    name = "rclpy"

    def run(self, ros_args: Sequence[str], stop: threading.Event) -> int:
        rclpy.init(args=[sys.argv[0], "--ros-args", *ros_args])
        node = PdlmLifecycleNode()
        executor = MultiThreadedExecutor(num_threads=2)
        executor.add_node(node)
        try:
            if node.get_parameter("autostart").value:
                if node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
                    return 1
                if node.trigger_activate() != TransitionCallbackReturn.SUCCESS:
                    return 1
            while rclpy.ok() and not stop.is_set():
                executor.spin_once(timeout_sec=0.2)
        except (KeyboardInterrupt, ExternalShutdownException):
            pass
        finally:
            if node.core is not None:
                node.core.shutdown()
            executor.shutdown()
            node.destroy_node()
            rclpy.try_shutdown()
        return 0
