"""Message definitions the project uses, registered in one rosbags typestore.

rosbags' built-in typestores (ROS2_HUMBLE here) carry std_msgs, sensor_msgs and diagnostic_msgs but neither
vision_msgs nor our own messages, so both are registered at run time:
- vision_msgs in its current 4.x layout (Humble, Iron, Jazzy: `det.bbox.center.position.x`), kept as text below
  because vision_msgs is an external package;
- `pdlm_ros/msg/*` read from the .msg files in `msg/`, the same files the colcon build generates code from, so there
  is ONE definition of our messages. `msg_dir()` finds them in a checkout, a pip install (data_files under
  `<prefix>/share/pdlm_ros/msg`) and a colcon install (`share/pdlm_ros/msg` on AMENT_PREFIX_PATH).
"""

from __future__ import annotations

import os
import site
import sys
import sysconfig
from functools import lru_cache
from pathlib import Path

from rosbags.typesys import Stores, get_types_from_msg, get_typestore
from rosbags.typesys.store import Typestore

from pdlm_ros.errors import ConfigError

__all__ = [
    "PACKAGE",
    "IMAGE",
    "COMPRESSED_IMAGE",
    "DETECTION_ARRAY",
    "CAPTION_ARRAY",
    "CAPTION",
    "DIAGNOSTIC_ARRAY",
    "MODEL_INFO",
    "IMAGE_ANNOTATIONS",
    "VISION_MSGS",
    "msg_dir",
    "project_msgs",
    "typestore",
    "dds_type_name",
]

PACKAGE = "pdlm_ros"

# Message type names as rosbags spells them (`pkg/msg/Type`).
IMAGE = "sensor_msgs/msg/Image"
COMPRESSED_IMAGE = "sensor_msgs/msg/CompressedImage"
DETECTION_ARRAY = "vision_msgs/msg/Detection2DArray"
CAPTION_ARRAY = f"{PACKAGE}/msg/RegionCaptionArray"
CAPTION = f"{PACKAGE}/msg/RegionCaption"
DIAGNOSTIC_ARRAY = "diagnostic_msgs/msg/DiagnosticArray"
MODEL_INFO = f"{PACKAGE}/msg/ModelInfo"
IMAGE_ANNOTATIONS = "foxglove_msgs/msg/ImageAnnotations"
YOLO_DETECTION_ARRAY = "yolo_msgs/msg/DetectionArray"  # yolo_ros; only through rclpy (not registered here)

# vision_msgs 4.x (ros-perception/vision_msgs, branch ros2), comments trimmed. Order matters: a type is registered
# after the types its fields use.
VISION_MSGS: dict[str, str] = {
    "vision_msgs/msg/Point2D": "float64 x\nfloat64 y\n",
    "vision_msgs/msg/Pose2D": "vision_msgs/Point2D position\nfloat64 theta\n",
    "vision_msgs/msg/BoundingBox2D": "vision_msgs/Pose2D center\nfloat64 size_x\nfloat64 size_y\n",
    "vision_msgs/msg/ObjectHypothesis": "string class_id\nfloat64 score\n",
    "vision_msgs/msg/ObjectHypothesisWithPose": (
        "vision_msgs/ObjectHypothesis hypothesis\ngeometry_msgs/PoseWithCovariance pose\n"),
    "vision_msgs/msg/Detection2D": (
        "std_msgs/Header header\nvision_msgs/ObjectHypothesisWithPose[] results\n"
        "vision_msgs/BoundingBox2D bbox\nstring id\n"),
    "vision_msgs/msg/Detection2DArray": "std_msgs/Header header\nvision_msgs/Detection2D[] detections\n",
}

# Our messages, in dependency order (RegionCaptionArray holds RegionCaption[]).
_PROJECT_TYPES = ("RegionCaption", "RegionCaptionArray", "ModelInfo")
# Foxglove's image annotations (third_party/foxglove_msgs: the upstream definitions), in dependency order.
_FOXGLOVE_TYPES = ("Color", "Point2", "CircleAnnotation", "PointsAnnotation", "TextAnnotation", "ImageAnnotations")


def _candidate_dirs(package: str = PACKAGE) -> list[Path]:
    here = Path(__file__).resolve()
    # a checkout or an editable install: <repo>/msg, <repo>/third_party/foxglove_msgs/msg
    dirs = [here.parents[2] / "msg" if package == PACKAGE else here.parents[2] / "third_party" / package / "msg"]
    # data_files land under the install scheme's data path (/usr/local on Debian's system pip), sys.prefix (venvs)
    # or the user base (pip --user); colcon installs them under share/ of an AMENT_PREFIX_PATH entry
    prefixes = [sysconfig.get_paths()["data"], sys.prefix, getattr(site, "USER_BASE", None) or ""]
    prefixes += [p for p in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep) if p]
    dirs += [Path(p) / "share" / package / "msg" for p in prefixes if p]
    return dirs


def msg_dir() -> Path:
    """The directory holding `RegionCaption.msg` and `RegionCaptionArray.msg`."""
    env = os.environ.get("PDLM_ROS_MSG_DIR")
    candidates = [Path(env)] if env else _candidate_dirs()
    for d in candidates:
        if all((d / f"{name}.msg").is_file() for name in _PROJECT_TYPES):
            return d
    looked = ", ".join(str(d) for d in candidates)
    raise ConfigError(f"cannot find the pdlm_ros message definitions (looked in: {looked}); reinstall the package "
                      "or set PDLM_ROS_MSG_DIR to the directory holding RegionCaption.msg")


def project_msgs() -> dict[str, str]:
    """Our .msg texts by type name (`pdlm_ros/msg/RegionCaption`, ...), read from `msg_dir()`."""
    d = msg_dir()
    return {f"{PACKAGE}/msg/{name}": (d / f"{name}.msg").read_text() for name in _PROJECT_TYPES}


def foxglove_msgs() -> dict[str, str]:
    """foxglove_msgs image-annotation .msg texts by type name, from the first directory that has them all."""
    for d in _candidate_dirs("foxglove_msgs"):
        if all((d / f"{name}.msg").is_file() for name in _FOXGLOVE_TYPES):
            return {f"foxglove_msgs/msg/{name}": (d / f"{name}.msg").read_text() for name in _FOXGLOVE_TYPES}
    raise ConfigError("cannot find the foxglove_msgs image-annotation definitions (third_party/foxglove_msgs/msg "
                      "or share/foxglove_msgs/msg of an install); reinstall the package")


@lru_cache(maxsize=1)
def typestore() -> Typestore:
    """A ROS2_HUMBLE typestore with vision_msgs, foxglove_msgs' image annotations and pdlm_ros registered.

    Shared (cached) because registration parses text; treat it as read-only. The Humble definitions of the
    std/sensor/diagnostic messages used here are identical in Iron and Jazzy.
    """
    store = get_typestore(Stores.ROS2_HUMBLE)
    for name, text in [*VISION_MSGS.items(), *foxglove_msgs().items(), *project_msgs().items()]:
        store.register(get_types_from_msg(text, name))
    return store


def dds_type_name(msgtype: str) -> str:
    """ROS 2's DDS type name of a message type: `sensor_msgs/msg/Image` -> `sensor_msgs::msg::dds_::Image_`."""
    parts = msgtype.split("/")
    if len(parts) != 3 or parts[1] != "msg" or not all(parts):
        raise ConfigError(f"message type must look like 'pkg/msg/Type' (got {msgtype!r})")
    pkg, _, name = parts
    return f"{pkg}::msg::dds_::{name}_"
