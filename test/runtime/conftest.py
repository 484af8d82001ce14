"""Fixtures for the deployment path: one export of the tiny model per test session (both variants, float32)."""

import pytest


@pytest.fixture(scope="session")
def tiny_export(tiny_captioner, tmp_path_factory):
    from pdlm_ros.runtime.onnx_export import export_model

    out = tmp_path_factory.mktemp("export") / "tiny"
    manifest = export_model(tiny_captioner.model, out, tokenizer=tiny_captioner.tokenizer, variant="both")
    return out, manifest
