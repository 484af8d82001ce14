"""Many bags on Ray: every bag read in parallel, its frames captioned by a pool of model actors, each bag written
back as `pdlm-ros replay` writes it, plus one merged report.

Pipeline (Ray Data, streaming):
1. one read task per bag (`plan_requests`): the bag is opened and checked as `replay.check_request` does, its
   image/region messages are paired with the node's `StampSync`, and every frame the model will be asked about
   becomes a row (with the caption cache on, only the regions the cache does not cover, decided by the same
   `reuse_cached`/`remember` rules `replay` applies; those rules read boxes, ids and stamps, never caption text);
2. an actor pool of `CaptionWorker`s, the model loaded once per actor (`--workers` actors, `--gpus-per-worker` GPUs
   each): every call takes a few frames and captions them with `Captioner.caption_frames`, so regions of several
   frames share one denoising pass where the checkpoint allows it (exact: the captions of each frame alone);
3. on the driver, rows are gathered per bag and deduplicated by frame number; once a bag's frames are all in, a
   write task runs `replay.replay` on it with a captioner that answers from those results (`_Answers`, matched by
   image and regions, so a frame the read task did not foresee is an error, never a wrong caption): the output bag,
   its crash-safe writing, the per-bag report.json/report.html are replay's own.

Outputs: OUT/<bag name>/ per bag (as `pdlm-ros replay --out` makes it) with OUT/<bag name>/done.json written last,
then OUT/report.json and OUT/report.html over all bags (per-bag and total Pos/Neg/Avg when a bag has its
annotations beside it, frames, regions, throughput, failures).

Faults: a bag that cannot be read, checked or written fails alone (its error is listed, the others go on); an actor
that dies is restarted by Ray and its unfinished call retried (Ray Data's actor defaults: unlimited restarts and
task retries), and frames that come back twice are kept once; a rerun skips every bag whose done.json matches the
input (path, file sizes and times), the options and the model, and redoes the others (`overwrite` redoes all).

Cluster use: every node needs this package installed and the bags and OUT on a path it can read and write (a shared
file system); `ray_address` joins a running cluster, without it a local Ray with `workers` CPUs is started.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import math
import os
import pickle
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pdlm_ros.data.bags import annotations_path_for, load_annotations, open_bag
from pdlm_ros.errors import BagError, ConfigError, ImageInputError, PDLMError, RegionInputError
from pdlm_ros.eval.cache import atomic_write_text
from pdlm_ros.eval.replay import ReplayOptions, check_request, replay
from pdlm_ros.ros import convert as C
from pdlm_ros.ros import messages as M
from pdlm_ros.ros.cache import CaptionCache, remember, reuse_cached
from pdlm_ros.ros.sync import StampSync
from pdlm_ros.types import FrameResult, RegionCaption, RegionInput

__all__ = ["ModelSpec", "ManyOptions", "BagOutcome", "ManyResult", "find_bags", "bag_names", "request_key",
           "plan_requests", "CaptionWorker", "replay_many", "merged_report", "DONE_FILE", "FAULT_ENV"]

log = logging.getLogger(__name__)

DONE_FILE = "done.json"  # OUT/<bag>/done.json: written last, so a bag with one is complete
# Fault injection for the restart path: the first worker call that finds no file at this path creates it and ends
# its process at once (os._exit), as a killed or crashed worker would.
FAULT_ENV = "PDLM_REPLAY_MANY_EXIT_ONCE"
_FORMAT = 1  # of done.json


@dataclass(frozen=True)
class ModelSpec:
    """What every actor loads (`pdlm_ros.runtime.load_captioner`)."""

    checkpoint: str | None = None  # None: the bundled model (or `preset`)
    preset: str | None = None
    backend: str = "torch"
    engine_path: str | None = None
    device: str = "cpu"
    dtype: str = "auto"  # float32 / bfloat16 / float16, or the checkpoint's
    threads: int | None = None  # torch threads per actor (None: torch's default)


@dataclass(frozen=True)
class ManyOptions:
    workers: int = 2  # captioning actors (local Ray: also its CPU count)
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    batch_frames: int = 4  # frames per actor call, captioned together (their regions share denoising passes)
    ray_address: str | None = None  # join this cluster; None: start a local Ray
    overwrite: bool = False  # redo bags that are already done
    progress: bool = False  # Ray Data progress bars on stderr

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"--workers must be >= 1 (got {self.workers})")
        if self.batch_frames < 1:
            raise ConfigError(f"--batch-frames must be >= 1 (got {self.batch_frames})")
        if self.gpus_per_worker < 0 or self.cpus_per_worker < 0:
            raise ConfigError(f"--gpus-per-worker and --cpus-per-worker must be >= 0 (got {self.gpus_per_worker}, "
                              f"{self.cpus_per_worker})")


@dataclass
class BagOutcome:
    bag: str  # the input path
    name: str  # OUT/<name>
    status: str = "pending"  # done | skipped (done by an earlier run) | failed
    error: str = ""
    doc: dict[str, Any] = field(default_factory=dict)  # the bag's entry in the merged report (done.json)


@dataclass
class ManyResult:
    out: Path
    bags: list[BagOutcome]
    model: str
    options: ManyOptions
    wall_s: float
    nodes: int
    json_path: Path | None = None
    html_path: Path | None = None

    @property
    def failed(self) -> list[BagOutcome]:
        return [b for b in self.bags if b.status == "failed"]


# ------------------------------------------------------------------------------------------------------ the bags
def _is_bag(path: Path) -> bool:
    if path.is_file():
        return path.suffix in (".bag", ".mcap")
    if path.is_dir():
        return (path / "metadata.yaml").is_file() or any(p.suffix in (".mcap", ".db3") for p in path.iterdir())
    return False


def find_bags(specs: Sequence[str | Path]) -> list[Path]:
    """BAGS arguments -> bag paths, in order, each once: a bag (rosbag2 directory, .mcap file, ROS 1 .bag), a
    directory of bags, or a glob pattern."""
    found: list[Path] = []
    for spec in specs:
        text = str(spec)
        if glob.has_magic(text):
            matches = [Path(p) for p in sorted(glob.glob(text)) if _is_bag(Path(p))]
            if not matches:
                raise BagError(f"no bag matches {text!r}")
        else:
            path = Path(text)
            if not path.exists():
                raise BagError(f"no such bag: {text}")
            if _is_bag(path):
                matches = [path]
            else:
                matches = sorted(p for p in path.iterdir() if _is_bag(p)) if path.is_dir() else []
                if not matches:
                    raise BagError(f"{text} is not a bag and holds none (a bag is a rosbag2 directory, an .mcap "
                                   "file or a ROS 1 .bag file)")
        found += matches
    unique = {p.resolve(): p for p in reversed(found)}  # first mention wins the order
    return [p for p in found if unique.get(p.resolve()) is p]


def bag_names(bags: Sequence[Path]) -> dict[Path, str]:
    """Output directory name per bag: its name without .bag/.mcap, plus a hash of its path where names clash (the
    same list gives the same names on every run)."""
    stems = {b: b.name.removesuffix(".bag").removesuffix(".mcap") or "bag" for b in bags}
    counts: dict[str, int] = {}
    for s in stems.values():
        counts[s] = counts.get(s, 0) + 1
    return {b: s if counts[s] == 1 else f"{s}-{hashlib.sha1(str(b.resolve()).encode()).hexdigest()[:8]}"
            for b, s in stems.items()}


def _fingerprint(bag: Path, options: ReplayOptions, model: ModelSpec) -> dict[str, Any]:
    """What a finished bag must match to be skipped on a rerun."""
    src = bag.resolve()
    files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
    return {"format": _FORMAT, "input": str(src),
            "files": [[str(f.relative_to(src.parent)), f.stat().st_size, f.stat().st_mtime_ns] for f in files],
            "options": dataclasses.asdict(options), "model": dataclasses.asdict(model)}


def _done(out_dir: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    try:
        doc = json.loads((out_dir / DONE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("fingerprint") == fingerprint else None


# ---------------------------------------------------------------------------------------------------- requests
def request_key(image: np.ndarray, regions: Sequence[RegionInput]) -> str:
    """A digest of what one caption call is asked: the image's pixels and every region's box/mask/id/class."""
    h = hashlib.blake2b(digest_size=16)
    arr = np.ascontiguousarray(image)
    h.update(repr((arr.shape, arr.dtype.str)).encode())
    h.update(arr.data)
    for r in regions:
        mask = None
        if r.mask is not None:
            m = np.ascontiguousarray(r.mask, dtype=bool)
            mask = (m.shape, hashlib.blake2b(m.tobytes(), digest_size=16).hexdigest())
        box = None if r.box is None else tuple(float(v) for v in r.box)
        h.update(repr((box, mask, r.region_id, r.source_index, r.class_id, repr(r.score))).encode())
    return h.hexdigest()


def _image(msg: Any, msgtype: str) -> np.ndarray:
    img = C.image_from_compressed(msg) if msgtype == M.COMPRESSED_IMAGE else C.image_from_msg(msg)
    return img if img.flags.writeable else img.copy()


def _regions(msg: Any, from_mask: bool, width: int, height: int) -> list[RegionInput]:
    if from_mask:
        return C.regions_from_instance_mask(msg)
    try:
        return C.regions_from_detections(msg, width, height)
    except AttributeError as err:  # an old vision_msgs layout: replay refuses the frame for it, so no request
        raise RegionInputError(str(err)) from err


def _placeholders(image: np.ndarray, regions: list[RegionInput]) -> list[RegionCaption] | None:
    """What the cache needs of the captions to come: which regions the captioner will refuse (its own rules: the
    region checks and the default region budget). None when it will refuse the whole image (replay stores nothing).
    """
    from pdlm_ros.model.image import to_rgb_uint8  # here: the write tasks, which import this module, need no torch
    from pdlm_ros.model.regions import DEFAULT_REGION_BUDGET, prepare_regions, select_within_budget

    try:
        rgb = to_rgb_uint8(image)
    except ImageInputError:
        return None
    prepared, errors = prepare_regions(regions, rgb.shape[1], rgb.shape[0])
    errors.update(select_within_budget(prepared, regions, DEFAULT_REGION_BUDGET)[1])
    return [RegionCaption(index=i, region_id=r.region_id, box=(0.0, 0.0, 0.0, 0.0), caption="", confidence=0.0,
                          source_index=r.source_index, class_id=r.class_id, score=r.score, error=errors.get(i, ""))
            for i, r in enumerate(regions)]


def plan_requests(bag_path: Path | str, options: ReplayOptions) -> Iterator[tuple[np.ndarray, list[RegionInput]]]:
    """The (image, regions) of every caption call `replay(bag_path, ..., options)` will make, in order."""
    with open_bag(bag_path) as bag:
        from_mask = options.mask_topic is not None
        region_topic = options.region_topic
        sync: StampSync[tuple[Any, str], Any] = StampSync(slop_s=options.slop_s, queue_size=options.queue_size)
        cache = CaptionCache(options.cache_max_age_s, options.cache_iou_threshold,
                             untracked_iou=options.cache_untracked_iou) if options.cache else None
        for topic, _, raw in bag.messages({options.image_topic, region_topic}):
            msgtype = bag.topics[topic].msgtype
            try:
                msg = bag.deserialize(raw, msgtype)
                stamp = C.stamp_ns(msg.header)
            except (BagError, AttributeError):
                continue  # replay skips it too (and lists it)
            pairs = sync.add_image(stamp, (msg, msgtype)) if topic == options.image_topic else \
                sync.add_regions(stamp, msg)
            for pair in pairs:
                (img_msg, img_type), region_msg = pair.image, pair.regions
                try:
                    image = _image(img_msg, img_type)
                    regions = _regions(region_msg, from_mask, image.shape[1], image.shape[0])
                except (ImageInputError, RegionInputError):
                    continue  # refused before the model is asked
                if cache is None:
                    yield image, regions
                    continue
                _, todo, boxes = reuse_cached(cache, regions, pair.stamp)
                if not todo:
                    continue
                part = [regions[i] for i in todo]
                yield image, part
                fresh = _placeholders(image, part)
                if fresh is not None:
                    remember(cache, regions, boxes, {i: c for i, c in zip(todo, fresh)}, pair.stamp)


def _plan_rows(row: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Ray Data flat_map: one bag -> its frame rows, then an end row with their count (or one error row)."""
    key, path, out_dir = row["key"], row["path"], row["out"]
    options: ReplayOptions = pickle.loads(row["options"])
    seq = 0
    try:
        check_request(path, out_dir, options, overwrite=True)
        for image, regions in plan_requests(path, options):
            yield {"key": key, "seq": seq, "kind": "frame", "rkey": request_key(image, regions),
                   "payload": pickle.dumps((image, regions), protocol=pickle.HIGHEST_PROTOCOL)}
            seq += 1
    except Exception as err:  # noqa: BLE001 - a bag that cannot be read fails alone, whatever the reason
        log.warning("bag %s failed while reading: %s", path, err)
        yield {"key": key, "seq": -1, "kind": "error", "rkey": "", "payload": pickle.dumps(_describe(err))}
        return
    yield {"key": key, "seq": seq, "kind": "end", "rkey": "", "payload": pickle.dumps(seq)}


