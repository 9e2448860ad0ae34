"""Round to nearest: each weight to the nearest point of its group's grid, fitted on the (pruned) matrix."""

from __future__ import annotations

import torch

from compress.config import QuantConfig
from compress.quant.grid import QuantGrid


def quantize(W: torch.Tensor, stats, cfg: QuantConfig, *, keep: torch.Tensor | None = None,
             scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, QuantGrid]:
    """``W`` ``(out, in)`` on the grid fitted to it (a searched scale weighs the error by ``stats``' input mean
    squares), and the grid; ``keep`` is not needed (a pruned weight is 0, and 0 is on every grid)."""
    grid = QuantGrid.fit(W, cfg, scale_dtype, importance=stats.G.diagonal() if stats is not None else None)
    return grid.round(W), grid
