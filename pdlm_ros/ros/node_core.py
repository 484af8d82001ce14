"""The captioning node without ROS: lifecycle, input handling, a one-slot frame buffer and a worker thread.

Transports (rclpy, Cyclone DDS) only move messages: they call `on_image`/`on_compressed`/`on_detections`/
`on_instance_mask` with rosbags message objects and give the core an `Outputs` to publish through.

Data path: input callbacks only stamp-sync (`StampSync`) and put the newest pair into a ONE-slot buffer, replacing
(and counting as dropped) a pair the worker has not started yet; they never run the model. The worker thread takes
the slot, decodes the image, builds regions, reuses cached captions of tracked regions (`CaptionCache`), runs
`Captioner.caption` on the rest and publishes a RegionCaptionArray with the image's header, plus annotated_image
while someone subscribes. So memory is bounded (one pair in the slot, `sync.queue_size` per stream in the sync) and
the output always follows the newest input: latency is at most one frame of waiting plus one inference.

Several cameras (parameter `cameras`): each camera has its own topics (`NAME/image`, `NAME/detections`,
`NAME/captions`, ...), sync, caption cache and one-slot buffer. The worker takes the newest pair of EVERY camera
that has one and captions their regions together (`Captioner.caption_frames`: shared denoising passes, each region
reading only its own frame's prefix, so every caption is the one its frame alone would get); nothing waits for a
slower camera, so frames share a pass exactly when they arrived while the worker was busy. A backend without
`caption_frames` (the graph backends), or a batch that fails, is captioned one frame at a time, so one bad frame
never costs the others theirs.

Bad input never stops the node: a rejected image or region message is logged (throttled), counted by kind in
/diagnostics, and the next frame is processed as usual. A refused region stays in the output with its error.
Work per frame is bounded whatever one message holds: an image of more than `input.max_pixels` is refused (a
compressed one before it is decoded), and at most `regions.max_per_frame` regions are captioned, the best by
detector score, then area; the others are refused with that reason before the cache or the model sees them. More
regions than the model's max_regions are captioned in further passes (the captioner's rule); nothing is dropped.

/diagnostics comes from a reporter thread of its own, so it keeps its period while the worker is inside a long
inference (`busy_s` says for how long).

Lifecycle (ROS 2 managed-node states): configure loads the model; activate starts the worker (reloading the model
if deactivate freed it); deactivate stops the worker and frees the model (GPU memory goes back while inactive);
cleanup forgets caches and counters; shutdown does whatever is left. A stop in the middle of a frame cancels it
between two model forwards, and deactivate waits at most SHUTDOWN_WAIT_S for the worker, so SIGTERM ends the node
within seconds even mid-inference.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pdlm_ros.errors import Cancelled, ConfigError, ImageInputError, PDLMError, RegionInputError
from pdlm_ros.region_rules import apply_region_budget
from pdlm_ros.ros import messages as M
from pdlm_ros.ros.cache import CaptionCache, remember, reuse_cached
from pdlm_ros.ros.convert import (caption_array_msg, header_msg, image_annotations_msg, image_from_compressed,
                                  image_from_msg, image_to_msg, regions_from_detections, regions_from_instance_mask,
                                  scale_regions, stamp_ns)
from pdlm_ros.ros.diagnostics import NodeHealth, Throttle, classify_error, diagnostic_array_msg
from pdlm_ros.ros.params import NodeParams
from pdlm_ros.ros.sync import Pair, StampSync
from pdlm_ros.types import FrameResult, FrameStats, RegionInput

__all__ = ["TopicSpec", "Outputs", "NodeCore", "Camera", "input_topics", "output_topics", "OUTPUT_TOPICS",
           "load_captioner", "engine_root", "model_info_msg", "abandoned_workers", "SHUTDOWN_WAIT_S"]

log = logging.getLogger("pdlm_ros.node")

# An image stream "stopped and came back" when the gap is both this long and this many normal periods: a 30 Hz
# camera that hiccups for 200 ms is not a restart, a 1 Hz one that skips a frame neither.
STREAM_GAP_MIN_S = 1.0
STREAM_GAP_PERIODS = 5.0
# How long deactivate waits for a worker still inside one model call after the stop was asked (a forward of a
# large model on a CPU can take longer than a cancelled frame should keep the node alive; the thread is a daemon).
SHUTDOWN_WAIT_S = 3.0
# Best-effort DDS drops a whole sample when one of its fragments is lost, and nothing reports it. Over loopback,
# 640x480 rgb8 frames (0.9 MB) all arrived and about half of the 1280x720 ones (2.8 MB) did (docs/ros.md, Topics);
# past this size a warning says so.
BEST_EFFORT_LARGE_BYTES = 1_000_000
_ABANDONED: list[threading.Thread] = []  # workers a stop did not end in SHUTDOWN_WAIT_S


def abandoned_workers() -> list[threading.Thread]:
    """Workers still running inside a model call after their node was stopped. A process must not run its
    interpreter shutdown under them (a C++ extension mid-call aborts it): `pdlm-ros node` ends with os._exit."""
    return [t for t in _ABANDONED if t.is_alive()]


@dataclass(frozen=True)
class TopicSpec:
    """A topic of the node. Names are relative ROS names (remapped by launch files); `/diagnostics` is absolute."""

    name: str
    msgtype: str
    handler: str = ""  # NodeCore method for an input (inputs get the `input.qos` QoS; outputs are reliable)
    latched: bool = False  # output kept for late subscribers (transient local, depth 1)
    camera: int = 0  # an input's camera: the index into the `cameras` parameter (0 with none)


def _camera_topic(camera: str, name: str) -> str:
    return f"{camera}/{name}" if camera else name


_PER_CAMERA_OUTPUTS = (
    TopicSpec("captions", M.CAPTION_ARRAY),
    TopicSpec("annotated_image", M.IMAGE),
    TopicSpec("annotations", M.IMAGE_ANNOTATIONS),
)
_NODE_OUTPUTS = (
    TopicSpec("model_info", M.MODEL_INFO, latched=True),
    TopicSpec("/diagnostics", M.DIAGNOSTIC_ARRAY),
)
OUTPUT_TOPICS = (*_PER_CAMERA_OUTPUTS, *_NODE_OUTPUTS)  # of a node with one camera (no `cameras`)


def _camera_names(p: NodeParams) -> tuple[str, ...]:
    return p.cameras or ("",)


def input_topics(p: NodeParams) -> list[TopicSpec]:
    """Image and region-source subscriptions: two per camera."""
    image = (TopicSpec("image/compressed", M.COMPRESSED_IMAGE, "on_compressed") if p.input_compressed
             else TopicSpec("image", M.IMAGE, "on_image"))
    regions = {"detections": TopicSpec("detections", M.DETECTION_ARRAY, "on_detections"),
               "yolo": TopicSpec("detections", M.YOLO_DETECTION_ARRAY, "on_detections"),
               "instance_mask": TopicSpec("instance_mask", M.IMAGE, "on_instance_mask")}[p.regions_source]
    return [dataclasses.replace(spec, name=_camera_topic(cam, spec.name), camera=k)
            for k, cam in enumerate(_camera_names(p)) for spec in (image, regions)]


def output_topics(p: NodeParams) -> list[TopicSpec]:
    """Captions, annotated_image and annotations per camera, then model_info and /diagnostics once."""
    return [dataclasses.replace(spec, name=_camera_topic(cam, spec.name))
            for cam in _camera_names(p) for spec in _PER_CAMERA_OUTPUTS] + list(_NODE_OUTPUTS)


@dataclass
class Camera:
    """One camera/region-source pair: its sync, caption cache (track ids are per camera), newest-pair slot and
    what its diagnostics compare with the last report."""

    name: str  # "" = the node's own topics (no `cameras` parameter)
    sync: StampSync[Any, Any]
    cache: CaptionCache
    slot: tuple[Pair[Any, Any], float] | None = None  # the newest pair and when it became complete
    last_image_at: float | None = None
    image_period: float | None = None  # the last normal interval between images
    inputs: tuple[int, int] = (0, 0)  # (images, region messages) received while active and enabled
    prev_matched: int = 0
    prev_inputs: tuple[int, int] = (0, 0)
    prev_expired_regions: int = 0
    prev_pending_regions: int = 0

    def topic(self, name: str) -> str:
        return _camera_topic(self.name, name)

    @property
    def label(self) -> str:
        """' camera NAME' for log lines of a node with several cameras; '' with one."""
        return f" camera {self.name!r}" if self.name else ""


class Outputs(Protocol):
    def publish(self, topic: str, msg: Any) -> None: ...

    def subscriber_count(self, topic: str) -> int: ...


def engine_root() -> Path:
    """Where exported graphs and engines go when `engine_path` is empty: `$ROS_HOME/pdlm_ros/engines` (ROS_HOME
    defaults to ~/.ros), an absolute path, so a node started with cwd `/` (systemd) does not write into `/`."""
    ros_home = os.environ.get("ROS_HOME") or os.path.join(os.path.expanduser("~"), ".ros")
    return Path(ros_home).resolve() / "pdlm_ros" / "engines"


def load_captioner(p: NodeParams) -> Any:
    """The captioner the parameters ask for, on the asked backend (imports torch only now)."""
    import torch

    from pdlm_ros.runtime import load_captioner as load_backend

    device = ("cuda" if torch.cuda.is_available() else "cpu") if p.device == "auto" else p.device
    return load_backend(p.checkpoint or None, backend=p.backend, engine_path=p.engine_path or None,
                        preset=p.preset or None, device=device, seed=p.seed, engine_root=engine_root())


def read_class_names(path: str) -> list[str]:
    """A labels file: one class name per line, line i naming class id i (blank lines keep their index)."""
    if not path:
        return []
    try:
        names = [line.strip() for line in Path(path).expanduser().read_text().splitlines()]
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"parameter 'regions.class_names': cannot read labels file {path!r}: {err}") from None
    if not any(names):
        raise ConfigError(f"parameter 'regions.class_names': labels file {path!r} names no class")
    return names


def name_classes(regions: list[RegionInput], names: list[str]) -> list[RegionInput]:
    """Numeric class ids found in `names` replaced by the name; other ids unchanged."""
    out = []
    for reg in regions:
        cid = reg.class_id.strip()
        if cid.isdigit() and int(cid) < len(names) and names[int(cid)]:
            reg = dataclasses.replace(reg, class_id=names[int(cid)])
        out.append(reg)
    return out


def _resolved_mode(captioner: Any, mode: str) -> str:
    """The mode `auto` stands for with this captioner (parallel, or official for the released PerceptionDLM)."""
    resolve = getattr(captioner, "resolve_mode", None)
    return str(resolve(mode)) if callable(resolve) else mode


def model_info_msg(captioner: Any, p: NodeParams, header: Any) -> Any:
    """pdlm_ros/ModelInfo of a loaded captioner (fields the backend does not report stay empty or 0)."""
    cfg = getattr(captioner, "config", None)
    dec = getattr(cfg, "decoding", None)
    region = getattr(cfg, "region", None)
    return M.typestore().types[M.MODEL_INFO](
        header=header, name=str(getattr(captioner, "name", "")), checkpoint=p.checkpoint,
        layout=str(getattr(captioner, "layout", "") or getattr(cfg, "layout", "") or ""), backend=p.backend,
        device=str(getattr(captioner, "device", "")), decoding_mode=_resolved_mode(captioner, p.decoding_mode),
        decoding_steps=int(p.decoding_steps or getattr(dec, "steps", 0) or 0),
        caption_len=int(getattr(dec, "caption_len", 0) or 0),
        max_regions=int(getattr(region, "max_regions", 0) or 0))


@dataclass
class _Frame:
    """A synced pair between its checks and its publish."""

    cam: Camera
    pair: Pair[Any, Any]
    t0: float  # when the pair was complete (latency counts from here)
    rgb: Any
    regions: list[RegionInput]
    cached: dict[int, tuple[Any, float]]  # region index -> (cached caption, age in s)
    todo: list[int]  # region indices to caption now
    boxes: list[Any]  # what `remember` needs to store the fresh captions
    result: FrameResult | None = None  # the captions of `todo`, once captioned (None: none to caption, or failed)


class NodeCore:
    STATES = ("unconfigured", "inactive", "active", "finalized")

    def __init__(self, params: NodeParams, outputs: Outputs, *, name: str = "pdlm_node",
                 loader: Callable[[NodeParams], Any] = load_captioner,
                 clock: Callable[[], float] = time.monotonic,
                 stamp_clock: Callable[[], int] = time.time_ns) -> None:
        # clock: intervals (rates, latency, throttling); stamp_clock: header stamps of our own messages in ns (the
        # rclpy transport passes the node clock, so /diagnostics follows use_sim_time)
        self.params, self.outputs, self.name = params, outputs, name
        self._loader, self._clock, self._stamp_clock = loader, clock, stamp_clock
        self.enabled = True  # the `enable` service: False ignores inputs but keeps the model loaded
        self._model_lock = threading.Lock()  # the worker and on-demand requests share one captioner
        self.latest_image: Any = None  # the newest image message (on-demand requests without an image)
        self.state = "unconfigured"
        self.captioner: Any = None
        self.health = NodeHealth(clock=clock)
        self.throttle = Throttle(log, params.log_throttle, clock)
        self.cameras = self._new_cameras()
        self.class_names: list[str] = []  # regions.class_names, read at configure
        self._cond = threading.Condition()
        self._busy = False
        self._busy_since: float | None = None  # when the worker took the frame it is on
        self._stop = threading.Event()  # one per activation: a worker left behind by a timed-out stop stays stopped
        self._worker: threading.Thread | None = None
        self._reporter: threading.Thread | None = None
        self._warned_large_best_effort = False

    def _new_cameras(self) -> list[Camera]:
        p = self.params
        return [Camera(name, StampSync(p.sync_slop, p.sync_queue_size),
                       CaptionCache(p.cache_max_age, p.cache_iou_threshold, p.cache_max_tracks, p.cache_untracked_iou))
                for name in _camera_names(p)]

    # -- lifecycle ------------------------------------------------------------------------------------------------
    def _require(self, *states: str) -> None:
        if self.state not in states:
            raise ConfigError(f"node is {self.state}; this transition needs it {' or '.join(states)}")

    def configure(self) -> None:
        self._require("unconfigured")
        self.class_names = read_class_names(self.params.regions_class_names)  # before the (slow) model load
        log.info("[%s] configuring: loading the model", self.name)
        self.captioner = self._loader(self.params)
        self._tune_captioner()
        log.info("[%s] model %s loaded", self.name, getattr(self.captioner, "name", "?"))
        self.state = "inactive"
        self.publish_model_info()

    def activate(self) -> None:
        self._require("inactive")
        if self.captioner is None:
            self.captioner = self._loader(self.params)
            self._tune_captioner()
            self.publish_model_info()
        self._stop = stop = threading.Event()
        for cam in self.cameras:  # time spent inactive is not a gap in the camera stream
            cam.last_image_at = cam.image_period = None
        self._worker = threading.Thread(target=self._run, args=(stop,), name=f"{self.name}-worker", daemon=True)
        self._reporter = threading.Thread(target=self._report, args=(stop,), name=f"{self.name}-diagnostics",
                                          daemon=True)
        self.state = "active"
        self._worker.start()
        self._reporter.start()
        if self.params.input_qos == "sensor_data":
            log.info("[%s] inputs are best effort (input.qos: sensor_data): a frame too large to arrive whole (over "
                     "about %.0f MB over loopback) is lost without any trace; set input.qos: reliable for large "
                     "images", self.name, BEST_EFFORT_LARGE_BYTES / 1e6)
        log.info("[%s] active", self.name)

    def _tune_captioner(self) -> None:
        """The captioner's own refused-regions warning follows log.throttle (a captioner without it is left as is)."""
        if hasattr(self.captioner, "log_throttle"):
            self.captioner.log_throttle = self.params.log_throttle

    def deactivate(self) -> None:
        self._require("active")
        self.state = "inactive"
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._worker is not None:
            self._worker.join(timeout=SHUTDOWN_WAIT_S)
            if self._worker.is_alive():
                _ABANDONED.append(self._worker)
                log.warning("[%s] the worker is still inside one model call %.0f s after the stop; not waiting for "
                            "it (its frame is abandoned)", self.name, SHUTDOWN_WAIT_S)
            self._worker = None
        if self._reporter is not None:
            self._reporter.join(timeout=SHUTDOWN_WAIT_S)
            self._reporter = None
        with self._cond:
            for cam in self.cameras:
                cam.slot = None
            self._busy = False
            self._busy_since = None
            self._cond.notify_all()
        self.captioner = None
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.info("[%s] deactivated, model freed", self.name)

    def cleanup(self) -> None:
        self._require("inactive")
        self.captioner = None
        self.cameras = self._new_cameras()
        self.health = NodeHealth(clock=self._clock)
        self.state = "unconfigured"

    def shutdown(self) -> None:
        if self.state == "active":
            self.deactivate()
        self.captioner = None
        self.state = "finalized"

    def publish_model_info(self) -> None:
        self.outputs.publish("model_info", model_info_msg(self.captioner, self.params,
                                                          header_msg(self._stamp_clock())))

    def set_enabled(self, enabled: bool) -> None:
        """Pause (False) or resume captioning without unloading the model; paused inputs are counted, not synced."""
        if enabled and not self.enabled:
            for cam in self.cameras:  # forget stale partners
                cam.sync = StampSync(self.params.sync_slop, self.params.sync_queue_size)
        self.enabled = enabled
        log.info("[%s] captioning %s", self.name, "enabled" if enabled else "disabled (inputs ignored)")

    # -- inputs (transport callbacks: cheap, never run the model) --------------------------------------------------
    def _input(self, key: str, msg: Any, is_image: bool, camera: int) -> None:
        if self.state != "active":
            self.health.count("inputs_while_inactive")
            return
        if not self.enabled:
            self.health.count("inputs_while_disabled")
            return
        if not 0 <= camera < len(self.cameras):  # a transport bug, not bad input; say so rather than IndexError
            raise ConfigError(f"camera index {camera} out of range: the node has {len(self.cameras)} camera(s)")
        cam = self.cameras[camera]
        self.health.count(key)
        with self._cond:  # an image and a region callback of one camera may run at once (DDS listener threads)
            images, region_msgs = cam.inputs
            cam.inputs = (images + 1, region_msgs) if is_image else (images, region_msgs + 1)
        if is_image:
            self.latest_image = msg
            self._check_best_effort_size(msg)
        try:
            stamp = stamp_ns(msg.header)
        except (AttributeError, TypeError, ValueError) as err:
            self.health.error("bad_header")
            self.throttle.warning("bad_header", "[%s]%s message without a usable header: %s", self.name, cam.label,
                                  err)
            return
        if is_image:
            self._note_image_arrival(cam)
        sync = cam.sync
        resets = sync.resets
        pairs = sync.add_image(stamp, msg) if is_image else sync.add_regions(stamp, msg)
        if sync.resets != resets:
            self.health.error("publisher_restart")
            self.throttle.warning("publisher_restart", "[%s]%s %s stamp %d is more than %.1f s older than the last "
                                  "one: a restarted publisher, a looping bag or a reset clock; starting a new "
                                  "timeline", self.name, cam.label, "image" if is_image else "regions", stamp,
                                  sync.reset_after_ns / 1e9)
        for pair in pairs:
            self.health.count("pairs")
            with self._cond:
                if cam.slot is not None:
                    self.health.count("dropped")
                cam.slot = (pair, self._clock())
                self._cond.notify()

    def _note_image_arrival(self, cam: Camera) -> None:
        """Count and log an image stream that stopped and came back (a publisher that died and restarted)."""
        now = self._clock()
        last, period = cam.last_image_at, cam.image_period
        cam.last_image_at = now
        if last is None:
            return
        gap = now - last
        if period is not None and gap > max(STREAM_GAP_MIN_S, STREAM_GAP_PERIODS * period):
            self.health.error("image_stream_gap")
            self.throttle.warning("image_stream_gap", "[%s]%s images resumed after %.1f s without any (the camera "
                                  "stream stopped; a publisher that died and came back?)", self.name, cam.label, gap)
        else:  # the gap itself is not the stream's period
            cam.image_period = gap

    def _check_best_effort_size(self, msg: Any) -> None:
        """Once: large frames over best-effort input, where a frame that loses one DDS fragment never arrives."""
        if self._warned_large_best_effort or self.params.input_qos != "sensor_data":
            return
        try:
            size = len(msg.data)
        except TypeError:
            return
        if size > BEST_EFFORT_LARGE_BYTES:
            self._warned_large_best_effort = True
            log.warning("[%s] images of %.1f MB arrive over best-effort input QoS: the middleware drops a large frame "
                        "that loses one fragment, and nothing counts it (images_in lags regions_in, "
                        "errors.images_missing grows); set input.qos: reliable", self.name, size / 1e6)

    def on_image(self, msg: Any, camera: int = 0) -> None:
        self._input("images_in", msg, True, camera)

    def on_compressed(self, msg: Any, camera: int = 0) -> None:
        self._input("images_in", msg, True, camera)

    def on_detections(self, msg: Any, camera: int = 0) -> None:
        self._input("regions_in", msg, False, camera)

    def on_instance_mask(self, msg: Any, camera: int = 0) -> None:
        self._input("regions_in", msg, False, camera)

    def input_callback(self, spec: TopicSpec) -> Callable[[Any], None]:
        """The callback a transport subscribes for the input `spec` (one of `input_topics`)."""
        handler = getattr(self, spec.handler)
        camera = spec.camera
        return lambda msg: handler(msg, camera)

    # -- worker ---------------------------------------------------------------------------------------------------
    def _run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            with self._cond:
                if all(cam.slot is None for cam in self.cameras):
                    self._cond.wait(timeout=1.0)
                if stop.is_set():
                    return
                items = [(cam, *cam.slot) for cam in self.cameras if cam.slot is not None]
                for cam in self.cameras:
                    cam.slot = None
                self._busy = bool(items)
                self._busy_since = self._clock() if items else None
            try:
                if items:
                    self.process_frames(items, stop=stop)
            except Exception:  # noqa: BLE001 - the worker must outlive any single frame's failure
                self.health.error("internal")
                self.throttle.warning("internal", "[%s] unexpected error in the worker", self.name, exc_info=True)
            finally:
                with self._cond:
                    if self._stop is stop:  # a worker left behind by an earlier stop must not touch a new one's state
                        self._busy = False
                        self._busy_since = None
                    self._cond.notify_all()

    def _report(self, stop: threading.Event) -> None:
        """/diagnostics every diagnostics.period while active, whatever the worker is doing."""
        while not stop.wait(self.params.diagnostics_period):
            try:
                self.publish_diagnostics()
            except Exception:  # noqa: BLE001 - a failed report must not end the reports
                self.throttle.warning("diagnostics", "[%s] publishing diagnostics failed", self.name, exc_info=True)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until the slot is empty and no frame is being processed (tests, bag replay)."""
        with self._cond:
            return self._cond.wait_for(lambda: all(c.slot is None for c in self.cameras) and not self._busy,
                                       timeout=timeout)

    # -- one frame ------------------------------------------------------------------------------------------------
    def _reject(self, what: str, stamp: int, err: Exception, kind: str | None = None,
                camera: Camera | None = None) -> None:
        kind = kind or classify_error(str(err))
        self.health.error(kind)
        self.throttle.warning(kind, "[%s]%s %s of frame %d rejected: %s", self.name,
                              camera.label if camera is not None else "", what, stamp, err)

    def _regions(self, msg: Any, width: int, height: int) -> list[RegionInput]:
        p = self.params
        if msg.__msgtype__ == M.DETECTION_ARRAY:
            regions = regions_from_detections(msg, width, height)
            if p.regions_box_width:  # boxes of a detector that saw a resized copy of the image
                regions = scale_regions(regions, width / p.regions_box_width, height / p.regions_box_height)
            if self.class_names:
                regions = name_classes(regions, self.class_names)
            return regions
        mw, mh = int(msg.width), int(msg.height)
        if (mh, mw) != (height, width):  # before any mask is made
            raise ImageInputError(f"instance mask is {mw}x{mh} px but the image is {width}x{height} px")
        return regions_from_instance_mask(msg, max_regions=p.regions_max_per_frame, max_pixels=p.input_max_pixels)

    def _decode_image(self, msg: Any) -> Any:
        limit = self.params.input_max_pixels
        return (image_from_compressed(msg, limit) if msg.__msgtype__ == M.COMPRESSED_IMAGE
                else image_from_msg(msg, limit))

    def process(self, pair: Pair[Any, Any], arrived: float | None = None,
                stop: threading.Event | None = None, camera: int = 0) -> Any | None:
        """Caption one synced pair of camera `camera` and publish it; returns the RegionCaptionArray, or None if the
        frame was rejected (the reason is logged and counted) or abandoned because `stop` was set. The latency in
        diagnostics runs from `arrived` (when the pair was complete, so time spent waiting for the worker counts) to
        the publish."""
        return self.process_frames([(self.cameras[camera], pair, arrived)], stop)[0]

    def process_frames(self, items: list[tuple[Camera, Pair[Any, Any], float | None]],
                       stop: threading.Event | None = None) -> list[Any | None]:
        """Caption the pairs of several cameras (camera, pair, arrived) in shared denoising passes and publish each
        on its camera's topics; one result per pair, as `process` gives it."""
        frames = [self._prepare(cam, pair, self._clock() if arrived is None else arrived)
                  for cam, pair, arrived in items]
        todo = [f for f in frames if f is not None and f.todo]
        try:
            self._caption_all(todo, stop)
        except Cancelled:
            self.health.count("frames_abandoned", len(todo))
            log.info("[%s] %d frame(s) abandoned: the node is stopping", self.name, len(todo))
            return [None] * len(frames)
        return [None if f is None or (f.todo and f.result is None) else self._publish(f, stop) for f in frames]

    def _prepare(self, cam: Camera, pair: Pair[Any, Any], t0: float) -> _Frame | None:
        """Decode, regions, budget and cache of one pair; None if the frame is rejected (logged and counted)."""
        image_msg = pair.image
        try:
            rgb = self._decode_image(image_msg)
        except ImageInputError as err:
            self._reject("image", pair.stamp, err, camera=cam)
            return None
        h, w = rgb.shape[:2]
        try:
            regions = self._regions(pair.regions, w, h)
        except (ImageInputError, RegionInputError) as err:
            self._reject("region source", pair.stamp, err, kind="region_source", camera=cam)
            return None
        if not regions:
            self.health.count("frames_without_regions")
            self.throttle.info("no_regions", "[%s]%s frame %d has no regions (empty detection array or mask): an "
                               "empty caption array is published", self.name, cam.label, pair.stamp)
        budget = self.params.regions_max_per_frame
        regions, over_budget, usable = apply_region_budget(regions, w, h, budget)
        if over_budget:
            self.health.count("frames_over_budget")
            self.health.count("regions_over_budget", over_budget)
            self.throttle.warning("over_budget", "[%s]%s frame %d has more usable regions than regions.max_per_frame "
                                  "%d: the best %d are captioned, %d refused with the reason", self.name, cam.label,
                                  pair.stamp, budget, budget, over_budget)
        max_regions = self._max_regions()
        if max_regions and usable > max_regions:
            self.health.count("frames_over_max_regions")
            self.throttle.warning("over_max_regions", "[%s]%s %d regions in frame %d exceed max_regions %d: "
                                  "captioned in up to %d passes (slower, nothing dropped)", self.name, cam.label,
                                  usable, pair.stamp, max_regions, -(-usable // max_regions))
        if self.params.cache_enabled:
            cached, todo, boxes = reuse_cached(cam.cache, regions, pair.stamp)
        else:
            cached, todo, boxes = {}, list(range(len(regions))), []
        return _Frame(cam, pair, t0, rgb, regions, cached, todo, boxes)

    def _caption_all(self, frames: list[_Frame], stop: threading.Event | None) -> None:
        """Set each frame's `result` (None where captioning it failed: logged and counted). Several frames go
        through `caption_frames` in one call; if that call fails, each frame is tried alone, so the failure is
        reported against the frame that causes it and the others are still captioned. Cancelled propagates."""
        if len(frames) > 1 and callable(getattr(self.captioner, "caption_frames", None)):
            try:
                batch = self._caption_batch([(f.rgb, [f.regions[i] for i in f.todo]) for f in frames], stop)
            except Cancelled:
                raise
            except Exception as err:  # noqa: BLE001 - retried one frame at a time below, where each error is reported
                log.debug("[%s] captioning %d frames together failed (%s); one at a time", self.name, len(frames),
                          err)
            else:
                self.health.count("frames_batched", len(frames))
                for f, r in zip(frames, batch):
                    f.result = self._checked_result(f, r)
                return
        for f in frames:
            f.result = self._caption_one(f, stop)

    def _caption_one(self, f: _Frame, stop: threading.Event | None) -> FrameResult | None:
        try:
            result = self._caption(f.rgb, [f.regions[i] for i in f.todo], cancel=stop)
        except Cancelled:
            raise
        except PDLMError as err:
            self._reject("regions", f.pair.stamp, err, kind="inference_input", camera=f.cam)
            return None
        except Exception as err:  # noqa: BLE001 - a model failure must not end the node; it is logged in full
            self.health.error("inference")
            self.throttle.warning("inference", "[%s]%s inference failed on frame %d: %s", self.name, f.cam.label,
                                  f.pair.stamp, err, exc_info=True)
            return None
        return self._checked_result(f, result)

    def _checked_result(self, f: _Frame, result: FrameResult) -> FrameResult:
        """Count and log the regions the captioner refused."""
        for i, cap in zip(f.todo, result.regions):
            if cap.error:
                kind = classify_error(cap.error)
                self.health.error(kind)
                self.throttle.warning(kind, "[%s]%s region %d (id %r) of frame %d refused: %s", self.name,
                                      f.cam.label, i, cap.region_id, f.pair.stamp, cap.error)
        return result

    def _publish(self, f: _Frame, stop: threading.Event | None) -> Any | None:
        """Merge fresh and cached captions, publish on the frame's camera topics; the RegionCaptionArray."""
        stats, fresh, result = FrameStats(), {}, f.result
        if result is not None:
            stats = result.stats
            fresh = {i: dataclasses.replace(cap, index=i) for i, cap in zip(f.todo, result.regions)}
            if self.params.cache_enabled:
                remember(f.cam.cache, f.regions, f.boxes, fresh, f.pair.stamp)
        if stop is not None and stop.is_set():  # stopped meanwhile: the transport may be taking its publishers down
            return None
        n = len(f.regions)
        merged = [fresh[i] if i in fresh else f.cached[i][0] for i in range(n)]
        ages = [f.cached[i][1] if i in f.cached else 0.0 for i in range(n)]
        self.health.count("regions_cached", len(f.cached))
        self.health.count("regions_described", len(fresh))
        frame = FrameResult(merged, stats, getattr(self.captioner, "name", ""))
        header = f.pair.image.header
        out = caption_array_msg(frame, header, ages=ages,
                                latency_ms=stats.latency_ms.get("total", 0.0) if f.todo else 0.0)
        self.outputs.publish(f.cam.topic("captions"), out)
        if self.params.annotations_enabled:
            self.outputs.publish(f.cam.topic("annotations"), image_annotations_msg(merged, header))
        topic = f.cam.topic("annotated_image")
        if self.params.annotated_enabled and self.outputs.subscriber_count(topic) > 0:
            from pdlm_ros.viz import draw_captions

            self.outputs.publish(topic, image_to_msg(draw_captions(f.rgb, merged), header))
        self.health.frame((self._clock() - f.t0) * 1000.0, n)
        return out

    def _decode_options(self, prompt: str | None, cancel: threading.Event | None) -> dict[str, Any]:
        """Keyword arguments of the captioner call the parameters ask for."""
        p = self.params
        extra: dict[str, Any] = {"budget": p.regions_max_per_frame, "cancel": cancel or self._stop}
        if p.decoding_sampler:  # official checkpoints only; a native captioner refuses them by name
            extra["sampler"] = p.decoding_sampler
        if p.decoding_refresh:
            extra["refresh"] = p.decoding_refresh
        if prompt:
            extra["prompt"] = prompt
        uses_threshold = "threshold" in (p.decoding_mode, p.decoding_sampler)
        return dict(mode=p.decoding_mode, steps=p.decoding_steps or None,
                    threshold=(p.decoding_threshold or None) if uses_threshold else None,
                    temperature=p.decoding_temperature, **extra)

    def _caption(self, rgb: Any, regions: list[RegionInput], prompt: str | None = None,
                 cancel: threading.Event | None = None) -> FrameResult:
        with self._model_lock:
            if self.captioner is None:
                raise ConfigError("the model is not loaded (node deactivated)")
            return self.captioner.caption(rgb, regions, **self._decode_options(prompt, cancel))

    def _caption_batch(self, frames: list[tuple[Any, list[RegionInput]]],
                       cancel: threading.Event | None) -> list[FrameResult]:
        with self._model_lock:
            if self.captioner is None:
                raise ConfigError("the model is not loaded (node deactivated)")
            return self.captioner.caption_frames(frames, **self._decode_options(None, cancel))

    def describe(self, image_msg: Any | None, regions: list[RegionInput], prompt: str = "") -> Any:
        """An on-demand RegionCaptionArray for `regions` of `image_msg` (None: the latest image received), with
        that image's header. The cache is not used: the caller asked for a description now. Raises PDLMError
        (ConfigError, ImageInputError) with the reason when the request cannot be served."""
        if self.state != "active":
            raise ConfigError(f"node is {self.state}; descriptions need it active")
        msg = image_msg if image_msg is not None else self.latest_image
        if msg is None:
            raise ImageInputError("no image in the request and none received yet on the image topic")
        rgb = self._decode_image(msg)
        result = self._caption(rgb, regions, prompt or None)
        self.health.count("describe_requests")
        return caption_array_msg(result, msg.header)

    def _max_regions(self) -> int:
        try:
            return int(self.captioner.config.region.max_regions)
        except AttributeError:
            return 0

    # -- diagnostics ----------------------------------------------------------------------------------------------
    def _check_images_missing(self, cam: Camera, expired_regions: int) -> None:
        """Region messages that arrive while their images do not: a stopped camera, or (best-effort input) frames
        too large to survive DDS fragmentation, which the middleware drops without a count."""
        pending = cam.sync.pending()[1]
        waited = min(pending, cam.prev_pending_regions)  # waiting since the last report at least
        cam.prev_pending_regions = pending
        no_images = cam.inputs[0] == cam.prev_inputs[0] and waited > 0
        orphans = expired_regions - cam.prev_expired_regions
        if not (no_images or orphans > 0):
            return
        self.health.error("images_missing", max(orphans, 1))
        hint = ("; with best-effort input (input.qos: sensor_data) large frames are lost in transit without a trace: "
                "set input.qos: reliable") if self.params.input_qos == "sensor_data" else ""
        what = (f"{pending} region messages wait for their images, and no image arrived" if no_images else
                f"{orphans} region messages left the sync without their image")
        self.throttle.warning("images_missing", "[%s]%s %s since the last report (images_in %d, regions_in %d)%s",
                              self.name, cam.label, what, cam.inputs[0], cam.inputs[1], hint)

    def _check_camera(self, cam: Camera) -> dict[str, Any]:
        """One camera's sync checks since the last report; its sync counters."""
        sync = cam.sync.counters()
        both_arrived = all(now > before for now, before in zip(cam.inputs, cam.prev_inputs))
        if both_arrived and sync.matched == cam.prev_matched:
            self.health.error("sync_no_match")
            delta = sync.pending_delta_ns
            self.throttle.warning(
                "sync_no_match", "[%s]%s no image matched its regions since the last report: latest image stamp %s, "
                "latest regions stamp %s (image - regions = %s s); make the detector copy the image header or raise "
                "sync.slop", self.name, cam.label, sync.last_image_stamp, sync.last_regions_stamp,
                f"{delta / 1e9:.3f}" if delta is not None else "?")
        self._check_images_missing(cam, sync.expired_regions)
        cam.prev_matched, cam.prev_inputs = sync.matched, cam.inputs
        cam.prev_expired_regions = sync.expired_regions
        return {"sync.matched": sync.matched, "sync.expired_images": sync.expired_images,
                "sync.expired_regions": sync.expired_regions, "sync.resets": sync.resets,
                "cache.tracks": len(cam.cache)}

    def publish_diagnostics(self) -> Any:
        per_camera = {cam.name: self._check_camera(cam) for cam in self.cameras}
        now = self._clock()
        arrivals = [c.last_image_at for c in self.cameras if c.last_image_at is not None]
        since = now - max(arrivals) if arrivals else float("nan")
        busy_since = self._busy_since
        extra: dict[str, Any] = {"state": self.state, "enabled": str(self.enabled).lower(),
                                 "model": getattr(self.captioner, "name", ""), "max_regions": self._max_regions()}
        for key in ("sync.matched", "sync.expired_images", "sync.expired_regions", "sync.resets", "cache.tracks"):
            extra[key] = sum(v[key] for v in per_camera.values())  # totals over the cameras
        extra.update({"seconds_since_last_image": f"{since:.2f}",
                      "busy_s": f"{now - busy_since:.2f}" if busy_since is not None else "0.00",
                      "input_qos": self.params.input_qos})
        if self.params.cameras:
            extra["cameras"] = ",".join(self.params.cameras)
            for cam in self.cameras:
                seen = now - cam.last_image_at if cam.last_image_at is not None else float("nan")
                extra[f"{cam.name}.images_in"], extra[f"{cam.name}.regions_in"] = cam.inputs
                extra[f"{cam.name}.sync.matched"] = per_camera[cam.name]["sync.matched"]
                extra[f"{cam.name}.seconds_since_last_image"] = f"{seen:.2f}"
        report = self.health.report(extra)
        msg = diagnostic_array_msg(report, header_msg(self._stamp_clock()), f"{self.name}: region captioning",
                                   hardware_id=str(getattr(self.captioner, "device", "")))
        self.outputs.publish("/diagnostics", msg)
        return msg
