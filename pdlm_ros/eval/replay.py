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
pair, an existing output, an output path that cannot be written) raise `BagError` with what exists and what to do;
`check_request` runs every check that needs no model, so a command can fail before it loads one.

Crash safety (`ReplayWriter`): the output bag is written with `pdlm_ros.data.bag_writer.SafeBagWriter`, committed
every `checkpoint_s` seconds of work, so a replay killed at any moment (kill -9 included) leaves OUT/bag holding a
metadata.yaml and complete MCAP files only: rosbags, `ros2 bag` and mcap's indexed reader open it, with every frame
committed before the kill. How far the run got is in the metadata's custom_data (`pdlm_ros.replay`), and each
committed frame's record is in OUT/.replay/frames.jsonl. A rerun into the same OUT refuses to touch it and says so;
`resume=True` (`--resume`) continues it: the bag is read again from the start, the frames already committed take
their captions from the journal instead of the model (so the caption cache evolves exactly as in one run), and only
the rest is captioned and written. A write that fails (a full disk) removes the unfinished segment, marks the run
interrupted and raises one BagError line saying how many frames the bag keeps and how to go on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import io
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage

from pdlm_ros.data.bag_writer import SafeBagWriter, read_metadata
from pdlm_ros.data.bags import InputBag, TopicInfo, open_bag
from pdlm_ros.errors import BagError, ImageInputError, PDLMError, RegionInputError
from pdlm_ros.ros import convert as C
from pdlm_ros.ros import messages as M
from pdlm_ros.ros.cache import CaptionCache, remember, reuse_cached
from pdlm_ros.ros.params import NodeParams
from pdlm_ros.ros.sync import StampSync, SyncCounters
from pdlm_ros.types import CaptionerLike, FrameResult, FrameStats, RegionCaption, RegionInput
from pdlm_ros.viz import draw_captions

__all__ = ["ReplayOptions", "FrameRecord", "SkippedMessage", "ReplayResult", "ReplayState", "ReplayWriter",
           "OUTPUT_BAG", "CHECKPOINT_S", "replay", "check_request", "check_output", "prepare_output", "replay_state"]

log = logging.getLogger(__name__)

OUTPUT_BAG = "bag"  # OUT/bag/ is the rosbag2 directory (metadata.yaml + bag_0.mcap, bag_1.mcap, ...)
REPORT_FILES = ("report.json", "report.html", "latency_vs_regions.png")
STATE_DIR = ".replay"  # OUT/.replay/: the lock and the frame journal of a run
JOURNAL = "frames.jsonl"
STATE_KEY = "pdlm_ros.replay"  # the output bag's custom_data key holding the run's progress
CHECKPOINT_S = 30.0  # default seconds of work between commits: what a kill can cost at most
MIN_FREE_BYTES = 1 << 20  # an output disk with less free space is refused before the model loads
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


def _check_request(bag: InputBag, options: ReplayOptions) -> tuple[TopicInfo, str, set[str]]:
    """The topic checks: (image topic info, region topic, topics to read)."""
    image_info = _check_topic(bag, options.image_topic, "--image-topic", IMAGE_TYPES)
    from_mask = options.mask_topic is not None
    region_topic = options.region_topic
    _check_topic(bag, region_topic, "--mask-topic" if from_mask else "--detections-topic",
                 (M.IMAGE,) if from_mask else (M.DETECTION_ARRAY,))
    topics = {options.image_topic, region_topic}
    if options.detections_topic and from_mask:  # copied along, not used for regions
        _check_topic(bag, options.detections_topic, "--detections-topic", (M.DETECTION_ARRAY,))
        topics.add(options.detections_topic)
    return image_info, region_topic, topics