def _describe(err: BaseException) -> str:
    """One line: a package error's message; of an error Ray wraps with a traceback, the last error line in it."""
    if isinstance(err, PDLMError):
        return str(err)
    lines = [ln.strip() for ln in str(err).splitlines()]
    raised = [ln for ln in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception): ", ln)]
    return raised[-1] if raised else f"{type(err).__name__}: {lines[0] if lines else ''}"


# ------------------------------------------------------------------------------------------------------ the actors
class CaptionWorker:
    """One captioning actor: the model is loaded once, then every call captions a batch of frame rows together."""

    def __init__(self, model: ModelSpec, decode: dict[str, Any], exit_once: str | None = None) -> None:
        import torch

        from pdlm_ros.runtime import load_captioner

        if model.threads is not None:
            torch.set_num_threads(model.threads)
        dtype = None if model.dtype == "auto" else getattr(torch, model.dtype)
        self.captioner = load_captioner(model.checkpoint, backend=model.backend, engine_path=model.engine_path,
                                        preset=model.preset, device=model.device, dtype=dtype)
        self.decode = decode
        self.exit_once = exit_once

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.exit_once and not os.path.exists(self.exit_once):
            Path(self.exit_once).touch()
            os._exit(3)  # a real process death in the middle of a call, for the restart path
        frames = [i for i, kind in enumerate(batch["kind"]) if kind == "frame"]
        payload = list(batch["payload"])
        requests = [pickle.loads(payload[i]) for i in frames]
        for i, answer in zip(frames, self._caption(requests)):
            payload[i] = pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL)
        return {**batch, "payload": np.array(payload, dtype=object)}

    def _caption(self, requests: list[tuple[np.ndarray, list[RegionInput]]]) -> list[dict[str, Any]]:
        """{"result": FrameResult} or {"error": (kind, message)} per frame: what `caption` gives or raises."""
        try:
            return [{"result": r} for r in self.captioner.caption_frames(requests, **self.decode)]
        except Exception:  # noqa: BLE001 - one bad frame: find it, caption the others
            out = []
            for image, regions in requests:
                try:
                    out.append({"result": self.captioner.caption(image, regions, **self.decode)})
                except Exception as err:  # noqa: BLE001 - it fails its bag alone (see _Answers)
                    out.append({"error": (type(err).__name__, _describe(err))})
            return out


