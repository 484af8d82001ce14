"""Image, detection and instance-mask conversions, and their errors."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image as PILImage

from pdlm_ros.errors import ImageInputError
from pdlm_ros.ros import messages as M
from pdlm_ros.ros.convert import (compressed_to_msg, detection_array_msg, header_msg, image_from_compressed,
                                  image_from_msg, image_to_msg, regions_from_detections, regions_from_instance_mask,
                                  stamp_ns)
from pdlm_ros.types import RegionInput

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
HDR = header_msg(1_234_567_890_123, "cam")


def raw_image(pixels: np.ndarray, encoding: str, pad: int = 0, big: bool = False):
    """A sensor_msgs/Image with `pad` bytes of row padding, written the way a driver would."""
    h, w = pixels.shape[:2]
    row = pixels.reshape(h, -1)
    if pixels.dtype == np.uint16:
        row = row.astype(">u2" if big else "<u2").view(np.uint8).reshape(h, -1)
    data = np.concatenate([row, np.full((h, pad), 0xAB, np.uint8)], axis=1).reshape(-1)
    return M.typestore().types[M.IMAGE](header=HDR, height=h, width=w, encoding=encoding, is_bigendian=int(big),
                                        step=row.shape[1] + pad, data=data)


def test_stamp_round_trip():
    assert stamp_ns(HDR) == 1_234_567_890_123 and HDR.stamp.sec == 1234 and HDR.stamp.nanosec == 567_890_123


@pytest.mark.parametrize("encoding,make", [
    ("rgb8", lambda a: a), ("bgr8", lambda a: a[:, :, ::-1]), ("8UC3", lambda a: a[:, :, ::-1]),
    ("rgba8", lambda a: np.dstack([a, np.full(a.shape[:2], 9, np.uint8)])),
    ("bgra8", lambda a: np.dstack([a[:, :, ::-1], np.full(a.shape[:2], 9, np.uint8)])),
])
@pytest.mark.parametrize("pad", [0, 3])
def test_colour_encodings_with_padding(encoding, make, pad):
    out = image_from_msg(raw_image(np.ascontiguousarray(make(RGB)), encoding, pad=pad))
    assert out.dtype == np.uint8 and out.shape == (5, 7, 3)
    np.testing.assert_array_equal(out, RGB)


@pytest.mark.parametrize("encoding", ["mono8", "8UC1"])
def test_mono8(encoding):
    gray = RGB[:, :, 0]
    out = image_from_msg(raw_image(gray[:, :, None], encoding, pad=1))
    np.testing.assert_array_equal(out, np.dstack([gray] * 3))


@pytest.mark.parametrize("encoding", ["mono16", "16UC1"])
@pytest.mark.parametrize("big", [False, True])
def test_16bit_both_byte_orders(encoding, big):
    vals = np.array([[0, 257, 65535, 1000]], dtype=np.uint16)
    out = image_from_msg(raw_image(vals[:, :, None], encoding, pad=2, big=big))
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 255, 1000 * 255 // 65535])


def test_round_trip_through_image_to_msg():
    for enc in ("rgb8", "bgr8"):
        np.testing.assert_array_equal(image_from_msg(image_to_msg(RGB, HDR, enc)), RGB)
    assert image_to_msg(RGB, HDR).header.frame_id == "cam"


def test_unsupported_encoding():
    msg = raw_image(RGB, "rgb8")
    msg.encoding = "yuv422"
    with pytest.raises(ImageInputError, match="unsupported image encoding 'yuv422'"):
        image_from_msg(msg)


def test_step_smaller_than_row():
    msg = raw_image(RGB, "rgb8")
    msg.step = 7 * 3 - 1
    with pytest.raises(ImageInputError, match="step 20 is smaller than a row"):
        image_from_msg(msg)


def test_truncated_and_oversized_data():
    msg = raw_image(RGB, "rgb8")
    msg.data = msg.data[:-5]
    with pytest.raises(ImageInputError, match=r"truncated: 100 bytes .*\(expected 105\)"):
        image_from_msg(msg)
    msg.data = np.zeros(200, np.uint8)
    with pytest.raises(ImageInputError, match="longer than expected"):
        image_from_msg(msg)


def test_absurd_size():
    msg = raw_image(RGB, "rgb8")
    msg.width = 0
    with pytest.raises(ImageInputError, match="size 0x5 is out of range"):
        image_from_msg(msg)


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_compressed_round_trip(fmt):
    img = np.kron(RGB, np.ones((8, 8, 1), np.uint8))  # smooth enough for JPEG
    back = image_from_compressed(compressed_to_msg(img, HDR, fmt))
    assert back.shape == img.shape
    tol = 0 if fmt == "png" else 40
    assert np.abs(back.astype(int) - img.astype(int)).mean() <= tol


def test_compressed_16bit_png():
    buf = io.BytesIO()
    PILImage.fromarray(np.array([[0, 65535]], dtype=np.uint16)).save(buf, format="PNG")
    msg = M.typestore().types[M.COMPRESSED_IMAGE](header=HDR, format="png",
                                                  data=np.frombuffer(buf.getvalue(), np.uint8))
    np.testing.assert_array_equal(image_from_compressed(msg)[0, :, 0], [0, 255])


def test_corrupt_and_truncated_compressed():
    msg = compressed_to_msg(RGB, HDR, "jpeg")
    bad = M.typestore().types[M.COMPRESSED_IMAGE](header=HDR, format="jpeg", data=np.arange(50, dtype=np.uint8))
    with pytest.raises(ImageInputError, match="cannot decode compressed image"):
        image_from_compressed(bad)
    cut = M.typestore().types[M.COMPRESSED_IMAGE](header=HDR, format="jpeg", data=msg.data[: len(msg.data) // 2])
    with pytest.raises(ImageInputError, match="cannot decode compressed image"):
        image_from_compressed(cut)
    empty = M.typestore().types[M.COMPRESSED_IMAGE](header=HDR, format="png", data=np.zeros(0, np.uint8))
    with pytest.raises(ImageInputError, match="compressed image is empty"):
        image_from_compressed(empty)


def test_detections_to_regions_keeps_bad_boxes():
    regions = [RegionInput(box=(10, 20, 30, 60), region_id="track-3", class_id="cup", score=0.8),
               RegionInput(box=(math.nan, 0, 5, 5), region_id="nan"),
               RegionInput(box=(500, 500, 520, 530), region_id="outside")]
    msg = detection_array_msg(HDR, regions)
    out = regions_from_detections(msg, 64, 48)
    assert [r.region_id for r in out] == ["track-3", "nan", "outside"]
    assert [r.source_index for r in out] == [0, 1, 2]
    assert out[0].box == (10, 20, 30, 60) and out[0].class_id == "cup" and out[0].score == 0.8
    assert math.isnan(out[1].box[0]) and out[1].class_id == "" and math.isnan(out[1].score)
    assert out[2].box == (500, 500, 520, 530)  # kept: the captioner refuses it with an error
    assert regions_from_detections(detection_array_msg(HDR, []), 64, 48) == []
    with pytest.raises(ImageInputError, match="image size must be positive"):
        regions_from_detections(msg, 0, 48)


def test_best_hypothesis_and_rotated_box():
    msg = detection_array_msg(HDR, [RegionInput(box=(0, 0, 20, 10), region_id="a", class_id="x", score=0.2)])
    det = msg.detections[0]
    second = type(det.results[0])(hypothesis=type(det.results[0].hypothesis)(class_id="y", score=0.9),
                                  pose=det.results[0].pose)
    det.results.append(second)
    det.bbox.center.theta = math.pi / 2
    (r,) = regions_from_detections(msg, 64, 48)
    assert r.class_id == "y" and r.score == 0.9
    assert np.allclose(r.box, (5, -5, 15, 15))  # 20x10 turned by 90 degrees about (10, 5)


def test_instance_mask_regions():
    labels = np.zeros((6, 8), np.uint16)
    labels[1:3, 1:4] = 7
    labels[4:6, 5:8] = 300
    for enc, arr in (("mono16", labels), ("16UC1", labels)):
        regions = regions_from_instance_mask(raw_image(arr[:, :, None], enc, big=True))
        assert [r.region_id for r in regions] == ["7", "300"] and [r.source_index for r in regions] == [0, 1]
        np.testing.assert_array_equal(regions[0].mask, labels == 7)
    small = (labels == 7).astype(np.uint8) * 3
    (r,) = regions_from_instance_mask(raw_image(small[:, :, None], "mono8"))
    assert r.region_id == "3" and r.mask.sum() == 6
    with pytest.raises(ImageInputError, match="unsupported image encoding 'rgb8'"):
        regions_from_instance_mask(raw_image(RGB, "rgb8"))


def test_yolo_detection_array_becomes_detection2darray():
    """yolo_ros' DetectionArray, by the attribute paths of its published definition (yolo_msgs 4.x): header,
    detections[].{class_id, class_name, score, id, bbox.center.position.x/y, bbox.center.theta, bbox.size.x/y}."""
    from types import SimpleNamespace as NS

    from pdlm_ros.ros.convert import detections_from_yolo, regions_from_detections

    def det(i, cls, name, x, y, w, h):
        return NS(class_id=cls, class_name=name, score=0.8, id=i,
                  bbox=NS(center=NS(position=NS(x=x, y=y), theta=0.0), size=NS(x=w, y=h)))

    msg = NS(header=NS(stamp=NS(sec=12, nanosec=500), frame_id="cam"),
             detections=[det("7", 2, "car", 30.0, 20.0, 20.0, 10.0), det("", 0, "", 5.0, 5.0, 4.0, 4.0)])
    out = detections_from_yolo(msg)
    assert out.__msgtype__ == M.DETECTION_ARRAY and out.header.stamp.sec == 12 and out.header.stamp.nanosec == 500
    assert out.header.frame_id == "cam"
    regions = regions_from_detections(out, 100, 100)
    assert [r.region_id for r in regions] == ["7", ""] and [r.class_id for r in regions] == ["car", "0"]
    assert regions[0].box == (20.0, 15.0, 40.0, 25.0) and regions[0].score == pytest.approx(0.8)


def _png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of width x height, all black, built row by row (small whatever its size)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    z = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _peak_rss_growth(fn) -> int:
    """Bytes the process's peak RSS rose during fn() (C allocations too: PIL's decoder), Linux only."""
    import re
    from pathlib import Path

    def kib(field: str) -> int:
        return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))

    try:
        Path("/proc/self/clear_refs").write_text("5")  # the peak starts again from the current RSS
    except OSError:
        pytest.skip("peak RSS cannot be reset here (needs Linux /proc/self/clear_refs)")
    before = kib("VmRSS")
    fn()
    return (kib("VmHWM") - before) * 1024


def test_compressed_size_is_checked_before_decoding(recwarn):
    """A 12000x12000 PNG of a few KB decoded to 1.5 GB of RSS, and PIL's DecompressionBombWarning reached stderr."""
    data = _png(12000, 12000)
    assert len(data) < 200_000
    msg = M.typestore().types[M.COMPRESSED_IMAGE](header=HDR, format="png", data=np.frombuffer(data, np.uint8))

    def convert():
        with pytest.raises(ImageInputError, match=r"12000x12000 px \(144000000 pixels\) exceeds the limit of "
                                                  r"50000000 pixels \(parameter input.max_pixels\)"):
            image_from_compressed(msg)

    assert _peak_rss_growth(convert) < 32 * 2**20  # the header was read, not the 144 MP of pixels
    assert [w for w in recwarn if issubclass(w.category, PILImage.DecompressionBombWarning)] == []
    small = M.typestore().types[M.COMPRESSED_IMAGE](header=HDR, format="png",
                                                    data=np.frombuffer(_png(64, 48), np.uint8))
    assert image_from_compressed(small, max_pixels=64 * 48).shape == (48, 64, 3)
    with pytest.raises(ImageInputError, match="64x48 px"):
        image_from_compressed(small, max_pixels=64 * 48 - 1)


