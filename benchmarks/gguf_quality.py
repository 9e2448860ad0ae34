"""compress's GGUF exports against llama.cpp's own quantizers, measured by llama.cpp's own evaluator (issue 24).

On SmolLM2-135M-Instruct (the embedded default; its dense weights are the source of every file):
- llama.cpp: its converter's F32 GGUF of the dense model, ``llama-quantize`` Q4_0 and Q8_0 of it, and Q4_0
  with an importance matrix (``llama-imatrix``) from compress's own calibration windows, decoded to text;
- compress: ``compress prune --format gguf`` for each recipe in ``RECIPES`` (calibration 128 x 512 tokens of
  WikiText-2 valid.txt, seed 0); for the first, the fidelity references, converted to F32 by llama.cpp's
  converter: the GGUF's own weights saved dense (only llama.cpp's 8-bit activations then differ), and a
  second run of the recipe exported dense (fp32 scales), whose weights are also compared with the GGUF's;
- each file through ``llama-perplexity -c 1024 --chunks 50`` on WikiText-2 test.txt and ``--chunks 30`` on two
  held-out texts no method here calibrates on (the long descriptions of the installed Python packages; the
  Python language reference of the running interpreter's ``pydoc_data``), and
  each compress file also through ``compress eval --ppl`` (compress's protocol: 50 windows of 1024).

Every step's output is kept in ``--work`` and skipped when present, so an interrupted run continues; the JSON
is rewritten after every measurement.

    python benchmarks/gguf_quality.py --work /tmp/gguf-work --json benchmarks/results/gguf-quality.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402  (benchmarks/quality.py: the dense folder and calibration tokens)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
COMPRESS = [sys.executable, "-m", "compress.cli"]
# llama-quantize stores SmolLM2's tied embedding as Q8_0 in its Q4_0 and Q8_0 files: so do ours, and only the
# decoder's linears differ between the files compared
GGUF_FLAGS = ["--format", "gguf", "--gguf-dtype", "q8_0"]
# name -> compress prune flags (every one written with --format gguf)
RECIPES = {
    "gptq-w4g32": ["--quant", "w4g32"],
    "rtn-w4g32": ["--quant", "w4g32", "--quant-method", "rtn"],
    "gptq-w8g32": ["--quant", "w8g32"],
    "sparsegpt-2:4-gptq-w4g32": ["--method", "sparsegpt", "--pattern", "2:4", "--quant", "w4g32"],
    "gptq-w4g32-minmax": ["--quant", "w4g32", "--quant-scale", "minmax"],
    "gptq-w4g64": ["--quant", "w4g64"],
    "gptq-w4g64-minmax": ["--quant", "w4g64", "--quant-scale", "minmax"],
    "gptq-w8g32-minmax": ["--quant", "w8g32", "--quant-scale", "minmax"],
    "sparsegpt-2:4-gptq-w4g32-minmax": ["--method", "sparsegpt", "--pattern", "2:4", "--quant", "w4g32",
                                        "--quant-scale", "minmax"],
}


DEQUANTIZE = """import sys
from compress import models
model, tok = models.load(sys.argv[1])
model.save_pretrained(sys.argv[2])
tok.save_pretrained(sys.argv[2])
"""


def compare_weights(gguf_path: Path, dense_dir: Path) -> dict:
    """The GGUF's decoder linears (dequantized by gguf-py) against the dense export of the same recipe: the
    share of weights that are equal up to the fp16 scale (within 0.01 of their group's step) and the
    largest difference in steps (a separate run: GPTQ's error feedback may move codes where fp16 and fp32
    scales round a weight differently)."""
    import gguf
    import torch

    from compress import models

    model = models.load(str(dense_dir))[0]
    dense, config = model.state_dict(), model.config
    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    equal = total = 0
    worst = 0.0
    for t in gguf.GGUFReader(str(gguf_path)).tensors:
        parts = t.name.split(".")
        if parts[0] != "blk" or parts[2] not in names:
            continue
        W = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
        if parts[2] in ("attn_q", "attn_k"):  # GGML's rotary row order back to transformers'
            heads = config.num_attention_heads if parts[2] == "attn_q" else config.num_key_value_heads
            W = W.reshape(heads, -1, 2, W.shape[1]).transpose(1, 2).reshape(W.shape)
        D = dense[f"model.layers.{parts[1]}.{names[parts[2]]}.weight"].float()
        step = (W.reshape(W.shape[0], -1, 32).abs().amax(-1, keepdim=True) / 7.5).expand(-1, -1, 32).reshape(W.shape)
        diff = (W - D).abs() / step.clamp(min=1e-12)
        equal += int((diff < 0.01).sum())  # the fp16 scale moves a code-8 weight by <= 8 * 2^-11 steps
        total += W.numel()
        worst = max(worst, float(diff.max()))
    return {"weights": total, "equal_share": equal / total, "max_diff_steps": worst}


def heldout_text(path: Path) -> Path:
    """The long descriptions of the installed packages' METADATA (technical English, not WikiText)."""
    if not path.is_file():
        from importlib.metadata import distributions

        parts = []
        for dist in sorted(distributions(), key=lambda d: (d.metadata["Name"] or "").lower()):
            body = dist.metadata.get_payload() if hasattr(dist.metadata, "get_payload") else None
            body = body or dist.metadata.get("Description") or ""
            if len(body) > 2000:
                parts.append(body.strip())
        path.write_text("\n\n".join(parts) + "\n", encoding="utf-8")
    return path


def python_reference_text(path: Path) -> Path:
    """The Python language reference's topics (``pydoc_data.topics``: technical English with code)."""
    if not path.is_file():
        from pydoc_data.topics import topics

        path.write_text("\n\n".join(topics[k].strip() for k in sorted(topics)) + "\n", encoding="utf-8")
    return path


def run(cmd: list, log: Path, env: dict | None = None) -> float:
    start = time.perf_counter()
    with open(log, "w") as fh:
        code = subprocess.call([str(c) for c in cmd], stdout=fh, stderr=subprocess.STDOUT, env=env)
    if code != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd[:4]))} ... failed ({code}), see {log}")
    return time.perf_counter() - start


