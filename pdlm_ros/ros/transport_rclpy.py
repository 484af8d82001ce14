"""rclpy transport: the node as a ROS 2 managed (lifecycle) node. Imported only when this transport is chosen.

A thin adapter around `NodeCore`:
- parameters: declared once from `params.PARAMS` (descriptors with ranges and choices, dynamic typing so that
  `cache.max_age: 5` or `-p sync.slop:=1` are numbers, not a type exception), checked by `NodeParams` before they
  are declared: a wrong type, a value out of range or an unknown name fails configure with one line naming it.
  `ros2 param set` is validated the same way and accepted only while unconfigured (values are read at configure);
  otherwise it is refused with the reason;
- lifecycle: configure loads the model and publishes `model_info`, activate enables the lifecycle publishers and
  then starts the worker, deactivate stops the worker and frees the model, cleanup forgets caches;
- inputs subscribed with `raw=True` and decoded by rosbags (the code path of the DDS transport and bag replay).
  Subscriptions are created on first activation and kept until the node is destroyed: destroying a subscription
  while a MultiThreadedExecutor waits on it is a known rclpy race (InvalidHandle), so an inactive node ignores them;
- outputs as serialized CDR bytes; captions, annotations and images on lifecycle publishers; `/diagnostics` on a
  plain publisher, every `diagnostics.period` in every state, stamped with the node clock (use_sim_time works);
- services `~/describe` (pdlm_ros/DescribeRegions) and `~/enable` (std_srvs/SetBool);
- Python logging of the package goes to the node's logger, hence to the console and to /rosout.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import rclpy
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.clock import Clock, ClockType
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.serialization import deserialize_message, serialize_message
from rclpy.signals import SignalHandlerOptions

from pdlm_ros.errors import PDLMError
from pdlm_ros.ros import messages as M
from pdlm_ros.ros.convert import header_msg
from pdlm_ros.ros.diagnostics import HealthReport, diagnostic_array_msg
from pdlm_ros.ros.node_core import OUTPUT_TOPICS, NodeCore, TopicSpec, input_topics, load_captioner, output_topics
from pdlm_ros.ros.params import PARAMS, PARAMS_BY_NAME, NodeParams, check_value
from pdlm_ros.ros.transport import Transport
from pdlm_ros.types import RegionInput

__all__ = ["PdlmLifecycleNode", "RclpyTransport", "RosLogHandler", "bridge_logging", "qos_profile"]

# Parameters rclpy itself declares or reads; never ours to validate.
_ROS_OWNED = ("use_sim_time", "start_type_description_service")
_ROS_LEVELS = {"DEBUG": "debug", "INFO": "info", "WARNING": "warn", "ERROR": "error", "CRITICAL": "fatal"}


def qos_profile(reliable: bool, depth: int, latched: bool = False) -> QoSProfile:
    return QoSProfile(reliability=ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT,
                      history=HistoryPolicy.KEEP_LAST, depth=1 if latched else depth,
                      durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE)


def _is_array(name: str) -> bool:
    spec = PARAMS_BY_NAME.get(name)
    return spec is not None and spec.type is tuple


def _ros_type(msgtype: str) -> Any:
    """`sensor_msgs/msg/Image` -> the generated rclpy class (type support for the middleware)."""
    pkg, sub, name = msgtype.split("/")
    return getattr(importlib.import_module(f"{pkg}.{sub}"), name)


def _to_ros(msg: Any) -> Any:
    """A rosbags message -> the generated rclpy message (through CDR, so no field is copied by hand)."""
    return deserialize_message(bytes(M.typestore().serialize_cdr(msg, msg.__msgtype__)), _ros_type(msg.__msgtype__))


def _from_ros(msg: Any, msgtype: str) -> Any:
    return M.typestore().deserialize_cdr(serialize_message(msg), msgtype)


def _descriptor(spec: Any) -> ParameterDescriptor:
    # dynamic_typing: rclpy would otherwise fix the type from the default and raise on `5` for a float parameter;
    # NodeParams checks types instead, with one message naming the parameter.
    d = ParameterDescriptor(description=spec.description, dynamic_typing=True)
    if spec.range is not None and spec.type is int:
        d.integer_range = [IntegerRange(from_value=int(spec.range[0]), to_value=int(spec.range[1]), step=0)]
    elif spec.range is not None and spec.type is float:
        d.floating_point_range = [FloatingPointRange(from_value=float(spec.range[0]),
                                                     to_value=float(spec.range[1]), step=0.0)]
    if spec.choices:
        d.additional_constraints = "one of: " + ", ".join(repr(c) for c in spec.choices)
    return d


class RosLogHandler(logging.Handler):
    """Python logging -> the node's rcutils logger (console and /rosout)."""

    def __init__(self, node: Any) -> None:
        super().__init__()
        self.logger = node.get_logger()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            level = record.levelno
            if level >= logging.CRITICAL:
                self.logger.fatal(text)
            elif level >= logging.ERROR:
                self.logger.error(text)
            elif level >= logging.WARNING:
                self.logger.warning(text)
            elif level >= logging.INFO:
                self.logger.info(text)
            else:
                self.logger.debug(text)
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)


