"""The rclpy node on a real ROS 2 (rclpy, rcl, rmw_cyclonedds_cpp): lifecycle with images flowing, parameters, logs
on /rosout, diagnostics in every state, services, the latched model info. Skipped without ROS 2 (failed under CI)."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

import pytest

from .conftest import frame

STEPS = ["-p", "preset:=tiny", "-p", "decoding.steps:=2", "-p", "diagnostics.period:=0.2"]


@pytest.fixture
def harness(ros2_env):
    from . import rclpy_harness

    made = []

    def make(cli_args=(), **kwargs):
        h = rclpy_harness.Harness([*STEPS, *cli_args], **kwargs)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


def _wait():
    from .rclpy_harness import wait_for

    return wait_for


def _feed(h, stamp0: int, stop: threading.Event, period: float = 0.05) -> threading.Thread:
    """Publish frames (image + detections with track ids a and b) until `stop` is set."""

    def run():
        k = 0
        while not stop.is_set():
            img, dets = frame(stamp0 + k * 50_000_000, [("a", (5, 5, 40, 40)), ("b", (50, 20, 90, 70))], seed=k)
            h.publish_frame(img, dets)
            k += 1
            time.sleep(period)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _states(h) -> list[str]:
    return [dict((kv.key, kv.value) for kv in m.status[0].values).get("state", "") for m in h.got("/diagnostics")]


def test_lifecycle_with_images_flowing(harness):
    """configure -> activate (captions with the image stamp and the detection ids) -> deactivate (none) -> cleanup ->
    configure -> activate (captions again) -> shutdown, while a camera and a detector keep publishing."""
    from rclpy.lifecycle import TransitionCallbackReturn as R

    wait_for = _wait()
    h = harness()
    stop = threading.Event()
    _feed(h, 1_000_000_000, stop)
    try:
        assert h.node.trigger_configure() == R.SUCCESS
        assert h.node.trigger_activate() == R.SUCCESS
        caps = wait_for(lambda: h.got("captions"), 60, "captions while active")
        c = caps[0]
        stamp = c.header.stamp.sec * 10**9 + c.header.stamp.nanosec
        assert stamp >= 1_000_000_000 and (stamp - 1_000_000_000) % 50_000_000 == 0  # a stamp we published
        assert c.header.frame_id == "camera" and [r.id for r in c.regions] == ["a", "b"]
        assert all(r.caption and not r.error for r in c.regions)
        ann = wait_for(lambda: h.got("annotations"), 10, "foxglove annotations")[0]
        assert len(ann.points) == 2 and len(ann.texts) == 2 and ann.texts[0].text.startswith("a: ")
        assert ann.points[0].timestamp.sec * 10**9 + ann.points[0].timestamp.nanosec >= 1_000_000_000

        assert h.node.trigger_deactivate() == R.SUCCESS
        assert h.node.core.captioner is None  # the model is freed while inactive
        time.sleep(0.5)  # in-flight messages settle
        h.clear("captions")
        time.sleep(1.0)
        assert h.got("captions") == []  # nothing is published while inactive
        wait_for(lambda: "inactive" in _states(h)[-3:], 5, "diagnostics while inactive")

        assert h.node.trigger_cleanup() == R.SUCCESS
        wait_for(lambda: "unconfigured" in _states(h)[-3:], 5, "diagnostics while unconfigured")
        assert h.node.trigger_configure() == R.SUCCESS
        assert h.node.trigger_activate() == R.SUCCESS
        wait_for(lambda: h.got("captions"), 60, "captions after reactivation")
        assert h.node.trigger_shutdown() == R.SUCCESS
        assert h.node.core.state == "finalized"
    finally:
        stop.set()


def test_numbers_of_the_other_type_are_accepted(harness):
    """rclpy fixes a parameter's type from its default unless told otherwise: `cache.max_age:=5` (an int for a float)
    raised InvalidParameterTypeException in the node's constructor."""
    from rclpy.lifecycle import TransitionCallbackReturn as R

    h = harness(["-p", "cache.max_age:=5", "-p", "sync.slop:=1"])
    assert h.node.trigger_configure() == R.SUCCESS
    assert h.node.core.params.cache_max_age == 5.0 and h.node.core.params.sync_slop == 1.0