def _bound_worker(model: ModelSpec, decode: dict[str, Any], exit_once: str | None) -> type:
    """CaptionWorker with its settings built in: Ray ships a class with the actor's definition, whereas constructor
    arguments would sit in the object store, where a restarted actor may no longer find them."""

    class BoundCaptionWorker(CaptionWorker):
        def __init__(self) -> None:
            super().__init__(model, decode, exit_once)

    return BoundCaptionWorker


class _Answers:
    """The model's stand-in for `replay` on the writer: each caption call answered from the workers' results."""

    def __init__(self, name: str, answers: dict[str, bytes]) -> None:
        self.name = name
        self.answers = answers

    def caption(self, image: np.ndarray, regions: list[RegionInput], **_: Any) -> FrameResult:
        payload = self.answers.get(request_key(image, regions))
        if payload is None:
            raise BagError(f"a frame with {len(regions)} regions was not among the frames read for captioning "
                           "(the bag changed while it was replayed?); rerun this bag")
        answer = pickle.loads(payload)
        if "error" in answer:  # refusals as the model raises them (replay refuses the frame); others fail the bag
            kind, message = answer["error"]
            if kind in ("ImageInputError", "RegionInputError"):
                raise (ImageInputError if kind == "ImageInputError" else RegionInputError)(message)
            raise BagError(f"the model failed on a frame with {len(regions)} regions: {message}")
        return answer["result"]


