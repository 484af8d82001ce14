"""Readers for the two published region-captioning benchmarks, in their official file formats, as they are.

DLC-Bench (DAM; HF dataset nvidia/DLC-Bench, also in PerceptionDLM's evaluation/DLCBench/annotations):
    annotations.json    COCO: images [{id, file_name, height, width}], annotations [{id, image_id, segmentation,
                        bbox, category_id}]; `segmentation` is RLE (counts as a list or COCO's compressed string)
                        or polygons [[x1, y1, x2, y2, ...], ...]
    class_names.json    {ann_id: class name}
    qa.json             {ann_id: [{question, choices: [[text, score], ...], type: positive|negative, subtype?}]}
ParaDLC-Bench (PerceptionDLM's evaluation/ParaDLC-Bench/annotations, HF dataset MSALab/ParaDLC-Bench):
    annotations.json    a list of images [{image_id, file_name, height, width, annotations: [{index, category_name,
                        bbox, mask_rle: {size, counts}}]}]; a region's key is "{image_id}_{index}"
    class_names.json    {key: class name} (a superset of qa.json's keys)
    qa.json             {key: [questions as in DLC-Bench]}
The regions evaluated are qa.json's keys, in qa.json order (the official scripts do the same); images are read from
a separate folder (COCO / Objects365 files, not shipped with the annotations). The three JSON files may sit in the
given folder or in its `annotations/` subfolder.

RLE is decoded with pycocotools. Its decoder does not check that the runs cover the image (a short counts string
leaves pixels uninitialised), so list counts are summed first and a compressed string must re-encode to itself:
pycocotools writes canonical strings, so an official file always does.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as coco_mask

from pdlm_ros.errors import DatasetError
from pdlm_ros.eval.questions import Question

__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "BenchItem",
    "BenchSample",
    "DLCBench",
    "ParaDLCBench",
    "open_benchmark",
    "rle_decode",
    "rle_encode",
    "polygons_to_mask",
    "decode_segmentation",
]


# ------------------------------------------------------------------------------------------------------------- RLE
def _decode(rle: dict[str, Any]) -> np.ndarray:
    with warnings.catch_warnings():
        # pycocotools 2.0.x's decode trips NumPy 2's __array__(copy=...) deprecation on every call; harmless
        warnings.simplefilter("ignore", DeprecationWarning)
        return coco_mask.decode(rle)


def rle_decode(rle: dict[str, Any], height: int | None = None, width: int | None = None) -> np.ndarray:
    """A COCO RLE dict {"size": [h, w], "counts": list | str | bytes} -> (h, w) bool mask."""
    try:
        h, w = (int(v) for v in rle["size"])
        counts = rle["counts"]
    except (KeyError, TypeError, ValueError) as err:
        keys = sorted(rle) if isinstance(rle, dict) else type(rle).__name__
        raise DatasetError(f"RLE needs 'size' [h, w] and 'counts' (got {keys!r})") from err
    if (height is not None and h != height) or (width is not None and w != width):
        raise DatasetError(f"RLE size {h}x{w} does not match the image {height}x{width}")
    if isinstance(counts, list):
        if not all(isinstance(c, int) and c >= 0 for c in counts) or sum(counts) != h * w:
            raise DatasetError(f"RLE counts must be non-negative ints summing to {h * w} pixels for size {h}x{w} "
                               f"(got {len(counts)} counts summing to {sum(c for c in counts if isinstance(c, int))})")
        encoded = coco_mask.frPyObjects({"size": [h, w], "counts": counts}, h, w)
        return _decode(encoded).astype(bool)
    if isinstance(counts, str):
        counts = counts.encode("ascii", errors="replace")
    if not isinstance(counts, bytes):
        raise DatasetError(f"RLE counts must be a list of ints or a compressed string (got {type(counts).__name__})")
    try:
        mask = _decode({"size": [h, w], "counts": counts})
    except ValueError as err:
        raise DatasetError(f"RLE counts {counts[:40]!r} are not a valid {h}x{w} mask: {err}") from err
    if coco_mask.encode(np.asfortranarray(mask))["counts"] != counts:
        raise DatasetError(f"RLE counts {counts[:40]!r} do not cover the {h}x{w} image (truncated or not written "
                           "by pycocotools)")
    return mask.astype(bool)


def rle_encode(mask: np.ndarray, compressed: bool = True) -> dict[str, Any]:
    """(h, w) bool mask -> COCO RLE dict; counts as the compressed string (pycocotools) or as a list."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise DatasetError(f"mask must be 2-D (got shape {mask.shape})")
    if compressed:
        rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
        return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": rle["counts"].decode("ascii")}
    flat = mask.T.reshape(-1)  # COCO runs are column-major, starting with background
    edges = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    counts = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


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


