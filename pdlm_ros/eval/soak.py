"""Soak benchmark: the node over ROS-less DDS under a camera overload, its memory and latency over time.

One run: the node in a child process (`pdlm-ros node --transport dds`, Cyclone DDS confined to loopback on a domain
of its own), a camera + tracker in this process publishing generated scenes of moving, tracked objects (image and
Detection2DArray with the same header), and a subscriber of `captions` and `/diagnostics`.

1. Capacity (skipped when `rate_hz` is given): for `calibrate_s` seconds the camera sends a frame, waits for its
   caption, sends the next; the node's capacity is the frames per second of that loop after the first (warm-up)
   frame, measured without any overload (a flood costs the node's own input thread CPU and would understate it).
2. Soak: the camera runs at `rate_multiplier` x that capacity (or at `rate_hz`) for `minutes`. Every `window_s`
   seconds one row: the node's RSS (psutil), frames published and captioned in the window, the stamp age of the
   captions received in it (receive time - header stamp; stamps are this machine's wall clock, so age = waiting in
   the node's one-slot buffer + inference + transport), and the node's `dropped` counter from /diagnostics.
3. The node gets SIGINT; the seconds it took to exit and its exit code are recorded. The node's last /diagnostics
   say how many of the published images and detection arrays it received (`images_in`, `regions_in`): frames lost
   in transit, which best-effort DDS drops without a trace for large images, show as images_in < regions_in.

The result is a JSON document (`SoakResult.to_dict`) and a printed table. The camera side runs in Python and may
not reach a high target rate on a small machine: the achieved rate is reported next to the target.
"""

from __future__ import annotations

import math
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pdlm_ros.errors import ConfigError, PDLMError

__all__ = ["SoakConfig", "SoakWindow", "SoakResult", "run_soak", "format_table", "LOOPBACK_CYCLONEDDS"]

# Cyclone DDS on the loopback interface only, unicast discovery: the soak neither reaches nor hears other machines.
LOOPBACK_CYCLONEDDS = ('<CycloneDDS><Domain id="any"><General><Interfaces><NetworkInterface name="lo" '
                       'multicast="false"/></Interfaces><AllowMulticast>false</AllowMulticast></General><Discovery>'
                       '<ParticipantIndex>auto</ParticipantIndex><MaxAutoParticipantIndex>40</MaxAutoParticipantIndex>'
                       '<Peers><Peer address="127.0.0.1"/></Peers></Discovery></Domain></CycloneDDS>')
_SCENES = 48  # distinct frames, cycled with fresh stamps
_SHAPES = (("circle", "red", "large", "solid"), ("square", "blue", "small", "striped"),
           ("star", "yellow", "large", "dotted"), ("triangle", "green", "small", "solid"),
           ("circle", "purple", "small", "dotted"), ("square", "orange", "large", "striped"))


@dataclass(frozen=True)
class SoakConfig:
    minutes: float = 3.0
    rate_multiplier: float = 49.0  # camera rate = this x the node's measured capacity ...
    rate_hz: float | None = None  # ... unless a rate is given
    calibrate_s: float = 20.0
    width: int = 320
    height: int = 240
    objects: int = 3
    window_s: float = 10.0
    reliable: bool = False  # camera writers and node inputs reliable (input.qos) instead of best effort
    threads: int | None = 1  # the node's torch threads (OMP_NUM_THREADS); None: torch's default, one per core
    node_args: tuple[str, ...] = ()  # more --ros-args for the node (-p checkpoint:=DIR, ...)
    node_log: str | None = None  # the node's stderr; default: a temporary file

    def check(self) -> None:
        if not (self.minutes > 0 and math.isfinite(self.minutes)):
            raise ConfigError(f"--minutes must be a positive number (got {self.minutes})")
        if self.rate_hz is not None and not self.rate_hz > 0:
            raise ConfigError(f"--rate must be > 0 Hz (got {self.rate_hz})")
        if not self.rate_multiplier > 0:
            raise ConfigError(f"--rate-multiplier must be > 0 (got {self.rate_multiplier})")
        if not (self.window_s > 0 and self.calibrate_s > 0):
            raise ConfigError("--window-seconds and --calibrate-seconds must be > 0 (got "
                              f"{self.window_s}, {self.calibrate_s})")
        if not (16 <= self.width <= 4096 and 16 <= self.height <= 4096):
            raise ConfigError(f"frame size must be 16..4096 px a side (got {self.width}x{self.height})")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be >= 1 (got {self.threads})")
        if not 1 <= self.objects <= len(_SHAPES):
            raise ConfigError(f"--objects must be in 1..{len(_SHAPES)} (got {self.objects})")


