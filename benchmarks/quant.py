"""Quantization (issue 3) on SmolLM2-135M: GPTQ / RTN W4 g64, joint SparseGPT 2:4 + W4 g64, vs llm-compressor,
and the compressed-tensors export's size and logits.

Same protocol and helpers as ``quality.py`` (128 x 512 calibration tokens from valid.txt, seed 0, shared by
both tools; perplexity on the first 50 windows of 1024 tokens of test.txt, fp32). Every output is checked,
not trusted: the weights of each quantized linear must take at most 2^bits distinct values per group, and
for 2:4 runs the share of 4-weight groups that are 2:4 is reported.

    python benchmarks/quant.py --llmc-python /path/to/llmc-venv/bin/python --work bench-work
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import ROOT, evaluate, prepare, protocol_parser, timed  # noqa: E402

# name: (compress prune flags, llm-compressor (method, spec) or None)
RUNS = {
    "gptq-w4g64": (["--quant", "w4g64"], ("gptq", "w4g64")),
    "gptq-w4g64-noact": (["--quant", "w4g64", "--no-quant-actorder"], None),
    "rtn-w4g64": (["--quant", "w4g64", "--quant-method", "rtn"], None),
    "sparsegpt24+gptq-w4g64": (["--method", "sparsegpt", "--pattern", "2:4", "--quant", "w4g64"],
                               ("sparsegpt+gptq", "2:4,w4g64")),
    "sparsegpt24+rtn-w4g64": (["--method", "sparsegpt", "--pattern", "2:4", "--quant", "w4g64", "--quant-method", "rtn"], None),
}
PROMPT = "The capital of France is"


def check_weights(folder: Path, bits: int, group: int) -> dict:
    """Distinct values per group (must be <= 2^bits) and the share of 4-weight runs that are 2:4."""
    from compress.export import layer_table, read_tensor, tensor_index

    index = tensor_index(folder)
    worst, nm_ok, nm_total = 0, 0, 0
    for row in layer_table(folder):
        if not row["in_block"] or not row["name"].endswith(".weight"):
            continue
        W = read_tensor(index, row["name"])
        groups = W.reshape(-1, group)
        worst = max(worst, max(len(torch.unique(g)) for g in groups[:: max(1, len(groups) // 256)]))
        runs = (W != 0).reshape(W.shape[0], -1, 4).sum(-1) <= 2
        nm_ok, nm_total = nm_ok + int(runs.sum()), nm_total + runs.numel()
    return {"max_distinct_per_group": worst, "on_grid": worst <= 2**bits, "share_2of4": nm_ok / nm_total}


def compressed_tensors_check(dense_out: Path, ct_out: Path) -> dict:
    """Bytes of the quantized linears in the compressed-tensors folder vs fp32, and logits of both folders."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress.export import layer_table

    ct_rows = {r["name"].removesuffix("_packed"): r for r in layer_table(ct_out) if r["in_block"]}
    dense_rows = {r["name"]: r for r in layer_table(dense_out) if r["in_block"]}
    fp32_bytes = sum(r["shape"][0] * r["shape"][1] * 4 for r in dense_rows.values())
    ct_bytes = sum(r["bytes"] for r in ct_rows.values())
    tok = AutoTokenizer.from_pretrained(dense_out)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(dense_out, dtype=torch.float32)(ids).logits
        got = AutoModelForCausalLM.from_pretrained(ct_out)(ids).logits
    return {"linears_fp32_bytes": fp32_bytes, "linears_ct_bytes": ct_bytes, "bytes_ratio": ct_bytes / fp32_bytes,
            "logits_max_abs_diff": float((got.float() - want).abs().max()), "prompt": PROMPT}