# ---------------------------------------------------------------------------------------------------------- readers
@dataclass(frozen=True)
class BenchItem:
    """One benchmark region, without pixels (they are read on demand)."""

    ann_id: str  # the region's key in qa.json
    image_key: str  # the image it belongs to (COCO image id / ParaDLC image_id)
    image_file: str  # path relative to the images folder
    height: int
    width: int
    segmentation: Any
    class_name: str
    questions: list[Question]


@dataclass(frozen=True)
class BenchSample:
    """One benchmark region with pixels: image (H, W, 3) uint8 RGB and mask (H, W) bool."""

    image: np.ndarray
    mask: np.ndarray
    ann_id: str
    class_name: str
    questions: list[Question]


def _load_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise DatasetError(f"{what} file missing: {path}")
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise DatasetError(f"{what} file {path} is not valid JSON: {err}") from err


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
    if len(choices) > 5:  # the official prompt letters choices A to E
        raise DatasetError(f"qa.json entry for annotation {ann_id} has {len(choices)} choices; at most 5 (A-E)")
    return Question(kind=kind, attribute="", value="", text=text, choices=choices, subtype=str(raw.get("subtype", "")))


class Benchmark:
    """A benchmark's regions (`items`, in qa.json order) and where their images are."""

    name = ""
    title = ""

    def __init__(self, root: str | Path, images: str | Path | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"{self.title} annotation folder not found: {self.root}")
        self.images_dir = Path(images) if images is not None else self.root / "images"
        self.items: list[BenchItem] = []

    def _questions(self, qa: Any, names: Any) -> Iterator[tuple[str, str, list[Question]]]:
        """(key, class name, questions) for every qa.json entry, checked against class_names.json."""
        if not isinstance(qa, dict) or not isinstance(names, dict):
            raise DatasetError(f"{self.root}: class_names.json and qa.json must be JSON objects")
        for key, raw_questions in qa.items():
            if str(key) not in names:
                raise DatasetError(f"class_names.json has no class for annotation {key}")
            if not isinstance(raw_questions, list):
                raise DatasetError(f"qa.json entry for annotation {key} must be a list of questions")
            yield str(key), str(names[str(key)]), [_question(str(key), q) for q in raw_questions]

    def __len__(self) -> int:
        return len(self.items)

    @property
    def images(self) -> int:
        return len({item.image_key for item in self.items})

    def check_images(self, limit: int | None = None) -> None:
        """Raise DatasetError naming the missing files before a long run starts, not halfway through it."""
        files = sorted({items[0].image_file for _, items in self.groups(limit)})
        missing = [f for f in files if not (self.images_dir / f).is_file()]
        if missing:
            raise DatasetError(f"{len(missing)} of the {len(files)} {self.title} images are missing from "
                               f"{self.images_dir} (first: {', '.join(missing[:3])}); pass their folder with --images")

    def load_image(self, item: BenchItem) -> np.ndarray:
        path = self.images_dir / item.image_file
        if not path.is_file():
            raise DatasetError(f"{self.title} image missing: {path} (pass the image folder with --images)")
        try:
            with Image.open(path) as im:
                image = np.array(im.convert("RGB"))  # a writable copy: torch.from_numpy warns on read-only
        except OSError as err:
            raise DatasetError(f"cannot read {self.title} image {path}: {err}") from err
        if image.shape[:2] != (item.height, item.width):
            raise DatasetError(f"{path} is {image.shape[1]}x{image.shape[0]} but annotations.json says "
                               f"{item.width}x{item.height}")
        return image

    def mask(self, item: BenchItem) -> np.ndarray:
        try:
            return decode_segmentation(item.segmentation, item.height, item.width)
        except DatasetError as err:
            raise DatasetError(f"annotation {item.ann_id}: {err}") from err

    def groups(self, limit: int | None = None) -> list[tuple[str, list[BenchItem]]]:
        """(image key, its regions in qa.json order) per image, in order of first appearance; first `limit` regions."""
        chosen = self.items if limit is None else self.items[:limit]
        out: dict[str, list[BenchItem]] = {}
        for item in chosen:
            out.setdefault(item.image_key, []).append(item)
        return list(out.items())

    def frames(self, limit: int | None = None) -> Iterator[tuple[str, np.ndarray, list[BenchItem]]]:
        """(image file, image, its regions) per image, first `limit` regions only; each image is read once."""
        for _, items in self.groups(limit):
            yield items[0].image_file, self.load_image(items[0]), items

    def __iter__(self) -> Iterator[BenchSample]:
        for _, image, items in self.frames():
            for item in items:
                yield BenchSample(image=image, mask=self.mask(item), ann_id=item.ann_id,
                                  class_name=item.class_name, questions=item.questions)


