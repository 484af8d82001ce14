"""Where does a checkpoint lose the shape of a region? scripts/probe_shape.py [CHECKPOINT] [--scenes N]

Fits a linear classifier of the shape (6 classes) on features of training-set regions (masks) and reports its
accuracy on held-out regions, for two feature sets: the G x G mask samples the region encoder reads (its input),
and the RoI tokens it produces (what the decoder sees). A high first number and a low second one mean the encoder
throws the outline away; both high and a low caption shape accuracy would point at the decoder or the training.
"""

import argparse
import random

import torch

from pdlm_ros.captioner import DEFAULT_CHECKPOINT
from pdlm_ros.data.scenes import SHAPES, generate_scene, scene_seeds
from pdlm_ros.model.checkpoint import load_pretrained
from pdlm_ros.train import scene_regions


def features(model, split: str, n: int):  # noqa: ANN001, ANN201
    cv = model.region.vision_dim  # the sample channels after the vision features: mask [, RGB]
    tokens, masks, labels = [], [], []
    with torch.no_grad():
        for seed in scene_seeds(split, n, offset=7_000_000):
            scene = generate_scene(seed)
            regions = scene_regions(scene, random.Random(seed), 0.0)
            frame = model.encode_frame(scene.image)
            samples = model.region.sample(frame.feature_map, frame.image, regions)
            geometry = model.region.geometry_features(regions, frame.width, frame.height)
            tokens.append(model.region.project(samples, geometry).flatten(1))
            masks.append(samples[..., cv:cv + 1].flatten(1))
            labels += [SHAPES.index(o.shape) for o in scene.objects]
    return torch.cat(tokens), torch.cat(masks), torch.tensor(labels)


def linear_probe(x_tr, y_tr, x_te, y_te, epochs: int = 300) -> float:  # noqa: ANN001
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-5
    torch.manual_seed(0)
    lin = torch.nn.Linear(x_tr.shape[1], len(SHAPES))
    opt = torch.optim.Adam(lin.parameters(), 1e-2, weight_decay=1e-4)
    for _ in range(epochs):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(lin((x_tr - mu) / sd), y_tr).backward()
        opt.step()
    with torch.no_grad():
        return 100.0 * (lin((x_te - mu) / sd).argmax(1) == y_te).float().mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", nargs="?", default=str(DEFAULT_CHECKPOINT))
    p.add_argument("--scenes", type=int, default=500, help="training scenes to fit on (held out: a fifth)")
    args = p.parse_args()
    torch.set_num_threads(1)
    model, _ = load_pretrained(args.checkpoint, dtype=torch.float32)
    model.eval()
    tok_tr, mask_tr, y_tr = features(model, "train", args.scenes)
    tok_te, mask_te, y_te = features(model, "heldout", args.scenes // 5)
    print(f"{args.checkpoint}: {len(y_tr)} training / {len(y_te)} held-out regions (masks)")
    print(f"  linear probe on the encoder's input, the mask samples: {linear_probe(mask_tr, y_tr, mask_te, y_te):.1f} %")
    print(f"  linear probe on its output, the RoI tokens:            {linear_probe(tok_tr, y_tr, tok_te, y_te):.1f} %")


if __name__ == "__main__":
    main()