@pytest.mark.parametrize("arg, message", [
    ("sync.slpo:=0.1", "unknown parameter 'sync.slpo'; did you mean 'sync.slop'?"),
    ("cache.max_age:=soon", "parameter 'cache.max_age' must be a number (got 'soon')"),
    ("decoding.steps:=5000", "parameter 'decoding.steps' must be in [0, 1024] (got 5000)"),
])
def test_bad_parameters_fail_configure_with_one_line(harness, arg, message):
    from rclpy.lifecycle import TransitionCallbackReturn as R

    wait_for = _wait()
    h = harness(["-p", arg])
    assert h.node.trigger_configure() == R.FAILURE
    assert h.node.core is None
    line = wait_for(lambda: h.rosout(message), 10, "the error on /rosout")[0]
    assert line.level == 40 and line.name == h.node.get_logger().name  # ERROR, from the node's own logger


def test_a_bad_parameter_keeps_failing_until_it_is_set_right(harness):
    """Retrying configure must not quietly fall back to the default of a parameter the user got wrong."""
    from rclpy.lifecycle import TransitionCallbackReturn as R
    from rclpy.parameter import Parameter

    h = harness(["-p", "decoding.steps:=5000"])
    assert h.node.trigger_configure() == R.FAILURE
    assert h.node.trigger_configure() == R.FAILURE
    assert h.node.set_parameters([Parameter("decoding.steps", value=3)])[0].successful
    assert h.node.trigger_configure() == R.SUCCESS and h.node.core.params.decoding_steps == 3


def test_param_set_is_validated_and_refused_while_configured(harness):
    from rclpy.lifecycle import TransitionCallbackReturn as R
    from rclpy.parameter import Parameter

    h = harness()
    ok, = h.node.set_parameters([Parameter("decoding.steps", value=3)])
    assert ok.successful  # unconfigured: taken at the next configure
    bad, = h.node.set_parameters([Parameter("decoding.mode", value="fastest")])
    assert not bad.successful and "must be one of" in bad.reason
    assert h.node.trigger_configure() == R.SUCCESS and h.node.core.params.decoding_steps == 3
    refused, = h.node.set_parameters([Parameter("decoding.steps", value=4)])
    assert not refused.successful and "read at configure" in refused.reason
    assert h.node.get_parameter("decoding.steps").value == 3


def test_a_failing_model_load_is_logged_with_its_reason(harness):
    """configure caught only the package's own errors: an OOM or OSError failed the transition with nothing said."""
    from rclpy.lifecycle import TransitionCallbackReturn as R

    wait_for = _wait()

    def loader(params):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    h = harness(loader=loader)
    assert h.node.trigger_configure() == R.FAILURE
    wait_for(lambda: h.rosout("configure failed: RuntimeError: CUDA out of memory"), 10, "the reason on /rosout")


def test_package_warnings_reach_rosout(harness):
    """The node core logs through Python logging; the bridge sends it to the node's logger, hence /rosout."""
    from rclpy.lifecycle import TransitionCallbackReturn as R

    from pdlm_ros.ros.transport_rclpy import bridge_logging

    wait_for = _wait()
    h = harness()
    with bridge_logging(h.node):
        assert h.node.trigger_configure() == R.SUCCESS and h.node.trigger_activate() == R.SUCCESS
        img, dets = frame(7_000_000_000, [("a", (5, 5, 40, 40))])
        img = dataclasses.replace(img, encoding="yuv422")

        def sent_and_heard():  # published until the new subscriptions have matched
            h.publish_frame(img, dets)
            return h.rosout("unsupported image encoding")

        line = wait_for(sent_and_heard, 30, "the bad-frame warning on /rosout")[0]
        assert line.level == 30 and line.name == h.node.get_logger().name
        assert logging.getLogger("pdlm_ros").propagate is False
    assert logging.getLogger("pdlm_ros").propagate is True


