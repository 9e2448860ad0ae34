"""Decode speed of compress's packed models against llama.cpp on the same dense weights (issue 25).

SmolLM2-135M-Instruct (the embedded default; its dense weights are the source of every model): llama.cpp's
converter writes an F32 GGUF of the dense folder and ``llama-quantize`` its Q4_0 (the embedding, tied to the
output, in Q8_0 as llama.cpp chooses); compress prunes the same folder into packed folders (``RECIPES``,
calibration 128 x 512 tokens of WikiText-2 valid.txt). Each round runs ``llama-bench -p 0 -n N -t T -r 1`` on the
Q4_0 file, then each packed model's greedy decode of N tokens after a short prompt through ``compress.load``
(``bench.decode_speed``: prefill excluded; eager = transformers' generate, ``--compile`` = the lean decoder's
compiled step), with int8 inputs to the integer kernels (``--precisions``: also int8x2, two int8 roundings)
and with fp32 inputs, all at T threads. Figures are
medians over ``--rounds`` interleaved rounds; ratios are ours / llama.cpp's tokens/s from the same rounds.
``--ppl`` adds each model's perplexity through ``compress eval`` (50 windows of 1024 of WikiText-2 test;
llama.cpp's file read by transformers' GGUF loader), ``--agreement`` the teacher-forced top-1 agreement of int8
(and int8x2) inputs with fp32 ones. ``--synthetic`` replaces SmolLM2 by a random model of TinyLlama-1.1B's shape (RTN recipes: its
weights only have to be the right bytes; one adds 40% TEAL, packed input-major), where reading weights, not
overhead, bounds decode.

    python benchmarks/decode_vs_llama.py --work /tmp/decode-work --json benchmarks/results/decode-vs-llama.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402  (benchmarks/quality.py: the dense folder and calibration tokens)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
COMPRESS = [sys.executable, "-m", "compress.cli"]
RECIPES = {  # name -> compress prune flags, each written --format packed
    "gptq-w4g32 + int4 lm_head": ["--quant", "w4g32", "--quant-lm-head"],
    "gptq-w4g64 + int4 lm_head": ["--quant", "w4g64", "--quant-lm-head"],
    "sparsegpt-2:4 + gptq-w4g32 + int4 lm_head": ["--method", "sparsegpt", "--pattern", "2:4", "--quant", "w4g32",
                                                  "--quant-lm-head"],
    "sparsegpt-2:4 + gptq-w4g64 + int4 lm_head": ["--method", "sparsegpt", "--pattern", "2:4", "--quant", "w4g64",
                                                  "--quant-lm-head"],
}
# The synthetic model's weights are random: what counts is their bytes, so the cheapest methods that write the
# same layouts (and a token of calibration, which they do not use).
SYNTHETIC_RECIPES = {
    "rtn-w4g32 + int4 lm_head": ["--quant", "w4g32", "--quant-method", "rtn", "--quant-lm-head"],
    "magnitude-2:4 + rtn-w4g32 + int4 lm_head": ["--method", "magnitude", "--pattern", "2:4", "--quant", "w4g32",
                                                 "--quant-method", "rtn", "--quant-lm-head"],
    "magnitude-2:4 + rtn-w4g64 + int4 lm_head": ["--method", "magnitude", "--pattern", "2:4", "--quant", "w4g64",
                                                 "--quant-method", "rtn", "--quant-lm-head"],
    # 40% TEAL on every decoder linear's input (one threshold set, as the paper; packed input-major)
    "rtn-w4g32 + teal-40% + int4 lm_head": ["--quant", "w4g32", "--quant-method", "rtn", "--quant-lm-head",
                                            "--act-sparsity", "0.4", "--act-method", "teal", "--act-positions", "off"],
}
# TinyLlama-1.1B's shape with SmolLM2's 49152-token vocabulary, untied: decode is bound by reading weights
TINYLLAMA_SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                       num_key_value_heads=4, vocab_size=49152, tie_word_embeddings=False, max_position_embeddings=2048)


def run(cmd: list, log: Path, env: dict | None = None) -> str:
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env)
    log.write_text(out.stdout + out.stderr)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd[:4]))} ... failed ({out.returncode}), see {log}")
    return out.stdout


def synthetic_dense(work: Path, tokenizer_dir: Path) -> Path:
    """A random llama of TinyLlama-1.1B's shape (seed 0, fp32) with SmolLM2's tokenizer, saved once."""
    folder = work / "dense-tinyllama-shape"
    if not folder.is_dir():
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**TINYLLAMA_SHAPE, use_cache=True))
        model.generation_config.use_cache = True
        model.save_pretrained(folder)
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder


def prepare_models(work: Path, bin_dir: Path, synthetic: bool) -> tuple[Path, dict[str, Path]]:
    """llama.cpp's Q4_0 file of the dense weights and compress's packed folders (each skipped when present)."""
    source, dense_dir, _ = quality.prepare(work, DATA, 128, 512)
    recipes, calib = RECIPES, ["--calib", DATA / "valid.txt", "--nsamples", 128, "--seqlen", 512]
    if synthetic:
        source = dense_dir = synthetic_dense(work, dense_dir)
        recipes, calib = SYNTHETIC_RECIPES, ["--calib", DATA / "valid.txt", "--nsamples", 1, "--seqlen", 64]
    converter = bin_dir.parent.parent / "convert_hf_to_gguf.py"
    env = {**os.environ, "PYTHONPATH": str(bin_dir.parent.parent / "gguf-py")}
    tag = "-tinyllama-shape" if synthetic else ""
    f32, q4 = work / f"dense{tag}-f32.gguf", work / f"llama{tag}-q4_0.gguf"
    if not f32.is_file():
        run([sys.executable, converter, dense_dir, "--outtype", "f32", "--outfile", f32], work / "convert-dense.log", env)
    if not q4.is_file():
        run([bin_dir / "llama-quantize", f32, q4, "Q4_0"], work / "quantize-Q4_0.log")
    folders = {}
    for name, flags in recipes.items():
        folder = work / (re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") + tag)
        if not folder.is_dir():
            run([*COMPRESS, "prune", source, *flags, *calib, "--format", "packed", "--out", folder],
                work / f"prune-{folder.name}.log")
        folders[name] = folder
    return q4, folders


def perplexity(model: Path, work: Path, name: str, precision: str) -> float:
    out = work / f"ppl-{re.sub(r'[^a-z0-9]+', '-', name.lower())}-{precision}.json"
    if not out.is_file():
        run([*COMPRESS, "eval", model, "--ppl", DATA / "test.txt", "--seqlen", 1024, "--limit", 50, "--act-precision",
             precision, "--json", out], out.with_suffix(".log"))
    return json.loads(out.read_text())["ppl"]


def top1_agreement(folder: Path, positions: int = 2048, window: int = 1024) -> dict[str, float]:
    """Teacher-forced, per integer activation precision (int8, int8x2): the share of the first ``positions``
    tokens of WikiText-2 test (windows of ``window``) at which ``folder``'s next-token argmax is the same as with
    fp32 inputs to its products (prefill rounds its input per block of 32 exactly as the decode kernels do)."""
    import compress
    from compress.kernels import ops as kops

    model, tok = compress.load(str(folder), with_tokenizer=True)
    ids = tok((DATA / "test.txt").read_text()[:100_000], return_tensors="pt").input_ids[0, :positions]
    picks = {}
    for precision in kops.ACT_PRECISIONS:
        kops.set_act_precision(precision)
        with torch.inference_mode():
            picks[precision] = torch.cat([model(w.unsqueeze(0)).logits[0].argmax(-1) for w in ids.split(window)])
    kops.set_act_precision("int8")
    return {p: float((picks[p] == picks["fp32"]).float().mean()) for p in kops.ACT_PRECISIONS if p != "fp32"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also time compiled decode steps (torch.compile)")
    ap.add_argument("--ppl", action="store_true", help="also each model's perplexity through compress eval")
    ap.add_argument("--ppl-fp32", action="append", default=[], metavar="NAME",
                    help="also this recipe's perplexity with int8x2 and fp32 inputs (fp32: the reference)")
    ap.add_argument("--agreement", action="store_true",
                    help="also teacher-forced top-1 agreement of int8 (and int8x2) with fp32 inputs over 2048 positions")
    ap.add_argument("--precisions", default=",".join(("int8", "fp32")), help="activation precisions to time (int8, int8x2, fp32)")
    ap.add_argument("--no-eager", action="store_true", help="time the compiled decoding only (with --compile)")
    ap.add_argument("--also", action="append", default=[], metavar="NAME=FOLDER",
                    help="time another packed folder beside the recipes (e.g. one written by an older version)")
    ap.add_argument("--synthetic", action="store_true",
                    help="a random model of TinyLlama-1.1B's shape (49152-token vocabulary, untied) instead of SmolLM2")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)

    import compress
    from compress.bench import PROMPT, decode_speed, greedy, llama_cpp_speed
    from compress.kernels import ops as kops
    from compress.kernels.build import ops as compiled

    bin_dir = Path(subprocess.check_output(["bash", str(ROOT / "scripts" / "llama-cpp.sh")], text=True).strip())
    os.environ["LLAMA_BENCH"] = str(bin_dir / "llama-bench")  # bench.llama_cpp_speed: llama-bench -p 0 -n N -t T
    q4, folders = prepare_models(args.work, bin_dir, args.synthetic)
    folders.update(dict(spec.split("=", 1) for spec in args.also))
    torch.set_num_threads(args.threads)
    loaded = {name: compress.load(str(folder), with_tokenizer=True) for name, folder in folders.items()}
    ids = next(iter(loaded.values()))[1](PROMPT, return_tensors="pt").input_ids
    modes = (True,) if args.compile and args.no_eager else (False, True) if args.compile else (False,)
    contenders = [(name, precision, compiled_) for name in loaded for precision in args.precisions.split(",")
                  for compiled_ in modes]
    for name, precision, compiled_ in contenders:  # warm up (and compile, per precision) outside the timed rounds
        kops.set_act_precision(precision)
        greedy(loaded[name][0], ids, 2, compiled=compiled_)
    kops.set_act_precision("int8")
    cpu = subprocess.check_output(["lscpu"], text=True)
    results = {"cpu": re.search(r"Model name:\s*(.*)", cpu)[1], "int8_isa": ["portable", "avx2", "avx512-vnni"][
        int(compiled().int8_isa())], "threads": args.threads, "new_tokens": args.new_tokens, "prompt": PROMPT,
        "llama_q4_0": {"file": q4.name, "bytes": q4.stat().st_size}, "rounds": []}
    for r in range(args.rounds):
        row = {"llama.cpp Q4_0": llama_cpp_speed(str(q4), PROMPT, args.new_tokens, args.threads, repeats=1)}
        for name, precision, compiled_ in contenders:
            kops.set_act_precision(precision)
            key = f"{name} ({precision} x{', compiled' if compiled_ else ''})"
            row[key] = decode_speed({key: loaded[name][0]}, ids, args.new_tokens, repeats=1, compiled=compiled_)[key]
        kops.set_act_precision("int8")
        results["rounds"].append(row)
        print(f"round {r + 1}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items()), flush=True)
    names = results["rounds"][0].keys()
    median = {k: statistics.median(row[k] for row in results["rounds"]) for k in names}
    results["tokens_per_s"] = median
    results["ratio_to_llama"] = {k: statistics.median(row[k] / row["llama.cpp Q4_0"] for row in results["rounds"])
                                 for k in names}
    if args.ppl:
        results["ppl"] = {"llama.cpp Q4_0 (compress eval)": perplexity(q4, args.work, "llama-q4_0", "fp32")}
        for name, folder in folders.items():
            for precision in kops.ACT_PRECISIONS if name in args.ppl_fp32 else ("int8",):
                results["ppl"][f"{name} ({precision} x)"] = perplexity(folder, args.work, name, precision)
    if args.agreement:
        results["top1_agreement_vs_fp32"] = {name: top1_agreement(folder) for name, folder in folders.items()}
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    for k in names:
        print(f"{k:<60} {median[k]:7.1f} tok/s  {results['ratio_to_llama'][k]:5.2f}x llama.cpp", flush=True)
    for k, v in results.get("ppl", {}).items():
        print(f"ppl {k:<56} {v:7.3f}", flush=True)
    for k, by_precision in results.get("top1_agreement_vs_fp32", {}).items():
        for precision, v in by_precision.items():
            print(f"top-1 agreement with fp32 inputs, {precision:<6} x, {k:<40} {v:.4f}", flush=True)


if __name__ == "__main__":
    main()
