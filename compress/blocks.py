"""One decoder block compressed in ONE chunked forward over the calibration set (``BlockCompressor.run``).

Each chunk runs the block in its own worker thread, one worker at a time (a baton, no parallelism): a worker
reaching a group's first linear adds its input to the group's statistics and *parks* there, handing the baton
back to the main thread; once every chunk is parked at the group, the main thread compresses the group and
lets the workers run on, in turn, to the next group. So the groups are compressed in execution order, each on
inputs the groups before it already compressed produce, for one forward's cost whatever the number of
chunks.

``run_bounded`` gets the same result with one chunk's activations alive: per group, every chunk runs the block
up to that group and stops (``_Stop``); a last pass makes the outputs.
"""

from __future__ import annotations

import logging
import threading
import time

import torch
from torch import nn

from compress import models
from compress.activations.calibrate import ActivationCalibration
from compress.activations.histogram import AbsHistogram
from compress.calibration.capture import BlockInputs
from compress.calibration.stats import Gram, SquaredNorms, reconstruction_error
from compress.config import Recipe
from compress.kernels import allocator
from compress.pruning import InputStats
from compress.reports import LayerReport, QuantizedWeight
from compress.weights import compress_weight, needs_hessian, needs_norms

log = logging.getLogger(__name__)


class _Stop(Exception):
    """Unwinds a worker: the run was aborted, or (bounded mode) its pass reached the group it had to reach."""


FINISHED = -1  # where a worker whose forward has ended is "parked"


