"""Region attention as one Triton kernel: each region's queries read the shared prefix K/V and their own block only.

Dims: N regions, H heads, S tokens per region block, P prefix tokens, D head dim.

One program handles BLOCK_M queries of one (region, head): it streams the prefix keys of that head, then the keys
of its own block, with an online softmax (FlashAttention-2 style), so nothing of size (S, P + S) is ever written to
memory and no mask tensor exists: the mask rule is which keys a program visits. Why hand-written: FlexAttention
expresses the same mask but needs `torch.compile` and a packed (N*S, P + N*S) problem; SDPA needs the prefix copied
per region; neither can be baked into a TensorRT engine. This kernel serves three callers with one source:
- PyTorch on CUDA (`register()` adds it to `pdlm_ros.model.attention` as "triton");
- the TensorRT plugin (`compile_aot` gives PTX for `tensorrt.plugin.aot_impl`);
- tests on the CPU through Triton's interpreter (TRITON_INTERPRET=1 set before triton is imported).

Several frames in one pass (`region_attention_multi_triton`, PyTorch only): the frames' prefixes stacked along P,
an int64 frame index per region and the F+1 prefix offsets; each program reads its own frame's slice of its head,
so the mask rule stays "which keys a program visits" and nothing is copied per region.

Layout contract (shared with the plugin): q, k, v, out contiguous (N, H, S, D); prefix_k, prefix_v contiguous
(H, P, D); one float dtype; fp32 accumulation. Kernel arguments are ordered inputs, int32 sizes, output, which is the
order TensorRT's AOT plugin launcher uses. FMA fusion is asked for explicitly in both compile paths (Triton 3.10
changes its default), so the PyTorch and TensorRT kernels stay the same code.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # optional: CPU installs use the PyTorch implementations
    triton = None

__all__ = ["available", "region_attention_triton", "region_attention_multi_triton", "register", "KernelConfig",
           "kernel_config", "AotKernel", "compile_aot", "TRITON_DTYPES", "KERNEL_ARGS"]

log = logging.getLogger(__name__)

# torch / ONNX-style dtype names -> Triton pointer element types
TRITON_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
# Run-time kernel arguments in launch order: inputs, int32 sizes, output (TensorRT's AOT order).
KERNEL_ARGS = ("Q", "K", "V", "PK", "PV", "N", "H", "S", "P", "O")


def available() -> bool:
    """True when Triton can be imported (it may still lack a GPU; see `register`)."""
    return triton is not None


if triton is not None:

    @triton.jit
    def _attend(q, kp, vp, base, length, m_i, l_i, acc, qk_scale, offs_n, offs_d, d_ok,
                HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
        """Online-softmax accumulation of the queries q over `length` keys/values at kp/vp + base."""
        for start in range(0, length, BLOCK_N):
            n_idx = start + offs_n
            n_ok = n_idx < length
            kt = tl.load(kp + base + n_idx[None, :] * HEAD_DIM + offs_d[:, None],
                         mask=n_ok[None, :] & d_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
            if IEEE:
                s = tl.dot(q, kt, input_precision="ieee")
            else:
                s = tl.dot(q, kt)
            s = tl.where(n_ok[None, :], s * qk_scale, float("-inf"))  # (BLOCK_M, BLOCK_N)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            vt = tl.load(vp + base + n_idx[:, None] * HEAD_DIM + offs_d[None, :],
                         mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
            m_i = m_new
        return m_i, l_i, acc

    @triton.jit
    def _region_block(Q, K, V, PK, PV, O, pid_m, pid_nh, S, pre, P,
                      SCALE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
        """BLOCK_M queries of one (region, head) over the P prefix keys at PK/PV + pre, then over its own block."""
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM  # BLOCK_D is D rounded up to a power of two
        m_ok = offs_m < S
        blk = pid_nh.to(tl.int64) * S * HEAD_DIM  # start of this (region, head) in q/k/v/out
        q = tl.load(Q + blk + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :],
                    other=0.0)  # (BLOCK_M, BLOCK_D)
        qk_scale = SCALE * 1.4426950408889634  # exp2 instead of exp: fold log2(e) into the scale
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        # Two key ranges, one loop body: the prefix, then this region's own block.
        m_i, l_i, acc = _attend(q, PK, PV, pre, P, m_i, l_i, acc, qk_scale, offs_n, offs_d, d_ok,
                                HEAD_DIM, BLOCK_N, IEEE)
        m_i, l_i, acc = _attend(q, K, V, blk, S, m_i, l_i, acc, qk_scale, offs_n, offs_d, d_ok,
                                HEAD_DIM, BLOCK_N, IEEE)
        out = acc / l_i[:, None]
        tl.store(O + blk + offs_m[:, None] * HEAD_DIM + offs_d[None, :], out.to(O.dtype.element_ty),
                 mask=m_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _region_attention_kernel(Q, K, V, PK, PV, N, H, S, P, O,
                                 SCALE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
        pid_m = tl.program_id(0)
        # Head-major order (h * N + n): the N programs that read one head's prefix K/V run back to back, so the
        # prefix is fetched from memory about once per head and then served from L2.
        pid_hn = tl.program_id(1)
        h = pid_hn // N
        pid_nh = (pid_hn % N) * H + h  # n * H + h: this (region, head) in the (N, H, S, D) layout
        pre = h.to(tl.int64) * P * HEAD_DIM  # start of this head in prefix_k/prefix_v
        _region_block(Q, K, V, PK, PV, O, pid_m, pid_nh, S, pre, P, SCALE, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, IEEE)

    @triton.jit
    def _region_attention_multi_kernel(Q, K, V, PK, PV, PI, PO, N, H, S, P, O,
                                       SCALE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
        """Several frames' prefixes stacked along P (P = their total): region n reads keys PO[PI[n]]..PO[PI[n]+1]-1
        of its head, the same loop over fewer keys."""
        pid_m = tl.program_id(0)
        pid_hn = tl.program_id(1)
        h = pid_hn // N
        n = pid_hn % N
        pid_nh = n * H + h
        frame = tl.load(PI + n)
        start = tl.load(PO + frame)
        length = (tl.load(PO + frame + 1) - start).to(tl.int32)
        pre = (h.to(tl.int64) * P + start.to(tl.int64)) * HEAD_DIM
        _region_block(Q, K, V, PK, PV, O, pid_m, pid_nh, S, pre, length, SCALE, HEAD_DIM, BLOCK_M, BLOCK_N,
                      BLOCK_D, IEEE)


@dataclass(frozen=True)
class KernelConfig:
    block_m: int  # queries per program
    block_n: int  # keys per loop iteration
    block_d: int  # head dim rounded up to a power of two (>= 16, the smallest tl.dot tile)
    num_warps: int


def _pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def kernel_config(block: int | None, head_dim: int, elem_bytes: int = 2) -> KernelConfig:
    """Tile sizes. `block` (S) known: the query tile just covers it (up to 64); unknown (AOT): 64.

    K/V tiles are pipelined through shared memory; 4-byte elements with a large head get half-size tiles so the
    kernel stays under the ~160 KiB per block of sm_80/sm_87 (measured: fp32, D=128, 64x64 tiles asks 176 KiB).
    """
    cap = 32 if elem_bytes * max(16, _pow2(head_dim)) > 256 else 64
    block_m = cap if block is None else min(cap, max(16, _pow2(block)))
    block_d = max(16, _pow2(head_dim))
    return KernelConfig(block_m, cap, block_d, num_warps=4 if block_d <= 64 else 8)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share one (N, H, S, D) shape; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    n, h, s, d = q.shape
    if pk.dim() != 3 or pk.shape != pv.shape or pk.shape[0] != h or pk.shape[2] != d:
        raise ValueError(f"prefix_k/prefix_v must be (H={h}, P, D={d}); got {tuple(pk.shape)}, {tuple(pv.shape)}")
    dtypes = {t.dtype for t in (q, k, v, pk, pv)}
    if len(dtypes) != 1 or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"all inputs need one dtype of float32/float16/bfloat16; got {sorted(map(str, dtypes))}")


def region_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
                            prefix_v: torch.Tensor, scale: float | None = None,
                            out: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as `pdlm_ros.model.attention.region_attention`; runs on CUDA (or the interpreter on CPU).

    `out` (contiguous, like q) is written in place when given: checks poison it to prove every element is written.
    """
    if triton is None:
        raise RuntimeError("Triton is not installed; use the 'shared_prefix' attention implementation")
    _check(q, k, v, prefix_k, prefix_v)
    n, h, s, d = q.shape
    p = prefix_k.shape[1]
    q, k, v, prefix_k, prefix_v = (t.contiguous() for t in (q, k, v, prefix_k, prefix_v))
    out = _out_buffer(q, out)
    if out.numel() == 0:
        return out
    cfg = kernel_config(s, d, q.element_size())
    grid = (triton.cdiv(s, cfg.block_m), n * h)
    _region_attention_kernel[grid](q, k, v, prefix_k, prefix_v, n, h, s, p, out,
                                   SCALE=float(d ** -0.5 if scale is None else scale), HEAD_DIM=d,
                                   BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
                                   IEEE=q.dtype == torch.float32, num_warps=cfg.num_warps, enable_fp_fusion=True)
    return out


