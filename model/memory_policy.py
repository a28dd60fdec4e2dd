"""Which saved activations are recomputed, stored in FP8-E4M3 or offloaded: per layer type.

The model's forward is cut into named regions (model/saved_tensors.py runs them). A
policy names regions as `<layer type>.<region>`; every tensor autograd saves inside a
region gets the region's treatment:

    layer type  region      what it holds                               recomputable
    dense, moe  attn_norm   attn_norm + q_down + kv_down (the norm's    yes
                            readers, so its output is not kept by them)
                q_up        q_norm + q_up (MLA's query up-projection)   yes
                kv_up       kv_norm + kv_up (key/value up-projection)   yes
                attention   rotary, q/k assembly, attention core        no
                o_proj      the output projection                       no
                ffn_norm    ffn_norm (+ the router's scores in MoE)     yes
                other       whatever else the layer saves (residuals)   no
    dense       ffn         the SwiGLU FFN                              yes
    moe         router      top-k weights (the choice is never          no
                            recomputed: it happens outside any region)
                dispatch    sort by expert, the all-to-all's bookkeeping  no (collectives)
                experts     the grouped SwiGLU experts                  yes
                shared      the shared expert (SwiGLU)                  yes
                combine     weighting and scatter-add back to tokens    no
    vision      attn_norm   LayerNorm + qkv                             yes
                attention   2D RoPE + attention + out                   no
                mlp         LayerNorm + up + GELU + down                yes
                other       residuals                                   no
    head        loss        final norm + fused head/cross-entropy       yes
                            (recomputed, its fp32 head-weight gradient
                            is not kept from forward to backward)

A recomputed region keeps only its inputs (which may themselves be FP8 or offloaded, by
the region's name) and runs again in the backward; no region holds a collective, so an
all-to-all is never recomputed (parallel/expert_dispatch.py refuses to run inside one).
FP8 applies to floating tensors only; parameters are never touched by any treatment.

Presets:
    none    store everything (today's behaviour; the hooks still account the bytes)
    report  the K2.5 report's recipe (Appendix C): recompute the norms, SwiGLU (dense FFN,
            experts, shared expert) and MLA's up-projections; FP8 for the inputs of the
            expert and shared-expert linear layers (what their recomputation keeps);
            offload attention's saved tensors, o_proj's input and the MoE combine's rows
            (what is left and large, on every layer by default); our addition: the head's
            fused loss is recomputed (drops a head-weight-sized fp32 gradient per microbatch)
    custom  the lists given in the config
"""
from __future__ import annotations

from dataclasses import dataclass

from model.fp8 import SCALINGS

LAYER_TYPES = ("dense", "moe", "vision", "head")
_ATTENTION = {"attn_norm": True, "q_up": True, "kv_up": True, "attention": False,
              "o_proj": False, "ffn_norm": True, "other": False}
# region -> recomputable, per layer type
REGIONS: dict[str, dict[str, bool]] = {
    "dense": {**_ATTENTION, "ffn": True},
    "moe": {**_ATTENTION, "router": False, "dispatch": False, "experts": True, "shared": True,
            "combine": False},
    "vision": {"attn_norm": True, "attention": False, "mlp": True, "other": False},
    "head": {"loss": True},
}
PRESETS = ("none", "report", "custom")


def _names(layer_types, regions) -> frozenset[str]:
    return frozenset(f"{t}.{r}" for t in layer_types for r in regions)


REPORT_RECOMPUTE = (_names(("dense", "moe"), ("attn_norm", "q_up", "kv_up", "ffn_norm"))
                    | {"dense.ffn", "moe.experts", "moe.shared", "vision.attn_norm",
                       "vision.mlp", "head.loss"})
REPORT_FP8 = frozenset({"moe.experts", "moe.shared"})
REPORT_OFFLOAD = _names(("dense", "moe"), ("attention", "o_proj")) | {"moe.combine"}


class MemoryPolicyError(ValueError):
    pass


