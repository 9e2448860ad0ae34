"""The driver: compress a model's decoder blocks in order, each on the inputs its compressed predecessors give.

For every block: the block's linears are grouped by the input they read (q/k/v share one, gate/up another),
in execution order. The block runs forward on the calibration inputs with a pre-hook on each linear: when a
group's input arrives, its Gram matrix is accumulated and, once every calibration chunk has contributed,
the group is compressed in place *before* it computes. Later groups therefore see the outputs of already
compressed ones, and the block's output is the compressed block's output. With all calibration samples in
one chunk this is a single forward per block; with several chunks (memory) each group costs one partial
forward per chunk and a final forward makes the outputs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn

from compress import models
from compress.calibration.capture import BlockInputs, capture_block_inputs
from compress.calibration.stats import Gram, reconstruction_error
from compress.config import PruneConfig
from compress.prune import InputStats, get

log = logging.getLogger(__name__)


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    target_sparsity: float
    sparsity: float
    rel_error: float
    seconds: float


@dataclass
class BlockReport:
    index: int
    seconds: float
    layers: list[LayerReport]

    @property
    def mean_error(self) -> float:
        return sum(layer.rel_error for layer in self.layers) / max(len(self.layers), 1)


@dataclass
class Report:
    method: str
    pattern: str
    seconds: float = 0.0
    blocks: list[BlockReport] = field(default_factory=list)

    @property
    def layers(self) -> list[LayerReport]:
        return [layer for block in self.blocks for layer in block.layers]

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over all compressed linears' weights."""
        total = sum(r.shape[0] * r.shape[1] for r in self.layers)
        return sum(r.sparsity * r.shape[0] * r.shape[1] for r in self.layers) / max(total, 1)

    def to_dict(self) -> dict:
        return {"method": self.method, "pattern": self.pattern, "seconds": self.seconds, "sparsity": self.sparsity,
                "layers": [asdict(layer) for layer in self.layers]}


def check(model: nn.Module, cfg: PruneConfig) -> None:
    """Fail fast, before any calibration work, on a recipe the model cannot take.

    Raises:
        ValueError: naming the linear and the fix (e.g. N:M with in_features not divisible by M).
    """
    method = get(cfg.method)
    if cfg.scope == "block" and method.name != "sparsegpt":
        raise ValueError(f"--scope block is SparseGPT's; {method.name} takes row or matrix")
    prefix, blocks = models.decoder_blocks(model)
    targets = 0
    for i, block in enumerate(blocks):
        for name, linear in models.linears(block).items():
            full = f"{prefix}.{i}.{name}"
            if models.is_ignored(full, cfg.ignore):
                continue
            targets += 1
            n_in = models.in_features(linear)
            if cfg.pattern.is_nm and n_in % cfg.pattern.m:
                raise ValueError(
                    f"{cfg.pattern} needs in_features divisible by {cfg.pattern.m}, got {n_in} ({full}): "
                    f"--ignore it or use --sparsity"
                )
    if not targets:
        raise ValueError(f"--ignore {list(cfg.ignore)} leaves no linear layer to compress")


