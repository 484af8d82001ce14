"""Inputs that are not quite bags: each is read anyway or refused with one line, and `repair-bag` makes what a crash
left readable again (checked with rosbags and with mcap's indexed reader)."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace

import pytest
from mcap.reader import make_reader

from pdlm_ros.cli import main
from pdlm_ros.data.bag_writer import repair_bag
from pdlm_ros.data.bags import DETECTIONS_TOPIC, IMAGE_TOPIC, SampleBagSpec, open_bag, write_sample_bag
from pdlm_ros.errors import BagError
from pdlm_ros.eval.replay import ReplayOptions, replay
from test.replay.conftest import read_bag
from test.replay.test_crash_safe import assert_opens

OPTIONS = ReplayOptions(image_topic=IMAGE_TOPIC, detections_topic=DETECTIONS_TOPIC)


@pytest.fixture
def sample(tmp_path):
    return write_sample_bag(tmp_path / "sample", SampleBagSpec(frames=3, with_mask=False))


def _cli_error(capsys, bag, out) -> str:
    """`pdlm-ros replay` on `bag`: exit code 1, one line on stderr (returned); no model is needed to say it."""
    assert main(["replay", str(bag), "--out", str(out), "--checkpoint", "/nonexistent/model"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    return err


def test_directory_without_metadata_is_read_from_its_mcap_files(tmp_path, sample, tiny_captioner):
    bag = tmp_path / "killed_recording"
    bag.mkdir()
    shutil.copy(next(sample.bag.glob("*.mcap")), bag / "rec_0.mcap")  # as a killed `ros2 bag record` leaves it
    result = replay(bag, tmp_path / "out", tiny_captioner, OPTIONS)
    assert len(result.frames) == 3
    assert f"{bag} has no metadata.yaml; its MCAP files were read directly (`pdlm-ros repair-bag {bag}`" in \
        result.damage[0]


def test_empty_directory_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    err = _cli_error(capsys, tmp_path / "empty", tmp_path / "out")
    assert err.startswith(f"error: {tmp_path / 'empty'} is an empty directory, not a bag")


def test_directory_of_other_files_is_one_line(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("x")
    err = _cli_error(capsys, tmp_path / "d", tmp_path / "out")
    assert "is not a bag: no metadata.yaml and no .mcap or .db3 file in it (it holds notes.txt)" in err


def test_sqlite3_directory_without_metadata_says_how_to_rebuild_it(tmp_path, capsys):
    sample = write_sample_bag(tmp_path / "db", SampleBagSpec(frames=1, storage="sqlite3"))
    (sample.bag / "metadata.yaml").unlink()
    err = _cli_error(capsys, sample.bag, tmp_path / "out")
    assert f"has no metadata.yaml (a recording stopped before writing it?); rebuild it with `ros2 bag reindex " \
           f"{sample.bag} sqlite3`" in err


@pytest.mark.parametrize("in_dir", [False, True])
def test_an_8_byte_mcap_is_one_line(tmp_path, sample, capsys, in_dir):
    data = next(sample.bag.glob("*.mcap")).read_bytes()[:8]  # the magic and nothing else
    target = tmp_path / "d" / "x.mcap" if in_dir else tmp_path / "x.mcap"
    target.parent.mkdir(exist_ok=True)
    target.write_bytes(data)
    err = _cli_error(capsys, target.parent if in_dir else target, tmp_path / "out")
    assert f"error: {target} holds only 8 bytes: an MCAP file cut off before its header record" in err


def test_a_file_that_is_not_mcap_is_one_line(tmp_path, capsys):
    (tmp_path / "x.mcap").write_bytes(b"PNG\x00not an mcap file at all")
    assert "is not an MCAP file (it does not start with the MCAP magic bytes)" in _cli_error(
        capsys, tmp_path / "x.mcap", tmp_path / "out")
    (tmp_path / "notes.txt").write_text("x")
    assert "is not a bag: replay reads a rosbag2 directory, an .mcap file or a ROS 1 .bag" in _cli_error(
        capsys, tmp_path / "notes.txt", tmp_path / "out")


def test_a_bare_mcap_file_replays(tmp_path, sample, tiny_captioner):
    result = replay(next(sample.bag.glob("*.mcap")), tmp_path / "out", tiny_captioner, OPTIONS)
    assert len(result.frames) == 3 and not result.damage


# ------------------------------------------------------------------------------------------------- repair-bag
def _killed_recording(tmp_path):
    """A bag as `ros2 bag record` leaves it when killed: no metadata.yaml, the MCAP cut off without its summary."""
    sample = write_sample_bag(tmp_path / "rec", SampleBagSpec(frames=6, width=480, height=360, with_mask=False))
    (sample.bag / "metadata.yaml").unlink()
    data = next(sample.bag.glob("*.mcap"))
    with data.open("r+b") as f:
        f.truncate(int(os.path.getsize(data) * 0.75))
    return sample.bag


def test_repair_bag_rewrites_a_killed_recording(tmp_path, capsys):
    bag = _killed_recording(tmp_path)
    name = next(bag.glob("*.mcap")).name
    with pytest.raises(Exception):  # noqa: B017, PT011 - the original is beyond mcap's indexed reader
        with (bag / name).open("rb") as f:
            make_reader(f).get_summary()
    assert main(["repair-bag", str(bag), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["action"] == "rewritten" and doc["originals"] == str(bag / "damaged")
    assert (bag / "damaged" / name).is_file()  # the original is kept
    counts = assert_opens(bag)
    assert 1 <= counts[IMAGE_TOPIC] < 6 and doc["messages"] == sum(counts.values())
    assert any("reading stopped" in d for d in doc["damage"])
    with open_bag(bag) as b:  # read through the index now: nothing left to salvage
        assert not b.damage
    # a second repair has nothing to do
    assert main(["repair-bag", str(bag)]) == 0
    assert "opens as it is; nothing to repair" in capsys.readouterr().out


def test_repair_bag_on_a_killed_replay_removes_its_unfinished_segment(tmp_path, sample, tiny_captioner):
    from test.replay.test_crash_safe import _DiesAt

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        replay(sample.bag, out, _DiesAt(tiny_captioner, 1), replace(OPTIONS, cache=False), checkpoint_s=0)
    (out / "bag" / ".open" / "bag_9").mkdir(parents=True)  # what kill -9 leaves: a segment never finished
    (out / "bag" / ".open" / "bag_9" / "bag_9.mcap").write_bytes(b"\x89MCAP0\r\n\x01")
    result = repair_bag(out)
    assert result.action == "cleaned" and not (out / "bag" / ".open").exists()
    assert len(read_bag(out / "bag")["/pdlm/captions"]) == 1


def test_repair_bag_refuses_what_it_cannot_repair(tmp_path):
    with pytest.raises(BagError, match="repair-bag works on a rosbag2 directory; .* is not there"):
        repair_bag(tmp_path / "missing")
    db = write_sample_bag(tmp_path / "db", SampleBagSpec(frames=1, storage="sqlite3"))
    with pytest.raises(BagError, match=r"is a sqlite3 bag; rebuild its metadata with `ros2 bag reindex"):
        repair_bag(db.bag)
