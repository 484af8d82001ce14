"""replay-many on a local Ray with 2 CPUs: small sample bags (MCAP, sqlite3, ROS 1), a corrupt bag, a worker that
really dies in the middle of a call, and a rerun. One Ray for the module: starting it costs seconds."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from pdlm_ros.cli import main  # noqa: E402
from pdlm_ros.data.bags import SampleBagSpec, write_sample_bag  # noqa: E402
from pdlm_ros.errors import BagError  # noqa: E402
from pdlm_ros.eval.replay import ReplayOptions, replay  # noqa: E402
from pdlm_ros.eval.replay_many import (DONE_FILE, FAULT_ENV, ManyOptions, ModelSpec, _done,  # noqa: E402
                                       _fingerprint, bag_names, find_bags, plan_requests, replay_many, request_key)
from test.replay.conftest import read_bag, stamp  # noqa: E402

OPTIONS = ReplayOptions(image_topic="/camera/image_raw", detections_topic="/detections")
MODEL = ModelSpec(preset="tiny", threads=1)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def bags(tmp_path_factory):
    """Three small bags of three storages in one directory, and a corrupt one beside them."""
    root = tmp_path_factory.mktemp("bags")
    write_sample_bag(root / "fleet" / "cam_a", SampleBagSpec(frames=4, seed=1))
    write_sample_bag(root / "fleet" / "cam_b", SampleBagSpec(frames=3, seed=2, storage="sqlite3"))
    write_sample_bag(root / "fleet" / "cam_c.bag", SampleBagSpec(frames=3, seed=3, ros1=True))
    corrupt = root / "broken"
    corrupt.mkdir()
    (corrupt / "broken_0.mcap").write_bytes(b"\x89MCAP0\r\n" + bytes(range(256)) * 8)  # magic, then garbage
    return root


def caption_arrays(out_bag: Path) -> list[tuple[int, list[str]]]:
    msgs = read_bag(out_bag)["/pdlm/captions"]
    return [(stamp(m.header), [r.caption for r in m.regions]) for _, m in msgs]


@pytest.fixture(scope="module")
def first_run(local_ray, bags, tmp_path_factory):
    """The command over every bag plus the corrupt one, 2 workers, 2 frames per call, and one worker killed in its
    first call. -> (exit status, stderr, OUT, marker)."""
    out = tmp_path_factory.mktemp("many") / "out"
    marker = out.parent / "worker-exited"
    mp = pytest.MonkeyPatch()
    mp.setenv(FAULT_ENV, str(marker))
    buf = io.StringIO()
    try:
        with contextlib.redirect_stderr(buf):
            code = main(["replay-many", str(bags / "fleet"), str(bags / "broken"), "--out", str(out), "--preset",
                         "tiny", "--workers", "2", "--batch-frames", "2", "--threads", "1"])
    finally:
        mp.undo()
    return code, buf.getvalue(), out, marker


def test_each_bag_gets_its_output_and_the_corrupt_one_fails_alone(first_run, bags):
    code, stderr, out, _ = first_run
    assert code == 1 and "1 of 4 bags failed" in stderr  # the exit status says a bag failed
    doc = json.loads((out / "report.json").read_text())
    status = {Path(b["bag"]).name: b["status"] for b in doc["bags"]}
    assert status == {"cam_a": "done", "cam_b": "done", "cam_c.bag": "done", "broken": "failed"}
    assert doc["totals"]["failed"] == 1 and doc["failures"][0]["bag"] == str(bags / "broken")
    assert doc["failures"][0]["error"].startswith(f"cannot read bag {bags / 'broken'}")
    assert str(bags / "broken") in (out / "report.html").read_text()
    for name in ("cam_a", "cam_b", "cam_c"):
        assert (out / name / "bag" / "metadata.yaml").is_file()
        assert (out / name / "report.html").is_file() and (out / name / DONE_FILE).is_file()
    assert doc["totals"]["frames"] == 4 + 3 + 3
    assert doc["totals"]["scores"]["regions"] == sum(b["scores"]["regions"] for b in doc["bags"] if b.get("scores"))


def test_a_killed_worker_is_restarted_and_no_frame_is_lost_or_doubled(first_run, bags, tiny_captioner):
    """The worker's process ended mid-call (the marker proves it ran); every output bag still holds exactly one
    caption array per frame, the same captions a plain sequential `replay` writes."""
    _, _, out, marker = first_run
    assert marker.is_file()
    for name, bag in (("cam_a", bags / "fleet" / "cam_a"), ("cam_c", bags / "fleet" / "cam_c.bag")):
        got = caption_arrays(out / name / "bag")
        images = [stamp(m.header) for _, m in read_bag(out / name / "bag")["/camera/image_raw"]]
        assert [s for s, _ in got] == images  # one per frame, in order, none twice
        ref = replay(bag, out.parent / f"ref_{name}", tiny_captioner, OPTIONS)
        assert got == caption_arrays(ref.out_bag)


def test_a_rerun_skips_the_bags_already_done(first_run, bags):
    """Nothing is left to do, so no Ray pipeline runs at all; the merged report still covers every bag."""
    _, _, out, _ = first_run
    done = {p: p.stat().st_mtime_ns for p in out.glob(f"*/{DONE_FILE}")}
    result = replay_many([bags / "fleet"], out, OPTIONS, MODEL, ManyOptions(workers=2))
    assert [o.status for o in result.bags] == ["skipped"] * 3 and result.nodes == 0
    doc = json.loads((out / "report.json").read_text())
    assert doc["totals"]["frames"] == 10 and doc["totals"]["frames_this_run"] == 0
    assert doc["totals"]["scores"]["regions"] > 0  # the scores of earlier runs, kept in done.json
    assert {p: p.stat().st_mtime_ns for p in out.glob(f"*/{DONE_FILE}")} == done  # nothing rewritten
    bag = bags / "fleet" / "cam_b"
    assert _done(out / "cam_b", _fingerprint(bag, OPTIONS, MODEL)) is not None
    for other in (_fingerprint(bag, OPTIONS, dataclasses.replace(MODEL, preset="small")),
                  _fingerprint(bag, dataclasses.replace(OPTIONS, steps=2), MODEL)):
        assert _done(out / "cam_b", other) is None  # another model or other options: it is replayed again


def test_bags_are_found_by_directory_glob_and_name(bags):
    fleet = bags / "fleet"
    assert [p.name for p in find_bags([fleet])] == ["cam_a", "cam_b", "cam_c.bag"]
    assert [p.name for p in find_bags([str(fleet / "cam_[ab]")])] == ["cam_a", "cam_b"]
    assert [p.name for p in find_bags([fleet / "cam_b", fleet])] == ["cam_b", "cam_a", "cam_c.bag"]  # each once
    with pytest.raises(BagError, match="no such bag"):
        find_bags([bags / "nope"])
    with pytest.raises(BagError, match="no bag matches"):
        find_bags([str(bags / "nothing*")])
    (bags / "empty").mkdir(exist_ok=True)
    with pytest.raises(BagError, match="holds none"):
        find_bags([bags / "empty"])
    twins = bag_names([Path("/a/run"), Path("/b/run"), Path("/c/other.bag")])
    assert twins[Path("/c/other.bag")] == "other"
    assert twins[Path("/a/run")] != twins[Path("/b/run")] and twins[Path("/a/run")].startswith("run-")


class Recording:
    """The real captioner; it also keeps the key of every caption call replay makes."""

    def __init__(self, captioner):
        self.captioner, self.name, self.keys = captioner, captioner.name, []

    def caption(self, image, regions, **kw):
        self.keys.append(request_key(image, regions))
        return self.captioner.caption(image, regions, **kw)


@pytest.mark.parametrize("cache", [True, False], ids=["cache", "no-cache"])
def test_the_read_tasks_foresee_every_caption_call_of_replay(bags, tiny_captioner, tmp_path, cache):
    """With the cache on, tracked regions are reused, so replay asks the model less: the read task must ask the
    workers for exactly the calls replay makes, in order (no Ray needed)."""
    options = ReplayOptions(image_topic="/camera/image_raw", detections_topic="/detections", cache=cache,
                            cache_max_age_s=0.1)
    bag = bags / "fleet" / "cam_a"
    rec = Recording(tiny_captioner)
    replay(bag, tmp_path / "out", rec, options)
    planned = [request_key(image, regions) for image, regions in plan_requests(bag, options)]
    assert planned == rec.keys
    assert (len(planned) < 4) == cache  # the cache covered whole frames, which then need no call
