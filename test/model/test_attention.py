import pytest
import torch

from pdlm_ros.model.attention import ATTENTION_IMPLS, dense_attention, prefix_runs, region_attention, segment_mask
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


def multi_frame_reference(q, k, v, prefixes, frame_of):
    """Pack every frame's prefix and every region into one sequence; the mask with frame ids keeps each region to
    its own frame's prefix."""
    n, h, s, d = q.shape
    seg = [torch.zeros(pk.shape[1], dtype=torch.long) for pk, _ in prefixes]
    frames = [torch.full((pk.shape[1],), f) for f, (pk, _) in enumerate(prefixes)]
    seg.append(torch.arange(1, n + 1).repeat_interleave(s))
    frames.append(torch.tensor(frame_of).repeat_interleave(s))
    mask = segment_mask(torch.cat(seg), frame_ids=torch.cat(frames))
    kk = torch.cat([pk for pk, _ in prefixes] + [k.transpose(0, 1).reshape(h, n * s, d)], dim=1)
    vv = torch.cat([pv for _, pv in prefixes] + [v.transpose(0, 1).reshape(h, n * s, d)], dim=1)
    p = sum(pk.shape[1] for pk, _ in prefixes)
    qq = torch.cat([torch.zeros(h, p, d), q.transpose(0, 1).reshape(h, n * s, d)], dim=1)
    out = dense_attention(qq, kk, vv, mask)[:, p:]
    return out.reshape(h, n, s, d).transpose(0, 1)


def stacked(prefixes):
    offsets = [0]
    for pk, _ in prefixes:
        offsets.append(offsets[-1] + pk.shape[1])
    return (torch.cat([pk for pk, _ in prefixes], dim=1), torch.cat([pv for _, pv in prefixes], dim=1),
            torch.tensor(offsets))


@pytest.mark.parametrize("impl", sorted(ATTENTION_IMPLS))
@pytest.mark.parametrize("lengths,frame_of", [((7,), [0, 0, 0]), ((5, 33), [0, 0, 1]), ((9, 1, 20), [2, 0, 1, 1, 2]),
                                              ((4, 6), [1, 0, 1, 0])])
def test_several_prefixes_each_region_reads_its_own(impl, lengths, frame_of):
    g = torch.Generator().manual_seed(len(frame_of) * 10 + sum(lengths))
    n, h, s, d = len(frame_of), 2, 6, 8
    q, k, v = (torch.randn(n, h, s, d, generator=g) for _ in range(3))
    prefixes = [(torch.randn(h, p, d, generator=g), torch.randn(h, p, d, generator=g)) for p in lengths]
    pk, pv, offsets = stacked(prefixes)
    got = region_attention(q, k, v, pk, pv, impl=impl, prefix_index=torch.tensor(frame_of), prefix_offsets=offsets)
    assert_close(got, multi_frame_reference(q, k, v, prefixes, frame_of), atol=1e-5, what=impl)
    runs = prefix_runs(torch.tensor(frame_of), offsets)
    assert sum(b - a for a, b, *_ in runs) == n
    for a, b, *_ in runs:  # each run of one frame's regions: bit for bit what that frame alone computes
        alone = region_attention(q[a:b], k[a:b], v[a:b], *prefixes[frame_of[a]], impl=impl)
        assert torch.equal(got[a:b], alone), f"{impl}: regions {a}..{b - 1} differ from their frame alone"


def test_frame_ids_keep_frames_apart_in_the_mask():
    seg = torch.tensor([0, 0, 0, 1, 2])
    frames = torch.tensor([0, 0, 1, 0, 1])
    m = segment_mask(seg, frame_ids=frames)
    assert m[3].tolist() == [True, True, False, True, False]  # region 1 of frame 0: frame 0's prefix and itself
    assert m[4].tolist() == [False, False, True, False, True]
    assert m[2].tolist() == [False, False, True, False, False]  # frame 1's prefix sees itself only


def test_bad_prefix_index_is_named():
    x = torch.zeros(2, 1, 3, 4)
    pk = torch.zeros(1, 5, 4)
    with pytest.raises(ValueError, match="go together"):
        region_attention(x, x, x, pk, pk, prefix_index=torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="one frame index per region"):
        region_attention(x, x, x, pk, pk, prefix_index=torch.tensor([0]), prefix_offsets=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"names frames \[0, 2\], but there are 2 prefixes"):
        region_attention(x, x, x, pk, pk, prefix_index=torch.tensor([0, 2]), prefix_offsets=torch.tensor([0, 2, 5]))
    with pytest.raises(ValueError, match="must rise from 0"):
        region_attention(x, x, x, pk, pk, prefix_index=torch.tensor([0, 1]), prefix_offsets=torch.tensor([0, 4, 2]))
