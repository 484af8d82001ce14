"""ROS-less transport: the node on Cyclone DDS, speaking the ROS 2 wire format.

What makes it interoperate with ROS 2 (rmw_cyclonedds_cpp) nodes:
- topic names: `rt` + the fully qualified ROS name after namespace and remapping (`rt/robot/captions`);
- type names: `<pkg>::msg::dds_::<Type>_`, structs generated from the same .msg definitions (`idl.py`);
- payload: XCDR1 little endian, byte-identical to rosbags' `serialize_cdr` (tested in test/ros/test_idl.py);
- QoS: inputs best effort / keep last `input.depth` / volatile (the sensor-data profile; matches reliable and best
  effort publishers), or reliable when `input.qos` says so; outputs reliable / keep last `output.depth` / volatile;
- domain: ROS_DOMAIN_ID (default 0); Cyclone reads CYCLONEDDS_URI as it does under ROS 2.
Not provided (no rcl underneath): lifecycle services, parameter services, ros_discovery_info (so `ros2 node list`
does not show this node, while `ros2 topic echo` of its topics works), rosout. The node starts active.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

from cyclonedds.core import DDSException, Listener
from cyclonedds.domain import DomainParticipant
from cyclonedds.internal import InvalidSample
from cyclonedds.pub import DataWriter
from cyclonedds.qos import Policy, Qos
from cyclonedds.sub import DataReader
from cyclonedds.topic import Topic
from cyclonedds.util import duration

from pdlm_ros.errors import ConfigError
from pdlm_ros.ros.diagnostics import Throttle
from pdlm_ros.ros.idl import from_idl, idl_type, to_idl
from pdlm_ros.ros.node_core import NodeCore, input_topics, output_topics
from pdlm_ros.ros.params import NodeParams, load_params_file
from pdlm_ros.ros.ros_args import RosArgs, dds_topic, parse_ros_args, resolve_topic
from pdlm_ros.ros.transport import Transport

__all__ = ["DdsTransport", "DdsEndpoints", "dds_qos", "node_params"]

log = logging.getLogger("pdlm_ros.dds")


def dds_qos(reliable: bool, depth: int, latched: bool = False) -> Qos:
    """ROS 2's keep-last profiles (volatile, or transient local for latched topics); XCDR1 data representation, as
    rmw_cyclonedds_cpp uses."""
    reliability = Policy.Reliability.Reliable(duration(milliseconds=100)) if reliable \
        else Policy.Reliability.BestEffort
    durability = Policy.Durability.TransientLocal if latched else Policy.Durability.Volatile
    return Qos(reliability, Policy.History.KeepLast(depth), durability,
               Policy.DataRepresentation(use_cdrv0_representation=True))


def node_params(args: RosArgs) -> NodeParams:
    """Parameters as rcl would set them: defaults, then params files in order, then `-p` overrides."""
    values: dict[str, Any] = {}
    for path in args.params_files:
        values.update(load_params_file(path, args.fqn))
    values.update(args.params)
    return NodeParams.from_values(values)


class DdsEndpoints:
    """Readers and writers of one participant, named and typed the ROS 2 way. Usable on its own (tests, tools)."""

    def __init__(self, args: RosArgs | None = None, domain_id: int | None = None) -> None:
        self.args = args or RosArgs()
        if domain_id is None:
            raw = os.environ.get("ROS_DOMAIN_ID", "0") or "0"
            if not raw.isdigit() or int(raw) > 232:
                raise ConfigError(f"ROS_DOMAIN_ID must be an integer in 0..232 (got {raw!r})")
            domain_id = int(raw)
        self.domain_id = domain_id
        self.participant = DomainParticipant(domain_id)
        self._topics: dict[str, Topic] = {}
        self._writers: dict[str, DataWriter] = {}
        self._readers: list[DataReader] = []
        self.throttle = Throttle(log, 5.0)

    def topic_name(self, name: str) -> str:
        """The DDS topic of a (relative) ROS topic name, after namespace and remapping."""
        return dds_topic(resolve_topic(name, self.args))

    def _topic(self, name: str, msgtype: str) -> Topic:
        dds_name = self.topic_name(name)
        if dds_name not in self._topics:
            self._topics[dds_name] = Topic(self.participant, dds_name, idl_type(msgtype))
        return self._topics[dds_name]

    def writer(self, name: str, msgtype: str, *, reliable: bool = True, depth: int = 10,
               latched: bool = False) -> DataWriter:
        if name not in self._writers:
            self._writers[name] = DataWriter(self.participant, self._topic(name, msgtype),
                                             dds_qos(reliable, 1 if latched else depth, latched))
        return self._writers[name]

    def publish(self, name: str, msg: Any) -> None:
        self._writers[name].write(to_idl(msg))

    def subscriber_count(self, name: str) -> int:
        writer = self._writers.get(name)
        return int(writer.get_publication_matched_status().current_count) if writer is not None else 0

    def subscribe(self, name: str, msgtype: str, callback: Callable[[Any], None], *, reliable: bool = False,
                  depth: int = 5, on_error: Callable[[str, Exception], None] | None = None) -> DataReader:
        """Call `callback(rosbags message)` for every sample, on Cyclone's listener thread (keep it cheap)."""

        def on_data_available(reader: DataReader) -> None:
            while True:
                try:
                    samples = reader.take(N=16)
                except Exception as err:  # noqa: BLE001 - undecodable data must not kill the listener thread
                    self.throttle.warning(f"take:{name}", "cannot decode a sample on %s: %s", name, err)
                    if on_error:
                        on_error("deserialize", err)
                    return
                if not samples:
                    return
                for sample in samples:
                    if isinstance(sample, InvalidSample):  # a writer went away: a state change, no data
                        continue
                    try:
                        callback(from_idl(sample, msgtype))
                    except Exception as err:  # noqa: BLE001 - a failing callback must not kill the listener thread
                        self.throttle.warning(f"cb:{name}", "callback for %s failed: %s", name, err, exc_info=True)
                        if on_error:
                            on_error("callback", err)

        def on_sample_lost(reader: DataReader, status: Any) -> None:  # what the middleware admits to losing
            self.throttle.warning(f"lost:{name}", "DDS reports samples lost on %s (%d in all)", name,
                                  status.total_count)
            if on_error:
                on_error("input_lost", RuntimeError(f"{status.total_count_change} samples lost on {name}"))

        reader = DataReader(self.participant, self._topic(name, msgtype), dds_qos(reliable, depth),
                            listener=Listener(on_data_available=on_data_available, on_sample_lost=on_sample_lost))
        self._readers.append(reader)
        return reader

    def stop_inputs(self) -> None:
        """Delete every reader: no callback runs after this."""
        for reader in self._readers:
            reader.set_listener(None)
        self._readers.clear()

    def close(self) -> None:
        self.stop_inputs()
        self._writers.clear()
        self._topics.clear()
        self.participant = None  # type: ignore[assignment]


