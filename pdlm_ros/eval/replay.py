"""Bag replay: caption every image/region pair of a bag, deterministically, and write a captioned bag.

Offline and exact, unlike the live node (which keeps only the newest frame): every message of the input topics is
read in log-time order, paired by header stamp with the node's own `StampSync` (a deep queue, so no pair is lost to
lateness), and EVERY pair is captioned, so two replays of one bag give the same captions whatever the CPU speed.

The output bag (rosbag2 MCAP, metadata version 8, for `ros2 bag play`) holds the input topics that were read, copied
message for message (ROS 1 input is converted to ROS 2 messages), plus one `pdlm_ros/msg/RegionCaptionArray` per
pair on `caption_topic`, with the image's header, one `foxglove_msgs/msg/ImageAnnotations` per pair on
`annotations_topic` (box outlines and captions stamped like the image, which Foxglove draws over it), and optionally
an annotated image per pair.

Captions of tracked regions are reused by the live node's cache rules (`pdlm_ros.ros.cache`: same track id, caption
younger than `cache_max_age_s` in frame stamps, box IoU at least `cache_iou_threshold`), so a replayed bag shows the
`cached`/`age` fields as the node would write them; `cache=False` describes every region of every pair.

Nothing is dropped silently: a message that does not decode, a frame whose image is unusable and a pair that never
forms are each counted and named in the result; a frame the model cannot use still gets its caption array, with
every region's `error` set. Bad requests (missing topic, wrong message type, no region messages, stamps that never
pair, an existing output) raise `BagError` with what exists and what to do.
"""

from __future__ import annotations

import io
import logging
import math
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage
from rosbags.rosbag2 import StoragePlugin, Writer

from pdlm_ros.data.bags import ROSBAG2_VERSION, InputBag, TopicInfo, open_bag
from pdlm_ros.errors import BagError, ImageInputError, PDLMError, RegionInputError
from pdlm_ros.ros import convert as C
from pdlm_ros.ros import messages as M
from pdlm_ros.ros.cache import CaptionCache, remember, reuse_cached
from pdlm_ros.ros.params import NodeParams
from pdlm_ros.ros.sync import StampSync, SyncCounters
from pdlm_ros.types import CaptionerLike, FrameResult, FrameStats, RegionCaption, RegionInput
from pdlm_ros.viz import draw_captions

__all__ = ["ReplayOptions", "FrameRecord", "SkippedMessage", "ReplayResult", "OUTPUT_BAG", "replay",
           "prepare_output"]

log = logging.getLogger(__name__)

OUTPUT_BAG = "bag"  # OUT/bag/ is the rosbag2 directory (metadata.yaml + bag_0.mcap)
IMAGE_TYPES = (M.IMAGE, M.COMPRESSED_IMAGE)
PREVIEW_FRAMES = 6  # annotated frames kept for the HTML report
PREVIEW_MIN_SIDE = 360  # px; small frames are enlarged for the report so their labels stay readable


@dataclass(frozen=True)
class ReplayOptions:
    """What to read and how. Exactly one region source is used: the mask topic when given, else detections."""

    image_topic: str
    detections_topic: str | None = None
    mask_topic: str | None = None
    mode: str = "auto"  # the checkpoint layout's default
    steps: int | None = None  # denoising steps (None: the model's default)
    sampler: str | None = None  # official checkpoints: global (default), span or threshold
    refresh: int | None = None  # official checkpoints, mode cached: cache refresh interval (None: 4)
    annotated: bool = False  # also write an annotated image per pair
    slop_s: float = 0.0  # stamp tolerance for pairing; 0 = exact (detectors copy the image header)
    queue_size: int = 1000  # per stream; deep, so lateness never costs a pair in replay
    caption_topic: str = "/pdlm/captions"
    annotated_topic: str = "/pdlm/annotated_image"
    annotations_topic: str = "/pdlm/annotations"
    # the live node's caption cache and its defaults (params.PARAMS)
    cache: bool = True
    cache_max_age_s: float = NodeParams.cache_max_age
    cache_iou_threshold: float = NodeParams.cache_iou_threshold
    cache_untracked_iou: float = NodeParams.cache_untracked_iou

    @property
    def region_topic(self) -> str:
        topic = self.mask_topic or self.detections_topic
        if not topic:
            raise BagError("give a region source: --detections-topic (vision_msgs/Detection2DArray) or "
                           "--mask-topic (instance-mask image)")
        return topic


@dataclass(frozen=True)
class FrameRecord:
    """One captioned pair. `error` is set when the whole frame was refused (then every region carries it)."""

    index: int  # pair number, in order
    stamp_ns: int  # the image's header stamp
    regions_stamp_ns: int
    regions: list[RegionCaption]
    nfe: int = 0
    tokens: int = 0
    tpf: float = 0.0
    latency_ms: float = 0.0  # model time for the frame (Captioner's "total")
    error: str = ""
    ages: tuple[float, ...] = ()  # per region: seconds since its (cached) caption was computed; 0 when fresh


