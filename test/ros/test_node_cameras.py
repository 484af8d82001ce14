"""Several cameras in one node (parameter `cameras`): topics per camera, frames of different cameras captioned in one
denoising pass with the captions each frame gets alone, failures kept to their own camera, per-camera diagnostics."""

from __future__ import annotations

import dataclasses
import logging
import time

import pytest

from pdlm_ros.errors import ConfigError
from pdlm_ros.ros import messages as M
from pdlm_ros.ros.convert import header_msg, stamp_ns
from pdlm_ros.ros.node_core import input_topics, output_topics
from pdlm_ros.ros.params import NodeParams

from .conftest import frame

MS = 1_000_000
CAMS = ["front", "rear"]
BOXES = {"front": [("car-1", (5.0, 5.0, 35.0, 30.0)), ("ped-2", (50.0, 20.0, 70.0, 60.0))],
         "rear": [("bus-7", (20.0, 10.0, 80.0, 50.0))]}


def cam_frame(cam: str, stamp: int, seed: int):
    image, dets = frame(stamp, BOXES[cam], seed=seed)
    image.header.frame_id = dets.header.frame_id = f"{cam}_optical"
    return image, dets


def alone(captioner, image, dets, steps=2):
    """What the captioner gives this frame on its own (the reference every camera's captions must equal)."""
    from pdlm_ros.ros.convert import image_from_msg, regions_from_detections

    rgb = image_from_msg(image)
    result = captioner.caption(rgb, regions_from_detections(dets, rgb.shape[1], rgb.shape[0]), steps=steps)
    return [(r.caption, round(r.confidence, 5)) for r in result.regions]


def got(msg):
    return [(r.caption, round(r.confidence, 5)) for r in msg.regions]


def test_topics_per_camera():
    p = NodeParams.from_values({"cameras": CAMS})
    assert [(t.name, t.camera) for t in input_topics(p)] == [
        ("front/image", 0), ("front/detections", 0), ("rear/image", 1), ("rear/detections", 1)]
    assert [t.name for t in output_topics(p)] == [
        "front/captions", "front/annotated_image", "front/annotations",
        "rear/captions", "rear/annotated_image", "rear/annotations", "model_info", "/diagnostics"]
    compressed = NodeParams.from_values({"cameras": ["left/wide"], "input.compressed": True,
                                         "regions.source": "instance_mask"})
    assert [t.name for t in input_topics(compressed)] == ["left/wide/image/compressed", "left/wide/instance_mask"]
    single = NodeParams.from_values({})
    assert [t.name for t in input_topics(single)] == ["image", "detections"]
    assert NodeParams.from_values({"cameras": ("a", "b")}).to_values()["cameras"] == ["a", "b"]


@pytest.mark.parametrize("value,match", [
    ("front", "must be a list of strings"),
    (["front", 3], "must be a list of strings"),
    (["front", "front"], "names 'front' twice"),
    (["/front"], "not a relative ROS name"),
    (["front cam"], "not a relative ROS name"),
    (["2nd"], "not a relative ROS name"),
    ([""], "not a relative ROS name"),
    ([f"c{k}" for k in range(17)], "at most 16"),
])
def test_bad_camera_lists_name_the_parameter(value, match):
    with pytest.raises(ConfigError, match=match):
        NodeParams.from_values({"cameras": value})


def test_each_camera_publishes_its_own_frames_with_its_header(make_node, tiny_captioner):
    node, out = make_node(**{"cameras": CAMS, "cache.enabled": False})
    sent = {cam: cam_frame(cam, 1_000 * MS + k * MS, seed=k) for k, cam in enumerate(CAMS)}
    for k, cam in enumerate(CAMS):
        node.on_image(sent[cam][0], camera=k)
        node.on_detections(sent[cam][1], camera=k)
        assert node.wait_idle(timeout=60)
    assert out.on("captions") == []  # nothing on the single-camera topic
    for cam in CAMS:
        (msg,) = out.on(f"{cam}/captions")
        assert msg.header.frame_id == f"{cam}_optical" and stamp_ns(msg.header) == stamp_ns(sent[cam][0].header)
        assert [r.id for r in msg.regions] == [i for i, _ in BOXES[cam]]
        assert got(msg) == alone(tiny_captioner, *sent[cam])
        assert len(out.on(f"{cam}/annotations")) == 1


def test_frames_waiting_together_share_one_pass_and_keep_their_captions(make_node, tiny_captioner):
    """Hold the model while camera 0's first frame is being captioned; the frames both cameras send meanwhile wait
    together and go through caption_frames in one call; each caption is the one its frame gets alone."""
    node, out = make_node(**{"cameras": CAMS, "cache.enabled": False})
    first = cam_frame("front", 1_000 * MS, seed=1)
    later = {"front": cam_frame("front", 1_100 * MS, seed=2), "rear": cam_frame("rear", 1_100 * MS, seed=3)}
    with node._model_lock:  # the worker blocks inside its first frame
        node.on_image(first[0], camera=0)
        node.on_detections(first[1], camera=0)
        deadline = time.monotonic() + 30
        while not node._busy and time.monotonic() < deadline:  # taken by the worker, so not replaced below
            time.sleep(0.01)
        for k, cam in enumerate(CAMS):
            node.on_image(later[cam][0], camera=k)
            node.on_detections(later[cam][1], camera=k)
    assert node.wait_idle(timeout=60)
    counts, _ = node.health.snapshot()
    assert counts["frames_batched"] == 2 and counts["dropped"] == 0
    front = out.on("front/captions")
    assert [stamp_ns(m.header) for m in front] == [1_000 * MS, 1_100 * MS]
    assert got(front[1]) == alone(tiny_captioner, *later["front"])
    (rear,) = out.on("rear/captions")
    assert got(rear) == alone(tiny_captioner, *later["rear"])


