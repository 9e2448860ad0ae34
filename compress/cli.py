"""The ``compress`` command: parse, build configs, call the library, print a summary. Nothing else."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from compress import load as compress_load
from compress import pruning as prune_methods
from compress.kernels import allocator

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    help="Post-training compression of causal LMs: prune, evaluate, inspect.",
)
log = logging.getLogger("compress")

METHOD_HELP = "; ".join(f"{m.name}: {m.summary}" for m in prune_methods.METHODS.values())


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(path)
    except OSError as err:
        if tmp.parent.is_dir():
            tmp.unlink(missing_ok=True)
        _fail(f"writing {path} failed: {err.strerror or err}", 1)


@app.command()
def prune(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="Hub id, local model folder, or .gguf file.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (refused if it exists, unless --overwrite; "
                                      "one run at a time per folder).")],
    method: Annotated[Optional[str], typer.Option(help=f"Pruning method (default wanda when --sparsity/--pattern is "
                                                  f"given). {METHOD_HELP}.")] = None,
    sparsity: Annotated[Optional[float], typer.Option(help="Unstructured: fraction of zeros in (0, 1).")] = None,
    pattern: Annotated[Optional[str], typer.Option(help="N:M semi-structured, e.g. 2:4 or 4:8 (instead of --sparsity); "
                                                   "or gG with --sparsity: prune whole runs of G inputs of a row (GQSA).")] = None,
    scope: Annotated[Optional[str], typer.Option(help="Comparison group for unstructured masks: row | matrix | block "
                                                 "(default: the method's paper: magnitude matrix, wanda row, sparsegpt block).")] = None,
    quant: Annotated[Optional[str], typer.Option(help="Quantize weights: wBgG (B bits 2..8, groups of G inputs, e.g. "
                                                 "w4g128) or wB (one scale per output channel).")] = None,
    quant_sym: Annotated[bool, typer.Option("--quant-sym/--quant-asym", help="Symmetric grid (zero point 0) or "
                                            "asymmetric (a zero point per group).")] = True,
    quant_method: Annotated[str, typer.Option(help="rtn (round to nearest) | gptq (error-compensating, uses the "
                                              "calibration Hessian; joint with --method sparsegpt).")] = "gptq",
    quant_actorder: Annotated[bool, typer.Option("--quant-actorder/--no-quant-actorder", help="GPTQ: visit columns "
                                                 "by decreasing input energy (scales stay the static groups').")] = True,
    act_sparsity: Annotated[Optional[float], typer.Option(help="Activation sparsity: target fraction of zeroed inputs "
                                                          "per targeted linear (thresholds calibrated, applied by "
                                                          "compress.load and compress eval).")] = None,
    act_method: Annotated[str, typer.Option(help="teal (|x| per linear) | chess (channel-wise on gate activations) | "
                                            "wina (|x_j|·‖W[:,j]‖).")] = "teal",
    act_targets: Annotated[Optional[list[str]], typer.Option(help="Regex of linears whose inputs are sparsified "
                                                             "(repeatable; default all).")] = None,
    act_sparsity_file: Annotated[Optional[Path], typer.Option(help="JSON {linear name: sparsity} overriding "
                                                              "--act-sparsity per layer.")] = None,
    act_prefill: Annotated[str, typer.Option(help="sparse (every token) | dense (only single-token decode steps).")] = "sparse",
    act_positions: Annotated[str, typer.Option(help="Thresholds per position band, so the target holds at every "
                                               "position and serving length: auto (bands from 0, 64, 256, ... "
                                               "up to half of --seqlen) | off (one set per linear, as the papers) "
                                               "| first positions of the bands after 0, e.g. 64,256.")] = "auto",
    act_scale: Annotated[str, typer.Option(help="token (thresholds relative to each token's input RMS, so inputs "
                                           "whose scale drifts with position or context keep the target) | none "
                                           "(absolute thresholds, as the papers).")] = "token",
    fmt: Annotated[str, typer.Option("--format", help="Output: dense (plain transformers safetensors) | "
                                     "compressed-tensors (pack-quantized, loads in vLLM; needs --quant w4/w8) | packed.")] = "dense",
    calib: Annotated[str, typer.Option(help="Calibration text: wikitext2 (hub, needs network), a .txt / .jsonl path, "
                                       "or self (sampled from the model itself, from its BOS token).")] = "wikitext2",
    nsamples: Annotated[int, typer.Option(help="Calibration windows.")] = 128,
    seqlen: Annotated[int, typer.Option(help="Tokens per calibration window (capped by the model's context).")] = 2048,
    seed: Annotated[int, typer.Option(help="Seed of the calibration sampling.")] = 0,
    ignore: Annotated[Optional[list[str]], typer.Option(help="Regex of linear names to leave as they are (repeatable).")] = None,
    allocation: Annotated[str, typer.Option(help="Sparsity per decoder block: uniform | owl (less where the dense "
                                            "model has more outlier weights, mean kept; Yin et al. 2023) | a .json "
                                            "list of one sparsity per block.")] = "uniform",
    owl_m: Annotated[float, typer.Option(help="OWL: a weight is an outlier above M x its block's mean Wanda score.")] = 5.0,
    owl_lambda: Annotated[float, typer.Option(help="OWL: block sparsities span --sparsity ± lambda.")] = 0.08,
    refine: Annotated[Optional[str], typer.Option(help="After pruning, training-free prune-and-grow swaps per row "
                                                  "on every pruned linear, MLP and attention, counts per row and "
                                                  "N:M group kept: dsnot (DSnoT's rule from channel means; Zhang "
                                                  "et al. 2023; after SparseGPT revived weights take their "
                                                  "error-minimizing value, not their dense one) | swap (ranked on "
                                                  "the exact calibration error, revived weights at their best "
                                                  "value).")] = None,
    refine_cycles: Annotated[int, typer.Option(help="--refine: at most this many proposals (dsnot) or swaps "
                                                    "(swap) per row.")] = 50,
    refine_var_power: Annotated[float, typer.Option(help="DSnoT: growing score |W·mean(x)| / var(x)^p.")] = 1.0,
    self_temperature: Annotated[float, typer.Option(help="--calib self: sampling temperature.")] = 1.0,
    self_top_p: Annotated[float, typer.Option(help="--calib self: nucleus sampling mass (1: off).")] = 0.95,
    blocksize: Annotated[int, typer.Option(help="SparseGPT/GPTQ: columns per lazy-update block.")] = 128,
    dampening: Annotated[float, typer.Option(help="SparseGPT/GPTQ: fraction of the mean Hessian diagonal added to it.")] = 0.01,
    gram_precision: Annotated[str, typer.Option(help="Products of the calibration Gram matrix (the SparseGPT/GPTQ "
                                                "Hessian), summed in fp32 either way: fp32 | bf16 (inputs rounded to "
                                                "bf16: 3-4x faster on CPUs with AMX, moves G by <1e-3, far less than "
                                                "the calibration sample does) | auto (bf16 on CPUs with AMX, "
                                                "else fp32).")] = "auto",
    forward_precision: Annotated[str, typer.Option(help="The calibration forwards that make each block's inputs: "
                                                   "fp32 | bf16 (autocast: matmuls and attention in bf16, the "
                                                   "residual stream in the model's dtype; 2.5x faster on CPUs with "
                                                   "AMX, moves a block's output by ~1%) | auto (bf16 on CPUs with "
                                                   "AMX, else fp32).")] = "auto",
    device: Annotated[str, typer.Option(help="Where the work happens: auto | cpu | cuda[:N]. Weights rest on CPU.")] = "auto",
    dtype: Annotated[str, typer.Option(help="Model dtype: auto (checkpoint's; float32 for .gguf) | float32 | bfloat16 | float16.")] = "auto",
    chunk_samples: Annotated[int, typer.Option(help="Calibration samples per forward chunk (0: default 8). Same result "
                                               "for any value, one forward per block; smaller uses less memory.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out folder, once the new one is complete: "
                                            "only an empty folder or one compress wrote, never the input's.")] = False,
    quant_lm_head: Annotated[bool, typer.Option("--quant-lm-head", help="Also quantize lm_head (round to nearest on "
                                                 "--quant's grid); a tied input embedding shares it.")] = False,
    resume: Annotated[bool, typer.Option(help="Continue the unfinished run of this --out (after a crash or kill) "
                                              "from its last saved block; refused if anything about the run differs.")] = False,
    save_every: Annotated[float, typer.Option(help="Seconds between saves of the resume state (0: after every "
                                                   "block).")] = 60.0,
    max_memory: Annotated[str, typer.Option(help="Memory budget of the calibration activations, e.g. 8GiB or 500MB; "
                                            "auto: 80% of the device's available memory; 0: no limit. Over it, "
                                            "blocks run bounded (same result, ~2.4x the forward work).")] = "auto",
    recipe_file: Annotated[Optional[Path], typer.Option("--recipe", help="Recipe file (YAML or JSON: the fields "
                                                        "of a compression.json's recipe, or a whole compression.json "
                                                        "to reproduce its run); flags given here override it.")] = None,
    allow_partial: Annotated[bool, typer.Option(help="Run even when most of the decoder blocks' weights are not "
                                                "linear layers (e.g. fused MoE experts): only the linears are "
                                                "compressed.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Prune and/or quantize MODEL's decoder linears block by block on calibration text; save to --out."""
    from safetensors import SafetensorError

    from compress import export, recipes, run
    from compress.checkpoint import CheckpointError

    flags = {name: value for name, value in locals().items() if name in recipes.DEFAULTS}
    _setup_logging(verbose)
    try:
        if recipe_file is not None:  # the file's recipe, with the flags given on the command line on top
            base, file_fmt = recipes.read(recipe_file)
            given = {k: v for k, v in flags.items() if _on_command_line(ctx, k)}
            flags = recipes.merge(recipes.to_flags(base), given)
            fmt = file_fmt if file_fmt and not _on_command_line(ctx, "fmt") else fmt
        report = run.prune(model, recipes.from_flags(flags), out, fmt=fmt, device=device, dtype=dtype,
                           chunk_samples=chunk_samples, max_memory=max_memory, overwrite=overwrite, resume=resume,
                           save_every=save_every, allow_partial=allow_partial)
    except CheckpointError as err:  # an input file damaged, before or during the run: nothing was written
        _fail(f"reading {model} failed: {err}")
    except ValueError as err:
        _fail(str(err))
    except OSError as err:  # disk full, unwritable folder: the previous output and the input are untouched
        _fail(f"writing {out} failed: {err.strerror or err}" + (f" ({err.filename})" if err.filename else ""), 1)
    except SafetensorError as err:  # the same failures met inside safetensors' writer (e.g. os error 28)
        _fail(f"writing {out} failed: {err}", 1)
    _print_prune_summary(report, out, export.read_metadata(out)["storage"])


