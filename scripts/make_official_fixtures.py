"""Parity fixtures for the official PerceptionDLM layout, recorded by running the official code.

Run by hand, never by CI. The official code needs torchvision and transformers 4.51, so it runs in a side
virtualenv, never in pdlm_ros's own:

    python3 -m venv /tmp/pdlm-official
    /tmp/pdlm-official/bin/pip install torch==2.14.1 torchvision==0.29.1 transformers==4.51.3 einops \
        safetensors tokenizers pillow numpy
    /tmp/pdlm-official/bin/python scripts/make_official_fixtures.py --official /path/to/PerceptionDLM \
        --out test/fixtures/official

`--official` is a checkout of the public repository MSALab-PKU/PerceptionDLM. The script builds the official model
(`PDMLLM`: SigLIP + abstractor + LLaDA) from tiny random configs with LLaDA's real vocabulary size (the sampler
hard-codes mask id 126336), saves it the way the hub checkpoint is laid out (`save_pretrained` with sharded
safetensors and an index, plus the processor's tokenizer and image-processor files), then runs the official
inference of `evaluation/ParaDLC-Bench/infer_mask_captions_paradlc.py` (area sort, visual-prompt images, boxes,
prompt text, `PDMLLM.generate`) on several frames and records, per case: the inputs, the token ids after RoI
expansion, the decoder input embeddings, the attention rule, the first forward's logits (a fixed subset of vocabulary
columns, plus every position's argmax and max) and the final tokens at temperature 0.

Weights are stored in float16 and the official run uses the same float16-rounded values in float32, so the
tests can demand float32 agreement.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

QUESTION = "Describe the masked region in detail."
VOCAB = 126490  # LLaDA's 126464 + the 26 tokens the processor and the model add
TILE, PATCH = 64, 8  # tiny geometry: 8x8 patches per tile, 4x4 = 16 visual tokens per view after the shuffle
PROMPT_NUMBERS = 6


# -- tokenizer ---------------------------------------------------------------------------------------------------
def llada_special_tokens() -> list[str]:
    """Added tokens at LLaDA's ids 126080..126463 (BOS 126080, EOS 126081, mask 126336, header/eot 126346-8)."""
    fixed = {126080: "<|startoftext|>", 126081: "<|endoftext|>", 126336: "<|mdm_mask|>",
             126346: "<|start_header_id|>", 126347: "<|end_header_id|>", 126348: "<|eot_id|>"}
    out, k = [], 0
    for i in range(126080, 126464):
        if i in fixed:
            out.append(fixed[i])
        else:
            out.append(f"<|reserved_token_{k}|>")
            k += 1
    return out


