"""Modules that hold packed weights and multiply with the kernels."""

from __future__ import annotations

import torch
from torch import nn

from compress.kernels import ops
from compress.kernels.formats import PARTS, Q4Dense, Q4InputMajor, Q4Sparse24

LAYOUTS = {cls.__name__: cls for cls in (Q4Dense, Q4Sparse24, Q4InputMajor)}


class PackedLinear(nn.Module):
    """``y = x Wᵀ + b`` with ``W`` in one of ``kernels.formats``' layouts (its tensors are buffers)."""

    def __init__(self, weight: Q4Dense | Q4Sparse24 | Q4InputMajor, bias: torch.Tensor | None = None):
        super().__init__()
        self.layout = type(weight)
        self.out_features, self.in_features = weight.shape
        self.group_size = weight.group_size
        self.parts = [p for p in PARTS if hasattr(weight, p)]
        for part in self.parts:
            self.register_buffer(f"packed_{part}", getattr(weight, part))
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self._product = None  # ops.quantized_product of the buffers, bound on first use
        self._shared = None  # (fused.SharedProduct, index): one product with the siblings reading the same input

    def share(self, shared, index: int) -> None:
        self._shared = (shared, index)
        self._product = ops.quantized_product(self.weight_packed)  # compiled graphs call it (bound outside them)

    def _apply(self, fn, recurse=True):
        self._product = self._shared = None  # the buffers move or change: bind again, alone
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._product = self._shared = None
        return super()._load_from_state_dict(*args, **kwargs)

    @property
    def product(self):
        """``x -> x Wᵀ`` (fp32, no bias) on this layer's own weights: ``ops.quantized_product``, bound once."""
        if self._product is None:
            self._product = ops.quantized_product(self.weight_packed)
        return self._product

    @property
    def shared(self):
        """The ``fused.SharedProduct`` this layer is a member of, or None."""
        return self._shared[0] if self._shared is not None else None

    @property
    def weight_packed(self) -> Q4Dense | Q4Sparse24 | Q4InputMajor:
        return self.layout(**{p: getattr(self, f"packed_{p}") for p in self.parts},
                           shape=(self.out_features, self.in_features), group_size=self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._shared is not None and not torch.compiler.is_compiling():  # compiled graphs take one product each
            y = self._shared[0].output(x, self._shared[1])
        else:
            y = self.product(x)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.layout.__name__} g{self.group_size}"


class PackedEmbedding(nn.Module):
    """The input embedding of a model whose tied lm_head is a ``PackedLinear`` (``Q4Dense``): looked-up rows are
    dequantized from the lm_head's packed weights, so the two stay one tensor."""

    def __init__(self, head: PackedLinear, dtype: torch.dtype = torch.float32):
        super().__init__()
        self._head = (head,)  # not a submodule: the weights belong to lm_head
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self.dtype = dtype

    @property
    def head(self) -> PackedLinear:
        return self._head[0]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.head.weight_packed.rows(ids.reshape(-1))
        return rows.reshape(*ids.shape, self.embedding_dim).to(self.dtype)
