"""The node core under hostile input: bounded work per frame, a stop in the middle of an inference, diagnostics
while busy, throttled per-region warnings, lost best-effort frames made visible. The real tiny Captioner throughout;
where an inference must last, its model's step is slowed (the node, not the model, is what these tests check)."""

from __future__ import annotations

import logging
import math
import threading
import time
import tracemalloc

import numpy as np
import pytest

from pdlm_ros.region_rules import budget_refusal
from pdlm_ros.ros import messages as M
from pdlm_ros.ros.convert import detection_array_msg, header_msg, image_to_msg
from pdlm_ros.types import RegionInput

from .conftest import H, W, RecordingOutputs, frame

MS = 1_000_000
BOXES = [("car-1", (5.0, 5.0, 35.0, 30.0)), ("ped-2", (50.0, 20.0, 70.0, 60.0))]


@pytest.fixture()
def slow_steps(tiny_captioner, monkeypatch):
    """Every denoising step of the tiny model takes `delay` seconds longer; counts the steps run."""
    model = tiny_captioner.model
    original = model.region_logits
    state = {"delay": 0.5, "calls": 0, "started": threading.Event()}

    def slow(*args, **kwargs):
        state["calls"] += 1
        state["started"].set()
        time.sleep(state["delay"])
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "region_logits", slow)
    return state


def many_boxes(n: int, seed: int = 0) -> list[RegionInput]:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, min(W, H) - 12, size=(n, 2))
    return [RegionInput(box=(x, y, x + 10.0, y + 10.0), region_id=f"t{k}", class_id="thing",
                        score=float(rng.uniform(0.1, 0.9))) for k, (x, y) in enumerate(xy)]


def send(node, stamp, regions):
    hdr = header_msg(stamp, "camera")
    img = np.random.default_rng(stamp % 1000).integers(60, 120, size=(H, W, 3), dtype=np.uint8)
    node.on_image(image_to_msg(img, hdr))
    node.on_detections(detection_array_msg(hdr, regions))


