"""Sample bags: generated scenes whose objects move across frames, recorded as a camera + tracker would record them.

A sample bag is a pure function of its `SampleBagSpec` (seed included), so a seed names a replay test case forever.
It holds, per frame:
- `/camera/image_raw`: sensor_msgs/Image, rgb8, at `fps`;
- `/detections`: vision_msgs/Detection2DArray with the image's header stamp (Detection2D.id = track id,
  class_id = shape, score 1), logged a few ms after the image as a detector's output would be;
- `/camera/instance_mask` (optional): mono16 labels, label = track number (the same string as the track id).
Beside the bag, `<name>.annotations.json` holds the ground truth per frame and track (attributes, caption, visible
box) that replay scores against.

Objects keep their appearance (shape, colour, size, pattern, shade) and track id for the whole bag; they move with
constant velocity and bounce off the image edges, so they occlude each other now and then. An object whose visible
share falls under `MIN_VISIBLE_TO_DETECT` is left out of the detections of that frame (a detector would miss it) and
marked `detected: false` in the annotations.

ROS 1 bags (`ros1=True`) use rosbags' ROS1_NOETIC typestore with the same vision_msgs 4.x definitions registered (the
ROS 2 layout: `bbox.center.position.x`), so one replay path reads both.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sqlite3
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from io import BytesIO
from pathlib import Path
from typing import Any

import apsw
import numpy as np
from rosbags.highlevel import AnyReader, AnyReaderError
from rosbags.interfaces import Connection, ConnectionExtRosbag1, MessageDefinition, MessageDefinitionFormat
from rosbags.rosbag1 import ReaderError as ReaderError1
from rosbags.rosbag1 import Writer as Writer1
from rosbags.rosbag2 import ReaderError as ReaderError2
from rosbags.rosbag2 import StoragePlugin
from rosbags.rosbag2 import Writer as Writer2
from rosbags.serde import SerdeError
from rosbags.typesys import Stores, get_types_from_idl, get_types_from_msg, get_typestore
from rosbags.typesys.store import Typestore

from pdlm_ros.data.scenes import ObjectSpec, Scene, render_scene, sample_specs
from pdlm_ros.errors import BagError, DatasetError
from pdlm_ros.ros import convert as C
from pdlm_ros.ros import messages as M

# rosbag2 metadata version of the bags written here. Version 9 stores the QoS profiles as a YAML list, which the
# rosbag2 of older distros (Humble) fails to parse; version 8 keeps them as a string that every distro reads.
ROSBAG2_VERSION = 8
from pdlm_ros.types import RegionInput

__all__ = [
    "IMAGE_TOPIC",
    "DETECTIONS_TOPIC",
    "MASK_TOPIC",
    "FRAME_ID",
    "STORAGES",
    "SampleBagSpec",
    "SampleBag",
    "TrackTruth",
    "ObjectTruth",
    "FrameTruth",
    "Annotations",
    "animate",
    "annotations_path_for",
    "load_annotations",
    "ros1_typestore",
    "to_ros1",
    "write_sample_bag",
    "TopicInfo",
    "InputBag",
    "open_bag",
]

log = logging.getLogger(__name__)

IMAGE_TOPIC = "/camera/image_raw"
DETECTIONS_TOPIC = "/detections"
MASK_TOPIC = "/camera/instance_mask"
FRAME_ID = "camera"
STORAGES = ("mcap", "sqlite3")
START_NS = 1_700_000_000 * 1_000_000_000  # first header stamp: a plausible wall-clock time, not 0 (zero stamps
# are what broken camera drivers send, and sync code may treat them specially)
DETECTOR_DELAY_NS = 8_000_000  # detections are logged 8 ms after their image; header stamps stay equal
MIN_VISIBLE_TO_DETECT = 0.3  # share of an object's pixels that must be visible for it to be detected
SPEED_PX_S = (15.0, 45.0)  # object speed range in px per second
SPIN_RAD_S = 0.6  # max rotation speed in rad per second
ANNOTATIONS_FORMAT = "pdlm_ros.sample_annotations"
ANNOTATIONS_VERSION = 1


@dataclass(frozen=True)
class SampleBagSpec:
    """What to record. Defaults give a 3 s, 15 Hz, 160x120 clip with 3 objects: small enough for CPU replay."""

    frames: int = 45
    fps: float = 15.0  # camera rate in Hz
    seed: int = 0
    width: int = 160  # px
    height: int = 120  # px
    objects: int = 3
    storage: str = "mcap"  # rosbag2 storage: "mcap" or "sqlite3" (ignored for ROS 1)
    ros1: bool = False
    with_mask: bool = True  # also record /camera/instance_mask

    def validate(self) -> None:
        """Raise DatasetError naming the first bad field."""
        if self.frames < 1:
            raise DatasetError(f"a sample bag needs at least 1 frame (got frames={self.frames})")
        if not (math.isfinite(self.fps) and 0 < self.fps <= 1000):
            raise DatasetError(f"fps must be in (0, 1000] Hz (got {self.fps})")
        if not (32 <= self.width <= 4096 and 32 <= self.height <= 4096):
            raise DatasetError(f"image size must be 32..4096 px per side (got {self.width}x{self.height})")
        if not 1 <= self.objects <= 16:
            raise DatasetError(f"objects must be 1..16 (got {self.objects})")
        if self.storage not in STORAGES:
            raise DatasetError(f"unknown storage {self.storage!r}; choose one of {', '.join(STORAGES)}")


# ----------------------------------------------------------------------------------------------------- annotations
@dataclass(frozen=True)
class TrackTruth:
    """What a track is: its attributes and its one true caption."""

    track_id: str
    shape: str
    color: str
    size: str
    pattern: str
    caption: str


@dataclass(frozen=True)
class ObjectTruth:
    """Where a track is in one frame. `box` covers the visible pixels, (x1, y1, x2, y2) px, x2/y2 exclusive."""

    track_id: str
    box: tuple[float, float, float, float]
    visible_fraction: float
    detected: bool  # False: too occluded, left out of the frame's detections


@dataclass(frozen=True)
class FrameTruth:
    index: int
    stamp_ns: int  # header stamp of the frame's image, detections and mask
    objects: tuple[ObjectTruth, ...]


@dataclass(frozen=True)
class Annotations:
    """Ground truth of a sample bag, keyed by header stamp (what replay pairs on)."""

    tracks: dict[str, TrackTruth]
    frames: tuple[FrameTruth, ...]
    width: int
    height: int
    fps: float
    seed: int
    topics: dict[str, str]  # role ("image", "detections", "mask") -> topic name
    _by_stamp: dict[int, FrameTruth] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_stamp", {f.stamp_ns: f for f in self.frames})

    def frame_at(self, stamp_ns: int) -> FrameTruth | None:
        """The frame whose header stamp is `stamp_ns`, or None."""
        return self._by_stamp.get(int(stamp_ns))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": ANNOTATIONS_FORMAT, "version": ANNOTATIONS_VERSION, "seed": self.seed, "fps": self.fps,
            "width": self.width, "height": self.height, "topics": dict(self.topics),
            "tracks": {k: asdict(t) for k, t in self.tracks.items()},
            "frames": [{"index": f.index, "stamp_ns": f.stamp_ns,
                        "objects": [{**asdict(o), "box": list(o.box)} for o in f.objects]} for f in self.frames],
        }

    @classmethod
    def from_dict(cls, doc: Any, source: str = "annotations") -> Annotations:
        """Parse `to_dict()` output; a malformed document raises DatasetError saying which field is wrong."""
        if not isinstance(doc, dict) or doc.get("format") != ANNOTATIONS_FORMAT:
            raise DatasetError(f"{source} is not a sample-bag annotations file (expected \"format\": "
                               f"\"{ANNOTATIONS_FORMAT}\"; write one with `pdlm-ros make-sample-bag`)")
        if doc.get("version") != ANNOTATIONS_VERSION:
            raise DatasetError(f"{source}: unsupported annotations version {doc.get('version')!r} "
                               f"(this package reads version {ANNOTATIONS_VERSION})")
        try:
            tracks = {str(k): TrackTruth(**{f: str(v[f]) for f in TrackTruth.__dataclass_fields__})
                      for k, v in doc["tracks"].items()}
            frames = tuple(
                FrameTruth(index=int(f["index"]), stamp_ns=int(f["stamp_ns"]), objects=tuple(
                    ObjectTruth(track_id=str(o["track_id"]), box=tuple(float(x) for x in o["box"]),  # type: ignore[arg-type]
                                visible_fraction=float(o["visible_fraction"]), detected=bool(o["detected"]))
                    for o in f["objects"]))
                for f in doc["frames"])
            ann = cls(tracks=tracks, frames=frames, width=int(doc["width"]), height=int(doc["height"]),
                      fps=float(doc["fps"]), seed=int(doc["seed"]), topics={str(k): str(v) for k, v in
                                                                              doc["topics"].items()})
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise DatasetError(f"{source} is malformed: {type(err).__name__}: {err}") from err
        unknown = sorted({o.track_id for f in frames for o in f.objects} - set(tracks))
        if unknown:
            raise DatasetError(f"{source}: frames name tracks that are not in \"tracks\": {', '.join(unknown)}")
        return ann


def annotations_path_for(bag: Path) -> Path:
    """`<dir>/<name>.annotations.json` beside the bag (`name` without a `.bag` suffix)."""
    bag = Path(bag)
    stem = bag.name[:-4] if bag.name.endswith(".bag") else bag.name
    return bag.with_name(f"{stem}.annotations.json")


def load_annotations(path: Path | str) -> Annotations:
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetError(f"annotations file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"cannot read annotations {path}: {err}") from err
    return Annotations.from_dict(doc, source=str(path))


# ------------------------------------------------------------------------------------------------------- animation
def animate(specs: Sequence[ObjectSpec], width: int, height: int, frames: int, fps: float,
            rng: np.random.Generator) -> Iterator[list[ObjectSpec]]:
    """Yield `frames` lists of specs: constant velocity and spin, bouncing off the image edges.

    The bounce keeps each object's circumscribed circle inside the image, so an object never leaves the frame and
    its track never ends.
    """
    dt = 1.0 / fps
    state = []
    for s in specs:
        speed, heading = rng.uniform(*SPEED_PX_S), rng.uniform(0, 2 * math.pi)
        state.append([s.center[0], s.center[1], speed * math.cos(heading), speed * math.sin(heading),
                      s.rotation, rng.uniform(-SPIN_RAD_S, SPIN_RAD_S)])
    for _ in range(frames):
        yield [replace(s, center=(st[0], st[1]), rotation=st[4]) for s, st in zip(specs, state)]
        for s, st in zip(specs, state):
            r = s.extent / 2 + 1
            st[0] += st[2] * dt
            st[1] += st[3] * dt
            st[4] += st[5] * dt
            for pos, vel, side in ((0, 2, width), (1, 3, height)):
                if st[pos] < r:
                    st[pos], st[vel] = 2 * r - st[pos], abs(st[vel])
                elif st[pos] > side - r:
                    st[pos], st[vel] = 2 * (side - r) - st[pos], -abs(st[vel])


def _scenes(spec: SampleBagSpec) -> Iterator[Scene]:
    rng = np.random.default_rng(spec.seed)
    specs = sample_specs(rng, spec.width, spec.height, spec.objects)
    if not specs:
        raise DatasetError(f"no object fits a {spec.width}x{spec.height} image; use a larger image")
    # Track ids "1", "2", ... equal the instance-mask labels, so box and mask replay name tracks alike.
    specs = [replace(s, track_id=str(k + 1)) for k, s in enumerate(specs)]
    background_seed = int(rng.integers(0, 2**63 - 1))  # one static background: a fixed camera
    for frame_specs in animate(specs, spec.width, spec.height, spec.frames, spec.fps, rng):
        yield render_scene(frame_specs, spec.width, spec.height, background_seed)


# ---------------------------------------------------------------------------------------------------------- writing
@dataclass(frozen=True)
class SampleBag:
    """Where a sample bag went and what it holds."""

    bag: Path
    annotations: Path
    frames: int
    detections: int  # Detection2D entries over all frames
    topics: dict[str, str]  # role -> topic
    storage: str  # "mcap", "sqlite3" or "ros1"


@lru_cache(maxsize=1)
def ros1_typestore() -> Typestore:
    """ROS1_NOETIC with the same vision_msgs (4.x layout) and pdlm_ros definitions as `messages.typestore()`."""
    store = get_typestore(Stores.ROS1_NOETIC)
    for name, text in [*M.VISION_MSGS.items(), *M.project_msgs().items()]:
        store.register(get_types_from_msg(text, name))
    return store


def to_ros1(msg: object, msgtype: str) -> object:
    """A ROS 2 message object of `messages.typestore()` as the same message of `ros1_typestore()` (Header gets seq 0).

    Uses rosbags' own field-by-name migration (the one `rosbags-convert` runs), not a hand-written copy.
    """
    from rosbags.convert.converter import migrate_message

    return migrate_message(M.typestore(), ros1_typestore(), msgtype, msgtype, {}, msg)


def _bag_paths(out: Path, ros1: bool, overwrite: bool) -> tuple[Path, Path]:
    out = Path(out)
    if ros1 and out.suffix != ".bag":
        out = out.with_name(out.name + ".bag")  # rosbags and ROS 1 tools recognise a ROS 1 bag by this suffix
    if not ros1 and out.suffix == ".bag":
        raise BagError(f"{out}: a '.bag' name means a ROS 1 bag file; pass --ros1, or choose a directory name "
                       "for a ROS 2 bag")
    ann = annotations_path_for(out)
    existing = [p for p in (out, ann) if p.exists() or p.is_symlink()]
    if existing and not overwrite:
        raise BagError(f"output exists already: {', '.join(map(str, existing))} (pass --overwrite to replace it)")
    base = out.parent.absolute()
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise BagError(f"cannot write {out}: {base} is a file, not a directory")
    try:
        for p in existing:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BagError(f"cannot write {out}: {err.strerror or err}") from None
    return out, ann


def write_sample_bag(out: Path | str, spec: SampleBagSpec = SampleBagSpec(), *, overwrite: bool = False,
                     progress: bool = False) -> SampleBag:
    """Record the clip of `spec` to `out` (a rosbag2 directory, or a `.bag` file for ROS 1) plus its annotations.

    Raises BagError when `out` exists (unless `overwrite`) and DatasetError for a bad spec. A failure while writing
    removes the half-written bag, so a bag on disk is always complete.
    """
    spec.validate()
    bag_path, ann_path = _bag_paths(Path(out), spec.ros1, overwrite)
    topics = {"image": IMAGE_TOPIC, "detections": DETECTIONS_TOPIC, **({"mask": MASK_TOPIC} if spec.with_mask else {})}
    store = ros1_typestore() if spec.ros1 else M.typestore()
    types = [("image", M.IMAGE), ("detections", M.DETECTION_ARRAY), ("mask", M.IMAGE)]

    tracks: dict[str, TrackTruth] = {}
    frames: list[FrameTruth] = []
    detections = 0
    writer: Writer1 | Writer2
    if spec.ros1:
        writer = Writer1(bag_path)
    else:
        plugin = StoragePlugin.MCAP if spec.storage == "mcap" else StoragePlugin.SQLITE3
        writer = Writer2(bag_path, version=ROSBAG2_VERSION, storage_plugin=plugin)
    try:
        with writer:
            conns = {role: writer.add_connection(topics[role], msgtype, typestore=store)
                     for role, msgtype in types if role in topics}

            def put(role: str, t_ns: int, msg: object, msgtype: str) -> None:
                if spec.ros1:
                    raw = store.serialize_ros1(to_ros1(msg, msgtype), msgtype)
                else:
                    raw = store.serialize_cdr(msg, msgtype)
                writer.write(conns[role], t_ns, raw)  # type: ignore[arg-type]

            scenes = _scenes(spec)
            if progress:
                from tqdm import tqdm

                scenes = tqdm(scenes, total=spec.frames, desc="recording", unit="frame", leave=False)
            for index, scene in enumerate(scenes):
                stamp = START_NS + round(index * 1e9 / spec.fps)
                header = C.header_msg(stamp, FRAME_ID)
                objects, regions = [], []
                for obj in scene.objects:
                    tracks.setdefault(obj.track_id, TrackTruth(obj.track_id, obj.shape, obj.color, obj.size,
                                                               obj.pattern, obj.caption))
                    detected = obj.visible_fraction >= MIN_VISIBLE_TO_DETECT and obj.box[2] > obj.box[0]
                    objects.append(ObjectTruth(obj.track_id, obj.box, round(obj.visible_fraction, 4), detected))
                    if detected:
                        regions.append(RegionInput(box=obj.box, region_id=obj.track_id, class_id=obj.shape,
                                                   score=1.0))
                detections += len(regions)
                frames.append(FrameTruth(index, stamp, tuple(objects)))
                put("image", stamp, C.image_to_msg(scene.image, header), M.IMAGE)
                if "mask" in topics:
                    put("mask", stamp, _mono16(scene.instance_mask, header), M.IMAGE)
                put("detections", stamp + DETECTOR_DELAY_NS, C.detection_array_msg(header, regions),
                    M.DETECTION_ARRAY)
        ann = Annotations(tracks=tracks, frames=tuple(frames), width=spec.width, height=spec.height, fps=spec.fps,
                          seed=spec.seed, topics=topics)
        ann_path.write_text(json.dumps(ann.to_dict(), indent=1) + "\n")
    except BaseException as err:
        if bag_path.is_dir():
            shutil.rmtree(bag_path, ignore_errors=True)
        else:
            bag_path.unlink(missing_ok=True)
        ann_path.unlink(missing_ok=True)
        if isinstance(err, OSError):  # a full disk, a read-only mount, no permission
            raise BagError(f"cannot write {err.filename or bag_path}: {err.strerror or err}; nothing was "
                           "left behind") from None
        raise
    storage = "ros1" if spec.ros1 else spec.storage
    log.info("wrote %s (%s, %d frames, %d detections) and %s", bag_path, storage, spec.frames, detections, ann_path)
    return SampleBag(bag=bag_path, annotations=ann_path, frames=spec.frames, detections=detections, topics=topics,
                     storage=storage)


def _mono16(labels: np.ndarray, header: object) -> object:
    """(H, W) uint16 labels -> sensor_msgs/Image mono16, little-endian (what x86 and ARM cameras send)."""
    h, w = labels.shape
    data = np.ascontiguousarray(labels.astype("<u2")).view(np.uint8).reshape(-1)
    return M.typestore().types[M.IMAGE](header=header, height=h, width=w, encoding="mono16", is_bigendian=0,
                                        step=2 * w, data=data)


# ---------------------------------------------------------------------------------------------------------- reading
# Everything a damaged file can raise while being read; caught at the one place that reports damage.
_READ_ERRORS: tuple[type[BaseException], ...] = (
    AnyReaderError, ReaderError1, ReaderError2, apsw.Error, sqlite3.Error, struct.error, EOFError, OSError,
    TypeError, ValueError, KeyError, IndexError, RuntimeError)
_MCAP_MAGIC = b"\x89MCAP0\r\n"


@dataclass(frozen=True)
class TopicInfo:
    msgtype: str
    count: int | None  # messages on the topic; None when the bag's index was unreadable and the file was scanned


class InputBag:
    """An input bag opened for reading: rosbags' AnyReader, or a record-by-record scan when the index is damaged.

    A recording cut off by a crash or power loss has no MCAP summary/footer or ROS 1 index, and rosbags refuses it;
    then the file is scanned from the front and every complete record is used. Whatever stops the reading (a
    truncated record, a bad chunk) ends `messages()` early and is appended to `damage`, so the caller processes
    what was readable and reports the rest. Rosbags' own record readers do the parsing; only the salvage loop is
    written here, because rosbags offers no "read until the damage" mode. The scan uses rosbags' record readers
    (`McapReader.meta_scan/messages_scan`, `rosbag1.reader.Header`), which are not its public API: checked against
    rosbags 0.11.
    """

    def __init__(self, path: Path, *, ros1: bool, storage: str, topics: dict[str, TopicInfo], typestore: Typestore,
                 scan: Callable[[set[str]], Iterator[tuple[str, int, bytes]]], close: Callable[[], None],
                 damage: list[str]) -> None:
        self.path = path
        self.ros1 = ros1
        self.storage = storage  # "mcap", "sqlite3" or "ros1"
        self.topics = topics
        self.typestore = typestore  # built from the definitions stored in the bag
        self.damage = damage  # what could not be read, in words; empty for a healthy bag
        self._scan = scan
        self._close = close

    def __enter__(self) -> InputBag:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._close()

    def describe_topics(self) -> str:
        """'/a (sensor_msgs/msg/Image, 10 msgs), ...' for error messages."""
        if not self.topics:
            return "(none)"
        return ", ".join(f"{name} ({t.msgtype}, {'?' if t.count is None else t.count} msgs)"
                         for name, t in sorted(self.topics.items()))

    def messages(self, topics: set[str]) -> Iterator[tuple[str, int, bytes]]:
        """(topic, log time ns, raw bytes) of `topics` in log-time order, up to the first unreadable record."""
        n, last = 0, None
        try:
            for topic, t, raw in self._scan(topics):
                n, last = n + 1, t
                yield topic, t, raw
        except _READ_ERRORS as err:
            where = f"after {n} messages (last log time {last} ns)" if n else "before the first message"
            self.damage.append(f"reading stopped {where}: {type(err).__name__}: {err}; the rest of the bag is "
                               "unreadable")
            log.warning("%s: %s", self.path, self.damage[-1])

    def deserialize(self, raw: bytes, msgtype: str) -> Any:
        """Raw bytes -> message object; BagError naming the type when the bytes do not decode."""
        try:
            if self.ros1:
                return self.typestore.deserialize_ros1(raw, msgtype)
            return self.typestore.deserialize_cdr(raw, msgtype)
        except _READ_ERRORS + (SerdeError, UnicodeDecodeError) as err:
            raise BagError(f"cannot decode a {msgtype} message ({len(raw)} bytes): {type(err).__name__}: "
                           f"{err}") from err


def _typestore_from(connections: Sequence[Connection], default: Typestore) -> Typestore:
    """The typestore a bag's own definitions describe (AnyReader's rule); `default` when it stores none."""
    store = get_typestore(Stores.EMPTY)
    defs = [c for c in connections if c.msgdef.format != MessageDefinitionFormat.NONE]
    if not defs:
        return default
    for c in defs:
        if c.msgdef.format == MessageDefinitionFormat.MSG:
            store.register(get_types_from_msg(c.msgdef.data, c.msgtype))
        else:
            store.register(get_types_from_idl(c.msgdef.data))
    return store


def _topics_of(connections: Sequence[Connection], counted: bool) -> dict[str, TopicInfo]:
    topics: dict[str, TopicInfo] = {}
    for c in connections:
        prev = topics.get(c.topic)
        count = (c.msgcount + (prev.count or 0 if prev else 0)) if counted else None
        topics[c.topic] = TopicInfo(c.msgtype, count)
    return topics


def _storage_of(path: Path) -> str:
    if path.suffix == ".bag":
        return "ros1"
    files = [path] if path.is_file() else list(path.iterdir())
    if any(f.suffix == ".mcap" for f in files):
        return "mcap"
    return "sqlite3" if any(f.suffix == ".db3" for f in files) else "unknown"


def _check_mcap_head(file: Path) -> None:
    """BagError when `file` cannot be an MCAP file at all (too short for its header, or another format)."""
    try:
        with file.open("rb") as f:
            head = f.read(len(_MCAP_MAGIC) + 1)
    except OSError as err:
        raise BagError(f"cannot read {file}: {err.strerror or err}") from None
    magic = _MCAP_MAGIC
    if head[:len(magic)] != magic[:len(head)]:
        raise BagError(f"{file} is not an MCAP file (it does not start with the MCAP magic bytes)")
    if len(head) <= len(magic):
        raise BagError(f"{file} holds only {file.stat().st_size} bytes: an MCAP file cut off before its header "
                       "record, with no message to read")


def _bag_files(path: Path) -> tuple[list[Path], bool]:
    """What AnyReader should open for `path`, and whether the rosbag2 metadata.yaml is missing.

    A directory without metadata.yaml (a recording killed before it wrote one) is read from its .mcap files
    directly; anything that is not a bag at all is a BagError saying what was found.
    """
    if path.is_file():
        if path.suffix == ".mcap":
            _check_mcap_head(path)
        elif path.suffix == ".db3":
            raise BagError(f"{path} is a sqlite3 bag file; give its directory (the one holding metadata.yaml)")
        elif path.suffix != ".bag":
            raise BagError(f"{path} is not a bag: replay reads a rosbag2 directory, an .mcap file or a ROS 1 .bag")
        return [path], False
    if not path.is_dir():
        raise BagError(f"{path} is not a bag (neither a file nor a directory)")
    if (path / "metadata.yaml").is_file():
        return [path], False
    entries = sorted(p.name for p in path.iterdir())
    if not entries:
        raise BagError(f"{path} is an empty directory, not a bag (a rosbag2 bag holds metadata.yaml and its .mcap "
                       "or .db3 files)")
    mcaps = sorted(path.glob("*.mcap"))
    if mcaps:
        for f in mcaps:
            _check_mcap_head(f)
        return mcaps, True
    if any(path.glob("*.db3")):
        raise BagError(f"{path} has no metadata.yaml (a recording stopped before writing it?); rebuild it with "
                       f"`ros2 bag reindex {path} sqlite3`, then replay again")
    shown = ", ".join(entries[:8]) + (f", ... ({len(entries)} in all)" if len(entries) > 8 else "")
    raise BagError(f"{path} is not a bag: no metadata.yaml and no .mcap or .db3 file in it (it holds {shown})")


def open_bag(path: Path | str) -> InputBag:
    """Open a ROS 2 bag (directory, sqlite3 or MCAP, or a bare .mcap file) or a ROS 1 `.bag` file; salvage it when
    its index is damaged. A bag directory without metadata.yaml is read from its .mcap files (and noted in `damage`;
    `pdlm-ros repair-bag DIR` writes the metadata).

    Raises BagError when the path is missing, is not a bag, or nothing in it can be read.
    """
    path = Path(path)
    if not path.exists():
        raise BagError(f"bag not found: {path}")
    files, no_metadata = _bag_files(path)
    ros1 = path.suffix == ".bag"
    default = ros1_typestore() if ros1 else M.typestore()
    notes = [f"{path} has no metadata.yaml; its MCAP files were read directly (`pdlm-ros repair-bag {path}` "
             "writes one)"] if no_metadata else []
    try:
        reader = AnyReader(files, default_typestore=default)
        reader.open()
    except _READ_ERRORS as err:
        reason = str(err) or type(err).__name__
        log.warning("%s: rosbags cannot open it (%s); scanning the file for readable records", path, reason)
        bag = _salvage(path, ros1, reason, default)
        bag.damage[:0] = notes
        return bag
    if notes:
        log.warning("%s", notes[0])

    def scan(topics: set[str]) -> Iterator[tuple[str, int, bytes]]:
        conns = [c for c in reader.connections if c.topic in topics]
        if conns:  # AnyReader reads every topic when given none
            for c, t, raw in reader.messages(connections=conns):
                yield c.topic, t, raw

    return InputBag(path, ros1=ros1, storage=_storage_of(path), topics=_topics_of(reader.connections, True),
                    typestore=reader.typestore, scan=scan, close=reader.close, damage=notes)


def _salvage(path: Path, ros1: bool, reason: str, default: Typestore) -> InputBag:
    if ros1:
        files, scanner = [path], _scan_ros1
    else:
        files = [path] if path.is_file() else sorted(path.glob("*.mcap"))
        scanner = _scan_mcap
        if not files:
            raise BagError(f"cannot read bag {path}: {reason} (no MCAP file to salvage in it; a damaged sqlite3 "
                           "bag cannot be scanned: try `sqlite3 FILE .recover`, then `ros2 bag reindex`)")
    damage = [f"index unreadable ({reason}); the file was scanned record by record"]
    connections: list[Connection] = []
    for f in files:
        try:
            for _ in scanner(f, connections, None):  # pass 1: collect connections (they precede their messages)
                pass
        except _READ_ERRORS:
            pass  # reported once, by the message pass
        except AttributeError as err:  # the record readers used here are those of rosbags 0.11
            raise BagError(f"cannot read bag {path}: {reason}; salvaging it needs rosbags 0.11 ({err})") from err
    if not connections:
        raise BagError(f"cannot read bag {path}: {reason}; no readable topic found in it")
    store = _typestore_from(connections, default)

    def scan(topics: set[str]) -> Iterator[tuple[str, int, bytes]]:
        for f in files:
            yield from scanner(f, [], topics)

    return InputBag(path, ros1=ros1, storage="ros1" if ros1 else "mcap", topics=_topics_of(connections, False),
                    typestore=store, scan=scan, close=lambda: None, damage=damage)


def _scan_mcap(file: Path, connections: list[Connection], topics: set[str] | None
               ) -> Iterator[tuple[str, int, bytes]]:
    """Scan an MCAP file front to back with rosbags' record reader; append channels to `connections`.

    With `topics` None only channels are collected (rosbags' meta scan); otherwise messages of `topics` are yielded.
    """
    from rosbags.rosbag2.storage_mcap import McapReader, read_sized

    reader = McapReader(file)
    with file.open("rb") as bio:
        reader.bio = bio
        if bio.read(8) != _MCAP_MAGIC or bio.read(1) != b"\x01":
            raise ReaderError2(f"{file} is not an MCAP file (bad magic or header)")
        read_sized(bio)  # the header record: profile and library
        reader.data_start, reader.data_end = bio.tell(), file.stat().st_size
        try:
            reader.meta_scan()  # fills reader.connections as it goes, so a partial scan keeps what it found
        except _READ_ERRORS:
            if topics is None:
                raise
        finally:
            if topics is None:
                connections.extend(reader.connections)
        if topics is None:
            return
        wanted = [c for c in reader.connections if c.topic in topics]
        for c, t, raw in reader.messages_scan(wanted):
            yield c.topic, t, raw


def _scan_ros1(file: Path, connections: list[Connection], topics: set[str] | None
               ) -> Iterator[tuple[str, int, bytes]]:
    """Scan a ROS 1 bag's chunks front to back with rosbags' record reader (an unindexed or cut-off `.bag`)."""
    from rosbags.rosbag1.reader import Header, RecordType, decompressors, normalize, read_bytes, read_uint32
    from rosbags.typesys.msg import normalize_msgtype

    conns: dict[int, Connection] = {}
    with file.open("rb") as bio:
        if not bio.readline().startswith(b"#ROSBAG V2.0"):
            raise ReaderError1(f"{file} is not a ROS 1 bag (bad magic line)")
        Header.read(bio, RecordType.BAGHEADER)
        bio.seek(read_uint32(bio), os.SEEK_CUR)
        size = file.stat().st_size
        while bio.tell() < size:
            header = Header.read(bio)
            data = read_bytes(bio, read_uint32(bio))
            if header.get_uint8("op") != RecordType.CHUNK:
                continue  # connection copies, index data and chunk infos repeat what the chunks hold
            chunk = BytesIO(decompressors[header.get_string("compression")](data))
            while chunk.tell() < len(chunk.getbuffer()):
                rec = Header.read(chunk)
                op = rec.get_uint8("op")
                if op == RecordType.CONNECTION:
                    info = Header.read(chunk)
                    cid = rec.get_uint32("conn")
                    conns[cid] = Connection(
                        cid, normalize(rec.get_string("topic")), normalize_msgtype(info.get_string("type")),
                        MessageDefinition(MessageDefinitionFormat.MSG, info.get_string("message_definition")),
                        info.get_string("md5sum"), 0, ConnectionExtRosbag1(None, None), None)
                    if topics is None and conns[cid] not in connections:
                        connections.append(conns[cid])
                    continue
                payload = read_bytes(chunk, read_uint32(chunk))
                if op == RecordType.MSGDATA and topics is not None:
                    conn = conns.get(rec.get_uint32("conn"))
                    if conn is not None and conn.topic in topics:
                        yield conn.topic, rec.get_time("time"), payload
