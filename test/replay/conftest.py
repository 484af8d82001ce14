"""Fixtures for replay tests: tiny real bags written with rosbags into tmp_path, and one thread for torch.

One thread: these tests run the tiny model frame by frame, and on a busy CPU extra intra-op threads only wait.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from rosbags.highlevel import AnyReader
from rosbags.rosbag2 import StoragePlugin, Writer

from pdlm_ros.ros import messages as M


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_bag(path: Path, messages: Sequence[tuple[str, str, int, Any]], storage: str = "mcap",
              extra_topics: Sequence[tuple[str, str]] = ()) -> Path:
    """A rosbag2 bag holding `messages` = [(topic, msgtype, log time ns, message object or raw bytes)].

    `extra_topics` adds connections without messages. Message objects are serialised with the project typestore.
    """
    store = M.typestore()
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    with Writer(path, version=9, storage_plugin=plugin) as w:
        conns: dict[str, Any] = {}
        for topic, msgtype in [*((m[0], m[1]) for m in messages), *extra_topics]:
            if topic not in conns:
                conns[topic] = w.add_connection(topic, msgtype, typestore=store)
        for topic, msgtype, t, msg in messages:
            raw = msg if isinstance(msg, (bytes, bytearray)) else store.serialize_cdr(msg, msgtype)
            w.write(conns[topic], t, raw)
    return path


def read_bag(path: Path) -> dict[str, list[tuple[int, Any]]]:
    """Every message of a bag by topic, decoded by rosbags itself (AnyReader, the bag's own definitions)."""
    out: dict[str, list[tuple[int, Any]]] = {}
    with AnyReader([Path(path)]) as reader:
        for conn, t, raw in reader.messages():
            out.setdefault(conn.topic, []).append((t, reader.deserialize(raw, conn.msgtype)))
    return out


def stamp(header: Any) -> int:
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)
