"""Cross-frame batching: regions of several frames in one denoising pass, each reading its own frame's prefix only.

The promise is exactness: every caption, every committed token id and every refusal is what decoding that frame
alone gives. Token ids are read where the captioner turns them into text (`_text`), on both paths.
"""

import numpy as np
import pytest
import torch

from pdlm_ros.captioner import Captioner
from pdlm_ros.errors import ConfigError
from pdlm_ros.model.decoder import PrefixCache
from pdlm_ros.model.regions import prepare_regions
from pdlm_ros.types import RegionInput
from test.conftest import assert_close


class RecordingCaptioner(Captioner):
    """The real captioner; it also keeps every caption's token ids in the order it turns them into text."""

    def __init__(self, base: Captioner) -> None:
        super().__init__(base.model, base.tokenizer, name=base.name, attn_impl=base.attn_impl)
        self.ids: list[list[int]] = []

    def _text(self, ids, conf, stops=()):  # noqa: ANN001
        self.ids.append(ids.tolist())
        return super()._text(ids, conf, stops)


def image(h, w, seed):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def mask_region(h, w, y0, y1, x0, x1, **kw):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return RegionInput(mask=m, **kw)


@pytest.fixture(scope="module")
def frames():
    """Different sizes (prefixes of 196 and 68 tokens), region counts 2, 4, 0 and 1, boxes and a mask, and refusals
    (a zero-area box, a box outside the image)."""
    return [
        (image(90, 150, 1), [RegionInput(box=(5, 5, 40, 50), region_id="a"), RegionInput(box=(50, 10, 95, 80))]),
        (image(200, 120, 2), [RegionInput(box=(0, 0, 60, 60)), mask_region(200, 120, 20, 190, 10, 100),
                              RegionInput(box=(1, 1, 1, 1)), RegionInput(box=(30, 40, 50, 70), class_id="7")]),
        (image(64, 64, 3), []),
        (image(300, 500, 4), [RegionInput(box=(900, 900, 950, 990))]),  # refused only: no pass for this frame
        (image(240, 320, 5), [RegionInput(box=(100, 100, 300, 200))]),
    ]


@pytest.fixture(scope="module")
def recorder(tiny_captioner):
    return RecordingCaptioner(tiny_captioner)


def frame_alone(rec, frames, **kw):
    rec.ids = []
    results = [rec.caption(img, regs, **kw) for img, regs in frames]
    return results, rec.ids


def together(rec, frames, **kw):
    rec.ids = []
    results = rec.caption_frames(frames, **kw)
    return results, rec.ids


def assert_same(batched, alone):
    assert len(batched) == len(alone)
    for f, (b, a) in enumerate(zip(batched, alone)):
        assert [r.caption for r in b.regions] == [r.caption for r in a.regions], f"frame {f}"
        assert [r.error for r in b.regions] == [r.error for r in a.regions], f"frame {f}"
        assert [(r.index, r.region_id, r.class_id, r.box) for r in b.regions] == \
            [(r.index, r.region_id, r.class_id, r.box) for r in a.regions], f"frame {f}"
        for rb, ra in zip(b.regions, a.regions):
            assert abs(rb.confidence - ra.confidence) < 1e-5, f"frame {f} region {rb.index}"


@pytest.mark.parametrize("kw", [{}, {"mode": "threshold", "threshold": 0.05}, {"steps": 4, "budget": 2}],
                         ids=["parallel", "threshold", "4-steps-budget-2"])
def test_captions_and_token_ids_are_those_of_each_frame_alone(recorder, frames, kw):
    alone, ids_alone = frame_alone(recorder, frames, **kw)
    batched, ids_batched = together(recorder, frames, **kw)
    assert_same(batched, alone)
    assert ids_batched == ids_alone  # every committed token of every region, in frame and region order
    assert len(ids_alone) == 2 + (2 if kw.get("budget") else 3) + 0 + 0 + 1  # a budget of 2 refuses one more
    for b, a in zip(batched, alone):  # each frame's own accounting, as alone (each fits in one pass)
        assert (b.stats.nfe, b.stats.tokens) == (a.stats.nfe, a.stats.tokens)
    assert batched[2].stats.nfe == 0 and not batched[2].regions
    assert [r.error != "" for r in batched[3].regions] == [True]


def test_passes_smaller_than_the_frames_split_them_and_stay_exact(recorder, frames):
    """Three regions per pass: frame 1's four regions go into two passes shared with frames 0 and 4."""
    alone, ids_alone = frame_alone(recorder, frames, steps=4)
    batched, ids_batched = together(recorder, frames, steps=4, max_regions=3)
    assert_same(batched, alone)
    assert ids_batched == ids_alone
    assert batched[1].stats.nfe == 2 * 4  # its regions took part in two passes of 4 steps


def test_one_frame_and_no_frame(recorder, frames):
    alone, ids_alone = frame_alone(recorder, frames[:1])
    batched, ids_batched = together(recorder, frames[:1])
    assert_same(batched, alone)
    assert ids_batched == ids_alone
    assert recorder.caption_frames([]) == []