class _Outputs:
    def __init__(self, endpoints: DdsEndpoints) -> None:
        self.endpoints = endpoints

    def publish(self, topic: str, msg: Any) -> None:
        try:
            self.endpoints.publish(topic, msg)
        except DDSException as err:
            self.endpoints.throttle.warning(f"pub:{topic}", "publishing on %s failed: %s", topic, err)

    def subscriber_count(self, topic: str) -> int:
        return self.endpoints.subscriber_count(topic)


class DdsTransport(Transport):
    name = "dds"

    def run(self, ros_args: Sequence[str], stop: threading.Event, *, log_level: str = "INFO") -> int:
        args = parse_ros_args(ros_args)
        params = node_params(args)
        if params.regions_source == "yolo":
            raise ConfigError("regions.source 'yolo' needs the rclpy transport: yolo_msgs types come from the "
                              "yolo_msgs package of a ROS 2 install (source it and use --transport rclpy)")
        if not params.autostart:
            log.warning("autostart is false, but plain DDS has no lifecycle services to start the node later: "
                        "starting now")
        endpoints = DdsEndpoints(args)
        for spec in output_topics(params):
            endpoints.writer(spec.name, spec.msgtype, reliable=True, depth=params.output_depth, latched=spec.latched)
        core = NodeCore(params, _Outputs(endpoints), name=args.node_name)
        try:
            core.configure()
            if stop.is_set():  # asked to stop while the model loaded
                return 0
            core.activate()
            for spec in input_topics(params):
                endpoints.subscribe(spec.name, spec.msgtype, core.input_callback(spec),
                                    reliable=params.input_qos == "reliable", depth=params.input_depth,
                                    on_error=lambda kind, err: core.health.error(kind))
            ins = ", ".join(endpoints.topic_name(s.name) for s in input_topics(params))
            outs = ", ".join(endpoints.topic_name(s.name) for s in output_topics(params))
            log.info("[%s] on DDS domain %d: %s -> %s", args.node_name, endpoints.domain_id, ins, outs)
            while not stop.wait(0.2):
                pass
        finally:
            endpoints.stop_inputs()  # no more input while shutting down
            core.shutdown()
            endpoints.close()
        return 0
