"""Peak memory of loading a checkpoint: the streaming loader should need about one copy of the weights.

`write_checkpoint` writes a sharded checkpoint of random weights for a config (tensor by tensor, so the writer is
small too); `measure_load` loads it in a fresh Python process and reads that process's peak RSS (VmHWM, which exec
resets, unlike ru_maxrss, which a child inherits from its parent) before and after, so nothing the caller holds is
counted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from pdlm_ros.model.config import DecoderConfig, PDLMConfig, VisionConfig, preset
from pdlm_ros.model.pdlm import PerceptionDLM
from pdlm_ros.model.tokenizer import build_tiny_tokenizer

__all__ = ["medium_config", "write_checkpoint", "measure_load", "LoadMeasurement"]


def medium_config() -> PDLMConfig:
    """~0.2 B parameters: LLaDA's block structure at d 1024 x 12 layers and a 32k vocabulary, a small SigLIP."""
    tiny = preset("tiny")
    return tiny.replace(
        name="pdlm-medium",
        vision=VisionConfig(image_size=224, patch_size=14, hidden_size=384, intermediate_size=1536,
                            num_hidden_layers=6, num_attention_heads=6, max_tiles=4),
        decoder=DecoderConfig(d_model=1024, n_layers=12, n_heads=8, mlp_hidden_size=2816, vocab_size=32000,
                              rope_theta=500000.0, max_sequence_length=4096))


def write_checkpoint(directory: Path, cfg: PDLMConfig, dtype: torch.dtype, shards: int = 4) -> int:
    """Random weights in `shards` files plus an index, config and tokenizer. Returns the weight bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in PerceptionDLM(cfg).state_dict().items()}
    total = sum(int(torch.Size(s).numel()) for s in shapes.values()) * torch.empty((), dtype=dtype).element_size()
    per_shard, names, files = total / shards, list(shapes), []
    weight_map: dict[str, str] = {}
    g = torch.Generator().manual_seed(0)
    i, size, part = 0, 0, {}
    for n, name in enumerate(names):
        t = (torch.randn(shapes[name], generator=g) * 0.02).to(dtype)
        part[name] = t
        size += t.numel() * t.element_size()
        if size >= per_shard or n == len(names) - 1:
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file(part, str(directory / fname))
            weight_map.update({k: fname for k in part})
            files.append(fname)
            i, size, part = i + 1, 0, {}
    # renumber if fewer shards came out than asked
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    cfg.to_json(directory / "config.json")
    build_tiny_tokenizer().save(str(directory / "tokenizer.json"))
    return total


_PROBE = """
import json, re, sys, torch
from pdlm_ros.model.checkpoint import load_pretrained
import transformers.models.siglip.modeling_siglip  # imported by the vision tower; code, not weights
kb = lambda: int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
before = kb()
model, _ = load_pretrained(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
loaded = kb()
# Weights read straight from the safetensors mmap are paged in on first use: read every byte once.
touched = [float(p.detach().max()) for p in model.parameters()]  # a reduction allocates nothing big
params = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"rss_before_kb": before, "rss_loaded_kb": loaded, "rss_peak_kb": kb(), "param_bytes": params}))
"""


@dataclass
class LoadMeasurement:
    weight_bytes: int  # on disk, in the checkpoint's dtype
    param_bytes: int  # of the loaded model
    rss_before_mib: float  # peak RSS of the fresh process before loading (imports)
    rss_loaded_mib: float  # right after load_pretrained returns
    rss_peak_mib: float  # after every weight byte has been read once (the model in use)
    dtype: str

    @property
    def ratio(self) -> float:
        """Peak RSS growth during the load over the weight bytes: ~1 for a load that copies nothing twice."""
        return (self.rss_peak_mib - self.rss_before_mib) * 2**20 / self.weight_bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio}


def measure_load(directory: Path, weight_bytes: int, dtype: str) -> LoadMeasurement:
    out = subprocess.run([sys.executable, "-c", _PROBE, str(directory), dtype], capture_output=True, text=True,
                         check=True)
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    return LoadMeasurement(weight_bytes, doc["param_bytes"], doc["rss_before_kb"] / 1024,
                           doc["rss_loaded_kb"] / 1024, doc["rss_peak_kb"] / 1024, dtype)
