"""The ``compress`` command: parse, build configs, call the library, print a summary. Nothing else."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from compress import pruning as prune_methods
from compress.bench import PROMPT
from compress.kernels import allocator

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    help="Post-training compression of causal LMs: prune, evaluate, inspect.",
)
log = logging.getLogger("compress")

METHOD_HELP = "; ".join(f"{m.name}: {m.summary}" for m in prune_methods.METHODS.values())
ActPrecision = Annotated[Optional[str], typer.Option(help="Inputs of the packed kernels' products: int8 (rounded per "
                                                     "block of 32, integer dot products, as llama.cpp's Q8_0), int8x2 "
                                                     "(two int8 roundings, ~15 bits, slower), fp32 (the reference). "
                                                     "Default: $COMPRESS_ACT_PRECISION, else int8.")]


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _set_act_precision(precision: str | None) -> None:
    from compress.kernels import ops

    env = os.environ.get(ops.ACT_ENV)
    try:
        if precision is not None or env is not None:
            ops.set_act_precision(precision or env)
    except ValueError as err:
        _fail(f"--act-precision: {err}" if precision else f"{ops.ACT_ENV}: {err}")


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
    quant_sym: Annotated[bool, typer.Option("--quant-sym/--quant-asym", help="Symmetric grid or a zero point per group.")] = True,
    quant_method: Annotated[str, typer.Option(help="rtn (round to nearest) | gptq (error-compensating, uses the "
                                              "calibration Hessian; joint with --method sparsegpt).")] = "gptq",
    quant_actorder: Annotated[bool, typer.Option("--quant-actorder/--no-quant-actorder", help="GPTQ: visit columns "
                                                 "by decreasing input energy (scales stay the static groups').")] = True,
    quant_scale: Annotated[str, typer.Option(help="Group scales: minmax (extremes on the grid's edges) | search (llama.cpp's "
                                             "imatrix search: least error weighted by input mean squares).")] = "search",
    quant_hessian_shrink: Annotated[float, typer.Option(help="GPTQ's Hessian (1-a)H + a·diag(H): 0 plain GPTQ, 1 no error "
                                                        "feedback, 0.5 best off the calibration text (RESULTS.md).")] = 0.5,
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
                                     "compressed-tensors (pack-quantized, loads in vLLM; needs --quant w4/w8) | packed "
                                     "| gguf (one file for llama.cpp, --out NAME.gguf; w4 -> Q4_0/Q4_1, w8 -> Q8_0).")] = "dense",
    gguf_dtype: Annotated[str, typer.Option(help="--format gguf: type of the 2-D tensors the recipe does not quantize "
                                            "(embeddings, output head, ignored linears): f16 | bf16 | f32 | q8_0.")] = "f16",
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
    dtype: Annotated[str, typer.Option(help="Model dtype: auto (checkpoint's; float32 for .gguf) | float32 | "
                                       "bfloat16 | float16.")] = "auto",
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
                                                "linear layers compress reaches: only the linears are compressed.")] = False,
    moe_calibration: Annotated[str, typer.Option(help="Mixture-of-experts: each expert calibrated on the tokens the "
                                                 "router sends it (routed) or on every token (all).")] = "routed",
    moe_min_tokens: Annotated[int, typer.Option(help="An expert that received fewer calibration tokens is compressed "
                                                "without data (magnitude / RTN), with a warning.")] = 16,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Prune and/or quantize MODEL's decoder linears (every expert of a mixture-of-experts model too) block by
    block on calibration text; save to --out."""
    from safetensors import SafetensorError

    from compress import export, recipes, run
    from compress.checkpoint import CheckpointError
    from compress.experts import MoeOptions

    flags = {name: value for name, value in locals().items() if name in recipes.DEFAULTS}
    _setup_logging(verbose)
    try:
        if recipe_file is not None:  # the file's recipe, with the flags given on the command line on top
            base, file_fmt = recipes.read(recipe_file)
            given = {k: v for k, v in flags.items() if _on_command_line(ctx, k)}
            flags = recipes.merge(recipes.to_flags(base), given)
            fmt = file_fmt if file_fmt and not _on_command_line(ctx, "fmt") else fmt
        report = run.prune(model, recipes.from_flags(flags), out, fmt=fmt, gguf_dtype=gguf_dtype, device=device, dtype=dtype,
                           chunk_samples=chunk_samples, max_memory=max_memory, overwrite=overwrite, resume=resume,
                           save_every=save_every, allow_partial=allow_partial,
                           moe=MoeOptions(moe_calibration, moe_min_tokens))
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
    from compress.reports import kind_table

    typer.echo("\n" + "\n".join(kind_table(report.layers)))
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
    act_precision: ActPrecision = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the result as JSON here.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Perplexity (the Wanda/SparseGPT papers' protocol) and lm-eval accuracy of MODEL, dense or compressed."""
    from compress.evals.evaluate import evaluate as run_eval
    from compress.evals.perplexity import PROTOCOL

    _setup_logging(verbose)
    _set_act_precision(act_precision)
    try:
        out = run_eval(model, ppl, [t.strip() for t in (tasks or "").split(",") if t.strip()],
                       include_path=include_path, num_fewshot=num_fewshot, seed=seed, offline=offline, seqlen=seqlen,
                       limit=limit, batch_size=batch_size, device=device, dtype=dtype)
    except ValueError as err:
        _fail(str(err))
    if "ppl" in out:
        typer.echo(f"perplexity {out['ppl']:.4f} on {out['source']}: {out['windows']} windows x {out['seqlen']} tokens")
        typer.echo(f"protocol: {PROTOCOL}")
    for task, metrics in (out.get("zero_shot") or {}).get("tasks", {}).items():
        typer.echo(f"{task}: " + ", ".join(f"{k} {v:.4f} ± {metrics.get(k + '_stderr', float('nan')):.4f}"
                                           for k, v in metrics.items() if not k.endswith("_stderr")))
    if out["activation_sparsity"]:
        typer.echo(_activation_line(out["activation_sparsity"], out["activation_setup"]))
    if json_out:
        _write_json(json_out, out)


def _activation_line(act: dict[str, float], setup: dict) -> str:
    edges = setup["position_bands_from"]
    bands = f"thresholds per position band from 0, {', '.join(map(str, edges))}" if edges else "one threshold set per linear"
    bands += ", relative to each token's input RMS" if setup["token_scale"] else ", absolute"
    tokens = "decode steps only, prefill dense" if setup["dense_prefill"] else "every token"
    return (f"activation sparsity on the evaluated text ({tokens}; {bands}): mean {sum(act.values()) / len(act):.4f}, "
            f"min {min(act.values()):.4f}, max {max(act.values()):.4f} over {len(act)} linears")


@app.command()
def generate(
    model: Annotated[str, typer.Argument(help="Output folder of compress (packed folders run on compress's kernels), "
                                              "a model folder, hub id, or .gguf file.")],
    prompt: Annotated[str, typer.Argument(help="Text to continue.")],
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate (greedy).")] = 32,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads (default: torch's).")] = None,
    dtype: Annotated[str, typer.Option(help="auto | float32 | bfloat16 | float16.")] = "auto",
    compile: Annotated[bool, typer.Option("--compile", help="Decode steps compiled (inductor) on a static KV "
                                          "cache: llama, mistral, qwen2 as one function per token (compiles once, "
                                          "15-60 s on a CPU; ~3x faster on small models, whose eager decode is "
                                          "mostly Python).")] = False,
    act_precision: ActPrecision = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Greedy continuation of PROMPT by MODEL as compress.load runs it, with the decode speed."""
    from compress.bench import generate as run_generate

    _setup_logging(verbose)
    _set_act_precision(act_precision)
    try:
        out = run_generate(model, prompt, max_new_tokens, threads=threads, dtype=dtype, compile=compile)
    except ValueError as err:
        _fail(str(err))
    typer.echo(out["text"])
    typer.echo(f"\n{out['new_tokens']} new tokens in {out['seconds']:.2f} s; decode {out['decode_tokens_per_s']:.1f} "
               f"tokens/s (prefill of {out['prompt_tokens']} tokens {out['prefill_ms']:.0f} ms, {out['threads']} "
               f"threads)", err=True)


@app.command()
def bench(
    model: Annotated[Path, typer.Argument(help="Output folder of compress (packed folders run on compress's kernels).")],
    threads: Annotated[Optional[list[int]], typer.Option(help="Thread counts to measure (repeat the option).")] = None,
    new_tokens: Annotated[int, typer.Option(help="Greedy tokens per decode measurement.")] = 128,
    repeats: Annotated[int, typer.Option(help="Runs per figure (medians).")] = 3,
    prompt: Annotated[str, typer.Option(help="Decode prompt.")] = PROMPT,
    compile: Annotated[bool, typer.Option("--compile", help="Also measure every model's decode through "
                                          "the compiled step (as compress generate --compile).")] = False,
    gguf: Annotated[Optional[str], typer.Option(help="llama.cpp's GGUF of the same model to time (llama-bench: "
                                                "$LLAMA_BENCH or on PATH; else llama-cpp-python).")] = None,
    act_precision: ActPrecision = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the results as JSON here.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Per-layer GEMV and end-to-end greedy decode speed of MODEL vs the dense original (from its
    compression.json) and vs the dense export of the same compressed weights; llama.cpp on --gguf (or on the
    original when it is a GGUF)."""
    from compress import bench as speed

    _setup_logging(verbose)
    _set_act_precision(act_precision)
    try:
        results = speed.run(model, tuple(threads or (1, 2)), new_tokens, repeats, prompt, compile, gguf)
    except ValueError as err:
        _fail(str(err))
    typer.echo(f"first 32 greedy tokens identical to the dense export of the same weights: "
               f"{results['same_first_32_tokens_as_dense_export']}")
    for n, measured in results["by_threads"].items():
        typer.echo(f"\n{n} thread(s)\n" + "\n".join(speed.speed_lines(measured)))
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
    from compress.evals.report import write

    try:
        table, plots = write(results, out, overwrite)
    except ValueError as err:
        _fail(str(err))
    except OSError as err:
        _fail(f"writing {out} failed: {err.strerror or err}", 1)
    typer.echo(table)
    typer.echo(f"\nwrote {out / 'report.md'} and {', '.join(p.name for p in plots)}")