@dataclass(frozen=True)
class ReplayState:
    """How far the run that wrote an output bag got (the bag's custom_data `pdlm_ros.replay`)."""

    status: str  # "running" (or killed), "interrupted" (a failure it could record), "complete"
    frames: int  # frames committed to the bag (and journalled)
    messages: int  # input messages fully processed before the last commit
    last_stamp_ns: int | None  # header stamp of the last committed frame
    run: dict[str, Any]  # what the run was: input bag, options, model

    @property
    def unfinished(self) -> bool:
        return self.status != "complete"

    def describe(self) -> str:
        upto = f", up to image stamp {self.last_stamp_ns} ns" if self.last_stamp_ns is not None else ""
        return f"{self.frames} frames of {self.run.get('input', '?')} committed{upto}"

    def custom_data(self) -> dict[str, str]:
        doc = {"status": self.status, "frames": self.frames, "messages": self.messages,
               "last_stamp_ns": self.last_stamp_ns, **self.run}
        return {STATE_KEY: json.dumps(doc, sort_keys=True)}


def replay_state(out_bag: Path | str) -> ReplayState | None:
    """The state recorded in a replay's output bag; None for no bag, or a bag no replay of this version wrote."""
    info = read_metadata(out_bag)
    raw = ((info or {}).get("custom_data") or {}).get(STATE_KEY)
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
        return ReplayState(status=str(doc.pop("status")), frames=int(doc.pop("frames")),
                           messages=int(doc.pop("messages")), last_stamp_ns=doc.pop("last_stamp_ns"), run=doc)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
        raise BagError(f"{out_bag}/metadata.yaml has an unreadable {STATE_KEY} entry ({err}); pass --overwrite "
                       "to replace the output") from None


def _run_info(bag: Path, options: ReplayOptions, model: str | None) -> dict[str, Any]:
    """What a resumed run must share with the interrupted one."""
    src = Path(bag).resolve()
    files = [src] if src.is_file() else sorted(p for p in src.iterdir() if p.is_file())
    info: dict[str, Any] = {"input": str(src), "input_bytes": sum(f.stat().st_size for f in files),
                            "options": dataclasses.asdict(options)}
    if model is not None:
        info["model"] = model
    return info


def _check_same_run(state: ReplayState, run: dict[str, Any], out_bag: Path) -> None:
    for key, now in run.items():
        then = state.run.get(key)
        if key == "options" and isinstance(then, dict):
            diff = [f"{k}={then.get(k)!r} (now {v!r})" for k, v in now.items() if then.get(k) != v]
            if diff:
                raise BagError(f"cannot resume {out_bag}: the interrupted replay ran with other options: "
                               f"{', '.join(diff)}; rerun with the same options, or pass --overwrite to start again")
        elif then != now:
            raise BagError(f"cannot resume {out_bag}: the interrupted replay's {key} was {then!r}, now {now!r}; "
                           "resume with the same input and model, or pass --overwrite to start again")


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output(out: Path | str, bag: Path | str, overwrite: bool = False, resume: bool = False,
                 ) -> ReplayState | None:
    """Every check of OUT that changes nothing: it can be written, has room, does not hold the input, and holds no
    replay output that would be lost. Returns the state of an unfinished run to resume (with `resume`), else None."""
    out = Path(out)
    target = out / OUTPUT_BAG
    base = _nearest_existing(out)
    if not base.is_dir():
        where = "is a file" if base == out.absolute() else f"lies under {base}, which is a file"
        raise BagError(f"output {out} {where}, not a directory; choose another --out")
    try:  # the only sure test of writability (permissions, read-only mounts, /proc) is to write
        probe = tempfile.mkdtemp(prefix=".pdlm-write-test-", dir=base)
        os.rmdir(probe)
    except OSError as err:
        raise BagError(f"cannot write the output {out}: {err.strerror or err} (in {base}); choose another "
                       "--out") from None
    free = shutil.disk_usage(base).free
    if free < MIN_FREE_BYTES:
        raise BagError(f"cannot write the output {out}: only {free} bytes free on its disk ({base}); free space "
                       "or choose another --out")
    src = Path(bag).resolve()
    if src == target.resolve() or target.resolve() in src.parents:
        raise BagError(f"the input bag {bag} lies inside the output {target}; choose another --out")
    state = replay_state(target) if target.is_dir() and not overwrite else None
    if state is not None and state.unfinished:
        if resume:
            return state
        raise BagError(f"{target} holds an interrupted replay ({state.describe()}); it opens as it is. Rerun with "
                       "--resume to continue it, or with --overwrite to start again")
    existing = [p for p in (target, *(out / name for name in REPORT_FILES)) if p.exists()]
    if existing and not overwrite:
        hint = " (it is complete: nothing to resume)" if resume and state is not None else ""
        raise BagError(f"output exists already: {', '.join(map(str, existing))}{hint} (pass --overwrite to replace "
                       "it)")
    return None


