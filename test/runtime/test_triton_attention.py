"""The Triton region-attention kernel against the dense-mask reference, in Triton's interpreter on the CPU.

TRITON_INTERPRET must be set before triton is first imported, so the kernel runs in a child process: the parent
writes the inputs, the child writes the kernel's outputs, and the parent judges them against
`segment_mask` + `dense_attention` (the same reference the model's own attention tests use).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pdlm_ros.model.attention import ATTENTION_IMPLS, dense_attention, segment_mask
from pdlm_ros.runtime import triton_attention
from test.conftest import assert_close

pytestmark = pytest.mark.skipif(not triton_attention.available(), reason="triton is not installed")

# (N regions, H heads, S block, P prefix, D head dim, dtype): odd lengths, 1 and 16 regions, a head dim that is not
# a power of two (40, the tiny model's), a block longer than one query tile (70 > 64)
CASES = [
    (1, 2, 5, 7, 8, torch.float32),
    (3, 2, 17, 33, 40, torch.float32),
    (16, 2, 9, 1, 8, torch.float32),
    (16, 1, 3, 5, 16, torch.float32),
    (2, 3, 70, 131, 16, torch.float32),
    (4, 2, 48, 68, 40, torch.float16),
]

CHILD = """
import sys, torch
from pdlm_ros.runtime.triton_attention import region_attention_triton
cases = torch.load(sys.argv[1])
outs = [region_attention_triton(*c) for c in cases]
torch.save(outs, sys.argv[2])
"""


def dense_region_reference(q, k, v, pk, pv):
    """Pack prefix + regions into one sequence and apply the structured mask densely (float32)."""
    q, k, v, pk, pv = (t.float() for t in (q, k, v, pk, pv))
    n, h, s, d = q.shape
    p = pk.shape[1]
    seg = torch.cat([torch.zeros(p, dtype=torch.long), torch.arange(1, n + 1).repeat_interleave(s)])
    kk = torch.cat([pk, k.transpose(0, 1).reshape(h, n * s, d)], dim=1)
    vv = torch.cat([pv, v.transpose(0, 1).reshape(h, n * s, d)], dim=1)
    qq = torch.cat([torch.zeros(h, p, d), q.transpose(0, 1).reshape(h, n * s, d)], dim=1)
    out = dense_attention(qq, kk, vv, segment_mask(seg))[:, p:]
    return out.reshape(h, n, s, d).transpose(0, 1)


def make_inputs(case, seed):
    n, h, s, p, d, dtype = case
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(n, h, s, d, generator=g).to(dtype) for _ in range(3))
    pk, pv = (torch.randn(h, p, d, generator=g).to(dtype) for _ in range(2))
    return q, k, v, pk, pv


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("triton")
    inputs = [make_inputs(c, i) for i, c in enumerate(CASES)]
    torch.save(inputs, tmp / "in.pt")
    env = {**os.environ, "TRITON_INTERPRET": "1", "TRITON_DEFAULT_FP_FUSION": "1"}
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp / "in.pt"), str(tmp / "out.pt")], env=env,
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return inputs, torch.load(tmp / "out.pt")


@pytest.mark.parametrize("index", range(len(CASES)),
                         ids=[f"n{c[0]}-h{c[1]}-s{c[2]}-p{c[3]}-d{c[4]}-{str(c[5])[6:]}" for c in CASES])
def test_kernel_matches_the_dense_mask_reference(interpreted, index):
    inputs, outputs = interpreted
    out = outputs[index]
    assert out.shape == inputs[index][0].shape and out.dtype == inputs[index][0].dtype
    assert torch.isfinite(out).all()
    atol = 1e-5 if out.dtype == torch.float32 else 2e-3
    ref = dense_region_reference(*inputs[index])
    assert_close(out, ref, atol=atol, rtol=atol, what=f"triton vs dense mask, case {CASES[index]}")
    # and the model's default implementation agrees on the same inputs
    assert_close(out, ATTENTION_IMPLS["shared_prefix"](*(t.float() for t in inputs[index])), atol=atol, rtol=atol)


def test_regions_do_not_see_each_other(interpreted):
    """Changing region 0's keys leaves every other region's output unchanged (case with 16 regions)."""
    inputs, outputs = interpreted
    index = next(i for i, c in enumerate(CASES) if c[0] == 16)
    q, k, v, pk, pv = inputs[index]
    ref = dense_region_reference(q, k.clone().index_fill_(0, torch.tensor([0]), 5.0), v, pk, pv)
    assert_close(outputs[index][1:], ref[1:], atol=1e-5, what="other regions")
    assert not torch.allclose(outputs[index][0], ref[0], atol=1e-3)


def test_bad_shapes_are_named_before_any_launch():
    x = torch.zeros(2, 2, 3, 8)
    with pytest.raises(ValueError, match=r"q, k, v must share one \(N, H, S, D\) shape"):
        triton_attention.region_attention_triton(x, x[:1], x, x[0], x[0])
    with pytest.raises(ValueError, match="prefix_k/prefix_v must be"):
        triton_attention.region_attention_triton(x, x, x, torch.zeros(3, 4, 8), torch.zeros(3, 4, 8))
    with pytest.raises(ValueError, match="one dtype"):
        triton_attention.region_attention_triton(x, x, x, x[0].half(), x[0])


def test_register_refuses_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: registration is checked by scripts/gpu_check.py")
    assert triton_attention.register() is False
    assert "triton" not in ATTENTION_IMPLS


def test_tiles_stay_within_shared_memory():
    assert triton_attention.kernel_config(48, 128, 2) == triton_attention.KernelConfig(64, 64, 128, 8)
    assert triton_attention.kernel_config(48, 128, 4).block_n == 32  # float32, large head: half tiles
    assert triton_attention.kernel_config(5, 40, 4) == triton_attention.KernelConfig(16, 64, 64, 4)
    assert triton_attention.kernel_config(None, 40, 2).block_m == 64  # AOT: S unknown


def test_aot_compile_gives_ptx_for_the_plugin():
    """The AOT half of the TensorRT plugin: PTX for Orin (sm_87), float16, the 8b head size. No GPU needed."""
    kernel = triton_attention.compile_aot("float16", 128, 128 ** -0.5, (8, 7))
    assert ".target sm_87" in kernel.ptx
    assert f".entry {kernel.name}(" in kernel.ptx
    assert kernel.num_warps == kernel.config.num_warps and 0 < kernel.shared_mem <= 160 * 1024
    assert kernel.trailing_params >= 0
    with pytest.raises(ValueError, match="dtype must be one of"):
        triton_attention.compile_aot("int8", 128, 0.1, (8, 7))
