"""The gate on the ROS 2 tests: without ROS 2 they skip with the reason, and under CI=true that skip is a failure."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run_without_ros2(ci: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "AMENT_PREFIX_PATH", "CI")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if "/opt/ros" not in p)
    if ci:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           "test/ros/test_rclpy_node.py::test_model_info_is_latched"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_without_ros2_the_tests_skip_with_the_reason():
    done = _run_without_ros2("")
    assert done.returncode == 0, done.stdout[-2000:]
    assert "1 skipped" in done.stdout and "rclpy is not importable" in done.stdout


def test_under_ci_a_missing_ros2_fails_the_run():
    done = _run_without_ros2("true")
    assert done.returncode == 1, done.stdout[-2000:]
    assert "CI=true but the ROS 2 tests cannot run: rclpy is not importable" in done.stdout