def check_request(bag_path: Path | str, out: Path | str, options: ReplayOptions, *, overwrite: bool = False,
                  resume: bool = False) -> None:
    """Every check of a replay request that needs no model: the bag opens, its topics fit, OUT can be written and
    resumed as asked. Commands call it before loading a model, so a bad request fails in a second."""
    with open_bag(bag_path) as bag:
        _check_request(bag, options)
    state = check_output(out, bag_path, overwrite, resume)
    if state is not None:
        _check_same_run(state, _run_info(Path(bag_path), options, None), Path(out) / OUTPUT_BAG)


def prepare_output(out: Path, bag: Path, overwrite: bool, resume: bool = False) -> Path:
    """Check OUT and clear what replay writes there (unless resuming); returns OUT/bag. Never deletes anything
    replay did not write."""
    out = Path(out)
    target = out / OUTPUT_BAG
    if check_output(out, bag, overwrite, resume) is not None:
        return target
    for p in (target, *(out / name for name in REPORT_FILES), out / STATE_DIR / JOURNAL):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return target


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """One replay at a time per OUT (a second one would interleave its segments); released by the kernel when the
    process dies, so a killed run never leaves a stale lock."""
    (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
    with (out / STATE_DIR / "lock").open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise BagError(f"another replay is writing {out} now; wait for it to end, or choose another "
                           "--out") from None
        yield
        if not (out / STATE_DIR / JOURNAL).exists():  # nothing left to resume: leave OUT as a plain output
            (out / STATE_DIR / "lock").unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                (out / STATE_DIR).rmdir()


# ---------------------------------------------------------------------------------------------------------- output
def _record_to_json(record: FrameRecord) -> str:
    return json.dumps(dataclasses.asdict(record))  # NaN scores and boxes are kept (JSON's NaN extension)


def _record_from_json(line: str) -> FrameRecord:
    d = json.loads(line)
    regions = [RegionCaption(**{**r, "box": tuple(r["box"])}) for r in d.pop("regions")]
    return FrameRecord(**{**d, "regions": regions, "ages": tuple(d["ages"])})


def _write_failed(err: OSError, state: ReplayState, out_bag: Path) -> BagError:
    what = err.strerror or str(err)
    return BagError(f"cannot write {err.filename or out_bag}: {what}; the unfinished part was removed and {out_bag} "
                    f"keeps {state.describe()}. Free space, then rerun with --resume to continue (or --overwrite to "
                    "start again)")


class ReplayWriter:
    """The output of one replay, written so that a kill at any moment loses at most `checkpoint_s` of work.

    OUT/bag (`SafeBagWriter`) gets the copied input messages and, per frame, the caption array, the Foxglove
    annotations and optionally the annotated image; each frame's `FrameRecord` goes to the journal
    OUT/.replay/frames.jsonl. `checkpoint(messages, frames)` commits when `checkpoint_s` has passed since the last
    commit: journal flushed and fsynced, then the bag segment, then the metadata with the new `ReplayState`
    (running), so the metadata never counts a frame the journal lacks. `close` commits the rest as complete and
    drops the journal; `fail` drops the uncommitted part and marks the run interrupted. A write that fails raises
    one BagError line (see `_write_failed`).

    Use: `w = ReplayWriter(out, bag, run)`, then `w.copy(...)` per input message and `w.frame(...)` per captioned
    pair, `w.checkpoint(n, frames)` between input messages, `w.close(n, frames)` at the end.
    """

    def __init__(self, out: Path, bag: InputBag, options: ReplayOptions, run: dict[str, Any], *,
                 resume: ReplayState | None = None, checkpoint_s: float = CHECKPOINT_S) -> None:
        if not (math.isfinite(checkpoint_s) and checkpoint_s >= 0):
            raise BagError(f"the checkpoint interval must be >= 0 seconds (got {checkpoint_s})")
        self.out = Path(out)
        self.out_bag = self.out / OUTPUT_BAG
        self.bag = bag
        self.options = options
        self.checkpoint_s = checkpoint_s
        self._migrations: dict[str, object] = {}
        self._conns: dict[str, int] = {}
        self.recorded: list[FrameRecord] = []  # committed frames of the interrupted run (resume only)
        self.state = resume or ReplayState("running", 0, 0, None, run)
        self.state = replace(self.state, status="running", run=run)
        journal = self.out / STATE_DIR / JOURNAL
        try:
            if resume is not None:
                self.recorded = self._read_journal(journal, resume.frames)
            self.bag_writer = SafeBagWriter(self.out_bag, resume=resume is not None,
                                            custom_data=self.state.custom_data())
            journal.parent.mkdir(parents=True, exist_ok=True)
            self.journal = journal.open("a", encoding="utf8")
        except OSError as err:
            raise _write_failed(err, self.state, self.out_bag) from None
        self._last_commit = time.monotonic()
        self._frames_committed = self.state.frames
        self._last_stamp = self.state.last_stamp_ns
        self._finished = False  # closed, failed or discarded: nothing more to do on an error

    @property
    def messages_done(self) -> int:
        """Input messages already in the committed output (0 for a new run)."""
        return self.state.messages

    @property
    def counts(self) -> dict[str, int]:
        return self.bag_writer.counts

    def _read_journal(self, path: Path, frames: int) -> list[FrameRecord]:
        """The first `frames` records (those committed); later lines were written after the last commit."""
        try:
            lines = path.read_text(encoding="utf8").splitlines()[:frames] if frames else []
            records = [_record_from_json(line) for line in lines]
        except (OSError, json.JSONDecodeError, TypeError, KeyError) as err:
            raise BagError(f"cannot resume {self.out_bag}: its journal {path} is unreadable ({err}); pass "
                           "--overwrite to start again") from None
        if len(records) < frames:
            raise BagError(f"cannot resume {self.out_bag}: its journal {path} holds {len(records)} of the {frames} "
                           "committed frames; pass --overwrite to start again")
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in lines), encoding="utf8")
        os.replace(tmp, path)
        return records

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        try:
            yield
        except OSError as err:
            self.fail()
            raise _write_failed(err, self.state, self.out_bag) from None

    def _conn(self, topic: str, msgtype: str, store: Any) -> int:
        if topic not in self._conns:
            self._conns[topic] = self.bag_writer.add_connection(topic, msgtype, store)
        return self._conns[topic]

    def copy(self, topic: str, msgtype: str, t: int, raw: bytes, msg: Any) -> None:
        """Copy an input message: raw CDR as is; ROS 1 messages converted to their ROS 2 form (Header loses seq)."""
        if self.bag.ros1:
            from rosbags.convert.converter import migrate_message

            msg2 = migrate_message(self.bag.typestore, M.typestore(), msgtype, msgtype, self._migrations, msg)
            self.write(topic, msgtype, t, msg2)
            return
        with self._writing():
            self.bag_writer.write(self._conn(topic, msgtype, self.bag.typestore), t, raw)

    def write(self, topic: str, msgtype: str, t: int, msg: Any) -> None:
        store = M.typestore()
        with self._writing():
            self.bag_writer.write(self._conn(topic, msgtype, store), t, store.serialize_cdr(msg, msgtype))

    def frame(self, t: int, frame_id: str, record: FrameRecord, result: FrameResult,
              image: np.ndarray | None) -> None:
        """One captioned pair: its caption array, annotations and (with `options.annotated`) annotated image, all
        logged at `t` (the input message that completed the pair), and its record in the journal."""
        o = self.options
        header = C.header_msg(record.stamp_ns, frame_id)
        self.write(o.caption_topic, M.CAPTION_ARRAY, t, C.caption_array_msg(result, header, ages=record.ages or None))
        self.write(o.annotations_topic, M.IMAGE_ANNOTATIONS, t, C.image_annotations_msg(record.regions, header))
        if image is not None and o.annotated:
            self.write(o.annotated_topic, M.IMAGE, t, C.image_to_msg(draw_captions(image, record.regions), header))
        with self._writing():
            self.journal.write(_record_to_json(record) + "\n")
        self._last_stamp = record.stamp_ns

    def checkpoint(self, messages: int, frames: int, *, force: bool = False) -> None:
        """Commit the first `messages` input messages (and their `frames` frames) when due: new frames, and
        `checkpoint_s` seconds since the last commit."""
        due = time.monotonic() - self._last_commit >= self.checkpoint_s
        if frames > self._frames_committed and (due or force):
            self._commit("running", messages, frames)

    def _commit(self, status: str, messages: int, frames: int) -> None:
        with self._writing():
            self.journal.flush()
            os.fsync(self.journal.fileno())
            state = replace(self.state, status=status, frames=frames, messages=messages,
                            last_stamp_ns=self._last_stamp)
            self.bag_writer.commit(state.custom_data())
            self.state = state
        self._last_commit = time.monotonic()
        self._frames_committed = frames

    def close(self, messages: int, frames: int) -> None:
        """Commit everything as a complete run; the journal is no longer needed (the report holds the records)."""
        self._commit("complete", messages, frames)
        self._finished = True
        self.journal.close()
        (self.out / STATE_DIR / JOURNAL).unlink(missing_ok=True)

    def fail(self) -> None:
        """Drop what was not committed; record the run as interrupted when the disk still allows it."""
        if self._finished:
            return
        self._finished = True
        self.bag_writer.abort()
        with contextlib.suppress(OSError):
            self.bag_writer.commit(replace(self.state, status="interrupted").custom_data())
        with contextlib.suppress(OSError):
            self.journal.close()

    def discard(self) -> None:
        """Remove the whole output (a run that produced no frame)."""
        self._finished = True
        self.bag_writer.abort()
        with contextlib.suppress(OSError):
            self.journal.close()
        shutil.rmtree(self.out_bag, ignore_errors=True)
        (self.out / STATE_DIR / JOURNAL).unlink(missing_ok=True)