def test_stats_and_timings_per_frame(tiny_captioner, frames):
    results = tiny_captioner.caption_frames(frames, steps=4)
    for res, (_, regs) in zip(results, frames):
        assert set(res.stats.latency_ms) >= {"total"}
        ok = sum(r.ok for r in res.regions)
        if ok:
            assert {"vision", "roi", "prefix", "decode"} <= set(res.stats.latency_ms)
            assert res.stats.tokens == ok * tiny_captioner.config.decoding.caption_len
    assert len({r.stats.latency_ms["total"] for r in results}) == 1  # the call's time, shared out


def test_regions_read_only_their_own_frames_prefix(tiny_captioner):
    """Model level: logits against a stack of two prefixes are those against each frame's own prefix, and changing
    one frame's prefix changes only its regions."""
    model = tiny_captioner.model
    imgs = [image(90, 150, 11), image(240, 320, 12)]  # two prefix lengths (one view and a thumbnail vs more)
    regs = [[RegionInput(box=(5, 5, 60, 70)), RegionInput(box=(70, 10, 140, 80))], [RegionInput(box=(0, 0, 90, 150))]]
    with torch.no_grad():
        enc = [model.encode_frame(im) for im in imgs]
        roi = [model.roi_tokens(e, prepare_regions(r, e.width, e.height)[0]) for e, r in zip(enc, regs)]
        caches = [model.prefix_cache(e) for e in enc]
        assert caches[0].length != caches[1].length
        g = torch.Generator().manual_seed(0)
        cfg = model.cfg
        toks = torch.randint(0, cfg.decoder.vocab_size, (3, cfg.decoding.caption_len), generator=g)
        stacked = PrefixCache.stack(caches)
        # regions in the order frame 1, frame 0, frame 0: the index, not the order, decides
        both = model.region_logits(torch.cat([roi[1], roi[0]]), toks, stacked, prefix_index=torch.tensor([1, 0, 0]))
        assert_close(both[1:], model.region_logits(roi[0], toks[1:], caches[0]), atol=1e-5, what="frame 0")
        assert_close(both[:1], model.region_logits(roi[1], toks[:1], caches[1]), atol=1e-5, what="frame 1")
        other = PrefixCache([k * 0.5 for k in caches[1].keys], caches[1].values)
        moved = model.region_logits(torch.cat([roi[1], roi[0]]), toks, PrefixCache.stack([caches[0], other]),
                                    prefix_index=torch.tensor([1, 0, 0]))
    assert torch.equal(moved[1:], both[1:])
    assert (moved[:1] - both[:1]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="needs prefix_index"):
        model.region_logits(roi[0], toks[1:], stacked)
    with pytest.raises(ValueError, match="must name one of the 2 stacked frames"):
        model.region_logits(roi[0], toks[1:], stacked, prefix_index=torch.tensor([0, 2]))


def test_other_modes_run_frame_by_frame_with_the_same_result(recorder, frames):
    few = [frames[0], frames[2]]
    alone, ids_alone = frame_alone(recorder, few, mode="sequential", steps=2)
    batched, ids_batched = together(recorder, few, mode="sequential", steps=2)
    assert_same(batched, alone)
    assert ids_batched == ids_alone


def test_official_layout_runs_frame_by_frame():
    cap = Captioner.load(preset="tiny-official", seed=0)
    frames = [(image(80, 120, 21), [RegionInput(box=(5, 5, 60, 70)), RegionInput(box=(60, 10, 110, 70))]),
              (image(100, 100, 22), [RegionInput(box=(10, 10, 90, 90))])]
    alone = [cap.caption(img, regs, steps=4) for img, regs in frames]
    assert_same(cap.caption_frames(frames, steps=4), alone)


def test_bad_arguments_are_named(tiny_captioner, frames):
    with pytest.raises(ConfigError, match=r"steps must be in 1\.\.\d+ \(got 0\)"):
        tiny_captioner.caption_frames(frames, steps=0)
    with pytest.raises(ConfigError, match=r"max_regions must be >= 1 \(got 0\)"):
        tiny_captioner.caption_frames(frames, max_regions=0)
    with pytest.raises(ConfigError, match="threshold is only used in threshold mode"):
        tiny_captioner.caption_frames(frames, threshold=0.5)
    with pytest.raises(ConfigError, match="sampler and refresh apply to official-layout checkpoints only"):
        tiny_captioner.caption_frames(frames, sampler="span")


def test_a_stop_ends_the_shared_passes_between_two_forwards(tiny_captioner, frames, monkeypatch):
    """`cancel` set during the first shared forward: the call raises Cancelled before the next forward; an Event
    that is never set changes nothing."""
    import threading

    from pdlm_ros.errors import Cancelled

    assert_same(tiny_captioner.caption_frames(frames, cancel=threading.Event()), tiny_captioner.caption_frames(frames))
    stop, calls = threading.Event(), []
    original = tiny_captioner.model.region_logits

    def forward(*args, **kwargs):
        calls.append(1)
        stop.set()
        return original(*args, **kwargs)

    monkeypatch.setattr(tiny_captioner.model, "region_logits", forward)
    with pytest.raises(Cancelled):
        tiny_captioner.caption_frames(frames, cancel=stop)
    assert len(calls) == 1
