"""A rosbag2 MCAP bag that opens whatever moment its writing process dies (kill -9, power loss, a full disk).

A single MCAP file is readable by an indexed reader only once its summary and footer are written, at the very end;
a process killed before that leaves a file that neither rosbags nor mcap's indexed reader opens. So the bag is
written in segments, rosbag2's own multi-file layout: messages go to an open segment (rosbags' writer, in
`BAG/.open/`), and `commit()` finishes that segment as a complete MCAP file (chunks, summary, footer), fsyncs it,
moves it into the bag as `BAG/<name>_<k>.mcap`, and replaces `BAG/metadata.yaml` atomically (temporary file, fsync,
rename) by one listing every committed file. At any moment the bag directory therefore holds a metadata.yaml that
names only complete MCAP files: rosbags, `ros2 bag` and mcap's indexed reader open it, and what was lost is what
was written since the last commit. The metadata carries the caller's `custom_data` (rosbag2's string map), which is
where a caller records how far its work got; `SafeBagWriter(path, resume=True)` reopens a bag to append segments.

Nothing here is specific to captioning: `pdlm_ros.eval.replay` builds its output on it.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rosbags.rosbag2 import StoragePlugin, Writer, WriterError
from rosbags.typesys.store import Typestore

from pdlm_ros.data.bags import ROSBAG2_VERSION
from pdlm_ros.errors import BagError

__all__ = ["SafeBagWriter", "read_metadata", "repair_bag", "RepairResult", "OPEN_DIR"]

log = logging.getLogger(__name__)

OPEN_DIR = ".open"  # inside the bag: the segment being written (removed by commit, abort and resume)


def read_metadata(path: Path | str) -> dict[str, Any] | None:
    """`rosbag2_bagfile_information` of the bag at `path`, or None when it has no readable metadata.yaml."""
    try:
        doc = yaml.safe_load((Path(path) / "metadata.yaml").read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    info = doc.get("rosbag2_bagfile_information") if isinstance(doc, dict) else None
    return info if isinstance(info, dict) else None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SafeBagWriter:
    """Write a rosbag2 MCAP bag segment by segment; see the module docstring.

    `add_connection` returns a handle for `write`; connections are declared again in each segment's file, as every
    MCAP file of a bag must describe its own channels. OSError (a full disk) from `write` or `commit` leaves the
    committed part as it was: the open segment is removed, then the error is raised.
    """

    def __init__(self, path: Path | str, *, resume: bool = False, custom_data: Mapping[str, str] | None = None,
                 name: str | None = None) -> None:
        self.path = Path(path)
        self.name = name or self.path.name  # files are NAME_0.mcap, NAME_1.mcap, ... as rosbag2 names its splits
        self._conns: list[tuple[str, str, Typestore]] = []  # handle -> (topic, msgtype, typestore)
        self._files: list[dict[str, Any]] = []  # metadata `files` entries of the committed segments
        self._topics: dict[tuple[str, str], dict[str, Any]] = {}  # (topic, type) -> topics_with_message_count entry
        self._pending: dict[str, int] = {}  # topic -> messages in the open segment
        self._writer: Writer | None = None
        self._seg_conns: dict[int, Any] = {}
        self._next = 0
        self.custom_data: dict[str, str] = dict(custom_data or {})
        if resume:
            self._reopen()
        else:
            if self.path.exists():
                raise BagError(f"{self.path} exists already; a bag is written into a new directory")
            self._create()

    # -- public ----------------------------------------------------------------------------------------------------
    @property
    def counts(self) -> dict[str, int]:
        """Messages per topic: committed and in the open segment."""
        out: dict[str, int] = {}
        for (topic, _), entry in self._topics.items():
            out[topic] = out.get(topic, 0) + int(entry["message_count"])
        for topic, n in self._pending.items():
            out[topic] = out.get(topic, 0) + n
        return out

    @property
    def files(self) -> list[str]:
        """The committed MCAP files, in order."""
        return [f["path"] for f in self._files]

    def add_connection(self, topic: str, msgtype: str, typestore: Typestore) -> int:
        self._conns.append((topic, msgtype, typestore))
        return len(self._conns) - 1

    def write(self, handle: int, timestamp: int, data: bytes | memoryview) -> None:
        with self._guard():
            if self._writer is None:
                self._open_segment()
            assert self._writer is not None
            conn = self._seg_conns.get(handle)
            if conn is None:
                topic, msgtype, store = self._conns[handle]
                conn = self._seg_conns[handle] = self._writer.add_connection(topic, msgtype, typestore=store)
            self._writer.write(conn, timestamp, data)
            topic = self._conns[handle][0]
            self._pending[topic] = self._pending.get(topic, 0) + 1

    def commit(self, custom_data: Mapping[str, str] | None = None) -> None:
        """Finish the open segment (if any message went into it) and publish it with the metadata.

        All or nothing: when it fails, the bag on disk and this writer are as before the call (the open segment's
        messages are lost), so the caller's record of what is committed stays true."""
        before = (list(self._files), copy.deepcopy(self._topics), self._next, dict(self.custom_data))
        try:
            with self._guard():
                if custom_data is not None:
                    self.custom_data = dict(custom_data)
                if self._writer is not None:
                    self._close_segment()
                self._write_metadata()
        except BaseException:
            listed = {f["path"] for f in before[0]}
            for f in self._files:  # moved in, never listed: not part of the bag
                if f["path"] not in listed:
                    with contextlib.suppress(OSError):
                        (self.path / f["path"]).unlink()
            self._files, self._topics, self._next, self.custom_data = before
            raise

    def abort(self) -> None:
        """Drop the open segment; the committed bag stays as it is."""
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.abort()
            except Exception:  # noqa: BLE001 - the segment is deleted next whatever state its writer is in
                pass
        self._seg_conns, self._pending = {}, {}
        shutil.rmtree(self.path / OPEN_DIR, ignore_errors=True)

    def _create(self) -> None:
        """The empty bag (metadata.yaml, no file), made beside its place and renamed in: the directory never exists
        without its metadata."""
        final = self.path
        tmp = final.parent / f".{final.name}.creating"
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            self.path = tmp
            self._write_metadata()
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            self.path = final
        os.replace(tmp, final)

    # -- segments --------------------------------------------------------------------------------------------------
    def _segment_name(self, k: int) -> str:
        return f"{self.name}_{k}"

    def _open_segment(self) -> None:
        seg = self.path / OPEN_DIR / self._segment_name(self._next)
        shutil.rmtree(seg, ignore_errors=True)
        seg.parent.mkdir(exist_ok=True)
        self._writer = Writer(seg, version=ROSBAG2_VERSION, storage_plugin=StoragePlugin.MCAP)
        self._writer.open()
        self._seg_conns = {}

    def _close_segment(self) -> None:
        assert self._writer is not None
        seg = self._writer.path
        self._writer.close()
        self._writer = None
        info = read_metadata(seg)
        if info is None:
            raise BagError(f"rosbags wrote no readable metadata for segment {seg}")
        name = f"{seg.name}.mcap"
        _fsync(seg / name)
        os.replace(seg / name, self.path / name)
        shutil.rmtree(seg, ignore_errors=True)
        with contextlib.suppress(OSError):
            (self.path / OPEN_DIR).rmdir()  # only when empty
        self._files.extend(info["files"])
        for entry in info["topics_with_message_count"]:
            meta = entry["topic_metadata"]
            key = (meta["name"], meta["type"])
            if key in self._topics:
                self._topics[key]["message_count"] += int(entry["message_count"])
            else:
                self._topics[key] = {"topic_metadata": meta, "message_count": int(entry["message_count"])}
        self._pending, self._seg_conns = {}, {}
        self._next += 1

    def _write_metadata(self) -> None:
        files = [f for f in self._files if f["message_count"]]
        start = min((f["starting_time"]["nanoseconds_since_epoch"] for f in files), default=0)
        end = max((f["starting_time"]["nanoseconds_since_epoch"] + f["duration"]["nanoseconds"] for f in files),
                  default=0)
        info = {
            "version": ROSBAG2_VERSION,
            "storage_identifier": "mcap",
            "relative_file_paths": [f["path"] for f in self._files],
            "duration": {"nanoseconds": end - start},
            "starting_time": {"nanoseconds_since_epoch": start},
            "message_count": sum(int(f["message_count"]) for f in self._files),
            "topics_with_message_count": list(self._topics.values()),
            "compression_format": "",
            "compression_mode": "",
            "files": self._files,
            "custom_data": self.custom_data or None,
            "ros_distro": "rosbags",
        }
        tmp = self.path / "metadata.yaml.tmp"
        try:
            with tmp.open("w", encoding="utf8") as f:
                yaml.safe_dump({"rosbag2_bagfile_information": info}, f, default_flow_style=False, sort_keys=False)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, self.path / "metadata.yaml")  # the commit point: nothing after it may fail the commit
        with contextlib.suppress(OSError):
            _fsync(self.path)  # so that the rename itself survives a power loss

    def _reopen(self) -> None:
        info = read_metadata(self.path)
        if info is None:
            raise BagError(f"{self.path} has no readable metadata.yaml to resume from")
        self._files = list(info.get("files") or [])
        for entry in info.get("topics_with_message_count") or []:
            meta = entry["topic_metadata"]
            self._topics[(meta["name"], meta["type"])] = {"topic_metadata": meta,
                                                           "message_count": int(entry["message_count"])}
        self.custom_data = {**dict(info.get("custom_data") or {}), **self.custom_data}
        listed = set(self.files)
        pattern = re.compile(rf"^{re.escape(self.name)}_(\d+)\.mcap$")
        indices = [int(m.group(1)) for f in listed if (m := pattern.match(f))]
        self._next = max(indices, default=-1) + 1
        # A file moved in but not yet listed when the writer died: its messages are written again after resume.
        for f in self.path.glob(f"{self.name}_*.mcap"):
            if f.name not in listed:
                f.unlink()
        shutil.rmtree(self.path / OPEN_DIR, ignore_errors=True)
        (self.path / "metadata.yaml.tmp").unlink(missing_ok=True)

    def _guard(self) -> "_Guard":
        return _Guard(self)