class _Recorded:
    """The model's stand-in on the frames a resumed replay had committed: the journal's captions and stats, handed
    back exactly as the model returned them (only the regions it was asked for: those the cache did not cover)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.record: FrameRecord | None = None

    def caption(self, image: np.ndarray, regions: list[RegionInput], **_: Any) -> FrameResult:
        rec = self.record
        assert rec is not None
        if rec.error:  # the model refused the frame then; it refuses it again
            raise ImageInputError(rec.error)
        fresh = [r for r in rec.regions if not r.cached]
        if len(fresh) != len(regions):
            raise BagError(f"cannot resume: frame {rec.index} (stamp {rec.stamp_ns}) asks for {len(regions)} "
                           f"captions, the interrupted run computed {len(fresh)}; the input bag changed? Pass "
                           "--overwrite to start again")
        stats = FrameStats(nfe=rec.nfe, tokens=rec.tokens, tpf=rec.tpf, latency_ms={"total": rec.latency_ms})
        return FrameResult([replace(r, index=i) for i, r in enumerate(fresh)], stats, self.name)


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
           overwrite: bool = False, resume: bool = False, progress: bool = False,
           checkpoint_s: float = CHECKPOINT_S) -> ReplayResult:
    """Caption every pair of `bag_path` and write `out`/bag; see the module docstring for the rules.

    `resume`: continue the interrupted replay in `out` (a fresh run when there is none); `checkpoint_s`: seconds of
    work between commits of the output (0: after every frame).
    """
    t_start = time.perf_counter()
    out = Path(out)
    with open_bag(bag_path) as bag:
        image_info, region_topic, topics = _check_request(bag, options)
        from_mask = options.mask_topic is not None
        check_output(out, bag_path, overwrite, resume)  # before the lock creates OUT
        with _locked(out):
            out_bag = prepare_output(out, Path(bag_path), overwrite, resume)
            state = replay_state(out_bag) if resume and out_bag.is_dir() else None
            state = state if state is not None and state.unfinished else None
            run = _run_info(Path(bag_path), options, captioner.name)
            if state is not None:
                _check_same_run(state, run, out_bag)
                log.warning("resuming %s: %s", out_bag, state.describe())
            writer = ReplayWriter(out, bag, options, run, resume=state, checkpoint_s=checkpoint_s)
            try:
                result = _run(bag, bag_path, writer, captioner, options, image_info, region_topic, topics,
                              from_mask, progress)
                result = replace(result, wall_s=time.perf_counter() - t_start)
            except BaseException:
                writer.fail()
                raise
    return result


def _run(bag: InputBag, bag_path: Path | str, writer: ReplayWriter, captioner: CaptionerLike,
         options: ReplayOptions, image_info: TopicInfo, region_topic: str, topics: set[str], from_mask: bool,
         progress: bool) -> ReplayResult:
    sync: StampSync[tuple[Any, str], Any] = StampSync(slop_s=options.slop_s, queue_size=options.queue_size)
    frames: list[FrameRecord] = []
    skipped: list[SkippedMessage] = []
    previews: dict[int, bytes] = {}
    cache = CaptionCache(options.cache_max_age_s, options.cache_iou_threshold,
                         untracked_iou=options.cache_untracked_iou) if options.cache else None
    recorded, stand_in = writer.recorded, _Recorded(captioner.name)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=image_info.count, desc="replay", unit="frame", leave=False, dynamic_ncols=True)
    seen = 0  # input messages processed
    try:
        for n, (topic, t, raw) in enumerate(bag.messages(topics)):
            seen = n + 1
            again = n < writer.messages_done  # already in the committed output of the interrupted run
            if n == writer.messages_done and len(frames) != len(recorded):
                raise _differs(writer, len(frames))
            if not again:
                writer.checkpoint(n, len(frames))
            msgtype = bag.topics[topic].msgtype
            try:
                msg = bag.deserialize(raw, msgtype)
                stamp = C.stamp_ns(msg.header)
            except (BagError, AttributeError) as err:
                skipped.append(SkippedMessage(topic, t, str(err)))
                log.warning("skipped a message on %s at log time %d: %s", topic, t, err)
                continue
            if not again:
                writer.copy(topic, msgtype, t, raw, msg)
            if topic == options.image_topic:
                pairs = sync.add_image(stamp, (msg, msgtype))
                if bar is not None:
                    bar.update(1)
            elif topic == region_topic:
                pairs = sync.add_regions(stamp, msg)
            else:
                continue
            for pair in pairs:
                k = len(frames)
                if k < len(recorded):  # committed before: the journal's captions, the same cache updates
                    stand_in.record = recorded[k]
                    record, result, image = _caption_pair(k, pair, stand_in, options, from_mask, cache)
                    if (record.stamp_ns, [r.caption for r in record.regions]) != (
                            recorded[k].stamp_ns, [r.caption for r in recorded[k].regions]):
                        raise _differs(writer, k)
                    record = recorded[k]
                else:
                    record, result, image = _caption_pair(k, pair, captioner, options, from_mask, cache)
                frames.append(record)
                if not again:
                    writer.frame(t, str(pair.image[0].header.frame_id), record, result, image)
                if image is not None and record.index < PREVIEW_FRAMES:
                    previews[record.index] = _preview(image, record.regions)
        sync.flush()
    finally:
        if bar is not None:
            bar.close()
    if len(frames) < len(recorded) or seen < writer.messages_done:
        raise _differs(writer, len(frames))
    result = ReplayResult(
        bag=str(bag_path), storage=bag.storage, out_bag=writer.out_bag, options=options, model=captioner.name,
        topics=dict(bag.topics), frames=frames, sync=sync.counters(), skipped=skipped, damage=list(bag.damage),
        written=writer.counts, wall_s=0.0, previews=previews)
    try:
        _check_pairs(result, region_topic)
    except BagError:
        writer.discard()  # a copy of the input without captions helps nobody
        raise
    writer.close(seen, len(frames))
    return replace(result, written=writer.counts)


def _differs(writer: ReplayWriter, frame: int) -> BagError:
    return BagError(f"cannot resume {writer.out_bag}: the input gives other frames than the interrupted run did "
                    f"(from frame {frame} on); the bag changed? Pass --overwrite to start again")


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
