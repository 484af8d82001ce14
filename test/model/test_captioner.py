"""Bad input is handled as documented or refused with an error that names the problem; nothing is dropped."""

import json
import logging
import math
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pdlm_ros.errors import ConfigError, ImageInputError, RegionInputError
from pdlm_ros.types import RegionInput

BOX = RegionInput(box=(2, 2, 30, 30))


def rng_image(h, w, c=3, dtype=np.uint8, seed=0):
    info = np.iinfo(dtype)
    shape = (h, w) if c is None else (h, w, c)
    return np.random.default_rng(seed).integers(0, info.max, shape, dtype=dtype)


@pytest.mark.parametrize("image", [rng_image(40, 50, None), rng_image(40, 50, 1), rng_image(40, 50, 4),
                                   rng_image(40, 50, 3, np.uint16), rng_image(40, 50, None, np.uint16)],
                         ids=["gray", "gray1", "rgba", "rgb16", "gray16"])
def test_image_formats_are_converted(tiny_captioner, image):
    res = tiny_captioner.caption(image, [BOX], steps=4)
    assert res.regions[0].ok and res.regions[0].caption is not None


def test_rgba_is_captioned_like_its_rgb(tiny_captioner):
    rgb = rng_image(40, 50)
    rgba = np.concatenate([rgb, np.full((40, 50, 1), 7, np.uint8)], axis=2)
    a, b = tiny_captioner.caption(rgb, [BOX], steps=4), tiny_captioner.caption(rgba, [BOX], steps=4)
    assert a.regions[0].caption == b.regions[0].caption


@pytest.mark.parametrize("image,match", [
    (np.zeros((4, 4, 2), np.uint8), "shape"),
    (np.zeros((0, 4, 3), np.uint8), "empty"),
    (np.zeros((4, 4, 3), np.int64), "dtype"),
    (np.full((4, 4, 3), np.nan, np.float32), "NaN"),
    ("not an image", "numpy array"),
])
def test_unusable_images_are_refused_by_name(tiny_captioner, image, match):
    with pytest.raises(ImageInputError, match=match):
        tiny_captioner.caption(image, [BOX])


def test_no_regions_gives_an_empty_result_without_running_the_model(tiny_captioner):
    res = tiny_captioner.caption(rng_image(20, 20), [])
    assert res.regions == [] and res.stats.nfe == 0


def test_bad_regions_are_refused_one_by_one_and_the_rest_captioned(tiny_captioner):
    h, w = 40, 60
    empty = np.zeros((h, w), bool)
    wrong = np.ones((10, 10), bool)
    regions = [
        RegionInput(box=(1, 1, 20, 20), region_id="good"),
        RegionInput(mask=empty, region_id="empty"),
        RegionInput(box=(100, 100, 120, 130), region_id="outside"),
        RegionInput(box=(5, 5, 5, 9), region_id="zero"),
        RegionInput(box=(math.nan, 1, 3, 4), region_id="nan"),
        RegionInput(mask=wrong, region_id="wrongsize"),
        RegionInput(region_id="nothing"),
        RegionInput(box=(-10, -10, 15, 15), region_id="clipped"),
    ]
    res = tiny_captioner.caption(rng_image(h, w), regions, steps=4)
    assert [r.region_id for r in res.regions] == [r.region_id for r in regions]  # nothing dropped, order kept
    errors = {r.region_id: r.error for r in res.regions}
    assert errors["good"] == "" and errors["clipped"] == ""
    assert "mask is empty" in errors["empty"]
    assert "lies outside the 60x40 image" in errors["outside"]
    assert "zero or negative area" in errors["zero"]
    assert "non-finite" in errors["nan"]
    assert "does not match the 60x40 image" in errors["wrongsize"]
    assert "neither a box nor a mask" in errors["nothing"]
    assert res.regions[7].box == (0.0, 0.0, 15.0, 15.0)
    good = tiny_captioner.caption(rng_image(h, w), regions[:1], steps=4)
    assert good.regions[0].caption == res.regions[0].caption  # refused neighbours change nothing


def test_one_pixel_image(tiny_captioner):
    res = tiny_captioner.caption(np.full((1, 1, 3), 200, np.uint8), [RegionInput(box=(0, 0, 1, 1))], steps=2)
    assert res.regions[0].ok