def test_diagnostics_in_every_state_on_the_node_clock(harness):
    """/diagnostics was a lifecycle publisher (silent unless active) stamped with the wall clock."""
    from builtin_interfaces.msg import Time
    from rclpy.lifecycle import TransitionCallbackReturn as R
    from rosgraph_msgs.msg import Clock

    wait_for = _wait()
    h = harness(["-p", "use_sim_time:=true"])
    clock_pub = h.peer.create_publisher(Clock, "/clock", 10)
    stop = threading.Event()

    def tick():
        while not stop.is_set():
            clock_pub.publish(Clock(clock=Time(sec=4242, nanosec=0)))
            time.sleep(0.05)

    threading.Thread(target=tick, daemon=True).start()
    try:
        def sim_stamped(state):
            return [m for m in h.got("/diagnostics") if m.header.stamp.sec == 4242
                    and dict((kv.key, kv.value) for kv in m.status[0].values).get("state") == state]

        wait_for(lambda: sim_stamped("unconfigured"), 15, "sim-time diagnostics while unconfigured")
        assert h.node.trigger_configure() == R.SUCCESS
        wait_for(lambda: sim_stamped("inactive"), 15, "sim-time diagnostics while inactive")
        assert h.node.trigger_activate() == R.SUCCESS
        wait_for(lambda: sim_stamped("active"), 15, "sim-time diagnostics while active")
    finally:
        stop.set()


def test_model_info_is_latched(harness):
    from rclpy.lifecycle import TransitionCallbackReturn as R

    from pdlm_ros.ros import messages as M
    from pdlm_ros.ros.transport_rclpy import _ros_type

    from .rclpy_harness import LATCHED

    wait_for = _wait()
    h = harness()
    assert h.node.trigger_configure() == R.SUCCESS and h.node.trigger_activate() == R.SUCCESS
    time.sleep(0.5)
    late = []  # subscribed after the message went out
    h.peer.create_subscription(_ros_type(M.MODEL_INFO), "model_info", late.append, LATCHED)
    info = wait_for(lambda: late, 10, "model_info for a late subscriber")[0]
    assert info.name.startswith("pdlm-tiny") and info.backend == "torch" and info.decoding_mode == "parallel"
    assert info.decoding_steps == 2 and info.max_regions > 0 and info.caption_len > 0


def test_enable_and_describe_services(harness):
    from rclpy.lifecycle import TransitionCallbackReturn as R
    from std_srvs.srv import SetBool
    from vision_msgs.msg import BoundingBox2D

    from pdlm_ros.srv import DescribeRegions

    from pdlm_ros.ros.transport_rclpy import _to_ros

    wait_for = _wait()
    h = harness()
    describe = h.peer.create_client(DescribeRegions, f"{h.node.get_name()}/describe")
    enable = h.peer.create_client(SetBool, f"{h.node.get_name()}/enable")
    refused = h.call(describe, DescribeRegions.Request())
    assert not refused.success and "unconfigured" in refused.message
    assert h.node.trigger_configure() == R.SUCCESS and h.node.trigger_activate() == R.SUCCESS

    none_yet = h.call(describe, DescribeRegions.Request())
    assert not none_yet.success and "no image in the request" in none_yet.message
    img, _ = frame(5_000_000_000, [("a", (5, 5, 40, 40))])
    req = DescribeRegions.Request(image=_to_ros(img))
    box = BoundingBox2D()
    box.center.position.x, box.center.position.y, box.size_x, box.size_y = 22.5, 22.5, 35.0, 35.0
    req.boxes, req.ids = [box, box], ["x", "y"]
    res = h.call(describe, req)
    assert res.success, res.message
    assert res.captions.header.stamp.sec == 5 and [r.id for r in res.captions.regions] == ["x", "y"]
    assert res.captions.regions[0].caption and res.captions.regions[0].caption == res.captions.regions[1].caption
    bad = h.call(describe, DescribeRegions.Request(image=_to_ros(img), boxes=[box], ids=["1", "2"]))
    assert not bad.success and "'ids' has 2 entries for 1 boxes" in bad.message
    prompt = h.call(describe, DescribeRegions.Request(image=_to_ros(img), boxes=[box], prompt="describe the region ."))
    assert prompt.success and prompt.captions.regions[0].caption, prompt.message
    empty = h.call(describe, DescribeRegions.Request(image=_to_ros(img), boxes=[box], prompt="   "))
    assert not empty.success and "has no tokens" in empty.message

    off = h.call(enable, SetBool.Request(data=False))
    assert off.success and h.node.core.enabled is False

    def disabled_inputs():
        h.publish_frame(*frame(6_000_000_000, [("a", (5, 5, 40, 40))]))
        return h.node.core.health.snapshot()[0]["inputs_while_disabled"] >= 2

    wait_for(disabled_inputs, 10, "inputs counted as disabled")
    assert h.got("captions") == []
    assert h.call(enable, SetBool.Request(data=True)).success

    def captioned():
        h.publish_frame(*frame(6_100_000_000, [("a", (5, 5, 40, 40))]))
        return h.got("captions")

    caps = wait_for(captioned, 30, "captions after enable")
    assert caps[0].header.stamp.nanosec == 100_000_000


