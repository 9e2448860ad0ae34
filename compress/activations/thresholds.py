"""Thresholds from histograms (calibration) and the pre-hook that applies them (inference)."""

from __future__ import annotations

import torch
from torch import nn

from compress.activations.histogram import AbsHistogram

THRESHOLDS_FILE = "activation_thresholds.safetensors"


def thresholds(hist: AbsHistogram, method: str, sparsity: float, W: torch.Tensor, attention: bool) -> torch.Tensor:
    """Per-channel thresholds ``(in,)`` fp32 for one linear.

    Args:
        hist: |x| histograms of the linear's calibration inputs.
        method: ``teal``, ``chess`` or ``wina``.
        W: ``(out, in)`` the linear's weights as it computes with them (after any pruning/quantization).
        attention: whether the linear belongs to attention (CHESS treats attention inputs tensor-wise).
    """
    if method == "wina":
        norms = torch.linalg.vector_norm(W.float(), dim=0).cpu()  # (in,) column norms
        T = hist.threshold(sparsity, norms)
        return torch.where(norms > 0, T / norms.clamp_min(1e-30), torch.full_like(norms, torch.inf))
    if method == "chess" and not attention:
        return hist.channel_thresholds(sparsity)
    return torch.full((hist.channels,), hist.threshold(sparsity), dtype=torch.float32)


class Sparsifier:
    """Forward pre-hook: zero input channels below their thresholds; count what it zeroed.

    Args:
        t: ``(in,)`` thresholds.
        dense_prefill: leave multi-token forwards (prefill) dense, sparsify single-token decode steps only.
    """

    def __init__(self, t: torch.Tensor, dense_prefill: bool = False):
        self.t = t
        self.dense_prefill = dense_prefill
        self.zeros = 0
        self.total = 0

    def __call__(self, _module: nn.Module, args: tuple):
        x = args[0]
        if self.dense_prefill and x.dim() >= 2 and x.shape[-2] > 1:
            self.zeros += int((x == 0).sum())
            self.total += x.numel()
            return None
        if self.t.device != x.device or self.t.dtype != x.dtype:
            self.t = self.t.to(device=x.device, dtype=x.dtype)
        keep = x.abs() >= self.t
        self.zeros += x.numel() - int(keep.sum())
        self.total += x.numel()
        return (x * keep, *args[1:])

    @property
    def sparsity(self) -> float:
        """Fraction of inputs zeroed (or already zero) since creation."""
        return self.zeros / self.total if self.total else 0.0


def install(model: nn.Module, table: dict[str, torch.Tensor], prefill: str = "sparse") -> dict[str, Sparsifier]:
    """Attach a ``Sparsifier`` to every linear named in ``table``; returns them by name (for their counts)."""
    hooks = {}
    for name, t in table.items():
        module = model.get_submodule(name)
        hooks[name] = Sparsifier(t, dense_prefill=prefill == "dense")
        module.register_forward_pre_hook(hooks[name])
    return hooks
