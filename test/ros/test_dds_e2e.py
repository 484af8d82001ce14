"""End to end over real DDS on loopback: camera+tracker, the node, and a planner, as three processes.

Cyclone DDS is confined to the loopback interface (unicast discovery, no multicast) and a random domain id, so
parallel runs do not see each other. The camera process is stopped and a new one started midway (a publisher that
dies and comes back), and the last frame of the first camera has an unsupported encoding (last, so that no newer
frame can replace it in the node's one-slot buffer before it is looked at).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("cyclonedds", reason="the ROS-less DDS transport needs the cyclonedds package")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
LOOPBACK = ('<CycloneDDS><Domain id="any"><General><Interfaces><NetworkInterface name="lo" multicast="false"/>'
            '</Interfaces><AllowMulticast>false</AllowMulticast></General><Discovery>'
            '<ParticipantIndex>auto</ParticipantIndex><MaxAutoParticipantIndex>40</MaxAutoParticipantIndex>'
            '<Peers><Peer address="127.0.0.1"/></Peers></Discovery></Domain></CycloneDDS>')
NODE = [sys.executable, "-c", "import sys; from pdlm_ros.cli import main; sys.exit(main())", "node"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(CYCLONEDDS_URI=LOOPBACK, ROS_DOMAIN_ID=str(random.SystemRandom().randint(1, 200)),
               OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    return env


def _lines(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def _wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.2)
    detail = log.read_text()[-3000:] if log is not None and log.exists() else ""
    raise AssertionError(f"timed out waiting for {what}\n{detail}")


def _camera(args: list[str], env, tmp: Path, name: str) -> list[dict]:
    out = tmp / f"{name}.jsonl"
    with open(out, "w") as f, open(tmp / f"{name}.err", "w") as err:
        rc = subprocess.run([sys.executable, str(HERE / "dds_camera.py"), *args], stdout=f, stderr=err, env=env,
                            timeout=90).returncode
    assert rc == 0, (tmp / f"{name}.err").read_text()
    return _lines(out)


def _interrupt(procs: list[subprocess.Popen]) -> list[int]:
    """SIGINT to every process still running (as Ctrl-C would); their exit codes."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    return [p.wait(timeout=30) for p in procs]


def _node_and_planner(tmp: Path, env, node_args: list[str], cameras: tuple[str, ...] = ()):
    """Start the node (DDS transport, tiny preset) and a planner listening to it, and wait until both are up;
    (processes, node's stderr file, planner's stdout file)."""
    node_err, planner_out = tmp / "node.err", tmp / "planner.jsonl"
    node = subprocess.Popen([*NODE, "--transport", "dds", "--ros-args", "-p", "preset:=tiny", "-p", "decoding.steps:=2",
                             "-p", "diagnostics.period:=0.5", *node_args],
                            stdout=subprocess.DEVNULL, stderr=open(node_err, "w"), env=env)
    planner = subprocess.Popen([sys.executable, str(HERE / "dds_planner.py"), *cameras], stdout=open(planner_out, "w"),
                               stderr=open(tmp / "planner.err", "w"), env=env)
    procs = [node, planner]
    try:
        _wait_for(lambda: "on DDS domain" in node_err.read_text(), 120, "the node to start", node, node_err)
        _wait_for(lambda: planner_out.exists() and "ready" in planner_out.read_text(), 30, "the planner", planner)
    except BaseException:
        _interrupt(procs)
        raise
    return procs, node_err, planner_out


def test_camera_node_planner_over_dds(tmp_path):
    env = _env()
    procs, node_err, planner_out = _node_and_planner(tmp_path, env, ["-r", "__node:=pdlm_e2e"])
    node = procs[0]
    try:
        first = _camera(["--frames", "30", "--hz", "20", "--bad-frame", "29"], env, tmp_path, "camera1")
        # the camera process is gone; a new one comes up with its own participant and a reset clock (stamps jump
        # back, as after a restart in simulation time)
        second = _camera(["--frames", "30", "--hz", "20", "--start-ns", "500000000000"], env, tmp_path, "camera2")
        published = {f["stamp"]: f for f in first + second}
        total = len(first) + len(second)

        def settled():
            diags = [d for d in _lines(planner_out) if d["topic"] == "diagnostics"]
            if not diags:
                return None
            v = diags[-1]["values"]
            done = int(v["images_in"]) == total and \
                int(v["frames_out"]) + int(v["dropped"]) + int(v.get("errors.image_encoding", 0)) == int(v["pairs"])
            return v if done else None

        values = _wait_for(settled, 60, "the node to process every frame", node, node_err)
    finally:
        codes = _interrupt(procs)
    assert codes[0] == 0, node_err.read_text()[-3000:]

    captions = [d for d in _lines(planner_out) if d["topic"] == "captions"]
    assert captions, "the planner received no captions"
    for c in captions:
        frame = published[c["stamp"]]  # every output stamp is an image stamp
        assert not frame["bad"]
        assert [r["id"] for r in c["regions"]] == frame["ids"]  # region ids match the detections
        assert [r["index"] for r in c["regions"]] == list(range(len(frame["ids"])))
        assert all(r["caption"] and not r["error"] for r in c["regions"])
        assert c["frame_id"] == "camera_optical_frame"
    stamps = [c["stamp"] for c in captions]
    assert any(s >= 1_000_000_000_000 for s in stamps) and any(s < 1_000_000_000_000 for s in stamps)
    assert stamps[-1] == second[-1]["stamp"]  # the newest frame is processed
    assert any(r["cached"] for c in captions for r in c["regions"])  # tracked regions reuse their captions

    assert values["errors.image_encoding"] == "1"  # the bad frame is counted, and the node went on
    assert int(values["pairs"]) == total and int(values["frames_out"]) == len(captions)
    assert "unsupported image encoding 'yuv422'" in node_err.read_text()
    assert int(values["errors.publisher_restart"]) >= 1 and "starting a new timeline" in node_err.read_text()