# ------------------------------------------------------------------------------------------------------ writing
def _write_bag(bag: str, out_dir: str, options: ReplayOptions, answers: dict[str, bytes], model_name: str,
               fingerprint: dict[str, Any], name: str) -> dict[str, Any]:
    """Write one bag's output with `replay` and its reports; done.json last. -> the bag's merged-report entry."""
    from pdlm_ros.eval.report import build_report, write_reports

    t0 = time.perf_counter()
    result = replay(bag, out_dir, _Answers(model_name, answers), options, overwrite=True)
    ann_path = annotations_path_for(Path(bag))
    annotations = load_annotations(ann_path) if ann_path.is_file() else None
    report = build_report(result, annotations)
    write_reports(report, out_dir)
    doc = _bag_entry(report, name, time.perf_counter() - t0)
    atomic_write_text(Path(out_dir) / DONE_FILE, json.dumps({"fingerprint": fingerprint, **doc}) + "\n")
    return doc


def _bag_entry(report: Any, name: str, wall_s: float) -> dict[str, Any]:
    s = report.summary
    entry: dict[str, Any] = {
        "bag": report.result.bag, "name": name, "output_bag": str(report.result.out_bag), "model": report.result.model,
        "frames": s.frames, "regions": s.regions, "refused_frames": s.refused_frames,
        "refused_regions": s.refused_regions, "model_s": sum(f.latency_ms for f in report.result.frames) / 1000.0,
        "latency_p50_ms": s.latency_p50_ms, "regions_per_s": s.regions_per_s, "nfe_per_frame": s.nfe_per_frame,
        "damaged": s.damaged, "damage": list(report.result.damage), "write_s": wall_s, "scores": None,
        "region_scores": []}
    if report.scores is not None:
        sc = report.scores.scores
        entry["scores"] = {"pos": sc.pos, "neg": sc.neg, "avg": sc.avg, "regions": sc.regions}
        entry["region_scores"] = [[r.pos, r.neg] for r in sc.per_region]
    return entry


