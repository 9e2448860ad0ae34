"""The driver: compress a model's decoder blocks in order, each on the inputs its compressed predecessors give.

Within a block, linears are grouped by the input they read (q/k/v share one, gate/up another; ``groups``), in
execution order. Every group is compressed on statistics of its *current* input, i.e. with the groups before
it already compressed, and before it computes; the block's output is the compressed block's output. That is
done in ONE chunked forward over the calibration set per block (``blocks.BlockCompressor``), so memory is
one chunk's activations plus what each parked chunk holds at a group boundary (``memory.plan_memory``
estimates it). When that does not fit the budget, the block runs *bounded*: the same statistics in the same
order, so the same result, for about 2-2.5x the forward work.

The forwards can run in bf16 (``recipe.forward_precision``, ``auto``: on CPUs with AMX): autocast takes the
block's matmuls and attention in bf16 while the residual stream stays in the model's dtype. On SmolLM2-135M
that is 2.5x faster per block than fp32 and moves a block's output by ~1% (relative norm), a deviation each
following block sees as a slightly different calibration input.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Callable, Protocol

import torch
from torch import nn

from compress import experts, models
from compress.blocks import BlockCompressor, forward_block
from compress.calibration.capture import BlockInputs, capture_block_inputs
from compress.calibration.stats import SquaredNorms, resolve_precision
from compress.config import Recipe
from compress.groups import probe_groups, split_groups  # noqa: F401  (split_groups: part of this API)
from compress.memory import DEFAULT_CHUNK_SAMPLES, MemoryPlan, plan_memory  # noqa: F401  (part of this API)
from compress.pruning import get
from compress.reports import BlockReport, BlockState, LayerReport, QuantizedWeight, Report  # noqa: F401

log = logging.getLogger(__name__)


def check(model: nn.Module, recipe: Recipe) -> None:
    """Fail fast, before any calibration work, on a recipe the model cannot take.

    Raises:
        ValueError: naming the linear and the fix (e.g. N:M with in_features not divisible by M).
    """
    prune, quant = recipe.prune, recipe.quant
    prefix, blocks = models.decoder_blocks(model)
    if prune is not None:
        method = get(prune.method)
        if prune.scope == "block" and method.name != "sparsegpt":
            raise ValueError(f"--scope block is SparseGPT's; {method.name} takes row or matrix")
        if prune.block_sparsity and len(prune.block_sparsity) != len(blocks):
            raise ValueError(f"the allocation gives {len(prune.block_sparsity)} block sparsities for a model of "
                             f"{len(blocks)} decoder blocks: give one per block")
    targets: list[str] = []
    for i, block in enumerate(blocks):
        for name, linear in models.linears(block).items():
            full = f"{prefix}.{i}.{name}"
            if models.is_ignored(full, recipe.ignore):
                continue
            targets.append(full)
            n_in = models.in_features(linear)
            unit = prune.pattern.unit if prune is not None else 1
            if n_in % unit:
                raise ValueError(
                    f"{prune.pattern} needs in_features divisible by {unit}, got {n_in} ({full}): "
                    f"--ignore it or use --sparsity"
                )
            if quant is not None and quant.group_size and n_in % quant.group_size:
                fits = [g for g in (128, 64, 32) if n_in % g == 0]
                hint = f"use --quant w{quant.bits}g{fits[0]}" if fits else f"use --quant w{quant.bits} (per channel)"
                raise ValueError(
                    f"--quant w{quant.bits}g{quant.group_size}: group size {quant.group_size} does not divide "
                    f"in_features {n_in} ({full}): {hint}, or --ignore it"
                )
    if not targets:
        raise ValueError(f"--ignore {list(recipe.ignore)} leaves no linear layer to compress")
    if recipe.act is not None:
        if not any(recipe.act.target_for(n) for n in targets):
            raise ValueError(f"--act-targets {list(recipe.act.targets)} matches no linear (names look like {targets[0]})")
        unknown = sorted(set(recipe.act.per_layer) - set(targets))
        if unknown:
            raise ValueError(f"--act-sparsity-file names {unknown[0]!r}, not a compressed linear (e.g. {targets[0]})")


class BlockIO(Protocol):
    """Where the driver's blocks come from and go to when the model is not (all) in memory: e.g. read from a
    checkpoint when reached, written to an output shard and dropped when done (``export.StreamedOutput``)."""

    keeps_codes: bool  # ``done`` writes quantized linears' integer codes (a dense output writes weights only)

    def started(self, model: nn.Module) -> None:
        """The first block's inputs are captured: the weights outside the blocks are no longer needed."""

    def load(self, index: int, block: nn.Module) -> None:
        """Give block ``index`` its weights (before it is compressed)."""

    def unload(self, index: int, block: nn.Module) -> None:
        """A pass that only read block ``index`` (OWL's) is done with it: drop its weights if ``load`` can
        read them again."""

    def resume(self) -> BlockState | None:
        """The state an interrupted run left to continue from, if any."""

    def done(self, index: int, block: nn.Module, quantized: dict[str, "QuantizedWeight"], state: BlockState) -> None:
        """Block ``index`` is compressed; ``quantized`` holds its quantized linears' integer form (the IO may
        empty it as it writes them) and ``state`` what the run needs to continue from block ``index + 1`` (the
        IO may save it)."""