class _Guard:
    """On an OSError (or rosbags' WriterError) inside a write: drop the open segment, then let the error go on."""

    def __init__(self, writer: SafeBagWriter) -> None:
        self.writer = writer

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is not None and isinstance(exc, (OSError, WriterError)):
            self.writer.abort()
        return False


# ---------------------------------------------------------------------------------------------------------- repair
@dataclass(frozen=True)
class RepairResult:
    path: Path
    action: str  # "none" (it opened as it was), "cleaned" (unfinished segment removed), "rewritten"
    messages: int  # messages in the bag after the repair
    files: list[str]  # its data files
    damage: list[str]  # what the reading of the original reported (rewritten only)
    kept: Path | None = None  # where the original files went (rewritten only)


def _opens(path: Path) -> int | None:
    """Messages in the bag when rosbags opens it from its metadata and every file's index, else None."""
    from rosbags.highlevel import AnyReader, AnyReaderError

    try:
        with AnyReader([path]) as reader:
            return int(reader.message_count)
    except (AnyReaderError, OSError, KeyError, TypeError, ValueError) as err:
        log.info("%s does not open as it is: %s", path, err)
        return None


def repair_bag(path: Path | str) -> RepairResult:
    """Make a rosbag2 MCAP directory readable by every tool, keeping every complete message.

    - A bag that opens as it is: only an unfinished segment left by a killed `SafeBagWriter` is removed.
    - A directory whose metadata.yaml is missing (a recording killed before writing it) or whose MCAP files lack
      their summary (cut off): every readable message is copied into new, complete MCAP files with a new
      metadata.yaml (`pdlm_ros.data.bags.open_bag` reads what it can, up to the first damage); the original files
      are moved to DIR/damaged/, never deleted. QoS profiles the originals held are not kept.
    Raises BagError for what cannot be repaired here (sqlite3 and ROS 1 bags, no readable message).
    """
    from pdlm_ros.data.bags import open_bag

    path = Path(path)
    if not path.is_dir():
        raise BagError(f"repair-bag works on a rosbag2 directory; {path} is " +
                       ("a file: put it in a directory of its own" if path.is_file() else "not there"))
    if (path / "bag" / "metadata.yaml").is_file() or (path / "bag" / OPEN_DIR).is_dir():
        path = path / "bag"  # a replay's output directory
    if any(path.glob("*.db3")):
        raise BagError(f"{path} is a sqlite3 bag; rebuild its metadata with `ros2 bag reindex {path} sqlite3` "
                       "(a damaged database: `sqlite3 FILE .recover` first)")
    count = _opens(path) if (path / "metadata.yaml").is_file() else None
    if count is not None:
        unfinished = (path / OPEN_DIR).exists()
        if unfinished:
            SafeBagWriter(path, resume=True).commit()  # drops .open/ and unlisted segments, keeps the rest
        files = list((read_metadata(path) or {}).get("relative_file_paths") or [])
        return RepairResult(path, "cleaned" if unfinished else "none", count, files, [])
    originals = sorted(p for p in path.glob("*.mcap"))
    if not originals:
        raise BagError(f"{path} holds no .mcap file to repair")
    tmp = path.parent / f".{path.name}.repairing"
    shutil.rmtree(tmp, ignore_errors=True)
    with open_bag(path) as bag:
        writer = SafeBagWriter(tmp, name=path.name)
        handles = {topic: writer.add_connection(topic, info.msgtype, bag.typestore)
                   for topic, info in bag.topics.items()}
        n = 0
        try:
            for topic, t, raw in bag.messages(set(bag.topics)):
                writer.write(handles[topic], t, raw)
                n += 1
            writer.commit({"pdlm_ros.repaired_from": ", ".join(f.name for f in originals)})
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        damage = list(bag.damage)
    if n == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BagError(f"no readable message in {path} ({'; '.join(damage) or 'empty'}); nothing to repair")
    kept = path / "damaged"
    kept.mkdir(exist_ok=True)
    for f in [*originals, path / "metadata.yaml"]:
        if f.exists():
            os.replace(f, kept / f.name)
    for f in writer.files:
        os.replace(tmp / f, path / f)
    os.replace(tmp / "metadata.yaml", path / "metadata.yaml")
    shutil.rmtree(tmp, ignore_errors=True)
    _fsync(path)
    return RepairResult(path, "rewritten", n, writer.files, damage, kept)