_HUGE_FRAME_SCRIPT = """
import resource, numpy as np
from pdlm_ros import Captioner, RegionInput
cap = Captioner.load(preset="tiny", seed=0)
img = np.full((8000, 8000, 3), 7, np.uint8)  # every page touched: the frame is in the baseline
img[1000:3000, 2000:5000] = (200, 30, 30)
cap.caption(img[:64, :64], [RegionInput(box=(0, 0, 32, 32))], steps=2)  # warm-up at a small size
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
res = cap.caption(img, [RegionInput(box=(2000, 1000, 5000, 3000))], steps=2)
assert res.regions[0].ok, res.regions[0].error
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def test_huge_image_is_resized_not_copied_to_float():
    # A fresh process, so the peak-RSS baseline is this frame's and not an earlier test's high-water mark.
    out = subprocess.run([sys.executable, "-c", _HUGE_FRAME_SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    grown_mib = float(out.stdout.strip().splitlines()[-1])
    # A float32 copy of the frame alone would be 768 MiB.
    assert grown_mib < 500, f"peak memory grew by {grown_mib:.0f} MiB"


def test_more_regions_than_max_are_chunked_with_identical_captions(tiny_captioner):
    cap = tiny_captioner
    n = cap.config.region.max_regions + 3
    img = rng_image(64, 96, seed=4)
    regions = [RegionInput(box=(i * 5, 2 + i, i * 5 + 20, 40 + i), region_id=str(i)) for i in range(n)]
    res = cap.caption(img, regions, steps=4)
    assert len(res.regions) == n and all(r.ok for r in res.regions)
    assert res.stats.nfe == 2 * 4  # two passes of 4 steps
    last = cap.caption(img, regions[-3:], steps=4)
    assert [r.caption for r in res.regions[-3:]] == [r.caption for r in last.regions]


def test_bad_decoding_arguments_are_named(tiny_captioner):
    with pytest.raises(ConfigError, match="unknown decoding mode 'fast'"):
        tiny_captioner.caption(rng_image(8, 8), [BOX], mode="fast")
    length = tiny_captioner.config.decoding.caption_len
    with pytest.raises(ConfigError, match=f"steps must be in 1..{length} "):
        tiny_captioner.caption(rng_image(8, 8), [BOX], steps=length + 1)
    with pytest.raises(ConfigError, match="temperature must be a finite number >= 0"):
        tiny_captioner.caption(rng_image(8, 8), [BOX], temperature=-1.0)
    with pytest.raises(ConfigError, match=r"threshold must be in \(0, 1\]"):
        tiny_captioner.caption(rng_image(8, 8), [BOX], mode="threshold", threshold=1.5)
    with pytest.raises(ConfigError, match="only used in threshold mode"):
        tiny_captioner.caption(rng_image(8, 8), [BOX], threshold=0.5)


def test_caption_cli_json(tmp_path):
    path = tmp_path / "img.png"
    Image.fromarray(rng_image(48, 64)).save(path)
    mask = np.zeros((48, 64), np.uint8)
    mask[10:30, 20:40] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = subprocess.run([sys.executable, "-m", "pdlm_ros.cli", "caption", str(path), "--box", "1,2,30,40",
                          "--mask", str(tmp_path / "mask.png"), "--preset", "tiny", "--steps", "4", "--json"],
                         capture_output=True, text=True, check=True)
    doc = json.loads(out.stdout)
    assert [r["index"] for r in doc["regions"]] == [0, 1]
    assert doc["regions"][0]["box"] == [1.0, 2.0, 30.0, 40.0]
    assert doc["regions"][1]["box"] == [20.0, 10.0, 40.0, 30.0]
    from pdlm_ros.model.config import preset

    assert doc["stats"]["nfe"] == 4 and doc["stats"]["tpf"] == 2 * preset("tiny").decoding.caption_len / 4


def test_caption_cli_errors_are_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pdlm_ros.cli", "caption", str(tmp_path / "missing.png"),
                          "--box", "1,2,3,4", "--preset", "tiny"], capture_output=True, text=True)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith("error: image file not found")
    bad = subprocess.run([sys.executable, "-m", "pdlm_ros.cli", "caption", str(tmp_path / "x.png"), "--box", "1,2"],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "four comma-separated numbers" in bad.stderr


def test_per_request_prompt_changes_the_prefix_and_is_checked():
    """A native prompt replaces the text after the visual tokens; an official one the question."""
    import json
    from pathlib import Path

    import torch
    from safetensors.torch import load_file

    from pdlm_ros import Captioner
    from pdlm_ros.model.checkpoint import load_pretrained

    cap = Captioner.load(preset="tiny", seed=0)
    rgb = np.full((64, 96, 3), 150, dtype=np.uint8)
    reg = [RegionInput(box=(5, 5, 50, 50))]
    with torch.inference_mode():
        own = cap.model.encode_frame(rgb).prefix
        other = cap.model.encode_frame(rgb, torch.tensor(cap.tokenizer.encode("the region", add_special_tokens=False).ids)).prefix
    assert other.shape[0] == own.shape[0] - 2  # "describe the region ." -> "the region"
    assert cap.caption(rgb, reg, prompt="the region").regions[0].ok
    with pytest.raises(ConfigError, match="has no tokens"):
        cap.caption(rgb, reg, prompt="   ")

    fixtures = Path(__file__).resolve().parents[1] / "fixtures" / "official"
    model, tok = load_pretrained(fixtures / "checkpoint", dtype=torch.float32)
    off = Captioner(model, tok)
    a = off.caption(rgb, reg, steps=2)
    b = off.caption(rgb, reg, steps=2, prompt="What colour is the masked region?")
    assert a.regions[0].ok and b.regions[0].ok
    from pdlm_ros.model.official import prepare_pass

    masks = [np.ones((64, 96), dtype=bool)]
    p1 = prepare_pass(model.official_runner(), model.cfg, tok, model.special_tokens, rgb, masks, 4)
    p2 = prepare_pass(model.official_runner(), model.cfg, tok, model.special_tokens, rgb, masks, 4, "What colour?")
    assert not torch.equal(p1.seq.ids, p2.seq.ids)


def test_caption_cli_takes_a_box_with_negative_coordinates(tmp_path, capsys):
    """`--box -50,-50,30,30` failed in the argument parser: a value starting with "-" looked like an option."""
    from pdlm_ros.cli import main

    path = tmp_path / "img.png"
    Image.fromarray(rng_image(48, 64)).save(path)
    assert main(["caption", str(path), "--box", "-50,-50,30,30", "--box", "-1.5,2,20,-3", "--preset", "tiny",
                 "--steps", "2", "--json"]) == 0
    first, second = json.loads(capsys.readouterr().out)["regions"]
    assert first["box"] == [0.0, 0.0, 30.0, 30.0] and "error" not in first  # clipped to the image
    assert "zero or negative area" in second["error"]
    from pdlm_ros.cli.caption import normalize_argv

    assert normalize_argv(["x.png", "--box", "-5,1,2,3", "--box", "1,2,3,4", "--", "--box", "-1"]) == \
        ["x.png", "--box=-5,1,2,3", "--box", "1,2,3,4", "--", "--box", "-1"]
    assert normalize_argv(["--box", "--json"]) == ["--box", "--json"]  # a real option stays one


def test_region_budget_keeps_the_best_and_refuses_the_rest_with_the_reason(tiny_captioner):
    img = rng_image(40, 60)
    regions = [RegionInput(box=(i, i, i + 10 + i, i + 10), score=s, region_id=str(i))
               for i, s in enumerate([0.2, math.nan, 0.9, 0.5, math.nan, 0.1])]
    regions.append(RegionInput(box=(math.nan, 0, 1, 1), region_id="bad", score=1.0))  # unusable: never counted
    res = tiny_captioner.caption(img, regions, steps=2, budget=5)
    kept = [r.region_id for r in res.regions if r.ok]
    assert kept == ["0", "2", "3", "4", "5"]  # every scored one, then the larger unscored box; request order
    errors = {r.region_id: r.error for r in res.regions}
    assert errors["1"] == ("over the per-frame region budget: the 5 best of the frame's 6 usable regions are "
                           "captioned (highest detector score first, then largest area); this one ranked 6")
    assert "non-finite" in errors["bad"]
    two = tiny_captioner.caption(img, regions, steps=2, budget=2)
    assert [r.region_id for r in two.regions if r.ok] == ["2", "3"]  # scores 0.9 and 0.5
    alone = tiny_captioner.caption(img, [regions[k] for k in (0, 2, 3, 4, 5)], steps=2)
    assert [r.caption for r in res.regions if r.ok] == [r.caption for r in alone.regions]
    with pytest.raises(RegionInputError, match="at least 1 region"):
        tiny_captioner.caption(img, regions, budget=0)


def test_default_budget_bounds_one_call(tiny_captioner):
    from pdlm_ros.region_rules import DEFAULT_REGION_BUDGET

    n = DEFAULT_REGION_BUDGET + 30
    regions = [RegionInput(box=(k % 50, k % 30, k % 50 + 8, k % 30 + 8)) for k in range(n)]
    res = tiny_captioner.caption(rng_image(40, 60), regions, steps=1)
    assert len(res.regions) == n and sum(r.ok for r in res.regions) == DEFAULT_REGION_BUDGET
    assert res.stats.nfe == -(-DEFAULT_REGION_BUDGET // tiny_captioner.config.region.max_regions)


def test_boxes_under_one_pixel_are_refused(tiny_captioner):
    regions = [RegionInput(box=(5, 5, 5.01, 5.01)), RegionInput(box=(5, 5, 30, 5.5)),
               RegionInput(box=(59.5, 5, 80, 20)), RegionInput(box=(5, 5, 6, 6))]
    res = tiny_captioner.caption(rng_image(40, 60), regions, steps=2)
    assert [bool(r.error) for r in res.regions] == [True, True, True, False]
    assert "0.01 x 0.01 px inside the image, under the minimum region size of 1 px per side" in res.regions[0].error
    assert "0.5 x 15 px inside the image" in res.regions[2].error  # clipped first, then measured


def test_refused_regions_make_one_warning_line_per_period(tiny_captioner, caplog, monkeypatch):
    """10,000 NaN boxes wrote 10,000 lines; now one line per call, and none within `log_throttle` of the last."""
    monkeypatch.setattr(tiny_captioner, "log_throttle", 3600.0)
    monkeypatch.setattr(tiny_captioner, "_refusal_log", type(tiny_captioner._refusal_log)())
    nan = [RegionInput(box=(math.nan, 0, 5, 5))] * 10_000
    with caplog.at_level(logging.WARNING, logger="pdlm_ros.captioner"):
        for _ in range(3):
            res = tiny_captioner.caption(rng_image(20, 20), nan + [BOX], steps=1)
    assert sum(r.ok for r in res.regions) == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "pdlm_ros.captioner"]
    assert len(lines) == 1 and lines[0].startswith("10000 of 10001 regions refused (region 0: box has non-finite")
    monkeypatch.setattr(tiny_captioner, "log_throttle", 0.0)
    with caplog.at_level(logging.WARNING, logger="pdlm_ros.captioner"):
        tiny_captioner.caption(rng_image(20, 20), nan[:3], steps=1)
    assert caplog.records[-1].getMessage().endswith("; 20000 more refused since the last such line")


def test_a_set_cancel_event_stops_the_call_between_forwards(tiny_captioner, monkeypatch):
    import threading

    from pdlm_ros.errors import Cancelled

    stop = threading.Event()
    calls = []
    original = tiny_captioner.model.region_logits

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            stop.set()  # asked to stop during the second forward
        return original(*args, **kwargs)

    monkeypatch.setattr(tiny_captioner.model, "region_logits", step)
    regions = [RegionInput(box=(k, k, k + 10, k + 10)) for k in range(20)]
    with pytest.raises(Cancelled, match="stopped on request"):
        tiny_captioner.caption(rng_image(40, 60), regions, steps=4, cancel=stop)
    assert len(calls) == 2  # the forward in progress finished; no further one began
    assert tiny_captioner.caption(rng_image(40, 60), regions[:2], steps=2, cancel=threading.Event()).regions[0].ok
