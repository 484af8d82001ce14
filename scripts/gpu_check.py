"""GPU check of the deployment path, for one run on a machine with a CUDA GPU (start it with scripts/gpu_check.sh).

Steps, each with its own time budget and its own try/except, results written after every step (a timeout or a
crash still leaves what was measured):
  env       GPU, driver, versions; what is and is not installed (TensorRT is expected absent)
  torch     PyTorch CUDA vs the CPU reference on the tiny model (and the bundled model if present): captions at
            temperature 0 and max |logit diff|, with the Triton attention registered and with shared_prefix
  kernel    Triton region attention vs the dense-mask reference (float64): fp32/fp16/bf16, odd lengths, 1 and 16
            regions, output poisoned with NaN first
  speed     Triton vs dense-mask SDPA, FlexAttention (compiled), shared_prefix and sdpa at the 8b attention shape
            (H 32, D 128, block 48, prefix 1012, N 1/4/8/16, bf16); medians of triton.testing.do_bench
  ort       ONNX Runtime (CUDA provider if present, else CPU) vs PyTorch on the tiny export
  tensorrt  only if TensorRT imports: build-engine + caption parity on the tiny export
  bench     `pdlm-ros bench --preset 8b --device cuda --dtype bfloat16 --regions 1,4,8,16`
Output: gpu_check.json and gpu_check.md under --out.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda"  # "cpu" only for --cpu-dry-run (with TRITON_INTERPRET=1): exercises this script's code paths


class Check:
    def __init__(self, out: Path, budget: float) -> None:
        self.out, self.deadline = out, time.monotonic() + budget
        self.results: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "steps": {}}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def step(self, name: str, fn: Callable[[], Any], need: float) -> None:
        """Run one step if at least `need` seconds are left; record its result, error or skip."""
        if self.left() < need:
            self.results["steps"][name] = {"status": "skipped", "reason": f"{self.left():.0f} s left, needs {need:.0f}"}
        else:
            t0 = time.monotonic()
            print(f"== {name} ({self.left():.0f} s left)", flush=True)
            try:
                self.results["steps"][name] = {"status": "ok", **(fn() or {})}
            except Exception as err:  # noqa: BLE001 - a failing step must not stop the others
                self.results["steps"][name] = {"status": "error", "error": f"{type(err).__name__}: {err}",
                                               "traceback": traceback.format_exc()[-3000:]}
            self.results["steps"][name]["seconds"] = round(time.monotonic() - t0, 1)
        self.write()

    def write(self) -> None:
        (self.out / "gpu_check.json").write_text(json.dumps(self.results, indent=2, default=str) + "\n")
        (self.out / "gpu_check.md").write_text(markdown(self.results))


# -- steps -----------------------------------------------------------------------------------------------------------
def env() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(),
                            "torch": torch.__version__, "cuda": torch.version.cuda,
                            "gpu": torch.cuda.get_device_name(0), "capability": torch.cuda.get_device_capability(0),
                            "sm_count": torch.cuda.get_device_properties(0).multi_processor_count}
    for mod in ("triton", "onnx", "onnxruntime", "tensorrt", "transformers", "tokenizers"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as err:  # noqa: BLE001
            info[mod] = f"absent ({type(err).__name__})"
    try:
        info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"],
                                        capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError) as err:
        info["driver"] = f"nvidia-smi failed: {err}"
    if "onnxruntime" in sys.modules:
        info["onnxruntime_providers"] = sys.modules["onnxruntime"].get_available_providers()
    return info


def _frame() -> tuple[Any, list[Any]]:
    import numpy as np

    from pdlm_ros.types import RegionInput

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
    mask = np.zeros((240, 320), bool)
    mask[100:200, 200:300] = True
    return img, [RegionInput(box=(10, 20, 120, 200)), RegionInput(box=(150, 30, 300, 160)), RegionInput(mask=mask),
                 RegionInput(box=(60, 150, 250, 235))]


def torch_parity() -> dict[str, Any]:
    import torch

    from pdlm_ros.captioner import DEFAULT_CHECKPOINT, Captioner
    from pdlm_ros.model.regions import prepare_regions
    from pdlm_ros.runtime.triton_attention import register

    torch.backends.cudnn.allow_tf32 = False  # parity, not speed: keep the vision convolution in full fp32
    torch.backends.cuda.matmul.allow_tf32 = False
    out: dict[str, Any] = {"triton_registered": register() if DEVICE == "cuda" else False}
    img, regions = _frame()
    prepared, _ = prepare_regions(regions, img.shape[1], img.shape[0])
    models = [("tiny", dict(preset="tiny"))]
    if (DEFAULT_CHECKPOINT / "model.safetensors").is_file():
        models.append(("default", {}))
    for label, kw in models:
        cpu = Captioner.load(device="cpu", **kw)
        ref = cpu.caption(img, regions)
        for impl in (["triton"] if out["triton_registered"] else []) + ["shared_prefix"]:
            gpu = Captioner.load(device=DEVICE, attn_impl=impl, **kw)
            got = gpu.caption(img, regions)
            with torch.inference_mode():
                m_c, m_g = cpu.model, gpu.model
                f_c, f_g = m_c.encode_frame(img), m_g.encode_frame(img)
                r_c = m_c.roi_tokens(f_c, prepared)
                c_c, c_g = m_c.prefix_cache(f_c), m_g.prefix_cache(f_g)
                toks = torch.full((len(prepared), cpu.config.decoding.caption_len), cpu.config.mask_token_id)
                l_c = m_c.region_logits(r_c, toks, c_c)
                l_g = m_g.region_logits(r_c.to(DEVICE), toks.to(DEVICE), c_g, impl)
            out[f"{label}/{impl}"] = {
                "captions_equal": [a.caption == b.caption for a, b in zip(ref.regions, got.regions)],
                "cpu_captions": [r.caption for r in ref.regions], "gpu_captions": [r.caption for r in got.regions],
                "max_abs_logit_diff": float((l_c - l_g.cpu()).abs().max()),
                "max_abs_prefix_diff": float((f_c.prefix - f_g.prefix.cpu()).abs().max()),
                "gpu_ms": got.stats.latency_ms, "cpu_ms": ref.stats.latency_ms}
    return out


def _inputs(n: int, h: int, s: int, p: int, d: int, dtype: Any, seed: int) -> tuple[Any, ...]:
    import torch

    g = torch.Generator(device=DEVICE).manual_seed(seed)
    q, k, v = (torch.randn(n, h, s, d, device=DEVICE, generator=g, dtype=torch.float32).to(dtype) for _ in range(3))
    pk, pv = (torch.randn(h, p, d, device=DEVICE, generator=g, dtype=torch.float32).to(dtype) for _ in range(2))
    return q, k, v, pk, pv


def _packed(q: Any, k: Any, v: Any, pk: Any, pv: Any) -> tuple[Any, ...]:
    """One packed sequence: region queries (H, N*S, D), keys/values [prefix, regions] (H, P + N*S, D), and the
    dense (N*S, P + N*S) boolean mask of the region rows."""
    import torch

    from pdlm_ros.model.attention import segment_mask

    n, h, s, d = q.shape
    p = pk.shape[1]
    seg = torch.cat([torch.zeros(p, dtype=torch.long, device=q.device),
                     torch.arange(1, n + 1, device=q.device).repeat_interleave(s)])
    kk = torch.cat([pk, k.transpose(0, 1).reshape(h, n * s, d)], dim=1)
    vv = torch.cat([pv, v.transpose(0, 1).reshape(h, n * s, d)], dim=1)
    return q.transpose(0, 1).reshape(h, n * s, d), kk, vv, segment_mask(seg)[p:]


def _dense(q: Any, k: Any, v: Any, pk: Any, pv: Any, upcast: Any = None) -> Any:
    """Dense-mask reference: SDPA over the packed sequence with the boolean mask. -> (N, H, S, D)."""
    import torch.nn.functional as F

    if upcast is not None:
        q, k, v, pk, pv = (t.to(upcast) for t in (q, k, v, pk, pv))
    n, h, s, d = q.shape
    qq, kk, vv, mask = _packed(q, k, v, pk, pv)
    return F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask).reshape(h, n, s, d).transpose(0, 1)


def kernel_parity() -> dict[str, Any]:
    import torch

    from pdlm_ros.runtime.triton_attention import region_attention_triton

    cases = [(1, 32, 48, 1012, 128), (16, 32, 48, 1012, 128), (3, 4, 17, 33, 40), (16, 2, 9, 1, 64),
             (2, 3, 70, 131, 16), (5, 8, 1, 7, 128)]
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    if DEVICE == "cpu":  # the interpreter: small shapes only, and its tl.dot mishandles bfloat16 operands
        cases = [c for c in cases if c[1] * c[2] * c[3] < 5000]
        dtypes.pop()
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
    rows, ok = [], True
    for dtype in dtypes:
        for i, (n, h, s, p, d) in enumerate(cases):
            x = _inputs(n, h, s, p, d, dtype, seed=i)
            out = torch.full_like(x[0], float("nan"))  # poisoned: every element must be written
            region_attention_triton(*x, out=out)
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            ref = _dense(*x, upcast=torch.float64)
            rel = float((out.double() - ref).norm() / ref.norm())
            good = bool(torch.isfinite(out).all()) and rel < tol[dtype]
            ok &= good
            rows.append({"dtype": str(dtype)[6:], "n": n, "h": h, "s": s, "p": p, "d": d, "rel_err": rel, "ok": good})
    return {"all_ok": ok, "cases": rows}


def kernel_speed(check: Check) -> dict[str, Any]:
    import torch
    import triton

    from pdlm_ros.model.attention import ATTENTION_IMPLS
    from pdlm_ros.runtime.triton_attention import region_attention_triton

    h, d, s, p, dtype = 32, 128, 48, 1012, torch.bfloat16
    flex = None
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
    except Exception as err:  # noqa: BLE001
        flex_error = f"{type(err).__name__}: {err}"
    rows = []
    for n in (1, 4, 8, 16):
        q, k, v, pk, pv = _inputs(n, h, s, p, d, dtype, seed=n)
        flops = 4.0 * n * s * (p + s) * h * d  # QK^T and PV over the keys each query may see
        bytes_ = 2.0 * (4 * n * h * s * d + 2 * h * p * d)  # q, k, v, out and the prefix K/V, read/written once
        packed = _packed(q, k, v, pk, pv)  # outside the timing: dense and flex get their packing for free
        fns: dict[str, Callable[[], Any]] = {
            "triton": lambda: region_attention_triton(q, k, v, pk, pv),
            "dense_mask_sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(
                packed[0], packed[1], packed[2], attn_mask=packed[3]),
            "shared_prefix": lambda: ATTENTION_IMPLS["shared_prefix"](q, k, v, pk, pv),
            "sdpa_broadcast": lambda: ATTENTION_IMPLS["sdpa"](q, k, v, pk, pv)}
        if flex is not None and check.left() > 90:
            def mask_mod(b: Any, hh: Any, qi: Any, kv: Any) -> Any:
                return (kv < p) | ((kv - p) // s == qi // s)

            bm = create_block_mask(mask_mod, 1, None, n * s, p + n * s, device="cuda")
            qq, kk, vv = (t.unsqueeze(0) for t in packed[:3])
            fns["flex_attention"] = lambda: flex(qq, kk, vv, block_mask=bm)
        row: dict[str, Any] = {"n": n, "flops": flops, "bytes": bytes_}
        for name, fn in fns.items():
            try:
                ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
                row[name] = {"ms": ms, "tflops": flops / ms / 1e9, "gbps": bytes_ / ms / 1e6}
            except Exception as err:  # noqa: BLE001
                row[name] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
        if "flex_attention" in fns and "ms" in row.get("flex_attention", {}):  # same function, checked once
            got = fns["flex_attention"]()[0].reshape(h, n, s, d).transpose(0, 1)
            row["flex_max_abs_diff_vs_triton"] = float((got.float() - fns["triton"]().float()).abs().max())
        rows.append(row)
        print(f"   n={n}: " + ", ".join(f"{k} {v['ms']:.3f} ms" for k, v in row.items()
                                         if isinstance(v, dict) and "ms" in v), flush=True)
    out: dict[str, Any] = {"shape": {"h": h, "d": d, "s": s, "p": p, "dtype": "bfloat16"}, "rows": rows}
    if flex is None:
        out["flex_error"] = flex_error
    return out


def ort_parity() -> dict[str, Any]:
    import onnxruntime as ort

    from pdlm_ros.captioner import Captioner
    from pdlm_ros.model.regions import prepare_regions
    from pdlm_ros.runtime.onnx_export import export_model
    from pdlm_ros.runtime.onnxruntime_backend import OnnxRuntimeBackend, OnnxRuntimeCaptioner, compare_with_torch

    cap = Captioner.load(preset="tiny")
    device = "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"
    img, regions = _frame()
    prepared, _ = prepare_regions(regions, img.shape[1], img.shape[0])
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.monotonic()
        manifest = export_model(cap.model, tmp, tokenizer=cap.tokenizer, variant="both")
        export_s = time.monotonic() - t0
        diffs = compare_with_torch(cap.model, OnnxRuntimeBackend(tmp, device=device), img, prepared)
        ref = cap.caption(img, regions)
        got = OnnxRuntimeCaptioner.load(tmp, device=device).caption(img, regions)
    return {"provider": device, "export_seconds": round(export_s, 1), "max_abs_diff": diffs,
            "captions_equal": [a.caption == b.caption for a, b in zip(ref.regions, got.regions)],
            "graphs": {f"{g.name}[{g.variant}]": {"nodes": g.nodes, "custom": g.custom_nodes, "bytes": g.bytes}
                       for g in manifest.graphs}}


def tensorrt_parity() -> dict[str, Any]:
    if importlib.util.find_spec("tensorrt") is None:
        return {"status_detail": "TensorRT not installed: engine build, plugin and runtime stay unverified"}
    from pdlm_ros.captioner import Captioner
    from pdlm_ros.runtime.onnx_export import export_model
    from pdlm_ros.runtime.tensorrt_runtime import TensorRTCaptioner

    cap = Captioner.load(preset="tiny")
    img, regions = _frame()
    with tempfile.TemporaryDirectory() as tmp:
        export_model(cap.model, tmp, tokenizer=cap.tokenizer, variant="both")
        trt_cap = TensorRTCaptioner.load(tmp, device="cuda")
        got = trt_cap.caption(img, regions)
        ref = cap.caption(img, regions)
        built = trt_cap.backend.built
        again = TensorRTCaptioner.load(tmp, device="cuda").backend.built.actions  # must all be "reused"
    return {"step_variant": built.step_variant, "actions": built.actions, "second_load": again,
            "captions_equal": [a.caption == b.caption for a, b in zip(ref.regions, got.regions)],
            "ms": got.stats.latency_ms}


def bench(check: Check) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pdlm_ros.cli", "bench"]
    timeout = max(30.0, check.left() - 15)
    # 4 region counts x 6 modes must fit what is left after loading the 8b model.
    # The dry run only checks this code path: an 8b model in float32 would not fit a CPU machine's memory.
    preset, dtype = ("8b", "bfloat16") if DEVICE == "cuda" else ("tiny", "float32")
    args = ["--preset", preset, "--device", DEVICE, "--dtype", dtype, "--regions", "1,4,8,16",
            "--json", str(check.out / "bench.json"), "--plot", str(check.out / "bench.png"),
            "--max-cell-seconds", f"{max(2.0, (timeout - 120) / 24 / 1.5):.0f}"]
    try:
        proc = subprocess.run(cmd + args, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as err:
        rc = "timeout"
        stdout = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        stderr = err.stderr.decode() if isinstance(err.stderr, bytes) else (err.stderr or "")
    (check.out / "bench.txt").write_text(f"$ pdlm-ros bench {' '.join(args)}\nrc={rc}\n\n{stdout}\n--- stderr ---\n"
                                         f"{stderr}")
    out = {"args": args, "rc": rc, "timeout_s": round(timeout), "stdout_tail": stdout[-2000:],
           "stderr_tail": stderr[-1500:]}
    if rc != 0:
        out.update(status="error", error=f"pdlm-ros bench exited {rc}: {stderr.strip()[-300:]}")
    return out


# -- report ---------------------------------------------------------------------------------------------------------
def markdown(results: dict[str, Any]) -> str:
    steps = results["steps"]
    lines = ["# GPU check", "", f"started {results['started']}", "", "| step | status | seconds | note |",
             "|---|---|---|---|"]
    for name, r in steps.items():
        note = r.get("error") or r.get("reason") or r.get("status_detail") or ""
        lines.append(f"| {name} | {r['status']} | {r.get('seconds', '')} | {str(note)[:160]} |")
    e = steps.get("env", {})
    if e.get("status") == "ok":
        lines += ["", f"GPU {e.get('gpu')} (sm {e.get('capability')}), driver {e.get('driver')}, torch {e.get('torch')}, "
                      f"triton {e.get('triton')}, onnxruntime {e.get('onnxruntime')}, tensorrt {e.get('tensorrt')}"]
    t = steps.get("torch", {})
    for key, r in t.items():
        if isinstance(r, dict) and "captions_equal" in r:
            lines.append(f"- torch CUDA vs CPU, {key}: captions equal {r['captions_equal']}, max |logit diff| "
                         f"{r['max_abs_logit_diff']:.2e}")
    k = steps.get("kernel", {})
    if k.get("cases"):
        lines += ["", "| dtype | N | H | S | P | D | rel. error | ok |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {c['dtype']} | {c['n']} | {c['h']} | {c['s']} | {c['p']} | {c['d']} | {c['rel_err']:.2e} | "
                  f"{c['ok']} |" for c in k["cases"]]
    sp = steps.get("speed", {})
    if sp.get("rows"):
        names = ["triton", "dense_mask_sdpa", "flex_attention", "shared_prefix", "sdpa_broadcast"]
        lines += ["", f"Attention at {sp['shape']} (median ms; triton TFLOP/s and GB/s)", "",
                  "| N | " + " | ".join(names) + " | triton TFLOP/s | triton GB/s |", "|---" * (len(names) + 3) + "|"]
        for row in sp["rows"]:
            cells = [f"{row[n]['ms']:.3f}" if isinstance(row.get(n), dict) and "ms" in row[n] else "-" for n in names]
            tr = row.get("triton", {})
            lines.append(f"| {row['n']} | " + " | ".join(cells) +
                         f" | {tr.get('tflops', math.nan):.1f} | {tr.get('gbps', math.nan):.0f} |")
    o = steps.get("ort", {})
    if o.get("max_abs_diff"):
        lines.append(f"- ONNX Runtime ({o['provider']}) vs PyTorch: " +
                     ", ".join(f"{a} {b:.1e}" for a, b in o["max_abs_diff"].items()) +
                     f"; captions equal {o['captions_equal']}")
    b = steps.get("bench", {})
    if b.get("stdout_tail"):
        lines += ["", "pdlm-ros bench (tail):", "", "```", b["stdout_tail"][-1500:], "```"]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "out/gpu_check"))
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for all steps together")
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="run the CPU-capable steps on the CPU (set TRITON_INTERPRET=1): checks this script, not a GPU")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    check = Check(out, args.budget)
    if args.cpu_dry_run:
        global DEVICE
        DEVICE = "cpu"
        check.results["dry_run"] = "CPU dry run: no GPU numbers"
        check.step("kernel", kernel_parity, need=5)
        check.step("torch", torch_parity, need=5)
        check.step("ort", ort_parity, need=5)
        check.step("tensorrt", tensorrt_parity, need=5)
        check.step("bench", lambda: bench(check), need=5)
        print((out / "gpu_check.md").read_text())
        return 1 if any(r["status"] == "error" for r in check.results["steps"].values()) else 0
    try:
        import torch

        if not torch.cuda.is_available():
            check.results["fatal"] = "torch sees no CUDA device"
            check.write()
            return 1
    except ImportError:
        check.results["fatal"] = "torch is not installed"
        check.write()
        return 1
    check.step("env", env, need=5)
    check.step("torch", torch_parity, need=40)
    check.step("kernel", kernel_parity, need=40)
    check.step("speed", lambda: kernel_speed(check), need=40)
    check.step("ort", ort_parity, need=40)
    check.step("tensorrt", tensorrt_parity, need=60)
    check.step("bench", lambda: bench(check), need=45)
    print((out / "gpu_check.md").read_text())
    bad = [n for n, r in check.results["steps"].items() if r["status"] == "error"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
