"""`pdlm-ros bench`: parallel vs sequential vs autoregressive decoding on one model and the same frames.

A thin wrapper over `pdlm_ros.eval.bench.run_bench`; this module only parses options, loads the models and renders the
report (text table, JSON, plot).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from typing import Any

import torch

from pdlm_ros.cli._common import add_json_option, add_threads_option, emit_json, set_threads, setup_logging
from pdlm_ros.errors import ConfigError

log = logging.getLogger(__name__)

EXAMPLES = """examples:
  pdlm-ros bench --preset small --json bench.json --plot bench.png     # the CPU run of docs/bench.md (~10 min)
  pdlm-ros bench --preset tiny --regions 1,4 --repeats 1               # a quick look
  pdlm-ros bench --preset 8b --device cuda --dtype bfloat16 --json     # real shape, random weights, on a GPU
  pdlm-ros bench --checkpoint pdlm_ros/assets/default --modes parallel,threshold
  pdlm-ros bench --preset small --cross-frame 1,2,4 --json cross_frame.json  # F frames x 4 regions in one pass
"""

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from pdlm_ros.eval.bench import BENCH_MODES

    p.add_argument("--preset", choices=["tiny", "small", "8b", "tiny-official", "small-official", "8b-official"],
                   help="randomly initialised model of this shape (default: small, unless --checkpoint is given); "
                        "the *-official presets and official checkpoints run the official layout's modes")
    p.add_argument("--checkpoint", metavar="DIR", help="benchmark a PerceptionDLM checkpoint instead of a preset")
    p.add_argument("--regions", default="1,2,4,8,16", metavar="N,N,...", help="region counts (default: %(default)s)")
    p.add_argument("--modes", metavar="MODE,...",
                   help=f"modes to measure (default: all: {','.join(BENCH_MODES)}; for the official layout: "
                        "official,isolated,cached)")
    p.add_argument("--refresh", type=int, default=4, help="official layout, mode cached: refresh the K/V cache every "
                   "N steps (default 4)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1)")
    p.add_argument("--dtype", choices=list(DTYPES), help="weights dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's, 32)")
    p.add_argument("--repeats", type=int, default=3, help="measured frames per mode and region count (median)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured runs per mode and region count")
    p.add_argument("--max-cell-seconds", type=float, default=30.0,
                   help="stop repeating a mode/region-count cell after this long; 0 = no limit (default: %(default)s)")
    p.add_argument("--frame-size", default="1280x720", metavar="WxH", help="frame size in pixels (default: %(default)s)")
    p.add_argument("--threshold-checkpoint", default="auto", metavar="DIR",
                   help="trained model for the threshold-mode NFE check on held-out scenes ('auto': the bundled "
                        "model when present; 'none': skip)")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP/s measurement of the denoising step")
    p.add_argument("--cross-frame", metavar="F,F,...",
                   help="instead of the mode table: F frames captioned in one pass (Captioner.caption_frames) "
                        "against one frame at a time, tokens/s and their ratio for each F, e.g. 1,2,4")
    p.add_argument("--cross-frame-regions", type=int, default=4, metavar="N",
                   help="regions per frame for --cross-frame (default: %(default)s)")
    add_threads_option(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and the frames")
    add_json_option(p)
    p.add_argument("--plot", metavar="PNG", help="draw tokens/s and latency against the number of regions")
    p.add_argument("-v", "--verbose", action="store_true")


# -- parsing -----------------------------------------------------------------------------------------------------------
def parse_int_list(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or any(v < 1 for v in values):
        raise ConfigError(f"{what} must be comma-separated positive integers, e.g. 1,2,4; got {text!r}")
    return values


def parse_size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ConfigError(f"--frame-size must be WIDTHxHEIGHT in pixels, e.g. 1280x720; got {text!r}")
    return int(parts[0]), int(parts[1])


def parse_device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError as err:
        raise ConfigError(f"unknown device {text!r}: {err}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {text!r} asked for, but this torch has no usable CUDA; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device must be cpu or cuda[:N] (got {text!r})")
    return device


def load_models(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    """The benchmarked captioner and the trained model of the threshold check (or None)."""
    from pdlm_ros.captioner import DEFAULT_CHECKPOINT, Captioner

    if args.checkpoint and args.preset:
        raise ConfigError("give --preset or --checkpoint, not both")
    if args.checkpoint:
        cap = Captioner.load(args.checkpoint, device=str(device), dtype=dtype)
    else:
        # Built on the target device, so an 8B model is initialised by the GPU in seconds (on the CPU it would take
        # minutes and 32 GB of host memory before the copy).
        with torch.device(device):
            cap = Captioner.load(preset=args.preset or "small", device=str(device), dtype=dtype, seed=args.seed)
    thr = args.threshold_checkpoint
    if thr == "none":
        return cap, None
    if thr == "auto":
        if not (DEFAULT_CHECKPOINT / "model.safetensors").is_file():
            log.warning("no bundled model at %s: the threshold check on a trained model is skipped", DEFAULT_CHECKPOINT)
            return cap, None
        thr = DEFAULT_CHECKPOINT
    return cap, Captioner.load(thr, device=str(device))


# -- rendering ---------------------------------------------------------------------------------------------------------
def _num(v: float | None, fmt: str = ".2f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def format_report(report: Any) -> str:
    """The report as plain text: header, one row per mode and region count, ratios, FLOP/s, targets."""
    m, s, mach = report.model, report.settings, report.machine
    device = mach.get("gpu") or f"{mach['cpu']}, {mach['torch_threads']} threads"
    lines = [
        f"model {m['name']}  ({m['parameters'] / 1e6:.1f} M parameters, {m['dtype']}, attention {m['attn_impl']})",
        f"device {mach['device']} ({device}); torch {report.torch_version}; commit {report.git_commit}; "
        f"{report.date_utc}",
        f"prefix {m['prefix_tokens']} tokens, {m['roi_tokens']} RoI + {m['caption_len']} caption tokens per region, "
        f"{m['steps']} steps; {s.frame_size[0]}x{s.frame_size[1]} frames; median of up to {s.repeats} repeats",
        "",
        f"{'mode':<19}{'regions':>8}{'latency ms':>12}{'tokens/s':>10}{'NFE':>6}{'TPF':>7}{'step ms':>9}"
        f"{'x seq_nocache':>15}{'x ar':>7}{'runs':>6}",
    ]
    for r in report.rows:
        base = report.row("sequential_nocache", r.regions)
        ar = report.row("ar", r.regions)
        lines.append(
            f"{r.mode:<19}{r.regions:>8}{r.latency_ms:>12.1f}{r.tokens_per_s:>10.1f}{r.nfe:>6}{r.tpf:>7.2f}"
            f"{r.step_ms:>9.2f}{_num(r.tokens_per_s / base.tokens_per_s if base else None):>15}"
            f"{_num(r.tokens_per_s / ar.tokens_per_s if ar else None):>7}{r.repeats:>6}")
    regions = list(s.regions)
    if report.ratios:
        lines += ["", f"{'ratios, by regions':<42}" + "".join(f"{n:>8}" for n in regions)]
        for name, per_n in report.ratios.items():
            lines.append(f"{name:<42}" + "".join(f"{_num(per_n.get(n)):>8}" for n in regions))
    if report.step_flops:
        lines += ["", "cached denoising step vs the same matrix products (FLOPs: matrix products only)",
                  f"{'regions':>8}{'GFLOP':>9}{'step ms':>10}{'matmul ms':>11}{'step GFLOP/s':>14}"
                  f"{'matmul GFLOP/s':>16}{'fraction':>10}"]
        for f in report.step_flops:
            lines.append(f"{f.regions:>8}{f.flops / 1e9:>9.2f}{f.step_ms:>10.2f}{f.matmul_ms:>11.2f}"
                         f"{f.step_flops_per_s / 1e9:>14.1f}{f.matmul_flops_per_s / 1e9:>16.1f}{f.fraction:>10.2f}")
        if report.peak_matmul_flops_per_s:
            lines.append(f"one large square matrix product: {report.peak_matmul_flops_per_s / 1e9:.1f} GFLOP/s")
    c = report.threshold_check
    if c is not None:
        lines += ["", f"threshold mode on a trained model ({c.model}), {c.scenes} held-out scenes, {c.regions} regions, "
                      f"threshold {c.threshold}:",
                  f"  NFE {c.nfe_threshold} vs {c.nfe_parallel} default = {c.nfe_ratio:.2f}; per-region TPF "
                  f"{c.tpf_per_region:.2f}; same caption as default {c.same_caption:.0%}; exact captions "
                  f"{c.exact_threshold:.0%} (default {c.exact_parallel:.0%})"]
    lines += ["", "targets:"]
    for t in report.targets:
        state = "not measured" if t.met is None else ("met" if t.met else "NOT met")
        lines.append(f"  {t.name}: {_num(t.value)} (goal {t.goal}) {state}")
    lines.append(f"published (8B on a GPU): {report_published()}")
    lines.append(f"wall time {report.wall_s:.0f} s")
    return "\n".join(lines)


def report_published() -> str:
    from pdlm_ros.eval.bench import PUBLISHED

    return (f"{PUBLISHED['throughput_vs_sequential_at_4_regions']}x throughput over sequential at 4 regions, "
            f"latency {PUBLISHED['latency_s_sequential']} s -> {PUBLISHED['latency_s_parallel']} s per image")


def plot_report(report: Any, path: str) -> None:
    """Tokens per second and latency against the number of regions, one line per mode (the paper's Figure 1b)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_l) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode in report.settings.modes:
        rows = sorted((r for r in report.rows if r.mode == mode), key=lambda r: r.regions)
        if not rows:
            continue
        x = [r.regions for r in rows]
        ax_t.plot(x, [r.tokens_per_s for r in rows], marker="o", label=mode)
        ax_l.plot(x, [r.latency_ms / 1000.0 for r in rows], marker="o", label=mode)
    for ax, ylabel in ((ax_t, "tokens / s"), (ax_l, "latency per frame (s)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(list(report.settings.regions), [str(n) for n in report.settings.regions])
        ax.set_xlabel("regions per frame")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    mach = report.machine
    fig.suptitle(f"{report.model['name']}, {report.model['dtype']}, {mach.get('gpu') or mach['cpu']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- command -----------------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from pdlm_ros.eval.bench import BENCH_MODES, BenchSettings, run_bench

    setup_logging(args.verbose)
    set_threads(args.threads)
    device = parse_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps must be >= 1 (got {args.steps})")
    if args.cross_frame:
        args.threshold_checkpoint = "none"  # not part of this measurement
    cap, thr_model = load_models(args, device, dtype)
    if args.cross_frame:
        return _run_cross_frame(cap, args)
    if cap.layout == "official":
        return _run_official(cap, args)
    settings = BenchSettings(regions=parse_int_list(args.regions, "--regions"),
                             modes=tuple(m.strip() for m in (args.modes or ",".join(BENCH_MODES)).split(",")
                                         if m.strip()),
                             steps=args.steps, repeats=args.repeats, warmup=args.warmup,
                             max_cell_s=args.max_cell_seconds or None, frame_size=parse_size(args.frame_size),
                             seed=args.seed, flops=not args.no_flops)
    bar = tqdm(total=len(settings.regions) * len(settings.modes), file=sys.stderr, desc="bench", unit="cell",
               disable=args.json == "-" or not sys.stderr.isatty())

    def on_row(row: Any) -> None:
        bar.set_postfix_str(f"{row.mode} x{row.regions}: {row.latency_ms:.0f} ms")
        bar.update()

    try:
        report = run_bench(cap, settings, threshold_model=thr_model, on_row=on_row)
    finally:
        bar.close()
    text = format_report(report)
    if args.json:
        emit_json(report.to_dict(), args.json)
    print(text, file=sys.stderr if args.json == "-" else sys.stdout)
    if args.plot:
        plot_report(report, args.plot)
    return 0


def _run_official(cap: Any, args: argparse.Namespace) -> int:
    """The official layout's modes (`pdlm_ros.eval.official_bench`): one table, ratios against `official`."""
    from pdlm_ros.eval.official_bench import OFFICIAL_BENCH_MODES, run_official_bench

    if args.refresh < 1:
        raise ConfigError(f"--refresh must be >= 1 (got {args.refresh})")
    modes = tuple(m.strip() for m in (args.modes or ",".join(OFFICIAL_BENCH_MODES)).split(",") if m.strip())

    def on_row(r: Any) -> None:
        print(f"{r.mode} x{r.regions}: {r.latency_s:.2f} s, {r.tokens_per_s:.1f} tokens/s", file=sys.stderr)

    report = run_official_bench(cap, regions=parse_int_list(args.regions, "--regions"), modes=modes,
                                refresh=args.refresh, repeats=args.repeats, warmup=args.warmup,
                                frame_size=parse_size(args.frame_size), steps=args.steps,
                                max_cell_seconds=args.max_cell_seconds or 0.0, flops=not args.no_flops,
                                seed=args.seed, progress=on_row)
    text = f"model {report.model} ({report.dtype}); {report.machine['device']} ({report.machine['cpu']}); " \
           f"{report.frame_size[0]}x{report.frame_size[1]} frames; refresh {report.refresh}; {report.created}\n" \
           + report.table()
    if args.json:
        emit_json(report.to_dict(), args.json)
    print(text, file=sys.stderr if args.json == "-" else sys.stdout)
    return 0


def _run_cross_frame(cap: Any, args: argparse.Namespace) -> int:
    """`--cross-frame`: several frames' regions in one pass against one frame at a time (`run_cross_frame_bench`)."""
    from pdlm_ros.eval.bench import run_cross_frame_bench

    if cap.layout == "official":
        raise ConfigError("--cross-frame needs a native checkpoint or preset: official-layout checkpoints caption "
                          "one frame at a time (their rule makes the regions of a pass meet)")
    if args.cross_frame_regions < 1:
        raise ConfigError(f"--cross-frame-regions must be >= 1 (got {args.cross_frame_regions})")

    def on_row(r: Any) -> None:
        print(f"{r.frames} frames x {r.regions}: {r.batched_tokens_per_s:.1f} vs {r.one_by_one_tokens_per_s:.1f} "
              f"tokens/s ({r.ratio:.2f}x)", file=sys.stderr)

    report = run_cross_frame_bench(cap, parse_int_list(args.cross_frame, "--cross-frame"), args.cross_frame_regions,
                                   steps=args.steps, repeats=args.repeats, frame_size=parse_size(args.frame_size),
                                   seed=args.seed, max_cell_s=args.max_cell_seconds or None, on_row=on_row)
    m, mach = report.model, report.machine
    device = mach.get("gpu") or f"{mach['cpu']}, {mach['torch_threads']} threads"
    text = (f"model {m['name']} ({m['parameters'] / 1e6:.1f} M parameters, {m['dtype']}, attention "
            f"{m['attn_impl']}, max_regions {m['max_regions']})\n"
            f"device {mach['device']} ({device}); torch {report.torch_version}; commit {report.git_commit}; "
            f"{report.date_utc}\n{report.frame_size[0]}x{report.frame_size[1]} frames, {report.steps} steps; "
            "ratio = batched / one-by-one tokens per second\n" + report.table())
    if args.json:
        emit_json(report.to_dict(), args.json)
    print(text, file=sys.stderr if args.json == "-" else sys.stdout)
    return 0
