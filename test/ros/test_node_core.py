"""The node core with the real tiny Captioner: pairing, caching, overload, bad input, lifecycle, diagnostics."""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import pytest

from pdlm_ros.ros import messages as M
from pdlm_ros.ros.convert import compressed_to_msg, header_msg
from pdlm_ros.ros.node_core import NodeCore, input_topics
from pdlm_ros.ros.params import NodeParams

from .conftest import H, W, RecordingOutputs, frame, image_type

MS = 1_000_000
BOXES = [("car-1", (5.0, 5.0, 35.0, 30.0)), ("ped-2", (50.0, 20.0, 70.0, 60.0))]


def feed(node, image, dets, wait=True):
    node.on_image(image)
    node.on_detections(dets)
    if wait:
        assert node.wait_idle(timeout=60)


def test_captions_carry_image_header_and_detection_ids(make_node):
    node, out = make_node()
    for k in range(3):
        feed(node, *frame(1_000 * MS + k * 33 * MS, BOXES, seed=k))
    caps = out.on("captions")
    assert [c.header.stamp.nanosec for c in caps] == [(k * 33 * MS) for k in range(3)]
    assert all(c.header.stamp.sec == 1 and c.header.frame_id == "camera" for c in caps)
    first = caps[0]
    assert [r.id for r in first.regions] == ["car-1", "ped-2"] and [r.index for r in first.regions] == [0, 1]
    assert all(r.caption and not r.error and not r.cached and 0.0 <= r.confidence <= 1.0 for r in first.regions)
    assert first.nfe == 2
    info, = out.on("model_info")  # the model is named once, on the latched topic, not in every caption array
    assert info.name.startswith("pdlm-tiny") and info.max_regions > 0
    assert first.regions[0].bbox.center.position.x == 20.0 and first.regions[0].class_id == "thing"


def test_cache_reuses_tracked_captions_until_due(make_node):
    node, out = make_node(**{"cache.max_age": 0.5, "cache.iou_threshold": 0.5})
    feed(node, *frame(0, BOXES))
    feed(node, *frame(100 * MS, [("car-1", (6.0, 5.0, 36.0, 30.0)), ("ped-2", (50.0, 20.0, 70.0, 60.0))]))
    moved = [("car-1", (6.0, 5.0, 36.0, 30.0)), ("ped-2", (5.0, 40.0, 25.0, 70.0))]  # ped-2 jumped: IoU 0
    feed(node, *frame(200 * MS, moved))
    feed(node, *frame(700 * MS, moved))  # car-1 described at 0 ms: 0.7 s > max_age
    c0, c1, c2, c3 = out.on("captions")
    assert [r.cached for r in c1.regions] == [True, True] and c1.nfe == 0
    assert [r.caption for r in c1.regions] == [r.caption for r in c0.regions]
    assert c1.regions[0].age == pytest.approx(0.1) and c1.regions[0].bbox.center.position.x == 21.0
    assert [r.cached for r in c2.regions] == [True, False] and c2.nfe == 2
    assert [r.cached for r in c3.regions] == [False, True] and c3.regions[1].age == pytest.approx(0.5)


def test_overload_keeps_newest_and_counts_drops(make_node):
    node, out = make_node(**{"cache.enabled": False})
    n = 40
    frames = [frame(k * MS, BOXES) for k in range(n)]
    for image, dets in frames:  # a camera far faster than the model: all 40 arrive within a few ms
        feed(node, image, dets, wait=False)
    assert node.wait_idle(timeout=120)
    caps = out.on("captions")
    counts, _ = node.health.snapshot()
    assert counts["pairs"] == n
    assert counts["dropped"] == n - len(caps)  # every pair is either captioned or counted as dropped
    assert len(caps) < n
    stamps = [c.header.stamp.nanosec for c in caps]
    assert stamps == sorted(stamps) and stamps[-1] == (n - 1) * MS  # the newest frame is always processed last
    assert node.cameras[0].sync.pending() == (0, 0)


