"""`--ros-args` for the ROS-less transport, and ROS 2 topic-name resolution (namespace, `~`, remapping).

The rclpy transport hands these arguments to rclpy unchanged; the DDS transport has no rcl underneath, so this
module reads the subset a launch file or a user passes: `-r/--remap from:=to` (also `__node:=`, `__ns:=` and
`node_name:from:=to`), `-p/--param name:=value` (value parsed as YAML, as rcl does), `--params-file FILE`,
`--log-level LEVEL`; `-e/--enclave X` and the security/rosout flags are accepted and ignored.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from pdlm_ros.errors import ConfigError

__all__ = ["RosArgs", "parse_ros_args", "expand_topic", "resolve_topic", "dds_topic"]

_NAME = re.compile(r"^[A-Za-z_~{/][A-Za-z0-9_/{}~]*$")
_IGNORED_FLAGS = ("--enable-rosout-logs", "--disable-rosout-logs", "--enable-stdout-logs", "--disable-stdout-logs",
                  "--enable-external-lib-logs", "--disable-external-lib-logs")


@dataclass(frozen=True)
class RosArgs:
    node_name: str = "pdlm_node"
    namespace: str = "/"
    remaps: tuple[tuple[str, str], ...] = ()  # (from, to) as given, applying to this node
    params: dict[str, Any] = field(default_factory=dict)  # -p overrides, dotted names
    params_files: tuple[str, ...] = ()
    log_level: str = ""

    @property
    def fqn(self) -> str:
        """Fully qualified node name, e.g. /robot/pdlm_node."""
        return (self.namespace.rstrip("/") or "") + "/" + self.node_name


def _split_rule(rule: str, flag: str) -> tuple[str, str]:
    if ":=" not in rule:
        raise ConfigError(f"{flag} expects NAME:=VALUE (got {rule!r})")
    left, right = rule.split(":=", 1)
    if not left or not right and flag.startswith("-r"):
        raise ConfigError(f"{flag} expects NAME:=VALUE with both sides set (got {rule!r})")
    return left, right


def parse_ros_args(argv: Sequence[str], node_name: str = "pdlm_node") -> RosArgs:
    """Parse the arguments that follow `--ros-args` (up to `--` or the end)."""
    name, ns, log_level = node_name, "/", ""
    remaps: list[tuple[str, str]] = []
    node_remaps: list[tuple[str, str, str]] = []
    params: dict[str, Any] = {}
    files: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg == "--":
            break
        if arg == "--ros-args":
            continue
        if arg in _IGNORED_FLAGS:
            continue
        if arg in ("-r", "--remap", "-p", "--param", "--params-file", "--log-level", "-e", "--enclave"):
            value = next(it, None)
            if value is None:
                raise ConfigError(f"--ros-args: {arg} needs a value")
            if arg in ("-r", "--remap"):
                left, right = _split_rule(value, "-r")
                if left == "__node" or left == "__name":
                    name = right
                elif left == "__ns":
                    ns = right if right.startswith("/") else "/" + right
                elif ":" in left and not left.startswith("/"):  # node_name:from:=to
                    target, frm = left.split(":", 1)
                    node_remaps.append((target, frm, right))
                else:
                    remaps.append((left, right))
            elif arg in ("-p", "--param"):
                key, raw = _split_rule(value, "-p")
                try:
                    params[key] = yaml.safe_load(raw) if raw != "" else ""
                except yaml.YAMLError as err:
                    raise ConfigError(f"-p {value!r}: cannot parse the value as YAML: {err}") from err
            elif arg == "--params-file":
                files.append(value)
            elif arg == "--log-level":
                log_level = value.split(":=")[-1].strip().upper()
            continue
        raise ConfigError(f"--ros-args: unknown argument {arg!r} (supported: -r, -p, --params-file, --log-level)")
    remaps += [(frm, to) for target, frm, to in node_remaps if target == name]
    return RosArgs(node_name=name, namespace=ns, remaps=tuple(remaps), params=params, params_files=tuple(files),
                   log_level=log_level)


def expand_topic(name: str, namespace: str = "/", node_name: str = "pdlm_node") -> str:
    """ROS 2 name expansion: relative names go under the namespace, `~` is the node's private namespace."""
    if not name or not _NAME.match(name) or "//" in name or (name.endswith("/") and name != "/"):
        raise ConfigError(f"invalid topic name {name!r}")
    ns = "/" + namespace.strip("/") if namespace.strip("/") else ""
    if name.startswith("~"):
        return f"{ns}/{node_name}{name[1:]}" if name != "~" else f"{ns}/{node_name}"
    if name.startswith("/"):
        return name
    return f"{ns}/{name}"


def resolve_topic(name: str, args: RosArgs) -> str:
    """The fully qualified topic name after remapping (first matching rule wins, as in rcl)."""
    full = expand_topic(name, args.namespace, args.node_name)
    for frm, to in args.remaps:
        if expand_topic(frm, args.namespace, args.node_name) == full:
            return expand_topic(to, args.namespace, args.node_name)
    return full


def dds_topic(fqn: str) -> str:
    """ROS 2 topic -> DDS topic name (rmw prefixes topics with `rt`): /robot/image -> rt/robot/image."""
    return "rt" + fqn