class BlockCompressor:
    """Compresses one block's linear groups in execution order during one chunked forward (module docstring)."""

    def __init__(self, block: nn.Module, groups: list[list[str]], recipe: Recipe, block_name: str, gram_stride: int,
                 hist_stride: int = 1, act_edges: tuple[int, ...] = (), scale_dtype: torch.dtype | None = None,
                 min_tokens: dict[str, int] | None = None, keep_codes: bool = True, codes_only: bool = False):
        """``min_tokens``: linears (experts) compressed without data (identity statistics: magnitude, RTN) when
        fewer calibration tokens reached them; their Gram matrices take every token. ``keep_codes``: quantized
        linears' integer form goes to ``quantized`` (not for an output that writes weights only);
        ``codes_only``: a quantized linear then drops its weight and decodes its codes at each later call in
        the block's forward (a streamed run writes the codes: the block's dense weights need not stay)."""
        self.modules = models.linears(block)
        self.min_tokens = min_tokens or {}
        self.rows: dict[int, int] = {}  # group -> calibration tokens that reached it
        self.scale_dtype = scale_dtype  # None: the model's
        self.groups = groups
        self.group_of = {name: g for g, names in enumerate(groups) for name in names}
        self.recipe = recipe
        self.block_name = block_name
        self.gram_stride = 1 if needs_hessian(recipe) else gram_stride
        self.with_mean = bool(recipe.prune and recipe.prune.refine == "dsnot")  # DSnoT's expected error
        self.stats: dict[int, tuple] = {}  # group -> _new_stats(group)
        self.compressed: set[int] = set()
        self.reports: list[LayerReport] = []
        self.quantized: dict[str, QuantizedWeight] = {}
        self.keep_codes = keep_codes
        self.codes_only = codes_only and keep_codes
        self._handles: list = []  # hooks the current run installed
        self._codes_only: dict[str, _CodesOnly] = {}
        self.acts = ActivationCalibration(block, block_name, self.group_of, recipe.act, hist_stride, act_edges)
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
            self.rows[g] = self.rows.get(g, 0) + x.numel() // x.shape[-1]
            gram, norms, hists = self.stats[g]
            gram.update(x)
            if norms is not None:
                norms.update(x)
            if hists is not None:
                self.acts.feed(name, x, hists)
            if self._stop_at is None:
                self._park(g)
                if name in self._codes_only:  # compressed while this call waited: its pre-hooks have run
                    self._codes_only[name].decode(module)
            elif g == self._stop_at:
                raise _Stop  # bounded: this pass only had to reach the group
            else:
                raise RuntimeError(f"{self.block_name}: group {self.groups[g]} ran before {self.groups[self._stop_at]}")
        sparsifier = self.acts.sparsifiers.get(name)
        return sparsifier(module, args) if sparsifier else None

    def _new_stats(self, g: int, in_features: int) -> tuple[Gram, SquaredNorms | None, list[AbsHistogram] | None]:
        """Accumulators for group ``g``'s input. Mean squares only for methods that read them, and not when
        the Gram matrix holds them exactly on its diagonal (fp32 products of every token): apart, they cost
        ~5% of a SparseGPT run."""
        stride = 1 if any(n in self.min_tokens for n in self.groups[g]) else self.gram_stride  # experts: few tokens
        exact_diagonal = stride == 1 and self.recipe.gram_precision == "fp32"
        separate_norms = self.with_mean or (needs_norms(self.recipe) and not exact_diagonal)
        return (Gram(in_features, stride=stride, products=self.recipe.gram_precision),
                SquaredNorms(in_features, self.with_mean) if separate_norms else None,
                self.acts.histograms(self.groups[g], in_features))

    def _park(self, g: int) -> None:
        """In worker ``c``: note that it waits at group ``g``, hand the baton back to the main thread, and
        wait until the main thread lets it run again (after the group is compressed)."""
        c = self._local.chunk
        self._parked_at[c] = g
        self._yielded.release()
        self._may_run[c].acquire()
        if self._abort:
            raise _Stop

    def _step(self, c: int) -> None:
        """In the main thread: let worker ``c`` run until it parks at a group or its forward ends (it hands the
        baton back either way), then re-raise what it raised."""
        self._may_run[c].release()
        self._yielded.acquire()
        if self._errors[c] is not None:
            raise self._errors[c]

    def run(self, block: nn.Module, inputs: list[BlockInputs]) -> list[torch.Tensor]:
        """Compress every group; return the compressed block's outputs for each chunk."""
        n = len(inputs)
        self._may_run = [threading.Semaphore(0) for _ in range(n)]  # released by the main thread: worker c runs
        self._yielded = threading.Semaphore(0)  # released by a worker when it parks or ends: the main thread runs
        self._parked_at: list[int | None] = [None] * n  # the group each worker waits at, FINISHED when done
        self._errors: list[BaseException | None] = [None] * n
        self._abort = False
        outputs: list[torch.Tensor | None] = [None] * n

        def work(c: int) -> None:
            self._may_run[c].acquire()
            self._local.chunk = c
            try:
                if not self._abort:
                    outputs[c] = forward_block(block, inputs[c], self.recipe.forward_precision)
            except _Stop:
                pass
            except BaseException as err:  # noqa: BLE001 - handed to the main thread by _step
                self._errors[c] = err
            finally:
                self._parked_at[c] = FINISHED
                self._yielded.release()

        self._handles = self._install_hooks(block)
        workers = [threading.Thread(target=work, args=(c,), name=f"{self.block_name}-chunk{c}", daemon=True) for c in range(n)]
        for worker in workers:
            worker.start()
        try:
            for g, names in enumerate(self.groups):
                for c in range(n):
                    self._step(c)
                    if self._parked_at[c] != g:
                        raise RuntimeError(f"{self.block_name}: the block's forward never called {names}")
                self._compress_group(g)
            for c in range(n):
                self._step(c)
            self._note_act_sparsity()
        except BaseException:
            self._abort = True
            for c in range(n):
                if self._parked_at[c] != FINISHED:
                    self._may_run[c].release()
            raise
        finally:
            for worker in workers:
                worker.join()
            self._remove_hooks()
        return outputs

    def _install_hooks(self, block: nn.Module) -> list:
        handles = [self.modules[n].register_forward_pre_hook(lambda m, a, n=n: self.hook(n, m, a)) for n in self.group_of]
        return handles + self.acts.hooks(block)

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._codes_only = [], {}  # (dropped weights stay dropped: the IO writes the codes)

    def _note_act_sparsity(self) -> None:
        """Each report's achieved activation sparsity on the calibration inputs, from its sparsifier's counts."""
        for report in self.reports:
            report.act_sparsity = self.acts.achieved(report.name.removeprefix(f"{self.block_name}."))

    def run_bounded(self, block: nn.Module, inputs: list[BlockInputs]) -> list[torch.Tensor]:
        """``run``'s result with one chunk's activations alive at a time (module docstring): per group, a pass
        over the chunks that stops at it; then a pass for the outputs."""
        self._handles = self._install_hooks(block)
        try:
            for g, names in enumerate(self.groups):
                self._stop_at = g
                for inp in inputs:
                    try:
                        forward_block(block, inp, self.recipe.forward_precision)
                    except _Stop:
                        continue
                    raise RuntimeError(f"{self.block_name}: the block's forward never called {names}")
                self._compress_group(g)
            self._stop_at = None
            outputs = [forward_block(block, inp, self.recipe.forward_precision) for inp in inputs]
            self._note_act_sparsity()
        finally:
            self._remove_hooks()
        return outputs

    @torch.no_grad()
    def _compress_group(self, g: int) -> None:
        allocator.trim()  # blocks cached by the forward: compressing allocates other shapes, the next stretch too
        gram, norms, hists = self.stats.pop(g)
        rows, floor = self.rows.get(g, 0), max(self.min_tokens.get(n, 0) for n in self.groups[g])
        if rows < floor:  # too few tokens to trust (an expert the router seldom picks)
            log.debug("%s: %d calibration tokens (< %d): compressed without data",
                      ", ".join(f"{self.block_name}.{n}" for n in self.groups[g]), rows, floor)
            n_in = gram.in_features
            stats = InputStats(torch.eye(n_in), torch.ones(n_in), torch.zeros(n_in) if self.with_mean else None)
        else:
            stats = InputStats(gram.finalize(), *((norms.finalize(), norms.mean()) if norms else ()))
        for name in self.groups[g]:
            start = time.perf_counter()
            W = models.weight_view(self.modules[name])  # (out, in), a view of the module's weight
            W32 = W.to(torch.float32, copy=True)  # the original, kept for the error
            result = compress_weight(W32, stats, self.recipe, scale_dtype=self.scale_dtype or W.dtype)
            W.copy_(result.W.to(W.dtype))
            W_hat = W.float()
            full = f"{self.block_name}.{name}"
            grid = result.grid
            if grid is not None and self.keep_codes:
                self.quantized[full] = QuantizedWeight(result.codes, grid)
                if self.codes_only:
                    self._codes_only[name] = _CodesOnly(self.modules[name], self.quantized[full])
                    self._handles += self._codes_only[name].hooks(self.modules[name])
            self.reports.append(LayerReport(
                name=full,
                shape=tuple(W.shape),
                target_sparsity=self.recipe.prune.pattern.sparsity if self.recipe.prune else 0.0,
                sparsity=float((W_hat == 0).float().mean()),
                rel_error=reconstruction_error(W32, W_hat, stats.G),
                error_tokens=gram.tokens if rows >= floor else 0,
                seconds=time.perf_counter() - start,
                tokens=rows,
                data_free=rows < floor,
                bits=grid.bits if grid else None,
                group_size=grid.group_size if grid else None,
                act_target=self.acts.targets.get(name),
            ))
            self.acts.set_thresholds(name, hists, W_hat)
        self.compressed.add(g)
        allocator.trim()