# ------------------------------------------------------------------------------------------------------ the run
def _start_ray(many: ManyOptions) -> bool:
    """Join the cluster or start a local Ray; True when this call started it (and should stop it)."""
    try:
        import ray
    except ImportError:
        raise ConfigError("replay-many needs Ray: pip install 'pdlm_ros[ray]' (or \"ray[data]\")") from None
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING,
                              "configure_logging": True}
    if many.ray_address:
        ray.init(address=many.ray_address, **kwargs)
    else:
        cpus = max(1, math.ceil(many.workers * many.cpus_per_worker))  # every actor fits; readers/writers take 0
        ray.init(num_cpus=cpus, num_gpus=None if many.gpus_per_worker else 0, **kwargs)
    return True


def replay_many(bags: Sequence[str | Path], out: str | Path, options: ReplayOptions, model: ModelSpec = ModelSpec(),
                many: ManyOptions = ManyOptions()) -> ManyResult:
    """Replay every bag of `bags` (see `find_bags`) into OUT/<name>/ and write the merged report OUT/report.*."""
    t0 = time.perf_counter()
    options.region_topic  # noqa: B018 - a missing region source is named before Ray starts
    for what, path in (("checkpoint", model.checkpoint), ("engine path", model.engine_path)):
        if path is not None and not Path(path).exists():  # before every worker fails to load it
            raise ConfigError(f"{what} not found: {path}")
    paths = find_bags(bags)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = bag_names(paths)
    outcomes = {str(p): BagOutcome(str(p), names[p]) for p in paths}
    todo: dict[str, tuple[Path, dict[str, Any]]] = {}
    for p in paths:
        fp = _fingerprint(p, options, model)
        done = None if many.overwrite else _done(out / names[p], fp)
        if done is not None:
            outcomes[str(p)].status, outcomes[str(p)].doc = "skipped", {k: v for k, v in done.items()
                                                                         if k != "fingerprint"}
        else:
            todo[str(p)] = (p, fp)
    started = _start_ray(many) if todo else False
    nodes, model_name = 0, ""
    try:
        if todo:
            import ray

            nodes = len([n for n in ray.nodes() if n.get("Alive")])
            model_name = _run_pipeline(todo, outcomes, names, out, options, model, many)
    finally:
        if started:
            import ray

            ray.shutdown()
    model_name = model_name or next((o.doc.get("model", "") for o in outcomes.values() if o.doc), "")
    result = ManyResult(out, list(outcomes.values()), model_name, many, time.perf_counter() - t0, nodes)
    from pdlm_ros.eval.report import write_many_reports

    result.json_path, result.html_path = write_many_reports(merged_report(result), out)
    return result


