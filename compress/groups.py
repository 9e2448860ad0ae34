"""Which linears of a block read the same input (q/k/v, gate/up): found by running the block on a tiny probe
with hooks noting the tensor each linear reads, never by names."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from compress import models
from compress.blocks import forward_block
from compress.calibration.capture import BlockInputs, capture_block_inputs
from compress.checkpoint import release


def split_groups(model: nn.Module, ignore: tuple[str, ...], load: Callable[[nn.Module], None] | None = None) -> list[list[str]]:
    """Groups of linears sharing an input (fused by inference engines: q/k/v, gate/up) that ``ignore``
    splits, i.e. some members ignored and some not; as lists of full names.

    The grouping is probed on the first block and holds for every block: decoder blocks of one model share
    their code. ``load`` gives a meta-device first block its weights for the probe (dropped after).
    """
    prefix, blocks = models.decoder_blocks(model)
    device = next(iter(model.parameters())).device
    if device.type == "meta":
        device = torch.device("cpu")
    probe = capture_block_inputs(model, blocks[0], torch.zeros(1, 8, dtype=torch.long, device=device))
    if load is not None:
        load(blocks[0])
    try:
        groups = probe_groups(blocks[0], probe, list(models.linears(blocks[0])))
    finally:
        if load is not None:
            release(blocks[0])
    split = []
    for b in range(len(blocks)):
        for group in groups:
            names = [f"{prefix}.{b}.{name}" for name in group]
            ignored = [models.is_ignored(n, ignore) for n in names]
            if any(ignored) and not all(ignored):
                split.append(names)
    return split


def probe_groups(block: nn.Module, probe: BlockInputs, names: list[str]) -> list[list[str]]:
    """Linears ``names`` of ``block`` grouped by the input tensor they read, groups in execution order,
    found by running the block on the tiny ``probe`` inputs (any block's: only which tensor each linear
    reads matters) with hooks noting it."""
    seen: list[tuple[str, int]] = []  # (name, id(input)) in call order
    keep_alive = []  # holds the probed inputs so no id() is reused by a freed tensor mid-probe
    modules = models.linears(block)

    def hook(_m, args, name):
        if not any(n == name for n, _ in seen):
            seen.append((name, id(args[0])))
            keep_alive.append(args[0])

    handles = [modules[n].register_forward_pre_hook(lambda m, a, n=n: hook(m, a, n)) for n in names]
    try:
        forward_block(block, probe)
    finally:
        for h in handles:
            h.remove()
    by_input: dict[int, list[str]] = {}
    for name, key in seen:
        by_input.setdefault(key, []).append(name)
    return list(by_input.values())