def main() -> None:
    ap = protocol_parser(__doc__)
    ap.add_argument("--only", nargs="*", help=f"runs to do, of {', '.join(RUNS)}")
    ap.add_argument("--reuse", action="store_true", help="reuse finished outputs and evaluations in --work")
    ap.add_argument("--json", type=Path, help="write the results here (default: WORK/quant.json)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    _, dense_dir, calib = prepare(args.work, args.data, args.nsamples, args.calib_seqlen)
    compress_bin = str(Path(sys.executable).with_name("compress"))
    out_json = args.json or args.work / "quant.json"
    results = json.loads(out_json.read_text())["results"] if args.reuse and out_json.is_file() else {}

    def ppl(folder: Path, key: str, row: dict) -> None:
        if not (args.reuse and "ppl" in row.get(key, {})):
            row.setdefault(key, {})["ppl"] = evaluate(str(folder), args.data, args.eval_seqlen, args.limit)

    results.setdefault("dense", {})
    ppl(dense_dir, "compress", results["dense"])
    print(f"dense ppl {results['dense']['compress']['ppl']:.2f}", flush=True)
    for name, (flags, peer_spec) in RUNS.items():
        if args.only and name not in args.only:
            continue
        row = results.setdefault(name, {"flags": flags})
        ours = args.work / f"compress-{name}"
        if not (args.reuse and (ours / "timing.json").is_file()):
            timing = timed([compress_bin, "prune", str(dense_dir), *flags, "--calib", str(args.data / "valid.txt"),
                            "--nsamples", str(args.nsamples), "--seqlen", str(args.calib_seqlen), "--device", "cpu",
                            "--out", str(ours), "--overwrite"], args.work / f"compress-{name}.log")
            (ours / "timing.json").write_text(json.dumps(timing))
        row.setdefault("compress", {}).update(json.loads((ours / "timing.json").read_text()), **check_weights(ours, 4, 64))
        ppl(ours, "compress", row)
        if args.llmc_python and peer_spec:
            peer = args.work / f"llmc-{name}"
            if not (args.reuse and (peer / "process_timing.json").is_file()):
                timing = timed([args.llmc_python, "-P", str(ROOT / "benchmarks" / "llmcompressor_run.py"), str(dense_dir),
                                str(calib), *peer_spec, str(peer)], args.work / f"llmc-{name}.log")
                (peer / "process_timing.json").write_text(json.dumps(timing))
            row.setdefault("llmcompressor", {}).update(json.loads((peer / "process_timing.json").read_text()),
                                                       **check_weights(peer, 4, 64))
            ppl(peer, "llmcompressor", row)
        print(name, json.dumps(row), flush=True)
        out_json.write_text(json.dumps({"protocol": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2))
    if not args.only or "ct" in args.only or "gptq-w4g64" in args.only:
        ct = args.work / "compress-gptq-w4g64-ct"
        if not (args.reuse and ct.is_dir()):
            timed([compress_bin, "prune", str(dense_dir), *RUNS["gptq-w4g64"][0], "--format", "compressed-tensors",
                   "--calib", str(args.data / "valid.txt"), "--nsamples", str(args.nsamples), "--seqlen",
                   str(args.calib_seqlen), "--device", "cpu", "--out", str(ct), "--overwrite"], args.work / "compress-ct.log")
        results["compressed-tensors"] = compressed_tensors_check(args.work / "compress-gptq-w4g64", ct)
        print("compressed-tensors", json.dumps(results["compressed-tensors"]), flush=True)
    out_json.write_text(json.dumps({"protocol": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2))
    print_table(results)


def print_table(results: dict) -> None:
    dense = results["dense"]["compress"]["ppl"]
    print("\n| run | compress ppl | s | 2:4 share | llm-compressor ppl | s | 2:4 share | ppl ratio |\n|---|---|---|---|---|---|---|---|")
    print(f"| dense | {dense:.2f} | | | | | | |")
    for name, row in results.items():
        if name in ("dense", "compressed-tensors"):
            continue
        ours, peer = row["compress"], row.get("llmcompressor")
        cells = [name, f"{ours['ppl']:.2f}", f"{ours['seconds']:.0f}", f"{ours['share_2of4']:.3f}"]
        cells += [f"{peer['ppl']:.2f}", f"{peer['seconds']:.0f}", f"{peer['share_2of4']:.3f}",
                  f"{ours['ppl'] / peer['ppl']:.3f}"] if peer else ["", "", "", ""]
        print("| " + " | ".join(cells) + " |")
    if "compressed-tensors" in results:
        print(json.dumps(results["compressed-tensors"], indent=2))


if __name__ == "__main__":
    main()
