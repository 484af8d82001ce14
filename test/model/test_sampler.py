import pytest
import torch

from pdlm_ros.model.sampler import diffusion_decode, num_transfer_schedule

MASK, V = 0, 11


def random_logits_fn(seed=0, peak=0.0, log=None):
    """A stand-in denoiser: logits depend on the span index and the current tokens (no model needed)."""
    def fn(tokens, active):
        g = torch.Generator().manual_seed(seed + int(tokens.sum()))
        logits = torch.randn(tokens.shape[0], tokens.shape[1], V, generator=g)
        if peak:
            target = (active.view(-1, 1) + torch.arange(tokens.shape[1]).view(1, -1)) % (V - 1) + 1
            logits.scatter_(2, target.unsqueeze(-1), peak)
        if log is not None:
            log.append((tokens.clone(), active.clone()))
        return logits
    return fn


def test_schedule_is_linear_with_remainder_first():
    assert num_transfer_schedule(32, 32) == [1] * 32
    assert num_transfer_schedule(10, 4) == [3, 3, 2, 2]
    assert sum(num_transfer_schedule(7, 3)) == 7
    with pytest.raises(ValueError, match="steps must be in 1..span_len=8"):
        num_transfer_schedule(8, 9)


def test_default_schedule_commits_one_token_per_span_per_step():
    log = []
    res = diffusion_decode(random_logits_fn(log=log), 5, 12, MASK, steps=12)
    assert res.nfe == 12
    assert res.commits == [[1] * 5] * 12
    assert res.tpf == 5.0
    assert (res.tokens != MASK).all()
    # masked counts fall by exactly one per span each step
    for i, (toks, _) in enumerate(log):
        assert ((toks == MASK).sum(1) == 12 - i).all()


def test_committed_tokens_never_change():
    log = []
    res = diffusion_decode(random_logits_fn(seed=3, log=log), 3, 16, MASK, steps=8, temperature=1.0,
                           generator=torch.Generator().manual_seed(1))
    states = [t for t, _ in log] + [res.tokens]
    for before, after in zip(states, states[1:]):
        kept = before != MASK
        assert torch.equal(before[kept], after[kept])


def test_threshold_mode_uses_fewer_forwards_on_a_confident_model():
    default = diffusion_decode(random_logits_fn(peak=30.0), 4, 32, MASK, steps=32)
    fast = diffusion_decode(random_logits_fn(peak=30.0), 4, 32, MASK, steps=32, threshold=0.9)
    assert fast.nfe < default.nfe
    assert fast.nfe == 1  # every position passes the threshold at once
    assert torch.equal(fast.tokens, default.tokens)  # same argmax, fewer forwards
    assert fast.tokens_committed == default.tokens_committed == 4 * 32


def test_threshold_mode_commits_at_least_one_per_unfinished_span():
    res = diffusion_decode(random_logits_fn(), 3, 6, MASK, steps=6, threshold=1.0)  # nothing reaches p = 1
    assert all(c == [1, 1, 1] for c in res.commits)
    assert res.nfe == 6


def test_finished_spans_leave_the_batch():
    log = []

    def fn(tokens, active):
        log.append(active.tolist())
        logits = torch.zeros(tokens.shape[0], tokens.shape[1], V)
        logits[active == 0, :, 1] = 50.0  # span 0 is certain, span 1 is not
        logits[active == 1, :, 2] = 0.5
        return logits

    res = diffusion_decode(fn, 2, 4, MASK, steps=4, threshold=0.9)
    assert log[0] == [0, 1] and all(a == [1] for a in log[1:])
    assert res.commits[0] == [4, 1]


def test_temperature_zero_is_deterministic_and_seeded_sampling_repeats():
    a = diffusion_decode(random_logits_fn(), 2, 8, MASK, steps=8)
    b = diffusion_decode(random_logits_fn(), 2, 8, MASK, steps=8)
    assert torch.equal(a.tokens, b.tokens)
    s1 = diffusion_decode(random_logits_fn(), 2, 8, MASK, steps=8, temperature=1.0, generator=torch.Generator().manual_seed(5))
    s2 = diffusion_decode(random_logits_fn(), 2, 8, MASK, steps=8, temperature=1.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(s1.tokens, s2.tokens)


def test_mask_token_is_never_committed():
    def fn(tokens, active):
        logits = torch.zeros(tokens.shape[0], tokens.shape[1], V)
        logits[..., MASK] = 100.0  # the model "wants" the mask token
        return logits

    res = diffusion_decode(fn, 2, 5, MASK, steps=5)
    assert (res.tokens != MASK).all()


@pytest.mark.parametrize("kwargs,match", [({"temperature": -1}, "temperature"), ({"threshold": 0.0}, "threshold"),
                                          ({"steps": 0}, "steps")])
def test_bad_arguments_are_named(kwargs, match):
    args = {"steps": 4} | kwargs
    with pytest.raises(ValueError, match=match):
        diffusion_decode(random_logits_fn(), 1, 4, MASK, **args)
