"""Round to nearest: each weight to the nearest point of its group's grid, fitted on the (pruned) matrix."""

from __future__ import annotations

import torch

from compress.config import QuantConfig
from compress.quant.grid import QuantGrid


def quantize(W: torch.Tensor, stats, cfg: QuantConfig, *, keep: torch.Tensor | None = None,
             scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, QuantGrid]:
    """``W`` ``(out, in)`` on the grid fitted to it, and the grid; ``stats`` and ``keep`` are not needed (a
    pruned weight is 0, and 0 is on every grid)."""
    grid = QuantGrid.fit(W, cfg, scale_dtype)
    return grid.decode(grid.encode(W)), grid
