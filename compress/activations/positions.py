"""Position bands: activation thresholds that depend on where a token sits in its sequence.

A linear's input distribution is not the same at every position. On SmolLM2-135M the attention outputs
(o_proj's inputs) of the first tokens are small, and they grow over the first few hundred positions
before they settle. One threshold per linear,
calibrated on 512-token windows, then zeroes 78% of block 20's o_proj inputs at positions 0-15 and 42% past
position 384: 49% on average at 512 tokens, 46% at 1024, because the longer window has fewer early tokens.

So each linear gets one threshold set per position band, calibrated on the tokens at those positions of the
calibration windows (which start at position 0): the target sparsity then holds at every position, and at
any serving length. Band edges grow by 4x from 64 (``auto``: 64, 256, 1024, ... up to half the calibration
length, so the last band is calibrated on at least half of each window); positions past the calibration
length use the last band, whose distribution has settled by then. ``off`` is TEAL's static thresholds.

At inference a ``TokenPositions`` hook on the model reads each forward's positions (``position_ids``,
else ``cache_position``, else the cache's length) so that single-token decode steps use their own band.
"""

from __future__ import annotations

import threading

import torch
from torch import nn

AUTO_FIRST_EDGE = 64
AUTO_GROWTH = 4


def band_edges(spec: str, seqlen: int) -> tuple[int, ...]:
    """The band edges ``spec`` names for calibration windows of ``seqlen`` tokens.

    Args:
        spec: ``auto``, ``off``, or increasing positions separated by commas (``64,256``): band ``b`` holds
            positions ``edges[b-1] <= p < edges[b]``.
    """
    spec = spec.strip().lower()
    if spec == "off":
        return ()
    if spec == "auto":
        edges, edge = [], AUTO_FIRST_EDGE
        while edge <= seqlen // 2:
            edges.append(edge)
            edge *= AUTO_GROWTH
        return tuple(edges)
    try:
        edges = tuple(int(part) for part in spec.split(","))
    except ValueError:
        raise ValueError(f"--act-positions {spec!r} is not auto, off or increasing positions like 64,256") from None
    if any(e <= 0 for e in edges) or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"--act-positions {spec!r} must be increasing positive positions, like 64,256")
    if edges[-1] >= seqlen:
        raise ValueError(f"--act-positions {spec!r}: the last band starts at {edges[-1]}, past the {seqlen}-token "
                         f"calibration windows: use edges below {seqlen} or a longer --seqlen")
    return edges


def band_slices(edges: tuple[int, ...], length: int) -> list[slice]:
    """Per band, the positions of ``0..length-1`` it holds (windows that start at position 0)."""
    return [slice(min(a, length), min(b, length)) for a, b in zip((0, *edges), (*edges, length))]


class TokenPositions:
    """Model forward pre-hook that records the positions of the tokens the forward is about; linears'
    sparsifiers read them (``of``) to pick their band. Without a recorded forward, a linear's input of
    ``T`` tokens is taken to sit at positions ``0..T-1`` (calibration windows, a block run on its own)."""

    def __init__(self):
        self._local = threading.local()

    def attach(self, model: nn.Module) -> None:
        model.register_forward_pre_hook(self._enter, with_kwargs=True)
        model.register_forward_hook(self._leave, always_call=True)

    def _enter(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        length = ids.shape[-1] if ids is not None else embeds.shape[-2] if embeds is not None else None
        if kwargs.get("position_ids") is not None:
            self._local.positions = kwargs["position_ids"]
        elif kwargs.get("cache_position") is not None:
            self._local.positions = kwargs["cache_position"]
        elif length is not None:
            start = _cache_length(kwargs.get("past_key_values"))
            device = (ids if ids is not None else embeds).device  # where the linears will read them
            self._local.positions = torch.arange(start, start + length, device=device)
        else:
            self._local.positions = None

    def _leave(self, *_args) -> None:
        self._local.positions = None

    def of(self, x: torch.Tensor) -> torch.Tensor:
        """Positions of the tokens of ``x`` ``(..., T, in)``, broadcastable to ``x.shape[:-1]``."""
        positions = getattr(self._local, "positions", None)
        if positions is not None:
            if positions.shape[-1] == x.shape[-2] and positions.dim() < x.dim():
                return positions.to(x.device)
            if positions.numel() == x.shape[-2]:  # the linear sees the batch's tokens flattened
                return positions.reshape(-1).to(x.device)
        return torch.arange(x.shape[-2], device=x.device)


def _cache_length(past) -> int:
    if past is None:
        return 0
    if hasattr(past, "get_seq_length"):
        return int(past.get_seq_length())
    return int(past[0][0].shape[-2])  # legacy tuples of (key, value) per layer: (batch, heads, length, dim)


def band_of(edges: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Band index of each position: how many edges are at or below it."""
    return torch.searchsorted(edges, positions.contiguous(), right=True)
