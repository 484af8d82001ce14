"""Sample bags: content checked with rosbags' own reader, determinism, motion, annotations and refusals."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pdlm_ros.data.bags import (
    DETECTIONS_TOPIC,
    IMAGE_TOPIC,
    MASK_TOPIC,
    SampleBagSpec,
    animate,
    load_annotations,
    write_sample_bag,
)
from pdlm_ros.data.scenes import ObjectSpec
from pdlm_ros.errors import BagError, DatasetError
from test.replay.conftest import read_bag, stamp


@pytest.mark.parametrize("storage,ros1", [("mcap", False), ("sqlite3", False), ("mcap", True)])
def test_sample_bag_topics_stamps_and_ids(tmp_path, storage, ros1):
    bag = write_sample_bag(tmp_path / "s", SampleBagSpec(frames=4, storage=storage, ros1=ros1))
    assert bag.bag.name == ("s.bag" if ros1 else "s")
    msgs = read_bag(bag.bag)
    assert {k: len(v) for k, v in msgs.items()} == {IMAGE_TOPIC: 4, DETECTIONS_TOPIC: 4, MASK_TOPIC: 4}
    ann = load_annotations(bag.annotations)
    for (t_img, img), (t_det, det), (_, mask), truth in zip(msgs[IMAGE_TOPIC], msgs[DETECTIONS_TOPIC],
                                                             msgs[MASK_TOPIC], ann.frames):
        assert img.encoding == "rgb8" and (img.width, img.height) == (160, 120)
        assert mask.encoding == "mono16"
        assert stamp(det.header) == stamp(img.header) == stamp(mask.header) == truth.stamp_ns
        assert t_det > t_img  # the detector's output is logged after its image
        detected = [o for o in truth.objects if o.detected]
        assert [d.id for d in det.detections] == [o.track_id for o in detected]
        assert [d.results[0].hypothesis.class_id for d in det.detections] == [ann.tracks[o.track_id].shape
                                                                               for o in detected]
        labels = np.frombuffer(bytes(mask.data), dtype="<u2").reshape(mask.height, mask.width)
        for d, o in zip(det.detections, detected):
            x1, y1, x2, y2 = o.box
            assert d.bbox.center.position.x == pytest.approx((x1 + x2) / 2)
            assert d.bbox.size_x == pytest.approx(x2 - x1)
            ys, xs = np.nonzero(labels == int(o.track_id))  # the mask label is the track id
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == o.box


def test_objects_move_and_keep_their_tracks(tmp_path):
    bag = write_sample_bag(tmp_path / "s", SampleBagSpec(frames=6, objects=3, with_mask=False))
    ann = load_annotations(bag.annotations)
    assert len(ann.tracks) == 3 and all(len(f.objects) == 3 for f in ann.frames)
    assert [o.track_id for o in ann.frames[0].objects] == [o.track_id for o in ann.frames[-1].objects]
    moved = [ann.frames[0].objects[k].box != ann.frames[-1].objects[k].box for k in range(3)]
    assert all(moved)
    stamps = [f.stamp_ns for f in ann.frames]
    assert np.allclose(np.diff(stamps), 1e9 / 15, atol=1)
    assert MASK_TOPIC not in read_bag(bag.bag)


def test_same_seed_same_bag_other_seed_other_bag(tmp_path):
    a = load_annotations(write_sample_bag(tmp_path / "a", SampleBagSpec(frames=3, seed=5)).annotations)
    b = load_annotations(write_sample_bag(tmp_path / "b", SampleBagSpec(frames=3, seed=5)).annotations)
    c = load_annotations(write_sample_bag(tmp_path / "c", SampleBagSpec(frames=3, seed=6)).annotations)
    assert a.to_dict() == b.to_dict()
    assert a.to_dict() != c.to_dict()


def test_animation_bounces_inside_the_image():
    spec = ObjectSpec(shape="circle", color="red", size="large", pattern="solid", center=(20.0, 20.0), extent=30.0,
                      rotation=0.0, track_id="1")
    rng = np.random.default_rng(0)
    centers = [s[0].center for s in animate([spec], 64, 48, frames=200, fps=5.0, rng=rng)]
    r = spec.extent / 2 + 1
    xs, ys = np.array(centers).T
    assert xs.min() >= r - 1e-9 and xs.max() <= 64 - r + 1e-9
    assert ys.min() >= r - 1e-9 and ys.max() <= 48 - r + 1e-9
    assert np.sign(np.diff(xs)).tolist().count(-1) > 0 and np.sign(np.diff(xs)).tolist().count(1) > 0  # bounced


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    write_sample_bag(tmp_path / "s", SampleBagSpec(frames=1))
    with pytest.raises(BagError, match="exists already.*--overwrite"):
        write_sample_bag(tmp_path / "s", SampleBagSpec(frames=1))
    bag = write_sample_bag(tmp_path / "s", SampleBagSpec(frames=2), overwrite=True)
    assert len(read_bag(bag.bag)[IMAGE_TOPIC]) == 2


def test_bad_specs_and_names(tmp_path):
    with pytest.raises(DatasetError, match="at least 1 frame"):
        write_sample_bag(tmp_path / "s", SampleBagSpec(frames=0))
    with pytest.raises(DatasetError, match="unknown storage 'zip'"):
        write_sample_bag(tmp_path / "s", SampleBagSpec(storage="zip"))
    with pytest.raises(DatasetError, match="fps"):
        write_sample_bag(tmp_path / "s", SampleBagSpec(fps=math.nan))
    with pytest.raises(BagError, match="ROS 1 bag file; pass --ros1"):
        write_sample_bag(tmp_path / "s.bag", SampleBagSpec(frames=1))
    assert not (tmp_path / "s").exists()


def test_annotation_errors_name_the_problem(tmp_path):
    path = tmp_path / "a.json"
    with pytest.raises(DatasetError, match="not found"):
        load_annotations(path)
    path.write_text("{not json")
    with pytest.raises(DatasetError, match="cannot read annotations"):
        load_annotations(path)
    path.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(DatasetError, match="not a sample-bag annotations file"):
        load_annotations(path)
    good = write_sample_bag(tmp_path / "s", SampleBagSpec(frames=1)).annotations
    doc = json.loads(good.read_text())
    del doc["tracks"]["1"]
    path.write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match="not in \"tracks\": 1"):
        load_annotations(path)


@pytest.mark.parametrize("where", ["proc", "under_a_file", "full_disk"])
def test_unwritable_output_is_one_line_and_leaves_nothing(tmp_path, capsys, where):
    from pdlm_ros.cli import main

    (tmp_path / "file").write_text("x")
    if where == "full_disk":  # a real 200 kB tmpfs, where mounting is permitted
        import subprocess

        disk = tmp_path / "disk"
        disk.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(disk)], capture_output=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    out = {"proc": "/proc/pdlm-sample", "under_a_file": str(tmp_path / "file" / "s"),
           "full_disk": str(tmp_path / "disk" / "s")}[where]
    try:
        assert main(["make-sample-bag", out, "--frames", "20"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"error: cannot write {out}")
        assert {"proc": "No such file or directory", "under_a_file": f"{tmp_path / 'file'} is a file",
                "full_disk": "No space left on device; nothing was left behind"}[where] in err
        if where == "full_disk":
            assert not any((tmp_path / "disk").iterdir())
    finally:
        if where == "full_disk":
            subprocess.run(["umount", "-l", str(tmp_path / "disk")], check=False)