@dataclass(frozen=True)
class MemoryPolicy:
    """Region names (`<layer type>.<region>`) per treatment. `offload_layers`: the decoder
    layers (global indices) whose offload regions are offloaded; empty: every layer (vision
    blocks and the head follow the region names alone). `fp8_scaling`: one scale per row
    (last dimension; the default: tiny's 100-step report run ends 0.3% from store-all's
    loss with it, 3.5% with one scale per tensor at 4 x 64 tokens) or per tensor."""

    recompute: frozenset[str] = frozenset()
    fp8: frozenset[str] = frozenset()
    offload: frozenset[str] = frozenset()
    offload_layers: tuple[int, ...] = ()
    fp8_scaling: str = "row"
    name: str = "custom"

    def __post_init__(self) -> None:
        for kind, names in (("recompute", self.recompute), ("fp8", self.fp8),
                            ("offload", self.offload)):
            for name in sorted(names):
                layer_type, _, region = name.partition(".")
                if layer_type not in REGIONS or region not in REGIONS[layer_type]:
                    raise MemoryPolicyError(
                        f"memory.{kind}: unknown region {name!r}; regions are "
                        f"{', '.join(sorted(all_regions()))}")
                if kind == "recompute" and not REGIONS[layer_type][region]:
                    raise MemoryPolicyError(
                        f"memory.recompute: {name!r} cannot be recomputed (it holds "
                        "communication or a routing decision, or keeps nothing worth it); "
                        f"recomputable: {', '.join(sorted(recomputable()))}")
        if self.fp8_scaling not in SCALINGS:
            raise MemoryPolicyError(f"memory.fp8_scaling={self.fp8_scaling!r}: one of {SCALINGS}")
        if any(i < 0 for i in self.offload_layers):
            raise MemoryPolicyError(f"memory.offload_layers={list(self.offload_layers)}: "
                                    "layer indices are >= 0")

    @classmethod
    def preset(cls, name: str, **custom) -> "MemoryPolicy":
        """`none`, `report`, or `custom` with `recompute`/`fp8`/`offload` lists."""
        if name not in PRESETS:
            raise MemoryPolicyError(f"memory.policy={name!r}: one of {', '.join(PRESETS)}")
        lists = {k: frozenset(v) for k, v in custom.items()
                 if k in ("recompute", "fp8", "offload") and v}
        if name != "custom" and lists:
            raise MemoryPolicyError(
                f"memory.{', memory.'.join(sorted(lists))} given with memory.policy={name}: "
                "set memory.policy=custom to choose the regions yourself")
        rest = {k: v for k, v in custom.items() if k not in ("recompute", "fp8", "offload")}
        if name == "report":
            return cls(REPORT_RECOMPUTE, REPORT_FP8, REPORT_OFFLOAD, name=name, **rest)
        return cls(**lists, name=name, **rest)

    def treatment(self, layer_type: str, region: str, layer: int | None = None
                  ) -> tuple[bool, bool, bool]:
        """(recompute, fp8, offload) of one region of one layer."""
        name = f"{layer_type}.{region}"
        offload = name in self.offload and (
            layer is None or not self.offload_layers or layer in self.offload_layers)
        return name in self.recompute, name in self.fp8, offload

    @property
    def stores_all(self) -> bool:
        return not (self.recompute or self.fp8 or self.offload)


def all_regions() -> frozenset[str]:
    return frozenset(f"{t}.{r}" for t, regions in REGIONS.items() for r in regions)


def recomputable() -> frozenset[str]:
    return frozenset(f"{t}.{r}" for t, regions in REGIONS.items()
                     for r, ok in regions.items() if ok)


def report_tools() -> dict[str, MemoryPolicy]:
    """`none`, each tool of the `report` preset alone (its recompute, FP8 and offload
    lists), and `report`: the variants the planner and benchmarks/memory.py compare."""
    return {"none": MemoryPolicy.preset("none"),
            "recompute": MemoryPolicy(recompute=REPORT_RECOMPUTE, name="recompute"),
            "fp8": MemoryPolicy(fp8=REPORT_FP8, name="fp8"),
            "offload": MemoryPolicy(offload=REPORT_OFFLOAD, name="offload"),
            "report": MemoryPolicy.preset("report")}