@dataclass(frozen=True)
class SoakWindow:
    t_s: float  # end of the window, seconds since the soak phase began
    rss_mib: float
    published: int
    captioned: int
    age_p50_s: float
    age_p99_s: float
    dropped_total: int  # the node's counter, since activation


@dataclass
class SoakResult:
    config: SoakConfig
    started: str  # local time, ISO 8601
    machine: dict[str, Any]
    capacity_hz: float
    target_hz: float
    achieved_hz: float
    windows: list[SoakWindow] = field(default_factory=list)
    ages_s: list[float] = field(default_factory=list)  # every caption of the soak phase
    exit_s: float = math.nan
    exit_code: int | None = None
    last_diagnostics: dict[str, str] = field(default_factory=dict)
    frames_sent: int = 0  # calibration included

    def summary(self) -> dict[str, Any]:
        rss = [w.rss_mib for w in self.windows]
        ages = np.array(self.ages_s, dtype=np.float64)
        pct = (lambda q: float(np.percentile(ages, q)) if ages.size else math.nan)
        return {
            "windows": len(self.windows),
            "rss_mib_first": rss[0] if rss else math.nan, "rss_mib_last": rss[-1] if rss else math.nan,
            "rss_mib_min": min(rss) if rss else math.nan, "rss_mib_max": max(rss) if rss else math.nan,
            "age_p50_s": pct(50), "age_p99_s": pct(99),
            "age_p99_s_first_window": self.windows[0].age_p99_s if self.windows else math.nan,
            "age_p99_s_last_window": self.windows[-1].age_p99_s if self.windows else math.nan,
            "published": sum(w.published for w in self.windows),
            "captioned": sum(w.captioned for w in self.windows),
            "dropped_total": self.windows[-1].dropped_total if self.windows else 0,
            "node_images_in": int(self.last_diagnostics.get("images_in", 0) or 0),
            "node_regions_in": int(self.last_diagnostics.get("regions_in", 0) or 0),
        }

    def to_dict(self) -> dict[str, Any]:
        def clean(v: Any) -> Any:
            if isinstance(v, float):
                return None if not math.isfinite(v) else round(v, 4)
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [clean(x) for x in v]
            return v

        return clean({"config": asdict(self.config), "started": self.started, "machine": self.machine,
                      "capacity_hz": self.capacity_hz, "target_hz": self.target_hz,
                      "achieved_hz": self.achieved_hz, "summary": self.summary(),
                      "windows": [asdict(w) for w in self.windows], "exit_s": self.exit_s,
                      "exit_code": self.exit_code, "frames_sent": self.frames_sent,
                      "last_diagnostics": self.last_diagnostics})