@dataclass
class _Gather:
    """One bag's rows as they come back from the actors."""

    answers: dict[str, bytes] = field(default_factory=dict)  # request key -> pickled answer
    seqs: set[int] = field(default_factory=set)
    expected: int | None = None
    error: str = ""
    model: str = ""


def _run_pipeline(todo: dict[str, tuple[Path, dict[str, Any]]], outcomes: dict[str, BagOutcome],
                  names: dict[Path, str], out: Path, options: ReplayOptions, model: ModelSpec,
                  many: ManyOptions) -> str:
    import ray
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = many.progress
    ctx.print_on_execution_start = many.progress
    ctx.target_max_block_size = 16 * 1024 * 1024  # frames reach the actors in blocks of this size, not whole bags
    device = model.device
    if many.gpus_per_worker and device == "cpu":
        device = "cuda"
    spec = dataclasses.replace(model, device=device, threads=model.threads or max(1, int(many.cpus_per_worker)))
    decode = {k: v for k, v in (("mode", options.mode), ("steps", options.steps), ("sampler", options.sampler),
                                ("refresh", options.refresh)) if v is not None}
    items = [{"key": key, "path": str(p), "out": str(out / names[p]), "options": pickle.dumps(options)}
             for key, (p, _) in todo.items()]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.flat_map(_plan_rows, num_cpus=0, compute=ray.data.TaskPoolStrategy(size=max(1, many.workers)))
    ds = ds.map_batches(_bound_worker(spec, decode, os.environ.get(FAULT_ENV) or None),
                        batch_size=many.batch_frames, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=many.workers), num_cpus=many.cpus_per_worker,
                        num_gpus=many.gpus_per_worker or None)
    write = ray.remote(_write_bag).options(num_cpus=0, max_retries=1)
    gathered = {key: _Gather() for key in todo}
    writes: dict[str, Any] = {}
    model_name = ""
    try:
        for row in ds.iter_rows():
            model_name = _take(row, gathered[row["key"]], model_name)
            key, g = row["key"], gathered[row["key"]]
            if not g.error and key not in writes and g.expected is not None and len(g.seqs) == g.expected:
                p, fp = todo[key]
                writes[key] = write.remote(key, str(out / names[p]), options, g.answers,
                                           model_name or spec.checkpoint or spec.preset or "default model", fp,
                                           names[p])
                g.answers = {}
    except Exception as err:  # noqa: BLE001 - e.g. no worker could load the model; bags written so far are kept
        cause = getattr(err, "cause", None) or err
        ray.wait(list(writes.values()), num_returns=len(writes))  # let the bags already handed over finish
        raise PDLMError(f"the captioning workers stopped: {_describe(cause)}; bags finished so far are kept and "
                        "a rerun skips them") from err
    for key, g in gathered.items():
        o = outcomes[key]
        if g.error:
            o.status, o.error = "failed", g.error
        elif key not in writes:
            o.status, o.error = "failed", "its frames did not all come back from the workers"
    for key, ref in writes.items():
        o = outcomes[key]
        try:
            o.doc = ray.get(ref)
            o.status = "done"
        except ray.exceptions.RayTaskError as err:
            cause = err.cause if getattr(err, "cause", None) is not None else err
            o.status, o.error = "failed", _describe(cause)
            log.warning("bag %s failed while writing: %s", key, o.error)
    return model_name


