"""Files that survive a crash: a JSON-backed dict rewritten atomically, and the atomic write itself.

Readers see the old file or the new one, never half of one: every write goes to a temporary file in the same folder
and is renamed over the target.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from pdlm_ros.errors import DatasetError

__all__ = ["JsonCache", "atomic_write_text"]


class JsonCache:
    """A dict persisted as one JSON file, rewritten atomically (temp file + rename) every `every` updates and on
    `flush()`; a crash loses at most the updates since the last write, never the file."""

    def __init__(self, path: str | Path, meta: dict[str, Any], every: int = 25) -> None:
        self.path = Path(path)
        self.meta = meta
        self.every = every
        self._lock = threading.Lock()
        self._dirty = 0
        self.data: dict[str, Any] = {}
        if self.path.is_file():
            try:
                doc = json.loads(self.path.read_text())
                self.data = dict(doc["entries"])
            except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
                raise DatasetError(f"cache file {self.path} is damaged ({err}); delete it to start over") from err
            if doc.get("meta") != meta:
                raise DatasetError(f"cache file {self.path} belongs to another run ({doc.get('meta')} vs {meta}); "
                                   "delete it or use another --out")
        self.loaded = len(self.data)

    def get(self, key: str) -> Any:
        with self._lock:
            return self.data.get(key)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self.data

    def put(self, key: str, value: Any) -> None:
        with self._lock:
            self.data[key] = value
            self._dirty += 1
            if self._dirty >= self.every:
                self._write()

    def flush(self) -> None:
        with self._lock:
            if self._dirty:
                self._write()

    def _write(self) -> None:
        atomic_write_text(self.path, json.dumps({"meta": self.meta, "entries": self.data}))
        self._dirty = 0


_UMASK = os.umask(0)
os.umask(_UMASK)  # read once: os.umask can only be read by setting it, which is not thread-safe


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write through a temporary file in the same folder and a rename: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
