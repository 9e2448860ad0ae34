"""Thresholds from histograms (calibration) and the pre-hook that applies them (inference)."""

from __future__ import annotations

import threading

import torch
from torch import nn

from compress.activations.histogram import AbsHistogram
from compress.activations.positions import TokenPositions, band_of

THRESHOLDS_FILE = "activation_thresholds.safetensors"


class UpOutput:
    """Forward hook on a gated MLP's up projection: keeps its latest output per thread (the down projection's
    CHESS sparsifier needs it) and, while ``collecting``, the mean |output| per channel."""

    def __init__(self, collecting: bool = False):
        self._local = threading.local()
        self.collecting = collecting
        self.abs_sum: torch.Tensor | None = None
        self.tokens = 0

    def __call__(self, _module: nn.Module, _args: tuple, output: torch.Tensor) -> None:
        self._local.value = output
        if self.collecting:
            flat = output.detach().reshape(-1, output.shape[-1]).float()
            total = flat.abs().sum(0)
            self.abs_sum = total if self.abs_sum is None else self.abs_sum + total
            self.tokens += flat.shape[0]

    @property
    def value(self) -> torch.Tensor:
        return self._local.value

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / max(self.tokens, 1)).cpu()


def token_rms(x: torch.Tensor) -> torch.Tensor:
    """Root mean square of each token's vector ``(..., 1)``, in ``x``'s dtype: what ``--act-scale token``
    thresholds are relative to, taken on the vector they compare with (the linear's input; for CHESS on a
    gated MLP's down projection, the gate activations: the input's RMS there follows the up projection's
    outliers, which would move the gate thresholds of a whole token). An all-zero token gets a tiny positive
    scale, so nothing divides by zero."""
    return x.float().square().mean(-1, keepdim=True).sqrt().clamp_min(1e-30).to(x.dtype)


def gate_activation(x: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``act(gate)`` recovered from the down projection's input ``x = act(gate) * up`` (0 where ``up`` is)."""
    return torch.where(up != 0, x / torch.where(up != 0, up, torch.ones_like(up)), torch.zeros_like(x))


def thresholds(hist: AbsHistogram, method: str, sparsity: float, W: torch.Tensor,
               up_mean_abs: torch.Tensor | None = None) -> torch.Tensor:
    """Per-channel thresholds ``(in,)`` fp32 for one linear by ``method`` (``activations.methods``).

    Args:
        hist: |x| histograms of the linear's calibration inputs (for CHESS on a gated MLP's down projection,
            of the gate activations ``act(gate)`` instead).
        W: ``(out, in)`` the linear's weights as it computes with them (after any pruning/quantization).
        up_mean_abs: a gated MLP's down projection: ``E|up_j|`` per channel (CHESS's channel-wise thresholds).
    """
    from compress.activations import methods

    return methods.get(method).thresholds(hist, sparsity, W, up_mean_abs)


class Sparsifier:
    """Forward pre-hook: zero input channels below their thresholds; count what it zeroed.

    Args:
        t: ``(in,)`` thresholds, or ``(bands, in)``: one row per position band (``positions``).
        edges: the bands' first positions after band 0 (``len(edges) == bands - 1``).
        positions: where each token sits (``TokenPositions``); without it, the ``T`` tokens of an input are
            at positions ``0..T-1``.
        dense_prefill: leave multi-token forwards (prefill) dense, sparsify single-token decode steps only.
        up: for CHESS on a gated MLP's down projection, its up projection's output hook: ``t`` then applies
            to the gate activation ``x / up`` (``|x| >= t·|up|``).
        token_scale: ``t`` is relative to each token's RMS (``token_rms``): ``|x| >= t·rms(x)`` is kept (for
            CHESS, ``|x| >= t·|up|·rms(x / up)``).
    """

    def __init__(self, t: torch.Tensor, edges: tuple[int, ...] = (), positions: TokenPositions | None = None,
                 dense_prefill: bool = False, up: UpOutput | None = None, token_scale: bool = False):
        self.t = t if t.dim() == 2 else t[None]
        if self.t.shape[0] != len(edges) + 1:
            raise ValueError(f"{self.t.shape[0]} threshold rows for {len(edges) + 1} position bands")
        self.edges = torch.tensor(edges, dtype=torch.long)
        self.positions = positions or TokenPositions()
        self.dense_prefill = dense_prefill
        self.up = up
        self.token_scale = token_scale
        # counted in tensors, so a call neither waits for its count nor changes a Python number that
        # torch.compile would have to recompile for
        self.zeros = torch.zeros((), dtype=torch.int64)
        self.total = torch.zeros((), dtype=torch.int64)

    def __call__(self, _module: nn.Module, args: tuple):
        x = args[0]
        if self.dense_prefill and x.dim() >= 2 and x.shape[-2] > 1:
            self._count(x)
            return None
        if self.t.device != x.device or self.t.dtype != x.dtype:  # once: then every call finds them there
            self.t = self.t.to(device=x.device, dtype=x.dtype)
            self.edges = self.edges.to(x.device)
        bound = self.t[0] if len(self.edges) == 0 else self.t[band_of(self.edges, self.positions.of(x))]
        x = self.zero_below(x, bound, self.up.value if self.up is not None else None)
        self._count(x)
        return (x, *args[1:])

    def zero_below(self, x: torch.Tensor, bound: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` with the channels under ``bound`` (a row of ``t``) zeroed; ``up``: the up projection's output,
        for CHESS's thresholds on gate activations. Pure: ``decode.LeanDecoder`` traces it into its step."""
        if up is not None:
            bound = bound * up.abs()
        if self.token_scale:
            bound = bound * token_rms(x if up is None else gate_activation(x, up))
        return x * (x.abs() >= bound)

    def _count(self, x: torch.Tensor) -> None:
        zeros = (x == 0).sum()
        self.zeros = self.zeros + zeros
        self.total = self.total + torch.full_like(zeros, x.numel())

    @property
    def sparsity(self) -> float:
        """Fraction of inputs zeroed (or already zero) since creation."""
        total = int(self.total)
        return int(self.zeros) / total if total else 0.0


def install(model: nn.Module, table: dict[str, torch.Tensor], prefill: str = "sparse",
            gate_space: dict[str, str] | None = None, edges: tuple[int, ...] = (),
            token_scale: bool = False) -> dict[str, Sparsifier]:
    """Attach a ``Sparsifier`` to every linear named in ``table``; returns them by name (for their counts).

    Args:
        table: linear name -> ``(in,)`` thresholds, or ``(bands, in)`` for the position bands ``edges``.
        gate_space: down projection name -> its up projection's, for thresholds on gate activations (CHESS).
        token_scale: the thresholds are relative to each token's input RMS (``--act-scale token``).
    """
    positions = TokenPositions()
    if edges:
        positions.attach(model)
    hooks = {}
    for name, t in table.items():
        up = None
        if gate_space and name in gate_space:
            up = UpOutput()
            model.get_submodule(gate_space[name]).register_forward_hook(up)
        hooks[name] = Sparsifier(t, edges, positions, dense_prefill=prefill == "dense", up=up, token_scale=token_scale)
        model.get_submodule(name).register_forward_pre_hook(hooks[name])
    return hooks