def _on_command_line(ctx: typer.Context, name: str) -> bool:
    """Whether parameter ``name`` was given on the command line (not left at its default)."""
    return ctx.get_parameter_source(name).name == "COMMANDLINE"


def _print_prune_summary(report, out: Path, storage: dict) -> None:
    """One row per kind of linear (q_proj, down_proj, ...) over all blocks, then the totals."""
    kinds: dict[str, list] = {}
    for layer in report.layers:
        kinds.setdefault(re.sub(r"^.*?\.\d+\.", "", layer.name), []).append(layer)
    typer.echo(f"\n{'linear':<24}{'count':>6}{'sparsity':>10}{'bits':>6}{'act.sparsity':>13}{'rel.error':>11}"
               f"{'worst':>9}{'seconds':>9}")
    for kind, layers in [*kinds.items(), ("all", report.layers)]:
        numel = sum(r.shape[0] * r.shape[1] for r in layers)
        sparsity = sum(r.sparsity * r.shape[0] * r.shape[1] for r in layers) / numel
        error = sum(r.rel_error for r in layers) / len(layers)
        bits = {r.bits for r in layers}
        bits_text = "-" if bits == {None} else "/".join(str(b) for b in sorted(b for b in bits if b))
        acts = [r.act_sparsity for r in layers if r.act_sparsity is not None]
        act_text = f"{sum(acts) / len(acts):.4f}" if acts else "-"
        typer.echo(f"{kind:<24}{len(layers):>6}{sparsity:>10.4f}{bits_text:>6}{act_text:>13}{error:>11.4f}"
                   f"{max(r.rel_error for r in layers):>9.4f}{sum(r.seconds for r in layers):>9.1f}")
    typer.echo(f"\ncompressed linears: {storage['linears_stored'] / 2**20:.1f} MiB stored vs "
               f"{storage['linears_dense'] / 2**20:.1f} MiB dense ({storage['format']})")
    typer.echo(f"{report.recipe}: {report.seconds:.1f} s in the pipeline; wrote {out}")