def test_sigterm_stops_the_node_in_the_middle_of_a_long_inference(tmp_path):
    """One frame of 4,000 boxes, all let through (regions.max_per_frame 4096): minutes of inference. /diagnostics
    keeps coming meanwhile, and SIGTERM ends the node within seconds (it used to need SIGKILL)."""
    env = _env()
    node_err = tmp_path / "node.err"
    planner_out = tmp_path / "planner.jsonl"
    node = subprocess.Popen([*NODE, "--transport", "dds", "--ros-args", "-p", "preset:=tiny", "-p",
                             "decoding.steps:=8", "-p", "regions.max_per_frame:=4096", "-p", "cache.enabled:=false",
                             "-p", "input.qos:=reliable", "-p", "diagnostics.period:=0.2"],
                            stdout=subprocess.DEVNULL, stderr=open(node_err, "w"), env=env)
    planner = subprocess.Popen([sys.executable, str(HERE / "dds_planner.py")], stdout=open(planner_out, "w"),
                               stderr=open(tmp_path / "planner.err", "w"), env=env)
    try:
        _wait_for(lambda: "on DDS domain" in node_err.read_text(), 120, "the node to start", node, node_err)
        _wait_for(lambda: planner_out.exists() and "ready" in planner_out.read_text(), 30, "the planner", planner)
        _camera(["--frames", "1", "--extra-boxes", "4000", "--reliable"], env, tmp_path, "camera")

        def busy_reports():
            return [d for d in _lines(planner_out) if d["topic"] == "diagnostics" and
                    float(d["values"].get("busy_s", 0)) > 0]

        _wait_for(lambda: len(busy_reports()) >= 3, 60, "diagnostics while the frame is captioned", node, node_err)
        assert not [d for d in _lines(planner_out) if d["topic"] == "captions"]  # still inside that one frame
        node.send_signal(signal.SIGTERM)
        code = node.wait(timeout=20)  # the defect: no exit at all until SIGKILL
    finally:
        for p in (node, planner):
            if p.poll() is None:
                p.kill()
                p.wait()
    log = node_err.read_text()
    assert code == 0, log[-3000:]
    assert "abandoned: the node is stopping" in log and "still inside one model call" not in log


def test_two_cameras_in_one_node_over_dds(tmp_path):
    """`cameras: [front, rear]`: two camera processes publish at once; each camera's captions come back on its own
    topic with its own header, and the diagnostics count each camera's inputs."""
    env = _env()
    procs, node_err, planner_out = _node_and_planner(
        tmp_path, env, ["-p", "cameras:=[front, rear]", "-r", "__node:=pdlm_cams"], cameras=("front", "rear"))
    node = procs[0]
    try:
        cams = {cam: subprocess.Popen([sys.executable, str(HERE / "dds_camera.py"), "--camera", cam, "--frames", "20",
                                       "--hz", "10", "--start-ns", str(start), "--seed", str(seed)],
                                      stdout=open(tmp_path / f"{cam}.jsonl", "w"),
                                      stderr=open(tmp_path / f"{cam}.err", "w"), env=env)
                for cam, start, seed in (("front", 1_000_000_000_000, 7), ("rear", 2_000_000_000_000, 8))}
        for cam, p in cams.items():
            assert p.wait(timeout=90) == 0, (tmp_path / f"{cam}.err").read_text()
        sent = {cam: {f["stamp"]: f for f in _lines(tmp_path / f"{cam}.jsonl")} for cam in cams}

        def settled():
            diags = [d for d in _lines(planner_out) if d["topic"] == "diagnostics"]
            v = diags[-1]["values"] if diags else None
            done = v is not None and all(int(v[f"{cam}.images_in"]) == len(sent[cam]) for cam in cams) and \
                int(v["frames_out"]) + int(v["dropped"]) == int(v["pairs"])
            return v if done else None

        values = _wait_for(settled, 60, "the node to process both cameras' frames", node, node_err)
    finally:
        codes = _interrupt(procs)
    assert codes[0] == 0, node_err.read_text()[-3000:]
    got = _lines(planner_out)
    assert values["cameras"] == "front,rear" and int(values["pairs"]) == 40
    for cam in cams:
        captions = [d for d in got if d["topic"] == f"{cam}/captions"]
        assert captions, f"no captions on {cam}/captions"
        for c in captions:
            frame = sent[cam][c["stamp"]]  # a stamp this camera published, on this camera's topic
            assert c["frame_id"] == f"{cam}_optical" and [r["id"] for r in c["regions"]] == frame["ids"]
            assert all(r["caption"] and not r["error"] for r in c["regions"])
        assert captions[-1]["stamp"] == max(sent[cam])  # each camera's newest frame is processed
