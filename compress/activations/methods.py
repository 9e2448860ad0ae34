"""Activation-threshold methods and their registry: ``--act-method`` is checked against ``METHODS``; adding a
method is a thresholds function and one line here.

A method turns the |x| histograms of one linear's calibration inputs into thresholds ``(in,)`` fp32, one per
input channel, such that the target fraction of inputs falls below them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from compress.activations.histogram import AbsHistogram


def teal(hist: AbsHistogram, sparsity: float, W: torch.Tensor, up_mean_abs: torch.Tensor | None = None) -> torch.Tensor:
    """One threshold ``T`` on |x| for every channel (Liu et al. 2024)."""
    return torch.full((hist.channels,), hist.threshold(sparsity), dtype=torch.float32)


def wina(hist: AbsHistogram, sparsity: float, W: torch.Tensor, up_mean_abs: torch.Tensor | None = None) -> torch.Tensor:
    """One threshold ``T`` on the weight-informed score ``|x_j|·‖W[:, j]‖₂`` (Chen et al. 2025), i.e.
    ``T / ‖W[:, j]‖₂`` on |x_j|; ``W`` ``(out, in)`` as the linear computes with it (after compression)."""
    norms = torch.linalg.vector_norm(W.float(), dim=0).cpu()  # (in,) column norms
    T = hist.threshold(sparsity, norms)
    return torch.where(norms > 0, T / norms.clamp_min(1e-30), torch.full_like(norms, torch.inf))


def chess(hist: AbsHistogram, sparsity: float, W: torch.Tensor, up_mean_abs: torch.Tensor | None = None) -> torch.Tensor:
    """On a gated MLP's down projection (``up_mean_abs``: ``E|up_j|``; ``hist`` of the gate activations), the
    importance of gate activation ``j`` is ``|act(gate)_j| · E|up_j|`` against one threshold ``T``, i.e.
    channel-wise ``T / E|up_j|`` (He et al. 2024, section 3); every other input one threshold, as TEAL."""
    if up_mean_abs is None:
        return teal(hist, sparsity, W)
    T = hist.threshold(sparsity, up_mean_abs)
    return torch.where(up_mean_abs > 0, T / up_mean_abs.clamp_min(1e-30), torch.full_like(up_mean_abs, torch.inf)).float()


@dataclass(frozen=True)
class ActMethod:
    """``gated``: it thresholds a gated MLP's down projection on the gate activations, reading the up
    projection's output (the pipeline hooks it)."""

    name: str
    thresholds: Callable[..., torch.Tensor]
    gated: bool
    summary: str


METHODS: dict[str, ActMethod] = {
    "teal": ActMethod("teal", teal, False, "|x| per linear"),
    "chess": ActMethod("chess", chess, True, "channel-wise on gate activations"),
    "wina": ActMethod("wina", wina, False, "|x_j|·‖W[:,j]‖"),
}


def get(name: str) -> ActMethod:
    """Raises ValueError naming the choices for an unknown method."""
    if name not in METHODS:
        raise ValueError(f"--act-method {name!r} is not one of {', '.join(METHODS)}")
    return METHODS[name]
