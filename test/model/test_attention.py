import pytest
import torch

from pdlm_ros.model.attention import ATTENTION_IMPLS, dense_attention, region_attention, segment_mask
from test.conftest import assert_close


def dense_region_reference(q, k, v, pk, pv):
    """Pack prefix + regions into one sequence and apply the structured mask densely."""
    n, h, s, d = q.shape
    p = pk.shape[1]
    seg = torch.cat([torch.zeros(p, dtype=torch.long), torch.arange(1, n + 1).repeat_interleave(s)])
    mask = segment_mask(seg)
    kk = torch.cat([pk, k.transpose(0, 1).reshape(h, n * s, d)], dim=1)
    vv = torch.cat([pv, v.transpose(0, 1).reshape(h, n * s, d)], dim=1)
    qq = torch.cat([torch.zeros(h, p, d), q.transpose(0, 1).reshape(h, n * s, d)], dim=1)
    out = dense_attention(qq, kk, vv, mask)[:, p:]
    return out.reshape(h, n, s, d).transpose(0, 1)


@pytest.mark.parametrize("impl", sorted(ATTENTION_IMPLS))
@pytest.mark.parametrize("n,s,p", [(1, 5, 7), (3, 17, 33), (16, 9, 1), (4, 48, 131)])
def test_region_attention_matches_dense_mask(impl, n, s, p):
    g = torch.Generator().manual_seed(n * 100 + s + p)
    h, d = 3, 8
    q, k, v = (torch.randn(n, h, s, d, generator=g) for _ in range(3))
    pk, pv = torch.randn(h, p, d, generator=g), torch.randn(h, p, d, generator=g)
    assert_close(region_attention(q, k, v, pk, pv, impl=impl), dense_region_reference(q, k, v, pk, pv),
                 atol=1e-5, what=impl)


def test_segment_mask_rules():
    seg = torch.tensor([0, 0, 1, 1, 2])
    m = segment_mask(seg)
    assert m[0].tolist() == [True, True, False, False, False]  # prefix sees prefix only
    assert m[2].tolist() == [True, True, True, True, False]  # region 1 sees prefix + itself
    assert m[4].tolist() == [True, True, False, False, True]
    assert segment_mask(seg, structured=False).all()


def test_unknown_impl_is_named():
    x = torch.zeros(1, 1, 1, 2)
    with pytest.raises(ValueError, match="unknown attention implementation 'nope'"):
        region_attention(x, x, x, x[0], x[0], impl="nope")
