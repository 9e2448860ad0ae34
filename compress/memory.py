"""How much memory a prune run's calibration activations take, and the budget they must fit.

``plan_memory`` estimates the activations of the one-forward mode (every calibration chunk parked at a group
boundary) and of the bounded mode (one chunk's activations alive), and picks the mode that fits the budget
(``--max-memory``: ``memory_budget`` parses it; ``auto`` is 80% of what the device has available).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from compress import models

DEFAULT_CHUNK_SAMPLES = 8


@dataclass
class MemoryPlan:
    """What a run's calibration activations will take (bytes), and whether the block forward must run bounded."""

    boundary: int  # one copy of the hidden states between two blocks, all chunks
    parked: int  # the one-forward mode at its deepest group: inputs + every chunk's live activations
    bounded_need: int  # the bounded mode: inputs + outputs + one chunk's activations
    block_weights: int  # one decoder block's weights
    budget: int | None
    bounded: bool

    def describe(self) -> str:
        mode = ("bounded: recomputes each block's upstream groups, ~2.4x the forward work" if self.bounded
                else "one forward per block")
        budget = f", budget {_size(self.budget)}" if self.budget is not None else ""
        return (f"memory plan: one block's weights {_size(self.block_weights)}, calibration hidden states "
                f"{_size(self.boundary)} per copy; one-forward mode needs ~{_size(self.parked)}, bounded "
                f"~{_size(self.bounded_need)}{budget} -> {mode}")


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n} B"


def plan_memory(model: nn.Module, nsamples: int, seqlen: int, budget: int | None,
                chunk_samples: int | None = None) -> MemoryPlan:
    """Estimate the activation memory of compressing ``model`` on ``nsamples x seqlen`` tokens, and pick the
    mode: one forward with parked chunks when it fits ``budget`` bytes (or no budget is given), else bounded.

    The estimate takes the widest linear output of a block as its intermediate width: a parked chunk holds at
    most its residual plus the input of the last group (the MLP's intermediate activations).

    Raises:
        ValueError: even the bounded mode does not fit ``budget``.
    """
    _, blocks = models.decoder_blocks(model)
    block = blocks[0]
    config = getattr(model, "config", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    widths = [models.weight_view(m).shape[0] for m in models.linears(block).values()]
    hidden = hidden or min(widths)
    inter = max(widths + [hidden])
    elt = next(iter(block.parameters())).element_size()
    tokens = nsamples * seqlen
    chunk_tokens = min(nsamples, chunk_samples or DEFAULT_CHUNK_SAMPLES) * seqlen
    transient = chunk_tokens * 4 * inter * elt  # one chunk's forward: gate, up, their product, activation
    boundary = tokens * hidden * elt
    parked = boundary + tokens * (hidden + inter) * elt + transient
    bounded_need = 2 * boundary + transient
    weights = sum(p.numel() * p.element_size() for p in block.parameters())
    bounded = budget is not None and parked + weights > budget
    plan = MemoryPlan(boundary, parked, bounded_need, weights, budget, bounded)
    if bounded and bounded_need + weights > budget:
        raise ValueError(f"calibration needs ~{_size(bounded_need + weights)} even bounded "
                         f"({nsamples} x {seqlen} tokens), over the {_size(budget)} budget: lower "
                         f"--nsamples or --seqlen, or raise --max-memory")
    return plan


def block_cache_bytes(plan: MemoryPlan) -> int:
    """How much freed activation memory the run may keep for reuse: what one chunk's forward churns through,
    within a quarter of the budget."""
    cap = int(os.environ.get("COMPRESS_BLOCK_CACHE_MB", "256")) << 20
    return min(cap, plan.budget // 4) if plan.budget else cap


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def memory_budget(spec: str, device: torch.device) -> int | None:
    """``--max-memory`` in bytes; ``None`` for no limit. ``auto`` is measured when called (after loading).

    Raises:
        ValueError: not a size.
    """
    text = spec.strip().lower()
    if text == "auto":
        if device.type == "cuda":
            return int(0.8 * torch.cuda.mem_get_info(device)[0])
        return int(0.8 * available_ram())
    match = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([kmgt]i?b|b)?", text)
    if not match:
        raise ValueError(f"--max-memory {spec!r} is not a size: write e.g. 8GiB, 500MB, auto, or 0 for no limit")
    size = int(float(match.group(1)) * _UNITS[match.group(2) or ""])
    return size or None


def available_ram() -> int:
    """Bytes the kernel reports available (MemAvailable), else the physical memory."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


