"""`pdlm-ros node`: argument handling, transport choice, and the rclpy adapter (skipped without ROS 2)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from pdlm_ros.cli import main
from pdlm_ros.errors import ConfigError
from pdlm_ros.ros import transport as T


def test_help_lists_every_parameter(capsys):
    with pytest.raises(SystemExit):
        main(["node", "--help"])
    out = capsys.readouterr().out
    assert "--ros-args" in out and "cache.iou_threshold" in out and "sync.slop" in out


def test_unknown_transport_and_missing_rclpy(monkeypatch):
    with pytest.raises(ConfigError, match="unknown transport 'zmq'"):
        T.make_transport("zmq")
    monkeypatch.setattr(T, "available_transports", lambda: ["dds"])
    with pytest.raises(ConfigError, match="source your ROS 2 install"):
        T.make_transport("rclpy")
    assert T.make_transport("auto").name == "dds"
    monkeypatch.setattr(T, "available_transports", lambda: [])
    with pytest.raises(ConfigError, match="no transport available"):
        T.make_transport("auto")


def test_bad_parameter_is_one_error_line(capsys):
    pytest.importorskip("cyclonedds", reason="the ROS-less DDS transport needs the cyclonedds package")
    rc = main(["node", "--transport", "dds", "--ros-args", "-p", "sync.slpo:=0.1"])
    assert rc == 1
    assert "error: unknown parameter 'sync.slpo'; did you mean 'sync.slop'?" in capsys.readouterr().err


def test_rclpy_adapter_declares_the_table_and_runs_lifecycle(tmp_path, ros2_env):
    import rclpy

    from pdlm_ros.ros.params import PARAMS
    from pdlm_ros.ros.transport_rclpy import PdlmLifecycleNode

    rclpy.init(args=["test", "--ros-args", "-p", "preset:=tiny", "-p", "decoding.steps:=2"])
    try:
        node = PdlmLifecycleNode()
        assert {p.name for p in PARAMS} <= set(node._parameters)
        from rclpy.lifecycle import TransitionCallbackReturn

        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
        assert node.core is not None and node.core.state == "active"
        assert node.trigger_deactivate() == TransitionCallbackReturn.SUCCESS
        assert node.core.captioner is None
        node.destroy_node()
    finally:
        rclpy.try_shutdown()


def test_rclpy_transport_stops_on_event(ros2_env):
    stop = threading.Event()
    stop.set()
    assert T.make_transport("rclpy").run(["-p", "preset:=tiny"], stop) == 0


def test_core_imports_neither_rclpy_nor_torch_nor_cyclonedds():
    import subprocess
    import sys

    code = ("import sys, pdlm_ros.ros.node_core, pdlm_ros.ros.convert, pdlm_ros.ros.sync, pdlm_ros.ros.transport, "
            "pdlm_ros.ros.params, pdlm_ros.viz; print(sorted(m for m in ('rclpy', 'torch', 'cyclonedds') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_generated_msg_module_is_found_beside_a_source_checkout(tmp_path):
    """colcon installs the generated `pdlm_ros.msg` in the install tree; pytest run from the source dir puts the
    source package (which has no `msg` module) first on sys.path. The install tree's `pdlm_ros.msg` must still load."""
    install = tmp_path / "site-packages" / "pdlm_ros" / "msg"
    install.mkdir(parents=True)
    (install / "__init__.py").write_text("class RegionCaptionArray:\n    pass\n")
    code = ("import sys; sys.path.append(sys.argv[1]); import pdlm_ros, pdlm_ros.msg; "
            "print(pdlm_ros.msg.RegionCaptionArray.__module__, pdlm_ros.__file__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # a sourced ROS 2 workspace has the real one
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "site-packages")], capture_output=True,
                         text=True, timeout=60, cwd=Path(__file__).resolve().parents[2], env=env)
    assert out.returncode == 0, out.stderr
    module, package_file = out.stdout.split()
    assert module == "pdlm_ros.msg" and str(tmp_path) not in package_file  # the source package, msg from install


def test_yolo_source_is_refused_on_plain_dds(capsys):
    pytest.importorskip("cyclonedds", reason="the ROS-less DDS transport needs the cyclonedds package")
    rc = main(["node", "--transport", "dds", "--ros-args", "-p", "regions.source:=yolo", "-p", "preset:=tiny"])
    assert rc == 1
    assert "error: regions.source 'yolo' needs the rclpy transport" in capsys.readouterr().err
