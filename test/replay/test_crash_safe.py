"""Crash-safe replay output: a kill at any moment leaves a bag that rosbags and mcap's indexed reader open, a rerun
says what to do, `--resume` finishes it with the captions of one uninterrupted run, and a full disk is one line.

Every bag here is read back by the readers users have: rosbags' AnyReader (as `ros2 bag` reads the metadata) and
mcap's own indexed reader (`make_reader(...).get_summary()`, which needs each file's summary and footer).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mcap.reader import make_reader
from rosbags.highlevel import AnyReader

from pdlm_ros.captioner import Captioner
from pdlm_ros.cli import main
from pdlm_ros.data.bag_writer import OPEN_DIR, SafeBagWriter, read_metadata
from pdlm_ros.data.bags import DETECTIONS_TOPIC, IMAGE_TOPIC, SampleBagSpec, write_sample_bag
from pdlm_ros.errors import BagError
from pdlm_ros.eval.replay import JOURNAL, STATE_DIR, ReplayOptions, replay, replay_state
from pdlm_ros.ros import messages as M
from test.replay.conftest import read_bag, stamp

OPTIONS = ReplayOptions(image_topic=IMAGE_TOPIC, detections_topic=DETECTIONS_TOPIC)
REPO = Path(__file__).resolve().parents[2]


def assert_opens(bag: Path) -> dict[str, int]:
    """The bag opens with rosbags and each of its files with mcap's indexed reader; messages per topic."""
    counts: dict[str, int] = {}
    with AnyReader([bag]) as reader:
        for conn, _, _ in reader.messages():
            counts[conn.topic] = counts.get(conn.topic, 0) + 1
    info = read_metadata(bag)
    assert info is not None
    indexed = 0
    for name in info["relative_file_paths"]:
        with (bag / name).open("rb") as f:
            r = make_reader(f)
            summary = r.get_summary()
            assert summary is not None and summary.statistics is not None, name
            indexed += sum(1 for _ in r.iter_messages())
    assert indexed == sum(counts.values()) == info["message_count"]
    return counts


def _captions(bag: Path) -> list[tuple[int, list[str]]]:
    return [(stamp(m.header), [r.caption for r in m.regions]) for _, m in read_bag(bag)["/pdlm/captions"]]


