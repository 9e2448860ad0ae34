"""Activation thresholds calibrated inside the pipeline's block forward (``blocks.BlockCompressor``).

Per targeted linear of one block: |x| histograms per position band, fed from every ``hist_stride``-th token of
the linear's calibration inputs (of the gate activations ``act(gate)`` for a gated MLP's down projection under
a ``gated`` method such as CHESS, whose up projection's output is hooked for it), relative to each token's
RMS with ``--act-scale token``. Once the linear is compressed, its thresholds are set from them (the method's
``thresholds``) and a ``Sparsifier`` zeroes its inputs below them from then on, so later groups of the block
calibrate on inputs already sparsified upstream.
"""

from __future__ import annotations

import torch
from torch import nn

from compress import models
from compress.activations import methods
from compress.activations.histogram import AbsHistogram
from compress.activations.positions import band_slices
from compress.activations.thresholds import Sparsifier, UpOutput, gate_activation, token_rms
from compress.config import ActConfig


class ActivationCalibration:
    """The activation thresholds of one block's targeted linears (``names``, relative to the block)."""

    def __init__(self, block: nn.Module, block_name: str, names, act: ActConfig | None, hist_stride: int = 1,
                 edges: tuple[int, ...] = ()):
        self.block_name = block_name
        self.act = act
        self.hist_stride = hist_stride
        self.edges = edges  # position bands of the thresholds
        self.targets = {name: act.target_for(f"{block_name}.{name}") for name in names} if act else {}
        self.sparsifiers: dict[str, Sparsifier] = {}
        self.thresholds: dict[str, torch.Tensor] = {}  # by full linear name
        self.gate_space: dict[str, str] = {}  # gated: down projection -> its up projection (full names)
        self.up_outputs: dict[str, tuple[str, UpOutput]] = {}  # gated down projection -> (up name, hook)
        if act is not None and methods.get(act.method).gated:
            for name, target in self.targets.items():
                up = models.gated_up_projection(block, name) if target else None
                if up is not None:
                    self.up_outputs[name] = (up, UpOutput(collecting=True))

    def histograms(self, names: list[str], in_features: int) -> list[AbsHistogram] | None:
        """One histogram per position band for a group of linears reading one input, if any is targeted."""
        if not any(self.targets.get(n) for n in names):
            return None
        return [AbsHistogram(in_features) for _ in range(len(self.edges) + 1)]

    def feed(self, name: str, x: torch.Tensor, hists: list[AbsHistogram]) -> None:
        """Add linear ``name``'s input ``x`` to the histograms. Only the sampled tokens are transformed, and
        nothing outlives the call: the worker parks right after it, and a copy of its chunk kept alive there
        is a copy per parked chunk."""
        up = self.up_outputs[name][1].value if name in self.up_outputs else None
        for hist, band in zip(hists, band_slices(self.edges, x.shape[-2])):
            a = x[..., band, :].reshape(-1, x.shape[-1])[:: self.hist_stride]
            if up is not None:
                a = gate_activation(a, up[..., band, :].reshape(-1, up.shape[-1])[:: self.hist_stride])
            if self.act.scale == "token":
                a = a / token_rms(a)
            hist.update(a)

    def set_thresholds(self, name: str, hists: list[AbsHistogram], W_hat: torch.Tensor) -> None:
        """Linear ``name`` is compressed (``W_hat``, as it computes): its thresholds and sparsifier."""
        if not self.targets.get(name):
            return
        up_name, up = self.up_outputs.get(name, (None, None))
        method = methods.get(self.act.method)
        t = torch.stack([method.thresholds(hist, self.targets[name], W_hat, up.mean_abs if up else None)
                         for hist in hists])
        t = t[0] if len(t) == 1 else t
        full = f"{self.block_name}.{name}"
        self.sparsifiers[name] = Sparsifier(t, self.edges, up=up, token_scale=self.act.scale == "token")
        self.thresholds[full] = t
        if up is not None:
            up.collecting = False
            self.gate_space[full] = f"{self.block_name}.{up_name}"

    def hooks(self, block: nn.Module) -> list:
        """Forward hooks on the up projections whose outputs gated thresholds read."""
        return [block.get_submodule(up).register_forward_hook(hook) for up, hook in self.up_outputs.values()]

    def achieved(self, name: str) -> float | None:
        """The fraction of linear ``name``'s calibration inputs its sparsifier zeroed, if it has one."""
        sparsifier = self.sparsifiers.get(name)
        return sparsifier.sparsity if sparsifier else None