def build_tokenizer(work: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [QUESTION, "You are a helpful assistant.", "a red cube on the left of a blue ball", "user assistant system",
              "the object is small and round, with a striped pattern and a wooden texture."] * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    for i in range(len(vocab), 126080):  # unreachable fillers so the special tokens sit at LLaDA's ids
        vocab[f"<f{i}>"] = i
    tok = Tokenizer.from_str(json.dumps(data))
    tok.add_special_tokens(llada_special_tokens())
    assert tok.token_to_id("<|mdm_mask|>") == 126336 and tok.token_to_id("<|eot_id|>") == 126348
    tok.post_processor = processors.TemplateProcessing(single="<|startoftext|> $A",
                                                       special_tokens=[("<|startoftext|>", 126080)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    path = work / "tiny-LLaDA-tokenizer"
    fast.save_pretrained(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


# -- model -------------------------------------------------------------------------------------------------------
def build_model(official: Path, work: Path, tokenizer):
    sys.path.insert(0, str(official / "smallvlm" / "models"))  # `pdmllm` as a namespace package, no smallvlm init
    from pdmllm.configuration_llada import LLaDAConfig
    from pdmllm.configuration_pdmllm import PDMLLMConfig
    from pdmllm.modeling_pdmllm import PDMLLM
    from pdmllm.processing_pdmllm import PDMLLMProcessor
    from transformers import AutoConfig, SiglipConfig, SiglipImageProcessor, SiglipModel

    AutoConfig.register("llada", LLaDAConfig)  # the hub config names it by auto_map; here the class is at hand
    image_processor = SiglipImageProcessor(size={"height": TILE, "width": TILE}, resample=Image.BICUBIC,
                                           image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = PDMLLMProcessor(tokenizer, image_processor, image_size=TILE, patch_size=PATCH, downsample_ratio=0.5,
                                max_sub_img=6, min_sub_img=1)
    # What PDMLLM._add_special_tokens adds while training (kept in the released tokenizer).
    processor.tokenizer.add_tokens([f"<Prompt{i}>" for i in range(PROMPT_NUMBERS)] + ["<NO_Prompt>"],
                                   special_tokens=True)
    assert len(processor.tokenizer) == VOCAB, len(processor.tokenizer)

    siglip_cfg = SiglipConfig(
        text_config=dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                           image_size=TILE, patch_size=PATCH))
    torch.manual_seed(0)
    siglip_dir = work / "tiny-siglip"
    SiglipModel(siglip_cfg).save_pretrained(siglip_dir)
    vision_cfg = siglip_cfg.to_dict()
    vision_cfg["_name_or_path"] = str(siglip_dir)
    lm_cfg = LLaDAConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=40, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_theta=500000.0, rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=False,
                         bos_token_id=126080, eos_token_id=126081, pad_token_id=126081).to_dict()
    lm_cfg["_name_or_path"] = "tiny-LLaDA"
    cfg = PDMLLMConfig(language_model_config=lm_cfg, vision_model_config=vision_cfg,
                       vision_abstractor_config={"projection_type": "mlp2x_gelu"},
                       image_token_id=processor.image_token_id, image_size=TILE, patch_size=PATCH,
                       downsample_ratio=0.5, vision_select_layer=-2, prompt_numbers=PROMPT_NUMBERS,
                       kernel_size=[PATCH, PATCH], roi_output_size=4)
    cfg._attn_implementation = "eager"
    model = PDMLLM(cfg)
    randomize(model)
    return model, processor


@torch.no_grad()
def randomize(model) -> None:
    """Weights at scales that give well-separated logits (no argmax or confidence ties at fp32 noise level).

    Default inits leave a tiny random LLaDA's logits nearly uniform over 126k tokens; then which token or position
    wins is decided by rounding, and no reimplementation could agree on it.
    """
    g = torch.Generator().manual_seed(1234)
    for name, p in model.named_parameters():
        if name.endswith("lm_head.weight"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.75)
        elif p.ndim == 1 and ("norm" in name or "layernorm" in name) and name.endswith("weight"):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
        elif p.ndim == 1:
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
        elif "embed" in name or name.startswith("mask_id_embedding"):
            p.copy_(torch.randn(p.shape, generator=g))
        else:
            fan_in = int(np.prod(p.shape[1:]))
            p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
        p.copy_(p.half().float())  # fp16-representable, so the fp16 files reproduce this run exactly


# -- inputs ------------------------------------------------------------------------------------------------------
def smooth_image(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    base = rng.integers(0, 256, size=(max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(base).resize((w, h), Image.BILINEAR)).astype(np.int16)
    img += rng.integers(-20, 21, size=img.shape, dtype=np.int16)
    return np.clip(img, 0, 255).astype(np.uint8)


def ellipse(w: int, h: int, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0


def rect(w: int, h: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def cases() -> list[dict]:
    rng = np.random.default_rng(7)
    out = []

    def add(name, w, h, masks, gen_len=32, steps=32, note=""):
        out.append(dict(name=name, image=smooth_image(rng, w, h), masks=masks, gen_len=gen_len, steps=steps,
                        note=note))

    add("one_tile", 60, 50, [ellipse(60, 50, 30, 22, 14, 10)], note="aspect 1.2 -> one tile, no thumbnail")
    add("six_tiles", 96, 64, [ellipse(96, 64, 20, 20, 12, 9), rect(96, 64, 50, 30, 90, 60),
                              ellipse(96, 64, 70, 15, 8, 6)], note="3x2 tiles + thumbnail, 3 masks")
    add("tie_four_tiles", 100, 100,
        [rect(100, 100, 5, 5, 45, 40), ellipse(100, 100, 40, 40, 18, 15), rect(100, 100, 60, 10, 95, 30),
         ellipse(100, 100, 75, 75, 20, 12), rect(100, 100, 10, 60, 30, 95), ellipse(100, 100, 55, 55, 9, 9)],
        note="aspect 1: (1,1) ties (2,2), area decides 2x2; prompt_numbers masks, several overlapping")
    add("tie_one_tile", 80, 80, [rect(80, 80, 10, 10, 40, 40), ellipse(80, 80, 55, 55, 15, 20)],
        gen_len=16, steps=16, note="aspect 1, area too small for 2x2: one tile")
    add("odd_aspect", 200, 37, [rect(200, 37, 150, 10, 200, 37), ellipse(200, 37, 40, 18, 25, 12)],
        note="5x1 tiles + thumbnail; a mask touching the right and bottom borders")
    add("overlap_equal_area", 128, 64, [rect(128, 64, 10, 10, 30, 30), rect(128, 64, 20, 20, 40, 40),
                                        ellipse(128, 64, 80, 32, 40, 25)],
        gen_len=8, steps=5, note="2x1 tiles; two equal-area overlapping masks; 8 tokens in 5 steps")
    add("tall", 40, 150, [rect(40, 150, 0, 0, 12, 20), rect(40, 150, 20, 70, 21, 71),
                          ellipse(40, 150, 20, 110, 15, 30), rect(40, 150, 5, 30, 35, 60)],
        note="1x4 tiles + thumbnail; a mask in the top-left corner; a one-pixel mask")
    return out


# -- the official inference, as in evaluation/ParaDLC-Bench/infer_mask_captions_paradlc.py -------------------------
def run_case(model, processor, case: dict, official: Path) -> dict:
    infer = load_paradlc_helpers(official)
    from pdmllm.processing_pdmllm import dynamic_preprocess

    tokenizer = processor.tokenizer
    pil = Image.fromarray(case["image"])
    sub_images = dynamic_preprocess(pil, min_num=processor.min_sub_img, max_num=processor.max_sub_img,
                                    image_size=processor.image_size[0], use_thumbnail=True)
    pixel_values = processor.image_processor.preprocess(images=sub_images, return_tensors="pt")["pixel_values"]
    aspect = infer.compute_aspect_ratio(pil, processor, num_tiles=pixel_values.shape[0])
    masks = [m.astype(np.uint8) for m in case["masks"]]
    order = [int(i) for i in infer.sort_masks_by_area(masks)]
    masks = [masks[i] for i in order]
    bboxes = infer.build_bboxes(masks, tokenizer)
    vp_images, prompt_tokens, _ = infer.build_visual_prompt_matrices(masks, prompt_numbers=PROMPT_NUMBERS)
    mask_values = []
    for vp in vp_images:
        subs = dynamic_preprocess(vp.convert("RGB"), min_num=processor.min_sub_img, max_num=processor.max_sub_img,
                                  image_size=processor.image_size[0], use_thumbnail=True)
        mask_values.append(processor.image_processor.preprocess(images=subs, return_tensors="pt")["pixel_values"])
    text = infer.build_prompt_text(tokenizer=tokenizer, num_image_token=model.config.num_image_token,
                                   num_tiles=pixel_values.shape[0], questions=[QUESTION], gen_len=case["gen_len"],
                                   num_masks=len(masks))
    input_ids = tokenizer(text, return_tensors="pt")["input_ids"]

    rec: dict = {}
    lm = model.language_model
    original = lm.generate_with_embeds_nonblock

    def spy(inputs_embeds, input_ids=None, attention_mask=None, **kw):
        rec["inputs_embeds"] = inputs_embeds[0].detach().clone()
        rec["input_ids"] = input_ids[0].detach().clone()
        rec["allowed"] = (attention_mask[0, 0] == 0).detach().clone()
        return original(inputs_embeds, input_ids=input_ids, attention_mask=attention_mask, **kw)

    def first_logits(_mod, _inp, out):
        rec.setdefault("logits", out[0].detach().float().clone())

    def vision_out(_mod, _inp, out):
        rec.setdefault("vision_embeds", out.detach().clone())

    lm.generate_with_embeds_nonblock = spy
    hooks = [lm.lm_head.register_forward_hook(first_logits),
             model.vision_abstractor.register_forward_hook(vision_out)]
    try:
        with torch.no_grad():
            final = model.generate(pixel_values=pixel_values, global_mask_values_list=mask_values,
                                   aspect_ratios=aspect, bboxes=[bboxes], input_ids=input_ids, steps=case["steps"],
                                   temperature=0.0, top_p=1.0, tokenizer=tokenizer, prompt_tokens=prompt_tokens)
    finally:
        lm.generate_with_embeds_nonblock = original
        for h in hooks:
            h.remove()
    decoded = tokenizer.decode(final[0], skip_special_tokens=False)
    rec["final_tokens"] = final[0].detach().clone()
    rec["captions"] = infer.split_assistant_blocks(decoded, num_masks=len(masks))
    rec["order"] = order
    rec["aspect"] = [int(v) for v in aspect[0]]
    rec["views"] = int(pixel_values.shape[0])
    rec["bboxes"] = {k: [float(x) for x in v] for k, v in bboxes.items()}
    return rec


def load_paradlc_helpers(official: Path) -> types.ModuleType:
    """The ParaDLC-Bench inference script as a module (its helpers; its __main__ block is not run).

    As published it uses `sys` without importing it and imports the model through the `smallvlm` package, whose
    __init__ pulls in the training stack; so it is executed with `sys` defined and `smallvlm.models.pdmllm.*`
    pointing at the modules already loaded. Its code is run unchanged.
    """
    import pdmllm.modeling_pdmllm
    import pdmllm.processing_pdmllm

    for name in ("smallvlm", "smallvlm.models", "smallvlm.models.pdmllm"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["smallvlm.models.pdmllm.modeling_pdmllm"] = pdmllm.modeling_pdmllm
    sys.modules["smallvlm.models.pdmllm.processing_pdmllm"] = pdmllm.processing_pdmllm
    path = official / "evaluation" / "ParaDLC-Bench" / "infer_mask_captions_paradlc.py"
    module = types.ModuleType("infer_mask_captions_paradlc")
    module.__dict__["sys"] = sys
    exec(compile(path.read_text(), str(path), "exec"), module.__dict__)
    return module


def logit_columns(logits: torch.Tensor) -> torch.Tensor:
    """The columns kept of each logits row: the special tokens' ids that matter, every id that is some position's
    argmax, and a fixed random sample of the vocabulary (the full rows would be 126k floats each)."""
    g = torch.Generator().manual_seed(99)
    special = [126080, 126081, 126336, 126348] + list(range(126464, VOCAB))
    sample = torch.randint(0, VOCAB, (96,), generator=g).tolist()
    winners = logits.argmax(-1).unique().tolist()
    return torch.tensor(sorted(set(special) | set(sample) | set(winners)), dtype=torch.long)


def margins(logits: torch.Tensor) -> tuple[float, float]:
    top2 = logits.topk(2, dim=-1).values
    return float((top2[:, 0] - top2[:, 1]).min()), float(logits.std())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official", type=Path, required=True, help="checkout of MSALab-PKU/PerceptionDLM")
    ap.add_argument("--out", type=Path, default=Path("test/fixtures/official"))
    ap.add_argument("--commit", default=None, help="the checkout's commit, when it has no .git (an exported tree)")
    args = ap.parse_args()
    if not (args.official / "smallvlm" / "models" / "pdmllm" / "modeling_pdmllm.py").is_file():
        sys.exit(f"error: {args.official} is not a checkout of MSALab-PKU/PerceptionDLM")
    import transformers

    work = Path(tempfile.mkdtemp(prefix="pdlm-official-"))
    tokenizer = build_tokenizer(work)
    model, processor = build_model(args.official, work, tokenizer)
    model.eval()

    ckpt = args.out / "checkpoint"
    if args.out.exists():
        shutil.rmtree(args.out)
    ckpt.mkdir(parents=True)
    model.half().save_pretrained(ckpt, safe_serialization=True, max_shard_size="3MB")
    model.float()
    processor.save_pretrained(ckpt)
    for p in ckpt.glob("*.py"):
        p.unlink()  # no code travels with the fixture checkpoint

    # Reload as a user would, so the recorded run is of the saved checkpoint.
    from pdmllm.modeling_pdmllm import PDMLLM

    model = PDMLLM.from_pretrained(ckpt, torch_dtype=torch.float32, attn_implementation="eager").eval()
    meta = {"generator": "scripts/make_official_fixtures.py", "official_commit": args.commit or read_commit(args.official),
            "torch": torch.__version__, "transformers": transformers.__version__, "question": QUESTION,
            "logit_columns": "see each case's logit_cols tensor", "cases": []}
    for case in cases():
        rec = run_case(model, processor, case, args.official)
        gap, spread = margins(rec["logits"])
        cols = logit_columns(rec["logits"])
        tensors = {
            "image": torch.from_numpy(case["image"]),
            "masks": torch.from_numpy(np.stack(case["masks"]).astype(np.uint8)),
            "input_ids": rec["input_ids"],
            "inputs_embeds": rec["inputs_embeds"].float(),
            "vision_embeds": rec["vision_embeds"].float(),
            "allowed": torch.from_numpy(np.packbits(rec["allowed"].numpy().astype(np.uint8))),
            "logit_cols": cols,
            "logits_sub": rec["logits"][:, cols].contiguous(),
            "argmax": rec["logits"].argmax(-1),
            "maxval": rec["logits"].max(-1).values,
            "final_tokens": rec["final_tokens"],
        }
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(args.out / f"{case['name']}.safetensors"))
        meta["cases"].append({"name": case["name"], "note": case["note"], "gen_len": case["gen_len"],
                              "steps": case["steps"], "order": rec["order"], "aspect": rec["aspect"],
                              "views": rec["views"], "seq_len": int(rec["input_ids"].numel()),
                              "captions": rec["captions"], "bboxes": rec["bboxes"],
                              "min_top2_gap": gap, "logit_std": spread})
        print(f"{case['name']}: views {rec['views']} grid {rec['aspect']} order {rec['order']} "
              f"T {rec['input_ids'].numel()} top-2 gap >= {gap:.4f}")
    roi_align_cases(args.out)
    # The vision tower was built from a temporary directory; name it stably (nothing loads it from there).
    cfg_path = ckpt / "config.json"
    config = json.loads(cfg_path.read_text())
    config["vision_model_config"]["_name_or_path"] = "tiny-siglip"
    cfg_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (args.out / "fixtures.json").write_text(json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(work)


def roi_align_cases(out: Path) -> None:
    """torchvision's roi_align (aligned, sampling ratio 2, as the official code calls it) on random maps, boxes and
    scales, boxes partly or wholly outside included: the reference for pdlm_ros's own RoI-align."""
    import torchvision

    g = torch.Generator().manual_seed(5)
    tensors = {}
    for i in range(64):
        h, w = torch.randint(2, 24, (2,), generator=g).tolist()
        feat = torch.randn(3, h, w, generator=g)
        b = torch.rand(4, generator=g) * torch.tensor([w + 6.0, h + 6.0, w + 6.0, h + 6.0]) - 3.0
        box = torch.stack([torch.minimum(b[0], b[2]), torch.minimum(b[1], b[3]),
                           torch.maximum(b[0], b[2]), torch.maximum(b[1], b[3])])
        scale = float(torch.rand(1, generator=g) * 2 + 0.05)
        ref = torchvision.ops.roi_align(feat[None], torch.cat([torch.zeros(1), box])[None], (4, 3),
                                        spatial_scale=scale, sampling_ratio=2, aligned=True)
        tensors.update({f"{i}.feat": feat, f"{i}.box": box, f"{i}.scale": torch.tensor([scale]), f"{i}.out": ref[0]})
    save_file(tensors, str(out / "roi_align.safetensors"))


def read_commit(repo: Path) -> str:
    head = repo / ".git" / "HEAD"
    return head.read_text().strip() if head.is_file() else "unknown (no .git in the checkout)"


if __name__ == "__main__":
    main()