def llama_ppl(bin_dir: Path, gguf: Path, text: Path, chunks: int, log: Path) -> float:
    if not log.is_file() or "Final estimate" not in log.read_text():
        run([bin_dir / "llama-perplexity", "-m", gguf, "-f", text, "-c", 1024, "--chunks", chunks, "-t", 2, "-b", 1024], log)
    return float(re.search(r"Final estimate: PPL = ([\d.]+)", log.read_text())[1])


def compress_ppl(model: Path, text: Path, limit: int, log: Path) -> float:
    out = log.with_suffix(".json")
    if not out.is_file():
        run([*COMPRESS, "eval", model, "--ppl", text, "--seqlen", 1024, "--limit", limit, "--json", out], log)
    return json.loads(out.read_text())["ppl"]


def autoround(command: Path, iters: int, work: Path, dense_dir: Path, calib_pt: Path, measure) -> None:
    """AutoRound's calibrated Q4_0 (``--format gguf:q4_0``), tuned on the same 128 windows of 512 tokens."""
    windows = work / "calib-windows.json"  # auto-round reads a JSON list of texts
    if not windows.is_file():
        import torch
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(dense_dir)
        windows.write_text(json.dumps([tok.decode(row) for row in torch.load(calib_pt)]))
    out = work / f"autoround-q4_0-iters{iters}"
    seconds = None
    if not any(out.rglob("*.gguf")):
        seconds = run([command, "--model", dense_dir, "--format", "gguf:q4_0", "--iters", iters, "--nsamples", 128,
                       "--seqlen", 512, "--dataset", windows, "--device", "cpu", "--output_dir", out],
                      work / f"autoround-iters{iters}.log")
    measure(f"AutoRound Q4_0 (iters {iters})", next(out.rglob("*.gguf")), ours=False, seconds=seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--only", nargs="*", help="recipes of RECIPES to run (default: all)")
    ap.add_argument("--dense-run", action="store_true", help="also run the first recipe exported dense (fp32 scales), "
                    "convert and measure it, and compare its weights with the GGUF's")
    ap.add_argument("--llama-only", action="store_true", help="measure every file with llama-perplexity only "
                    "(skip compress eval)")
    ap.add_argument("--autoround", type=Path, help="the auto-round command of a venv with auto-round installed: "
                    "its --format gguf:q4_0 file on the same model and calibration windows joins the table")
    ap.add_argument("--autoround-iters", type=int, default=200, help="auto-round's tuning steps per block (its default 200)")
    args = ap.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(subprocess.check_output(["bash", str(ROOT / "scripts" / "llama-cpp.sh")], text=True).strip())
    source, dense_dir, calib_pt = quality.prepare(work, DATA, 128, 512)
    texts = {"wikitext2-test": (DATA / "test.txt", 50), "heldout": (heldout_text(work / "heldout.txt"), 30),
             "python-reference": (python_reference_text(work / "python-reference.txt"), 30)}
    cpu = subprocess.check_output(["lscpu"], text=True)
    results = {"cpu": re.search(r"Model name:\s*(.*)", cpu)[1] + (" (AVX-512)" if "avx512f" in cpu else " (AVX2)"), "files": {},
               "texts": {k: hashlib.sha256(p.read_bytes()).hexdigest() for k, (p, _) in texts.items()}}

    def save():
        args.json.write_text(json.dumps(results, indent=2) + "\n")

    def measure(name: str, gguf: Path, ours: bool, seconds: float | None = None):
        entry = results["files"].setdefault(name, {"file": gguf.name, "bytes": gguf.stat().st_size})
        if seconds is not None:
            entry["seconds"] = seconds
        for key, (text, chunks) in texts.items():
            entry[f"llama_ppl_{key}"] = llama_ppl(bin_dir, gguf, text, chunks, work / f"{name}.{key}.llama.log")
            save()
        if ours and not args.llama_only:
            for key, (text, chunks) in texts.items():
                entry[f"compress_ppl_{key}"] = compress_ppl(gguf, text, chunks, work / f"{name}.{key}.compress.log")
                save()
        print(name, entry, flush=True)

    converter = bin_dir.parent.parent / "convert_hf_to_gguf.py"
    env = {**os.environ, "PYTHONPATH": str(bin_dir.parent.parent / "gguf-py")}
    f32 = work / "dense-f32.gguf"
    if not f32.is_file():
        run([sys.executable, converter, dense_dir, "--outtype", "f32", "--outfile", f32], work / "convert-dense.log", env)
    measure("llama.cpp F32 (dense)", f32, ours=False)
    for qtype in ("Q4_0", "Q8_0"):
        path = work / f"llama-{qtype.lower()}.gguf"
        if not path.is_file():
            run([bin_dir / "llama-quantize", f32, path, qtype], work / f"quantize-{qtype}.log")
        measure(f"llama.cpp {qtype}", path, ours=False)
    calib_text = work / "calib-windows.txt"  # compress's calibration windows, decoded, for llama-imatrix
    if not calib_text.is_file():
        import torch
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(dense_dir)
        calib_text.write_text("\n".join(tok.decode(row) for row in torch.load(calib_pt)), encoding="utf-8")
    imatrix = work / "imatrix.gguf"
    if not imatrix.is_file():
        run([bin_dir / "llama-imatrix", "-m", f32, "-f", calib_text, "-c", 512, "--chunks", 128, "-t", 2, "-o", imatrix],
            work / "imatrix.log")
    path = work / "llama-q4_0-imatrix.gguf"
    if not path.is_file():
        run([bin_dir / "llama-quantize", "--imatrix", imatrix, f32, path, "Q4_0"], work / "quantize-imatrix.log")
    measure("llama.cpp Q4_0 + imatrix", path, ours=False)
    if args.autoround:
        autoround(args.autoround, args.autoround_iters, work, dense_dir, calib_pt, measure)

    calib = ["--calib", DATA / "valid.txt", "--nsamples", 128, "--seqlen", 512]
    for name, flags in RECIPES.items():
        if args.only and name not in args.only:
            continue
        path, seconds = work / f"compress-{name}.gguf", None
        if not path.is_file():
            seconds = run([*COMPRESS, "prune", source, *flags, *calib, *GGUF_FLAGS, "--out", path],
                          work / f"prune-{name}.log")
        measure(f"compress {name}", path, ours=True, seconds=seconds)
        if name == "gptq-w4g32":  # fidelity: the same weights in F32 through llama.cpp's converter
            for kind in ("dequantized", "dense") if args.dense_run else ("dequantized",):
                folder, ref = work / f"compress-{name}-{kind}", work / f"compress-{name}-{kind}-f32.gguf"
                if not folder.is_dir() and kind == "dequantized":  # the GGUF's own weights (transformers reads it)
                    run([sys.executable, "-c", DEQUANTIZE, path, folder], work / f"dequantize-{name}.log")
                if not folder.is_dir() and kind == "dense":  # a second run of the recipe, exported dense
                    run([*COMPRESS, "prune", source, *flags, *calib, "--out", folder], work / f"prune-{name}-dense.log")
                if not ref.is_file():
                    run([sys.executable, converter, folder, "--outtype", "f32", "--outfile", ref],
                        work / f"convert-{name}-{kind}.log", env)
                measure(f"compress {name} {kind} -> F32", ref, ours=False)
            if args.dense_run:
                results["weights_vs_dense_export"] = compare_weights(path, work / f"compress-{name}-dense")
                save()
    save()


if __name__ == "__main__":
    main()
