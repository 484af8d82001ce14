"""The captioning node without ROS: lifecycle, input handling, a one-slot frame buffer and a worker thread.

Transports (rclpy, Cyclone DDS) only move messages: they call `on_image`/`on_compressed`/`on_detections`/
`on_instance_mask` with rosbags message objects and give the core an `Outputs` to publish through.

Data path: input callbacks only stamp-sync (`StampSync`) and put the newest pair into a ONE-slot buffer, replacing
(and counting as dropped) a pair the worker has not started yet; they never run the model. The worker thread takes
the slot, decodes the image, builds regions, reuses cached captions of tracked regions (`CaptionCache`), runs
`Captioner.caption` on the rest and publishes a RegionCaptionArray with the image's header, plus annotated_image
while someone subscribes. So memory is bounded (one pair in the slot, `sync.queue_size` per stream in the sync) and
the output always follows the newest input: latency is at most one frame of waiting plus one inference.

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

__all__ = ["TopicSpec", "Outputs", "NodeCore", "input_topics", "OUTPUT_TOPICS", "load_captioner", "engine_root",
           "model_info_msg", "abandoned_workers", "SHUTDOWN_WAIT_S"]

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


OUTPUT_TOPICS = (
    TopicSpec("captions", M.CAPTION_ARRAY),
    TopicSpec("annotated_image", M.IMAGE),
    TopicSpec("annotations", M.IMAGE_ANNOTATIONS),
    TopicSpec("model_info", M.MODEL_INFO, latched=True),
    TopicSpec("/diagnostics", M.DIAGNOSTIC_ARRAY),
)


def input_topics(p: NodeParams) -> list[TopicSpec]:
    image = (TopicSpec("image/compressed", M.COMPRESSED_IMAGE, "on_compressed") if p.input_compressed
             else TopicSpec("image", M.IMAGE, "on_image"))
    regions = {"detections": TopicSpec("detections", M.DETECTION_ARRAY, "on_detections"),
               "yolo": TopicSpec("detections", M.YOLO_DETECTION_ARRAY, "on_detections"),
               "instance_mask": TopicSpec("instance_mask", M.IMAGE, "on_instance_mask")}[p.regions_source]
    return [image, regions]


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
        self.sync: StampSync[Any, Any] = StampSync(params.sync_slop, params.sync_queue_size)
        self.cache = CaptionCache(params.cache_max_age, params.cache_iou_threshold, params.cache_max_tracks,
                                  params.cache_untracked_iou)
        self.class_names: list[str] = []  # regions.class_names, read at configure
        self._cond = threading.Condition()
        self._slot: tuple[Pair[Any, Any], float] | None = None  # the newest pair and when it became complete
        self._busy = False
        self._busy_since: float | None = None  # when the worker took the frame it is on
        self._stop = threading.Event()  # one per activation: a worker left behind by a timed-out stop stays stopped
        self._worker: threading.Thread | None = None
        self._reporter: threading.Thread | None = None
        self._warned_large_best_effort = False
        self._last_image_at: float | None = None
        self._image_period: float | None = None  # the last normal interval between images
        self._diag_prev_matched = 0
        self._diag_prev_inputs = (0, 0)
        self._diag_prev_expired_regions = 0
        self._diag_prev_pending_regions = 0

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
        self._last_image_at = self._image_period = None  # time spent inactive is not a gap in the camera stream
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
            self._slot = None
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
        self.cache.clear()
        self.sync = StampSync(self.params.sync_slop, self.params.sync_queue_size)
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
            self.sync = StampSync(self.params.sync_slop, self.params.sync_queue_size)  # forget stale partners
        self.enabled = enabled
        log.info("[%s] captioning %s", self.name, "enabled" if enabled else "disabled (inputs ignored)")

    # -- inputs (transport callbacks: cheap, never run the model) --------------------------------------------------
    def _input(self, key: str, msg: Any, is_image: bool) -> None:
        if self.state != "active":
            self.health.count("inputs_while_inactive")
            return
        if not self.enabled:
            self.health.count("inputs_while_disabled")
            return
        self.health.count(key)
        if is_image:
            self.latest_image = msg
            self._check_best_effort_size(msg)
        try:
            stamp = stamp_ns(msg.header)
        except (AttributeError, TypeError, ValueError) as err:
            self.health.error("bad_header")
            self.throttle.warning("bad_header", "[%s] message without a usable header: %s", self.name, err)
            return
        if is_image:
            self._note_image_arrival()
        resets = self.sync.resets
        pairs = self.sync.add_image(stamp, msg) if is_image else self.sync.add_regions(stamp, msg)
        if self.sync.resets != resets:
            self.health.error("publisher_restart")
            self.throttle.warning("publisher_restart", "[%s] %s stamp %d is more than %.1f s older than the last one: "
                                  "a restarted publisher, a looping bag or a reset clock; starting a new timeline",
                                  self.name, "image" if is_image else "regions", stamp, self.sync.reset_after_ns / 1e9)
        for pair in pairs:
            self.health.count("pairs")
            with self._cond:
                if self._slot is not None:
                    self.health.count("dropped")
                self._slot = (pair, self._clock())
                self._cond.notify()

    def _note_image_arrival(self) -> None:
        """Count and log an image stream that stopped and came back (a publisher that died and restarted)."""
        now = self._clock()
        last, period = self._last_image_at, self._image_period
        self._last_image_at = now
        if last is None:
            return
        gap = now - last
        if period is not None and gap > max(STREAM_GAP_MIN_S, STREAM_GAP_PERIODS * period):
            self.health.error("image_stream_gap")
            self.throttle.warning("image_stream_gap", "[%s] images resumed after %.1f s without any (the camera "
                                  "stream stopped; a publisher that died and came back?)", self.name, gap)
        else:  # the gap itself is not the stream's period
            self._image_period = gap

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

    def on_image(self, msg: Any) -> None:
        self._input("images_in", msg, True)

    def on_compressed(self, msg: Any) -> None:
        self._input("images_in", msg, True)

    def on_detections(self, msg: Any) -> None:
        self._input("regions_in", msg, False)

    def on_instance_mask(self, msg: Any) -> None:
        self._input("regions_in", msg, False)

    # -- worker ---------------------------------------------------------------------------------------------------
    def _run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            with self._cond:
                if self._slot is None:
                    self._cond.wait(timeout=1.0)
                if stop.is_set():
                    return
                item, self._slot = self._slot, None
                self._busy = item is not None
                self._busy_since = self._clock() if item is not None else None
            try:
                if item is not None:
                    self.process(*item, stop=stop)
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
            return self._cond.wait_for(lambda: self._slot is None and not self._busy, timeout=timeout)

    # -- one frame ------------------------------------------------------------------------------------------------
    def _reject(self, what: str, stamp: int, err: Exception, kind: str | None = None) -> None:
        kind = kind or classify_error(str(err))
        self.health.error(kind)
        self.throttle.warning(kind, "[%s] %s of frame %d rejected: %s", self.name, what, stamp, err)

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
                stop: threading.Event | None = None) -> Any | None:
        """Caption one synced pair and publish it; returns the RegionCaptionArray, or None if the frame was
        rejected (the reason is logged and counted) or abandoned because `stop` was set. The latency in diagnostics
        runs from `arrived` (when the pair was complete, so time spent waiting for the worker counts) to the
        publish."""
        t0 = self._clock() if arrived is None else arrived
        image_msg = pair.image
        try:
            rgb = self._decode_image(image_msg)
        except ImageInputError as err:
            self._reject("image", pair.stamp, err)
            return None
        h, w = rgb.shape[:2]
        try:
            regions = self._regions(pair.regions, w, h)
        except (ImageInputError, RegionInputError) as err:
            self._reject("region source", pair.stamp, err, kind="region_source")
            return None
        if not regions:
            self.health.count("frames_without_regions")
            self.throttle.info("no_regions", "[%s] frame %d has no regions (empty detection array or mask): an "
                               "empty caption array is published", self.name, pair.stamp)
        budget = self.params.regions_max_per_frame
        regions, over_budget, usable = apply_region_budget(regions, w, h, budget)
        if over_budget:
            self.health.count("frames_over_budget")
            self.health.count("regions_over_budget", over_budget)
            self.throttle.warning("over_budget", "[%s] frame %d has more usable regions than regions.max_per_frame "
                                  "%d: the best %d are captioned, %d refused with the reason", self.name, pair.stamp,
                                  budget, budget, over_budget)
        max_regions = self._max_regions()
        if max_regions and usable > max_regions:
            self.health.count("frames_over_max_regions")
            self.throttle.warning("over_max_regions", "[%s] %d regions in frame %d exceed max_regions %d: "
                                  "captioned in up to %d passes (slower, nothing dropped)", self.name, usable,
                                  pair.stamp, max_regions, -(-usable // max_regions))

        use_cache = self.params.cache_enabled
        if use_cache:
            cached, todo, boxes = reuse_cached(self.cache, regions, pair.stamp)
        else:
            cached, todo, boxes = {}, list(range(len(regions))), []

        stats, fresh = FrameStats(), {}
        if todo:
            p = self.params
            try:
                result = self._caption(rgb, [regions[i] for i in todo], cancel=stop)
            except Cancelled:
                self.health.count("frames_abandoned")
                log.info("[%s] frame %d abandoned: the node is stopping", self.name, pair.stamp)
                return None
            except PDLMError as err:
                self._reject("regions", pair.stamp, err, kind="inference_input")
                return None
            except Exception as err:  # noqa: BLE001 - a model failure must not end the node; it is logged in full
                self.health.error("inference")
                self.throttle.warning("inference", "[%s] inference failed on frame %d: %s", self.name, pair.stamp,
                                      err, exc_info=True)
                return None
            stats = result.stats
            for i, cap in zip(todo, result.regions):
                fresh[i] = dataclasses.replace(cap, index=i)
                if cap.error:
                    self.health.error(classify_error(cap.error))
                    self.throttle.warning(classify_error(cap.error), "[%s] region %d (id %r) of frame %d refused: %s",
                                          self.name, i, cap.region_id, pair.stamp, cap.error)
            if use_cache:
                remember(self.cache, regions, boxes, fresh, pair.stamp)

        if stop is not None and stop.is_set():  # stopped meanwhile: the transport may be taking its publishers down
            return None
        merged = [fresh[i] if i in fresh else cached[i][0] for i in range(len(regions))]
        ages = [cached[i][1] if i in cached else 0.0 for i in range(len(regions))]
        self.health.count("regions_cached", len(cached))
        self.health.count("regions_described", len(fresh))
        frame = FrameResult(merged, stats, getattr(self.captioner, "name", ""))
        out = caption_array_msg(frame, image_msg.header, ages=ages,
                                latency_ms=stats.latency_ms.get("total", 0.0) if todo else 0.0)
        self.outputs.publish("captions", out)
        if self.params.annotations_enabled:
            self.outputs.publish("annotations", image_annotations_msg(merged, image_msg.header))
        if self.params.annotated_enabled and self.outputs.subscriber_count("annotated_image") > 0:
            from pdlm_ros.viz import draw_captions

            self.outputs.publish("annotated_image", image_to_msg(draw_captions(rgb, merged), image_msg.header))
        self.health.frame((self._clock() - t0) * 1000.0, len(regions))
        return out

    def _caption(self, rgb: Any, regions: list[RegionInput], prompt: str | None = None,
                 cancel: threading.Event | None = None) -> FrameResult:
        p = self.params
        with self._model_lock:
            if self.captioner is None:
                raise ConfigError("the model is not loaded (node deactivated)")
            extra: dict[str, Any] = {"budget": p.regions_max_per_frame, "cancel": cancel or self._stop}
            if p.decoding_sampler:  # official checkpoints only; a native captioner refuses them by name
                extra["sampler"] = p.decoding_sampler
            if p.decoding_refresh:
                extra["refresh"] = p.decoding_refresh
            if prompt:
                extra["prompt"] = prompt
            uses_threshold = "threshold" in (p.decoding_mode, p.decoding_sampler)
            return self.captioner.caption(
                rgb, regions, mode=p.decoding_mode, steps=p.decoding_steps or None,
                threshold=(p.decoding_threshold or None) if uses_threshold else None,
                temperature=p.decoding_temperature, **extra)

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
    def _check_images_missing(self, inputs: tuple[int, int], expired_regions: int) -> None:
        """Region messages that arrive while their images do not: a stopped camera, or (best-effort input) frames
        too large to survive DDS fragmentation, which the middleware drops without a count."""
        pending = self.sync.pending()[1]
        waited = min(pending, self._diag_prev_pending_regions)  # waiting since the last report at least
        self._diag_prev_pending_regions = pending
        no_images = inputs[0] == self._diag_prev_inputs[0] and waited > 0
        orphans = expired_regions - self._diag_prev_expired_regions
        if not (no_images or orphans > 0):
            return
        self.health.error("images_missing", max(orphans, 1))
        hint = ("; with best-effort input (input.qos: sensor_data) large frames are lost in transit without a trace: "
                "set input.qos: reliable") if self.params.input_qos == "sensor_data" else ""
        what = (f"{pending} region messages wait for their images, and no image arrived" if no_images else
                f"{orphans} region messages left the sync without their image")
        self.throttle.warning("images_missing", "[%s] %s since the last report (images_in %d, regions_in %d)%s",
                              self.name, what, inputs[0], inputs[1], hint)

    def publish_diagnostics(self) -> Any:
        sync = self.sync.counters()
        counts, _ = self.health.snapshot()
        inputs = (counts["images_in"], counts["regions_in"])
        both_arrived = all(now > before for now, before in zip(inputs, self._diag_prev_inputs))
        if both_arrived and sync.matched == self._diag_prev_matched:
            self.health.error("sync_no_match")
            delta = sync.pending_delta_ns
            self.throttle.warning(
                "sync_no_match", "[%s] no image matched its regions since the last report: latest image stamp %s, "
                "latest regions stamp %s (image - regions = %s s); make the detector copy the image header or raise "
                "sync.slop", self.name, sync.last_image_stamp, sync.last_regions_stamp,
                f"{delta / 1e9:.3f}" if delta is not None else "?")
        self._check_images_missing(inputs, sync.expired_regions)
        self._diag_prev_matched, self._diag_prev_inputs = sync.matched, inputs
        self._diag_prev_expired_regions = sync.expired_regions
        now = self._clock()
        since = now - self._last_image_at if self._last_image_at is not None else float("nan")
        busy_since = self._busy_since
        extra = {"state": self.state, "enabled": str(self.enabled).lower(), "model": getattr(self.captioner, "name", ""), "max_regions": self._max_regions(),
                 "sync.matched": sync.matched, "sync.expired_images": sync.expired_images,
                 "sync.expired_regions": sync.expired_regions, "sync.resets": sync.resets,
                 "cache.tracks": len(self.cache), "seconds_since_last_image": f"{since:.2f}",
                 "busy_s": f"{now - busy_since:.2f}" if busy_since is not None else "0.00",
                 "input_qos": self.params.input_qos}
        report = self.health.report(extra)
        msg = diagnostic_array_msg(report, header_msg(self._stamp_clock()), f"{self.name}: region captioning",
                                   hardware_id=str(getattr(self.captioner, "device", "")))
        self.outputs.publish("/diagnostics", msg)
        return msg
