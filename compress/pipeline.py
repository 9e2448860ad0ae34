"""The driver: compress a model's decoder blocks in order, each on the inputs its compressed predecessors give.

Within a block, linears are grouped by the input they read (q/k/v share one, gate/up another), in execution
order. Every group is compressed on statistics of its *current* input, i.e. with the groups before it
already compressed, and before it computes; the block's output is the compressed block's output. That is
done in ONE forward over the calibration set, split into chunks for memory and speed:

    each chunk runs the block in its own worker thread, one worker at a time (a baton, no parallelism);
    a worker reaching a group's first linear adds its input to the group's statistics and parks there;
    once every chunk is parked at the group, the group is compressed and the workers resume in turn.

So the cost is one forward per block whatever the number of chunks, and memory is one chunk's activations
plus what each parked chunk holds at a group boundary (``plan_memory`` estimates it).

When that does not fit the memory budget, the block runs *bounded*: for each group in turn, every chunk runs
the block from its input up to that group (the groups before it already compressed), feeds the statistics
and stops; a last pass makes the outputs. Same statistics in the same order, so the same result, for about
2-2.5x the forward work, and memory is the block's input and output hidden states plus one chunk's activations.

The forwards can run in bf16 (``recipe.forward_precision``, ``auto``: on CPUs with AMX): autocast takes the
block's matmuls and attention in bf16 while the residual stream stays in the model's dtype. On SmolLM2-135M
that is 2.5x faster per block than fp32 and moves a block's output by ~1% (relative norm), a deviation each
following block sees as a slightly different calibration input.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Protocol

import torch
from torch import nn

from compress import models
from compress.activations.histogram import AbsHistogram
from compress.activations.positions import band_slices
from compress.activations.thresholds import Sparsifier, UpOutput, gate_activation, thresholds, token_rms
from compress.calibration.capture import BlockInputs, capture_block_inputs
from compress.calibration.stats import Gram, SquaredNorms, reconstruction_error, resolve_precision
from compress.checkpoint import release
from compress.config import Recipe
from compress.kernels import allocator
from compress.pruning import InputStats, get
from compress.quant.grid import QuantGrid
from compress.weights import compress_weight, needs_hessian, needs_norms

log = logging.getLogger(__name__)

from compress.memory import DEFAULT_CHUNK_SAMPLES, MemoryPlan, plan_memory  # noqa: F401  (re-exported)


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    target_sparsity: float
    sparsity: float
    rel_error: float  # ‖WX − ŴX‖/‖WX‖ on `error_tokens` calibration tokens
    error_tokens: int
    seconds: float
    bits: int | None = None  # quantized to this many bits, None if not quantized
    group_size: int | None = None
    act_target: float | None = None  # target fraction of zeroed input activations, None if not targeted
    act_sparsity: float | None = None  # achieved on the calibration inputs


@dataclass
class QuantizedWeight:
    """Integer form of a quantized linear, for compressed exports: ``W = grid.decode(codes)``."""

    codes: torch.Tensor  # (out, in) int8
    grid: QuantGrid


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
    recipe: str
    seconds: float = 0.0
    blocks: list[BlockReport] = field(default_factory=list)
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict, repr=False)  # by full linear name
    # by full linear name: (in,), or (bands, in) with position bands starting at act_edges
    act_thresholds: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    act_edges: tuple[int, ...] = ()
    gate_space: dict[str, str] = field(default_factory=dict)  # CHESS: down projection -> its up projection

    @property
    def layers(self) -> list[LayerReport]:
        return [layer for block in self.blocks for layer in block.layers]

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over all compressed linears' weights."""
        total = sum(r.shape[0] * r.shape[1] for r in self.layers)
        return sum(r.sparsity * r.shape[0] * r.shape[1] for r in self.layers) / max(total, 1)

    def to_dict(self) -> dict:
        return {"recipe": self.recipe, "seconds": self.seconds, "sparsity": self.sparsity,
                "layers": [asdict(layer) for layer in self.layers]}

    @classmethod
    def from_dict(cls, data: dict) -> "Report":
        """The report as compression.json records it (its layers in one block: blocks are not recorded)."""
        layers = [LayerReport(**{**r, "shape": tuple(r["shape"])}) for r in data["layers"]]
        return cls(data["recipe"], data["seconds"], [BlockReport(0, data["seconds"], layers)])


