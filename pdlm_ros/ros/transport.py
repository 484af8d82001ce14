"""The transport interface: how the node core meets a middleware, and the choice between rclpy and plain DDS.

A transport owns the process's middleware objects and runs a `NodeCore` until asked to stop:
- `rclpy` (`transport_rclpy.RclpyTransport`): a LifecycleNode on a real ROS 2 install (robots, colcon builds);
- `dds` (`transport_dds.DdsTransport`): ROS-less, Cyclone DDS speaking the ROS 2 wire format (`rt/<topic>`,
  `<pkg>::msg::dds_::<Type>_`, XCDR1), interoperable with ROS 2 nodes that use rmw_cyclonedds_cpp.
Both declare the same parameters (`params.PARAMS`), use the same relative topic names (`node_core.input_topics`,
`OUTPUT_TOPICS`), the same QoS rules (inputs best effort by default so they match any publisher, outputs reliable)
and the same sync and worker (inside NodeCore).
"""

from __future__ import annotations

import importlib.util
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence

from pdlm_ros.errors import ConfigError

__all__ = ["Transport", "TRANSPORTS", "available_transports", "make_transport"]

TRANSPORTS = ("rclpy", "dds")


class Transport(ABC):
    """Runs the node in one process. `run` blocks until `stop` is set (or the middleware shuts down)."""

    name: str

    @abstractmethod
    def run(self, ros_args: Sequence[str], stop: threading.Event, *, log_level: str = "INFO") -> int:
        """Start the node with the arguments that follow `--ros-args` (remaps, -p, --params-file, ...), keep it
        running until `stop` is set, shut it down cleanly and return an exit code. `log_level` is a Python level
        name (the CLI has already configured Python logging with it)."""


def available_transports() -> list[str]:
    """Transports whose middleware can be imported here, in preference order."""
    found = []
    if importlib.util.find_spec("rclpy") is not None:
        found.append("rclpy")
    if importlib.util.find_spec("cyclonedds") is not None:
        found.append("dds")
    return found


def make_transport(kind: str = "auto") -> Transport:
    """`auto` picks rclpy when ROS 2 is sourced, else the ROS-less DDS transport."""
    if kind not in ("auto", *TRANSPORTS):
        raise ConfigError(f"unknown transport {kind!r}; choose auto, {', '.join(TRANSPORTS)}")
    found = available_transports()
    if kind == "auto":
        if not found:
            raise ConfigError("no transport available: source a ROS 2 install (rclpy) or pip install cyclonedds")
        kind = found[0]
    elif kind not in found:
        hint = "source your ROS 2 install (e.g. /opt/ros/humble/setup.bash)" if kind == "rclpy" else \
            "pip install 'pdlm_ros[dds]'"
        raise ConfigError(f"transport {kind!r} is not available here: {hint}")
    if kind == "rclpy":
        from pdlm_ros.ros.transport_rclpy import RclpyTransport

        return RclpyTransport()
    from pdlm_ros.ros.transport_dds import DdsTransport

    return DdsTransport()
