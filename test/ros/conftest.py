"""Fixtures of the ROS-layer tests: one real tiny Captioner shared by the whole directory, message builders."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest

from pdlm_ros.ros import messages as M
from pdlm_ros.ros.convert import detection_array_msg, header_msg, image_to_msg
from pdlm_ros.types import RegionInput

W, H = 96, 72


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread: on a shared 2-core machine, a second thread mostly waits for the other work."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_captioner():
    from pdlm_ros.captioner import Captioner

    return Captioner.load(preset="tiny", seed=0)


class RecordingOutputs:
    """The transport side of the node core: records what the core publishes (the core is what is tested)."""

    def __init__(self, subscribers: dict[str, int] | None = None) -> None:
        self.messages: list[tuple[str, Any]] = []
        self.subscribers = subscribers or {}
        self._lock = threading.Lock()

    def publish(self, topic: str, msg: Any) -> None:
        with self._lock:
            self.messages.append((topic, msg))

    def subscriber_count(self, topic: str) -> int:
        return self.subscribers.get(topic, 0)

    def on(self, topic: str) -> list[Any]:
        with self._lock:
            return [m for t, m in self.messages if t == topic]


def frame(stamp: int, boxes: list[tuple[str, tuple[float, float, float, float]]], seed: int = 0):
    """An rgb8 Image with a filled rectangle per box and the matching Detection2DArray (same header)."""
    rng = np.random.default_rng(seed)
    img = rng.integers(60, 120, size=(H, W, 3), dtype=np.uint8)
    for k, (_, (x1, y1, x2, y2)) in enumerate(boxes):
        if all(np.isfinite([x1, y1, x2, y2])):
            img[max(int(y1), 0):max(int(y2), 0), max(int(x1), 0):max(int(x2), 0)] = (200, 40 * k % 255, 30)
    hdr = header_msg(stamp, "camera")
    dets = detection_array_msg(hdr, [RegionInput(box=b, region_id=i, class_id="thing", score=0.9) for i, b in boxes])
    return image_to_msg(img, hdr), dets


def image_type() -> Any:
    return M.typestore().types[M.IMAGE]
