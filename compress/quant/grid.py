"""The affine integer grid of a weight matrix: ``w ≈ (q - z) · s`` with one ``(s, z)`` per group of a row.

Conventions (those of GPTQ and of the compressed-tensors format, so exports need no conversion):
- codes ``q`` are signed, in ``[-2^(b-1), 2^(b-1) - 1]``;
- symmetric: ``z = 0`` and ``s = max|w| / ((2^b - 1) / 2)``; the largest weight lands on the grid's edge;
- asymmetric: the range ``[min(w, 0), max(w, 0)]`` spans all ``2^b`` codes and ``z`` is an integer code,
  so 0 is always exactly representable: pruned weights stay exactly zero after quantization;
- a group is ``group_size`` consecutive input weights of one output row (per output channel when
  ``group_size`` is the whole row).

Scales are searched (``--quant-scale search``, the default) or min-max (``minmax``): each group takes, of the
min-max scale, ``SEARCH_STEPS`` candidates from the full signed range (the largest magnitude on code
``-2^(b-1)`` when it is negative) down to ``SEARCH_SHRINK`` of it, and for each candidate the least-squares
scale of the codes it rounds to (``sum_j d_j w_j q_j / sum_j d_j q_j^2``, as llama.cpp's quantizers refit
theirs), the one with the least importance-weighted rounding error ``sum_j d_j (w_j - q_j s)^2``, ``d_j`` the
input channel's mean square (the Hessian's diagonal). Every scale is judged by nearest rounding, as it will be
used, and the min-max scale is a candidate, so the searched grid never rounds the group worse by that measure.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compress.config import QuantConfig

SEARCH_STEPS = 32
SEARCH_SHRINK = 0.7


@dataclass
class QuantGrid:
    """Scales and zero points of an ``(out, in)`` matrix.

    Attributes:
        scale: ``(out, in / group_size)`` fp32 holding values exact in the storage dtype.
        zero: ``(out, in / group_size)`` fp32 integer codes, or ``None`` when symmetric.
    """

    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    group_size: int

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    @classmethod
    def fit(cls, W: torch.Tensor, cfg: QuantConfig, scale_dtype: torch.dtype = torch.float32,
            importance: torch.Tensor | None = None) -> "QuantGrid":
        """The grid of ``W`` ``(out, in)`` (min-max, or searched with ``cfg.scale == "search"`` against
        ``importance`` ``(in,)``, the inputs' mean squares; uniform without it); scales rounded to
        ``scale_dtype`` (the model's) so that the dequantized weights are exactly what a loader computes from
        the stored scales.

        Raises:
            ValueError: ``in`` is not divisible by the group size.
        """
        n_out, n_in = W.shape
        group = cfg.group_size or n_in
        if n_in % group:
            raise ValueError(f"--quant group size {group} does not divide in_features {n_in}")
        Wg = W.detach().float().reshape(n_out, n_in // group, group)  # (out, groups, g)
        lo = Wg.amin(dim=-1).clamp(max=0)  # (out, groups)
        hi = Wg.amax(dim=-1).clamp(min=0)
        grid = cls._minmax(lo, hi, cfg, scale_dtype, group)
        if cfg.scale == "search":
            d = (importance.float().cpu() if importance is not None else torch.ones(n_in)).reshape(n_in // group, group)
            grid = cls._search(Wg, d, lo, hi, grid, cfg, scale_dtype)
        return grid

    @classmethod
    def _minmax(cls, lo: torch.Tensor, hi: torch.Tensor, cfg: QuantConfig, scale_dtype: torch.dtype, group: int,
                shrink: float = 1.0, signed_max: torch.Tensor | None = None) -> "QuantGrid":
        """Grid whose range is ``[lo, hi]`` ``(out, groups)`` scaled by ``shrink``; symmetric: the largest
        magnitude on the grid's edge (``(2^b - 1) / 2`` codes), or on code ``-2^(b-1)`` (``signed_max``)."""
        levels = (1 << cfg.bits) - 1
        if cfg.symmetric:
            amax = torch.maximum(-lo, hi)
            scale = amax * shrink / (levels / 2 if signed_max is None else signed_max)
        else:
            scale = (hi - lo) * shrink / levels
        scale = scale.to(scale_dtype).float()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero group: any scale codes it as 0
        grid = cls(scale=scale, zero=None, bits=cfg.bits, group_size=group)
        if not cfg.symmetric:
            grid.zero = (grid.qmin - torch.round(lo * shrink / scale)).clamp(grid.qmin, grid.qmax)
        return grid

    @classmethod
    def _search(cls, Wg: torch.Tensor, d: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, best: "QuantGrid",
                cfg: QuantConfig, scale_dtype: torch.dtype) -> "QuantGrid":
        """Per group, the candidate grid (or its least-squares refit) of least ``sum_j d_j (w_j - q_j s)^2``
        (module docstring); ``best`` (min-max) wins ties. ``Wg`` ``(out, groups, g)``, ``d`` ``(groups, g)``."""
        def error(grid: "QuantGrid") -> torch.Tensor:  # (out, groups)
            s = grid.scale[..., None]
            z = grid.zero[..., None] if grid.zero is not None else 0.0
            q = (torch.round(Wg / s) + z).clamp(grid.qmin, grid.qmax)
            return (((q - z) * s - Wg) ** 2 * d).sum(-1)

        def refit(grid: "QuantGrid") -> "QuantGrid":  # the least-squares scale of the codes ``grid`` rounds to
            s = grid.scale[..., None]
            z = grid.zero[..., None] if grid.zero is not None else 0.0
            q = (torch.round(Wg / s) + z).clamp(grid.qmin, grid.qmax) - z  # (out, groups, g)
            num, den = (d * Wg * q).sum(-1), (d * q * q).sum(-1)
            scale = torch.where(den > 0, num / den.clamp(min=1e-30), grid.scale).to(scale_dtype).float()
            return cls(scale=torch.where(scale > 0, scale, grid.scale), zero=grid.zero, bits=grid.bits,
                       group_size=grid.group_size)

        best_error = error(best)
        edge = float(1 << (cfg.bits - 1))  # |code -2^(b-1)|: the signed range's far end
        for shrink in torch.linspace(1.0, SEARCH_SHRINK, SEARCH_STEPS).tolist():
            candidate = cls._minmax(lo, hi, cfg, scale_dtype, best.group_size, shrink,
                                    signed_max=edge if cfg.symmetric else None)
            for grid in (candidate, refit(candidate)):
                err = error(grid)
                better = err < best_error
                best.scale = torch.where(better, grid.scale, best.scale)
                if best.zero is not None:
                    best.zero = torch.where(better, grid.zero, best.zero)
                best_error = torch.minimum(err, best_error)
        return best

    def _expand(self, t: torch.Tensor) -> torch.Tensor:
        return t.repeat_interleave(self.group_size, dim=1)  # (out, groups) -> (out, in)

    def encode(self, W: torch.Tensor) -> torch.Tensor:
        """Integer codes ``(out, in)`` int8 of the nearest grid points."""
        q = torch.round(W.float() / self._expand(self.scale))
        if self.zero is not None:
            q += self._expand(self.zero)
        return q.clamp_(self.qmin, self.qmax).to(torch.int8)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """fp32 weights ``(out, in)`` of integer ``codes``."""
        q = codes.float()
        if self.zero is not None:
            q -= self._expand(self.zero)
        return q * self._expand(self.scale)

    def round(self, W: torch.Tensor) -> torch.Tensor:
        """Round-to-nearest: ``W`` moved to its nearest grid points, fp32."""
        return self.decode(self.encode(W))

    def round_column(self, w: torch.Tensor, col: int) -> torch.Tensor:
        """Round one column ``w`` ``(out,)`` (input index ``col``) to the grid; for GPTQ's column loop."""
        g = col // self.group_size
        s = self.scale[:, g]
        z = self.zero[:, g] if self.zero is not None else 0.0
        return (torch.round(w / s) + z).clamp_(self.qmin, self.qmax).sub_(z).mul_(s)
