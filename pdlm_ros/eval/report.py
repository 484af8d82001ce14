"""Replay reports: summary numbers, caption scores against annotations, caption stability per track, and the files.

`build_report(result, annotations)` computes everything once into a `ReplayReport`; `write_reports` writes
OUT/report.json, a self-contained OUT/report.html (annotated frames and the latency plot embedded as base64 PNG, so
the one file can be mailed or attached to CI) and OUT/latency_vs_regions.png. The CLI prints `summary_rows`.

Latency is the model's time per frame (the Captioner's "total": vision encoder + prefix + decoding), not bag I/O;
refused frames (no model run) are left out of the latency percentiles. Regions per second = regions captioned /
summed model time. Stability looks at each track id over the frames it appears in: the share of frames whose
caption equals the track's most common caption, and the number of distinct captions (1 = perfectly stable).
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pdlm_ros.data.bags import Annotations, FrameTruth
from pdlm_ros.eval.cache import atomic_write_text
from pdlm_ros.data.scenes import Scene, SceneObject
from pdlm_ros.eval.judges import Judgement, RuleJudge, refused_judgement
from pdlm_ros.eval.questions import build_questions
from pdlm_ros.eval.replay import ReplayResult
from pdlm_ros.eval.scoring import Scores, _mean, score_judgements

__all__ = ["Summary", "TrackStability", "CaptionScores", "ReplayReport", "ReportPaths", "build_report",
           "summarize", "stability", "score_captions", "summary_rows", "write_reports", "TABLE2_HEAD", "table2_cells",
           "write_benchmark_report", "write_many_reports"]

PLOT_NAME = "latency_vs_regions.png"
_MAX_TABLE_ROWS = 2000  # captions listed in the HTML table; the JSON report always has them all


@dataclass(frozen=True)
class Summary:
    frames: int  # pairs captioned (refused frames included)
    regions: int
    refused_regions: int
    refused_frames: int
    latency_p50_ms: float | None  # per frame, model time
    latency_p95_ms: float | None
    latency_mean_ms: float | None
    nfe_per_frame: float | None  # mean over frames the model ran on
    tpf: float | None  # tokens committed / forward passes, all frames together
    regions_per_s: float | None  # regions / summed model time
    unpaired_images: int
    unpaired_regions: int
    skipped_messages: int
    damaged: bool  # the bag could not be read to its end
    wall_s: float  # the whole replay: reading, captioning and writing the bag


@dataclass(frozen=True)
class TrackStability:
    track_id: str
    frames: int  # frames with a caption for this track
    distinct: int  # distinct captions
    mode_caption: str
    mode_share: float  # share of frames whose caption is the most common one
    changes: int  # frame-to-frame caption changes
    truth: str | None = None  # the annotated caption, when known
    truth_share: float | None = None  # share of frames whose caption equals it exactly


@dataclass(frozen=True)
class CaptionScores:
    """ParaDLC-style scores of the replayed captions (RuleJudge, questions from the annotations)."""

    scores: Scores
    frames_scored: int
    regions_scored: int
    frames_without_truth: int  # captioned frames whose stamp is not in the annotations
    regions_without_truth: int  # regions whose id names no annotated track


@dataclass(frozen=True)
class ReplayReport:
    result: ReplayResult
    summary: Summary
    tracks: list[TrackStability]
    scores: CaptionScores | None

    def to_dict(self) -> dict[str, Any]:
        r = self.result
        doc: dict[str, Any] = {
            "bag": r.bag, "storage": r.storage, "output_bag": str(r.out_bag), "model": r.model,
            "options": asdict(r.options), "summary": asdict(self.summary),
            "stability": {"mean_mode_share": _mean([t.mode_share for t in self.tracks]),
                          "mean_distinct": _mean([float(t.distinct) for t in self.tracks]),
                          "tracks": [asdict(t) for t in self.tracks]},
            "scores": None, "sync": asdict(r.sync), "damage": list(r.damage),
            "skipped": [asdict(s) for s in r.skipped], "written": dict(r.written),
            "topics": {k: asdict(v) for k, v in r.topics.items()},
            "frames": [{"index": f.index, "stamp_ns": f.stamp_ns, "regions_stamp_ns": f.regions_stamp_ns,
                        "nfe": f.nfe, "tokens": f.tokens, "tpf": f.tpf, "latency_ms": f.latency_ms,
                        "error": f.error,
                        "regions": [{"index": c.index, "id": c.region_id, "source_index": c.source_index,
                                     "class_id": c.class_id, "box": list(c.box), "caption": c.caption,
                                     "confidence": c.confidence, "error": c.error} for c in f.regions]}
                       for f in r.frames],
        }
        if self.scores is not None:
            s = self.scores
            doc["scores"] = {**s.scores.to_dict(), "judge": "rule", "frames_scored": s.frames_scored,
                             "regions_scored": s.regions_scored, "frames_without_truth": s.frames_without_truth,
                             "regions_without_truth": s.regions_without_truth}
        return _finite(doc)


@dataclass(frozen=True)
class ReportPaths:
    json: Path
    html: Path
    plot: Path


def _finite(v: Any) -> Any:
    """JSON has no NaN/inf: they become null."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    return v