def test_a_bad_frame_of_one_camera_does_not_cost_the_other_its_frame(make_node, tiny_captioner, caplog):
    node, out = make_node(**{"cameras": CAMS, "cache.enabled": False})
    bad = cam_frame("front", 2_000 * MS, seed=4)
    bad[0].encoding = "yuv422"
    good = cam_frame("rear", 2_000 * MS, seed=5)
    with caplog.at_level(logging.WARNING, logger="pdlm_ros.node"):
        results = node.process_frames([(node.cameras[0], _pair(*bad), None), (node.cameras[1], _pair(*good), None)])
    assert results[0] is None and got(results[1]) == alone(tiny_captioner, *good)
    assert "camera 'front'" in caplog.text and "rejected" in caplog.text
    assert out.on("front/captions") == [] and len(out.on("rear/captions")) == 1


def test_a_failed_batch_is_captioned_one_frame_at_a_time(make_node, tiny_captioner, monkeypatch):
    """caption_frames raising (as a CUDA out-of-memory on a large batch would) costs no frame: each is retried
    alone through caption."""
    node, out = make_node(**{"cameras": CAMS, "cache.enabled": False})

    def oom(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (injected)")

    monkeypatch.setattr(tiny_captioner, "caption_frames", oom)
    sent = [cam_frame(cam, 3_000 * MS, seed=6 + k) for k, cam in enumerate(CAMS)]
    results = node.process_frames([(node.cameras[k], _pair(*sent[k]), None) for k in range(2)])
    assert [got(r) for r in results] == [alone(tiny_captioner, *s) for s in sent]
    counts, errors = node.health.snapshot()
    assert counts.get("frames_batched", 0) == 0 and errors["inference"] == 0


def test_a_stop_during_a_batch_abandons_its_frames(make_node):
    node, out = make_node(**{"cameras": CAMS, "cache.enabled": False})
    node._stop.set()
    sent = [cam_frame(cam, 4_000 * MS, seed=k) for k, cam in enumerate(CAMS)]
    assert node.process_frames([(node.cameras[k], _pair(*sent[k]), None) for k in range(2)]) == [None, None]
    assert node.health.snapshot()[0]["frames_abandoned"] == 2
    assert out.on("front/captions") == out.on("rear/captions") == []


def test_caches_are_per_camera(make_node):
    """Track ids belong to a camera: the same id on two cameras is two objects."""
    node, out = make_node(**{"cameras": CAMS, "cache.max_age": 10.0})
    for k, cam in enumerate(CAMS):
        image, dets = frame(1_000 * MS, [("same-id", (5.0, 5.0, 35.0, 30.0))], seed=k)
        node.on_image(image, camera=k)
        node.on_detections(dets, camera=k)
        assert node.wait_idle(timeout=60)
    assert [m.regions[0].cached for m in out.on("front/captions") + out.on("rear/captions")] == [False, False]
    assert [len(c.cache) for c in node.cameras] == [1, 1]


def test_diagnostics_name_the_camera_that_does_not_sync(make_node, caplog):
    node, out = make_node(**{"cameras": CAMS})
    image, dets = cam_frame("rear", 1_000 * MS, seed=0)
    dets.header = header_msg(6_000 * MS, "rear_optical")  # the rear detector does not copy the image header
    node.on_image(image, camera=1)
    node.on_detections(dets, camera=1)
    good = cam_frame("front", 1_000 * MS, seed=1)
    node.on_image(good[0], camera=0)
    node.on_detections(good[1], camera=0)
    assert node.wait_idle(timeout=60)
    with caplog.at_level(logging.WARNING, logger="pdlm_ros.node"):
        values = {kv.key: kv.value for kv in node.publish_diagnostics().status[0].values}
    assert "camera 'rear' no image matched" in caplog.text and "camera 'front' no image" not in caplog.text
    assert values["cameras"] == "front,rear" and values["errors.sync_no_match"] == "1"
    assert values["front.sync.matched"] == "1" and values["rear.sync.matched"] == "0"
    assert values["rear.images_in"] == "1" and values["sync.matched"] == "1"


def test_an_out_of_range_camera_index_is_an_error_not_a_silent_drop(make_node):
    node, _ = make_node(**{"cameras": CAMS})
    image, dets = cam_frame("front", 1_000 * MS, seed=0)
    with pytest.raises(ConfigError, match="camera index 2 out of range"):
        node.on_image(image, camera=2)


def _pair(image, dets):
    from pdlm_ros.ros.sync import Pair

    return Pair(stamp_ns(image.header), image, dets, stamp_ns(dets.header))


def test_graph_backends_without_caption_frames_still_serve_several_cameras(make_node, tiny_captioner):
    """A captioner with only `caption` (the ONNX Runtime and TensorRT wrappers) is called once per frame."""

    @dataclasses.dataclass
    class CaptionOnly:
        inner: object
        name: str = "caption-only"

        def caption(self, *args, **kwargs):
            return self.inner.caption(*args, **kwargs)

    node, out = make_node(**{"cameras": CAMS, "cache.enabled": False})
    node.captioner = CaptionOnly(tiny_captioner)
    sent = [cam_frame(cam, 5_000 * MS, seed=k) for k, cam in enumerate(CAMS)]
    results = node.process_frames([(node.cameras[k], _pair(*sent[k]), None) for k in range(2)])
    assert [got(r) for r in results] == [alone(tiny_captioner, *s) for s in sent]
    assert node.health.snapshot()[0].get("frames_batched", 0) == 0
    assert M.CAPTION_ARRAY == results[0].__msgtype__
