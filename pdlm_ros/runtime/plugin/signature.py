"""The declared signature of the one custom node, `pdlm::RegionAttention`, as data.

Every party that names the node reads it from here, so they cannot drift apart:
- the ONNX export writes the node (op type, domain, inputs, attributes) from it and registers a matching ONNX
  schema, so `onnx.checker` rejects a node that breaks it;
- the TensorRT plugin (`region_attention_qdp`) takes its name, namespace, parameter names and attribute types from it;
- the export sidecar (`export.json`) carries a copy, so a built engine can be checked against the graph it came from.

Contract (O(L): no mask tensor; the mask rule is the operator's meaning). Dims: N regions, H heads, S tokens per
region block, P prefix tokens, D head dim.
    q, k, v            (N, H, S, D)   region tokens after RoPE
    prefix_k, prefix_v (H, P, D)      the frame's cached prefix keys/values for this layer
    -> out             (N, H, S, D)   region n's queries attend to the prefix and to block n only
Attributes: num_heads = H, head_dim = D, scale = softmax scale (D ** -0.5). All tensors share one float dtype.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["TensorSpec", "AttrSpec", "PluginSignature", "REGION_ATTENTION"]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dims: tuple[str, ...]  # symbolic dims; equal names must be equal sizes


@dataclass(frozen=True)
class AttrSpec:
    name: str
    type: str  # "int" | "float": the ONNX attribute type and the TensorRT plugin field type (INT32 / FLOAT32)


@dataclass(frozen=True)
class PluginSignature:
    name: str  # ONNX op_type == TensorRT plugin name
    namespace: str  # ONNX domain == plugin namespace (also given as the `plugin_namespace` attribute)
    version: str  # ONNX `plugin_version` attribute == plugin version
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    attributes: tuple[AttrSpec, ...]  # plugin fields: what the kernel needs
    dtypes: tuple[str, ...]  # ONNX element types the node accepts (one type for all inputs and the output)
    # Routing attributes: read by TensorRT's ONNX parser to find the plugin, never passed to it as fields.
    # `aot` = 1 asks for the ahead-of-time (Triton PTX) implementation (TensorRT >= 10.9).
    routing: tuple[tuple[str, str | int], ...] = ()

    @property
    def qualified_name(self) -> str:
        """`namespace::name`, the id `tensorrt.plugin.register` takes."""
        return f"{self.namespace}::{self.name}"

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def attribute_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.attributes)

    def node_attributes(self, **values: int | float) -> dict[str, Any]:
        """All attributes of an ONNX node for given plugin-field values (routing attributes included).

        Raises ValueError naming missing or unexpected fields: a wrong node would only fail much later, inside the
        TensorRT parser.
        """
        missing = [a.name for a in self.attributes if a.name not in values]
        extra = sorted(set(values) - set(self.attribute_names))
        if missing or extra:
            raise ValueError(f"{self.qualified_name} attributes: missing {missing}, unexpected {extra}")
        out: dict[str, Any] = {}
        for a in self.attributes:
            out[a.name] = int(values[a.name]) if a.type == "int" else float(values[a.name])
        out.update(dict(self.routing))
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-shaped (lists, not tuples): equal to what a sidecar reads back."""
        return json.loads(json.dumps(asdict(self)))


_BLOCK = ("regions", "heads", "block", "head_dim")
_PREFIX = ("heads", "prefix", "head_dim")

REGION_ATTENTION = PluginSignature(
    name="RegionAttention",
    namespace="pdlm",
    version="1",
    inputs=(TensorSpec("q", _BLOCK), TensorSpec("k", _BLOCK), TensorSpec("v", _BLOCK),
            TensorSpec("prefix_k", _PREFIX), TensorSpec("prefix_v", _PREFIX)),
    outputs=(TensorSpec("out", _BLOCK),),
    attributes=(AttrSpec("num_heads", "int"), AttrSpec("head_dim", "int"), AttrSpec("scale", "float")),
    dtypes=("float", "float16", "bfloat16"),
    routing=(("plugin_namespace", "pdlm"), ("plugin_version", "1"), ("aot", 1)),
)
