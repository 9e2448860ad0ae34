"""A mixture-of-experts model bigger than the usual test ones, pruned streamed and decoded packed (issue 26).

A random Qwen3-MoE of ~2.7B parameters (8 layers, 64 experts of 768 x 2048, top-8, hidden 2048, 16 heads of 128,
4 KV heads, SmolLM2's 49152-token vocabulary untied; bf16, saved by transformers in the hub's per-expert
layout, so compress streams it block by block) is pruned by ``compress prune`` in a child process (Wanda 2:4 +
RTN W4 g64, ``--format packed``; calibration ``--nsamples`` x ``--seqlen`` tokens of WikiText-2 valid.txt):
its peak RSS (and its range over each block) is set against the bytes of one decoder block, of the weights outside
the blocks and of the whole model. Then the packed folder (through ``compress.load``: each chosen expert's
products on the kernels) and the dense model (transformers) decode greedily after a short prompt, the two
interleaved, medians of ``--repeats``.

    python benchmarks/moe_streaming.py --work /tmp/moe-work --json benchmarks/results/moe-streaming.json
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402  (benchmarks/quality.py: SmolLM2's dense folder, for its tokenizer)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
SHAPE = dict(hidden_size=2048, moe_intermediate_size=768, num_experts=64, num_experts_per_tok=8, num_hidden_layers=8,
             num_attention_heads=16, num_key_value_heads=4, head_dim=128, intermediate_size=6144, vocab_size=49152,
             tie_word_embeddings=False, max_position_embeddings=4096)
RECIPE = ["--method", "wanda", "--pattern", "2:4", "--quant", "w4g64", "--quant-method", "rtn", "--format", "packed"]


def synthetic_moe(work: Path) -> Path:
    """The random model (seed 0, bf16) with SmolLM2's tokenizer, saved once."""
    folder = work / "dense-moe"
    if not folder.is_dir():
        from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3MoeConfig

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(Qwen3MoeConfig(**SHAPE, use_cache=True), dtype=torch.bfloat16)
        model.generation_config.use_cache = True
        model.save_pretrained(folder)
        AutoTokenizer.from_pretrained(quality.prepare(work, DATA, 1, 64)[1]).save_pretrained(folder)
    return folder


def prune_streamed(source: Path, out: Path, nsamples: int, seqlen: int) -> dict:
    """``compress prune`` in a child: its wall time, peak RSS (GNU time's: ``getrusage`` would report this
    process's own high-water mark, which a vforked child inherits), and the RSS range over each block (sampled
    every 50 ms between the pipeline's ``block k/n`` lines), which shows whether memory grows with depth."""
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "compress.cli", "prune", str(source), *RECIPE, "--calib", str(DATA / "valid.txt"),
           "--nsamples", str(nsamples), "--seqlen", str(seqlen), "--out", str(out), "--overwrite"]
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    samples: list[tuple[float, int]] = []  # (seconds since start, RSS bytes)
    sampler = threading.Thread(target=_sample_rss, args=(child, start, samples), daemon=True)
    sampler.start()
    log, marks = [], [0.0]
    for line in child.stdout:
        log.append(line)
        if re.search(r"compress\.pipeline: block \d+/\d+:", line):
            marks.append(time.perf_counter() - start)
    child.wait()
    sampler.join()
    (out.parent / "prune.log").write_text("".join(log))
    if child.returncode != 0:
        raise RuntimeError(f"compress prune failed ({child.returncode}): see {out.parent / 'prune.log'}")
    blocks = [[r for t, r in samples if a <= t < b] for a, b in zip(marks, marks[1:])]
    return {"seconds": time.perf_counter() - start,
            "peak_rss_bytes": int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", "".join(log))[1]) * 1024,
            "rss_per_block_bytes": [{"min": min(b), "max": max(b)} for b in blocks if b],
            "streamed": "loading it whole" not in "".join(log)}


def _sample_rss(child: subprocess.Popen, start: float, samples: list) -> None:
    """RSS of GNU time's child (compress) every 50 ms until it ends."""
    while child.poll() is None:
        try:
            pid = Path(f"/proc/{child.pid}/task/{child.pid}/children").read_text().split()[0]
            status = Path(f"/proc/{pid}/status").read_text()
            samples.append((time.perf_counter() - start, int(re.search(r"VmRSS:\s*(\d+)", status)[1]) * 1024))
        except (OSError, IndexError, TypeError):
            pass
        time.sleep(0.05)


def weight_bytes(source: Path) -> dict:
    """Bytes of the checkpoint: one decoder block (the largest), the weights outside the blocks, all."""
    from compress.checkpoint import Checkpoint

    checkpoint, blocks, outside = Checkpoint(source), {}, 0
    for name, entry in checkpoint.entries.items():
        size = entry.end - entry.begin
        match = re.match(r"model\.layers\.(\d+)\.", name)
        if match:
            blocks[int(match[1])] = blocks.get(int(match[1]), 0) + size
        else:
            outside += size
    return {"block": max(blocks.values()), "outside_blocks": outside, "all": sum(blocks.values()) + outside}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)

    source = synthetic_moe(args.work)
    sizes = weight_bytes(source)
    packed_dir = args.work / "packed-moe"
    pruned = prune_streamed(source, packed_dir, args.nsamples, args.seqlen)
    activations = args.nsamples * args.seqlen * SHAPE["hidden_size"] * 4  # one fp32 copy of the block inputs
    print(f"prune (streamed: {pruned['streamed']}): {pruned['seconds']:.0f} s, peak RSS "
          f"{pruned['peak_rss_bytes'] / 2**30:.2f} GiB; one block {sizes['block'] / 2**30:.2f} GiB, outside the blocks "
          f"{sizes['outside_blocks'] / 2**30:.2f} GiB, calibration activations {activations / 2**30:.2f} GiB per copy, "
          f"the whole model {sizes['all'] / 2**30:.2f} GiB", flush=True)
    print("RSS over each block, GiB: " + ", ".join(f"{b['min'] / 2**30:.2f}-{b['max'] / 2**30:.2f}"
                                                 for b in pruned["rss_per_block_bytes"]), flush=True)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import compress
    from compress.bench import PROMPT, decode_speed, greedy

    tokenizer = AutoTokenizer.from_pretrained(source)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    models = {"dense (transformers, bf16)": AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).eval(),
              "packed 2:4 + W4 g64 (compress kernels)": compress.load(str(packed_dir))}
    for m in models.values():
        greedy(m, ids, 2)  # warm up
    rates = decode_speed(models, ids, args.new_tokens, args.repeats)
    for name, rate in rates.items():
        print(f"decode {name:<42} {rate:7.2f} tokens/s", flush=True)
    cpu = subprocess.check_output(["lscpu"], text=True)
    args.json.write_text(json.dumps({
        "cpu": re.search(r"Model name:\s*(.*)", cpu)[1], "threads": args.threads, "shape": SHAPE, "recipe": RECIPE,
        "calibration": [args.nsamples, args.seqlen], "bytes": sizes, "activation_bytes_per_copy": activations,
        "prune": pruned, "decode_tokens_per_s": rates, "new_tokens": args.new_tokens, "repeats": args.repeats,
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
