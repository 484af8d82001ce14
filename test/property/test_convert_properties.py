"""Properties of the message conversions: whatever the field values of an Image, CompressedImage or
Detection2DArray, the conversion returns a valid result or raises the package's own error, and never allocates
more than a bound derived from the limits (the size of the message itself, `max_pixels`, MAX_DETECTIONS)."""

from __future__ import annotations

import io
import math
import struct
import zlib

import numpy as np
from hypothesis import assume, given
from hypothesis import strategies as st
from PIL import Image as PILImage

from pdlm_ros.errors import ImageInputError, PDLMError, RegionInputError
from pdlm_ros.region_rules import MIN_REGION_SIDE, prepare_regions, select_within_budget
from pdlm_ros.ros import messages as M
from pdlm_ros.ros.convert import (MAX_DETECTIONS, SUPPORTED_ENCODINGS, detection_array_msg, header_msg,
                                  image_from_compressed, image_from_msg, regions_from_detections,
                                  regions_from_instance_mask)
from pdlm_ros.types import RegionInput

from .conftest import traced_peak

HDR = header_msg(1_000, "cam")
U32 = st.integers(0, 2**32 - 1)
FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=64)
SLACK = 256 * 1024  # numpy and Python bookkeeping of one call


def _image(**fields):
    return M.typestore().types[M.IMAGE](header=HDR, **fields)


@st.composite
def image_messages(draw):
    """Mostly near-consistent headers (so the success path and every size check are reached), some arbitrary."""
    enc = draw(st.one_of(st.sampled_from(sorted(SUPPORTED_ENCODINGS)), st.text(max_size=10)))
    if draw(st.booleans()):
        h, w, step = draw(U32), draw(U32), draw(U32)
        data = draw(st.binary(max_size=2048))
    else:
        channels, depth, _ = SUPPORTED_ENCODINGS.get(enc, (3, 1, "rgb"))
        h, w = draw(st.integers(0, 40)), draw(st.integers(0, 40))
        step = w * channels * depth + draw(st.integers(-3, 8))
        size = max(step * h + draw(st.sampled_from([0, 0, 0, -1, 1, -step, 7])), 0)
        data = draw(st.binary(min_size=size, max_size=size)) if size <= 20_000 else b""
    return _image(height=h, width=w, encoding=enc, is_bigendian=draw(st.integers(0, 255)), step=step,
                  data=np.frombuffer(data, dtype=np.uint8))


@given(image_messages(), st.integers(1, 2_000))
def test_raw_images_convert_or_raise_image_input_error_within_a_bound(msg, max_pixels):
    out, err, peak = traced_peak(lambda: image_from_msg(msg, max_pixels=max_pixels))
    assert err is None or isinstance(err, ImageInputError), repr(err)
    # Every copy is of the pixels the data holds: a few times the message's own bytes, never its claimed size.
    assert peak <= 8 * len(msg.data) + SLACK, (peak, len(msg.data), msg.height, msg.width, msg.step)
    if err is None:
        assert out.shape == (msg.height, msg.width, 3) and out.dtype == np.uint8 and out.flags.writeable
        assert msg.height * msg.width <= max_pixels


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


@st.composite
def compressed_payloads(draw):
    """Real small JPEG/PNG (maybe truncated), headers claiming any size over garbage, or plain garbage."""
    kind = draw(st.sampled_from(["real", "png_header", "jpeg_header", "garbage"]))
    if kind == "real":
        h, w = draw(st.integers(1, 24)), draw(st.integers(1, 24))
        mode = draw(st.sampled_from(["RGB", "L", "RGBA", "I;16", "P", "1"]))
        fmt = draw(st.sampled_from(["PNG", "JPEG"])) if mode in ("RGB", "L") else "PNG"
        arr = np.frombuffer(draw(st.binary(min_size=h * w * 4, max_size=h * w * 4)), np.uint8)
        img = PILImage.fromarray(arr[:h * w * 3].reshape(h, w, 3)).convert(mode if mode != "I;16" else "L")
        if mode == "I;16":
            img = PILImage.fromarray((np.asarray(img).astype(np.uint16) * 257))
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        data = buf.getvalue()
        cut = draw(st.integers(0, len(data)))
        return data if draw(st.booleans()) else data[:cut]
    w, h = draw(U32), draw(U32)
    tail = draw(st.binary(max_size=256))
    if kind == "png_header":
        ihdr = struct.pack(">IIBBBBB", w, h, draw(st.sampled_from([1, 8, 16])), draw(st.sampled_from([0, 2, 6])),
                           0, 0, 0)
        return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", tail)
    if kind == "jpeg_header":
        sof = struct.pack(">BHHB", 8, h & 0xFFFF, w & 0xFFFF, 3) + bytes([1, 0x11, 0, 2, 0x11, 0, 3, 0x11, 0])
        return b"\xff\xd8" + b"\xff\xc0" + struct.pack(">H", len(sof) + 2) + sof + tail
    return draw(st.binary(max_size=512))


