"""Input images: convert whatever a camera or a file gives into (H, W, 3) uint8 RGB, or refuse it clearly.

Accepted: (H, W) or (H, W, 1) grayscale, (H, W, 3) RGB, (H, W, 4) RGBA (alpha dropped), uint8, uint16 (scaled by
1/257), bool, and float in [0, 1]; PIL images. Larger than MAX_PIXELS is refused: the frame itself would not fit the
memory budget of a robot; everything past this point works on a bounded resized copy.
"""

from __future__ import annotations

import numpy as np

from pdlm_ros.errors import ImageInputError

__all__ = ["to_rgb_uint8", "MAX_PIXELS"]

MAX_PIXELS = 20000 * 20000


def to_rgb_uint8(image: object) -> np.ndarray:
    if hasattr(image, "mode") and hasattr(image, "size"):  # PIL.Image without importing PIL here
        image = np.asarray(image.convert("RGB") if image.mode not in ("L", "I;16", "RGB", "RGBA") else image)
    if not isinstance(image, np.ndarray):
        raise ImageInputError(f"image must be a numpy array or a PIL image, got {type(image).__name__}")
    arr = image
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ImageInputError(f"image must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got shape {arr.shape}")
    h, w = arr.shape[:2]
    if h < 1 or w < 1:
        raise ImageInputError(f"image is empty ({w}x{h} pixels)")
    if h * w > MAX_PIXELS:
        raise ImageInputError(f"image of {w}x{h} pixels exceeds the limit of {MAX_PIXELS} pixels")
    if arr.dtype == np.uint8:
        pass
    elif arr.dtype == np.uint16:
        arr = (arr.astype(np.uint32) * 255 // 65535).astype(np.uint8)
    elif arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ImageInputError("float image contains NaN or infinite values")
        if arr.min() < 0.0 or arr.max() > 1.0:
            raise ImageInputError(f"float image must lie in [0, 1]; got [{arr.min():.3g}, {arr.max():.3g}]")
        arr = np.round(arr * 255.0).astype(np.uint8)
    else:
        raise ImageInputError(f"unsupported image dtype {arr.dtype}; use uint8, uint16, bool or float in [0, 1]")
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif arr.shape[2] == 4:
        arr = arr[:, :, :3]
    arr = np.ascontiguousarray(arr)
    return arr if arr.flags.writeable else arr.copy()  # torch.from_numpy warns on read-only buffers (e.g. bag data)