def _out_buffer(q: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """The output tensor: `out` when given (checked: q's shape and dtype, contiguous), else a new one like q."""
    if out is None:
        return torch.empty_like(q)
    if out.shape != q.shape or out.dtype != q.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {q.dtype} tensor of shape {tuple(q.shape)}")
    return out


def region_attention_multi_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
                                  prefix_v: torch.Tensor, prefix_index: torch.Tensor, prefix_offsets: torch.Tensor,
                                  scale: float | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """`region_attention` with several frames' prefixes stacked along P: prefix_index (N,) the frame of each
    region, prefix_offsets (F+1,) where each frame's prefix starts (the last: P). The values are trusted (the decoder
    checks them once per pass); they must lie on q's device."""
    if triton is None:
        raise RuntimeError("Triton is not installed; use the 'shared_prefix' attention implementation")
    _check(q, k, v, prefix_k, prefix_v)
    n, h, s, d = q.shape
    if prefix_index.shape != (n,) or prefix_offsets.dim() != 1:
        raise ValueError(f"prefix_index must be ({n},) and prefix_offsets (frames + 1,); got "
                         f"{tuple(prefix_index.shape)}, {tuple(prefix_offsets.shape)}")
    q, k, v, prefix_k, prefix_v = (t.contiguous() for t in (q, k, v, prefix_k, prefix_v))
    index = prefix_index.to(device=q.device, dtype=torch.int64).contiguous()
    offsets = prefix_offsets.to(device=q.device, dtype=torch.int64).contiguous()
    out = _out_buffer(q, out)
    if out.numel() == 0:
        return out
    cfg = kernel_config(s, d, q.element_size())
    grid = (triton.cdiv(s, cfg.block_m), n * h)
    _region_attention_multi_kernel[grid](q, k, v, prefix_k, prefix_v, index, offsets, n, h, s, prefix_k.shape[1],
                                         out, SCALE=float(d ** -0.5 if scale is None else scale), HEAD_DIM=d,
                                         BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
                                         IEEE=q.dtype == torch.float32, num_warps=cfg.num_warps,
                                         enable_fp_fusion=True)
    return out


def register() -> bool:
    """Register the kernel as attention implementation "triton" if Triton and a CUDA device can run it.

    A small launch is checked against the PyTorch implementation first, so a GPU or Triton build that cannot compile
    the kernel leaves the default in place (False) instead of failing in the middle of a frame.
    """
    if triton is None or not torch.cuda.is_available():
        return False
    from pdlm_ros.model.attention import ATTENTION_IMPLS, register_attention

    if "triton" in ATTENTION_IMPLS:
        return True
    try:
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(2, 2, 9, 32, device="cuda", generator=g) for _ in range(3))
        pk, pv = (torch.randn(2, 5, 32, device="cuda", generator=g) for _ in range(2))
        got = region_attention_triton(q, k, v, pk, pv)
        want = ATTENTION_IMPLS["shared_prefix"](q, k, v, pk, pv)
        err = (got - want).abs().max().item()
        # the several-frame form: region 0 reads prefix keys 0..1, region 1 keys 2..4
        index, offsets = torch.tensor([0, 1], device="cuda"), torch.tensor([0, 2, 5], device="cuda")
        got = region_attention_multi_triton(q, k, v, pk, pv, index, offsets)
        want = torch.cat([ATTENTION_IMPLS["shared_prefix"](q[:1], k[:1], v[:1], pk[:, :2], pv[:, :2]),
                          ATTENTION_IMPLS["shared_prefix"](q[1:], k[1:], v[1:], pk[:, 2:], pv[:, 2:])])
        err = max(err, (got - want).abs().max().item())
    except Exception as e:  # noqa: BLE001 - any compile/launch failure means "not usable here"
        log.warning("Triton region attention unavailable on this GPU (%s: %s); using the PyTorch implementation",
                    type(e).__name__, e)
        return False
    if not err < 1e-3:
        log.warning("Triton region attention disagrees with the reference (max error %.3g); not registered", err)
        return False
    register_attention("triton", region_attention_triton, multi=region_attention_multi_triton)
    return True