def test_boxes_from_a_resized_detector_image_are_scaled(harness):
    """An Isaac-ROS-style detector that ran on a 48x36 copy of a 96x72 image: boxes are scaled by 2 to the image."""
    from rclpy.lifecycle import TransitionCallbackReturn as R

    from pdlm_ros.ros.convert import detection_array_msg, header_msg
    from pdlm_ros.types import RegionInput

    wait_for = _wait()
    h = harness(["-p", "regions.box_width:=48", "-p", "regions.box_height:=36"])
    assert h.node.trigger_configure() == R.SUCCESS and h.node.trigger_activate() == R.SUCCESS
    img, _ = frame(8_000_000_000, [("a", (10, 10, 50, 40))])
    small = detection_array_msg(header_msg(8_000_000_000, "camera"), [RegionInput(box=(5, 5, 25, 20), region_id="a")])

    def sent_and_captioned():
        h.publish_frame(img, small)
        return h.got("captions")

    c = wait_for(sent_and_captioned, 30, "captions")[0].regions[0]
    x1, y1 = c.bbox.center.position.x - c.bbox.size_x / 2, c.bbox.center.position.y - c.bbox.size_y / 2
    assert (x1, y1, c.bbox.size_x, c.bbox.size_y) == (10.0, 10.0, 40.0, 30.0)


def test_activate_deactivate_under_load_keeps_the_node_alive(harness):
    """Subscriptions destroyed on deactivate while the executor waits on them is an rclpy race (InvalidHandle in the
    executor thread). Cycle the lifecycle while frames pour in; the node must answer and caption after each cycle."""
    from rclpy.lifecycle import TransitionCallbackReturn as R

    wait_for = _wait()
    h = harness()
    stop = threading.Event()
    _feed(h, 10_000_000_000, stop, period=0.005)
    try:
        assert h.node.trigger_configure() == R.SUCCESS
        for _ in range(8):
            assert h.node.trigger_activate() == R.SUCCESS
            time.sleep(0.1)
            assert h.node.trigger_deactivate() == R.SUCCESS
        assert h.node.trigger_activate() == R.SUCCESS
        h.clear("captions")
        wait_for(lambda: h.got("captions"), 60, "captions after the cycles")
        assert h._spin.is_alive()  # the executor thread did not die on an InvalidHandle
        assert h.node.core.health.snapshot()[1]["internal"] == 0
    finally:
        stop.set()