def _capture(model: nn.Module, tokens: torch.Tensor, device: torch.device, chunk_samples: int | None):
    """The first block's inputs for each chunk of ``tokens``, and a tiny probe of them (finds each block's
    groups); the weights outside the blocks visit ``device`` meanwhile."""
    prefix, blocks = models.decoder_blocks(model)
    models.move_non_blocks_(model, prefix, device)
    try:
        inputs = [capture_block_inputs(model, blocks[0], chunk.to(device))
                  for chunk in tokens.split(chunk_samples or DEFAULT_CHUNK_SAMPLES)]
        probe = capture_block_inputs(model, blocks[0], tokens[:1, :8].to(device))
    finally:
        models.move_non_blocks_(model, prefix, torch.device("cpu"))
    return inputs, probe


@torch.no_grad()
def outlier_ratios(model: nn.Module, tokens: torch.Tensor, m: float, ignore: tuple[str, ...] = (), *,
                   device: torch.device | str = "cpu", chunk_samples: int | None = None,
                   io: BlockIO | None = None, on_block: Callable[[int, int], None] | None = None,
                   precision: str = "fp32") -> list[float]:
    """OWL's outlier ratio of every decoder block of the *dense* model (``compress.pruning.owl``): one forward
    (in ``precision``, resolved) through the blocks on calibration ``tokens``, each block's linears (those
    ``ignore`` leaves) scored by Wanda's ``|W|·‖X‖`` on their inputs. The model is left as it was (``io``
    loads and unloads each block)."""
    from compress.pruning import owl, wanda

    device = torch.device(device)
    prefix, blocks = models.decoder_blocks(model)
    inputs, _ = _capture(model, tokens, device, chunk_samples)
    ratios = []
    for i, block in enumerate(blocks):
        if io is not None:
            io.load(i, block)
        block.to(device)
        linears = {n: lin for n, lin in models.linears(block).items() if not models.is_ignored(f"{prefix}.{i}.{n}", ignore)}
        norms = {n: SquaredNorms(models.in_features(lin)) for n, lin in linears.items()}
        handles = [lin.register_forward_pre_hook(lambda _m, a, n=n: norms[n].update(a[0])) for n, lin in linears.items()]
        try:
            inputs = [BlockInputs(forward_block(block, inp, precision), inp.args, inp.kwargs) for inp in inputs]
        finally:
            for h in handles:
                h.remove()
        scores = [wanda.score(models.weight_view(lin).float(), norms[n].finalize()) for n, lin in linears.items()
                  if norms[n].tokens]  # an expert the router sent no token has no score
        ratios.append(owl.outlier_ratio(scores, m))
        block.to("cpu")
        if io is not None:
            io.unload(i, block)
        log.info("OWL block %d/%d: outlier ratio %.4f", i + 1, len(blocks), ratios[-1])
        if on_block:
            on_block(i, len(blocks))
    return ratios