def format_table(result: SoakResult) -> str:
    rows = [f"{'t s':>7} {'RSS MiB':>8} {'published':>9} {'captioned':>9} {'age p50 s':>9} {'age p99 s':>9} "
            f"{'dropped':>8}"]
    for w in result.windows:
        rows.append(f"{w.t_s:7.0f} {w.rss_mib:8.1f} {w.published:9d} {w.captioned:9d} {w.age_p50_s:9.2f} "
                    f"{w.age_p99_s:9.2f} {w.dropped_total:8d}")
    s = result.summary()
    rows.append(f"capacity {result.capacity_hz:.2f} frames/s; camera target {result.target_hz:.1f} Hz, achieved "
                f"{result.achieved_hz:.1f} Hz; RSS {s['rss_mib_min']:.1f}..{s['rss_mib_max']:.1f} MiB; stamp age "
                f"p50 {s['age_p50_s']:.2f} s, p99 {s['age_p99_s']:.2f} s; node exited in {result.exit_s:.1f} s "
                f"(code {result.exit_code})")
    rows.append(f"the node received {s['node_images_in']} images and {s['node_regions_in']} detection arrays of "
                f"{result.frames_sent} frames sent in all")
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------------------ the parts
def _scenes(cfg: SoakConfig) -> list[tuple[np.ndarray, list[Any]]]:
    """Pre-rendered frames of objects moving right (wrapping around): (image, [(box, track id, class)])."""
    from pdlm_ros.data.scenes import ObjectSpec, render_scene

    w, h = cfg.width, cfg.height
    extent = max(8.0, min(w, h) / 5)
    out = []
    for k in range(_SCENES):
        t = k / _SCENES
        specs = []
        for j, (shape, color, size, pattern) in enumerate(_SHAPES[:cfg.objects]):
            cx = extent + ((j * 0.3 + t) % 1.0) * (w - 2 * extent)
            cy = extent + (j + 0.5) / cfg.objects * (h - 2 * extent)
            specs.append(ObjectSpec(shape=shape, color=color, size=size, pattern=pattern, center=(cx, cy),
                                    extent=extent * (1.0 if size == "large" else 0.6), rotation=0.3 * k,
                                    track_id=f"track-{j + 1}"))
        scene = render_scene(specs, w, h, background_seed=7)
        out.append((scene.image, [(o.box, o.track_id, o.shape) for o in scene.objects if o.visible_fraction > 0.3]))
    return out


class _Probe:
    """Camera writers and caption/diagnostics readers on one participant."""

    def __init__(self, reliable: bool) -> None:
        from pdlm_ros.ros import messages as M
        from pdlm_ros.ros.transport_dds import DdsEndpoints

        self.M = M
        self.ep = DdsEndpoints()
        self.ep.writer("image", M.IMAGE, reliable=reliable, depth=5)
        self.ep.writer("detections", M.DETECTION_ARRAY, reliable=reliable, depth=5)
        self._lock = threading.Condition()
        self.ages: list[tuple[float, float]] = []  # (receive monotonic time, stamp age s)
        self.last_stamp = -1
        self.diagnostics: dict[str, str] = {}
        self.ep.subscribe("captions", M.CAPTION_ARRAY, self._on_captions, reliable=True, depth=100)
        self.ep.subscribe("/diagnostics", M.DIAGNOSTIC_ARRAY, self._on_diagnostics, reliable=True, depth=10)

    def _on_captions(self, msg: Any) -> None:
        now_ns, mono = time.time_ns(), time.monotonic()
        stamp = int(msg.header.stamp.sec) * 1_000_000_000 + int(msg.header.stamp.nanosec)
        with self._lock:
            self.ages.append((mono, (now_ns - stamp) / 1e9))
            self.last_stamp = stamp
            self._lock.notify_all()

    def wait_caption(self, stamp: int, timeout: float) -> bool:
        with self._lock:
            return self._lock.wait_for(lambda: self.last_stamp >= stamp, timeout=timeout)

    def _on_diagnostics(self, msg: Any) -> None:
        for status in msg.status:
            with self._lock:
                self.diagnostics = {kv.key: kv.value for kv in status.values}

    def captions_between(self, t0: float, t1: float) -> list[float]:
        with self._lock:
            return [a for t, a in self.ages if t0 <= t < t1]

    def matched(self) -> bool:
        return min(self.ep.subscriber_count("image"), self.ep.subscriber_count("detections")) >= 1

    def publish(self, image: np.ndarray, boxes: list[Any]) -> int:
        from pdlm_ros.ros.convert import detection_array_msg, header_msg, image_to_msg
        from pdlm_ros.types import RegionInput

        stamp = time.time_ns()
        hdr = header_msg(stamp, "camera_optical_frame")
        self.ep.publish("image", image_to_msg(image, hdr))
        self.ep.publish("detections", detection_array_msg(
            hdr, [RegionInput(box=b, region_id=tid, class_id=cls, score=0.9) for b, tid, cls in boxes]))
        return stamp

    def close(self) -> None:
        self.ep.close()


