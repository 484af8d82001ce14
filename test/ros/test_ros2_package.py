"""The package as a ROS 2 user meets it: colcon builds (plain and --symlink-install), `ros2 run`, `ros2 launch` with
remappings and a params file, `ros2 param`, `ros2 lifecycle`, /rosout, and a proof of life (a camera and a detector
publisher, captions back with the image's stamp and the detection ids). Real processes on a real ROS 2; skipped
without one (failed under CI=true)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import frame

ROOT = Path(__file__).resolve().parents[2]


def _colcon() -> tuple[list[str], Path]:
    ros2 = shutil.which("ros2")
    prefix = Path(ros2).resolve().parents[1] if ros2 else Path("/opt/ros/jazzy")
    colcon = prefix.parent / "colcon"
    if not (colcon / "bin" / "colcon").is_file():
        from .conftest import require_ros2

        require_ros2()  # rclpy is there; colcon alone is missing
        pytest.skip(f"colcon is not installed beside the ROS 2 tree ({colcon})")
    return ["/usr/bin/python3", str(colcon / "bin" / "colcon")], colcon


def _build(tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd, colcon = _colcon()
    env = dict(os.environ, PATH="/usr/bin:" + os.environ["PATH"],
               PYTHONPATH=os.pathsep.join([str(colcon), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([*cmd, "--log-base", str(tmp / "log"), "build", "--paths", str(ROOT), "--build-base",
                           str(tmp / "build"), "--install-base", str(tmp / "install"), "--cmake-args",
                           "-DBUILD_TESTING=OFF", *extra], env=env, capture_output=True, text=True, timeout=600)


def _in_install(tmp: Path, command: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", f". {tmp}/install/setup.bash && {command}"], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("mode", ["plain", "symlink"])
def test_colcon_build_generates_messages_and_a_runnable_executable(ros2_env, tmp_path, mode):
    """With --symlink-install, lib/pdlm_ros/pdlm_node was a symlink to a 0644 file: `ros2 run` found no executable."""
    done = _build(tmp_path, *(["--symlink-install"] if mode == "symlink" else []))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    exe = tmp_path / "install" / "pdlm_ros" / "lib" / "pdlm_ros" / "pdlm_node"
    assert exe.is_symlink() == (mode == "symlink")
    assert os.access(exe.resolve(), os.X_OK)
    listed = _in_install(tmp_path, "ros2 pkg executables pdlm_ros")
    assert listed.stdout.split() == ["pdlm_ros", "pdlm_node"], listed.stderr
    shown = _in_install(tmp_path, "ros2 interface show pdlm_ros/srv/DescribeRegions")
    assert "vision_msgs/BoundingBox2D[] boxes" in shown.stdout and "RegionCaptionArray captions" in shown.stdout
    imported = _in_install(tmp_path, f"{sys.executable} -c 'from pdlm_ros.msg import RegionCaptionArray, ModelInfo; "
                           "import pdlm_ros.ros.node_core; print(RegionCaptionArray.__module__)'")
    assert imported.stdout.strip() == "pdlm_ros.msg._region_caption_array", imported.stderr


def _node_cmd() -> list[str]:
    return ["ros2", "run", "pdlm_ros", "pdlm_node"]


def test_ros2_run_with_a_bad_parameter_says_so_in_one_line(ros2_env):
    done = subprocess.run([*_node_cmd(), "--ros-args", "-p", "preset:=tiny", "-p", "cache.max_age:=soon"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    errors = [ln for ln in (done.stdout + done.stderr).splitlines() if "ERROR" in ln or "rror:" in ln]
    assert len(errors) == 1 and "parameter 'cache.max_age' must be a number (got 'soon')" in errors[0], errors
    assert "Traceback" not in done.stderr


def _ros2(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["ros2", *args], capture_output=True, text=True, timeout=timeout)


def _interrupt_launch(launch: subprocess.Popen, executor, peer, ctx) -> int:  # noqa: ANN001
    """Ctrl-C to `ros2 launch` and everything it started (its own session; killed after 30 s), then the test's peer
    node and its context go. The launch's exit code."""
    import rclpy

    os.killpg(launch.pid, signal.SIGINT)
    try:
        code = launch.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(launch.pid, signal.SIGKILL)
        code = launch.wait()
    executor.shutdown()
    peer.destroy_node()
    rclpy.shutdown(context=ctx)
    return code