@app.command("eval")
def evaluate(
    model: Annotated[str, typer.Argument(help="Output folder of compress, a model folder, hub id, or .gguf file.")],
    ppl: Annotated[Optional[str], typer.Option(help="Perplexity text: wikitext2 (hub test split) or a .txt / .jsonl "
                                               "path (default wikitext2 when --tasks is not given).")] = None,
    tasks: Annotated[Optional[str], typer.Option(help="lm-eval tasks, comma-separated (e.g. arc_easy,hellaswag).")] = None,
    include_path: Annotated[Optional[Path], typer.Option(help="Folder of local lm-eval task YAMLs.")] = None,
    num_fewshot: Annotated[Optional[int], typer.Option(help="Few-shot examples per task (lm-eval's default: 0).")] = None,
    seed: Annotated[int, typer.Option(help="lm-eval's seeds (sampling of few-shot examples and of --limit).")] = 0,
    offline: Annotated[bool, typer.Option(help="Never touch the network: tasks' data must be local.")] = False,
    seqlen: Annotated[int, typer.Option(help="Perplexity window length in tokens (capped by the model's context).")] = 2048,
    limit: Annotated[Optional[int], typer.Option(help="Only the first N perplexity windows / N examples per task.")] = None,
    batch_size: Annotated[int, typer.Option(help="Windows / requests per forward.")] = 1,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda[:N].")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto | float32 | bfloat16 | float16.")] = "auto",
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the result as JSON here.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Perplexity (the Wanda/SparseGPT papers' protocol) and lm-eval accuracy of MODEL, dense or compressed."""
    from tqdm import tqdm

    from compress import export, models, outputs
    from compress.calibration.data import read_text
    from compress.evals.perplexity import PROTOCOL, perplexity
    from compress.evals.zeroshot import TaskError, set_offline, zero_shot

    _setup_logging(verbose)
    task_list = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else []
    if ppl is None and not task_list:
        ppl = "wikitext2"
    try:
        if limit is not None and limit < 1:
            raise ValueError(f"--limit {limit} must be at least 1")
        if seqlen < 2 or batch_size < 1:
            raise ValueError(f"--seqlen {seqlen} must be >= 2 and --batch-size {batch_size} >= 1")
        if include_path is not None and not include_path.is_dir():
            raise ValueError(f"--include-path {str(include_path)!r} is not a folder: pass the folder of your task YAMLs")
        if offline:
            set_offline()
        if ppl not in (None, "wikitext2"):
            read_text(ppl)
        dev = models.resolve_device(device)
        start = time.perf_counter()
        lm, tokenizer = compress_load(model, dtype, with_tokenizer=True)
        load_seconds = time.perf_counter() - start
    except ValueError as err:
        _fail(str(err))
    lm.to(dev)
    sparsifiers = lm.compress_sparsifiers
    out = {"model": model}
    if ppl is not None:
        try:
            with tqdm(desc="perplexity", unit="window", file=sys.stderr) as bar:
                def on_window(done, total):
                    bar.total = total
                    bar.update(done - bar.n)

                start = time.perf_counter()
                result = perplexity(lm, tokenizer, ppl, seqlen, limit, batch_size, dev, on_window)
        except ValueError as err:  # a text shorter than one window, the hub's text out of reach
            _fail(f"--ppl {ppl}: {err}")
        out.update(result.to_dict(), ppl_seconds=time.perf_counter() - start)
        typer.echo(f"perplexity {result.ppl:.4f} on {ppl}: {result.windows} windows x {result.seqlen} tokens")
        typer.echo(f"protocol: {PROTOCOL}")
    if task_list:
        try:
            zs = zero_shot(lm, tokenizer, task_list, limit=limit, num_fewshot=num_fewshot, batch_size=batch_size,
                           seed=seed, include_path=str(include_path) if include_path else None)
        except TaskError as err:
            _fail(str(err))
        out["zero_shot"] = zs.to_dict()
        for task, metrics in zs.tasks.items():
            shown = ", ".join(f"{k} {v:.4f} ± {metrics.get(k + '_stderr', float('nan')):.4f}"
                              for k, v in metrics.items() if not k.endswith("_stderr"))
            typer.echo(f"{task}: {shown}")
    act = {name: hook.sparsity for name, hook in sparsifiers.items()}
    if act:
        first = next(iter(sparsifiers.values()))
        edges = first.edges.tolist()
        bands = f"thresholds per position band from 0, {', '.join(map(str, edges))}" if edges else "one threshold set per linear"
        bands += ", relative to each token's input RMS" if first.token_scale else ", absolute"
        typer.echo(f"activation sparsity on the evaluated text ({'decode steps only, prefill dense' if first.dense_prefill else 'every token'}; "
                   f"{bands}): mean {sum(act.values()) / len(act):.4f}, min {min(act.values()):.4f}, "
                   f"max {max(act.values()):.4f} over {len(act)} linears")
    if json_out:
        out.update(compression=export.read_metadata(Path(model)) if Path(model).is_dir() else None,
                   activation_sparsity=act or None, load_seconds=load_seconds, versions=outputs.versions())
        _write_json(json_out, out)


@app.command()
def generate(
    model: Annotated[str, typer.Argument(help="Output folder of compress (packed folders run on compress's kernels), "
                                              "a model folder, hub id, or .gguf file.")],
    prompt: Annotated[str, typer.Argument(help="Text to continue.")],
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate (greedy).")] = 32,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads (default: torch's).")] = None,
    dtype: Annotated[str, typer.Option(help="auto | float32 | bfloat16 | float16.")] = "auto",
    compile: Annotated[bool, typer.Option("--compile", help="Decode steps through torch.compile on a static KV "
                                          "cache (compiles once, a minute or two on a CPU; then several times "
                                          "faster on small models, whose eager decode is mostly Python).")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Greedy continuation of PROMPT by MODEL as compress.load runs it, with the decode speed."""
    import torch

    from compress.bench import greedy

    _setup_logging(verbose)
    try:
        if max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens {max_new_tokens} must be at least 1")
        if threads is not None and threads < 1:
            raise ValueError(f"--threads {threads} must be at least 1")
        lm, tokenizer = compress_load(model, dtype, with_tokenizer=True)
    except ValueError as err:
        _fail(str(err))
    if threads:
        torch.set_num_threads(threads)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    if compile:
        log.info("compiling the decode step (torch.compile, inductor)")
        start = time.perf_counter()
        greedy(lm, ids, 2, compiled=True)
        log.info("compiled in %.0f s", time.perf_counter() - start)
    start = time.perf_counter()
    greedy(lm, ids, 1, compile)  # prefill and one token, timed apart
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    out = greedy(lm, ids, max_new_tokens, compile)
    total = time.perf_counter() - start
    new = len(out)
    typer.echo(prompt + tokenizer.decode(out, skip_special_tokens=True))
    decode = max(total - prefill, 1e-9)
    typer.echo(f"\n{new} new tokens in {total:.2f} s; decode {(new - 1) / decode:.1f} tokens/s "
               f"(prefill of {ids.shape[1]} tokens {prefill * 1e3:.0f} ms, {torch.get_num_threads()} threads)", err=True)


@app.command()
def bench(
    model: Annotated[Path, typer.Argument(help="Output folder of compress (packed folders run on compress's kernels).")],
    threads: Annotated[Optional[list[int]], typer.Option(help="Thread counts to measure (repeat the option).")] = None,
    new_tokens: Annotated[int, typer.Option(help="Greedy tokens per decode measurement.")] = 128,
    repeats: Annotated[int, typer.Option(help="Runs per figure (medians).")] = 3,
    prompt: Annotated[str, typer.Option(help="Decode prompt.")] = "The history of the city began",
    compile: Annotated[bool, typer.Option("--compile", help="Also measure every model's decode through "
                                          "torch.compile (as compress generate --compile).")] = False,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the results as JSON here.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Per-layer GEMV and end-to-end greedy decode speed of MODEL vs the dense original (from its
    compression.json) and vs the dense export of the same compressed weights; llama.cpp on the original's GGUF
    when llama-cpp-python is installed."""
    import torch

    from compress import bench as speed
    from compress import export, models

    _setup_logging(verbose)
    threads = threads or [1, 2]
    try:
        if new_tokens < 2 or repeats < 1 or min(threads) < 1:
            raise ValueError(f"--new-tokens {new_tokens} must be >= 2, --repeats {repeats} and --threads {threads} >= 1")
        meta = export.read_metadata(model)
        if meta is None:
            raise ValueError(f"{str(model)!r} has no compression.json: pass a folder written by compress prune")
        lm, tokenizer = compress_load(str(model), with_tokenizer=True)
    except ValueError as err:
        _fail(str(err))
    source = meta.get("source_model")
    contenders = {"compressed": lm, "dense export": speed.dense_twin(lm)}
    try:
        contenders["dense original"] = models.load(source)[0] if source else None
    except ValueError as err:
        log.warning("dense original %s not loadable (%s): compared with the dense export only", source, err)
    contenders = {k: v for k, v in contenders.items() if v is not None}
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    first = {name: speed.greedy(m, ids, 32) for name, m in contenders.items()}
    same_32 = bool(torch.equal(first["compressed"], first["dense export"]))
    results = {"model": str(model), "source_model": source, "prompt": prompt, "new_tokens": new_tokens,
               "repeats": repeats, "same_first_32_tokens_as_dense_export": same_32, "by_threads": {}}
    typer.echo(f"first 32 greedy tokens identical to the dense export of the same weights: {same_32}")
    for n in threads:
        torch.set_num_threads(n)
        rows = speed.gemv(lm, repeats=max(repeats, 11))
        rates = speed.decode_speed(contenders, ids, new_tokens, repeats)
        if compile:
            for m in contenders.values():  # compile outside the timed runs
                speed.greedy(m, ids, 2, compiled=True)
            compiled = speed.decode_speed(contenders, ids, new_tokens, repeats, compiled=True)
            rates.update({f"{name} (compiled)": rate for name, rate in compiled.items()})
        llama = speed.llama_cpp_speed(source, prompt, new_tokens, n, repeats) if source and source.endswith(".gguf") else None
        results["by_threads"][n] = {"gemv": rows, "decode_tokens_per_s": rates, "llama_cpp_tokens_per_s": llama}
        typer.echo(f"\n{n} thread(s)")
        typer.echo(f"{'layer':<40}{'layout':>12}{'shape':>12}{'ours ms':>9}{'fp32 ms':>9}{'bf16 ms':>9}{'int4 ms':>9}{'GB/s':>7}")
        for r in rows:
            ms = r["ms"]
            typer.echo(f"{r['layer']:<40}{r['layout']:>12}{'x'.join(map(str, r['shape'])):>12}{ms['ours']:>9.3f}"
                       f"{ms['fp32']:>9.3f}{ms['bf16']:>9.3f}{ms.get('torch int4', float('nan')):>9.3f}{r['GBps']:>7.1f}")
        base = rates.get("dense original") or rates["dense export"]
        for name, rate in rates.items():
            typer.echo(f"decode {name:<27} {rate:7.1f} tokens/s  ({rate / base:.2f}x)")
        if llama is not None:
            best = max(rate for name, rate in rates.items() if name.startswith("compressed"))
            typer.echo(f"decode {'llama.cpp (GGUF)':<27} {llama:7.1f} tokens/s  ({llama / base:.2f}x); compressed "
                       f"(fastest) is {best / llama:.2f}x llama.cpp")
    if json_out:
        _write_json(json_out, results)


@app.command()
def report(
    results: Annotated[list[Path], typer.Argument(help="JSON files written by compress eval --json.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for report.md and the PNG plots.")],
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out folder that compress report wrote.")] = False,
) -> None:
    """Compare evaluated models: a markdown table (dense first, deltas vs dense) and plots vs sparsity. Runs
    measured under another protocol than the dense run (text, windows, tasks, limits) get a table of their own."""
    from compress import outputs
    from compress.evals.report import markdown, plot, read_run

    try:
        runs = [read_run(path) for path in results]
        with outputs.claim(out, overwrite, inputs=tuple(map(str, results)), marker=REPORT_MARKER) as target:
            table = markdown(runs)
            with target.writing() as tmp:
                (tmp / "report.md").write_text(table + "\n")
                plots = plot(runs, tmp)
                (tmp / REPORT_MARKER).write_text(json.dumps({"results": [str(p) for p in results],
                                                              "versions": outputs.versions()}, indent=2) + "\n")
    except ValueError as err:
        _fail(str(err))
    except OSError as err:
        _fail(f"writing {out} failed: {err.strerror or err}", 1)
    typer.echo(table)
    typer.echo(f"\nwrote {out / 'report.md'} and {', '.join(p.name for p in plots)}")


REPORT_MARKER = "report.json"  # marks a folder compress report wrote (what --overwrite may replace)


@app.command()
def info(
    folder: Annotated[Path, typer.Argument(help="A folder written by compress prune (or any safetensors model).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Per-layer sparsity, bits, group size and bytes, read from the stored weights themselves, and totals."""
    from compress import export

    if not folder.is_dir():
        _fail(f"{str(folder)!r} is not a folder: pass an output folder of compress prune")
    try:
        rows = export.layer_table(folder)
        meta = export.read_metadata(folder)
    except ValueError as err:
        _fail(str(err))
    numel = lambda r: r["shape"][0] * r["shape"][1]  # noqa: E731
    linear_rows = [r for r in rows if r["in_block"]]
    total = sum(numel(r) for r in linear_rows) or 1
    all_total = sum(numel(r) for r in rows) or 1
    summary = {"block_linears_sparsity": sum(r["sparsity"] * numel(r) for r in linear_rows) / total,
               "all_weights_sparsity": sum(r["sparsity"] * numel(r) for r in rows) / all_total,
               "block_linears_bytes": sum(r["bytes"] for r in linear_rows),
               "block_linears_bits_per_weight": 8 * sum(r["bytes"] for r in linear_rows) / total,
               "recipe": meta.get("recipe") if meta else None}
    if as_json:
        typer.echo(json.dumps({"layers": rows, **summary}, indent=2))
        return
    width = max(len(r["name"]) for r in rows)
    typer.echo(f"{'tensor':<{width}}  {'shape':>14}  {'sparsity':>8}  {'N:M':>4}  {'bits':>4}  {'group':>5}  {'bytes':>10}")
    for r in rows:
        typer.echo(f"{r['name']:<{width}}  {'x'.join(map(str, r['shape'])):>14}  {r['sparsity']:>8.4f}  {r['nm']:>4}  "
                   f"{r['bits']:>4}  {r['group_size'] or '-':>5}  {r['bytes']:>10}")
    typer.echo(f"\ndecoder linears: {summary['block_linears_sparsity']:.4f} zeros, "
               f"{summary['block_linears_bytes'] / 2**20:.2f} MiB on disk "
               f"({summary['block_linears_bits_per_weight']:.2f} bits per weight); "
               f"all 2-D weights: {summary['all_weights_sparsity']:.4f} zeros")
    if meta:
        typer.echo(f"recipe: {meta['report'].get('recipe')}, format {meta.get('format', 'dense')}, "
                   f"calibration {meta['calibration']}")


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    allocator.return_freed_memory_to_os()
    app()


if __name__ == "__main__":
    main()