@dataclass(frozen=True)
class AotKernel:
    """A compiled kernel as TensorRT's AOT plugin wants it."""

    name: str  # entry point in the PTX
    ptx: str
    num_warps: int
    shared_mem: int  # bytes of dynamic shared memory
    config: KernelConfig
    # Parameters Triton appends after ours (>= 3.3: global and profile scratch pointers, unused by this kernel but
    # part of the entry's ABI; the launcher must pass them, as null).
    trailing_params: int


def compile_aot(dtype: str, head_dim: int, scale: float, capability: tuple[int, int]) -> AotKernel:
    """Compile the kernel to PTX for one dtype/head dim/scale and GPU (no GPU needed: Triton ships ptxas).

    Sizes N, H, S, P stay run-time int32 arguments; the tile sizes are fixed for an unknown S (kernel_config(None, D)).
    """
    if triton is None:
        raise RuntimeError("Triton is not installed; it is needed to compile the TensorRT plugin kernel")
    if dtype not in TRITON_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(TRITON_DTYPES)}; got {dtype!r}")
    from triton.backends.compiler import GPUTarget

    cfg = kernel_config(None, head_dim, 4 if dtype == "float32" else 2)
    ptr = "*" + TRITON_DTYPES[dtype]
    signature = {name: ("i32" if name in ("N", "H", "S", "P") else ptr) for name in KERNEL_ARGS}
    constexprs = {"SCALE": float(scale), "HEAD_DIM": head_dim, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
                  "BLOCK_D": cfg.block_d, "IEEE": dtype == "float32"}
    signature.update({name: "constexpr" for name in constexprs})
    src = triton.compiler.ASTSource(fn=_region_attention_kernel, signature=signature, constexprs=constexprs)
    major, minor = capability
    compiled = triton.compile(src, target=GPUTarget("cuda", major * 10 + minor, 32),
                              options={"num_warps": cfg.num_warps, "enable_fp_fusion": True})
    ptx = compiled.asm["ptx"]
    return AotKernel(compiled.metadata.name, ptx, compiled.metadata.num_warps, compiled.metadata.shared, cfg,
                     _entry_params(ptx, compiled.metadata.name) - len(KERNEL_ARGS))


def _entry_params(ptx: str, name: str) -> int:
    """Number of parameters of the PTX entry point `name`."""
    head = ptx.split(f".entry {name}(", 1)[1].split(")", 1)[0]
    return head.count(".param")