@dataclass(frozen=True)
class SkippedMessage:
    topic: str
    log_time_ns: int
    reason: str


@dataclass(frozen=True)
class ReplayResult:
    """Everything a replay did; `pdlm_ros.eval.report` turns it into tables, JSON, HTML and plots."""

    bag: str
    storage: str
    out_bag: Path
    options: ReplayOptions
    model: str
    topics: dict[str, TopicInfo]
    frames: list[FrameRecord]
    sync: SyncCounters
    skipped: list[SkippedMessage]
    damage: list[str]
    written: dict[str, int]  # topic -> messages in the output bag
    wall_s: float
    previews: dict[int, bytes] = field(default_factory=dict, repr=False)  # frame index -> annotated PNG

    @property
    def regions(self) -> int:
        return sum(len(f.regions) for f in self.frames)


# ------------------------------------------------------------------------------------------------------ validation
def _check_topic(bag: InputBag, topic: str, flag: str, allowed: tuple[str, ...]) -> TopicInfo:
    info = bag.topics.get(topic)
    if info is None:
        raise BagError(f"{flag} {topic!r} is not in {bag.path}; topics in the bag: {bag.describe_topics()}")
    if info.msgtype not in allowed:
        raise BagError(f"{flag} {topic!r} carries {info.msgtype}, which replay cannot use; it needs "
                       f"{' or '.join(allowed)}")
    if info.msgtype not in bag.typestore.types:
        raise BagError(f"{bag.path} holds no definition of {info.msgtype} (topic {topic}); record the bag with "
                       "message definitions (rosbag2 >= Iron) or convert it with rosbags-convert")
    if info.count == 0:
        raise BagError(f"{flag} {topic!r} has no messages in {bag.path}: nothing to caption "
                       f"(topics: {bag.describe_topics()})")
    return info


def prepare_output(out: Path, bag: Path, overwrite: bool) -> Path:
    """Check OUT and clear what replay writes there; returns OUT/bag. Never deletes anything replay did not write."""
    out = Path(out)
    target = out / OUTPUT_BAG
    ours = [target, *(out / name for name in ("report.json", "report.html", "latency_vs_regions.png"))]
    existing = [p for p in ours if p.exists()]
    if out.exists() and not out.is_dir():
        raise BagError(f"output {out} exists and is not a directory; choose another --out")
    if existing and not overwrite:
        raise BagError(f"output exists already: {', '.join(map(str, existing))} (pass --overwrite to replace it)")
    src = Path(bag).resolve()
    if src == target.resolve() or target.resolve() in src.parents:
        raise BagError(f"the input bag {bag} lies inside the output {target}; choose another --out")
    for p in existing:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return target


# ---------------------------------------------------------------------------------------------------------- output
class _Output:
    """The output bag: input topics copied, captions (and annotated images) added."""

    def __init__(self, path: Path, bag: InputBag) -> None:
        self.bag = bag
        self.writer = Writer(path, version=ROSBAG2_VERSION, storage_plugin=StoragePlugin.MCAP)
        self.writer.open()
        self.conns: dict[str, Any] = {}
        self.counts: dict[str, int] = {}
        self._migrations: dict[str, object] = {}

    def _conn(self, topic: str, msgtype: str, store: Any) -> Any:
        if topic not in self.conns:
            self.conns[topic] = self.writer.add_connection(topic, msgtype, typestore=store)
            self.counts[topic] = 0
        return self.conns[topic]

    def copy(self, topic: str, msgtype: str, t: int, raw: bytes, msg: Any) -> None:
        """Copy an input message: raw CDR as is; ROS 1 messages converted to their ROS 2 form (Header loses seq)."""
        if self.bag.ros1:
            from rosbags.convert.converter import migrate_message

            msg2 = migrate_message(self.bag.typestore, M.typestore(), msgtype, msgtype, self._migrations, msg)
            self.write(topic, msgtype, t, msg2)
            return
        self.writer.write(self._conn(topic, msgtype, self.bag.typestore), t, raw)
        self.counts[topic] += 1

    def write(self, topic: str, msgtype: str, t: int, msg: Any) -> None:
        store = M.typestore()
        self.writer.write(self._conn(topic, msgtype, store), t, store.serialize_cdr(msg, msgtype))
        self.counts[topic] += 1

    def close(self) -> None:
        self.writer.close()


# --------------------------------------------------------------------------------------------------------- helpers
def _image(msg: Any, msgtype: str) -> np.ndarray:
    img = C.image_from_compressed(msg) if msgtype == M.COMPRESSED_IMAGE else C.image_from_msg(msg)
    return img if img.flags.writeable else img.copy()  # a view of the message buffer is read-only; torch warns


