"""Message definitions: one definition of our messages, vision_msgs 4.x layout, round trips through CDR."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pdlm_ros.errors import ConfigError
from pdlm_ros.ros import messages as M
from pdlm_ros.ros.convert import caption_array_msg, detection_array_msg, header_msg
from pdlm_ros.types import FrameResult, FrameStats, RegionCaption, RegionInput


def test_project_messages_come_from_msg_dir(tmp_path, monkeypatch):
    texts = M.project_msgs()
    assert set(texts) == {M.CAPTION, M.CAPTION_ARRAY, M.MODEL_INFO}
    assert texts[M.CAPTION_ARRAY] == (M.msg_dir() / "RegionCaptionArray.msg").read_text()
    monkeypatch.setenv("PDLM_ROS_MSG_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match="cannot find the pdlm_ros message definitions"):
        M.msg_dir()


def test_typestore_has_every_type_the_project_uses():
    ts = M.typestore()
    for name in [M.IMAGE, M.COMPRESSED_IMAGE, M.DETECTION_ARRAY, M.CAPTION, M.CAPTION_ARRAY, M.DIAGNOSTIC_ARRAY,
                 *M.VISION_MSGS]:
        assert name in ts.types, name
    # vision_msgs 4.x: the centre is a Pose2D holding a Point2D (det.bbox.center.position.x)
    names = [f for f, _ in ts.fielddefs["vision_msgs/msg/Pose2D"][1]]
    assert names == ["position", "theta"]
    caption_fields = [f for f, _ in ts.fielddefs[M.CAPTION][1]]
    assert caption_fields == ["id", "index", "class_id", "score", "bbox", "caption", "confidence", "cached", "age",
                              "error"]
    array_fields = [f for f, _ in ts.fielddefs[M.CAPTION_ARRAY][1]]
    assert array_fields == ["header", "nfe", "tpf", "latency_ms", "regions"]


def test_caption_array_cdr_round_trip():
    ts = M.typestore()
    result = FrameResult(
        [RegionCaption(0, "7", (10.0, 20.0, 30.0, 60.0), "a red cup", 0.75, source_index=3, class_id="cup",
                       score=0.9),
         RegionCaption(1, "8", (math.nan,) * 4, "", 0.0, source_index=4, error="box has non-finite coordinates")],
        FrameStats(nfe=32, tokens=64, tpf=2.0, latency_ms={"total": 12.5}), "pdlm-tiny")
    msg = caption_array_msg(result, header_msg(1_700_000_000_123_456_789, "camera"), ages=[0.0, 1.5])
    back = ts.deserialize_cdr(ts.serialize_cdr(msg, M.CAPTION_ARRAY), M.CAPTION_ARRAY)
    assert back.header.stamp.sec == 1_700_000_000 and back.header.stamp.nanosec == 123_456_789
    assert back.header.frame_id == "camera" and back.nfe == 32 and not hasattr(back, "model")
    r0, r1 = back.regions
    assert (r0.id, r0.index, r0.class_id, r0.caption) == ("7", 3, "cup", "a red cup")
    assert r0.bbox.center.position.x == 20.0 and r0.bbox.center.position.y == 40.0
    assert (r0.bbox.size_x, r0.bbox.size_y) == (20.0, 40.0)
    assert r1.error.startswith("box has non-finite") and math.isnan(r1.bbox.size_x) and r1.age == 1.5


def test_detection_array_cdr_round_trip():
    ts = M.typestore()
    msg = detection_array_msg(header_msg(5, "cam"), [RegionInput(box=(1, 2, 5, 10), region_id="t1", class_id="cup",
                                                                 score=0.5)])
    back = ts.deserialize_cdr(ts.serialize_cdr(msg, M.DETECTION_ARRAY), M.DETECTION_ARRAY)
    det = back.detections[0]
    assert det.id == "t1" and det.results[0].hypothesis.class_id == "cup"
    assert (det.bbox.center.position.x, det.bbox.center.position.y, det.bbox.size_x, det.bbox.size_y) == (3, 6, 4, 8)
    assert np.asarray(det.results[0].pose.covariance).shape == (36,)


def test_dds_type_name():
    assert M.dds_type_name("sensor_msgs/msg/Image") == "sensor_msgs::msg::dds_::Image_"
    assert M.dds_type_name(M.CAPTION_ARRAY) == "pdlm_ros::msg::dds_::RegionCaptionArray_"
    with pytest.raises(ConfigError, match="pkg/msg/Type"):
        M.dds_type_name("sensor_msgs/Image")