class _CodesOnly:
    """A quantized linear that holds its codes only: its weight is dropped (to the meta device) and decoded for
    each later call, for that call alone; ``grid.decode(codes)`` is the compressed weight, so the outputs are
    the same."""

    def __init__(self, linear: nn.Module, held: QuantizedWeight):
        weight = linear.weight
        self.shape, self.dtype, self.device = weight.shape, weight.dtype, weight.device
        self.held = held
        self.dropped = nn.Parameter(torch.empty(self.shape, dtype=self.dtype, device="meta"), requires_grad=False)
        self.drop(linear)

    def decode(self, linear: nn.Module, *_args) -> None:
        linear._parameters["weight"] = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        models.weight_view(linear).copy_(self.held.grid.decode(self.held.codes))

    def drop(self, linear: nn.Module, *_args) -> None:
        linear._parameters["weight"] = self.dropped

    def hooks(self, linear: nn.Module) -> list:
        return [linear.register_forward_pre_hook(self.decode, prepend=True), linear.register_forward_hook(self.drop)]


def forward_block(block: nn.Module, inp: BlockInputs, precision: str = "fp32") -> torch.Tensor:
    """``block``'s output hidden states for ``inp``, in its dtype; ``precision="bf16"``: an fp32 model's under
    bf16 autocast (entered here: autocast is per thread, and the chunks run in workers). A bf16 or fp16 model
    runs in its own dtype: autocast would only round an fp16 model's matmul inputs to fewer mantissa bits."""
    bf16 = precision == "bf16" and inp.hidden.dtype == torch.float32
    with torch.inference_mode(), torch.autocast(inp.hidden.device.type, torch.bfloat16, enabled=bf16):
        out = block(inp.hidden, *inp.args, **inp.kwargs)
    out = out[0] if isinstance(out, (tuple, list)) else out
    return out.to(inp.hidden.dtype)