def test_compressed_formats_other_than_jpeg_and_png_are_refused():
    out = io.BytesIO()
    PILImage.fromarray(RGB).save(out, format="BMP")
    msg = M.typestore().types[M.COMPRESSED_IMAGE](header=HDR, format="bmp",
                                                  data=np.frombuffer(out.getvalue(), np.uint8))
    with pytest.raises(ImageInputError, match="JPEG or PNG expected"):
        image_from_compressed(msg)


def test_raw_image_over_max_pixels_is_refused_before_copying():
    msg = raw_image(RGB, "rgb8")
    with pytest.raises(ImageInputError, match=r"7x5 px \(35 pixels\) exceeds the limit of 34 pixels"):
        image_from_msg(msg, max_pixels=34)
    assert image_from_msg(msg, max_pixels=35).shape == (5, 7, 3)


def test_non_finite_theta_is_a_refusal_and_too_many_detections_a_refused_message():
    from pdlm_ros.errors import RegionInputError

    msg = detection_array_msg(HDR, [RegionInput(box=(1, 1, 5, 5)), RegionInput(box=(1, 1, 5, 5))])
    msg.detections[0].bbox.center.theta = math.nan
    first, second = regions_from_detections(msg, 10, 10)
    assert "theta is not finite (nan)" in first.refusal and second.refusal == ""
    with pytest.raises(RegionInputError, match="holds 2 detections, over the limit of 1 per message"):
        regions_from_detections(msg, 10, 10, max_detections=1)


def test_instance_mask_over_the_budget_makes_masks_only_for_the_largest_labels():
    labels = np.zeros((6, 8), np.uint8)
    labels[0, :3], labels[1, :5], labels[2, :1], labels[3, :5] = 4, 9, 2, 3  # sizes 3, 5, 1, 5
    regions = regions_from_instance_mask(raw_image(labels, "mono8"), max_regions=2)
    assert [r.region_id for r in regions] == ["2", "3", "4", "9"]  # all labels, in order
    assert [r.mask is not None for r in regions] == [False, True, False, True]  # the two largest (5 and 5)
    assert regions[0].refusal.endswith("ranked 4") and regions[2].refusal.endswith("ranked 3")