def test_yolo_source_without_yolo_msgs_fails_activate_with_the_reason(harness):
    """The shared ROS 2 build has no yolo_msgs: the yolo source must say what is missing, not raise."""
    import importlib.util

    from rclpy.lifecycle import TransitionCallbackReturn as R

    if importlib.util.find_spec("yolo_msgs") is not None:
        pytest.skip("yolo_msgs is installed here; this checks the message shown without it")
    wait_for = _wait()
    h = harness(["-p", "regions.source:=yolo"])
    assert h.node.trigger_configure() == R.SUCCESS
    assert h.node.trigger_activate() == R.FAILURE
    wait_for(lambda: h.rosout("activate failed: regions.source 'yolo' needs the yolo_msgs package"), 10, "the reason")
    assert h.node.core.state == "inactive" and h.node.core.captioner is None


def test_two_cameras_each_on_their_own_topics(harness, tmp_path):
    """`cameras: [front, rear]` from a params file: frames of both cameras come back on front/captions and
    rear/captions with their own headers. Then the list changes to [rear] (cleanup, param set, configure): rear
    keeps working through the subscription made for the first configuration, front is no longer heard."""
    from rclpy.lifecycle import TransitionCallbackReturn as R
    from rclpy.parameter import Parameter

    wait_for = _wait()
    params = tmp_path / "cams.yaml"
    params.write_text("/**:\n  ros__parameters:\n    cameras: [front, rear]\n")
    h = harness(["--params-file", str(params)], cameras=("front", "rear"),
                listen=("front/captions", "rear/captions", "/diagnostics"))
    assert h.node.trigger_configure() == R.SUCCESS and h.node.trigger_activate() == R.SUCCESS

    def send(cam: str, stamp: int, boxes) -> None:
        img, dets = frame(stamp, boxes, seed=stamp % 7)
        img.header.frame_id = f"{cam}_optical"
        h.publish_frame(img, dets, camera=cam)

    front_boxes, rear_boxes = [("a", (5, 5, 40, 40))], [("b", (50, 20, 90, 70)), ("c", (5, 40, 30, 70))]
    for k in range(5):
        send("front", 1_000_000_000 + k * 50_000_000, front_boxes)
        send("rear", 9_000_000_000 + k * 50_000_000, rear_boxes)
        time.sleep(0.05)
    front = wait_for(lambda: h.got("front/captions"), 60, "front captions")
    rear = wait_for(lambda: h.got("rear/captions"), 60, "rear captions")
    assert all(c.header.frame_id == "front_optical" and [r.id for r in c.regions] == ["a"] for c in front)
    assert all(c.header.frame_id == "rear_optical" and [r.id for r in c.regions] == ["b", "c"] for c in rear)
    assert all(c.header.stamp.sec == 1 for c in front) and all(c.header.stamp.sec == 9 for c in rear)

    assert h.node.trigger_deactivate() == R.SUCCESS and h.node.trigger_cleanup() == R.SUCCESS
    h.node.set_parameters([Parameter("cameras", value=["rear"])])
    assert h.node.trigger_configure() == R.SUCCESS and h.node.trigger_activate() == R.SUCCESS
    h.clear("front/captions")
    h.clear("rear/captions")
    for k in range(5):
        send("front", 3_000_000_000 + k * 50_000_000, front_boxes)
        send("rear", 11_000_000_000 + k * 50_000_000, rear_boxes)
        time.sleep(0.05)
    rear = wait_for(lambda: h.got("rear/captions"), 60, "rear captions after the change")
    assert all(c.header.stamp.sec == 11 for c in rear)
    time.sleep(0.5)
    assert h.got("front/captions") == []
    assert h.node.core.health.snapshot()[1]["internal"] == 0


def test_an_empty_camera_list_in_a_params_file_is_one_camera(harness, tmp_path):
    """rcl reads a YAML `[]` as a parameter without a value; the node takes it as the default (no cameras)."""
    from rclpy.lifecycle import TransitionCallbackReturn as R

    params = tmp_path / "none.yaml"
    params.write_text("/**:\n  ros__parameters:\n    cameras: []\n")
    h = harness(["--params-file", str(params)], listen=("captions",))
    assert not h.node.bad_params
    assert h.node.trigger_configure() == R.SUCCESS and h.node.core.params.cameras == ()
