"""Packed linears that read the same input, multiplied as one matrix: q|k|v and gate|up of a decoder block
make one kernel call each, so a llama-style block calls the kernels 4 times per token instead of 7 (on a small
model a call's fixed cost is as large as its arithmetic).

The members keep their own buffers, as views into the concatenated tiles (no second copy), and their own
modules (state dicts, ``info``, ``bench`` see them as before). The first member called with an input computes
every member's output; the others take their slice while the input is the same tensor, unchanged (for
inference-mode tensors, which count no versions, while it is the same tensor), and a member called twice on
one input recomputes.
"""

from __future__ import annotations

import torch
from torch import nn

from compress.kernels import ops
from compress.kernels.formats import PARTS, TILE, Q4Dense, Q4Sparse24
from compress.kernels.linear import PackedLinear

SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # names of linears that share an input


class SharedProduct:
    """One product for several members: ``product(x)`` is every member's ``x Wᵢᵀ`` side by side (fp32, no bias),
    ``output(x, i)`` member ``i``'s."""

    def __init__(self, members: list[PackedLinear]):
        weights = [m.weight_packed for m in members]
        layout = type(weights[0])
        parts = {p: None if getattr(weights[0], p) is None else torch.cat([getattr(w, p) for w in weights])
                 for p in PARTS if hasattr(weights[0], p)}  # the layout's tensors (zero: None when symmetric)
        out = sum(m.out_features for m in members)
        self.product = ops.quantized_product(layout(**parts, shape=(out, members[0].in_features),
                                                     group_size=members[0].group_size))
        self.bounds, start = [], 0
        for m in members:
            self.bounds.append((start, start + m.out_features))
            tiles = slice(start // TILE, (start + m.out_features) // TILE)
            for p, t in parts.items():  # the member's buffers become views of the shared tiles
                if t is not None:
                    setattr(m, f"packed_{p}", t[tiles])
            start += m.out_features
        self._x = self._y = None
        self._version, self._taken = -1, set()

    def output(self, x: torch.Tensor, i: int) -> torch.Tensor:
        version = -2 if x.is_inference() else x._version  # inference tensors track no version: identity alone
        if x is not self._x or version != self._version or i in self._taken:
            self._y = self.product(x)
            self._x, self._version, self._taken = x, version, set()
        y = self._y
        self._taken.add(i)
        if len(self._taken) == len(self.bounds):  # every member served: hold no activations between calls
            self._x = self._y = None
        lo, hi = self.bounds[i]
        return y[..., lo:hi]


def _fusable(members: list[PackedLinear]) -> bool:
    first = members[0]
    return (first.layout in (Q4Dense, Q4Sparse24)
            and all(m.layout is first.layout and m.in_features == first.in_features and m.group_size == first.group_size
                    and m.out_features % TILE == 0 and (m.packed_zero is None) == (first.packed_zero is None)
                    and not m._forward_pre_hooks and not m._forward_hooks for m in members))


def fuse_siblings(model: nn.Module) -> int:
    """Give each set of ``SIBLINGS`` packed linears of one parent module a ``SharedProduct``; returns how many
    sets were fused. Members of different layouts, group sizes or with hooks (activation sparsifiers) stay apart."""
    fused = 0
    for parent in model.modules():
        for names in SIBLINGS:
            members = [getattr(parent, n, None) for n in names]
            if all(isinstance(m, PackedLinear) for m in members) and _fusable(members):
                shared = SharedProduct(members)
                for i, m in enumerate(members):
                    m.share(shared, i)
                fused += 1
    return fused
