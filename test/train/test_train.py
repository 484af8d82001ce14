"""Training on a tiny model: the masked-diffusion loss's accounting, that a few steps lower it, exact resume, and
the errors of `pdlm-ros train` for damaged/missing checkpoints and bad numbers. No timing is asserted anywhere.

Runs are a few steps of one scene each with one thread; a whole run of the tiny preset takes about a second.
"""

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import pdlm_ros.train as train_mod
from pdlm_ros.cli import main
from pdlm_ros.data.scenes import generate_scene
from pdlm_ros.errors import CheckpointError, ConfigError
from pdlm_ros.model.checkpoint import load_pretrained
from pdlm_ros.model.config import preset
from pdlm_ros.model.pdlm import PerceptionDLM
from pdlm_ros.model.tokenizer import build_tiny_tokenizer
from pdlm_ros.train import EPS, TrainConfig, caption_targets, masked_diffusion_loss, scene_regions, train

TINY = ["--scenes-per-step", "1", "--eval-every", "0", "--threads", "1"]


def _cli_train(out, *extra):
    return main(["train", "--out", str(out), *TINY, *extra])


def _error_line(capsys):
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, f"expected one 'error: ...' line in stderr, got:\n{err}"
    assert "Traceback" not in err, err
    return lines[0]


def _fresh_model(seed=0):
    tok = build_tiny_tokenizer()
    cfg = preset("tiny")
    torch.manual_seed(seed)
    return PerceptionDLM(cfg, tok.encode(cfg.prompt, add_special_tokens=False).ids), tok


def _scene_batch(model, tok, seed):
    scene = generate_scene(seed)
    regions = scene_regions(scene, random.Random(seed), 0.5)
    targets = caption_targets([o.caption for o in scene.objects], tok, model.cfg.decoding.caption_len,
                              model.cfg.eos_token_id)
    return scene, regions, targets


# -- the loss --------------------------------------------------------------------------------------------------------
def test_loss_masks_only_response_tokens_and_weights_them_by_one_over_p():
    """The decoder sees the targets (tiled per noise draw) with mask tokens exactly where the noise drew them; the
    gradient of the loss w.r.t. the logits is zero at unmasked positions and (softmax - onehot) / (p * L * K * N)
    at masked ones, i.e. CE on masked tokens only, weighted 1/p, averaged over span and spans."""
    model, tok = _fresh_model()
    scene, regions, targets = _scene_batch(model, tok, seed=3)
    draws = 2
    seen = {}
    real = model.region_logits

    def observe(roi, noisy, cache):  # calls straight through; keeps what the decoder saw and produced
        logits = real(roi, noisy, cache)
        logits.retain_grad()
        seen["noisy"], seen["logits"] = noisy.clone(), logits
        return logits

    model.region_logits = observe
    loss = masked_diffusion_loss(model, scene.image, regions, targets, draws, torch.Generator().manual_seed(7))
    loss.backward()

    x0 = targets.repeat(draws, 1)
    kn, span = x0.shape
    mask_id = model.cfg.mask_token_id
    assert not (targets == mask_id).any(), "targets must never contain the mask token"
    g = torch.Generator().manual_seed(7)  # the documented draws: t ~ U(0,1) per span, then one uniform per token
    p = (1 - EPS) * torch.rand(kn, 1, generator=g) + EPS
    masked = torch.rand(x0.shape, generator=g) < p
    assert masked.any() and (~masked).any()
    noisy = seen["noisy"]
    assert noisy.shape == x0.shape
    assert torch.equal(noisy == mask_id, masked), "mask tokens must sit exactly at the drawn positions"
    assert torch.equal(noisy[~masked], x0[~masked]), "unmasked response tokens must be the targets"

    logits, grad = seen["logits"].detach(), seen["logits"].grad
    assert torch.all(grad[~masked] == 0), "unmasked tokens must not be scored"
    onehot = torch.nn.functional.one_hot(x0, logits.shape[-1]).float()
    expected = (logits.softmax(-1) - onehot) / (p * span * kn).unsqueeze(-1)
    expected = expected * masked.unsqueeze(-1)
    assert torch.allclose(grad, expected, atol=1e-7, rtol=1e-4), (grad - expected).abs().max()

    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x0, reduction="none")
    assert math.isclose(loss.item(), ((ce * masked / p).sum(1) / span).mean().item(), rel_tol=1e-5)