def test_ten_thousand_boxes_are_bounded_by_the_budget_and_the_next_frame_is_answered(make_node, tiny_captioner):
    """One Detection2DArray of 10,000 valid boxes used to be captioned in 10,000 / max_regions passes (1,250 with
    the bundled model): minutes of work, gigabytes of RSS, the next frame unanswered. Now the best
    regions.max_per_frame are captioned and every other box is in the answer with the reason."""
    budget = 24
    node, out = make_node(**{"regions.max_per_frame": budget, "cache.enabled": False})
    regions = many_boxes(10_000)
    send(node, 1_000 * MS, regions)
    assert node.wait_idle(timeout=120)
    send(node, 1_100 * MS, [RegionInput(box=b, region_id=i, class_id="thing", score=0.9) for i, b in BOXES])
    assert node.wait_idle(timeout=120)
    big, good = out.on("captions")
    assert len(big.regions) == 10_000 and [r.id for r in big.regions] == [r.region_id for r in regions]
    captioned = [r for r in big.regions if not r.error]
    assert len(captioned) == budget and all(r.caption for r in captioned)
    passes = -(-budget // tiny_captioner.config.region.max_regions)
    assert big.nfe <= passes * 2  # 2 steps a pass: the work is the budget's, not the message's
    best = sorted(range(10_000), key=lambda k: -regions[k].score)[:budget]
    assert sorted(r.index for r in captioned) == sorted(best)  # highest detector score first
    refused = [r for r in big.regions if r.error]
    assert all(r.error.startswith("over the per-frame region budget") for r in refused)
    assert refused[0].error == budget_refusal(budget, 10_000, next(
        rank for rank, k in enumerate(sorted(range(10_000), key=lambda k: -regions[k].score), 1)
        if k == refused[0].index))
    assert good.header.stamp.nanosec == 100 * MS and all(r.caption and not r.error for r in good.regions)
    counts, errors = node.health.snapshot()
    assert counts["regions_over_budget"] == 10_000 - budget and errors["region_over_budget"] == 10_000 - budget


def test_regions_over_the_budget_skip_the_cache(make_node):
    """Untracked regions are matched against every cached caption: 10,000 of them cost 10,000 x max_tracks IoUs.
    Over-budget ones are never looked up, and stay refused when a cached caption would fit them."""
    node, out = make_node(**{"regions.max_per_frame": 4})
    best = [RegionInput(box=(5.0 + 20 * k, 5.0, 20.0 + 20 * k, 20.0), class_id="thing", score=0.95) for k in range(4)]
    copies = [RegionInput(box=r.box, class_id="thing", score=0.01) for r in best]  # same boxes, ranked last
    rest = [RegionInput(box=r.box, class_id="thing", score=r.score) for r in many_boxes(3_000)]
    regions = copies + rest + best  # no track ids: the cache matches by box and class
    for k in range(2):
        send(node, (1_000 + 100 * k) * MS, regions)
        assert node.wait_idle(timeout=120)
    first, second = out.on("captions")
    kept = [r.index for r in first.regions if not r.error]
    assert kept == list(range(len(regions) - 4, len(regions)))  # the four best
    assert [r.index for r in second.regions if not r.error] == kept and all(second.regions[i].cached for i in kept)
    assert all("region budget" in second.regions[i].error for i in range(4))  # the copies stay refused
    assert second.nfe == 0  # the kept four came from the cache, the rest were refused without any work


def test_a_budget_of_the_captioner_also_bounds_describe_requests(make_node):
    node, _ = make_node(**{"regions.max_per_frame": 5})
    send(node, 1_000 * MS, [])
    assert node.wait_idle(timeout=60)
    out = node.describe(None, many_boxes(40))
    assert sum(not r.error for r in out.regions) == 5 and len(out.regions) == 40


def test_shutdown_in_the_middle_of_a_long_inference_stops_it(make_node, slow_steps):
    """SIGTERM used to wait for the whole frame (SIGKILL was needed): the stop now cancels it between two steps."""
    node, out = make_node(**{"regions.max_per_frame": 64, "decoding.steps": 8, "cache.enabled": False})
    send(node, 1_000 * MS, many_boxes(64))  # 8 passes x 8 steps x 0.5 s: over 30 s if it ran to the end
    assert slow_steps["started"].wait(timeout=60)
    worker = node._worker
    done = threading.Event()
    threading.Thread(target=lambda: (node.shutdown(), done.set()), daemon=True).start()
    at_stop = slow_steps["calls"]
    assert done.wait(timeout=30), "shutdown did not return"
    assert not worker.is_alive(), "the worker was left running instead of being stopped"
    assert slow_steps["calls"] - at_stop <= 1  # at most the step that was running
    assert out.on("captions") == [] and node.health.snapshot()[0]["frames_abandoned"] == 1
    assert node.state == "finalized"


def test_diagnostics_keep_their_period_while_a_frame_is_captioned(make_node, slow_steps):
    node, out = make_node(**{"diagnostics.period": 0.1, "decoding.steps": 8, "cache.enabled": False})
    send(node, 1_000 * MS, many_boxes(16))
    assert slow_steps["started"].wait(timeout=60)

    def busy_reports():
        reports = [{kv.key: kv.value for kv in d.status[0].values} for d in out.on("/diagnostics")]
        return [r for r in reports if float(r["busy_s"]) > 0]

    deadline = time.monotonic() + 60
    while len(busy_reports()) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(busy_reports()) >= 3 and out.on("captions") == []  # published while the frame is still running
    seen = [float(r["busy_s"]) for r in busy_reports()]
    assert seen == sorted(seen)


def test_per_region_warnings_follow_log_throttle(make_node, caplog):
    """One frame of 10,000 NaN boxes wrote 10,000 warning lines (the captioner's, one per region)."""
    node, out = make_node(**{"log.throttle": 60.0})
    nan_boxes = [RegionInput(box=(math.nan, 1.0, 10.0, 10.0), region_id=f"n{k}") for k in range(10_000)]
    with caplog.at_level(logging.WARNING):
        for k in range(2):
            send(node, (1_000 + k * 100) * MS, nan_boxes)
            assert node.wait_idle(timeout=120)
    caps = out.on("captions")
    assert len(caps) == 2 and all(len(c.regions) == 10_000 and all(r.error for r in c.regions) for c in caps)
    lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert 1 <= len(lines) <= 4, [r.getMessage() for r in lines]
    assert node.health.snapshot()[1]["region_nonfinite_box"] == 20_000  # every refusal is still counted


def test_nan_theta_and_tiny_boxes_are_refused_with_a_reason(make_node):
    node, out = make_node()
    hdr = header_msg(1_000 * MS, "camera")
    dets = detection_array_msg(hdr, [RegionInput(box=(5.0, 5.0, 35.0, 30.0), region_id=k) for k in
                                     ("nan-theta", "inf-theta", "speck", "rotated", "ok")])
    dets.detections[0].bbox.center.theta = math.nan
    dets.detections[1].bbox.center.theta = math.inf
    dets.detections[2].bbox.size_x = dets.detections[2].bbox.size_y = 0.01
    dets.detections[3].bbox.center.theta = math.pi / 4
    node.on_image(image_to_msg(np.full((H, W, 3), 90, np.uint8), hdr))
    node.on_detections(dets)
    assert node.wait_idle(timeout=60)
    (cap,) = out.on("captions")
    errors = {r.id: r.error for r in cap.regions}
    assert "theta is not finite (nan)" in errors["nan-theta"] and "theta is not finite (inf)" in errors["inf-theta"]
    assert "under the minimum region size of 1 px" in errors["speck"]
    assert errors["rotated"] == "" and errors["ok"] == ""
    rotated = cap.regions[3].bbox  # a 30 x 25 box turned by 45 degrees: the axis-aligned box around it
    assert rotated.size_x == pytest.approx((30 + 25) / math.sqrt(2)) and rotated.center.theta == 0.0
    _, kinds = node.health.snapshot()
    assert kinds["region_bad_angle"] == 2 and kinds["region_too_small"] == 1


def test_instance_mask_budget_bounds_the_masks_made(make_node):
    """A mono16 mask of 3,000 labels made 3,000 image-sized masks; now only the largest regions.max_per_frame."""
    node, out = make_node(**{"regions.source": "instance_mask", "regions.max_per_frame": 6})
    labels = np.arange(1, H * W + 1, dtype=np.uint16).reshape(H, W) % 3000 + 1
    labels[:20, :20] = 7  # label 7 is the largest
    hdr = header_msg(1_000 * MS, "camera")
    node.on_image(image_to_msg(np.full((H, W, 3), 90, np.uint8), hdr))
    mask = M.typestore().types[M.IMAGE](header=hdr, height=H, width=W, encoding="mono16", is_bigendian=0,
                                        step=2 * W, data=labels.astype("<u2").view(np.uint8).reshape(-1))
    tracemalloc.start()
    try:
        node.on_instance_mask(mask)
        assert node.wait_idle(timeout=60)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3000 * H * W  # less than the 3,000 masks of H x W bytes alone (20 MB); the answer itself is O(N)
    (cap,) = out.on("captions")
    assert len(cap.regions) == 3000
    kept = [r for r in cap.regions if not r.error]
    assert len(kept) == 6 and "7" in {r.id for r in kept}
    assert all("region budget" in r.error for r in cap.regions if r.error)


def test_regions_without_their_images_are_reported_with_the_qos_hint(make_node, caplog):
    """Large frames over best-effort input never arrive and images_in never counts them; the detections do."""
    node, _ = make_node()
    node.publish_diagnostics()
    with caplog.at_level(logging.WARNING, logger="pdlm_ros.node"):
        for k in range(3):  # the images were lost on the way: only their detections arrive
            hdr = header_msg((1_000 + k * 100) * MS, "camera")
            node.on_detections(detection_array_msg(hdr, [RegionInput(box=(5.0, 5.0, 35.0, 30.0))]))
        first = node.publish_diagnostics()  # they may still be on their way: a report period to wait
        diag = node.publish_diagnostics()
    assert first.status[0].level == 0
    status = diag.status[0]
    values = {kv.key: kv.value for kv in status.values}
    assert values["errors.images_missing"] == "1" and values["images_in"] == "0" and status.level == 1
    assert "input.qos: reliable" in caplog.text and values["input_qos"] == "sensor_data"


def test_a_large_frame_over_best_effort_warns_once(make_node, caplog):
    node, out = make_node()
    big = np.zeros((720, 1280, 3), np.uint8)
    with caplog.at_level(logging.WARNING, logger="pdlm_ros.node"):
        for k in range(2):
            hdr = header_msg((1_000 + k * 100) * MS, "camera")
            node.on_image(image_to_msg(big, hdr))
            node.on_detections(detection_array_msg(hdr, [RegionInput(box=(5.0, 5.0, 35.0, 30.0))]))
            assert node.wait_idle(timeout=60)
    assert caplog.text.count("arrive over best-effort input QoS") == 1 and "input.qos: reliable" in caplog.text
    quiet, _ = make_node(**{"input.qos": "reliable"})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pdlm_ros.node"):
        quiet.on_image(image_to_msg(big, header_msg(5 * MS, "camera")))
    assert "best-effort" not in caplog.text


def test_an_image_over_max_pixels_is_refused_before_the_model(make_node):
    node, out = make_node(**{"input.max_pixels": 1000})
    image, dets = frame(1_000 * MS, BOXES)
    node.on_image(image)
    node.on_detections(dets)
    assert node.wait_idle(timeout=60)
    assert out.on("captions") == [] and node.health.snapshot()[1]["image_too_large"] == 1


def test_a_worker_stuck_inside_one_call_is_left_behind_not_waited_for(make_node, slow_steps, monkeypatch):
    """A single forward that outlasts SHUTDOWN_WAIT_S (a large model on a CPU): the stop returns anyway, the worker is
    marked so `pdlm-ros node` skips the interpreter shutdown, and its frame is never published."""
    from pdlm_ros.ros import node_core

    monkeypatch.setattr(node_core, "SHUTDOWN_WAIT_S", 0.2)
    slow_steps["delay"] = 2.0
    node, out = make_node(**{"cache.enabled": False})
    send(node, 1_000 * MS, many_boxes(2))
    assert slow_steps["started"].wait(timeout=60)
    worker = node._worker
    node.shutdown()
    assert worker.is_alive() and worker in node_core.abandoned_workers()
    worker.join(timeout=30)
    assert not worker.is_alive() and worker not in node_core.abandoned_workers()
    assert out.on("captions") == []
