"""Global parameter names: the names checkpoints, initialisation and tests use.

A parameter's global name is its name in the single-process `VisionLanguageModel`,
whatever chunk, rank or expert-parallel shard holds it. Grouped expert weights
(`[E_local, out, in]`, model/grouped_experts.py) are the one exception to "name =
module path": they expand to one entry per expert, `...experts.<global id>.<proj>.weight`,
each a view into the grouped tensor, so a checkpoint saved with one EP size loads
into another and every expert is initialised from its own name. The same split applies
to anything shaped like the parameters (optimizer moments).
"""
from __future__ import annotations

import torch
from torch import nn

from model.grouped_experts import GroupedExperts


def expert_entry_names(module: nn.Module, prefix: str = "") -> dict[str, list[str]]:
    """{grouped parameter name: the global name of each of its experts, in order}."""
    out = {}
    for owner, sub in module.named_modules(prefix=prefix):
        if isinstance(sub, GroupedExperts):
            for leaf, _ in sub.named_parameters(recurse=False):
                out[f"{owner}.{leaf}"] = [f"{owner}.{e}.{leaf}.weight" for e in sub.experts]
    return out


def split_like_params(module: nn.Module, per_param: dict[str, torch.Tensor],
                      prefix: str = "") -> dict[str, torch.Tensor]:
    """{parameter name: tensor shaped like it} -> {global name: tensor or per-expert view}."""
    experts = expert_entry_names(module, prefix)
    out = {}
    for name, _ in module.named_parameters(prefix=prefix):
        if name in experts:
            out.update(zip(experts[name], per_param[name].unbind(0)))
        else:
            out[name] = per_param[name]
    return out


def global_named_tensors(module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every parameter (or per-expert view of one) by its global name, in module order."""
    return split_like_params(module, dict(module.named_parameters(prefix=prefix)), prefix)


def join_like_params(module: nn.Module, per_global: dict[str, torch.Tensor],
                     prefix: str = "") -> dict[str, torch.Tensor]:
    """The inverse of `split_like_params`: per-expert tensors stacked back into grouped ones."""
    experts = expert_entry_names(module, prefix)
    return {name: (torch.stack([per_global[e] for e in experts[name]]) if name in experts
                   else per_global[name])
            for name, _ in module.named_parameters(prefix=prefix)}