def _regions(msg: Any, from_mask: bool, width: int, height: int) -> list[RegionInput]:
    if from_mask:
        return C.regions_from_instance_mask(msg)
    try:
        return C.regions_from_detections(msg, width, height)
    except AttributeError as err:  # vision_msgs < 4 (ROS 1, Foxy): `bbox.center.x`, no `center.position`
        raise RegionInputError(f"detections use a vision_msgs layout this package does not read ({err}); it reads "
                               "vision_msgs 4.x (Humble and later)") from err


def _decode_options(options: ReplayOptions) -> dict[str, Any]:
    """The official-layout options that were given (a native captioner refuses them by name)."""
    return {k: v for k, v in (("sampler", options.sampler), ("refresh", options.refresh)) if v is not None}


def _refused(regions: list[RegionInput], reason: str, model: str) -> FrameResult:
    """A frame the model could not run on: every region kept, each carrying the reason."""
    caps = [RegionCaption(index=i, region_id=r.region_id,
                          box=tuple(float(v) for v in r.box) if r.box is not None else (math.nan,) * 4,  # type: ignore[arg-type]
                          caption="", confidence=0.0, source_index=r.source_index if r.source_index >= 0 else i,
                          class_id=r.class_id, score=r.score, error=f"frame refused: {reason}")
            for i, r in enumerate(regions)]
    return FrameResult(caps, FrameStats(), model)


def _preview(image: np.ndarray, regions: list[RegionCaption]) -> bytes:
    """Annotated PNG for the report, enlarged (nearest neighbour) so small frames keep readable labels."""
    scale = max(1, math.ceil(PREVIEW_MIN_SIDE / max(min(image.shape[:2]), 1)))
    if scale > 1:
        image = np.asarray(PILImage.fromarray(image).resize((image.shape[1] * scale, image.shape[0] * scale),
                                                            PILImage.NEAREST))
        regions = [replace(r, box=tuple(v * scale for v in r.box)) for r in regions]  # type: ignore[misc]
    buf = io.BytesIO()
    PILImage.fromarray(draw_captions(image, regions)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------------------ main
def replay(bag_path: Path | str, out: Path | str, captioner: CaptionerLike, options: ReplayOptions, *,
           overwrite: bool = False, progress: bool = False) -> ReplayResult:
    """Caption every pair of `bag_path` and write `out`/bag; see the module docstring for the rules."""
    t_start = time.perf_counter()
    with open_bag(bag_path) as bag:
        image_info = _check_topic(bag, options.image_topic, "--image-topic", IMAGE_TYPES)
        from_mask = options.mask_topic is not None
        region_topic = options.region_topic
        _check_topic(bag, region_topic, "--mask-topic" if from_mask else "--detections-topic",
                                   (M.IMAGE,) if from_mask else (M.DETECTION_ARRAY,))
        topics = {options.image_topic, region_topic}
        if options.detections_topic and from_mask:  # copied along, not used for regions
            _check_topic(bag, options.detections_topic, "--detections-topic", (M.DETECTION_ARRAY,))
            topics.add(options.detections_topic)
        out_bag = prepare_output(Path(out), Path(bag_path), overwrite)

        sync: StampSync[tuple[Any, str], Any] = StampSync(slop_s=options.slop_s, queue_size=options.queue_size)
        frames: list[FrameRecord] = []
        skipped: list[SkippedMessage] = []
        previews: dict[int, bytes] = {}
        output = _Output(out_bag, bag)
        cache = CaptionCache(options.cache_max_age_s, options.cache_iou_threshold,
                             untracked_iou=options.cache_untracked_iou) if options.cache else None
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=image_info.count, desc="replay", unit="frame", leave=False, dynamic_ncols=True)
        try:
            for topic, t, raw in bag.messages(topics):
                msgtype = bag.topics[topic].msgtype
                try:
                    msg = bag.deserialize(raw, msgtype)
                    stamp = C.stamp_ns(msg.header)
                except (BagError, AttributeError) as err:
                    skipped.append(SkippedMessage(topic, t, str(err)))
                    log.warning("skipped a message on %s at log time %d: %s", topic, t, err)
                    continue
                output.copy(topic, msgtype, t, raw, msg)
                if topic == options.image_topic:
                    pairs = sync.add_image(stamp, (msg, msgtype))
                    if bar is not None:
                        bar.update(1)
                elif topic == region_topic:
                    pairs = sync.add_regions(stamp, msg)
                else:
                    continue
                for pair in pairs:
                    record, result, image = _caption_pair(len(frames), pair, captioner, options, from_mask, cache)
                    frames.append(record)
                    header = C.header_msg(pair.stamp, str(pair.image[0].header.frame_id))
                    output.write(options.caption_topic, M.CAPTION_ARRAY, t,
                                 C.caption_array_msg(result, header, ages=record.ages or None))
                    output.write(options.annotations_topic, M.IMAGE_ANNOTATIONS, t,
                                 C.image_annotations_msg(record.regions, header))
                    if image is not None and options.annotated:
                        drawn = draw_captions(image, record.regions)
                        output.write(options.annotated_topic, M.IMAGE, t, C.image_to_msg(drawn, header))
                    if image is not None and record.index < PREVIEW_FRAMES:
                        previews[record.index] = _preview(image, record.regions)
            sync.flush()
        finally:
            output.close()
            if bar is not None:
                bar.close()

        counters = sync.counters()
        result = ReplayResult(
            bag=str(bag_path), storage=bag.storage, out_bag=out_bag, options=options,
            model=captioner.name, topics=dict(bag.topics), frames=frames, sync=counters, skipped=skipped,
            damage=list(bag.damage), written=dict(output.counts), wall_s=time.perf_counter() - t_start,
            previews=previews)
    try:
        _check_pairs(result, region_topic)
    except BagError:
        shutil.rmtree(out_bag, ignore_errors=True)  # a copy of the input without captions helps nobody
        raise
    return result


