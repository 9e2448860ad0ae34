"""The affine integer grid of a weight matrix: ``w ≈ (q - z) · s`` with one ``(s, z)`` per group of a row.

Conventions (those of GPTQ and of the compressed-tensors format, so exports need no conversion):
- codes ``q`` are signed, in ``[-2^(b-1), 2^(b-1) - 1]``;
- symmetric: ``z = 0`` and ``s = max|w| / ((2^b - 1) / 2)``; the largest weight lands on the grid's edge;
- asymmetric: the range ``[min(w, 0), max(w, 0)]`` spans all ``2^b`` codes and ``z`` is an integer code,
  so 0 is always exactly representable: pruned weights stay exactly zero after quantization;
- a group is ``group_size`` consecutive input weights of one output row (per output channel when
  ``group_size`` is the whole row).

Scales are searched (``--quant-scale search``, the default) or min-max (``minmax``). The search minimizes
the importance-weighted rounding error ``sum_j e_j (w_j - q_j s)^2`` of each group, ``e_j = d_j ·
sqrt(sigma^2 + w_j^2)``: ``d_j`` the input channel's mean square (the Hessian's diagonal), ``sigma^2`` the
row's mean square weight (llama.cpp's importance-matrix quantizers weigh theirs so; it favours the large
weights a plain ``d_j`` would let rounding move). Symmetric grids use all ``2^b`` codes as llama.cpp's
``make_qx_quants`` does: each candidate puts the group's extreme weight at ``-c`` steps, ``c`` from
``2^(b-1) - 0.9`` to ``2^(b-1) + 0.9`` at 4 bits (a negative scale when the extreme is positive, so it lands
on or near the far code ``-2^(b-1)`` whatever its sign), rounds the group to those steps and keeps the codes
with their weighted least-squares scale ``sum_j e_j w_j q_j / sum_j e_j q_j^2``. The grid then decodes with
that scale but rounds new weights (RTN's, GPTQ's columns) at the candidate's steps (``round_scale``).
Asymmetric grids search the range's shrink and refit the scale by least squares. The min-max grid is a
candidate, so the searched grid never rounds a group worse by the weighted error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compress.config import QuantConfig

SEARCH_STEPS = 32  # asymmetric: shrinks of the min-max range from 1 to SEARCH_SHRINK
SEARCH_SHRINK = 0.7
SEARCH_STEPS_AROUND = 9  # symmetric: steps of 2^(b-1)/80 (0.1 of a code at 4 bits) either side of the signed
# edge, llama.cpp's candidates; searching further in (more clipping) lowers the weighted error but raised
# llama-perplexity on all three texts measured (benchmarks/RESULTS.md, issue 24)


@dataclass
class QuantGrid:
    """Scales and zero points of an ``(out, in)`` matrix.

    Attributes:
        scale: ``(out, in / group_size)`` fp32 holding values exact in the storage dtype.
        zero: ``(out, in / group_size)`` fp32 integer codes, or ``None`` when symmetric.
        round_scale: ``(out, in / group_size)`` fp32, the step at which new weights are rounded to codes
            (``round``, ``round_column``); ``None``: ``scale``. A searched symmetric grid decodes its codes with
            their least-squares scale, which differs slightly from the step that chose them.
    """

    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    group_size: int
    round_scale: torch.Tensor | None = None

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
            d = importance.float().cpu() if importance is not None else torch.ones(n_in)  # (in,)
            sigma2 = (Wg ** 2).mean(dim=(1, 2))[:, None, None]  # (out, 1, 1)
            e = d.reshape(n_in // group, group) * torch.sqrt(sigma2 + Wg ** 2)  # (out, groups, g)
            search = cls._search_signed if cfg.symmetric else cls._search
            grid = search(Wg, e, lo, hi, grid, cfg, scale_dtype)
        return grid

    @classmethod
    def _minmax(cls, lo: torch.Tensor, hi: torch.Tensor, cfg: QuantConfig, scale_dtype: torch.dtype, group: int,
                shrink: float = 1.0) -> "QuantGrid":
        """Grid whose range is ``[lo, hi]`` ``(out, groups)`` scaled by ``shrink``; symmetric: the largest
        magnitude on the grid's edge (``(2^b - 1) / 2`` codes)."""
        levels = (1 << cfg.bits) - 1
        if cfg.symmetric:
            amax = torch.maximum(-lo, hi)
            scale = amax * shrink / (levels / 2)
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
        """Asymmetric: per group, the shrunk min-max grid (or its least-squares refit) of least
        ``sum_j d_j (w_j - q_j s)^2``; ``best`` (min-max) wins ties. ``Wg``, ``d`` ``(out, groups, g)``."""
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
        for shrink in torch.linspace(1.0, SEARCH_SHRINK, SEARCH_STEPS).tolist():
            candidate = cls._minmax(lo, hi, cfg, scale_dtype, best.group_size, shrink)
            for grid in (candidate, refit(candidate)):
                err = error(grid)
                better = err < best_error
                best.scale = torch.where(better, grid.scale, best.scale)
                if best.zero is not None:
                    best.zero = torch.where(better, grid.zero, best.zero)
                best_error = torch.minimum(err, best_error)
        return best

    @classmethod
    def _search_signed(cls, Wg: torch.Tensor, e: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                       best: "QuantGrid", cfg: QuantConfig, scale_dtype: torch.dtype) -> "QuantGrid":
        """Symmetric: per group, the codes of the candidate steps (module docstring) with their least-squares
        scale, of least ``sum_j e_j (w_j - q_j s)^2``; ``best`` (min-max) wins ties. ``Wg``, ``e``
        ``(out, groups, g)``."""
        edge = float(1 << (cfg.bits - 1))  # code -2^(b-1): the signed range's far end
        extreme = Wg.gather(-1, Wg.abs().argmax(-1, keepdim=True)).squeeze(-1)  # (out, groups), signed
        extreme = torch.where(extreme != 0, extreme, torch.ones_like(extreme))  # all-zero group: codes 0 anyway

        def error(scale: torch.Tensor, q: torch.Tensor) -> torch.Tensor:  # (out, groups)
            return (e * (Wg - q * scale[..., None]) ** 2).sum(-1)

        best.round_scale = best.scale
        best_error = error(best.scale, torch.round(Wg / best.scale[..., None]).clamp(best.qmin, best.qmax))
        step = edge / 80  # 0.1 of a code at 4 bits
        for k in range(-SEARCH_STEPS_AROUND, SEARCH_STEPS_AROUND + 1):
            round_scale = -extreme / (edge + k * step)  # (out, groups): the extreme on code -(edge + k step)
            q = torch.round(Wg / round_scale[..., None]).clamp(best.qmin, best.qmax)  # (out, groups, g)
            num, den = (e * Wg * q).sum(-1), (e * q * q).sum(-1)
            scale = torch.where(den > 0, num / den.clamp(min=1e-30), round_scale).to(scale_dtype).float()
            scale = torch.where(scale != 0, scale, round_scale)
            err = error(scale, q)
            better = err < best_error
            best.scale = torch.where(better, scale, best.scale)
            best.round_scale = torch.where(better, round_scale, best.round_scale)
            best_error = torch.minimum(err, best_error)
        return best

    def _expand(self, t: torch.Tensor) -> torch.Tensor:
        return t.repeat_interleave(self.group_size, dim=1)  # (out, groups) -> (out, in)

    def encode(self, W: torch.Tensor) -> torch.Tensor:
        """Integer codes ``(out, in)`` int8 of weights already on the grid (``decode(encode(W)) == W``); new weights
        go through ``quantize``, which rounds them as the search chose."""
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

    def quantize(self, W: torch.Tensor) -> torch.Tensor:
        """Round to nearest: integer codes ``(out, in)`` int8 of new weights ``W``, rounded at ``round_scale``."""
        step = self._expand(self.scale if self.round_scale is None else self.round_scale)
        q = torch.round(W.float() / step)
        if self.zero is not None:
            q += self._expand(self.zero)
        return q.clamp_(self.qmin, self.qmax).to(torch.int8)

    def round(self, W: torch.Tensor) -> torch.Tensor:
        """Round to nearest: ``W`` quantized and decoded (fp32)."""
        return self.decode(self.quantize(W))

    def round_column(self, w: torch.Tensor, col: int) -> torch.Tensor:
        """Round one column ``w`` ``(out,)`` (input index ``col``) to the grid; for GPTQ's column loop."""
        g = col // self.group_size
        step = (self.scale if self.round_scale is None else self.round_scale)[:, g]
        z = self.zero[:, g] if self.zero is not None else 0.0
        return (torch.round(w / step) + z).clamp_(self.qmin, self.qmax).sub_(z).mul_(self.scale[:, g])
