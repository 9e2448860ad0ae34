"""Pruning methods and their registry. The CLI's ``--method`` choices come from ``METHODS``.

A method maps ``(W, stats, cfg) -> W_hat``: plain tensors in, plain tensors out, no modules or devices.
Scorers (magnitude, Wanda) rank weights and share ``masks.select``; solvers (SparseGPT) also update the
weights they keep.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from compress.config import PruneConfig
from compress.pruning import magnitude, masks, sparsegpt, wanda


@dataclass
class HessianFactor:
    """SparseGPT's/GPTQ's inverse-Hessian factor, possibly with columns permuted (act-order).

    Attributes:
        Hinv: ``(in, in)`` upper Cholesky factor of the dampened inverse of ``H[perm][:, perm]``.
        dead: ``(in,)`` bool in the permuted order, inputs that never fire.
        dead_original: the same in the original column order.
        perm: the column order, or ``None`` for the natural one.
    """

    Hinv: torch.Tensor
    dead: torch.Tensor
    dead_original: torch.Tensor
    perm: torch.Tensor | None = None


@dataclass
class InputStats:
    """Statistics of one linear's calibration inputs, shared by linears that read the same input (q/k/v).

    Attributes:
        G: ``(in, in)`` mean Gram matrix of the inputs, fp32 (over a token subsample for methods that
            need it only for the error report, see ``Method.needs_hessian``).
        sq: ``(in,)`` mean squared input per channel over all tokens (defaults to ``G``'s diagonal).
        mean: ``(in,)`` mean input per channel, when a refinement needs it (DSnoT).
    """

    G: torch.Tensor
    sq: torch.Tensor | None = None
    mean: torch.Tensor | None = None
    _hinv: dict = field(default_factory=dict, repr=False)

    def hessian_inverse_factor(self, dampening: float, perm: torch.Tensor | None = None,
                               shrink: float = 0.0) -> HessianFactor:
        """The factor for ``dampening``, column order ``perm`` and off-diagonal ``shrink``, computed once and
        shared by every reader of this input (q/k/v, gate/up)."""
        key = (dampening, None if perm is None else tuple(perm.tolist()), shrink)
        if key not in self._hinv:
            G = self.G if perm is None else self.G[perm][:, perm]
            Hinv, dead = sparsegpt.inverse_hessian_factor(G, dampening, shrink=shrink)
            dead_original = dead if perm is None else dead[torch.argsort(perm)]
            self._hinv[key] = HessianFactor(Hinv, dead, dead_original, perm)
        return self._hinv[key]

    def __post_init__(self):
        if self.sq is None:
            self.sq = self.G.diagonal()


@dataclass(frozen=True)
class Method:
    name: str
    apply: Callable[[torch.Tensor, InputStats, PruneConfig], torch.Tensor]
    default_scope: str
    summary: str
    needs_hessian: bool = False  # False: the Gram matrix only measures the error, a token subsample will do
    uses_norms: bool = False  # reads the inputs' mean squares (InputStats.sq)
    updates_weights: bool = False  # the kept weights leave their dense values (DSnoT then fits revived ones)


def _scorer(score_fn, default_scope: str):
    def apply(W: torch.Tensor, stats: InputStats, cfg: PruneConfig) -> torch.Tensor:
        keep = masks.select(score_fn(W, stats.sq), cfg.pattern, cfg.scope or default_scope)
        return W * keep

    return apply


def _sparsegpt(W: torch.Tensor, stats: InputStats, cfg: PruneConfig) -> torch.Tensor:
    factor = stats.hessian_inverse_factor(cfg.dampening)
    if cfg.scope == "row" and not cfg.pattern.is_nm:
        raise ValueError("sparsegpt compares weights per block of columns: use --scope block (its default)")
    return sparsegpt.solve(W, factor.Hinv, cfg.pattern, cfg.blocksize, factor.dead).W


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("magnitude", _scorer(magnitude.score, "matrix"), "matrix", "|W|, one ranking per matrix"),
        Method("wanda", _scorer(wanda.score, "row"), "row", "|W|·‖X_j‖₂, per output row (Sun et al. 2023)",
               uses_norms=True),
        Method("sparsegpt", _sparsegpt, "block", "OBS with weight update, 128-column blocks (Frantar & Alistarh 2023)",
               needs_hessian=True, updates_weights=True),
    )
}


def get(name: str) -> Method:
    """Look a method up; raises ValueError naming the choices."""
    if name not in METHODS:
        raise ValueError(f"--method {name!r} is not one of {', '.join(METHODS)}")
    return METHODS[name]
