"""Modules that hold packed weights and multiply with the kernels, and the loader of ``--format packed`` folders."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from compress.kernels import ops
from compress.kernels.formats import Q4Dense, Q4Sparse24

LAYOUTS = {cls.__name__: cls for cls in (Q4Dense, Q4Sparse24)}
PRODUCTS = {Q4Dense: ops.q4_dense_mm, Q4Sparse24: ops.q4_sparse24_mm}


class PackedLinear(nn.Module):
    """``y = x Wᵀ + b`` with ``W`` in one of ``kernels.formats``' layouts (its tensors are buffers)."""

    def __init__(self, weight: Q4Dense | Q4Sparse24, bias: torch.Tensor | None = None):
        super().__init__()
        self.layout = type(weight)
        self.out_features, self.in_features = weight.shape
        self.group_size = weight.group_size
        self.parts = [p for p in ("data", "pos", "scale", "zero") if hasattr(weight, p)]
        for part in self.parts:
            self.register_buffer(f"packed_{part}", getattr(weight, part))
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @property
    def weight_packed(self) -> Q4Dense | Q4Sparse24:
        return self.layout(**{p: getattr(self, f"packed_{p}") for p in self.parts},
                           shape=(self.out_features, self.in_features), group_size=self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = PRODUCTS[self.layout](x, self.weight_packed).to(x.dtype)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.layout.__name__} g{self.group_size}"


def load_packed(folder: Path, packed: dict[str, dict], dtype: torch.dtype | None = None) -> nn.Module:
    """The causal LM of a ``--format packed`` folder: the module tree built on the meta device, each packed
    linear (``packed``: compression.json's table) replaced by a ``PackedLinear``, every other tensor read
    from the shards. The model never exists with dense copies of the packed weights."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from compress.checkpoint import Checkpoint, materialize
    from compress.models import _config_dtype

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or _config_dtype(config))
    model.tie_weights()
    checkpoint = Checkpoint(folder)
    names = checkpoint.names()
    used = set()
    for name, info in packed.items():
        layout = LAYOUTS[info["layout"]]
        keys = {p: f"{name}.packed_{p}" for p in ("data", "pos", "scale", "zero")}
        tensors = checkpoint.read([k for k in keys.values() if k in names])
        parts = {p: tensors.get(k) for p, k in keys.items() if p != "pos" or layout is Q4Sparse24}
        bias = checkpoint.read([f"{name}.bias"])[f"{name}.bias"] if f"{name}.bias" in names else None
        parent_name, _, leaf = name.rpartition(".")
        weight = layout(**parts, shape=tuple(info["shape"]), group_size=info["group_size"])
        setattr(model.get_submodule(parent_name), leaf, PackedLinear(weight, bias))
        used.update(tensors, {f"{name}.bias"})
    materialize(model, checkpoint.read(sorted(names - used)), strict=False)
    model.tie_weights()
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if missing:
        raise ValueError(f"{str(folder)!r} does not hold {missing[0]} (and {len(missing) - 1} more): not a complete packed folder")
    model.eval()
    model.config.use_cache = True
    return model


def read_packed_table(folder: Path) -> dict[str, dict] | None:
    """compression.json's ``packed`` table if ``folder`` was written with ``--format packed``."""
    path = Path(folder) / "compression.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("packed")
