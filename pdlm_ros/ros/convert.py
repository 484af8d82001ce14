"""Conversions between ROS messages (rosbags message objects) and the core's types.

Images become (H, W, 3) uint8 RGB numpy arrays; Detection2DArray and instance-mask images become `RegionInput`
lists; a `FrameResult` becomes a RegionCaptionArray. Every malformed image raises `ImageInputError` naming the
problem (encoding, step, size). Boxes are never dropped here: a NaN, infinite or out-of-frame box is passed on as is,
so the captioner refuses that one region with an error and the others are still described; a detection whose angle
is not finite carries its refusal.

Limits, checked before anything proportional to them is allocated: an image of more than `max_pixels` pixels
(default DEFAULT_MAX_PIXELS; a compressed image is measured from its header, before decoding), more than
MAX_DETECTIONS detections in one array, and, for instance masks, one full-size mask only for each of the
`max_regions` largest labels.

Hand-written rather than `rosbags-image`/`cv_bridge`: those need OpenCV (a heavy, clash-prone dependency on
robots, see the numpy 2 / cv_bridge reports) and only decode; here we need both directions and exact errors.
"""

from __future__ import annotations

import dataclasses
import io
import math
import threading
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image as PILImage

from pdlm_ros.errors import ImageInputError, RegionInputError
from pdlm_ros.region_rules import budget_refusal
from pdlm_ros.ros import messages as M
from pdlm_ros.types import FrameResult, RegionCaption, RegionInput

__all__ = [
    "SUPPORTED_ENCODINGS",
    "stamp_ns",
    "header_msg",
    "image_from_msg",
    "image_from_compressed",
    "image_to_msg",
    "compressed_to_msg",
    "labels_from_msg",
    "regions_from_detections",
    "regions_from_instance_mask",
    "detection_array_msg",
    "caption_array_msg",
    "image_annotations_msg",
    "scale_regions",
    "detections_from_yolo",
    "DEFAULT_MAX_PIXELS",
    "MAX_DETECTIONS",
    "COMPRESSED_FORMATS",
]

# encoding -> (channels, bytes per channel, channel order). 8UC3/8UC4 are taken as BGR/BGRA, the order of the OpenCV
# buffers that carry these generic encodings.
SUPPORTED_ENCODINGS: dict[str, tuple[int, int, str]] = {
    "rgb8": (3, 1, "rgb"),
    "bgr8": (3, 1, "bgr"),
    "rgba8": (4, 1, "rgb"),
    "bgra8": (4, 1, "bgr"),
    "mono8": (1, 1, "mono"),
    "8UC1": (1, 1, "mono"),
    "8UC3": (3, 1, "bgr"),
    "8UC4": (4, 1, "bgr"),
    "mono16": (1, 2, "mono"),
    "16UC1": (1, 2, "mono"),
}
_MASK_ENCODINGS = ("mono8", "8UC1", "mono16", "16UC1")
_MAX_SIDE = 20000  # px; a larger side is a corrupt header, not a camera
# Pixels of one input image (the node's input.max_pixels): 8K UHD is 33 MP. A 136 KB PNG can claim 12000x12000 and
# decode to 1.5 GB, so a compressed image is measured by its header before it is decoded.
DEFAULT_MAX_PIXELS = 50_000_000
# Detections in one array: detectors emit hundreds at most; past this the message is refused whole, which bounds the
# per-frame work of converting it and of the caption array that answers it (the region budget bounds the model's).
MAX_DETECTIONS = 20_000
COMPRESSED_FORMATS = ("JPEG", "PNG")  # what image_transport's compressed plugin sends; PIL's other decoders stay off
_PIL_OPEN = threading.Lock()  # warnings.catch_warnings changes process-wide state: one opener at a time


def _types() -> dict[str, Any]:
    return M.typestore().types


def stamp_ns(header: Any) -> int:
    """A header's stamp in int nanoseconds."""
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)


