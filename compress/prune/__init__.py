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
from compress.prune import magnitude, masks, sparsegpt, wanda


@dataclass
class InputStats:
    """Statistics of one linear's calibration inputs, shared by linears that read the same input (q/k/v).

    Attributes:
        G: ``(in, in)`` mean Gram matrix of the inputs, fp32 (over a token subsample for methods that
            need it only for the error report, see ``Method.needs_hessian``).
        sq: ``(in,)`` mean squared input per channel over all tokens (defaults to ``G``'s diagonal).
    """

    G: torch.Tensor
    sq: torch.Tensor | None = None
    _hinv: dict = field(default_factory=dict, repr=False)

    def hessian_inverse_factor(self, dampening: float) -> tuple[torch.Tensor, torch.Tensor]:
        """SparseGPT's ``(Hinv, dead)``, computed once per dampening and shared by every reader."""
        if dampening not in self._hinv:
            self._hinv[dampening] = sparsegpt.inverse_hessian_factor(self.G, dampening)
        return self._hinv[dampening]

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


def _scorer(score_fn, default_scope: str):
    def apply(W: torch.Tensor, stats: InputStats, cfg: PruneConfig) -> torch.Tensor:
        keep = masks.select(score_fn(W, stats.sq), cfg.pattern, cfg.scope or default_scope)
        return W * keep

    return apply


def _sparsegpt(W: torch.Tensor, stats: InputStats, cfg: PruneConfig) -> torch.Tensor:
    Hinv, dead = stats.hessian_inverse_factor(cfg.dampening)
    if cfg.scope == "row" and not cfg.pattern.is_nm:
        raise ValueError("sparsegpt compares weights per block of columns: use --scope block (its default)")
    return sparsegpt.solve(W, Hinv, cfg.pattern, cfg.blocksize, dead).W


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("magnitude", _scorer(magnitude.score, "matrix"), "matrix", "|W|, one ranking per matrix"),
        Method("wanda", _scorer(wanda.score, "row"), "row", "|W|·‖X_j‖₂, per output row (Sun et al. 2023)"),
        Method("sparsegpt", _sparsegpt, "block", "OBS with weight update, 128-column blocks (Frantar & Alistarh 2023)",
               needs_hessian=True),
    )
}


def get(name: str) -> Method:
    """Look a method up; raises ValueError naming the choices."""
    if name not in METHODS:
        raise ValueError(f"--method {name!r} is not one of {', '.join(METHODS)}")
    return METHODS[name]