def test_a_few_steps_lower_the_loss(tmp_path):
    """Eight steps from the same initialisation lower the loss on the scenes seen (same noise draws both times)."""
    ckpt = train(TrainConfig(out=str(tmp_path), steps=8, scenes_per_step=1, warmup=1, lr=3e-3, eval_every=0,
                             threads=1), progress=False)
    before, tok = _fresh_model()
    after, _ = load_pretrained(ckpt)

    def mean_loss(model):
        total = 0.0
        with torch.no_grad():
            for seed in range(8):
                scene, regions, targets = _scene_batch(model, tok, seed)
                total += masked_diffusion_loss(model, scene.image, regions, targets, 2,
                                               torch.Generator().manual_seed(seed)).item()
        return total / 8

    lo_before, lo_after = mean_loss(before), mean_loss(after)
    assert math.isfinite(lo_before) and math.isfinite(lo_after)
    assert lo_after < 0.9 * lo_before, (lo_before, lo_after)
    state = json.loads((ckpt / "trainer_state.json").read_text())["state"]
    assert state["step"] == 8
    assert state["curve"] and all(math.isfinite(c["loss"]) and c["loss"] > 0 for c in state["curve"])


# -- resume ----------------------------------------------------------------------------------------------------------
def test_resume_continues_from_the_saved_step_and_matches_an_uninterrupted_run(tmp_path, monkeypatch, capsys):
    steps = ["--steps", "3", "--warmup", "1"]
    assert _cli_train(tmp_path / "whole", *steps) == 0
    # a time cap of ~0 stops the run after its first step, as an interruption would
    assert _cli_train(tmp_path / "split", *steps, "--max-minutes", "1e-9") == 0
    cut = tmp_path / "split" / "checkpoint"
    assert json.loads((cut / "trainer_state.json").read_text())["state"]["step"] == 1

    calls = []
    real = train_mod.masked_diffusion_loss

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "masked_diffusion_loss", counting)
    assert _cli_train(tmp_path / "split", *steps, "--resume") == 0
    assert len(calls) == 2, f"resume from step 1 of 3 should train 2 steps, trained {len(calls)}"
    assert "(step 3," in capsys.readouterr().out

    whole, split = tmp_path / "whole" / "checkpoint", cut
    for name in ("model.safetensors", "optimizer.safetensors"):
        a, b = load_file(str(whole / name)), load_file(str(split / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name} {k} differs after resume"
    sa = json.loads((whole / "trainer_state.json").read_text())["state"]
    sb = json.loads((split / "trainer_state.json").read_text())["state"]
    assert sb["step"] == sa["step"] == 3
    drop = lambda curve: [{k: v for k, v in c.items() if k != "seconds"} for c in curve]  # noqa: E731
    assert drop(sb["curve"]) == drop(sa["curve"])
    assert sb["smooth"] == sa["smooth"]


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """One 2-step run; each test corrupts its own copy."""
    out = tmp_path_factory.mktemp("saved")
    train(TrainConfig(out=str(out), steps=2, scenes_per_step=1, eval_every=0, threads=1), progress=False)
    return out


@pytest.fixture()
def run_copy(saved_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(saved_run, dst)
    return dst


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _edit_optimizer(fn):
    def edit(path):
        tensors = load_file(str(path))
        fn(tensors)
        save_file(tensors, str(path))
    return edit


def _set_state(value):
    def edit(path):
        meta = json.loads(path.read_text())
        meta["state"] = value(meta["state"])
        path.write_text(json.dumps(meta))
    return edit


CORRUPTIONS = {
    "truncated optimizer": ("optimizer.safetensors", _truncate, "corrupt"),
    "optimizer not safetensors": ("optimizer.safetensors", lambda p: p.write_text("{}"), "corrupt"),
    "optimizer missing key": ("optimizer.safetensors", _edit_optimizer(lambda t: t.pop("0.0.exp_avg_sq")),
                              "0.0.exp_avg_sq"),
    "optimizer shape mismatch": ("optimizer.safetensors", _edit_optimizer(
        lambda t: t.update({"0.1.exp_avg": t["0.1.exp_avg"][..., :1].contiguous()})), "shape"),
    "optimizer foreign key": ("optimizer.safetensors",
                              _edit_optimizer(lambda t: t.update({"0.99999.exp_avg": torch.zeros(1)})),
                              "0.99999.exp_avg"),
    "optimizer empty": ("optimizer.safetensors", _edit_optimizer(lambda t: t.clear()), "no optimizer state"),
    "optimizer missing": ("optimizer.safetensors", lambda p: p.unlink(), "missing"),
    "empty state": ("trainer_state.json", _set_state(lambda s: {}), "step"),
    "step wrong type": ("trainer_state.json", _set_state(lambda s: s | {"step": "2"}), "state.step"),
    "curve wrong type": ("trainer_state.json", _set_state(lambda s: s | {"curve": 5}), "state.curve"),
    "state not an object": ("trainer_state.json", _set_state(lambda s: [1, 2]), "state"),
    "trainer state not json": ("trainer_state.json", lambda p: p.write_text("{\"state\": "), "JSON"),
    "truncated model": ("model.safetensors", _truncate, "corrupt"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_resume_from_a_damaged_checkpoint_is_a_one_line_error(run_copy, capsys, case):
    name, damage, words = CORRUPTIONS[case]
    target = run_copy / "checkpoint" / name
    damage(target)
    before = {p.name: p.read_bytes() for p in (run_copy / "checkpoint").iterdir()}
    assert _cli_train(run_copy, "--steps", "3", "--resume") == 1
    line = _error_line(capsys)
    assert name in line, line
    assert words in line, line
    after = {p.name: p.read_bytes() for p in (run_copy / "checkpoint").iterdir()}
    assert after == before, "a failed resume must leave the checkpoint as it was"


def test_resume_raises_checkpoint_error_in_the_library(run_copy):
    _set_state(lambda s: {})(run_copy / "checkpoint" / "trainer_state.json")
    with pytest.raises(CheckpointError, match="trainer_state.json"):
        train(TrainConfig(out=str(run_copy), steps=3, scenes_per_step=1, eval_every=0, threads=1), resume=True,
              progress=False)


def test_resume_with_no_checkpoint_says_there_is_nothing_to_resume(tmp_path, capsys):
    out = tmp_path / "never_trained"
    assert _cli_train(out, "--steps", "2", "--resume") == 1
    line = _error_line(capsys)
    assert "nothing to resume" in line and str(out / "checkpoint") in line, line
    assert not (out / "checkpoint").exists(), "it must not have trained from scratch"


def test_resume_after_an_interrupted_save_points_at_the_tmp_directory(run_copy, capsys):
    (run_copy / "checkpoint").rename(run_copy / "checkpoint.tmp")
    assert _cli_train(run_copy, "--steps", "3", "--resume") == 1
    line = _error_line(capsys)
    assert "nothing to resume" in line and "checkpoint.tmp" in line, line


# -- bad numbers -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag, value", [
    ("--steps", "0"), ("--steps", "-5"), ("--scenes-per-step", "0"), ("--lr", "-0.001"), ("--lr", "0"),
    ("--lr", "nan"), ("--min-lr-ratio", "1.5"), ("--warmup", "-1"), ("--noise-draws", "0"),
    ("--box-fraction", "2"), ("--save-every", "0"), ("--eval-every", "-1"), ("--max-minutes", "-1"),
    ("--threads", "-2"), ("--grad-clip", "0"), ("--weight-decay", "-1"),
])
def test_bad_numbers_are_a_one_line_error_naming_the_flag(tmp_path, capsys, flag, value):
    out = tmp_path / "run"
    args = ["--steps", "2", flag, value]
    assert _cli_train(out, *args) == 1
    line = _error_line(capsys)
    assert line.startswith(f"error: {flag} must be"), line
    assert value in line or value.lstrip("-") in line, line
    assert not out.exists(), "nothing should be written before the arguments are checked"


def test_train_config_validate_in_the_library():
    with pytest.raises(ConfigError, match="^steps must be"):
        train(TrainConfig(out="unused", steps=0), progress=False)
    TrainConfig(out="x").validate()  # the defaults are valid


def test_help_shows_the_bundled_recipe(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.replace("\\\n", " ").split())
    import json

    from pdlm_ros.captioner import DEFAULT_CHECKPOINT

    recipe = json.loads((DEFAULT_CHECKPOINT / "training.json").read_text())["command"]
    assert recipe in text  # the command the bundled weights were trained with, as recorded beside them
    twin = Path(__file__).resolve().parents[2] / "docs" / "training_ar_twin.json"  # the README's twin, same rule
    assert json.loads(twin.read_text())["command"] in text


def test_antithetic_draws_score_every_token_in_every_pair():
    from pdlm_ros.train import EPS, noise_masks

    g = torch.Generator().manual_seed(0)
    p, m = noise_masks((6, 8), 5, True, g)  # 2 pairs and one independent draw of 6 spans
    assert p.shape == (30, 1) and m.shape == (30, 8)
    first, second = m[:12], m[12:24]
    assert torch.equal(second, ~first)  # each token masked in exactly one draw of its pair
    assert torch.allclose(p[12:24], (1 - p[:12]).clamp_min(EPS))
    assert bool((p >= EPS).all()) and bool((p <= 1).all())
    p_ind, m_ind = noise_masks((6, 8), 2, False, torch.Generator().manual_seed(0))
    assert not torch.equal(m_ind[6:], ~m_ind[:6])  # independent draws are not complements
    # each draw alone is the forward process: masked share ~ p over many spans
    p_big, m_big = noise_masks((4000, 8), 2, True, torch.Generator().manual_seed(1))
    for half in (slice(0, 4000), slice(4000, 8000)):
        assert abs(m_big[half].float().mean().item() - p_big[half].mean().item()) < 0.01
        assert abs(p_big[half].mean().item() - 0.5) < 0.02  # p ~ U(0, 1) for both draws of a pair


def test_boolean_train_options_are_switches():
    import argparse

    from pdlm_ros.cli.train import add_arguments

    ap = argparse.ArgumentParser()
    add_arguments(ap)
    assert ap.parse_args(["--out", "x", "--antithetic"]).antithetic is True
    assert ap.parse_args(["--out", "x", "--no-antithetic"]).antithetic is False
    assert ap.parse_args(["--out", "x"]).antithetic is False
