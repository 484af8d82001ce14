"""A camera + tracker publishing over ROS-less DDS (a separate process of the end-to-end test).

Publishes `image` (rgb8) and `detections` (same header, tracked ids) at --hz, with objects moving across generated
scenes; frame --bad-frame gets an unsupported encoding. Prints one JSON line per published frame to stdout:
{"stamp": ns, "ids": [...], "bad": bool}.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np

from pdlm_ros.data.scenes import ObjectSpec, render_scene
from pdlm_ros.ros import messages as M
from pdlm_ros.ros.convert import detection_array_msg, header_msg, image_to_msg
from pdlm_ros.ros.transport_dds import DdsEndpoints
from pdlm_ros.types import RegionInput

W, H = 128, 96
OBJECTS = (("circle", "red", "large", "solid", "track-1"), ("square", "blue", "small", "striped", "track-2"),
           ("star", "yellow", "large", "dotted", "track-3"))


def specs(t: float) -> list[ObjectSpec]:
    out = []
    for k, (shape, color, size, pattern, tid) in enumerate(OBJECTS):
        cx = 20 + (k * 35 + 30 * t) % (W - 40)  # moving right, wrapping around
        cy = 25 + 25 * k + 5 * math.sin(t + k)
        out.append(ObjectSpec(shape=shape, color=color, size=size, pattern=pattern, center=(cx, cy),
                              extent=34.0 if size == "large" else 20.0, rotation=0.2 * t, track_id=tid))
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--hz", type=float, default=20.0)
    ap.add_argument("--start-ns", type=int, default=1_000_000_000_000)
    ap.add_argument("--bad-frame", type=int, default=-1)
    ap.add_argument("--wait-subscribers", type=float, default=20.0, help="seconds to wait for the node to match")
    ap.add_argument("--extra-boxes", type=int, default=0, help="this many more small boxes in every detection array")
    ap.add_argument("--reliable", action="store_true", help="reliable writers (large detection arrays)")
    ap.add_argument("--camera", default="", help="publish on CAMERA/image and CAMERA/detections, frame CAMERA_optical")
    ap.add_argument("--seed", type=int, default=7, help="background of the scenes")
    a = ap.parse_args()
    ep = DdsEndpoints()
    image_topic, dets_topic = (f"{a.camera}/image", f"{a.camera}/detections") if a.camera else ("image", "detections")
    frame_id = f"{a.camera}_optical" if a.camera else "camera_optical_frame"
    ep.writer(image_topic, M.IMAGE, reliable=a.reliable, depth=5)
    ep.writer(dets_topic, M.DETECTION_ARRAY, reliable=a.reliable, depth=5)
    extra = [RegionInput(box=(x, y, x + 12.0, y + 12.0), region_id=f"x{k}") for k, (x, y) in
             enumerate(np.random.default_rng(0).uniform(0, min(W, H) - 12, size=(a.extra_boxes, 2)))]
    deadline = time.monotonic() + a.wait_subscribers
    while min(ep.subscriber_count(image_topic), ep.subscriber_count(dets_topic)) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    period = 1.0 / a.hz
    t0 = time.monotonic()
    for k in range(a.frames):
        stamp = a.start_ns + int(k * period * 1e9)
        scene = render_scene(specs(k * period), W, H, background_seed=a.seed)
        hdr = header_msg(stamp, frame_id)
        visible = [o for o in scene.objects if o.visible_fraction > 0.3]
        image = image_to_msg(scene.image, hdr)
        if k == a.bad_frame:
            image.encoding = "yuv422"
        dets = detection_array_msg(hdr, [RegionInput(box=o.box, region_id=o.track_id, class_id=o.shape, score=0.9)
                                         for o in visible] + extra)
        ep.publish(image_topic, image)
        ep.publish(dets_topic, dets)
        print(json.dumps({"stamp": stamp, "ids": [o.track_id for o in visible], "bad": k == a.bad_frame}), flush=True)
        time.sleep(max(0.0, t0 + (k + 1) * period - time.monotonic()))
    time.sleep(0.5)  # let reliable peers drain before the participant goes away
    ep.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