# --------------------------------------------------------------------------------------------------------- numbers
def summarize(result: ReplayResult) -> Summary:
    ran = [f for f in result.frames if not f.error]
    lat = np.array([f.latency_ms for f in ran], dtype=np.float64)
    nfe = sum(f.nfe for f in ran)
    captioned = sum(1 for f in ran for c in f.regions if c.ok)
    total_s = float(lat.sum()) / 1000.0
    return Summary(
        frames=len(result.frames), regions=result.regions,
        refused_regions=sum(1 for f in result.frames for c in f.regions if not c.ok),
        refused_frames=len(result.frames) - len(ran),
        latency_p50_ms=float(np.percentile(lat, 50)) if lat.size else None,
        latency_p95_ms=float(np.percentile(lat, 95)) if lat.size else None,
        latency_mean_ms=float(lat.mean()) if lat.size else None,
        nfe_per_frame=nfe / len(ran) if ran else None,
        tpf=sum(f.tokens for f in ran) / nfe if nfe else None,
        regions_per_s=captioned / total_s if total_s > 0 else None,
        unpaired_images=result.sync.expired_images, unpaired_regions=result.sync.expired_regions,
        skipped_messages=len(result.skipped), damaged=bool(result.damage), wall_s=result.wall_s)


def stability(result: ReplayResult, annotations: Annotations | None = None) -> list[TrackStability]:
    """Caption stability per track id, in order of first appearance. Refused regions and empty ids are skipped."""
    seq: dict[str, list[str]] = {}
    for f in result.frames:
        for c in f.regions:
            if c.ok and c.region_id:
                seq.setdefault(c.region_id, []).append(c.caption)
    out = []
    for track, caps in seq.items():
        mode, count = Counter(caps).most_common(1)[0]
        truth = annotations.tracks[track].caption if annotations and track in annotations.tracks else None
        out.append(TrackStability(
            track_id=track, frames=len(caps), distinct=len(set(caps)), mode_caption=mode,
            mode_share=count / len(caps), changes=sum(a != b for a, b in zip(caps, caps[1:])), truth=truth,
            truth_share=None if truth is None else sum(c == truth for c in caps) / len(caps)))
    return out


def _scene(ann: Annotations, frame: FrameTruth) -> Scene:
    """A pixel-free Scene of an annotated frame: all `build_questions` reads (attributes, seed)."""
    empty = np.zeros((1, 1), dtype=bool)
    objects = []
    for o in frame.objects:
        t = ann.tracks[o.track_id]
        objects.append(SceneObject(track_id=o.track_id, shape=t.shape, color=t.color, size=t.size, pattern=t.pattern,
                                   box=o.box, mask=empty, caption=t.caption, visible_fraction=o.visible_fraction))
    # One question seed per (bag seed, frame): negatives vary over frames, and a rerun asks the same ones.
    return Scene(seed=ann.seed * 1_000_003 + frame.index, image=np.zeros((1, 1, 3), np.uint8), objects=objects,
                 instance_mask=np.zeros((1, 1), np.uint16))