@given(compressed_payloads(), st.text(max_size=8), st.integers(1, 4096))
def test_compressed_images_decode_or_raise_image_input_error_within_the_pixel_limit(rss_probe, data, fmt,
                                                                                     max_pixels):
    msg = M.typestore().types[M.COMPRESSED_IMAGE](header=HDR, format=fmt, data=np.frombuffer(data, np.uint8))
    out, err, grown = rss_probe(lambda: image_from_compressed(msg, max_pixels=max_pixels))
    assert err is None or isinstance(err, ImageInputError), repr(err)
    # A header may claim 4 billion pixels a side; the decoder never runs past max_pixels (16-bit RGBA at worst).
    assert grown <= 16 * max_pixels + 32 * 2**20, grown
    if err is None:
        assert out.ndim == 3 and out.shape[2] == 3 and out.dtype == np.uint8
        assert out.shape[0] * out.shape[1] <= max_pixels


def test_a_claimed_size_over_the_limit_is_refused_before_decoding(rss_probe):
    """A valid 1-bit PNG of 20000x20000 (400 MP, 8-bit RGB would be 1.2 GB): refused from its header."""
    z = zlib.compressobj(9)
    row = b"\x00" * (1 + 20000 // 8)
    idat = b"".join(z.compress(row) for _ in range(20000)) + z.flush()
    data = (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 1, 0, 0, 0, 0))
            + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))
    msg = M.typestore().types[M.COMPRESSED_IMAGE](header=HDR, format="png", data=np.frombuffer(data, np.uint8))
    _, err, grown = rss_probe(lambda: image_from_compressed(msg))
    assert isinstance(err, ImageInputError) and "exceeds the limit of 50000000 pixels" in str(err)
    assert grown < 32 * 2**20


@st.composite
def detection_arrays(draw):
    n = draw(st.integers(0, 24))
    msg = detection_array_msg(HDR, [RegionInput(box=(0.0, 0.0, 1.0, 1.0), class_id="c") for _ in range(n)])
    for det in msg.detections:
        det.bbox.center.position.x, det.bbox.center.position.y = draw(FLOATS), draw(FLOATS)
        det.bbox.center.theta = draw(st.one_of(st.just(0.0), FLOATS))
        det.bbox.size_x, det.bbox.size_y = draw(FLOATS), draw(FLOATS)
        det.id = draw(st.text(max_size=6))
        det.results[0].hypothesis.class_id = draw(st.text(max_size=6))
        det.results[0].hypothesis.score = draw(FLOATS)
        if draw(st.booleans()):
            det.results = []
    return msg


def _usable_box(box, width, height) -> bool:
    x1, y1, x2, y2 = box
    return (all(math.isfinite(v) for v in box) and 0 <= x1 and 0 <= y1 and x2 <= width and y2 <= height
            and x2 - x1 >= MIN_REGION_SIDE and y2 - y1 >= MIN_REGION_SIDE)