# ------------------------------------------------------------------------------------------------------- kill -9
def test_kill_9_mid_replay_leaves_a_bag_that_opens_then_resume_finishes_it(tmp_path, capsys, caplog):
    """A real `pdlm-ros replay` subprocess (the bundled model) killed with SIGKILL after its third commit.

    The slowest replay test (a fresh process imports torch and loads the model before it can be killed); it is the
    one end-to-end proof of the kill -9 guarantee, so it stays in the default run."""
    sample = write_sample_bag(tmp_path / "in", SampleBagSpec(frames=12, with_mask=False))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pdlm_ros.cli", "replay", str(sample.bag), "--out", str(out), "--threads", "1",
           "--checkpoint-every", "0"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    state = None
    while proc.poll() is None and time.monotonic() < deadline:
        state = replay_state(out / "bag") if (out / "bag").is_dir() else None
        if state is not None and state.frames >= 3:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]

    state = replay_state(out / "bag")
    assert state is not None and state.status == "running" and 3 <= state.frames < 12  # killed mid-run
    counts = assert_opens(out / "bag")
    assert counts["/pdlm/captions"] == counts["/pdlm/annotations"] == state.frames
    assert counts[IMAGE_TOPIC] >= state.frames
    assert not (out / "report.json").exists()  # the report comes with the finished run

    # A rerun into the same output says exactly what to do (before loading a model: the checkpoint is not there).
    assert main([*cmd[3:], "--checkpoint", str(tmp_path / "no_model")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{out / 'bag'} holds an interrupted replay ({state.frames} frames of" in err
    assert "Rerun with --resume to continue it, or with --overwrite to start again" in err

    assert main([*cmd[3:], "--resume", "--json", str(tmp_path / "r.json")]) == 0  # in process: the same command
    assert "resuming" in caplog.text and replay_state(out / "bag").status == "complete"
    counts = assert_opens(out / "bag")
    assert counts["/pdlm/captions"] == counts[IMAGE_TOPIC] == counts[DETECTIONS_TOPIC] == 12
    assert not (out / STATE_DIR).exists()

    whole = replay(sample.bag, tmp_path / "whole", Captioner.load(), OPTIONS)  # one uninterrupted run
    assert _captions(out / "bag") == _captions(whole.out_bag)
    report = json.loads((tmp_path / "r.json").read_text())
    assert [f["stamp_ns"] for f in report["frames"]] == [f.stamp_ns for f in whole.frames]
    assert report["summary"]["nfe_per_frame"] == pytest.approx(sum(f.nfe for f in whole.frames) / 12)


# ------------------------------------------------------------------------------------- death inside a commit
def _string(text: str) -> bytes:
    store = M.typestore()
    return store.serialize_cdr(store.types["std_msgs/msg/String"](data=text), "std_msgs/msg/String")


def _write_then_die(bag: Path, die_at: int) -> int:
    """In a forked child: commit 5 messages, write 5 more, and die (os._exit, no cleanup: as kill -9 does) at the
    `die_at`-th file-system step of the second commit, counting before and after every rename and fsync."""
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        code = 3
        try:
            w = SafeBagWriter(bag)
            h = w.add_connection("/chatter", "std_msgs/msg/String", M.typestore())
            for i in range(5):
                w.write(h, i, _string(f"a{i}"))
            w.commit({"k": "first"})
            steps = [0]

            def hook(real):  # noqa: ANN001, ANN202
                def step(*args):  # noqa: ANN002, ANN202
                    steps[0] += 1
                    if steps[0] == die_at:
                        os._exit(0)
                    value = real(*args)
                    steps[0] += 1
                    if steps[0] == die_at:
                        os._exit(0)
                    return value
                return step

            os.replace, os.fsync = hook(os.replace), hook(os.fsync)
            for i in range(5):
                w.write(h, 10 + i, _string(f"b{i}"))
            w.commit({"k": "second"})
        except BaseException:  # noqa: BLE001
            code = 4
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_writer_dying_at_any_step_of_a_commit_leaves_a_readable_bag(tmp_path):
    outcomes = set()
    for die_at in range(1, 40):
        bag = tmp_path / f"b{die_at}" / "bag"
        code = _write_then_die(bag, die_at)
        assert code in (0, 3), f"child failed at step {die_at}"
        counts = assert_opens(bag)
        custom = read_metadata(bag)["custom_data"]["k"]
        # the old state or the new one, never a mix
        assert (counts, custom) in (({"/chatter": 5}, "first"), ({"/chatter": 10}, "second")), die_at
        outcomes.add(custom)
        # and it resumes: the unfinished segment and any unlisted file are dropped, new segments append
        w = SafeBagWriter(bag, resume=True)
        h = w.add_connection("/chatter", "std_msgs/msg/String", M.typestore())
        w.write(h, 100, _string("c"))
        w.commit()
        assert assert_opens(bag) == {"/chatter": counts["/chatter"] + 1}
        assert not (bag / OPEN_DIR).exists()
        if code == 3:  # the child ran past the last step: every step was tried
            break
    else:
        pytest.fail("the commit has more steps than tried")
    assert outcomes == {"first", "second"} and die_at > 8  # 2 renames and 3 fsyncs, each died before and after


def _two_commits(bag: Path) -> SafeBagWriter:
    w = SafeBagWriter(bag)
    h = w.add_connection("/chatter", "std_msgs/msg/String", M.typestore())
    for i in range(5):
        w.write(h, i, _string(f"a{i}" * 50))
    w.commit({"k": "first"})
    for i in range(5):
        w.write(h, 10 + i, _string(f"b{i}" * 50))
    return w


def test_writer_full_disk_at_any_byte_of_a_commit_keeps_the_bag_as_it_was(tmp_path, monkeypatch):
    """ENOSPC anywhere in a commit (segment data, its summary, the metadata file): the commit fails as a whole, the
    bag and the writer stay as they were, and the writer goes on once there is room again."""
    used = [0]
    real = _FullDisk.write

    def counting(self, data):  # noqa: ANN001, ANN202
        used[0] += len(data)
        return real(self, data)

    with monkeypatch.context() as m:  # how many bytes the second commit writes
        w = _two_commits(tmp_path / "probe" / "bag")
        m.setattr(_FullDisk, "write", counting)
        _fill_disk_under(m, tmp_path / "probe", quota=10**9)
        w.commit({"k": "second"})
    for quota in range(0, used[0], max(1, used[0] // 40)):
        bag = tmp_path / f"q{quota}" / "bag"
        w = _two_commits(bag)
        with monkeypatch.context() as m:
            _fill_disk_under(m, bag.parent, quota)
            with pytest.raises(OSError, match="No space left on device"):
                w.commit({"k": "second"})
        assert assert_opens(bag) == {"/chatter": 5} and read_metadata(bag)["custom_data"] == {"k": "first"}
        assert not (bag / OPEN_DIR).exists() and sorted(p.name for p in bag.iterdir()) == [
            "bag_0.mcap", "metadata.yaml"], quota
        h = w.add_connection("/chatter", "std_msgs/msg/String", M.typestore())  # room again: it goes on
        w.write(h, 20, _string("c"))
        w.commit({"k": "third"})
        assert assert_opens(bag) == {"/chatter": 6} and read_metadata(bag)["custom_data"] == {"k": "third"}


# ----------------------------------------------------------------------------------------- resume, in process
class _DiesAt:
    """The model, until frame `n`: then the process is interrupted (Ctrl-C) in the middle of a frame."""

    def __init__(self, captioner, n: int) -> None:
        self.inner, self.n, self.calls = captioner, n, 0
        self.name = captioner.name

    def caption(self, image, regions, **kw):  # noqa: ANN001, ANN003, ANN201
        self.calls += 1
        if self.calls > self.n:
            raise KeyboardInterrupt
        return self.inner.caption(image, regions, **kw)


def test_interrupted_replay_resumes_to_the_output_of_one_run(tmp_path, tiny_captioner):
    sample = write_sample_bag(tmp_path / "in", SampleBagSpec(frames=10))
    whole = replay(sample.bag, tmp_path / "whole", tiny_captioner, OPTIONS)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        replay(sample.bag, out, _DiesAt(tiny_captioner, 4), OPTIONS, checkpoint_s=0)
    state = replay_state(out / "bag")
    assert state.status == "interrupted" and 1 <= state.frames < 10
    assert assert_opens(out / "bag")["/pdlm/captions"] == state.frames
    assert not (out / "bag" / OPEN_DIR).exists()

    with pytest.raises(BagError, match=r"holds an interrupted replay .* Rerun with --resume"):
        replay(sample.bag, out, tiny_captioner, OPTIONS)
    other = ReplayOptions(image_topic=IMAGE_TOPIC, detections_topic=DETECTIONS_TOPIC, cache=False)
    with pytest.raises(BagError, match=r"cannot resume .* other options: cache=True \(now False\)"):
        replay(sample.bag, out, tiny_captioner, other, resume=True)

    counting = _DiesAt(tiny_captioner, 10**9)
    resumed = replay(sample.bag, out, counting, OPTIONS, resume=True)
    assert _captions(resumed.out_bag) == _captions(whole.out_bag)
    fresh_calls = sum(1 for f in whole.frames[state.frames:] if f.nfe)
    assert counting.calls == fresh_calls  # the committed frames did not run the model again
    # the records of the committed frames come back exactly from the journal (captions, confidences, cache ages)
    assert [(f.stamp_ns, f.regions, f.ages, f.nfe, f.tokens) for f in resumed.frames] == \
        [(f.stamp_ns, f.regions, f.ages, f.nfe, f.tokens) for f in whole.frames]
    assert resumed.written == whole.written
    assert sorted(resumed.previews) == sorted(whole.previews)
    assert replay_state(out / "bag").status == "complete" and not (out / STATE_DIR / JOURNAL).exists()
    with pytest.raises(BagError, match=r"output exists already: .*complete: nothing to resume"):
        replay(sample.bag, out, tiny_captioner, OPTIONS, resume=True)


def test_resume_without_an_interrupted_run_is_a_fresh_run(tmp_path, tiny_captioner):
    sample = write_sample_bag(tmp_path / "in", SampleBagSpec(frames=2))
    result = replay(sample.bag, tmp_path / "out", tiny_captioner, OPTIONS, resume=True)
    assert len(result.frames) == 2 and replay_state(result.out_bag).status == "complete"


def test_a_second_replay_into_the_same_output_is_refused_while_one_runs(tmp_path, tiny_captioner):
    sample = write_sample_bag(tmp_path / "in", SampleBagSpec(frames=1))
    out = tmp_path / "out"
    (out / STATE_DIR).mkdir(parents=True)
    with (out / STATE_DIR / "lock").open("a") as held:  # what the running replay holds
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(BagError, match=r"another replay is writing .*out now"):
            replay(sample.bag, out, tiny_captioner, OPTIONS)
    assert len(replay(sample.bag, out, tiny_captioner, OPTIONS).frames) == 1  # released: it runs


# ------------------------------------------------------------------------------------------------- full disk
class _FullDisk:
    """A file on a disk that fills up: writes past `quota` bytes (shared by every file under one folder) fail with
    ENOSPC, as the kernel does. A fake of the disk only; the code under test runs unchanged."""

    def __init__(self, f, left: list[int]) -> None:  # noqa: ANN001
        self._f, self._left = f, left

    def write(self, data):  # noqa: ANN001, ANN201
        if len(data) > self._left[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._left[0] -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):  # noqa: ANN001, ANN204
        return getattr(self._f, name)

    def __enter__(self):  # noqa: ANN204
        return self

    def __exit__(self, *exc):  # noqa: ANN002, ANN204
        self._f.close()


def _fill_disk_under(monkeypatch, folder: Path, quota: int) -> None:
    real_open, left = Path.open, [quota]

    def open_(self, mode="r", *args, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        f = real_open(self, mode, *args, **kw)
        inside = str(self.absolute()).startswith(str(folder))
        return _FullDisk(f, left) if inside and any(c in mode for c in "wax+") else f

    monkeypatch.setattr(Path, "open", open_)


def _check_disk_full(err: BagError, out: Path) -> int:
    text = str(err)
    assert "\n" not in text and "No space left on device" in text
    assert f"{out / 'bag'} keeps " in text and "rerun with --resume" in text
    assert not (out / "bag" / OPEN_DIR).exists()  # the unfinished part is removed
    state = replay_state(out / "bag")
    assert state.status == "interrupted"
    assert assert_opens(out / "bag").get("/pdlm/captions", 0) == state.frames
    return state.frames


def test_full_disk_is_one_line_and_keeps_a_readable_bag(tmp_path, tiny_captioner, monkeypatch):
    sample = write_sample_bag(tmp_path / "in", SampleBagSpec(frames=8, with_mask=False))
    out = tmp_path / "out"
    _fill_disk_under(monkeypatch, out, quota=400_000)  # room for about 4 of the 8 frames
    with pytest.raises(BagError) as info:
        replay(sample.bag, out, tiny_captioner, OPTIONS, checkpoint_s=0)
    assert 1 <= _check_disk_full(info.value, out) < 8
    monkeypatch.undo()  # space freed: the run goes on where it stopped
    result = replay(sample.bag, out, tiny_captioner, OPTIONS, resume=True)
    assert len(result.frames) == 8 and assert_opens(out / "bag")["/pdlm/captions"] == 8


@pytest.fixture
def small_disk(tmp_path):
    """A real 1.5 MB tmpfs; skipped where mounting is not permitted (not root, or no CAP_SYS_ADMIN)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1500k", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_real_disk_through_the_cli(tmp_path, small_disk, capsys):
    sample = write_sample_bag(tmp_path / "in", SampleBagSpec(frames=24, with_mask=False))  # 2.4 MB of images
    out = small_disk / "out"
    assert main(["replay", str(sample.bag), "--out", str(out), "--preset", "tiny", "--threads", "1",
                 "--checkpoint-every", "0"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot write ")
    frames = _check_disk_full(BagError(err[0].removeprefix("error: ")), out)
    assert 1 <= frames < 24


# --------------------------------------------------------------------------- the output is checked first
@pytest.mark.parametrize("where", ["proc", "under_a_file"])
def test_unwritable_output_is_found_before_the_model_loads(tmp_path, capsys, where):
    sample = write_sample_bag(tmp_path / "in", SampleBagSpec(frames=1))
    (tmp_path / "file").write_text("x")
    out = {"proc": "/proc/pdlm-out", "under_a_file": str(tmp_path / "file" / "out")}[where]
    # A missing checkpoint would fail the load; the output error comes first, so the model is never loaded.
    assert main(["replay", str(sample.bag), "--out", out, "--checkpoint", str(tmp_path / "no_model")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    want = {"proc": f"error: cannot write the output {out}: ", "under_a_file":
            f"error: output {out} lies under {tmp_path / 'file'}, which is a file, not a directory"}[where]
    assert err.startswith(want)


def test_ros2_bag_info_reads_an_interrupted_output(tmp_path, tiny_captioner):
    """`ros2 bag` itself (rosbag2's MCAP plugin) reads the committed segments of an interrupted replay."""
    import shutil

    if shutil.which("ros2") is None:
        pytest.skip("the ros2 command is not on PATH (source .ros2_ws/setup.bash)")
    sample = write_sample_bag(tmp_path / "in", SampleBagSpec(frames=6, with_mask=False))
    out = tmp_path / "out"
    opts = ReplayOptions(image_topic=IMAGE_TOPIC, detections_topic=DETECTIONS_TOPIC, cache=False)
    with pytest.raises(KeyboardInterrupt):
        replay(sample.bag, out, _DiesAt(tiny_captioner, 3), opts, checkpoint_s=0)
    (out / "bag" / OPEN_DIR / "bag_9").mkdir(parents=True)  # and a segment that kill -9 left unfinished
    (out / "bag" / OPEN_DIR / "bag_9" / "bag_9.mcap").write_bytes(b"\x89MCAP0\r\n\x01")
    info = subprocess.run(["ros2", "bag", "info", str(out / "bag")], capture_output=True, text=True, timeout=60)
    assert info.returncode == 0, info.stderr
    assert "bag_0.mcap" in info.stdout and "bag_2.mcap" in info.stdout
    captions = next(line for line in info.stdout.splitlines() if "/pdlm/captions" in line)
    assert "Count: 3 " in captions