def _camera(probe: _Probe, frames: list[tuple[np.ndarray, list[Any]]], hz: float, seconds: float,
            start_index: int = 0) -> tuple[int, float]:
    """Publish at `hz` (as fast as possible when that is more than this process manages) for `seconds`; returns
    (frames published, seconds it took)."""
    period = 1.0 / hz
    t0 = time.monotonic()
    k = 0
    while True:
        now = time.monotonic()
        if now - t0 >= seconds:
            break
        image, boxes = frames[(start_index + k) % len(frames)]
        probe.publish(image, boxes)
        k += 1
        time.sleep(max(0.0, t0 + k * period - time.monotonic()))
    return k, time.monotonic() - t0


def _capacity(probe: _Probe, frames: list[tuple[np.ndarray, list[Any]]], seconds: float) -> tuple[float, int, int]:
    """(frames per second, frames lost, frames sent) of a send-one-wait-for-its-caption loop, warm-up frame
    excluded."""
    t0 = time.monotonic()
    start, done, lost = None, 0, 0
    k = 0
    while time.monotonic() - t0 < seconds or start is None:
        stamp = probe.publish(*frames[k % len(frames)])
        k += 1
        if not probe.wait_caption(stamp, timeout=30.0):  # best effort may lose it; send the next
            lost += 1
            if lost > 5:
                raise PDLMError(f"soak: {lost} frames of the capacity loop got no caption in 30 s each")
            continue
        if start is None:
            start = time.monotonic()
        else:
            done += 1
        if time.monotonic() - t0 > 4 * seconds:
            break
    return done / max(time.monotonic() - start, 1e-9), lost, k


def _machine() -> dict[str, Any]:
    import psutil

    model = ""
    try:
        model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                      if ln.startswith("model name")), "")
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    return {"cpu": model or platform.processor() or platform.machine(), "cores": psutil.cpu_count(logical=True),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "python": platform.python_version(),
            "system": platform.platform(), "load_avg_at_start": [round(v, 2) for v in load]}