def test_overload_bounds_waiting_and_queues(make_node):
    """A paced camera faster than the model: a published frame waited for at most the one inference in progress,
    and nothing queues up (bounded memory). Counted in frames, not seconds."""
    node, out = make_node(**{"cache.enabled": False, "sync.queue_size": 5})
    n = 30
    published_at_arrival, pending = {}, []
    for k in range(n):
        image, dets = frame(k * MS, BOXES)
        node.on_image(image)
        published_at_arrival[k * MS] = len(out.on("captions"))  # read before the pair completes: conservative
        node.on_detections(dets)
        pending.append(node.cameras[0].sync.pending())
        time.sleep(0.003)
    assert node.wait_idle(timeout=120)
    caps = out.on("captions")
    counts, _ = node.health.snapshot()
    assert counts["dropped"] == n - len(caps) > 0
    for i, c in enumerate(caps):  # captions published between this frame's arrival and its own: at most one
        assert i - published_at_arrival[c.header.stamp.nanosec] <= 1, (i, c.header.stamp.nanosec)
    assert max(max(p) for p in pending) <= 5
    values = {kv.key: kv.value for kv in node.publish_diagnostics().status[0].values}
    assert float(values["latency_p95_ms"]) > 0


def _good_after(node, out, stamp):
    before = len(out.on("captions"))
    feed(node, *frame(stamp, BOXES))
    caps = out.on("captions")
    assert len(caps) == before + 1 and caps[-1].header.stamp.nanosec == stamp % 1_000_000_000
    assert all(r.caption and not r.error for r in caps[-1].regions)


def _errors(node):
    return node.health.snapshot()[1]


@pytest.mark.parametrize("breakage,kind", [
    (lambda m: setattr(m, "encoding", "yuv422"), "image_encoding"),
    (lambda m: setattr(m, "step", m.step - 1), "image_step"),
    (lambda m: setattr(m, "data", m.data[:-7]), "image_size"),
])
def test_bad_image_is_logged_counted_and_skipped(make_node, caplog, breakage, kind):
    node, out = make_node()
    image, dets = frame(10 * MS, BOXES)
    breakage(image)
    with caplog.at_level(logging.WARNING, logger="pdlm_ros.node"):
        feed(node, image, dets)
    assert out.on("captions") == [] and _errors(node)[kind] == 1
    assert "rejected" in caplog.text
    _good_after(node, out, 20 * MS)
    diag = node.publish_diagnostics()
    values = {kv.key: kv.value for kv in diag.status[0].values}
    assert values[f"errors.{kind}"] == "1" and diag.status[0].level == 1