def test_launch_with_remaps_and_params_file_proof_of_life(ros2_env, tmp_path):
    import rclpy

    from . import rclpy_harness as RH
    from pdlm_ros.ros import messages as M
    from pdlm_ros.ros.transport_rclpy import _ros_type, _to_ros

    params = tmp_path / "params.yaml"
    params.write_text("/**:\n  ros__parameters:\n    preset: tiny\n    decoding:\n      steps: 2\n"
                      "    diagnostics:\n      period: 0.5\n    cache:\n      max_age: 5\n")
    log = open(tmp_path / "launch.log", "w")
    launch = subprocess.Popen(
        ["ros2", "launch", "pdlm_ros", "pdlm.launch.py", "namespace:=robot", "image_topic:=/cam/img",
         "detections_topic:=/cam/dets", f"params_file:={params}", "log_level:=Debug"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    from rclpy.executors import SingleThreadedExecutor

    peer = rclpy.create_node("launch_peer", context=ctx)
    executor = SingleThreadedExecutor(context=ctx)
    executor.add_node(peer)
    got, rosout = [], []
    peer.create_subscription(_ros_type(M.CAPTION_ARRAY), "/robot/captions", got.append, RH.RELIABLE)
    peer.create_subscription(_ros_type("rcl_interfaces/msg/Log"), "/rosout", rosout.append, RH.RELIABLE)
    image_pub = peer.create_publisher(_ros_type(M.IMAGE), "/cam/img", RH.RELIABLE)
    det_pub = peer.create_publisher(_ros_type(M.DETECTION_ARRAY), "/cam/dets", RH.RELIABLE)
    k = 0
    try:
        def published_and_captioned():
            nonlocal k
            img, dets = frame(3_000_000_000 + k * 100_000_000, [("car-7", (5, 5, 40, 40)), ("", (50, 20, 90, 70))])
            image_pub.publish(_to_ros(img))
            det_pub.publish(_to_ros(dets))
            k += 1
            executor.spin_once(timeout_sec=0.2)
            return got

        c = RH.wait_for(published_and_captioned, 90, "captions on /robot/captions")[0]
        stamp = c.header.stamp.sec * 10**9 + c.header.stamp.nanosec
        assert (stamp - 3_000_000_000) % 100_000_000 == 0 and stamp >= 3_000_000_000
        assert [r.id for r in c.regions] == ["car-7", ""] and all(r.caption for r in c.regions)

        get = _ros2("param", "get", "--no-daemon", "/robot/pdlm_node", "decoding.steps")
        assert "Integer value is: 2" in get.stdout, get.stdout + get.stderr
        get = _ros2("param", "get", "--no-daemon", "/robot/pdlm_node", "cache.max_age")  # an int in the file, taken as a number
        assert "value is: 5" in get.stdout, get.stdout + get.stderr
        put = _ros2("param", "set", "--no-daemon", "/robot/pdlm_node", "decoding.steps", "4")
        answer = put.stdout + put.stderr
        assert "Setting parameter failed" in answer and "read at configure" in answer, answer
        state = _ros2("lifecycle", "get", "--no-daemon", "/robot/pdlm_node")
        assert state.stdout.startswith("active"), state.stdout + state.stderr
        services = _ros2("service", "list", "--no-daemon")
        assert "/robot/pdlm_node/describe" in services.stdout and "/robot/pdlm_node/enable" in services.stdout

        for _ in range(20):
            executor.spin_once(timeout_sec=0.1)
        names = {m.name for m in rosout}
        assert "robot.pdlm_node" in names, names
        texts = [m.msg for m in rosout if m.name == "robot.pdlm_node"]
        assert any("model pdlm-tiny" in t for t in texts), texts  # a Python-logging line of the core, on /rosout
    finally:
        code = _interrupt_launch(launch, executor, peer, ctx)
        log.close()
    out = (tmp_path / "launch.log").read_text()
    assert code == 0, out[-3000:]
    assert "Traceback" not in out and "[DEBUG]" in out, out[-3000:]  # log_level in any case reached rcl
    assert "process has finished cleanly" in out, out[-3000:]


def test_launch_with_two_cameras_and_the_packaged_params_file(ros2_env, tmp_path):
    """`cameras:=front,rear` on top of the installed config/pdlm.yaml (whose `cameras: []` rcl reads as no value):
    each camera's frames come back on its own captions topic under the namespace."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    from . import rclpy_harness as RH
    from pdlm_ros.ros import messages as M
    from pdlm_ros.ros.transport_rclpy import _ros_type, _to_ros

    log = open(tmp_path / "launch.log", "w")
    launch = subprocess.Popen(["ros2", "launch", "pdlm_ros", "pdlm.launch.py", "namespace:=duo", "preset:=tiny",
                               "cameras:=front, rear"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    peer = rclpy.create_node("launch_cameras_peer", context=ctx)
    executor = SingleThreadedExecutor(context=ctx)
    executor.add_node(peer)
    got: dict[str, list] = {"front": [], "rear": []}
    pubs = {}
    for cam in got:
        peer.create_subscription(_ros_type(M.CAPTION_ARRAY), f"/duo/{cam}/captions", got[cam].append, RH.RELIABLE)
        pubs[cam] = (peer.create_publisher(_ros_type(M.IMAGE), f"/duo/{cam}/image", RH.RELIABLE),
                     peer.create_publisher(_ros_type(M.DETECTION_ARRAY), f"/duo/{cam}/detections", RH.RELIABLE))
    k = 0
    try:
        def both_captioned():
            nonlocal k
            for cam, (image_pub, det_pub) in pubs.items():
                img, dets = frame(5_000_000_000 + k * 100_000_000, [(f"{cam}-1", (5, 5, 40, 40))])
                img.header.frame_id = cam
                image_pub.publish(_to_ros(img))
                det_pub.publish(_to_ros(dets))
            k += 1
            executor.spin_once(timeout_sec=0.2)
            return all(got.values())

        RH.wait_for(both_captioned, 90, "captions on /duo/front/captions and /duo/rear/captions")
        for cam, msgs in got.items():
            assert all(m.header.frame_id == cam and [r.id for r in m.regions] == [f"{cam}-1"] for m in msgs)
    finally:
        code = _interrupt_launch(launch, executor, peer, ctx)
        log.close()
    out = (tmp_path / "launch.log").read_text()
    assert code == 0 and "Traceback" not in out, out[-3000:]


def test_ros2_bag_play_of_a_replayed_bag(ros2_env, tmp_path, tiny_captioner):
    """A bag written by `pdlm-ros replay` (rosbags, no ROS) plays with `ros2 bag play`: captions and foxglove
    annotations reach a live subscriber, and `ros2 topic echo`, with the stamps they were recorded with."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    from pdlm_ros.data.bags import DETECTIONS_TOPIC, IMAGE_TOPIC, SampleBagSpec, write_sample_bag
    from pdlm_ros.eval.replay import ReplayOptions, replay
    from pdlm_ros.ros import messages as M
    from pdlm_ros.ros.transport_rclpy import _ros_type

    from . import rclpy_harness as RH

    sample = write_sample_bag(tmp_path / "in", SampleBagSpec(frames=3))
    result = replay(sample.bag, tmp_path / "out", tiny_captioner,
                    ReplayOptions(image_topic=IMAGE_TOPIC, detections_topic=DETECTIONS_TOPIC))
    recorded = {(f.stamp_ns // 10**9, f.stamp_ns % 10**9) for f in result.frames}
    info = _ros2("bag", "info", str(result.out_bag))
    assert info.returncode == 0, info.stderr
    assert "/pdlm/captions" in info.stdout and "pdlm_ros/msg/RegionCaptionArray" in info.stdout
    assert "foxglove_msgs/msg/ImageAnnotations" in info.stdout

    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    peer = rclpy.create_node("bag_listener", context=ctx)
    executor = SingleThreadedExecutor(context=ctx)
    executor.add_node(peer)
    caps, anns = [], []
    peer.create_subscription(_ros_type(M.CAPTION_ARRAY), "/pdlm/captions", caps.append, RH.RELIABLE)
    peer.create_subscription(_ros_type(M.IMAGE_ANNOTATIONS), "/pdlm/annotations", anns.append, RH.RELIABLE)
    play = subprocess.Popen(["ros2", "bag", "play", "--loop", str(result.out_bag)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        def heard():
            executor.spin_once(timeout_sec=0.2)
            return len(caps) >= 3 and anns

        RH.wait_for(heard, 60, "captions and annotations from ros2 bag play")
        # and to the command line tool itself, as a user would watch it
        echo = _ros2("topic", "echo", "--once", "/pdlm/captions", "pdlm_ros/msg/RegionCaptionArray", timeout=60)
        assert echo.returncode == 0, echo.stdout + echo.stderr
        assert "regions:" in echo.stdout and "caption:" in echo.stdout, echo.stdout
        echoed_sec = int(echo.stdout.split("sec:", 1)[1].split()[0])
        assert echoed_sec in {sec for sec, _ in recorded}, echo.stdout
    finally:
        os.killpg(play.pid, signal.SIGINT)
        out = play.communicate(timeout=30)[0]
        executor.shutdown()
        peer.destroy_node()
        rclpy.shutdown(context=ctx)
    assert {(m.header.stamp.sec, m.header.stamp.nanosec) for m in caps} <= recorded
    assert all(m.regions and all(r.caption for r in m.regions) for m in caps)
    assert "Ignoring a topic" not in out, out  # every type, ours and foxglove's, was found