def header_msg(stamp: int, frame_id: str = "") -> Any:
    """A std_msgs/Header from int nanoseconds."""
    t = _types()
    sec, nsec = divmod(int(stamp), 1_000_000_000)
    return t["std_msgs/msg/Header"](stamp=t["builtin_interfaces/msg/Time"](sec=sec, nanosec=nsec), frame_id=frame_id)


# ----------------------------------------------------------------------------------------------------------- images
def _check_pixels(w: int, h: int, max_pixels: int, what: str) -> None:
    if not (0 < h <= _MAX_SIDE and 0 < w <= _MAX_SIDE):
        raise ImageInputError(f"{what} size {w}x{h} is out of range (1..{_MAX_SIDE} px per side)")
    if w * h > max_pixels:
        raise ImageInputError(f"{what} of {w}x{h} px ({w * h} pixels) exceeds the limit of {max_pixels} pixels "
                              "(parameter input.max_pixels)")


def _int_field(msg: Any, name: str) -> int:
    try:
        return int(getattr(msg, name))
    except (TypeError, ValueError, OverflowError, AttributeError) as err:
        raise ImageInputError(f"image field {name!r} is not an integer: {err}") from None


def _bytes(data: Any) -> np.ndarray:
    """A message's byte field as a flat uint8 array (no copy for bytes and uint8 arrays)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return np.frombuffer(data, dtype=np.uint8)
    buf = np.asarray(data)
    if buf.dtype != np.uint8:
        try:
            buf = buf.astype(np.uint8)
        except (TypeError, ValueError, OverflowError) as err:
            raise ImageInputError(f"image data is not bytes ({buf.dtype}): {err}") from None
    return buf.reshape(-1)


def _pixels(msg: Any, allowed: Sequence[str] | None = None,
            max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, str]:
    """The image as (H, W, C) uint8 or uint16 (native byte order), and its channel order. Validates everything."""
    enc = str(msg.encoding)
    if enc not in SUPPORTED_ENCODINGS or (allowed is not None and enc not in allowed):
        names = ", ".join(allowed if allowed is not None else SUPPORTED_ENCODINGS)
        raise ImageInputError(f"unsupported image encoding {enc!r}; supported: {names}")
    channels, depth, order = SUPPORTED_ENCODINGS[enc]
    h, w, step = _int_field(msg, "height"), _int_field(msg, "width"), _int_field(msg, "step")
    _check_pixels(w, h, max_pixels, "image")
    row = w * channels * depth
    if step < row:
        raise ImageInputError(f"image step {step} is smaller than a row of {w} px of {enc} ({row} bytes)")
    size = len(msg.data) if isinstance(msg.data, (bytes, bytearray)) else np.size(msg.data)
    if size != step * h:  # before any copy: the data must be exactly what the header says
        kind = "truncated" if size < step * h else "longer than expected"
        raise ImageInputError(f"image data is {kind}: {size} bytes for step {step} x height {h} "
                              f"(expected {step * h})")
    buf = _bytes(msg.data)
    rows = buf.reshape(h, step)[:, :row]
    if depth == 2:
        big = bool(msg.is_bigendian)
        arr = np.ascontiguousarray(rows).view(">u2" if big else "<u2").astype(np.uint16)
    else:
        arr = rows
    return arr.reshape(h, w, channels), order


def _to_rgb8(arr: np.ndarray, order: str) -> np.ndarray:
    if arr.dtype == np.uint16:  # full 16-bit range onto 8 bits, the same rule as the core's image input
        arr = (arr.astype(np.uint32) * 255 // 65535).astype(np.uint8)
    if order == "mono":
        return np.repeat(arr[:, :, :1], 3, axis=2)
    rgb = arr[:, :, :3]
    if order == "bgr":
        rgb = rgb[:, :, ::-1]
    return np.ascontiguousarray(rgb)


def image_from_msg(msg: Any, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """sensor_msgs/Image -> (H, W, 3) uint8 RGB. Handles row padding (`step`) and big-endian 16-bit data."""
    arr, order = _pixels(msg, max_pixels=max_pixels)
    rgb = _to_rgb8(arr, order)
    return rgb if rgb.flags.writeable and rgb.base is None else rgb.copy()  # never a view of the message buffer


def _open_compressed(data: bytes) -> Any:
    """PIL's lazy open: reads the header only. PIL's own decompression-bomb warning is ours to give (the size is
    checked against max_pixels next), so it never reaches stderr."""
    with _PIL_OPEN, warnings.catch_warnings():
        warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)
        return PILImage.open(io.BytesIO(data), formats=COMPRESSED_FORMATS)


def image_from_compressed(msg: Any, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """sensor_msgs/CompressedImage (JPEG, PNG) -> (H, W, 3) uint8 RGB. The size in the header is checked against
    `max_pixels` before anything is decoded."""
    fmt = str(getattr(msg, "format", ""))[:40]
    data = _bytes(msg.data).tobytes()
    if not data:
        raise ImageInputError(f"compressed image is empty (format {fmt!r})")
    try:
        img = _open_compressed(data)
    except PILImage.DecompressionBombError as err:
        raise ImageInputError(f"compressed image exceeds the limit of {max_pixels} pixels (parameter "
                              f"input.max_pixels): {err}") from None
    except Exception as err:  # noqa: BLE001 - a decoder fed hostile bytes may raise anything; it is bad input
        raise ImageInputError(f"cannot decode compressed image (format {fmt!r}, {len(data)} bytes; JPEG or PNG "
                              f"expected): {type(err).__name__}: {err}") from None
    with img:
        _check_pixels(img.width, img.height, max_pixels, "compressed image")
        try:
            img.load()  # decode now: a truncated stream only fails here
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(img).astype(np.uint32)
                return _to_rgb8(np.minimum(arr, 65535).astype(np.uint16)[:, :, None], "mono")
            return np.array(img.convert("RGB"))  # a writable copy
        except Exception as err:  # noqa: BLE001 - see above
            raise ImageInputError(f"cannot decode compressed image (format {fmt!r}, {len(data)} bytes, "
                                  f"{img.width}x{img.height} {img.format}): {type(err).__name__}: {err}") from None


def image_to_msg(rgb: np.ndarray, header: Any, encoding: str = "rgb8") -> Any:
    """(H, W, 3) uint8 RGB -> sensor_msgs/Image in `encoding` (rgb8, bgr8 or mono8), unpadded rows."""
    arr = np.asarray(rgb)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ImageInputError(f"image_to_msg needs (H, W, 3) uint8 RGB; got {arr.dtype} {arr.shape}")
    if encoding == "bgr8":
        arr = arr[:, :, ::-1]
    elif encoding == "mono8":
        arr = arr.mean(axis=2, dtype=np.float32).round().astype(np.uint8)[:, :, None]
    elif encoding != "rgb8":
        raise ImageInputError(f"image_to_msg encodes rgb8, bgr8 or mono8 (got {encoding!r})")
    h, w, c = arr.shape
    return _types()[M.IMAGE](header=header, height=h, width=w, encoding=encoding, is_bigendian=0, step=w * c,
                             data=np.ascontiguousarray(arr).reshape(-1))


def compressed_to_msg(rgb: np.ndarray, header: Any, fmt: str = "jpeg", quality: int = 90) -> Any:
    """(H, W, 3) uint8 RGB -> sensor_msgs/CompressedImage (`jpeg` or `png`)."""
    arr = np.asarray(rgb)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ImageInputError(f"compressed_to_msg needs (H, W, 3) uint8 RGB; got {arr.dtype} {arr.shape}")
    if fmt not in ("jpeg", "png"):
        raise ImageInputError(f"compressed format must be 'jpeg' or 'png' (got {fmt!r})")
    out = io.BytesIO()
    PILImage.fromarray(arr).save(out, format=fmt.upper(), **({"quality": quality} if fmt == "jpeg" else {}))
    return _types()[M.COMPRESSED_IMAGE](header=header, format=fmt,
                                        data=np.frombuffer(out.getvalue(), dtype=np.uint8).copy())


# ---------------------------------------------------------------------------------------------------------- regions
def _best_hypothesis(det: Any) -> tuple[str, float]:
    """(class_id, score) of the highest finite score (the first on ties); the first one if none is finite."""
    hyps = [(str(r.hypothesis.class_id), float(r.hypothesis.score)) for r in det.results]
    if not hyps:
        return "", math.nan
    finite = [h for h in hyps if math.isfinite(h[1])]
    return max(finite, key=lambda h: h[1]) if finite else hyps[0]


def regions_from_detections(msg: Any, width: int, height: int,
                            max_detections: int = MAX_DETECTIONS) -> list[RegionInput]:
    """vision_msgs/Detection2DArray -> one RegionInput per detection, in order (none is dropped).

    Centre/size become (x1, y1, x2, y2); a rotated box (finite theta != 0) becomes the axis-aligned box that holds
    the rotated one (its caption describes that box; the published bbox is it, with theta 0). A detection whose
    theta is NaN or infinite carries a refusal. The best hypothesis (highest finite score, else the first) gives
    class_id/score. `width`/`height` are the image's size; they are only checked here: clipping and refusal of
    unusable boxes are the captioner's documented rule. More than `max_detections` detections: RegionInputError.
    """
    if width < 1 or height < 1:
        raise ImageInputError(f"image size must be positive to place detections (got {width}x{height})")
    if len(msg.detections) > max_detections:
        raise RegionInputError(f"detection array holds {len(msg.detections)} detections, over the limit of "
                               f"{max_detections} per message; refused whole")
    regions = []
    for i, det in enumerate(msg.detections):
        b = det.bbox
        cx, cy = float(b.center.position.x), float(b.center.position.y)
        sx, sy, theta = float(b.size_x), float(b.size_y), float(b.center.theta)
        refusal = "" if math.isfinite(theta) else f"box angle theta is not finite ({theta}); the box cannot be placed"
        if theta and not refusal:
            c, s = abs(math.cos(theta)), abs(math.sin(theta))
            sx, sy = c * sx + s * sy, s * sx + c * sy
        box = (cx - sx / 2, cy - sy / 2, cx + sx / 2, cy + sy / 2)
        class_id, score = _best_hypothesis(det)
        regions.append(RegionInput(box=box, region_id=str(det.id), source_index=i, class_id=class_id, score=score,
                                   refusal=refusal))
    return regions


def labels_from_msg(msg: Any, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """An instance-mask image (mono8, 8UC1, mono16, 16UC1) -> (H, W) integer labels, 0 = background."""
    arr, _ = _pixels(msg, allowed=_MASK_ENCODINGS, max_pixels=max_pixels)
    return arr[:, :, 0]


def regions_from_instance_mask(msg: Any, max_regions: int | None = None,
                               max_pixels: int = DEFAULT_MAX_PIXELS) -> list[RegionInput]:
    """An instance-mask image -> one mask RegionInput per label != 0, by increasing label; `region_id` = label.

    Each mask is image-sized, so with `max_regions` only the largest labels (pixel count, ties by label) get one;
    the others carry the budget's refusal and no mask, so memory stays at `max_regions` masks whatever the labels.
    """
    labels = labels_from_msg(msg, max_pixels)
    counts = np.bincount(labels.reshape(-1), minlength=1)
    counts[0] = 0
    values = np.flatnonzero(counts)  # increasing label
    keep: set[int] | None = None
    ranks: dict[int, int] = {}
    if max_regions is not None and values.size > max_regions:
        order = values[np.argsort(-counts[values], kind="stable")]  # largest first, ties by label
        keep = {int(v) for v in order[:max_regions]}
        ranks = {int(v): r for r, v in enumerate(order[max_regions:], start=max_regions + 1)}
    out = []
    for k, v in enumerate(int(v) for v in values):
        if keep is None or v in keep:
            out.append(RegionInput(mask=labels == v, region_id=str(v), source_index=k))
        else:
            out.append(RegionInput(region_id=str(v), source_index=k,
                                   refusal=budget_refusal(int(max_regions or 0), int(values.size), ranks[v])))
    return out


def _bbox(box: Sequence[float]) -> Any:
    t = _types()
    x1, y1, x2, y2 = (float(v) for v in box)
    center = t["vision_msgs/msg/Pose2D"](position=t["vision_msgs/msg/Point2D"](x=(x1 + x2) / 2, y=(y1 + y2) / 2),
                                         theta=0.0)
    return t["vision_msgs/msg/BoundingBox2D"](center=center, size_x=x2 - x1, size_y=y2 - y1)


def detection_array_msg(header: Any, regions: Sequence[RegionInput]) -> Any:
    """Box regions -> vision_msgs/Detection2DArray (the inverse of `regions_from_detections` for unrotated boxes)."""
    t = _types()
    dets = []
    for reg in regions:
        if reg.box is None:
            raise ImageInputError("detection_array_msg needs box regions (a region has no box)")
        results = []
        if reg.class_id:
            pose = t["geometry_msgs/msg/PoseWithCovariance"](
                pose=t["geometry_msgs/msg/Pose"](position=t["geometry_msgs/msg/Point"](x=0.0, y=0.0, z=0.0),
                                                 orientation=t["geometry_msgs/msg/Quaternion"](x=0.0, y=0.0, z=0.0,
                                                                                               w=1.0)),
                covariance=np.zeros(36, dtype=np.float64))
            hyp = t["vision_msgs/msg/ObjectHypothesis"](class_id=reg.class_id,
                                                        score=float(reg.score) if math.isfinite(reg.score) else 0.0)
            results.append(t["vision_msgs/msg/ObjectHypothesisWithPose"](hypothesis=hyp, pose=pose))
        dets.append(t["vision_msgs/msg/Detection2D"](header=header, results=results, bbox=_bbox(reg.box),
                                                     id=reg.region_id))
    return t[M.DETECTION_ARRAY](header=header, detections=dets)


def caption_array_msg(result: FrameResult, header: Any, ages: Sequence[float] | None = None,
                      latency_ms: float | None = None) -> Any:
    """FrameResult -> pdlm_ros/RegionCaptionArray with `header` (the source image's header, copied).

    `ages` (seconds, one per region) marks how old each caption is (0 for fresh ones); `latency_ms` overrides the
    frame's inference time (default: `result.stats.latency_ms["total"]`).
    """
    t = _types()
    if ages is not None and len(ages) != len(result.regions):
        raise ValueError(f"ages has {len(ages)} entries for {len(result.regions)} regions")
    regions = []
    for k, r in enumerate(result.regions):
        regions.append(t[M.CAPTION](
            id=r.region_id, index=max(int(r.source_index if r.source_index >= 0 else r.index), 0),
            class_id=r.class_id, score=float(r.score), bbox=_bbox(r.box), caption=r.caption,
            confidence=float(r.confidence), cached=bool(r.cached), age=float(ages[k]) if ages is not None else 0.0,
            error=r.error))
    total = result.stats.latency_ms.get("total", 0.0) if latency_ms is None else latency_ms
    return t[M.CAPTION_ARRAY](header=header, nfe=int(result.stats.nfe),
                              tpf=float(result.stats.tpf), latency_ms=float(total), regions=regions)


def detections_from_yolo(msg: Any) -> Any:
    """A yolo_ros `yolo_msgs/DetectionArray` (an rclpy message: it is not in our typestore) -> the equivalent
    vision_msgs/Detection2DArray, so the rest of the node sees one detection type. Per detection: the tracker's `id`,
    `class_name` (else the numeric `class_id`) with `score` as the hypothesis, and the box's centre, size and angle.
    Header, order and ids are kept."""
    t = _types()
    stamp = int(msg.header.stamp.sec) * 1_000_000_000 + int(msg.header.stamp.nanosec)
    header = header_msg(stamp, str(msg.header.frame_id))
    dets = []
    for d in msg.detections:
        c, size = d.bbox.center, d.bbox.size
        bbox = t["vision_msgs/msg/BoundingBox2D"](
            center=t["vision_msgs/msg/Pose2D"](position=t["vision_msgs/msg/Point2D"](x=float(c.position.x),
                                                                                     y=float(c.position.y)),
                                               theta=float(c.theta)),
            size_x=float(size.x), size_y=float(size.y))
        hyp = t["vision_msgs/msg/ObjectHypothesis"](class_id=str(d.class_name or d.class_id), score=float(d.score))
        pose = t["geometry_msgs/msg/PoseWithCovariance"](
            pose=t["geometry_msgs/msg/Pose"](position=t["geometry_msgs/msg/Point"](x=0.0, y=0.0, z=0.0),
                                             orientation=t["geometry_msgs/msg/Quaternion"](x=0.0, y=0.0, z=0.0, w=1.0)),
            covariance=np.zeros(36, dtype=np.float64))
        dets.append(t["vision_msgs/msg/Detection2D"](
            header=header, results=[t["vision_msgs/msg/ObjectHypothesisWithPose"](hypothesis=hyp, pose=pose)],
            bbox=bbox, id=str(d.id)))
    return t[M.DETECTION_ARRAY](header=header, detections=dets)


def scale_regions(regions: Sequence[RegionInput], sx: float, sy: float) -> list[RegionInput]:
    """Boxes given in another image's pixels (a detector's resized network input) -> this image's pixels."""
    out = []
    for reg in regions:
        if reg.box is not None:
            x1, y1, x2, y2 = (float(v) for v in reg.box)
            reg = dataclasses.replace(reg, box=(x1 * sx, y1 * sy, x2 * sx, y2 * sy))
        out.append(reg)
    return out


