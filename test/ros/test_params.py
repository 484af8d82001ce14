"""The parameter table, params files, --ros-args, topic resolution, and the packaging files that mirror them."""

from __future__ import annotations

import ast
import dataclasses
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pdlm_ros.errors import ConfigError
from pdlm_ros.ros import messages as M
from pdlm_ros.ros.node_core import OUTPUT_TOPICS, input_topics
from pdlm_ros.ros.params import PARAMS, NodeParams, flatten, load_params_file
from pdlm_ros.ros.ros_args import dds_topic, expand_topic, parse_ros_args, resolve_topic

ROOT = Path(__file__).resolve().parents[2]


def test_table_and_dataclass_agree():
    assert [f.name for f in dataclasses.fields(NodeParams)] == [p.attr for p in PARAMS]
    defaults = NodeParams()
    for p in PARAMS:
        assert getattr(defaults, p.attr) == p.default, p.name
        assert isinstance(p.default, p.type), p.name
        assert p.description
    assert NodeParams.from_values({}) == defaults
    assert NodeParams.from_values(defaults.to_values()) == defaults


def test_config_yaml_documents_every_parameter_with_its_default():
    text = (ROOT / "config" / "pdlm.yaml").read_text()
    values = load_params_file(ROOT / "config" / "pdlm.yaml", "/pdlm/pdlm_node")
    assert values == NodeParams().to_values()
    lines = text.splitlines()
    for k, line in enumerate(lines):  # every parameter line follows a comment line
        stripped = line.strip()
        if ":" in stripped and not stripped.startswith("#") and not stripped.endswith(":"):
            assert lines[k - 1].strip().startswith("#"), f"no comment above {stripped!r}"


@pytest.mark.parametrize("values,match", [
    ({"sync.slpo": 0.1}, r"unknown parameter 'sync.slpo'; did you mean 'sync.slop'\?"),
    ({"sync.slop": "fast"}, "must be a number"),
    ({"sync.slop": -1.0}, r"must be in \[0.0, 10.0\]"),
    ({"decoding.steps": 2.5}, "must be an integer"),
    ({"decoding.mode": "fastest"}, "must be one of"),
    ({"cache.enabled": "yes"}, "true or false"),
    ({"checkpoint": "/models/x", "preset": "tiny"}, "either parameter 'checkpoint' or 'preset'"),
])
def test_bad_values_name_the_parameter(values, match):
    with pytest.raises(ConfigError, match=match):
        NodeParams.from_values(values)


def test_int_accepted_for_float_and_runtime_params_ignored():
    p = NodeParams.from_values({"sync.slop": 1, "use_sim_time": True})
    assert p.sync_slop == 1.0 and isinstance(p.sync_slop, float)


