"""Training and evaluation data: deterministic synthetic multi-object scenes with exact masks and captions."""

from pdlm_ros.data.scenes import (
    ATTRIBUTES,
    COLORS,
    HELDOUT_SEED_BASE,
    PATTERNS,
    SHAPES,
    SIZES,
    ObjectSpec,
    Scene,
    SceneObject,
    caption_for,
    generate_scene,
    render_scene,
    sample_specs,
    scene_seeds,
    vocabulary,
)

__all__ = [
    "ATTRIBUTES",
    "COLORS",
    "HELDOUT_SEED_BASE",
    "PATTERNS",
    "SHAPES",
    "SIZES",
    "ObjectSpec",
    "Scene",
    "SceneObject",
    "caption_for",
    "generate_scene",
    "render_scene",
    "sample_specs",
    "scene_seeds",
    "vocabulary",
]