def _caption_pair(index: int, pair: Any, captioner: CaptionerLike, options: ReplayOptions, from_mask: bool,
                  cache: CaptionCache | None = None) -> tuple[FrameRecord, FrameResult, np.ndarray | None]:
    (img_msg, img_type), region_msg = pair.image, pair.regions
    image: np.ndarray | None = None
    ages: tuple[float, ...] = ()
    try:
        image = _image(img_msg, img_type)
        regions = _regions(region_msg, from_mask, image.shape[1], image.shape[0])
        if cache is None:
            result = captioner.caption(image, regions, mode=options.mode, steps=options.steps,
                                       **_decode_options(options))
        else:
            result, ages = _caption_with_cache(captioner, cache, image, regions, pair.stamp, options)
        error = ""
    except (ImageInputError, RegionInputError) as err:
        error = str(err)
        log.warning("frame at stamp %d refused: %s", pair.stamp, error)
        try:  # keep the regions (ids, boxes) so each one reports the refusal
            regions = _regions(region_msg, from_mask, 1, 1)
        except PDLMError:
            regions = []
        result = _refused(regions, error, captioner.name)
    s = result.stats
    record = FrameRecord(index=index, stamp_ns=pair.stamp, regions_stamp_ns=pair.regions_stamp,
                         regions=list(result.regions), nfe=s.nfe, tokens=s.tokens, tpf=s.tpf,
                         latency_ms=float(s.latency_ms.get("total", 0.0)), error=error, ages=ages)
    return record, result, image if not error else None


def _caption_with_cache(captioner: CaptionerLike, cache: CaptionCache, image: np.ndarray,
                        regions: list[RegionInput], stamp: int, options: ReplayOptions
                        ) -> tuple[FrameResult, tuple[float, ...]]:
    """As the node does it: cached captions for tracks still valid, the model for the rest (no pass when none)."""
    cached, todo, boxes = reuse_cached(cache, regions, stamp)
    stats, fresh = FrameStats(), {}
    if todo:
        part = captioner.caption(image, [regions[i] for i in todo], mode=options.mode, steps=options.steps,
                                 **_decode_options(options))
        stats = part.stats
        fresh = {i: replace(cap, index=i) for i, cap in zip(todo, part.regions)}
        remember(cache, regions, boxes, fresh, stamp)
    merged = [fresh[i] if i in fresh else cached[i][0] for i in range(len(regions))]
    ages = tuple(cached[i][1] if i in cached else 0.0 for i in range(len(regions)))
    return FrameResult(merged, stats, captioner.name), ages


def _check_pairs(result: ReplayResult, region_topic: str) -> None:
    """No pair at all is a request error (stamps that never match), not an empty success."""
    c = result.sync
    if result.frames:
        if c.expired_images or c.expired_regions:
            log.warning("%d images and %d region messages found no partner (stamps differ by more than %.3f s)",
                        c.expired_images, c.expired_regions, result.options.slop_s)
        return
    if c.images == 0 or c.regions == 0:
        missing = result.options.image_topic if c.images == 0 else region_topic
        raise BagError(f"no readable message on {missing} in {result.bag}: nothing to caption"
                       + (f" ({'; '.join(result.damage)})" if result.damage else ""))
    raise BagError(
        f"no image on {result.options.image_topic} pairs with a message on {region_topic}: {c.images} images and "
        f"{c.regions} region messages, none with matching header stamps (tolerance {result.options.slop_s} s; "
        f"last image stamp {c.last_image_stamp} ns, last region stamp {c.last_regions_stamp} ns). The detector "
        "should copy the image header; otherwise pass --slop SECONDS (below half the frame period)")
