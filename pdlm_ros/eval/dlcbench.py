"""Reader for the DLC-Bench folder format (DAM's detailed localized captioning benchmark).

Layout (HF dataset nvidia/DLC-Bench):
    annotations.json    COCO: images [{id, file_name, height, width}], annotations [{id, image_id, segmentation,
                        bbox, category_id}]; `segmentation` is RLE (counts as a list or COCO's compressed string)
                        or polygons [[x1, y1, x2, y2, ...], ...]
    class_names.json    {ann_id: class name}
    qa.json             {ann_id: [{question, choices: [[text, score], ...], type: positive|negative, subtype?}]}
    images/             the image files
(`annotations.json`, `class_names.json` and `qa.json` may also sit in an `annotations/` subfolder.)

COCO RLE is decoded here because pycocotools is not a dependency (it needs a C build): the format is small and
fully specified (column-major runs starting with background; the string form is pycocotools' 6-bit variable-length
code with deltas from the count two places back).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from pdlm_ros.errors import DatasetError
from pdlm_ros.eval.questions import Question

__all__ = [
    "DLCBench",
    "DLCBenchItem",
    "DLCBenchSample",
    "rle_decode",
    "rle_encode",
    "rle_counts_from_string",
    "rle_counts_to_string",
    "polygons_to_mask",
    "decode_segmentation",
]


# ------------------------------------------------------------------------------------------------------------- RLE
def rle_counts_from_string(text: str) -> list[int]:
    """Decode pycocotools' compressed counts string (6-bit chars from '0'; 5 payload bits, 0x20 = more follows,
    0x10 in the last char = negative; every count after the second is a delta from the count two places back)."""
    counts: list[int] = []
    p = 0
    while p < len(text):
        value, shift, more = 0, 0, True
        while more:
            if p >= len(text):
                raise DatasetError(f"truncated RLE string at char {p}: {text[:40]!r}")
            c = ord(text[p]) - 48
            if not 0 <= c < 64:
                raise DatasetError(f"invalid RLE character {text[p]!r} at {p}")
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            p += 1
            shift += 5
            if not more and c & 0x10:
                value |= -1 << shift  # sign-extend
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def rle_counts_to_string(counts: Sequence[int]) -> str:
    """Encode counts the way pycocotools does (the inverse of `rle_counts_from_string`)."""
    out = []
    for i, count in enumerate(counts):
        x = int(count) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def rle_decode(rle: dict[str, Any], height: int | None = None, width: int | None = None) -> np.ndarray:
    """A COCO RLE dict {"size": [h, w], "counts": list | str} -> (h, w) bool mask."""
    try:
        h, w = (int(v) for v in rle["size"])
        counts = rle["counts"]
    except (KeyError, TypeError, ValueError) as err:
        raise DatasetError(f"RLE needs 'size' [h, w] and 'counts' (got keys {sorted(rle)!r})") from err
    if (height is not None and h != height) or (width is not None and w != width):
        raise DatasetError(f"RLE size {h}x{w} does not match the image {height}x{width}")
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    if isinstance(counts, str):
        counts = rle_counts_from_string(counts)
    elif not isinstance(counts, list) or not all(isinstance(c, int) for c in counts):
        raise DatasetError("RLE counts must be a list of ints or a compressed string")
    if any(c < 0 for c in counts) or sum(counts) != h * w:
        raise DatasetError(f"RLE counts sum to {sum(counts)} with negative runs {any(c < 0 for c in counts)}; "
                           f"expected {h * w} pixels for size {h}x{w}")
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True  # runs alternate background, foreground, ...
    flat = np.repeat(values, counts)
    return flat.reshape(w, h).T.copy()  # COCO runs are column-major


def rle_encode(mask: np.ndarray, compressed: bool = True) -> dict[str, Any]:
    """(h, w) bool mask -> COCO RLE dict; counts as the compressed string or as a list."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise DatasetError(f"mask must be 2-D (got shape {mask.shape})")
    flat = mask.T.reshape(-1)
    edges = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    bounds = np.concatenate([[0], edges, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])],
            "counts": rle_counts_to_string(counts) if compressed else counts}