@given(detection_arrays(), st.integers(-2, 300), st.integers(-2, 300), st.integers(1, 8), st.integers(0, 30))
def test_detection_arrays_give_one_region_each_and_the_rules_never_raise(msg, width, height, budget, limit):
    n = len(msg.detections)
    regions, err, peak = traced_peak(lambda: regions_from_detections(msg, width, height, max_detections=limit))
    if err is not None:
        assert isinstance(err, (ImageInputError, RegionInputError)), repr(err)
        assert width < 1 or height < 1 or n > limit
        return
    assert peak <= 4096 * n + SLACK  # a RegionInput per detection, nothing proportional to any field's value
    assert len(regions) == n and [r.source_index for r in regions] == list(range(n))
    prepared, errors = prepare_regions(regions, width, height)
    kept, over = select_within_budget(prepared, regions, budget)
    assert len(kept) == min(budget, len(prepared))
    assert set(errors) | {p.index for p in prepared} == set(range(n)) and not set(errors) & {p.index for p in
                                                                                              prepared}
    assert set(over) <= {p.index for p in prepared} and len(over) == len(prepared) - len(kept)
    assert all(_usable_box(p.box, width, height) for p in prepared)
    assert all(errors[i] for i in errors) and all(over[i].startswith("over the per-frame region budget") for i in over)
    for i, r in enumerate(regions):
        if r.refusal:
            assert i in errors and "theta" in errors[i]
    scores = [regions[p.index].score for p in kept if math.isfinite(regions[p.index].score)]
    left_out = [regions[i].score for i in over if math.isfinite(regions[i].score)]
    if left_out:  # a scored region left out: every kept one is scored at least as high
        assert len(scores) == len(kept) and min(scores) >= max(left_out)


def test_a_huge_detection_array_is_refused_before_any_per_detection_work():
    msg = detection_array_msg(HDR, [RegionInput(box=(1.0, 1.0, 5.0, 5.0))])
    msg.detections = msg.detections * (MAX_DETECTIONS + 1)  # one object many times: the size is what counts
    _, err, peak = traced_peak(lambda: regions_from_detections(msg, 64, 48))
    assert isinstance(err, RegionInputError) and f"over the limit of {MAX_DETECTIONS}" in str(err)
    assert peak < SLACK


@st.composite
def label_images(draw):
    h, w = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    enc = draw(st.sampled_from(["mono8", "8UC1", "mono16", "16UC1"]))
    wide = enc in ("mono16", "16UC1")
    top = draw(st.sampled_from([3, 300, 65535] if wide else [3, 40, 255]))
    labels = np.array(draw(st.lists(st.integers(0, top), min_size=h * w, max_size=h * w)),
                      dtype=np.uint16 if wide else np.uint8).reshape(h, w)
    data = labels.astype("<u2").view(np.uint8) if wide else labels
    return _image(height=h, width=w, encoding=enc, is_bigendian=0, step=data.shape[1], data=data.reshape(-1)), labels


@given(label_images(), st.integers(1, 6))
def test_instance_masks_make_at_most_budget_masks(image_and_labels, budget):
    msg, labels = image_and_labels
    regions, err, peak = traced_peak(lambda: regions_from_instance_mask(msg, max_regions=budget))
    assert err is None, repr(err)
    values = sorted(set(np.unique(labels).tolist()) - {0})
    assert [r.region_id for r in regions] == [str(v) for v in values]  # every label, in order
    masks = [r for r in regions if r.mask is not None]
    assert len(masks) == min(budget, len(values))
    assert all(r.refusal.startswith("over the per-frame region budget") for r in regions if r.mask is None)
    area = {v: int((labels == v).sum()) for v in values}
    if len(masks) < len(values):
        assert min(area[int(r.region_id)] for r in masks) >= max(area[int(r.region_id)] for r in regions
                                                                 if r.mask is None)
    hw = labels.size
    assert peak <= (budget + 4) * hw * 8 + 65536 * 8 + SLACK  # the masks kept, the label counts, the copies


@given(st.lists(st.one_of(
    st.tuples(FLOATS, FLOATS, FLOATS, FLOATS),
    st.lists(st.one_of(FLOATS, st.text(max_size=3), st.none()), max_size=6),
    st.none()), max_size=20), st.integers(1, 64), st.integers(1, 64), st.integers(1, 5))
def test_region_rules_refuse_with_reasons_and_keep_every_region(boxes, width, height, budget):
    regions = [RegionInput(box=b if b is None else tuple(b), score=float(k % 3) if k % 2 else math.nan)
               for k, b in enumerate(boxes)]
    try:
        prepared, errors = prepare_regions(regions, width, height)
        kept, over = select_within_budget(prepared, regions, budget)
    except PDLMError as err:
        raise AssertionError(f"the rules raised {err!r}") from None
    assume(regions)
    assert sorted([*errors, *(p.index for p in prepared)]) == list(range(len(regions)))
    assert all(_usable_box(p.box, width, height) for p in prepared) and len(kept) <= budget
    assert [p.index for p in kept] == sorted(p.index for p in kept)  # request order