@app.command()
def info(
    folder: Annotated[Path, typer.Argument(help="A folder written by compress prune (or any safetensors model).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Per-layer sparsity, bits, group size and bytes, read from the stored weights themselves, and totals."""
    from compress.export.reading import info as read_info

    try:
        found = read_info(folder)
    except ValueError as err:
        _fail(str(err))
    if as_json:
        typer.echo(json.dumps({k: v for k, v in found.items() if k not in ("summary", "format", "calibration")}, indent=2))
        return
    rows = found["layers"]
    width = max(len(r["name"]) for r in rows)
    typer.echo(f"{'tensor':<{width}}  {'shape':>14}  {'sparsity':>8}  {'N:M':>4}  {'bits':>4}  {'group':>5}  {'bytes':>10}")
    for r in rows:
        typer.echo(f"{r['name']:<{width}}  {'x'.join(map(str, r['shape'])):>14}  {r['sparsity']:>8.4f}  {r['nm']:>4}  "
                   f"{r['bits']:>4}  {r['group_size'] or '-':>5}  {r['bytes']:>10}")
    typer.echo(f"\ndecoder linears: {found['block_linears_sparsity']:.4f} zeros, "
               f"{found['block_linears_bytes'] / 2**20:.2f} MiB on disk "
               f"({found['block_linears_bits_per_weight']:.2f} bits per weight); "
               f"all 2-D weights: {found['all_weights_sparsity']:.4f} zeros")
    if found["recipe"]:
        typer.echo(f"recipe: {found['summary']}, format {found['format']}, calibration {found['calibration']}")


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    allocator.return_freed_memory_to_os()
    app()


if __name__ == "__main__":
    main()
