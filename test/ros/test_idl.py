"""Wire compatibility: the DDS transport's IDL types give the same CDR bytes as rosbags (= ROS 2 / rosbag2)."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("cyclonedds", reason="the ROS-less DDS transport needs the cyclonedds package")

from pdlm_ros.ros import messages as M  # noqa: E402
from pdlm_ros.ros.convert import (caption_array_msg, compressed_to_msg, detection_array_msg, header_msg,  # noqa: E402
                                  image_to_msg)
from pdlm_ros.ros.idl import from_idl, idl_type, to_idl  # noqa: E402
from pdlm_ros.types import FrameResult, FrameStats, RegionCaption, RegionInput  # noqa: E402

RNG = np.random.default_rng(1)
HDR = header_msg(1_700_000_001_000_000_007, "camera_optical_frame")


def _diagnostics():
    t = M.typestore().types
    kv = t["diagnostic_msgs/msg/KeyValue"]
    status = t["diagnostic_msgs/msg/DiagnosticStatus"](level=1, name="pdlm_node: captioning", message="dropping",
                                                       hardware_id="cpu", values=[kv(key="drops", value="3"),
                                                                                  kv(key="p95_ms", value="12.5")])
    return t[M.DIAGNOSTIC_ARRAY](header=HDR, status=[status, status])


def _detections():
    regions = [RegionInput(box=(1.5, 2.0, 40.0, 33.25), region_id="track-1", class_id="cup", score=0.875),
               RegionInput(box=(math.nan, 0, 5, 5), region_id=""),
               RegionInput(box=(3, 4, 5, 6), region_id="ü-ñ")]  # non-ASCII id: UTF-8 bytes on the wire
    msg = detection_array_msg(HDR, regions)
    msg.detections[0].results[0].pose.covariance = RNG.normal(size=36)
    return msg


def _captions():
    result = FrameResult(
        [RegionCaption(0, "track-1", (1.5, 2.0, 40.0, 33.25), "a small striped red star", 0.625, source_index=0,
                       class_id="cup", score=0.875),
         RegionCaption(1, "", (math.nan,) * 4, "", 0.0, source_index=1, error="box has non-finite coordinates"),
         RegionCaption(2, "x", (3, 4, 5, 6), "a", 0.5, cached=True)],
        FrameStats(nfe=32, tokens=96, tpf=3.0, latency_ms={"total": 41.5}), "pdlm-tiny")
    return caption_array_msg(result, HDR, ages=[0.0, 0.0, 2.25])


def _padded_image():
    t = M.typestore().types
    return t[M.IMAGE](header=HDR, height=3, width=5, encoding="mono16", is_bigendian=1, step=12,
                      data=RNG.integers(0, 256, size=36, dtype=np.uint8))


CASES = {
    "Image": lambda: image_to_msg(RNG.integers(0, 256, size=(9, 11, 3), dtype=np.uint8), HDR),
    "Image(mono16, padded)": _padded_image,
    "CompressedImage": lambda: compressed_to_msg(RNG.integers(0, 256, size=(16, 16, 3), dtype=np.uint8), HDR),
    "Detection2DArray": _detections,
    "Detection2DArray(empty)": lambda: detection_array_msg(HDR, []),
    "RegionCaptionArray": _captions,
    "DiagnosticArray": _diagnostics,
}


@pytest.mark.parametrize("name", list(CASES))
def test_cdr_bytes_equal_rosbags(name):
    ts = M.typestore()
    msg = CASES[name]()
    expected = bytes(ts.serialize_cdr(msg, msg.__msgtype__))
    sample = to_idl(msg)
    got = sample.serialize()
    assert got[:4] == b"\x00\x01\x00\x00"  # CDR_LE, XCDR1: what rmw_cyclonedds_cpp sends
    diff = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
    assert got == expected, f"{name}: {len(got)} vs {len(expected)} bytes, first difference at byte {diff}"
    # and back: DDS bytes -> IDL sample -> rosbags message -> the same bytes
    back = from_idl(type(sample).deserialize(expected), msg.__msgtype__)
    assert bytes(ts.serialize_cdr(back, msg.__msgtype__)) == expected


@pytest.mark.parametrize("msgtype,dds", [
    (M.IMAGE, "sensor_msgs::msg::dds_::Image_"),
    (M.COMPRESSED_IMAGE, "sensor_msgs::msg::dds_::CompressedImage_"),
    (M.DETECTION_ARRAY, "vision_msgs::msg::dds_::Detection2DArray_"),
    ("vision_msgs/msg/BoundingBox2D", "vision_msgs::msg::dds_::BoundingBox2D_"),
    (M.CAPTION_ARRAY, "pdlm_ros::msg::dds_::RegionCaptionArray_"),
    (M.CAPTION, "pdlm_ros::msg::dds_::RegionCaption_"),
    (M.DIAGNOSTIC_ARRAY, "diagnostic_msgs::msg::dds_::DiagnosticArray_"),
    ("std_msgs/msg/Header", "std_msgs::msg::dds_::Header_"),
])
def test_dds_type_names_are_ros2s(msgtype, dds):
    assert idl_type(msgtype).__idl_typename__ == dds
