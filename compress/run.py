"""``compress.prune``: the whole of a ``compress prune`` run as one library call.

Order of work: every check that needs no model (recipe, format, calibration source, the output's claim)
-> load (streamed from a local safetensors folder, else whole) -> the checks that need the model (layers,
format, the share of the blocks' weights the recipe reaches) -> calibration tokens -> OWL's allocation
-> memory plan and resume fingerprint -> the block-by-block pipeline writing the output as it goes -> the
metadata and the rename into place (``outputs``).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from compress import experts, export, models, outputs, pipeline
from compress.config import Recipe
from compress.kernels import allocator
from compress.memory import block_cache_bytes, memory_budget

log = logging.getLogger(__name__)


def prune(model: str, recipe: Recipe, out: str | Path, *, fmt: str = "dense", gguf_dtype: str = "f16", device: str = "auto",
          dtype: str = "auto", chunk_samples: int = 0, max_memory: str = "auto", overwrite: bool = False,
          resume: bool = False, save_every: float = 60.0, allow_partial: bool = False,
          moe: experts.MoeOptions = experts.MoeOptions(), progress: bool = True) -> pipeline.Report:
    """Compress ``model`` (hub id, local folder or .gguf) with ``recipe`` on its calibration text
    (``recipe.calib``) and write the result to ``out`` in ``fmt`` (dense | compressed-tensors | packed |
    gguf: one file, ``out`` ending in ``.gguf``, its unquantized 2-D tensors in ``gguf_dtype``).

    Run options as the ``compress prune`` flags of the same names: ``chunk_samples`` (0: default),
    ``max_memory`` (a size, ``auto`` or ``0``), ``overwrite``, ``resume``, ``save_every`` (seconds),
    ``allow_partial`` (run even when most of the blocks' weights are not linears the recipe reaches), ``moe``
    (``--moe-calibration``, ``--moe-min-tokens``: how mixture-of-experts experts are calibrated).

    Returns:
        The run's report (also in ``out/compression.json``).

    Raises:
        ValueError: bad input of any kind, before any work where it can be known then (one line, naming the
            value and the fix). ``checkpoint.CheckpointError`` (a ValueError) for an input file damaged
            during the run.
        OSError: the output could not be written (the previous output and the input are untouched).
    """
    from compress.calibration import selfgen
    from compress.calibration.data import calibration_batches, check_source
    from compress.calibration.stats import resolve_precision
    from compress.checkpoint import load_module

    out = Path(out)
    export.check_format(fmt, recipe, out, gguf_dtype)
    if chunk_samples < 0:
        raise ValueError(f"--chunk-samples {chunk_samples} must be 0 (all) or positive")
    if recipe.calib.source != selfgen.SOURCE:
        check_source(recipe.calib.source)
    with outputs.claim(out, overwrite, inputs=(model, recipe.calib.source)) as target:  # held to the rename
        finished = outputs.check_unfinished(out, resume)
        dev = models.resolve_device(device)
        recipe = replace(recipe, gram_precision=resolve_precision(recipe.gram_precision, dev),  # recorded resolved
                         forward_precision=resolve_precision(recipe.forward_precision, dev, "--forward-precision"))
        if max_memory.strip().lower() != "auto":
            memory_budget(max_memory, dev)  # a typo fails before the model loads
        t0 = time.perf_counter()
        opened = models.open_streamed(model, dtype)  # a local safetensors folder: one block in memory at a time
        lm, tokenizer, checkpoint = opened if opened else (*models.load(model, dtype), None)
        experts.unfuse_experts(lm)  # fused 3-D experts -> one linear per expert and matrix (open_streamed did)
        moe_blocks = len(experts.expert_blocks(lm))
        pipeline.check(lm, recipe)
        coverage = models.coverage(lm, recipe.ignore)
        coverage.check(allow_partial)
        export.check_layers(fmt, recipe, lm)
        if fmt == "gguf":
            export.gguf.check_model(lm, tokenizer, model)
        if fmt == "compressed-tensors":
            prefix = models.decoder_blocks(lm)[0]
            first = (lambda block: load_module(checkpoint, block, f"{prefix}.0")) if checkpoint else None
            if split := pipeline.split_groups(lm, recipe.ignore, first):
                raise ValueError(f"--ignore splits {', '.join(split[0])}, which read one input and are fused by "
                                 f"vLLM: ignore all of them or none")
        calib = recipe.calib
        max_ctx = getattr(lm.config, "max_position_embeddings", None) or calib.seqlen
        if calib.seqlen > max_ctx:
            log.warning("--seqlen %d exceeds the model's context %d: using %d", calib.seqlen, max_ctx, max_ctx)
            calib = replace(calib, seqlen=max_ctx)
            recipe = replace(recipe, calib=calib)
        if recipe.act is not None:  # compression.json and the resume fingerprint name the bands
            recipe = replace(recipe, act=recipe.act.resolved(calib.seqlen))
        if calib.source == selfgen.SOURCE:
            tokens, manifest = _self_calibration(model, dtype, lm, tokenizer, calib, dev, progress)
        else:
            tokens, manifest = calibration_batches(tokenizer, calib)
        allocator.release_free_heap()  # what tokenizing the text left free
        owl_ratios = None
        if recipe.prune is not None and recipe.prune.allocation == "owl":
            recipe, owl_ratios = _owl_allocation(lm, tokens, recipe, dev, chunk_samples, checkpoint, progress)
        plan = pipeline.plan_memory(lm, *tokens.shape, memory_budget(max_memory, dev), chunk_samples or None)
        fingerprint = _fingerprint(model, recipe, fmt, manifest, chunk_samples, dtype)
        if moe_blocks:
            fingerprint["moe"] = [moe.calibration, moe.min_tokens]
        if resume:
            outputs.check_fingerprint(out, fingerprint)
        _log_plan(recipe, calib, plan, model, time.perf_counter() - t0)
        if finished:  # killed after its output was complete: only the move into place was left
            with target.writing(resumable=True):
                log.info("--resume: %s holds the finished run: moving it into place, nothing recomputed", out)
            return pipeline.Report.from_dict(export.read_metadata(out)["report"])
        with target.writing(resumable=True) as tmp:
            output = export.StreamedOutput(lm, tmp, checkpoint, fmt, recipe, fingerprint=fingerprint,
                                           save_every=save_every, source=model, gguf_dtype=gguf_dtype)
            with _block_bar(len(models.decoder_blocks(lm)[1]), str(recipe), progress) as on_block:
                with allocator.reuse_large_blocks(block_cache_bytes(plan) if dev.type == "cpu" else 0):
                    report = pipeline.compress_sequential(lm, tokens, recipe, device=dev,
                                                          chunk_samples=chunk_samples or None, on_block=on_block,
                                                          io=output, bounded=plan.bounded, checked=True,
                                                          scale_dtype=_scale_dtype(fmt), moe=moe)
            sparse24 = recipe.prune is not None and (recipe.prune.pattern.n, recipe.prune.pattern.m) == (2, 4)
            metadata = {
                "source_model": model,
                "recipe": recipe.to_dict(),
                "format": fmt,
                "calibration": manifest.to_dict(),
                **({"owl_outlier_ratios": owl_ratios} if owl_ratios is not None else {}),
                "device": str(dev),
                "storage": export.storage_bytes(report, fmt, next(lm.parameters()).dtype,
                                                symmetric=recipe.quant is None or recipe.quant.symmetric,
                                                sparse24=sparse24),
                "report": {**report.to_dict(), "coverage": coverage.to_dict()},
                **({"moe": {"blocks": moe_blocks, "calibration": moe.calibration, "min_tokens": moe.min_tokens}}
                   if moe_blocks else {}),
            }
            output.finish(lm, tokenizer, metadata, act_thresholds=report.act_thresholds,
                          gate_space=report.gate_space, act_edges=report.act_edges)
    log.info("wrote %s%s", out, {"compressed-tensors": " (compressed-tensors, pack-quantized)",
                                 "gguf": " (GGUF for llama.cpp)"}.get(fmt, ""))
    return report


def _scale_dtype(fmt: str) -> torch.dtype | None:
    """The dtype group scales are fitted in: the one the format stores (GGUF's and the packed layouts' fp16),
    so the written weights are the ones the method fitted; else the model's (``None``)."""
    from compress.kernels.formats import PACKED_SCALE_DTYPE

    return {"gguf": export.gguf.SCALE_DTYPE, "packed": PACKED_SCALE_DTYPE}.get(fmt)


def _log_plan(recipe: Recipe, calib, plan, model: str, seconds: float) -> None:
    log.info("loaded %s in %.1f s; calibration %d x %d tokens from %s (seed %d)",
             model, seconds, calib.nsamples, calib.seqlen, calib.source, calib.seed)
    log.info("%s", plan.describe())
    log.info("calibration forwards in %s%s; Gram matrices: %s products summed in fp32", recipe.forward_precision,
             " (autocast)" if recipe.forward_precision == "bf16" else "", recipe.gram_precision)
    if recipe.act is not None:
        edges = recipe.act.edges(calib.seqlen)
        scale = ("relative to each token's input RMS" if recipe.act.scale == "token" else
                 "absolute (attention outputs grow with position: --act-scale token keeps the target at every length)")
        if edges:
            log.info("activation thresholds per position band, bands from positions 0, %s (the last also serves "
                     "positions past the %d-token calibration windows), %s", ", ".join(map(str, edges)),
                     calib.seqlen, scale)
        else:
            log.info("one activation threshold set per linear, calibrated on %d-token windows, %s", calib.seqlen, scale)


@contextmanager
def _block_bar(total: int, desc: str, enabled: bool):
    """A progress bar over the decoder blocks (on stderr, log lines kept above it); yields the pipeline's
    ``on_block`` callback."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    with tqdm(total=total, desc=desc, unit="block", file=sys.stderr, disable=not enabled) as bar, \
            logging_redirect_tqdm():
        def on_block(block_report, _total):
            bar.set_postfix(err=f"{block_report.mean_error:.4f}")
            bar.update()

        yield on_block


def _fingerprint(model: str, recipe: Recipe, fmt: str, manifest, chunk_samples: int, dtype: str) -> dict:
    """What a resumed run must share with the run it continues (as JSON-normal values)."""
    import transformers

    import compress

    path = Path(model)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else []
    stamp = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    fp = {"model": [model, stamp], "recipe": recipe.to_dict(), "format": fmt, "calibration": manifest.to_dict(),
          "chunk_samples": chunk_samples, "dtype": dtype,
          "versions": [compress.__version__, torch.__version__, transformers.__version__]}
    return json.loads(json.dumps(fp))


def _self_calibration(spec: str, dtype: str, lm, tokenizer, cfg, device, progress: bool):
    """``--calib self``: generate the calibration samples with the whole model (loaded for it when ``lm``
    is a streamed skeleton), then let it go."""
    from tqdm import tqdm

    from compress.calibration import selfgen

    streamed = any(p.device.type == "meta" for p in lm.parameters())
    gen_model = models.load(spec, dtype)[0] if streamed else lm
    log.info("--calib self: sampling %d x %d tokens from the model (temperature %g, top-p %g, seed %d)",
             cfg.nsamples, cfg.seqlen, cfg.temperature, cfg.top_p, cfg.seed)
    gen_model.to(device)
    try:
        with tqdm(total=cfg.nsamples * (cfg.seqlen - 1), desc="self-calibration", unit="token", unit_scale=True,
                  file=sys.stderr, disable=not progress) as bar:
            return selfgen.generate_calibration(gen_model, tokenizer, cfg, device,
                                                on_tokens=lambda done: bar.update(done - bar.n))
    finally:
        gen_model.to("cpu")
        del gen_model


def _owl_allocation(lm, tokens, recipe: Recipe, device, chunk_samples: int, checkpoint, progress: bool):
    """OWL's per-block sparsities from one forward of the dense model; the recipe that records them."""
    from tqdm import tqdm

    from compress.checkpoint import BlockSource
    from compress.pruning import owl

    prune_cfg = recipe.prune
    owl.allocate([0.0], prune_cfg.pattern.sparsity, prune_cfg.owl_lambda)  # a bad lambda fails before the pass
    n_blocks = len(models.decoder_blocks(lm)[1])
    io = BlockSource(checkpoint, models.decoder_blocks(lm)[0]) if checkpoint is not None else None
    log.info("OWL: outlier ratios of the dense model (M = %g), one forward through %d blocks", prune_cfg.owl_m, n_blocks)
    with tqdm(total=n_blocks, desc="OWL outlier ratios", unit="block", file=sys.stderr, disable=not progress) as bar:
        ratios = pipeline.outlier_ratios(lm, tokens, prune_cfg.owl_m, recipe.ignore, device=device,
                                         chunk_samples=chunk_samples or None, io=io, on_block=lambda *_: bar.update(),
                                         precision=recipe.forward_precision)
    block_sparsity = owl.allocate(ratios, prune_cfg.pattern.sparsity, prune_cfg.owl_lambda)
    log.info("OWL: block sparsities %s (mean %.4f)", " ".join(f"{s:.3f}" for s in block_sparsity),
             sum(block_sparsity) / len(block_sparsity))
    return replace(recipe, prune=replace(prune_cfg, block_sparsity=tuple(block_sparsity))), ratios