def score_captions(result: ReplayResult, annotations: Annotations) -> CaptionScores | None:
    """Judge every captioned region against its annotated track; None when no region matches a track."""
    judge = RuleJudge()
    judgements: list[Judgement] = []
    frames_scored = no_frame = no_track = 0
    for f in result.frames:
        truth = annotations.frame_at(f.stamp_ns)
        if truth is None:
            no_frame += 1
            continue
        scene = _scene(annotations, truth)
        index = {o.track_id: i for i, o in enumerate(scene.objects)}
        scored = False
        for c in f.regions:
            i = index.get(c.region_id)
            if i is None:
                no_track += 1
                continue
            questions = build_questions(scene, i)
            key = f"{f.stamp_ns}/{c.region_id}"
            judgements.append(refused_judgement(key, questions, c.error) if c.error
                              else judge.judge(c.caption, questions, key=key))
            scored = True
        frames_scored += scored
    if not judgements:
        return None
    return CaptionScores(scores=score_judgements(judgements), frames_scored=frames_scored,
                         regions_scored=len(judgements), frames_without_truth=no_frame, regions_without_truth=no_track)


def build_report(result: ReplayResult, annotations: Annotations | None = None) -> ReplayReport:
    scores = score_captions(result, annotations) if annotations is not None else None
    return ReplayReport(result=result, summary=summarize(result), tracks=stability(result, annotations),
                        scores=scores)


# ---------------------------------------------------------------------------------------------------------- output
def _fmt(v: float | None, spec: str = ".1f", unit: str = "") -> str:
    return "n/a" if v is None else f"{v:{spec}}{unit}"


def summary_rows(report: ReplayReport) -> list[tuple[str, str]]:
    """(metric, value) rows of the summary table the CLI prints."""
    s, r = report.summary, report.result
    rows = [
        ("model", r.model), ("mode", r.options.mode),
        ("frames (pairs)", f"{s.frames}" + (f" ({s.refused_frames} refused)" if s.refused_frames else "")),
        ("regions", f"{s.regions}" + (f" ({s.refused_regions} refused)" if s.refused_regions else "")),
        ("latency p50 / p95 per frame", f"{_fmt(s.latency_p50_ms, '.0f')} / {_fmt(s.latency_p95_ms, '.0f')} ms"),
        ("NFE per frame", _fmt(s.nfe_per_frame)), ("TPF", _fmt(s.tpf, ".2f")),
        ("regions per second", _fmt(s.regions_per_s, ".2f")),
    ]
    if report.tracks:
        rows.append(("caption stability", f"{_fmt(_mean([t.mode_share for t in report.tracks]), '.0%')} of frames "
                     f"show a track's usual caption; {_fmt(_mean([float(t.distinct) for t in report.tracks]), '.1f')}"
                     f" distinct captions per track ({len(report.tracks)} tracks)"))
    if report.scores is not None:
        sc = report.scores.scores
        rows.append(("ParaDLC Pos / Neg / Avg", f"{sc.pos:.1f} / {_fmt(sc.neg)} / {sc.avg:.1f} % "
                     f"({report.scores.regions_scored} regions, rule judge)"))
    if s.unpaired_images or s.unpaired_regions:
        rows.append(("unpaired", f"{s.unpaired_images} images, {s.unpaired_regions} region messages"))
    if s.skipped_messages:
        rows.append(("skipped messages", f"{s.skipped_messages} (could not be decoded)"))
    if s.damaged:
        rows.append(("damaged bag", "; ".join(r.damage)))
    rows.append(("wall time", f"{s.wall_s:.1f} s"))
    return rows