@contextlib.contextmanager
def bridge_logging(node: Any) -> Iterator[None]:
    """While inside, the package's Python log records go to `node`'s logger only (console and /rosout)."""
    package_log = logging.getLogger("pdlm_ros")
    handler = RosLogHandler(node)
    handler.setFormatter(logging.Formatter("%(message)s"))
    package_log.addHandler(handler)
    package_log.propagate = False  # the rcutils logger prints it; the root stderr handler would repeat it
    try:
        yield
    finally:
        package_log.removeHandler(handler)
        package_log.propagate = True


class _Outputs:
    """NodeCore's outputs; messages go out as serialized CDR (publish(bytes))."""

    def __init__(self) -> None:
        self.publishers: dict[str, Any] = {}

    def publish(self, topic: str, msg: Any) -> None:
        pub = self.publishers.get(topic)
        if pub is not None:
            pub.publish(bytes(M.typestore().serialize_cdr(msg, msg.__msgtype__)))

    def subscriber_count(self, topic: str) -> int:
        pub = self.publishers.get(topic)
        return pub.get_subscription_count() if pub is not None else 0


class PdlmLifecycleNode(LifecycleNode):
    def __init__(self, node_name: str = "pdlm_node", *, loader: Any = load_captioner, **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        self._loader = loader
        # rcl has already read --params-file / -p for this node (rclpy keeps them in _parameter_overrides, Humble to
        # Jazzy): check each before declaring anything, so a bad value is reported by name instead of raising inside
        # declare_parameter. A bad one keeps configure failing until `ros2 param set` gives it a valid value (an
        # unknown name until the file is fixed): falling back to the default silently would hide the mistake.
        # A YAML `[]` reaches rclpy as a parameter without a value (NOT_SET): for a string array that is the default.
        overrides = {name: p.value for name, p in self._parameter_overrides.items()
                     if name not in _ROS_OWNED and not (p.value is None and _is_array(name))}
        self.bad_params: dict[str, str] = {}
        for name, value in overrides.items():
            spec = PARAMS_BY_NAME.get(name)
            try:  # one value at a time; rules between parameters are checked at configure
                if spec is None:
                    NodeParams.from_values({name: value})  # the unknown-name error with its "did you mean"
                else:
                    check_value(spec, value)
            except PDLMError as err:
                self.bad_params[name] = str(err)
        for spec in PARAMS:
            valid = spec.name in overrides and spec.name not in self.bad_params
            default = list(spec.default) if spec.type is tuple else spec.default
            self.declare_parameter(spec.name, default, _descriptor(spec), ignore_override=not valid)
        self.add_on_set_parameters_callback(self._on_set_parameters)

        self.core: NodeCore | None = None
        self.outputs = _Outputs()
        self._inputs_group = MutuallyExclusiveCallbackGroup()
        self._services_group = MutuallyExclusiveCallbackGroup()
        self._subs: dict[tuple[str, str, bool, int], Any] = {}  # (topic, type, reliable, depth) -> subscription
        # the active configuration's inputs: key -> its TopicSpec (handler, camera index)
        self._live_inputs: dict[tuple[str, str, bool, int], TopicSpec] = {}
        diag = next(s for s in OUTPUT_TOPICS if s.name == "/diagnostics")
        # not a lifecycle publisher: diagnostics must also report an inactive or failed node
        self.outputs.publishers[diag.name] = self.create_publisher(_ros_type(diag.msgtype), diag.name,
                                                                   qos_profile(True, 10))
        # steady clock: under use_sim_time a ROS-clock timer stops with a paused bag; the stamps follow the node clock
        self._diag_timer = self.create_timer(self._diag_period(), self._idle_diagnostics,
                                             clock=Clock(clock_type=ClockType.STEADY_TIME))
        self.create_service(_ros_type(f"{M.PACKAGE}/srv/DescribeRegions"), "~/describe", self._on_describe,
                            callback_group=self._services_group)
        self.create_service(_ros_type("std_srvs/srv/SetBool"), "~/enable", self._on_enable,
                            callback_group=self._services_group)

    @staticmethod
    def _valid(spec: Any, value: Any) -> bool:
        try:
            check_value(spec, value)
            return True
        except PDLMError:
            return False

    def _diag_period(self) -> float:
        value = self.get_parameter("diagnostics.period").value
        return float(value) if self._valid(PARAMS_BY_NAME["diagnostics.period"], value) else 1.0

    def _params(self) -> NodeParams:
        return NodeParams.from_values({spec.name: self.get_parameter(spec.name).value for spec in PARAMS})

    def _stamp_ns(self) -> int:
        return self.get_clock().now().nanoseconds

    # -- parameters -----------------------------------------------------------------------------------------------
    def _on_set_parameters(self, params: list[Any]) -> SetParametersResult:
        for p in params:
            spec = PARAMS_BY_NAME.get(p.name)
            if spec is None:
                continue  # rclpy's own (use_sim_time, qos overrides)
            try:
                check_value(spec, p.value)
            except PDLMError as err:
                return SetParametersResult(successful=False, reason=str(err))
            if self.core is not None:
                return SetParametersResult(successful=False, reason=(
                    f"parameter {p.name!r} is read at configure; the node is {self.core.state}: deactivate and "
                    "cleanup, set it, then configure again"))
        for p in params:
            self.bad_params.pop(p.name, None)  # given a valid value now
        return SetParametersResult(successful=True)

    # -- lifecycle ------------------------------------------------------------------------------------------------
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.get_logger().info("configuring")
        if self.bad_params:
            self.get_logger().error(f"configure failed: {next(iter(self.bad_params.values()))}")
            return TransitionCallbackReturn.FAILURE
        try:
            params = self._params()
            self.core = NodeCore(params, self.outputs, name=self.get_name(), loader=self._loader,
                                 stamp_clock=self._stamp_ns)
            for spec in output_topics(params):  # before configure: it publishes model_info
                if spec.name not in self.outputs.publishers:
                    self.outputs.publishers[spec.name] = self.create_lifecycle_publisher(
                        _ros_type(spec.msgtype), spec.name, qos_profile(True, params.output_depth, spec.latched))
            self.core.configure()
        except Exception as err:  # noqa: BLE001 - a CUDA OOM or an OSError must say why, not fail silently
            kind = "" if isinstance(err, PDLMError) else f"{type(err).__name__}: "
            self.get_logger().error(f"configure failed: {kind}{err}")
            self._drop_lifecycle_publishers()
            self.core = None
            return TransitionCallbackReturn.FAILURE
        self._diag_timer.timer_period_ns = int(params.diagnostics_period * 1e9)
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        assert self.core is not None  # the lifecycle state machine only activates a configured node
        super().on_activate(state)  # lifecycle publishers first: the worker may publish right away
        p = self.core.params
        try:
            self.core.activate()
            self.core.publish_model_info()  # latched; now that the publisher is active it goes out
            live = {}
            for spec in input_topics(p):
                key = (spec.name, spec.msgtype, p.input_qos == "reliable", p.input_depth)
                if key not in self._subs:
                    self._subs[key] = self._subscribe(key)
                live[key] = spec
        except Exception as err:  # noqa: BLE001 - see on_configure
            kind = "" if isinstance(err, PDLMError) else f"{type(err).__name__}: "
            self.get_logger().error(f"activate failed: {kind}{err}")
            if self.core.state == "active":
                self.core.deactivate()
            super().on_deactivate(state)
            return TransitionCallbackReturn.FAILURE
        self._live_inputs = live
        self.get_logger().info("active: " + ", ".join(self._subs[k].topic_name for k in sorted(self._live_inputs)))
        return TransitionCallbackReturn.SUCCESS

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._live_inputs = {}
        if self.core is not None and self.core.state == "active":
            self.core.deactivate()
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._drop_lifecycle_publishers()
        if self.core is not None:
            self.core.cleanup()
            self.core = None
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._live_inputs = {}
        if self.core is not None:
            self.core.shutdown()
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.get_logger().error(f"error in state {state.label}; the node is back to unconfigured")
        self._live_inputs = {}
        if self.core is not None:
            self.core.shutdown()
            self.core = None
        self._drop_lifecycle_publishers()
        return TransitionCallbackReturn.SUCCESS

    def _drop_lifecycle_publishers(self) -> None:
        for name in [n for n in self.outputs.publishers if n != "/diagnostics"]:
            self.destroy_lifecycle_publisher(self.outputs.publishers.pop(name))

    # -- inputs ---------------------------------------------------------------------------------------------------
    def _subscribe(self, key: tuple[str, str, bool, int]) -> Any:
        """A subscription kept for the node's life; it calls the current core's handler for `key` (with the camera
        index of the active configuration) while `key` is one of that configuration's inputs."""
        name, msgtype, reliable, depth = key
        qos = qos_profile(reliable, depth)
        if msgtype == M.YOLO_DETECTION_ARRAY:  # not in the typestore: rclpy decodes it, convert makes vision_msgs
            from pdlm_ros.ros.convert import detections_from_yolo

            try:
                yolo_type = _ros_type(msgtype)
            except ImportError as err:
                raise PDLMError("regions.source 'yolo' needs the yolo_msgs package (install yolo_ros, or build "
                                "its yolo_msgs, and source it)") from err

            def callback(msg: Any) -> None:
                core, spec = self.core, self._live_inputs.get(key)
                if core is not None and spec is not None:
                    core.input_callback(spec)(detections_from_yolo(msg))

            return self.create_subscription(yolo_type, name, callback, qos, callback_group=self._inputs_group)
        return self.create_subscription(_ros_type(msgtype), name, self._raw_callback(key), qos,
                                        callback_group=self._inputs_group, raw=True)

    def _raw_callback(self, key: tuple[str, str, bool, int]) -> Any:
        store, msgtype = M.typestore(), key[1]

        def callback(data: bytes) -> None:
            core, spec = self.core, self._live_inputs.get(key)
            if core is None or spec is None:  # inactive, or a topic of an earlier configuration
                return
            try:
                msg = store.deserialize_cdr(data, msgtype)
            except Exception as err:  # noqa: BLE001 - undecodable bytes are bad input, not a reason to stop
                core.health.error("deserialize")
                core.throttle.warning("deserialize", "cannot decode a %s: %s", msgtype, err)
                return
            core.input_callback(spec)(msg)

        return callback

    # -- diagnostics outside the active state ---------------------------------------------------------------------
    def _idle_diagnostics(self) -> None:
        core = self.core
        if core is not None and core.state == "active":
            return  # the core's reporter thread publishes while active
        if core is not None:
            core.publish_diagnostics()
            return
        report = HealthReport(1, "unconfigured: no model loaded (configure the node)", {"state": "unconfigured"})
        self.outputs.publish("/diagnostics", diagnostic_array_msg(report, header_msg(self._stamp_ns()),
                                                                  f"{self.get_name()}: region captioning"))

    # -- services -------------------------------------------------------------------------------------------------
    def _on_enable(self, request: Any, response: Any) -> Any:
        if self.core is None:
            response.success, response.message = False, "node is unconfigured; configure and activate it first"
            return response
        self.core.set_enabled(bool(request.data))
        response.success = True
        response.message = "captioning enabled" if request.data else "captioning disabled"
        return response

    def _on_describe(self, request: Any, response: Any) -> Any:
        core = self.core
        try:
            if core is None:
                raise PDLMError("node is unconfigured; configure and activate it first")
            image = None
            if request.image.width and request.image.height:
                image = _from_ros(request.image, M.IMAGE)
            regions = []
            ids = list(request.ids)
            if ids and len(ids) != len(request.boxes):
                raise PDLMError(f"'ids' has {len(ids)} entries for {len(request.boxes)} boxes (give one per box, or "
                                "none)")
            for i, b in enumerate(request.boxes):
                cx, cy, sx, sy = b.center.position.x, b.center.position.y, b.size_x, b.size_y
                regions.append(RegionInput(box=(cx - sx / 2, cy - sy / 2, cx + sx / 2, cy + sy / 2),
                                           region_id=ids[i] if ids else "", source_index=i))
            if request.mask.width and request.mask.height:
                from pdlm_ros.ros.convert import regions_from_instance_mask

                masks = regions_from_instance_mask(_from_ros(request.mask, M.IMAGE))
                regions += [RegionInput(mask=r.mask, region_id=r.region_id, source_index=len(regions) + k)
                            for k, r in enumerate(masks)]
            out = core.describe(image, regions, request.prompt)
        except Exception as err:  # noqa: BLE001 - every failure is an answer with its reason, never a dead node
            kind = "" if isinstance(err, PDLMError) else f"{type(err).__name__}: "
            response.success, response.message = False, f"{kind}{err}"
            self.get_logger().warning(f"describe request refused: {kind}{err}")
            return response
        response.success, response.message = True, ""
        response.captions = _to_ros(out)
        return response


class RclpyTransport(Transport):
    name = "rclpy"

    def run(self, ros_args: Sequence[str], stop: threading.Event, *, log_level: str = "INFO") -> int:
        # Not rclpy's signal handlers: Ctrl-C reaches the node twice (the terminal's process group and `ros2 launch`
        # forwarding it), and rclpy's handler raises KeyboardInterrupt for the second one wherever the shutdown
        # happens to be. `pdlm-ros node` turns SIGINT/SIGTERM into `stop` instead.
        rclpy.init(args=[sys.argv[0], "--ros-args", "--log-level", _ROS_LEVELS.get(log_level, "info"), *ros_args],
                   signal_handler_options=SignalHandlerOptions.NO)
        node = PdlmLifecycleNode()
        executor = MultiThreadedExecutor(num_threads=3)
        executor.add_node(node)
        code = 0
        try:
            with bridge_logging(node):
                if node.get_parameter("autostart").value and not stop.is_set():
                    if node.trigger_configure() != TransitionCallbackReturn.SUCCESS or \
                            node.trigger_activate() != TransitionCallbackReturn.SUCCESS:
                        code = 1
                while code == 0 and rclpy.ok() and not stop.is_set():
                    executor.spin_once(timeout_sec=0.2)
        except (KeyboardInterrupt, ExternalShutdownException):  # run without the CLI's handlers; context shut down
            pass
        finally:
            # after the bridge: the package's last lines go to stderr, whatever state /rosout is in
            if node.core is not None:
                node.core.shutdown()
            executor.shutdown()
            node.destroy_node()
            rclpy.try_shutdown()
        return code
