"""A planner-style subscriber over ROS-less DDS (a separate process of the end-to-end test).

Subscribes `captions` (pdlm_ros/RegionCaptionArray; with camera names as arguments, `NAME/captions` of each) and
`/diagnostics`, and prints one JSON line per message to stdout until it gets SIGTERM/SIGINT.
"""

from __future__ import annotations

import json
import signal
import sys
import threading

from pdlm_ros.ros import messages as M
from pdlm_ros.ros.convert import stamp_ns
from pdlm_ros.ros.transport_dds import DdsEndpoints

lock = threading.Lock()


def emit(doc: dict) -> None:
    with lock:
        print(json.dumps(doc), flush=True)


def on_captions(msg, topic: str = "captions") -> None:
    emit({"topic": topic, "stamp": stamp_ns(msg.header), "frame_id": msg.header.frame_id, "nfe": msg.nfe,
          "regions": [{"id": r.id, "index": r.index, "caption": r.caption, "cached": r.cached,
                                           "error": r.error} for r in msg.regions]})


def on_diagnostics(msg) -> None:
    for status in msg.status:
        emit({"topic": "diagnostics", "level": int(status.level), "message": status.message,
              "values": {kv.key: kv.value for kv in status.values}})


def main() -> int:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    ep = DdsEndpoints()
    for topic in [f"{cam}/captions" for cam in sys.argv[1:]] or ["captions"]:
        ep.subscribe(topic, M.CAPTION_ARRAY, lambda msg, t=topic: on_captions(msg, t), reliable=True, depth=50)
    ep.subscribe("/diagnostics", M.DIAGNOSTIC_ARRAY, on_diagnostics, reliable=True, depth=50)
    emit({"topic": "ready"})
    stop.wait()
    ep.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
