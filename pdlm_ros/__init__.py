"""pdlm_ros: describe every region of a camera frame in one parallel denoising pass of PerceptionDLM.

The core (model, decoding, data, evaluation) never imports rclpy; `pdlm_ros.ros` holds the ROS layer.
"""

from pkgutil import extend_path

# Under colcon the generated `pdlm_ros.msg` lives in the install tree; when a source checkout comes first on sys.path
# (pytest from the source dir), this lets `pdlm_ros.msg` still be found there.
__path__ = extend_path(__path__, __name__)

from pdlm_ros.types import FrameResult, FrameStats, RegionCaption, RegionInput  # noqa: E402

__all__ = ["FrameResult", "FrameStats", "RegionCaption", "RegionInput", "Captioner"]
__version__ = "0.1.0"


def __getattr__(name: str):  # lazy: importing the package must not import torch
    if name == "Captioner":
        from pdlm_ros.captioner import Captioner

        return Captioner
    raise AttributeError(name)