class DLCBench(Benchmark):
    """A DLC-Bench annotation folder (COCO annotations.json). Images default to `root/images`."""

    name = "dlcbench"
    title = "DLC-Bench"

    def __init__(self, root: str | Path, images: str | Path | None = None) -> None:
        super().__init__(root, images)
        coco = _load_json(_find(self.root, "annotations.json"), self.title)
        names = _load_json(_find(self.root, "class_names.json"), self.title)
        qa = _load_json(_find(self.root, "qa.json"), self.title)
        if not isinstance(coco, dict):
            raise DatasetError(f"{self.root}/annotations.json must be a COCO JSON object (images, annotations)")
        try:
            images_by_id = {str(im["id"]): im for im in coco["images"]}
            anns = {str(a["id"]): a for a in coco["annotations"]}
        except (KeyError, TypeError) as err:
            raise DatasetError(f"{self.root}/annotations.json is not COCO format (needs images[].id and "
                               f"annotations[].id): {err}") from err
        for key, class_name, questions in self._questions(qa, names):
            ann = anns.get(key)
            if ann is None:
                raise DatasetError(f"qa.json names annotation {key}, which annotations.json lacks")
            try:
                image = images_by_id[str(ann["image_id"])]
                file_name, height, width = str(image["file_name"]), int(image["height"]), int(image["width"])
                segmentation = ann["segmentation"]
            except (KeyError, TypeError, ValueError) as err:
                raise DatasetError(f"annotation {key}: missing image or segmentation ({err})") from err
            self.items.append(BenchItem(ann_id=key, image_key=str(ann["image_id"]), image_file=file_name,
                                        height=height, width=width, segmentation=segmentation,
                                        class_name=class_name, questions=questions))


class ParaDLCBench(Benchmark):
    """A ParaDLC-Bench annotation folder (a list of images with their masks). Images default to `root/images`."""

    name = "paradlc"
    title = "ParaDLC-Bench"

    def __init__(self, root: str | Path, images: str | Path | None = None) -> None:
        super().__init__(root, images)
        data = _load_json(_find(self.root, "annotations.json"), self.title)
        names = _load_json(_find(self.root, "class_names.json"), self.title)
        qa = _load_json(_find(self.root, "qa.json"), self.title)
        if not isinstance(data, list):
            raise DatasetError(f"{self.root}/annotations.json must be a list of images (ParaDLC-Bench format); "
                               f"got a {type(data).__name__}" + (" - is this DLC-Bench?" if isinstance(data, dict)
                                                                 else ""))
        regions: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
        for n, image in enumerate(data):
            try:
                image_id = str(image["image_id"])
                for ann in image["annotations"]:
                    regions[f"{image_id}_{ann['index']}"] = (image, ann)
            except (KeyError, TypeError) as err:
                raise DatasetError(f"annotations.json image #{n} lacks image_id or annotations[].index "
                                   f"({err})") from err
        for key, class_name, questions in self._questions(qa, names):
            if key not in regions:
                raise DatasetError(f"qa.json names region {key}, which annotations.json lacks")
            image, ann = regions[key]
            try:
                # The official inference script joins the image folder with the file name's last part.
                file_name = str(image["file_name"]).split("/")[-1]
                height, width = int(image["height"]), int(image["width"])
                segmentation = ann["mask_rle"]
            except (KeyError, TypeError, ValueError) as err:
                raise DatasetError(f"region {key}: missing file_name, height, width or mask_rle ({err})") from err
            self.items.append(BenchItem(ann_id=key, image_key=str(image["image_id"]), image_file=file_name,
                                        height=height, width=width, segmentation=segmentation,
                                        class_name=class_name, questions=questions))

    def mask(self, item: BenchItem) -> np.ndarray:
        if not isinstance(item.segmentation, dict):
            raise DatasetError(f"region {item.ann_id}: mask_rle must be an RLE dict (got "
                               f"{type(item.segmentation).__name__})")
        return super().mask(item)


BENCHMARKS: dict[str, type[Benchmark]] = {"paradlc": ParaDLCBench, "dlcbench": DLCBench}


def open_benchmark(name: str, annotations: str | Path, images: str | Path | None = None) -> Benchmark:
    """Read a benchmark's annotation folder by name ("paradlc" or "dlcbench")."""
    if name not in BENCHMARKS:
        raise DatasetError(f"unknown benchmark {name!r}; expected one of {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name](annotations, images)