def polygons_to_mask(polygons: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """COCO polygons (flat [x1, y1, x2, y2, ...] lists, unioned) -> (h, w) bool mask."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for poly in polygons:
        if len(poly) < 6 or len(poly) % 2:
            raise DatasetError(f"a polygon needs >= 3 (x, y) pairs (got {len(poly)} numbers)")
        draw.polygon([(float(poly[i]), float(poly[i + 1])) for i in range(0, len(poly), 2)], fill=1)
    return np.asarray(canvas, dtype=bool)


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Any COCO `segmentation` (RLE dict or polygon list) -> (h, w) bool mask."""
    if isinstance(segmentation, dict):
        return rle_decode(segmentation, height, width)
    if isinstance(segmentation, list) and segmentation and all(isinstance(p, list) for p in segmentation):
        return polygons_to_mask(segmentation, height, width)
    raise DatasetError(f"unsupported segmentation of type {type(segmentation).__name__}; expected an RLE dict or "
                       "a list of polygons")


# ----------------------------------------------------------------------------------------------------------- reader
@dataclass(frozen=True)
class DLCBenchItem:
    """One benchmark region, without pixels (they are read on demand)."""

    ann_id: str
    image_file: str  # path relative to the images/ folder
    height: int
    width: int
    segmentation: Any
    class_name: str
    questions: list[Question]


@dataclass(frozen=True)
class DLCBenchSample:
    """One benchmark region with pixels: image (H, W, 3) uint8 RGB and mask (H, W) bool."""

    image: np.ndarray
    mask: np.ndarray
    ann_id: str
    class_name: str
    questions: list[Question]


def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise DatasetError(f"DLC-Bench file missing: {path}")
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise DatasetError(f"DLC-Bench file {path} is not valid JSON: {err}") from err


def _find(root: Path, name: str) -> Path:
    for candidate in (root / name, root / "annotations" / name):
        if candidate.is_file():
            return candidate
    return root / name  # reported as missing by _load_json


def _question(ann_id: str, raw: Any) -> Question:
    try:
        kind = raw["type"]
        choices = [(str(text), float(score)) for text, score in raw["choices"]]
        text = str(raw["question"])
    except (KeyError, TypeError, ValueError) as err:
        raise DatasetError(f"qa.json entry for annotation {ann_id} is malformed ({err}): {str(raw)[:200]}") from err
    if kind not in ("positive", "negative") or not choices:
        raise DatasetError(f"qa.json entry for annotation {ann_id}: type must be positive or negative and choices "
                           f"non-empty (got type {kind!r}, {len(choices)} choices)")
    return Question(kind=kind, attribute="", value="", text=text, choices=choices, subtype=str(raw.get("subtype", "")))


class DLCBench:
    """A DLC-Bench folder. Regions are the annotations listed in qa.json, in qa.json order."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"DLC-Bench folder not found: {self.root}")
        coco = _load_json(_find(self.root, "annotations.json"))
        names = _load_json(_find(self.root, "class_names.json"))
        qa = _load_json(_find(self.root, "qa.json"))
        if not isinstance(coco, dict) or not isinstance(names, dict) or not isinstance(qa, dict):
            raise DatasetError(f"{self.root}: annotations.json, class_names.json and qa.json must be JSON objects")
        try:
            images = {int(im["id"]): im for im in coco["images"]}
            anns = {str(a["id"]): a for a in coco["annotations"]}
        except (KeyError, TypeError, ValueError) as err:
            raise DatasetError(f"{self.root}/annotations.json is not COCO format (needs images[].id and "
                               f"annotations[].id): {err}") from err
        self.images_dir = self.root / "images"
        items = []
        for ann_id, raw_questions in qa.items():
            ann = anns.get(str(ann_id))
            if ann is None:
                raise DatasetError(f"qa.json names annotation {ann_id}, which annotations.json lacks")
            if str(ann_id) not in names:
                raise DatasetError(f"class_names.json has no class for annotation {ann_id}")
            if not isinstance(raw_questions, list):
                raise DatasetError(f"qa.json entry for annotation {ann_id} must be a list of questions")
            try:
                image = images[int(ann["image_id"])]
                file_name, height, width = str(image["file_name"]), int(image["height"]), int(image["width"])
                segmentation = ann["segmentation"]
            except (KeyError, TypeError, ValueError) as err:
                raise DatasetError(f"annotation {ann_id}: missing image or segmentation ({err})") from err
            items.append(DLCBenchItem(ann_id=str(ann_id), image_file=file_name, height=height, width=width,
                                      segmentation=segmentation, class_name=str(names[str(ann_id)]),
                                      questions=[_question(str(ann_id), q) for q in raw_questions]))
        self.items: list[DLCBenchItem] = items

    def __len__(self) -> int:
        return len(self.items)

    def load_image(self, item: DLCBenchItem) -> np.ndarray:
        path = self.images_dir / item.image_file
        if not path.is_file():
            raise DatasetError(f"DLC-Bench image missing: {path}")
        try:
            with Image.open(path) as im:
                image = np.array(im.convert("RGB"))  # a writable copy: torch.from_numpy warns on read-only
        except OSError as err:
            raise DatasetError(f"cannot read DLC-Bench image {path}: {err}") from err
        if image.shape[:2] != (item.height, item.width):
            raise DatasetError(f"{path} is {image.shape[1]}x{image.shape[0]} but annotations.json says "
                               f"{item.width}x{item.height}")
        return image

    def mask(self, item: DLCBenchItem) -> np.ndarray:
        try:
            return decode_segmentation(item.segmentation, item.height, item.width)
        except DatasetError as err:
            raise DatasetError(f"annotation {item.ann_id}: {err}") from err

    def __iter__(self) -> Iterator[DLCBenchSample]:
        for image_file, image, items in self.frames():
            for item in items:
                yield DLCBenchSample(image=image, mask=self.mask(item), ann_id=item.ann_id,
                                     class_name=item.class_name, questions=item.questions)

    def frames(self, limit: int | None = None) -> Iterator[tuple[str, np.ndarray, list[DLCBenchItem]]]:
        """(image file, image, its regions) per image, first `limit` regions only; each image is read once."""
        chosen = self.items if limit is None else self.items[:limit]
        groups: dict[str, list[DLCBenchItem]] = {}
        for item in chosen:
            groups.setdefault(item.image_file, []).append(item)
        for image_file, items in groups.items():
            yield image_file, self.load_image(items[0]), items
