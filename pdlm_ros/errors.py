"""Errors raised by pdlm_ros.

One base class so callers (the CLI, the node) can catch everything the package raises on purpose; each message
says what failed, the offending value and what to do.
"""

from __future__ import annotations

__all__ = [
    "PDLMError",
    "ConfigError",
    "CheckpointError",
    "ImageInputError",
    "RegionInputError",
    "BagError",
    "EngineError",
    "JudgeError",
    "DatasetError",
    "Cancelled",
]


class PDLMError(Exception):
    """Base class of every error pdlm_ros raises on purpose."""


class ConfigError(PDLMError, ValueError):
    """A configuration value or file is invalid."""


class CheckpointError(PDLMError):
    """A checkpoint cannot be loaded: wrong format, missing or unexpected keys, shape mismatch."""


class ImageInputError(PDLMError, ValueError):
    """An input image cannot be used (encoding, size, corrupt data)."""


class RegionInputError(PDLMError, ValueError):
    """A region (box or mask) cannot be used."""


class BagError(PDLMError):
    """A bag cannot be read or written as asked."""


class EngineError(PDLMError):
    """An ONNX graph or TensorRT engine is missing, stale, foreign or corrupt."""


class JudgeError(PDLMError):
    """A caption judge failed (endpoint down, unparseable answer)."""


class DatasetError(PDLMError, ValueError):
    """A dataset is empty or malformed."""


class Cancelled(PDLMError):
    """Work stopped on request before it finished (a node shutting down in the middle of a frame)."""