def _plot(result: ReplayResult, path: Path) -> None:
    """Latency per frame against its number of regions, with the median per region count."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never opens a window
    import matplotlib.pyplot as plt

    ran = [f for f in result.frames if not f.error]
    x = np.array([len(f.regions) for f in ran])
    y = np.array([f.latency_ms for f in ran])
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    if ran:
        ax.scatter(x, y, s=14, alpha=0.6, label="frame")
        counts = np.unique(x)
        ax.plot(counts, [np.median(y[x == n]) for n in counts], "o-", color="C3", label="median")
        ax.legend(loc="upper left")
    else:
        ax.text(0.5, 0.5, "no frame was captioned", ha="center", va="center", transform=ax.transAxes)
    ax.xaxis.get_major_locator().set_params(integer=True)  # region counts are whole numbers
    ax.set_xlim(-0.5, float(x.max() if x.size else 0) + 1.5)
    ax.set_xlabel("regions in the frame")
    ax.set_ylabel("model latency per frame (ms)")
    ax.set_title(f"{result.model}, mode {result.options.mode}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


_CSS = """body{font-family:system-ui,sans-serif;margin:24px;color:#222}table{border-collapse:collapse;margin:8px 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;font-size:13px;vertical-align:top}th{background:#f3f3f3}
.warn{background:#fff4e0;padding:8px;border-left:4px solid #e90}
.frames{display:flex;flex-wrap:wrap;gap:12px}.frames figure{margin:0}figcaption{font-size:12px}"""


def _table(head: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _img(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _html(report: ReplayReport, plot_png: bytes) -> str:
    r = report.result
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>pdlm_ros replay: {html.escape(r.bag)}"
             f"</title><style>{_CSS}</style></head><body>",
             f"<h1>Replay of {html.escape(r.bag)}</h1>",
             _table(["input", "value"], [("bag", r.bag), ("storage", r.storage), ("output bag", r.out_bag),
                                         ("image topic", r.options.image_topic),
                                         ("region topic", r.options.region_topic),
                                         ("caption topic", r.options.caption_topic)]),
             "<h2>Summary</h2>", _table(["metric", "value"], summary_rows(report))]
    warnings = [*r.damage, *(f"skipped {s.topic} at {s.log_time_ns} ns: {s.reason}" for s in r.skipped)]
    if warnings:
        parts.append("<div class='warn'>" + "<br>".join(html.escape(w) for w in warnings) + "</div>")
    if report.scores is not None:
        sc = report.scores.scores
        parts += ["<h2>Caption scores (ParaDLC-style, rule judge)</h2>",
                  _table(["Pos %", "Neg %", "Avg %", "interference Neg %", "regions", "refused"],
                         [(sc.pos, _fmt(sc.neg), sc.avg, _fmt(sc.interference_neg), sc.regions, sc.refused)]),
                  _table(["attribute", "positive accuracy %"], list(sc.per_attribute.items()))]
    if report.tracks:
        parts += ["<h2>Caption stability per track</h2>",
                  _table(["track", "frames", "distinct", "usual caption", "usual share", "changes", "annotated",
                          "exact share"],
                         [(t.track_id, t.frames, t.distinct, t.mode_caption, f"{t.mode_share:.0%}", t.changes,
                           t.truth or "", "" if t.truth_share is None else f"{t.truth_share:.0%}")
                          for t in report.tracks])]
    parts += ["<h2>Latency against regions</h2>", _img(plot_png, "latency vs regions")]
    if r.previews:
        parts.append("<h2>Annotated frames</h2><div class='frames'>")
        for index, png in sorted(r.previews.items()):
            f = r.frames[index]
            parts.append(f"<figure>{_img(png, f'frame {index}')}<figcaption>frame {index}, stamp {f.stamp_ns} ns, "
                         f"{f.latency_ms:.0f} ms</figcaption></figure>")
        parts.append("</div>")
    rows = [(f.index, f.stamp_ns, c.region_id, c.class_id, ", ".join(f"{v:.0f}" for v in c.box), c.caption,
             f"{c.confidence:.2f}", c.error) for f in r.frames for c in f.regions]
    parts += ["<h2>Captions</h2>",
              _table(["frame", "stamp (ns)", "id", "class", "box", "caption", "confidence", "error"],
                     rows[:_MAX_TABLE_ROWS])]
    if len(rows) > _MAX_TABLE_ROWS:
        parts.append(f"<p>{len(rows) - _MAX_TABLE_ROWS} more rows in report.json</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_reports(report: ReplayReport, out: Path | str) -> ReportPaths:
    """Write report.json, report.html and the latency plot into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = ReportPaths(json=out / "report.json", html=out / "report.html", plot=out / PLOT_NAME)
    paths.json.write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    _plot(report.result, paths.plot)
    paths.html.write_text(_html(report, paths.plot.read_bytes()))
    return paths


# ------------------------------------------------------------------------------------------ published benchmarks
TABLE2_HEAD = ["Method", "Type", "Pos (%)", "Neg (%)", "Avg (%)", "TPF", "NFE / image", "Time (s)"]


def table2_cells(row: dict[str, Any]) -> list[str]:
    """One row of the paper's Table 2 layout from `BenchReport.table_row()`."""
    return [str(row["method"]), str(row["type"]), f"{row['pos']:.1f}", f"{row['neg']:.1f}", f"{row['avg']:.1f}",
            f"{row['tpf']:.2f}", f"{row['nfe_per_image']:.1f}", f"{row['time_s']:.1f}"]


def _bench_html(doc: dict[str, Any]) -> str:
    t, s, c, j = doc["table"], doc["scores"], doc["captioning"], doc["judge"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>pdlm_ros: {html.escape(doc['benchmark'])}"
             f"</title><style>{_CSS}</style></head><body>",
             f"<h1>{html.escape(doc['benchmark'])}</h1>",
             _table(TABLE2_HEAD, [table2_cells(t)]),
             "<h2>Run</h2>",
             _table(["setting", "value"], [
                 ("model", f"{doc['model']} ({doc['model_id']})"), ("mode", doc["mode"]),
                 ("steps", doc["steps"] if doc["steps"] is not None else "model default"),
                 ("regions / images / caption passes", f"{s['regions']} / {c['images']} / {c['passes']} ("
                  + (f"at most {c['masks_per_pass']} masks" if c["masks_per_pass"] else "as many masks as the model "
                     "takes") + " a pass)"),
                 ("NFE total / tokens / TPF", f"{c['nfe']} / {c['tokens']} / {c['tpf']:.2f}"),
                 ("captioning time", f"{c['seconds']:.1f} s ({c['cached_images']} images from the cache)"),
                 ("judge", f"{j['model']} at {j['endpoint']} ({j['protocol']} protocol; published numbers used "
                           f"{j['reference_judge']})"),
                 ("judge requests / cached answers / seconds",
                  f"{j['requests']} / {j['cached_answers']} / {j['seconds']:.1f}"),
                 ("recognised regions", f"{s['recognized']} of {s['regions']}"),
                 ("questions / parse failures (scored 0)", f"{s['questions']} / {s['parse_failures']}"),
                 ("refused regions (scored 0)", s["refused"]),
                 ("created (UTC) / machine", f"{doc['created']} / {doc['machine']}")])]
    rows = []
    for r in doc.get("regions", []):
        pos = [q["score"] for q in r["questions"] if q["type"] == "positive"]
        neg = [q["score"] for q in r["questions"] if q["type"] != "positive"]
        rows.append((r["key"], r["class_name"], r["caption"] or f"(refused: {r['refused']})",
                     {True: "yes", False: "no", None: ""}[r["recognized"]],
                     _fmt(_mean(pos), ".2f"), _fmt(_mean(neg), ".2f")))
    if rows:
        parts += ["<h2>Regions</h2>", _table(["key", "class", "caption", "recognised", "Pos", "Neg"],
                                             rows[:_MAX_TABLE_ROWS])]
    parts.append("</body></html>")
    return "\n".join(parts)


def write_benchmark_report(report: Any, out: Path | str) -> tuple[Path, Path]:
    """Write `<bench>-<mode>.json` (everything, every answer) and `.html` (Table 2, the run, the regions) into
    `out`, each through a temporary file and a rename, so a crash never leaves half a report."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    doc = _finite(report.to_dict(details=True))
    stem = f"{report.bench}-{report.mode}"
    paths = (out / f"{stem}.json", out / f"{stem}.html")
    atomic_write_text(paths[0], json.dumps(doc, indent=1) + "\n")
    atomic_write_text(paths[1], _bench_html(doc))
    return paths


# ----------------------------------------------------------------------------------------------- many bags at once
def _many_html(doc: dict[str, Any]) -> str:
    t = doc["totals"]
    sc = t["scores"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>pdlm_ros replay-many: {t['bags']} bags"
             f"</title><style>{_CSS}</style></head><body>",
             f"<h1>Replay of {t['bags']} bags</h1>",
             _table(["metric", "value"], [
                 ("model", doc["model"]),
                 ("Ray", f"{doc['ray_address']}, {doc['nodes']} node(s), {doc['workers']} workers, "
                         f"{doc['gpus_per_worker']} GPU each, {doc['batch_frames']} frames per worker call"),
                 ("bags", f"{t['done']} replayed, {t['skipped']} already done, {t['failed']} failed"),
                 ("frames / regions", f"{t['frames']} / {t['regions']}"),
                 ("this run", f"{t['frames_this_run']} frames, {t['regions_this_run']} regions in {doc['wall_s']:.1f}"
                              f" s: {_fmt(t['frames_per_s'], '.2f')} frames/s, "
                              f"{_fmt(t['regions_per_s'], '.2f')} regions/s"),
                 ("ParaDLC Pos / Neg / Avg (all bags)",
                  "no annotations" if sc is None else f"{sc['pos']:.1f} / {_fmt(sc['neg'])} / {sc['avg']:.1f} % "
                                                      f"({sc['regions']} regions of {sc['bags']} bags, rule judge)"),
                 ("created (UTC)", doc["created"])])]
    if doc["failures"]:
        parts.append("<div class='warn'>" + "<br>".join(html.escape(f"{f['bag']}: {f['error']}")
                                                          for f in doc["failures"]) + "</div>")
    rows = []
    for b in doc["bags"]:
        s = b.get("scores")
        link = f"<a href='{html.escape(b['report'])}'>{html.escape(b['name'])}</a>" if b.get("report") else \
            html.escape(b["name"])
        cells = [b["bag"], b["status"], b.get("frames", ""), b.get("regions", ""),
                 _fmt(b.get("regions_per_s"), ".2f") if b["status"] != "failed" else "",
                 "" if not s else f"{s['pos']:.1f} / {_fmt(s['neg'])} / {s['avg']:.1f}", b["error"]]
        rows.append("<tr><td>" + link + "</td>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in ["output", "bag", "status", "frames", "regions", "regions/s (model)",
                                            "Pos / Neg / Avg %", "error"])
    parts += ["<h2>Bags</h2>", f"<table><tr>{head}</tr>{''.join(rows)}</table>", "</body></html>"]
    return "\n".join(parts)


def write_many_reports(doc: dict[str, Any], out: Path | str) -> tuple[Path, Path]:
    """The merged report of `replay-many` (`pdlm_ros.eval.replay_many.merged_report`): OUT/report.json and
    OUT/report.html with a row and a link per bag, each written through a temporary file and a rename."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = (out / "report.json", out / "report.html")
    atomic_write_text(paths[0], json.dumps(_finite(doc), indent=1) + "\n")
    atomic_write_text(paths[1], _many_html(doc))
    return paths
