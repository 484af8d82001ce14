"""PerceptionDLM model definition: one set of modules, several backends under it.

Parts, in the order data flows: `vision` (tiles, SigLIP, unshuffle, connector) -> `regions` (RoI replay, region
prompt) -> `decoder` (LLaDA, with `attention` for the structured region mask) -> `sampler` (masked diffusion).
`pdlm` composes them; `checkpoint` loads and saves them; `config` holds every shape.
"""

from pdlm_ros.model.config import PDLMConfig, preset
from pdlm_ros.model.pdlm import EncodedFrame, PerceptionDLM

__all__ = ["PDLMConfig", "preset", "PerceptionDLM", "EncodedFrame"]