def compress_sequential(
    model: nn.Module,
    tokens: torch.Tensor,
    recipe: Recipe,
    *,
    device: torch.device | str = "cpu",
    chunk_samples: int | None = None,
    error_tokens: int = 4096,
    histogram_tokens: int = 16384,
    on_block: Callable[[BlockReport, int], None] | None = None,
    io: BlockIO | None = None,
    bounded: bool = False,
    checked: bool = False,
    scale_dtype: torch.dtype | None = None,
    moe: experts.MoeOptions | None = None,
) -> Report:
    """Compress ``model``'s decoder linears in place, block by block, on calibration ``tokens``.

    Args:
        model: a causal LM with weights on CPU (or blocks on the meta device that ``io`` loads); each block
            visits ``device`` while it is compressed.
        tokens: ``(nsamples, seqlen)`` calibration token ids.
        recipe: what to do to every linear not matched by ``recipe.ignore`` (its ``calib`` is not used).
        chunk_samples: samples per forward chunk (default ``DEFAULT_CHUNK_SAMPLES``); any value gives the
            same result and one forward per block; smaller chunks use less memory.
        error_tokens: about how many calibration tokens measure the reconstruction error of methods that do
            not need the full Gram matrix themselves (magnitude, Wanda, RTN); all tokens for SparseGPT, GPTQ.
        histogram_tokens: about how many calibration tokens feed the activation-threshold histograms (every
            k-th token: quantiles of 16k tokens x channels are as good, and the histograms cost ~1 s/block
            per 16k tokens on 2 CPU cores).
        on_block: called after each block with its report and the number of blocks.
        io: loads each block before and takes it after (then its quantized linears go to ``io``, not the
            report); without it the model is compressed in memory.
        bounded: run each block bounded (module docstring; ``plan_memory`` decides): the same result with
            one chunk's activations alive at a time.
        checked: the caller ran ``check(model, recipe)`` already (``compress.prune`` does, before any work).
        scale_dtype: what quantization scales are rounded to (default: the model's dtype; GGUF stores fp16).

    Returns:
        Report with one LayerReport per compressed linear, and the integer form of quantized ones.
    """
    if not checked:
        check(model, recipe)
    device = torch.device(device)
    recipe = replace(recipe, gram_precision=resolve_precision(recipe.gram_precision, device),
                     forward_precision=resolve_precision(recipe.forward_precision, device, "--forward-precision"),
                     act=recipe.act.resolved(tokens.shape[1]) if recipe.act else None)
    act_edges = recipe.act.edges(tokens.shape[1]) if recipe.act else ()
    start = time.perf_counter()
    prefix, blocks = models.decoder_blocks(model)
    gram_stride = max(1, tokens.numel() // error_tokens)
    hist_stride = max(1, tokens.numel() // histogram_tokens)
    inputs, probe = _capture(model, tokens, device, chunk_samples)
    report = Report(recipe=str(recipe), act_edges=act_edges)
    first = 0
    if io is not None:
        io.started(model)
        resumed = io.resume()
        if resumed is not None:
            if len(resumed.hidden) != len(inputs):
                raise ValueError(f"the run to resume used {len(resumed.hidden)} calibration chunks, this one {len(inputs)}")
            first = resumed.next_block
            inputs = [BlockInputs(h.to(device), inp.args, inp.kwargs) for h, inp in zip(resumed.hidden, inputs)]
            report.blocks = resumed.blocks
            report.act_thresholds.update(resumed.act_thresholds)
            report.gate_space.update(resumed.gate_space)
            log.info("resuming at block %d/%d", first + 1, len(blocks))
            if on_block:
                for done_report in report.blocks:
                    on_block(done_report, len(blocks))
    for i, block in enumerate(blocks):
        if i < first:
            continue
        t0 = time.perf_counter()
        if io is not None:
            io.load(i, block)
        block.to(device)
        block_name = f"{prefix}.{i}"
        targets = [n for n in models.linears(block) if not models.is_ignored(f"{block_name}.{n}", recipe.ignore)]
        with experts.calibrating(block, moe or experts.MoeOptions()) as min_tokens:
            groups = probe_groups(block, probe, targets)
            compressor = BlockCompressor(block, groups, recipe.for_block(i), block_name, gram_stride, hist_stride,
                                         act_edges, scale_dtype, {n: k for n, k in min_tokens.items() if n in targets},
                                         keep_codes=io is None or io.keeps_codes, codes_only=io is not None)
            outputs = compressor.run_bounded(block, inputs) if bounded else compressor.run(block, inputs)
        inputs = [BlockInputs(out, inp.args, inp.kwargs) for out, inp in zip(outputs, inputs)]
        block._apply(lambda t: t if t.is_meta else t.cpu())  # (codes-only linears' weights stay dropped)
        block_report = BlockReport(index=i, seconds=time.perf_counter() - t0, layers=compressor.reports)
        report.blocks.append(block_report)
        report.act_thresholds.update(compressor.acts.thresholds)
        report.gate_space.update(compressor.acts.gate_space)
        if io is not None:
            io.done(i, block, compressor.quantized, BlockState(i + 1, outputs, report.blocks, report.act_thresholds,
                                                               report.gate_space))
        else:
            report.quantized.update(compressor.quantized)
        compressor.quantized = {}  # not alive while the next block loads
        log.info("block %d/%d: %.1f s, mean relative error %.4f", i + 1, len(blocks), block_report.seconds, block_report.mean_error)
        if starved := [r for r in compressor.reports if r.data_free]:  # experts the router seldom picked
            log.warning("%s: %d linears got fewer than their minimum of calibration tokens and were compressed without "
                        "data (magnitude / RTN): %s", block_name, len(starved), ", ".join(
                            f"{r.name.removeprefix(block_name + '.')} ({r.tokens})" for r in starved))
        if on_block:
            on_block(block_report, len(blocks))
    report.seconds = time.perf_counter() - start
    return report
