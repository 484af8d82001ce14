"""The node's parameters: ONE table (name, default, type, description, range), read into a typed dataclass.

Every transport declares exactly these (rclpy with a ParameterDescriptor each; the DDS transport from
`--ros-args -p` / `--params-file`), config/pdlm.yaml documents them, and `NodeParams.from_values` validates them:
a wrong type, a value out of range or an unknown name raises ConfigError naming the parameter (with a "did you
mean" hint), so a typo in a YAML file is never silently ignored.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pdlm_ros.errors import ConfigError
from pdlm_ros.types import MODES, OFFICIAL_SAMPLERS

__all__ = ["ParamSpec", "PARAMS", "MAX_CAMERAS", "PARAMS_BY_NAME", "NodeParams", "check_value", "load_params_file", "flatten"]



@dataclass(frozen=True)
class ParamSpec:
    name: str  # ROS name, dots for nesting ("sync.slop")
    default: Any
    type: type  # bool, int, float, str, or tuple (a string array)
    description: str
    range: tuple[float, float] | None = None  # inclusive, for int/float
    choices: tuple[str, ...] | None = None  # for str

    @property
    def attr(self) -> str:
        return self.name.replace(".", "_")


PARAMS: tuple[ParamSpec, ...] = (
    # model
    ParamSpec("checkpoint", "", str, "PerceptionDLM checkpoint directory; empty: the bundled default model"),
    ParamSpec("preset", "", str, "randomly initialised preset instead of a checkpoint (tests, demos); empty: off",
              choices=("", "tiny", "small", "8b")),
    ParamSpec("backend", "torch", str, "inference backend", choices=("torch", "onnxruntime", "tensorrt")),
    ParamSpec("engine_path", "", str, "export directory of the ONNX graphs and their engine cache (backends "
              "onnxruntime, tensorrt); empty: export the model under $ROS_HOME/pdlm_ros/engines (ROS_HOME: ~/.ros) on "
              "first start"),
    ParamSpec("device", "auto", str, "torch device: auto (cuda when available, else cpu), cpu, cuda, cuda:1"),
    ParamSpec("seed", 0, int, "random seed (preset weights, sampling with temperature > 0)", (0, 2**31 - 1)),
    # decoding
    ParamSpec("decoding.mode", "auto", str, "decoding mode; auto: parallel (all regions in one pass), or official "
              "for the released PerceptionDLM", choices=MODES),
    ParamSpec("decoding.steps", 0, int, "denoising steps per caption; 0: the model's default", (0, 1024)),
    ParamSpec("decoding.threshold", 0.0, float, "confidence threshold (mode threshold); 0: the model's default",
              (0.0, 1.0)),
    ParamSpec("decoding.temperature", 0.0, float, "sampling temperature; 0 is deterministic", (0.0, 10.0)),
    ParamSpec("decoding.sampler", "", str, "official checkpoints: how tokens are committed: global (the official "
              "re-masking), span or threshold; empty: global", choices=("", *OFFICIAL_SAMPLERS)),
    ParamSpec("decoding.refresh", 0, int, "official checkpoints, mode cached: refresh the K/V cache every N steps; "
              "0: 4", (0, 1024)),
    # inputs
    ParamSpec("cameras", (), tuple, "camera names: each subscribes to NAME/image (or NAME/image/compressed) and "
              "NAME/detections (or NAME/instance_mask) and publishes NAME/captions, NAME/annotated_image and "
              "NAME/annotations; frames of different cameras waiting together are captioned in one denoising pass "
              "(each region sees only its own frame); empty: one camera on the node's own image, detections and "
              "captions topics"),
    ParamSpec("regions.source", "detections", str, "where regions come from: a vision_msgs/Detection2DArray "
              "topic (detections), yolo_ros' yolo_msgs/DetectionArray on the same topic (yolo; rclpy transport "
              "with yolo_msgs installed) or an instance-mask image (instance_mask)",
              choices=("detections", "yolo", "instance_mask")),
    ParamSpec("regions.box_width", 0, int, "width in pixels of the image the detection boxes refer to (a detector "
              "that runs on a resized copy, e.g. 640 for a 640x640 network input); 0: the camera image itself",
              (0, 100000)),
    ParamSpec("regions.box_height", 0, int, "height in pixels of the image the detection boxes refer to; 0: the "
              "camera image itself", (0, 100000)),
    ParamSpec("regions.class_names", "", str, "labels file naming numeric class ids, one name per line (line 0 = "
              "class 0); empty: class ids as the detector publishes them"),
    ParamSpec("regions.max_per_frame", 64, int, "regions captioned per frame, the best by detector score, then by "
              "area; the others are refused with the reason (bounds the work of one message)", (1, 4096)),
    ParamSpec("input.compressed", False, bool, "subscribe to image/compressed (sensor_msgs/CompressedImage) "
              "instead of image"),
    ParamSpec("input.qos", "sensor_data", str, "input QoS: sensor_data (best effort, matches every publisher) or "
              "reliable", choices=("sensor_data", "reliable")),
    ParamSpec("input.depth", 5, int, "input history depth (messages kept per topic by the middleware)", (1, 1000)),
    ParamSpec("input.max_pixels", 50_000_000, int, "largest input image in pixels; a larger one is refused (a "
              "compressed one before it is decoded)", (1, 400_000_000)),
    ParamSpec("output.depth", 10, int, "output history depth (reliable, volatile)", (1, 1000)),
    ParamSpec("sync.slop", 0.0, float, "image/region stamp tolerance in seconds; 0: exact time (the detector "
              "copies the image header)", (0.0, 10.0)),
    ParamSpec("sync.queue_size", 10, int, "messages per stream waiting for a partner", (1, 1000)),
    # caption cache
    ParamSpec("cache.enabled", True, bool, "reuse a tracked region's caption instead of describing it every frame"),
    ParamSpec("cache.max_age", 2.0, float, "re-describe a tracked region at least every this many seconds "
              "(frame stamps)", (0.0, 3600.0)),
    ParamSpec("cache.iou_threshold", 0.5, float, "re-describe a tracked region when the IoU of its box with the "
              "box it was described at drops below this", (0.0, 1.0)),
    ParamSpec("cache.max_tracks", 512, int, "tracks remembered (oldest forgotten first)", (1, 100000)),
    ParamSpec("cache.untracked_iou", 0.9, float, "regions without a track id reuse a caption of the same class whose "
              "box overlaps this much (IoU); 0: they are described every frame", (0.0, 1.0)),
    # outputs and housekeeping
    ParamSpec("annotated.enabled", True, bool, "publish annotated_image (only while someone subscribes)"),
    ParamSpec("annotations.enabled", True, bool, "publish annotations (foxglove_msgs/ImageAnnotations: box outlines "
              "and captions, stamped like the image)"),
    ParamSpec("diagnostics.period", 1.0, float, "seconds between /diagnostics messages", (0.05, 3600.0)),
    ParamSpec("log.throttle", 5.0, float, "seconds between repeated warnings of one kind", (0.0, 3600.0)),
    ParamSpec("autostart", True, bool, "configure and activate on start (else wait for lifecycle transitions)"),
)
_BY_NAME = {p.name: p for p in PARAMS}
PARAMS_BY_NAME = _BY_NAME


def check_value(spec: ParamSpec, value: Any) -> Any:
    """`value` checked against `spec` (type, range, choices) and converted (an int for a float parameter becomes a
    float); ConfigError naming the parameter otherwise."""
    return _check(spec, value)


def _check(spec: ParamSpec, value: Any) -> Any:
    if spec.type is tuple:
        return _check_names(spec, value)
    if spec.type is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"parameter {spec.name!r} must be true or false (got {value!r})")
        return value
    if spec.type is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"parameter {spec.name!r} must be an integer (got {value!r})")
    elif spec.type is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"parameter {spec.name!r} must be a number (got {value!r})")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"parameter {spec.name!r} must be finite (got {value!r})")
    elif spec.type is str:
        if not isinstance(value, str):
            raise ConfigError(f"parameter {spec.name!r} must be a string (got {value!r})")
        if spec.choices is not None and value not in spec.choices:
            raise ConfigError(f"parameter {spec.name!r} must be one of {', '.join(map(repr, spec.choices))} "
                              f"(got {value!r})")
    if spec.range is not None and not spec.range[0] <= value <= spec.range[1]:
        raise ConfigError(f"parameter {spec.name!r} must be in [{spec.range[0]}, {spec.range[1]}] (got {value!r})")
    return value


MAX_CAMERAS = 16
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*(/[A-Za-z][A-Za-z0-9_]*)*")  # relative ROS names: tokens joined by '/'


def _check_names(spec: ParamSpec, value: Any) -> tuple[str, ...]:
    """A string array of distinct relative ROS names (a YAML list, or a tuple in code)."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"parameter {spec.name!r} must be a list of strings, e.g. [front, rear] (got {value!r})")
    names = tuple(value)
    for v in names:
        if not _NAME.fullmatch(v) or "__" in v:
            raise ConfigError(f"parameter {spec.name!r}: {v!r} is not a relative ROS name (letters, digits, "
                              "underscores, '/' between tokens; each token starts with a letter)")
    dup = sorted({v for v in names if names.count(v) > 1})
    if dup:
        raise ConfigError(f"parameter {spec.name!r} names {dup[0]!r} twice")
    if len(names) > MAX_CAMERAS:
        raise ConfigError(f"parameter {spec.name!r} names {len(names)} cameras; at most {MAX_CAMERAS}")
    return names