def test_params_file_sections_and_errors(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("/**:\n  ros__parameters:\n    sync: {slop: 0.02}\n    preset: tiny\n"
                 "/robot/pdlm_node:\n  ros__parameters:\n    sync:\n      slop: 0.05\n"
                 "other_node:\n  ros__parameters:\n    preset: small\n")
    assert load_params_file(f, "/robot/pdlm_node") == {"sync.slop": 0.05, "preset": "tiny"}
    assert load_params_file(f, "/other_node") == {"sync.slop": 0.02, "preset": "small"}
    f.write_text("pdlm_node:\n  parameters:\n    a: 1\n")
    with pytest.raises(ConfigError, match="has no 'ros__parameters'"):
        load_params_file(f, "/pdlm_node")
    with pytest.raises(ConfigError, match="cannot read params file"):
        load_params_file(tmp_path / "missing.yaml", "/pdlm_node")
    assert flatten({"a": {"b": {"c": 1}}, "d": 2}) == {"a.b.c": 1, "d": 2}


def test_ros_args_parsing():
    a = parse_ros_args(["--ros-args", "-r", "__node:=captioner", "-r", "__ns:=/robot", "-r", "image:=/cam/raw",
                        "-r", "captioner:detections:=/yolo/tracking", "-r", "other:captions:=/x",
                        "-p", "decoding.steps:=8", "-p", "preset:=tiny", "-p", "cache.enabled:=false",
                        "--params-file", "/tmp/a.yaml", "--log-level", "pdlm:=debug"])
    assert (a.node_name, a.namespace, a.fqn) == ("captioner", "/robot", "/robot/captioner")
    assert a.params == {"decoding.steps": 8, "preset": "tiny", "cache.enabled": False}
    assert a.params_files == ("/tmp/a.yaml",) and a.log_level == "DEBUG"
    assert resolve_topic("image", a) == "/cam/raw"
    assert resolve_topic("detections", a) == "/yolo/tracking"
    assert resolve_topic("captions", a) == "/robot/captions"  # the rule for another node does not apply
    assert resolve_topic("/diagnostics", a) == "/diagnostics"
    assert dds_topic(resolve_topic("image/compressed", a)) == "rt/robot/image/compressed"
    with pytest.raises(ConfigError, match="unknown argument '--bogus'"):
        parse_ros_args(["--bogus"])
    with pytest.raises(ConfigError, match="NAME:=VALUE"):
        parse_ros_args(["-r", "image"])
    with pytest.raises(ConfigError, match="needs a value"):
        parse_ros_args(["-p"])


def test_topic_expansion():
    assert expand_topic("image", "/") == "/image"
    assert expand_topic("~/debug", "/ns", "node") == "/ns/node/debug"
    with pytest.raises(ConfigError, match="invalid topic name"):
        expand_topic("bad name", "/")


def _launch_constants() -> dict:
    tree = ast.parse((ROOT / "launch" / "pdlm.launch.py").read_text())
    return {t.id: ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
            for t in node.targets if isinstance(t, ast.Name) and t.id in ("REMAPS", "OVERRIDES")}


def test_launch_remaps_every_relative_topic_and_overrides_real_parameters():
    c = _launch_constants()
    node_topics = {t.name for t in OUTPUT_TOPICS if not t.name.startswith("/")}
    for source in ("detections", "instance_mask"):
        for compressed in (False, True):
            p = NodeParams.from_values({"regions.source": source, "input.compressed": compressed})
            node_topics |= {t.name for t in input_topics(p)}
    assert {rel for rel, _, _ in c["REMAPS"]} == node_topics
    names = {p.name: p for p in PARAMS}
    for _, param, kind, _ in c["OVERRIDES"]:
        assert param in names and names[param].type.__name__ == kind, param


def test_package_xml_and_cmake_build_the_messages():
    root = ET.parse(ROOT / "package.xml").getroot()
    assert root.get("format") == "3" and root.findtext("name") == "pdlm_ros"
    assert root.find("export/build_type").text == "ament_cmake"
    assert root.findtext("member_of_group") == "rosidl_interface_packages"
    deps = {e.text for e in root if e.tag.endswith("depend")}
    assert {"rosidl_default_generators", "rosidl_default_runtime", "vision_msgs", "std_msgs", "rclpy"} <= deps
    cmake = (ROOT / "CMakeLists.txt").read_text()
    for msg in sorted(M.msg_dir().glob("*.msg")):
        assert f'"msg/{msg.name}"' in cmake
    assert "rosidl_generate_interfaces(${PROJECT_NAME}" in cmake and "DEPENDENCIES std_msgs sensor_msgs vision_msgs" in cmake
    assert (ROOT / "resource" / "pdlm_ros").exists()


def test_docs_parameter_table_lists_every_parameter_with_its_default():
    rows = [ln.split("|")[1:4] for ln in (ROOT / "docs" / "ros.md").read_text().splitlines()
            if ln.startswith("| `") and ln.count("|") >= 6]
    table = {name.strip().strip("`"): default.strip().strip("`") for name, _, default in rows}
    for p in PARAMS:
        shown = f'"{p.default}"' if isinstance(p.default, str) else str(p.default).lower() \
            if isinstance(p.default, bool) else repr(list(p.default)) if isinstance(p.default, tuple) \
            else repr(p.default)
        assert table.get(p.name) == shown, f"docs/ros.md: parameter {p.name} missing or with another default"