def test_corrupt_compressed_image(make_node, caplog):
    node, out = make_node(**{"input.compressed": True})
    assert [t.name for t in input_topics(node.params)] == ["image/compressed", "detections"]
    image, dets = frame(10 * MS, BOXES)
    comp = compressed_to_msg(np.zeros((H, W, 3), np.uint8), image.header, "jpeg")
    comp.data = comp.data[: len(comp.data) // 3]
    with caplog.at_level(logging.WARNING, logger="pdlm_ros.node"):
        node.on_compressed(comp)
        node.on_detections(dets)
        assert node.wait_idle(timeout=60)
    assert _errors(node)["image_compressed"] == 1 and "cannot decode compressed image" in caplog.text
    image, dets = frame(20 * MS, BOXES)
    node.on_compressed(compressed_to_msg(np.zeros((H, W, 3), np.uint8) + 90, image.header, "png"))
    node.on_detections(dets)
    assert node.wait_idle(timeout=60)
    assert len(out.on("captions")) == 1


def test_nan_and_out_of_frame_boxes_are_refused_not_dropped(make_node, caplog):
    node, out = make_node()
    boxes = [("nan", (math.nan, 1.0, 10.0, 10.0)), ("ok", (5.0, 5.0, 35.0, 30.0)), ("far", (500., 500., 520., 530.)),
             ("inf", (0.0, 0.0, math.inf, 5.0))]
    with caplog.at_level(logging.WARNING, logger="pdlm_ros.node"):
        feed(node, *frame(10 * MS, boxes))
    (cap,) = out.on("captions")
    assert [r.id for r in cap.regions] == ["nan", "ok", "far", "inf"]
    assert [bool(r.error) for r in cap.regions] == [True, False, True, True]
    assert cap.regions[1].caption and "outside" in cap.regions[2].error
    errors = _errors(node)
    assert errors["region_nonfinite_box"] == 2 and errors["region_out_of_frame"] == 1
    assert "refused" in caplog.text
    _good_after(node, out, 20 * MS)


def test_empty_detections_give_an_empty_caption_array(make_node, caplog):
    node, out = make_node()
    with caplog.at_level(logging.INFO, logger="pdlm_ros.node"):
        feed(node, *frame(10 * MS, []))
    (cap,) = out.on("captions")
    assert cap.regions == [] and cap.nfe == 0 and cap.header.stamp.nanosec == 10 * MS
    assert node.health.snapshot()[0]["frames_without_regions"] == 1
    assert f"frame {10 * MS} has no regions" in caplog.text
    values = {kv.key: kv.value for kv in node.publish_diagnostics().status[0].values}
    assert values["frames_without_regions"] == "1"
    _good_after(node, out, 20 * MS)


def test_more_detections_than_max_regions_are_all_captioned(make_node, tiny_captioner, caplog):
    node, out = make_node()
    cap_max = tiny_captioner.config.region.max_regions
    boxes = [(f"t{k}", (float(k % 10) * 9, float(k // 10) * 20, float(k % 10) * 9 + 8, float(k // 10) * 20 + 18))
             for k in range(cap_max + 3)]
    with caplog.at_level(logging.WARNING, logger="pdlm_ros.node"):
        feed(node, *frame(10 * MS, boxes))
    (cap,) = out.on("captions")
    assert [r.id for r in cap.regions] == [b[0] for b in boxes]
    assert all(r.caption and not r.error for r in cap.regions)
    assert cap.nfe == 2 * 2  # two passes of two steps
    assert node.health.snapshot()[0]["frames_over_max_regions"] == 1 and "exceed max_regions" in caplog.text


def test_stamps_that_never_match(make_node, caplog):
    node, out = make_node(**{"sync.queue_size": 4})
    with caplog.at_level(logging.WARNING, logger="pdlm_ros.node"):
        for k in range(10):
            image, dets = frame(k * 33 * MS, BOXES)
            dets.header = header_msg(k * 33 * MS + 3 * MS, "camera")  # a detector that restamps
            feed(node, image, dets)
        diag = node.publish_diagnostics()
    assert out.on("captions") == []
    values = {kv.key: kv.value for kv in diag.status[0].values}
    assert values["sync.matched"] == "0" and int(values["sync.expired_images"]) == 6
    assert values["errors.sync_no_match"] == "1" and "copy the image header" in caplog.text
    _good_after(node, out, 500 * MS)


def test_publisher_restart_with_a_new_clock(make_node, caplog):
    node, out = make_node()
    _good_after(node, out, 5_000_000 * MS)
    with caplog.at_level(logging.WARNING, logger="pdlm_ros.node"):
        _good_after(node, out, 100 * MS)  # stamps jumped back: the sync resets instead of waiting forever
    assert node.cameras[0].sync.counters().resets >= 1
    assert "starting a new timeline" in caplog.text
    values = {kv.key: kv.value for kv in node.publish_diagnostics().status[0].values}
    assert int(values["errors.publisher_restart"]) >= 1 and values["sync.resets"] == values["errors.publisher_restart"]


def test_image_stream_that_stops_and_comes_back_is_reported(tiny_captioner, caplog):
    now = [0.0]
    values = {"decoding.steps": 2, "log.throttle": 0.0, "diagnostics.period": 3600.0}
    node = NodeCore(NodeParams.from_values(values), RecordingOutputs(None), loader=lambda p: tiny_captioner,
                    clock=lambda: now[0])
    node.configure()
    node.activate()
    try:
        with caplog.at_level(logging.WARNING, logger="pdlm_ros.node"):
            for k in range(5):  # 10 Hz, then a short hiccup that is not a restart
                now[0] = k * 0.1 + (0.3 if k == 4 else 0.0)
                feed(node, *frame(k * 100 * MS, BOXES))
            assert node.health.snapshot()[1]["image_stream_gap"] == 0
            now[0] += 4.0  # the camera died; a new one comes up with a later clock
            feed(node, *frame(10_000 * MS, BOXES))
        assert node.health.snapshot()[1]["image_stream_gap"] == 1
        assert "images resumed after 4.0 s" in caplog.text
        assert len(node.outputs.on("captions")) == 6  # every frame captioned, the one after the gap too
    finally:
        node.shutdown()


def test_instance_mask_source(make_node):
    node, out = make_node(**{"regions.source": "instance_mask"})
    labels = np.zeros((H, W), np.uint8)
    labels[5:30, 5:35] = 4
    labels[40:60, 50:70] = 9
    image, _ = frame(10 * MS, [])
    mask = image_type()(header=image.header, height=H, width=W, encoding="mono8", is_bigendian=0, step=W,
                        data=labels.reshape(-1))
    node.on_image(image)
    node.on_instance_mask(mask)
    assert node.wait_idle(timeout=60)
    (cap,) = out.on("captions")
    assert [r.id for r in cap.regions] == ["4", "9"] and all(r.caption for r in cap.regions)
    assert cap.regions[0].bbox.size_x == 30.0 and cap.regions[0].bbox.size_y == 25.0


def test_annotated_image_only_while_subscribed(make_node):
    node, out = make_node()
    feed(node, *frame(10 * MS, BOXES))
    assert out.on("annotated_image") == []
    out.subscribers["annotated_image"] = 1
    feed(node, *frame(20 * MS, BOXES))
    (ann,) = out.on("annotated_image")
    assert ann.header.stamp.nanosec == 20 * MS and (ann.width, ann.height, ann.encoding) == (W, H, "rgb8")


def test_lifecycle_frees_and_reloads_the_model(tiny_captioner):
    loads = []

    def loader(p):
        loads.append(p)
        return tiny_captioner

    out = RecordingOutputs()
    node = NodeCore(NodeParams.from_values({"decoding.steps": 2}), out, loader=loader)
    image, dets = frame(10 * MS, BOXES)
    node.on_image(image)  # not active yet: ignored, counted
    node.configure()
    assert node.state == "inactive" and len(loads) == 1
    node.activate()
    node.deactivate()
    assert node.captioner is None and node.state == "inactive"
    node.activate()
    assert len(loads) == 2 and node.captioner is tiny_captioner
    feed(node, image, dets)
    assert len(out.on("captions")) == 1
    node.shutdown()
    assert node.state == "finalized" and node.captioner is None
    assert node.health.snapshot()[0]["inputs_while_inactive"] == 1


def test_diagnostics_message(make_node):
    node, out = make_node()
    feed(node, *frame(10 * MS, BOXES))
    diag = node.publish_diagnostics()
    assert out.on("/diagnostics")[-1] is diag and diag.__msgtype__ == M.DIAGNOSTIC_ARRAY
    status = diag.status[0]
    values = {kv.key: kv.value for kv in status.values}
    for key in ("input_image_hz", "input_regions_hz", "output_hz", "latency_p50_ms", "latency_p95_ms",
                "regions_per_frame", "dropped", "frames_out", "sync.matched", "model"):
        assert key in values, key
    assert status.level == 0 and values["frames_out"] == "1" and values["regions_per_frame"] == "2.00"
    bytes(M.typestore().serialize_cdr(diag, M.DIAGNOSTIC_ARRAY))  # a valid message


def test_engines_go_under_ros_home_not_the_working_directory(tmp_path, monkeypatch):
    """`engines` was relative: a node started by systemd (cwd `/`) exported its graphs into `/engines`."""
    pytest.importorskip("onnxruntime", reason="the onnxruntime backend needs onnxruntime")
    from pdlm_ros.ros.node_core import engine_root, load_captioner

    cwd, ros_home = tmp_path / "cwd", tmp_path / "ros_home"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("ROS_HOME", str(ros_home))
    assert engine_root() == ros_home.resolve() / "pdlm_ros" / "engines"
    load_captioner(NodeParams.from_values({"backend": "onnxruntime", "preset": "tiny", "device": "cpu"}))
    assert list(cwd.iterdir()) == []
    assert [p.name for p in engine_root().iterdir()] and all(p.is_dir() for p in engine_root().iterdir())


def test_a_pause_while_inactive_is_not_an_image_stream_gap(tiny_captioner):
    """The time spent deactivated (model reload included) is not a camera that stopped: reactivation starts fresh."""
    now = [100.0]
    out = RecordingOutputs()
    node = NodeCore(NodeParams.from_values({"decoding.steps": 2}), out, loader=lambda p: tiny_captioner,
                    clock=lambda: now[0])
    node.configure()
    node.activate()
    for k in range(3):
        feed(node, *frame(1_000 * MS + k * 100 * MS, BOXES, seed=k))
        now[0] += 0.1
    node.deactivate()
    now[0] += 30.0
    node.activate()
    feed(node, *frame(2_000 * MS, BOXES))
    assert node.health.snapshot()[1]["image_stream_gap"] == 0
    node.shutdown()


def test_regions_without_ids_reuse_captions_by_box_and_class(make_node):
    """Detectors without track ids: a still object is described once, then served from the cache by its box."""
    boxes = [("", (5.0, 5.0, 35.0, 30.0)), ("", (50.0, 20.0, 70.0, 60.0))]
    node, out = make_node()
    feed(node, *frame(1_000 * MS, boxes, seed=0))
    feed(node, *frame(1_100 * MS, boxes, seed=0))
    first, second = out.on("captions")
    assert [r.cached for r in first.regions] == [False, False] and first.nfe > 0
    assert [r.cached for r in second.regions] == [True, True] and second.nfe == 0
    assert [r.caption for r in second.regions] == [r.caption for r in first.regions]
    moved = [("", (5.0, 5.0, 35.0, 30.0)), ("", (55.0, 25.0, 75.0, 65.0))]  # IoU with its old box < 0.9
    feed(node, *frame(1_200 * MS, moved, seed=0))
    assert [r.cached for r in out.on("captions")[2].regions] == [True, False]
    node_off, out_off = make_node(**{"cache.untracked_iou": 0.0})
    feed(node_off, *frame(1_000 * MS, boxes, seed=0))
    feed(node_off, *frame(1_100 * MS, boxes, seed=0))
    assert [r.cached for r in out_off.on("captions")[1].regions] == [False, False]


def test_numeric_class_ids_are_named_from_a_labels_file(make_node, tmp_path):
    from pdlm_ros.errors import ConfigError

    labels = tmp_path / "labels.txt"
    labels.write_text("person\nbicycle\ncar\n")
    node, out = make_node(**{"regions.class_names": str(labels)})
    image, dets = frame(1_000 * MS, BOXES, seed=0)
    for k, det in enumerate(dets.detections):
        det.results[0].hypothesis.class_id = ["2", "7"][k]  # 7 is past the file: kept as is
    feed(node, image, dets)
    assert [r.class_id for r in out.on("captions")[0].regions] == ["car", "7"]
    with pytest.raises(ConfigError, match="cannot read labels file"):
        make_node(**{"regions.class_names": str(tmp_path / "missing.txt")})