def _unknown(name: str) -> ConfigError:
    close = difflib.get_close_matches(name, list(_BY_NAME), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown parameter {name!r}{hint}")


@dataclass(frozen=True)
class NodeParams:
    """Typed parameter values; attribute = ROS name with dots replaced by underscores."""

    checkpoint: str = ""
    preset: str = ""
    backend: str = "torch"
    engine_path: str = ""
    device: str = "auto"
    seed: int = 0
    decoding_mode: str = "auto"
    decoding_steps: int = 0
    decoding_threshold: float = 0.0
    decoding_temperature: float = 0.0
    decoding_sampler: str = ""
    decoding_refresh: int = 0
    cameras: tuple[str, ...] = ()
    regions_source: str = "detections"
    regions_box_width: int = 0
    regions_box_height: int = 0
    regions_class_names: str = ""
    regions_max_per_frame: int = 64
    input_compressed: bool = False
    input_qos: str = "sensor_data"
    input_depth: int = 5
    input_max_pixels: int = 50_000_000
    output_depth: int = 10
    sync_slop: float = 0.0
    sync_queue_size: int = 10
    cache_enabled: bool = True
    cache_max_age: float = 2.0
    cache_iou_threshold: float = 0.5
    cache_max_tracks: int = 512
    cache_untracked_iou: float = 0.9
    annotated_enabled: bool = True
    annotations_enabled: bool = True
    diagnostics_period: float = 1.0
    log_throttle: float = 5.0
    autostart: bool = True

    @classmethod
    def from_values(cls, values: Mapping[str, Any] | None = None, *, ignore_unknown: bool = False) -> NodeParams:
        """Validate `{ros_name: value}` over the defaults. Unknown names raise unless `ignore_unknown`
        (parameters that belong to the ROS runtime, like use_sim_time, are always ignored)."""
        out = {p.attr: p.default for p in PARAMS}
        for name, value in (values or {}).items():
            spec = _BY_NAME.get(name)
            if spec is None:
                if ignore_unknown or name in ("use_sim_time", "qos_overrides") or name.startswith("qos_overrides."):
                    continue
                raise _unknown(name)
            out[spec.attr] = _check(spec, value)
        params = cls(**out)
        if params.checkpoint and params.preset:
            raise ConfigError("set either parameter 'checkpoint' or 'preset', not both")
        if (params.regions_box_width == 0) != (params.regions_box_height == 0):
            raise ConfigError("set both parameters 'regions.box_width' and 'regions.box_height' (or neither): boxes "
                              "are scaled from that size to the image's")
        return params

    def to_values(self) -> dict[str, Any]:
        """`{ros_name: value}`, string arrays as lists (as YAML and rclpy give them)."""
        return {p.name: list(v) if isinstance(v := getattr(self, p.attr), tuple) else v for p in PARAMS}


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested YAML mappings -> dotted names, as ROS reads a params file."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _node_pattern_matches(pattern: str, fqn: str) -> bool:
    """ROS 2 params-file node keys: `/**`, `/**/name`, `name`, `/ns/name`, with `*` and `**` wildcards."""
    pat = pattern if pattern.startswith("/") else "/" + pattern
    if pat == "/**":
        return True
    if fnmatch.fnmatchcase(fqn, pat.replace("**", "*")):
        return True
    return not pattern.startswith("/") and fqn.rsplit("/", 1)[-1] == pattern


def load_params_file(path: str | Path, node_fqn: str) -> dict[str, Any]:
    """The parameters a ROS 2 params file gives the node `node_fqn` (e.g. `/robot/pdlm_node`), flattened.

    Later sections override earlier ones, as in ROS. A file that is not a params file raises ConfigError.
    """
    p = Path(path)
    try:
        doc = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read params file {p}: {err}") from err
    if not isinstance(doc, Mapping):
        raise ConfigError(f"params file {p} must map node names to 'ros__parameters' (got {type(doc).__name__})")
    out: dict[str, Any] = {}
    for key, section in doc.items():
        if not isinstance(section, Mapping) or "ros__parameters" not in section:
            raise ConfigError(f"params file {p}: section {key!r} has no 'ros__parameters' mapping")
        if _node_pattern_matches(str(key), node_fqn):
            params = section["ros__parameters"] or {}
            if not isinstance(params, Mapping):
                raise ConfigError(f"params file {p}: {key!r}.ros__parameters must be a mapping")
            out.update(flatten(params))
    return out