def _color(rgb: tuple[int, int, int], a: float = 1.0) -> Any:
    return _types()["foxglove_msgs/msg/Color"](r=rgb[0] / 255.0, g=rgb[1] / 255.0, b=rgb[2] / 255.0, a=a)


def image_annotations_msg(regions: Sequence[RegionCaption], header: Any, font_size: float = 12.0) -> Any:
    """foxglove_msgs/ImageAnnotations for one frame: per region a closed box outline and a text label with its id
    and caption (its error when refused), stamped with the image's stamp so Foxglove draws them over that image.
    Colours follow `viz.track_color` (one per track id, red for refused regions), as in annotated_image."""
    from pdlm_ros.viz import track_color

    t = _types()
    point, stamp = t["foxglove_msgs/msg/Point2"], header.stamp
    outlines, texts = [], []
    for r in regions:
        if r.box is None or not all(math.isfinite(v) for v in r.box):
            continue
        x1, y1, x2, y2 = (float(v) for v in r.box)
        rgb = (255, 0, 0) if r.error else track_color(r.region_id, r.index)
        outlines.append(t["foxglove_msgs/msg/PointsAnnotation"](
            timestamp=stamp, type=t["foxglove_msgs/msg/PointsAnnotation"].LINE_LOOP,
            points=[point(x=x1, y=y1), point(x=x2, y=y1), point(x=x2, y=y2), point(x=x1, y=y2)],
            outline_color=_color(rgb), outline_colors=[], fill_color=_color(rgb, 0.0), thickness=2.0))
        head = f"{r.region_id}: " if r.region_id else ""
        text = f"{head}{r.error}" if r.error else f"{head}{r.caption}{' *' if r.cached else ''}"
        texts.append(t["foxglove_msgs/msg/TextAnnotation"](
            timestamp=stamp, position=point(x=x1, y=max(y1 - 2.0, font_size)), text=text, font_size=font_size,
            text_color=_color((255, 255, 255)), background_color=_color(rgb, 0.7)))
    return t[M.IMAGE_ANNOTATIONS](circles=[], points=outlines, texts=texts)