@dataclass
class BlockState:
    """Everything a run needs to continue at ``next_block``: that block's input hidden states (one tensor per
    calibration chunk) and the report so far. ``BlockIO.done`` receives it after every block."""

    next_block: int
    hidden: list[torch.Tensor]
    blocks: list[BlockReport]
    act_thresholds: dict[str, torch.Tensor]
    gate_space: dict[str, str]

    def to_parts(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """A JSON-able dict and a dict of tensors (for safetensors)."""
        meta = {"next_block": self.next_block, "chunks": len(self.hidden), "gate_space": self.gate_space,
                "blocks": [{"index": b.index, "seconds": b.seconds, "layers": [asdict(r) for r in b.layers]} for b in self.blocks]}
        tensors = {f"hidden.{c}": h.contiguous() for c, h in enumerate(self.hidden)}
        tensors.update({f"act.{name}": t.contiguous() for name, t in self.act_thresholds.items()})
        return meta, tensors

    @classmethod
    def from_parts(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> "BlockState":
        blocks = [BlockReport(b["index"], b["seconds"], [LayerReport(**{**r, "shape": tuple(r["shape"])}) for r in b["layers"]])
                  for b in meta["blocks"]]
        return cls(meta["next_block"], [tensors[f"hidden.{c}"] for c in range(meta["chunks"])], blocks,
                   {n[len("act."):]: t for n, t in tensors.items() if n.startswith("act.")}, meta["gate_space"])


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
        """Block ``index`` is compressed; ``quantized`` holds its quantized linears' integer form and ``state``
        what the run needs to continue from block ``index + 1`` (the IO may save it)."""


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
        _forward(block, probe)
    finally:
        for h in handles:
            h.remove()
    by_input: dict[int, list[str]] = {}
    for name, key in seen:
        by_input.setdefault(key, []).append(name)
    return list(by_input.values())


class _Stop(Exception):
    """Unwinds a parked worker when the run is aborted."""


_DONE = -1


class _BlockCompressor:
    """Compresses one block's linear groups in execution order during one chunked forward (module docstring)."""

    def __init__(self, block: nn.Module, groups: list[list[str]], recipe: Recipe, block_name: str, gram_stride: int,
                 hist_stride: int = 1, act_edges: tuple[int, ...] = ()):
        self.modules = models.linears(block)
        self.groups = groups
        self.group_of = {name: g for g, names in enumerate(groups) for name in names}
        self.recipe = recipe
        self.block_name = block_name
        self.gram_stride = 1 if needs_hessian(recipe) else gram_stride
        self.with_mean = bool(recipe.prune and recipe.prune.refine == "dsnot")  # DSnoT's expected error
        self.hist_stride = hist_stride
        self.act_edges = act_edges  # position bands of the activation thresholds
        self.stats: dict[int, tuple] = {}  # group -> _new_stats(group)
        self.compressed: set[int] = set()
        self.reports: list[LayerReport] = []
        self.quantized: dict[str, QuantizedWeight] = {}
        self.block = block
        self.act_targets = {name: recipe.act.target_for(f"{block_name}.{name}") for name in self.group_of} if recipe.act else {}
        self.sparsifiers: dict[str, Sparsifier] = {}
        self.act_thresholds: dict[str, torch.Tensor] = {}
        self.gate_space: dict[str, str] = {}
        self.up_outputs: dict[str, tuple[str, UpOutput]] = {}  # CHESS: gated down projection -> (up name, hook)
        if recipe.act is not None and recipe.act.method == "chess":
            for name, target in self.act_targets.items():
                up = models.gated_up_projection(block, name) if target else None
                if up is not None:
                    self.up_outputs[name] = (up, UpOutput(collecting=True))
        self._local = threading.local()
        self._stop_at: int | None = None  # bounded mode: the group the current pass stops at

    def hook(self, name: str, module: nn.Module, args: tuple):
        """Pre-hook, run in a worker: feed the group's statistics once per chunk and park until the group is
        compressed; then apply the linear's activation thresholds, if it has any."""
        g = self.group_of[name]
        if g not in self.compressed:
            x = args[0]
            if g not in self.stats:
                self.stats[g] = self._new_stats(g, x.shape[-1])
            gram, norms, hists = self.stats[g]
            gram.update(x)
            if norms is not None:
                norms.update(x)
            if hists is not None:
                self._feed_histograms(name, x, hists)
            if self._stop_at is None:
                self._park(g)
            elif g == self._stop_at:
                raise _Stop  # bounded: this pass only had to reach the group
            else:
                raise RuntimeError(f"{self.block_name}: group {self.groups[g]} ran before {self.groups[self._stop_at]}")
        sparsifier = self.sparsifiers.get(name)
        return sparsifier(module, args) if sparsifier else None

    def _feed_histograms(self, name: str, x: torch.Tensor, hists: list[AbsHistogram]) -> None:
        """|x| histograms per position band (of the gate activations for CHESS's gated MLPs), over every
        ``hist_stride``-th token, relative to each token's RMS with ``--act-scale token``. Only the sampled
        tokens are transformed, and nothing outlives the call: the worker parks right after it, and a copy of
        its chunk kept alive there is a copy per parked chunk."""
        up = self.up_outputs[name][1].value if name in self.up_outputs else None
        for hist, band in zip(hists, band_slices(self.act_edges, x.shape[-2])):
            a = x[..., band, :].reshape(-1, x.shape[-1])[:: self.hist_stride]
            if up is not None:
                a = gate_activation(a, up[..., band, :].reshape(-1, up.shape[-1])[:: self.hist_stride])
            if self.recipe.act.scale == "token":
                a = a / token_rms(a)
            hist.update(a)

    def _new_stats(self, g: int, in_features: int) -> tuple[Gram, SquaredNorms | None, list[AbsHistogram] | None]:
        """Accumulators for group ``g``'s input. Mean squares only for methods that read them, and not when
        the Gram matrix holds them exactly on its diagonal (fp32 products of every token): apart, they cost
        ~5% of a SparseGPT run."""
        exact_diagonal = self.gram_stride == 1 and self.recipe.gram_precision == "fp32"
        separate_norms = self.with_mean or (needs_norms(self.recipe) and not exact_diagonal)
        targeted = any(self.act_targets.get(n) for n in self.groups[g])
        return (Gram(in_features, stride=self.gram_stride, products=self.recipe.gram_precision),
                SquaredNorms(in_features, self.with_mean) if separate_norms else None,
                [AbsHistogram(in_features) for _ in range(len(self.act_edges) + 1)] if targeted else None)

    def _park(self, g: int) -> None:
        c = self._local.chunk
        self._at[c] = g
        self._back.release()
        self._go[c].acquire()
        if self._abort:
            raise _Stop

    def _step(self, c: int) -> None:
        """Let worker ``c`` run until it parks or ends; re-raise what it raised."""
        self._go[c].release()
        self._back.acquire()
        if self._errors[c] is not None:
            raise self._errors[c]

    def run(self, block: nn.Module, inputs: list[BlockInputs]) -> list[torch.Tensor]:
        """Compress every group; return the compressed block's outputs for each chunk."""
        n = len(inputs)
        self._go = [threading.Semaphore(0) for _ in range(n)]
        self._back = threading.Semaphore(0)
        self._at: list[int | None] = [None] * n
        self._errors: list[BaseException | None] = [None] * n
        self._abort = False
        outputs: list[torch.Tensor | None] = [None] * n

        def work(c: int) -> None:
            self._go[c].acquire()
            self._local.chunk = c
            try:
                if not self._abort:
                    outputs[c] = _forward(block, inputs[c], self.recipe.forward_precision)
            except _Stop:
                pass
            except BaseException as err:  # noqa: BLE001 - handed to the main thread by _step
                self._errors[c] = err
            finally:
                self._at[c] = _DONE
                self._back.release()

        handles = self._install_hooks(block)
        workers = [threading.Thread(target=work, args=(c,), name=f"{self.block_name}-chunk{c}", daemon=True) for c in range(n)]
        for worker in workers:
            worker.start()
        try:
            for g, names in enumerate(self.groups):
                for c in range(n):
                    self._step(c)
                    if self._at[c] != g:
                        raise RuntimeError(f"{self.block_name}: the block's forward never called {names}")
                self._compress_group(g)
            for c in range(n):
                self._step(c)
            self._note_act_sparsity()
        except BaseException:
            self._abort = True
            for c in range(n):
                if self._at[c] != _DONE:
                    self._go[c].release()
            raise
        finally:
            for worker in workers:
                worker.join()
            for h in handles:
                h.remove()
        return outputs

    def _install_hooks(self, block: nn.Module) -> list:
        handles = [self.modules[n].register_forward_pre_hook(lambda m, a, n=n: self.hook(n, m, a)) for n in self.group_of]
        return handles + [block.get_submodule(up).register_forward_hook(hook) for up, hook in self.up_outputs.values()]

    def _note_act_sparsity(self) -> None:
        """Each report's achieved activation sparsity on the calibration inputs, from its sparsifier's counts."""
        for report in self.reports:
            sparsifier = self.sparsifiers.get(report.name.removeprefix(f"{self.block_name}."))
            report.act_sparsity = sparsifier.sparsity if sparsifier else None

    def run_bounded(self, block: nn.Module, inputs: list[BlockInputs]) -> list[torch.Tensor]:
        """``run``'s result with one chunk's activations alive at a time (module docstring): per group, a pass
        over the chunks that stops at it; then a pass for the outputs."""
        handles = self._install_hooks(block)
        try:
            for g, names in enumerate(self.groups):
                self._stop_at = g
                for inp in inputs:
                    try:
                        _forward(block, inp, self.recipe.forward_precision)
                    except _Stop:
                        continue
                    raise RuntimeError(f"{self.block_name}: the block's forward never called {names}")
                self._compress_group(g)
            self._stop_at = None
            outputs = [_forward(block, inp, self.recipe.forward_precision) for inp in inputs]
            self._note_act_sparsity()
        finally:
            for h in handles:
                h.remove()
        return outputs

    @torch.no_grad()
    def _compress_group(self, g: int) -> None:
        allocator.trim()  # blocks cached by the forward: compressing allocates other shapes, the next stretch too
        gram, norms, hists = self.stats.pop(g)
        stats = InputStats(gram.finalize(), *((norms.finalize(), norms.mean()) if norms else ()))
        for name in self.groups[g]:
            start = time.perf_counter()
            W = models.weight_view(self.modules[name])  # (out, in), a view of the module's weight
            W32 = W.to(torch.float32, copy=True)  # the original, kept for the error
            result = compress_weight(W32, stats, self.recipe, scale_dtype=W.dtype)
            W.copy_(result.W.to(W.dtype))
            W_hat = W.float()
            full = f"{self.block_name}.{name}"
            grid = result.grid
            if grid is not None:
                self.quantized[full] = QuantizedWeight(result.codes, grid)
            self.reports.append(LayerReport(
                name=full,
                shape=tuple(W.shape),
                target_sparsity=self.recipe.prune.pattern.sparsity if self.recipe.prune else 0.0,
                sparsity=float((W_hat == 0).float().mean()),
                rel_error=reconstruction_error(W32, W_hat, stats.G),
                error_tokens=gram.tokens,
                seconds=time.perf_counter() - start,
                bits=grid.bits if grid else None,
                group_size=grid.group_size if grid else None,
                act_target=self.act_targets.get(name),
            ))
            if self.act_targets.get(name):
                up_name, up = self.up_outputs.get(name, (None, None))
                t = torch.stack([thresholds(hist, self.recipe.act.method, self.act_targets[name], W_hat,
                                            models.is_attention(self.block, name), up.mean_abs if up else None)
                                 for hist in hists])
                t = t[0] if len(t) == 1 else t
                self.sparsifiers[name] = Sparsifier(t, self.act_edges, up=up, token_scale=self.recipe.act.scale == "token")
                self.act_thresholds[full] = t
                if up is not None:
                    up.collecting = False
                    self.gate_space[full] = f"{self.block_name}.{up_name}"
        self.compressed.add(g)
        allocator.trim()


def _forward(block: nn.Module, inp: BlockInputs, precision: str = "fp32") -> torch.Tensor:
    """``block``'s output hidden states for ``inp``, in its dtype; ``precision="bf16"``: an fp32 model's under
    bf16 autocast (entered here: autocast is per thread, and the chunks run in workers). A bf16 or fp16 model
    runs in its own dtype: autocast would only round an fp16 model's matmul inputs to fewer mantissa bits."""
    bf16 = precision == "bf16" and inp.hidden.dtype == torch.float32
    with torch.inference_mode(), torch.autocast(inp.hidden.device.type, torch.bfloat16, enabled=bf16):
        out = block(inp.hidden, *inp.args, **inp.kwargs)
    out = out[0] if isinstance(out, (tuple, list)) else out
    return out.to(inp.hidden.dtype)


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
            inputs = [BlockInputs(_forward(block, inp, precision), inp.args, inp.kwargs) for inp in inputs]
        finally:
            for h in handles:
                h.remove()
        scores = [wanda.score(models.weight_view(lin).float(), norms[n].finalize()) for n, lin in linears.items()]
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

    Returns:
        Report with one LayerReport per compressed linear, and the integer form of quantized ones.
    """
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
        groups = probe_groups(block, probe, targets)
        compressor = _BlockCompressor(block, groups, recipe.for_block(i), block_name, gram_stride, hist_stride, act_edges)
        outputs = compressor.run_bounded(block, inputs) if bounded else compressor.run(block, inputs)
        inputs = [BlockInputs(out, inp.args, inp.kwargs) for out, inp in zip(outputs, inputs)]
        block.to("cpu")
        block_report = BlockReport(index=i, seconds=time.perf_counter() - t0, layers=compressor.reports)
        report.blocks.append(block_report)
        report.act_thresholds.update(compressor.act_thresholds)
        report.gate_space.update(compressor.gate_space)
        if io is not None:
            io.done(i, block, compressor.quantized, BlockState(i + 1, outputs, report.blocks, report.act_thresholds,
                                                               report.gate_space))
        else:
            report.quantized.update(compressor.quantized)
        log.info("block %d/%d: %.1f s, mean relative error %.4f", i + 1, len(blocks), block_report.seconds, block_report.mean_error)
        if on_block:
            on_block(block_report, len(blocks))
    report.seconds = time.perf_counter() - start
    return report