def input_groups(model: nn.Module, blocks: nn.ModuleList, ignore: tuple[str, ...], prefix: str) -> list[list[list[str]]]:
    """For each block, its target linears grouped by shared input tensor, groups in execution order.

    Found by one tiny forward (8 tokens) with hooks that note which tensor object each linear reads.
    """
    seen: dict[int, list[tuple[int, str, int]]] = {}  # block -> [(call order, name, id(input))]
    keep_alive = []
    handles = []
    for b, block in enumerate(blocks):
        seen[b] = []
        for name, linear in models.linears(block).items():
            if models.is_ignored(f"{prefix}.{b}.{name}", ignore):
                continue

            def hook(_m, args, b=b, name=name):
                if not any(n == name for _, n, _ in seen[b]):
                    seen[b].append((len(seen[b]), name, id(args[0])))
                    keep_alive.append(args[0])

            handles.append(linear.register_forward_pre_hook(hook))
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            model(input_ids=torch.zeros(1, 8, dtype=torch.long, device=device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    groups = []
    for b in range(len(blocks)):
        by_input: dict[int, list[str]] = {}
        for _, name, key in sorted(seen[b]):
            by_input.setdefault(key, []).append(name)
        groups.append(list(by_input.values()))
    return groups


class _Stop(Exception):
    """Ends a partial forward once the group being collected has its input."""


class _BlockCompressor:
    """Compresses one block's linear groups from pre-hooks, in execution order (see module docstring)."""

    def __init__(self, block: nn.Module, groups: list[list[str]], cfg: PruneConfig, n_chunks: int, block_name: str):
        self.modules = models.linears(block)
        self.groups = groups
        self.group_of = {name: g for g, names in enumerate(groups) for name in names}
        self.cfg, self.method = cfg, get(cfg.method)
        self.n_chunks, self.chunk, self.frontier = n_chunks, 0, 0
        self.block_name = block_name
        self.grams: dict[int, Gram] = {}
        self.collected: set[tuple[int, int]] = set()
        self.reports: list[LayerReport] = []

    def hook(self, name: str, _module: nn.Module, args: tuple) -> None:
        g = self.group_of[name]
        if g < self.frontier:
            return
        if g > self.frontier:
            raise _Stop
        if (g, self.chunk) not in self.collected:
            x = args[0]
            self.grams.setdefault(g, Gram(x.shape[-1])).update(x)
            self.collected.add((g, self.chunk))
        if self.chunk == self.n_chunks - 1:
            self._compress_group(g)
            self.frontier += 1
        if self.n_chunks > 1:
            raise _Stop

    @torch.no_grad()
    def _compress_group(self, g: int) -> None:
        stats = InputStats(self.grams.pop(g).finalize())
        for name in self.groups[g]:
            start = time.perf_counter()
            W = models.weight_view(self.modules[name])  # (out, in), a view of the module's weight
            W32 = W.to(torch.float32, copy=True)  # the original, kept for the error
            W.copy_(self.method.apply(W32, stats, self.cfg).to(W.dtype))
            W_hat = W.float()
            self.reports.append(LayerReport(
                name=f"{self.block_name}.{name}",
                shape=tuple(W.shape),
                target_sparsity=self.cfg.pattern.sparsity,
                sparsity=float((W_hat == 0).float().mean()),
                rel_error=reconstruction_error(W32, W_hat, stats.G),
                seconds=time.perf_counter() - start,
            ))

    def run(self, block: nn.Module, inputs: list[BlockInputs]) -> list[torch.Tensor]:
        """Compress every group; return the compressed block's outputs for each chunk."""
        handles = [self.modules[n].register_forward_pre_hook(lambda m, a, n=n: self.hook(n, m, a)) for n in self.group_of]
        outputs: list[torch.Tensor | None] = [None] * len(inputs)
        try:
            while self.frontier < len(self.groups):
                before = self.frontier
                for c, inp in enumerate(inputs):
                    self.chunk = c
                    try:
                        outputs[c] = _forward(block, inp)
                    except _Stop:
                        pass
                if self.frontier == before:
                    missing = self.groups[self.frontier]
                    raise RuntimeError(f"{self.block_name}: linears {missing} were never called by the block's forward")
        finally:
            for h in handles:
                h.remove()
        if self.n_chunks > 1:
            outputs = [_forward(block, inp) for inp in inputs]
        return outputs


def _forward(block: nn.Module, inp: BlockInputs) -> torch.Tensor:
    with torch.inference_mode():
        out = block(inp.hidden, *inp.args, **inp.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def compress_sequential(
    model: nn.Module,
    tokens: torch.Tensor,
    cfg: PruneConfig,
    device: torch.device | str = "cpu",
    chunk_samples: int | None = None,
    on_block: Callable[[BlockReport, int], None] | None = None,
) -> Report:
    """Compress ``model``'s decoder linears in place, block by block, on calibration ``tokens``.

    Args:
        model: a causal LM with weights on CPU; each block visits ``device`` while it is compressed.
        tokens: ``(nsamples, seqlen)`` calibration token ids.
        cfg: what to do to every linear not matched by ``cfg.ignore``.
        chunk_samples: samples per forward; ``None`` puts them all in one forward (one pass per block).
        on_block: called after each block with its report and the number of blocks.

    Returns:
        Report with one LayerReport per compressed linear.
    """
    check(model, cfg)
    device = torch.device(device)
    start = time.perf_counter()
    prefix, blocks = models.decoder_blocks(model)
    groups = input_groups(model, blocks, cfg.ignore, prefix)
    chunks = tokens.split(chunk_samples or tokens.shape[0])
    models.move_non_blocks_(model, prefix, device)
    try:
        inputs = [capture_block_inputs(model, blocks[0], chunk.to(device)) for chunk in chunks]
    finally:
        models.move_non_blocks_(model, prefix, torch.device("cpu"))
    report = Report(method=cfg.method, pattern=str(cfg.pattern))
    for i, block in enumerate(blocks):
        t0 = time.perf_counter()
        block.to(device)
        compressor = _BlockCompressor(block, groups[i], cfg, len(chunks), f"{prefix}.{i}")
        outputs = compressor.run(block, inputs)
        inputs = [BlockInputs(out, inp.args, inp.kwargs) for out, inp in zip(outputs, inputs)]
        block.to("cpu")
        block_report = BlockReport(index=i, seconds=time.perf_counter() - t0, layers=compressor.reports)
        report.blocks.append(block_report)
        log.info("block %d/%d: %.1f s, mean relative error %.4f", i + 1, len(blocks), block_report.seconds, block_report.mean_error)
        if on_block:
            on_block(block_report, len(blocks))
    report.seconds = time.perf_counter() - start
    return report