def _take(row: dict[str, Any], g: _Gather, model_name: str) -> str:
    """One row from the actors into its bag's gathering; returns the model's name once known."""
    kind = row["kind"]
    if kind == "error":
        g.error = pickle.loads(row["payload"])
    elif kind == "end":
        g.expected = pickle.loads(row["payload"])
    elif int(row["seq"]) not in g.seqs:  # a retried call can return a frame twice: keep it once
        g.seqs.add(int(row["seq"]))
        g.answers[row["rkey"]] = row["payload"]
        if not model_name:
            answer = pickle.loads(row["payload"])
            model_name = answer["result"].model_name if "result" in answer else ""
    return model_name


# ------------------------------------------------------------------------------------------------------ report
def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def merged_report(result: ManyResult) -> dict[str, Any]:
    """The merged JSON document: per bag and in total, frames, regions, throughput, scores, failures."""
    entries = []
    for o in result.bags:
        entry = {k: v for k, v in o.doc.items() if k != "region_scores"}
        entries.append({**entry, "bag": o.bag, "name": o.name, "status": o.status, "error": o.error,
                        "report": f"{o.name}/report.html" if o.status != "failed" else None})
    ok = [o for o in result.bags if o.status != "failed"]
    ran = [o for o in result.bags if o.status == "done"]
    region_scores = [rs for o in ok for rs in o.doc.get("region_scores", [])]
    pos = _mean([p for p, _ in region_scores if p is not None])
    neg = _mean([n for _, n in region_scores if n is not None])
    scores = None
    if pos is not None:  # the mean over all scored regions of every bag, as one bag's report computes it
        scores = {"pos": round(100 * pos, 2), "neg": None if neg is None else round(100 * neg, 2),
                  "avg": round(100 * (pos if neg is None else (pos + neg) / 2), 2), "regions": len(region_scores),
                  "bags": sum(1 for o in ok if o.doc.get("scores"))}
    frames_run = sum(o.doc.get("frames", 0) for o in ran)
    regions_run = sum(o.doc.get("regions", 0) for o in ran)
    totals = {"bags": len(result.bags), "done": len(ran), "skipped": len(ok) - len(ran),
              "failed": len(result.failed), "frames": sum(o.doc.get("frames", 0) for o in ok),
              "regions": sum(o.doc.get("regions", 0) for o in ok), "frames_this_run": frames_run,
              "regions_this_run": regions_run,
              "frames_per_s": frames_run / result.wall_s if result.wall_s > 0 and ran else None,
              "regions_per_s": regions_run / result.wall_s if result.wall_s > 0 and ran else None,
              "model_s": sum(o.doc.get("model_s", 0.0) for o in ran), "scores": scores}
    return {"out": str(result.out), "model": result.model, "workers": result.options.workers,
            "gpus_per_worker": result.options.gpus_per_worker, "batch_frames": result.options.batch_frames,
            "ray_address": result.options.ray_address or "local", "nodes": result.nodes, "wall_s": result.wall_s,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "totals": totals, "bags": entries,
            "failures": [{"bag": o.bag, "error": o.error} for o in result.failed]}
