"""`pdlm-ros caption IMAGE --box x1,y1,x2,y2 [--box ...] [--mask PNG ...]`."""

from __future__ import annotations

import argparse
import math
import re
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from pdlm_ros.cli._common import add_json_option, add_model_options, emit_json, load_captioner, setup_logging
from pdlm_ros.errors import ImageInputError, RegionInputError
from pdlm_ros.model.image import MAX_PIXELS
from pdlm_ros.types import MODES, RegionInput

EXAMPLES = """examples:
  pdlm-ros caption scene.png --box 10,20,80,90 --box 100,40,150,120
  pdlm-ros caption scene.png --box -50,-50,30,30        # partly outside the image: clipped
  pdlm-ros caption scene.png --mask cup.png --json
"""

_NUMBERS = re.compile(r"^-[\d.]")  # "-50,-50,30,30": a box, not an option


def normalize_argv(argv: list[str]) -> list[str]:
    """`--box -50,...` as `--box=-50,...`: argparse takes a value that starts with "-" for an option unless it is
    one plain negative number, and a box is four."""
    out: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg == "--":  # everything after it is positional already
            out += [arg, *it]
            break
        nxt = next(it, None) if arg == "--box" else None
        if nxt is not None and _NUMBERS.match(nxt):
            out.append(f"--box={nxt}")
        else:
            out += [arg] if nxt is None else [arg, nxt]
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", help="image file (PNG, JPEG, ...; grayscale, RGBA and 16-bit are converted)")
    p.add_argument("--box", action="append", default=[], metavar="X1,Y1,X2,Y2", help="a region box in pixels")
    p.add_argument("--mask", action="append", default=[], metavar="PNG", help="a region mask image (non-zero = in)")
    p.add_argument("--mode", default="auto", choices=MODES,
                   help="decoding mode (default auto: parallel, or official for the released PerceptionDLM)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's, 32)")
    p.add_argument("--sampler", choices=["global", "span", "threshold"],
                   help="official checkpoints: how tokens are committed (default global, the official re-masking)")
    p.add_argument("--refresh", type=int, help="official checkpoints, mode cached: refresh the cache every N steps")
    p.add_argument("--temperature", type=float, help="sampling temperature (0 = greedy, deterministic)")
    p.add_argument("--seed", type=int, help="seed for temperature sampling")
    add_model_options(p)
    add_json_option(p)
    p.add_argument("-v", "--verbose", action="store_true")


def read_image(path: str) -> np.ndarray:
    # PIL refuses images over ~179 MP as decompression bombs; this command takes what the model takes, and checks
    # the size in the header against it before decoding (PIL's own warning would only repeat that).
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            if img.width * img.height > MAX_PIXELS:
                raise ImageInputError(f"image {path} is {img.width}x{img.height} px, over the limit of {MAX_PIXELS} "
                                      "pixels")
            img.load()
            if img.mode in ("I;16", "I;16B", "I"):
                return np.asarray(img).astype(np.uint16)
            return np.asarray(img if img.mode in ("L", "RGB", "RGBA") else img.convert("RGB"))
    except FileNotFoundError:
        raise ImageInputError(f"image file not found: {path}") from None
    except Image.DecompressionBombError as err:
        raise ImageInputError(f"image {path} is too large: {err}") from None
    except (UnidentifiedImageError, OSError) as err:
        raise ImageInputError(f"cannot read image {path}: {err}") from err


def parse_box(text: str) -> tuple[float, float, float, float]:
    parts = text.split(",")
    try:
        values = tuple(float(v) for v in parts)
    except ValueError:
        values = ()
    if len(values) != 4:
        raise RegionInputError(f"--box needs four comma-separated numbers x1,y1,x2,y2; got {text!r}")
    return values  # type: ignore[return-value]


def run(args: argparse.Namespace) -> int:
    setup_logging(args.verbose)
    regions = [RegionInput(box=parse_box(b)) for b in args.box]
    image = read_image(args.image)
    for path in args.mask:
        m = read_image(path)
        regions.append(RegionInput(mask=(m if m.ndim == 2 else m[..., :3].max(axis=2)) > 0))
    cap = load_captioner(args)
    extra = {k: v for k, v in (("sampler", args.sampler), ("refresh", args.refresh)) if v is not None}
    res = cap.caption(image, regions, mode=args.mode, steps=args.steps, temperature=args.temperature, seed=args.seed,
                      **extra)
    if args.json:
        doc = res.to_dict()
        emit_json({"regions": [{"index": r["index"], "box": r["box"], "caption": r["caption"],
                                "confidence": r["confidence"], **({"error": r["error"]} if r["error"] else {})}
                               for r in doc["regions"]],
                   "stats": {"nfe": res.stats.nfe, "tpf": res.stats.tpf, "latency_ms": res.stats.latency_ms["total"],
                             "stages_ms": res.stats.latency_ms},
                   "model": res.model_name}, args.json)
        return 0
    if not regions:
        print("no regions given (use --box or --mask)")
    for r in res.regions:
        box = ",".join("nan" if math.isnan(v) else f"{v:.0f}" for v in r.box)
        text = f"ERROR: {r.error}" if r.error else f"{r.caption}  (confidence {r.confidence:.2f})"
        print(f"[{r.index}] box {box}: {text}")
    s = res.stats
    print(f"{len(res.regions)} regions, NFE {s.nfe}, TPF {s.tpf:.2f}, {s.latency_ms['total']:.0f} ms ({res.model_name})")
    return 0