def _wait_for(predicate: Any, timeout: float, what: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    raise PDLMError(f"soak: timed out waiting for {what} (node exit code {proc.poll()}); node log:\n{tail}")


def run_soak(cfg: SoakConfig, progress: Any = None) -> SoakResult:
    """Run the benchmark (module docstring); `progress(text)` gets a line per phase and per window."""
    import psutil

    cfg.check()
    say = progress or (lambda text: None)
    env = dict(os.environ)
    env.setdefault("CYCLONEDDS_URI", LOOPBACK_CYCLONEDDS)
    if cfg.threads is not None:  # on a busy machine extra intra-op threads spin-wait for cores others hold
        env["OMP_NUM_THREADS"] = str(cfg.threads)
    if "ROS_DOMAIN_ID" not in os.environ:
        env["ROS_DOMAIN_ID"] = str(random.SystemRandom().randint(1, 200))
    os.environ.update(CYCLONEDDS_URI=env["CYCLONEDDS_URI"], ROS_DOMAIN_ID=env["ROS_DOMAIN_ID"])  # this side too
    log = Path(cfg.node_log) if cfg.node_log else Path(tempfile.mkstemp(prefix="pdlm-soak-", suffix=".log")[1])
    ros_args = ["-r", "__node:=pdlm_soak", "-p", "diagnostics.period:=1.0", *cfg.node_args]
    if cfg.reliable:
        ros_args += ["-p", "input.qos:=reliable"]
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    machine = _machine()
    say(f"rendering {_SCENES} frames of {cfg.width}x{cfg.height} with {cfg.objects} objects")
    frames = _scenes(cfg)
    with open(log, "w") as err:
        node = subprocess.Popen([sys.executable, "-m", "pdlm_ros.cli", "node", "--transport", "dds", "--ros-args",
                                 *ros_args], stdout=subprocess.DEVNULL, stderr=err, env=env)
    probe = None
    try:
        _wait_for(lambda: "on DDS domain" in log.read_text(errors="replace"), 300, "the node to start", node, log)
        probe = _Probe(cfg.reliable)
        _wait_for(probe.matched, 60, "the node to subscribe", node, log)
        capacity, calibration_sent = math.nan, 0
        if cfg.rate_hz is None:
            say(f"node {node.pid} up; measuring its capacity for {cfg.calibrate_s:.0f} s, one frame at a time")
            capacity, lost, calibration_sent = _capacity(probe, frames, cfg.calibrate_s)
            if capacity <= 0:
                raise PDLMError(f"soak: the node captioned no frame after the first in {cfg.calibrate_s:.0f} s; see "
                                f"its log {log}")
            say(f"capacity {capacity:.2f} frames/s ({lost} frames lost on the way)")
        target = cfg.rate_hz if cfg.rate_hz is not None else cfg.rate_multiplier * capacity
        say(f"soak at {target:.1f} Hz for {cfg.minutes:g} min")
        proc = psutil.Process(node.pid)
        result = SoakResult(cfg, started, machine, capacity, target, 0.0)
        t_start = time.monotonic()
        total_sent = 0
        end = t_start + cfg.minutes * 60.0
        while time.monotonic() < end - 1e-3:
            w0 = time.monotonic()
            sent, _ = _camera(probe, frames, target, min(cfg.window_s, end - w0), start_index=total_sent)
            total_sent += sent
            w1 = time.monotonic()
            ages = probe.captions_between(w0, w1)
            result.ages_s.extend(ages)
            arr = np.array(ages, dtype=np.float64)
            window = SoakWindow(
                t_s=w1 - t_start, rss_mib=proc.memory_info().rss / 2**20, published=sent, captioned=len(ages),
                age_p50_s=float(np.percentile(arr, 50)) if arr.size else math.nan,
                age_p99_s=float(np.percentile(arr, 99)) if arr.size else math.nan,
                dropped_total=int(probe.diagnostics.get("dropped", 0) or 0))
            result.windows.append(window)
            say(f"{window.t_s:6.0f} s  RSS {window.rss_mib:7.1f} MiB  published {sent}  captioned {len(ages)}  "
                f"age p50 {window.age_p50_s:.2f} s  p99 {window.age_p99_s:.2f} s")
        result.achieved_hz = total_sent / max(time.monotonic() - t_start, 1e-9)
        result.frames_sent = calibration_sent + total_sent
        time.sleep(2.0)  # one more /diagnostics after the last frame
        result.last_diagnostics = dict(probe.diagnostics)
        machine["load_avg_at_end"] = [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else []
    finally:
        if probe is not None:
            probe.close()
        t_stop = time.monotonic()
        if node.poll() is None:
            node.send_signal(signal.SIGINT)
        try:
            code = node.wait(timeout=60)
        except subprocess.TimeoutExpired:
            node.kill()
            code = node.wait()
        exit_s = time.monotonic() - t_stop
    result.exit_s, result.exit_code = exit_s, code
    if cfg.node_log is None and code == 0:  # a temporary log is kept only when something went wrong
        log.unlink(missing_ok=True)
    return result
