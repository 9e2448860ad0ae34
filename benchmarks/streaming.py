"""Peak memory of ``compress prune`` on models bigger than one would like to hold (issue 7).

Builds synthetic Llama-architecture checkpoints here (random weights, std 0.02, bf16, one safetensors shard
per block, written block by block so building them never holds the model either): by default 3.4B
parameters (hidden 3200, MLP 8640, 26 layers, SmolLM2's tokenizer and vocabulary, untied lm_head, ~6.9 GB)
and the same width at 8 layers, so that peak RSS can be compared across depths. Each prune runs as its own
process, one at a time; wall time, and peak RSS from GNU time (``quality.timed``). With ``--resume-demo``,
a Wanda run on the deepest model is killed with SIGKILL once its resume state passes a third of the blocks,
resumed with ``--resume``, and its weight files compared byte for byte with the uninterrupted run's.

The prunes run ``python -m compress.cli`` from the current directory's package when there is one (so a git
worktree can be benchmarked while the main checkout changes), else the installed one.

    python benchmarks/streaming.py --work bench-big --json streaming.json [--resume-demo]
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import DEFAULT_DATA, timed  # noqa: E402

SHAPE = {"hidden_size": 3200, "intermediate_size": 8640, "num_attention_heads": 32, "num_key_value_heads": 32}


def build(folder: Path, layers: int, seed: int = 0) -> Path:
    """A random bf16 Llama checkpoint of ``layers`` blocks in ``folder`` (kept if already complete)."""
    from transformers import AutoTokenizer, LlamaConfig

    from compress import assets
    from compress.checkpoint import INDEX_FILE, ShardWriter

    if (folder / INDEX_FILE).is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    gguf = assets.smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = LlamaConfig(**SHAPE, num_hidden_layers=layers, vocab_size=len(tokenizer), max_position_embeddings=2048,
                         tie_word_embeddings=False, dtype="bfloat16", bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    gen = torch.Generator().manual_seed(seed)
    h, f = SHAPE["hidden_size"], SHAPE["intermediate_size"]

    def randn(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    writer = ShardWriter(folder, layers)
    for i in range(layers):
        p = f"model.layers.{i}"
        writer.write(i, {
            **{f"{p}.self_attn.{n}.weight": randn(h, h) for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
            f"{p}.mlp.gate_proj.weight": randn(f, h), f"{p}.mlp.up_proj.weight": randn(f, h),
            f"{p}.mlp.down_proj.weight": randn(h, f),
            f"{p}.input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            f"{p}.post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
        })
        print(f"built block {i + 1}/{layers}", flush=True)
    writer.write(layers, {"model.embed_tokens.weight": randn(config.vocab_size, h), "lm_head.weight": randn(config.vocab_size, h),
                          "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)})
    writer.finish()
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _prune_args(model: Path, method: str, args) -> list[str]:
    return [str(model), "--method", method, "--sparsity", "0.5", "--calib", str(args.data / "valid.txt"),
            "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--device", "cpu"]


def resume_demo(compress_cmd: list[str], model: Path, whole: Path, out: Path, layers: int, args) -> dict:
    """SIGKILL a run once its saved state passes a third of the blocks; resume it; compare weight files."""
    from compress import outputs

    cmd = [*compress_cmd, "prune", *_prune_args(model, "wanda", args), "--out", str(out), "--save-every", "0"]
    partial = outputs.partial_folder(out)
    state_file = partial / outputs.RESUME_STATE
    with open(args.work / "resume-killed.log", "w") as log:
        child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        killed_at = None
        while child.poll() is None:
            try:
                killed_at = json.loads(state_file.read_text())["state"]["next_block"]
            except (OSError, ValueError, KeyError):
                killed_at = None
            if killed_at is not None and killed_at > layers // 3:
                child.send_signal(signal.SIGKILL)
                break
            time.sleep(0.5)
        child.wait()
    if killed_at is None or child.returncode != -signal.SIGKILL:
        raise RuntimeError(f"the run to kill ended with {child.returncode} before its state passed block {layers // 3}")
    run = timed([*cmd, "--resume"], args.work / "resume-resumed.log")
    shards = sorted(p.name for p in whole.glob("*.safetensors"))
    identical = shards == sorted(p.name for p in out.glob("*.safetensors")) and all(
        (whole / n).read_bytes() == (out / n).read_bytes() for n in shards)
    return {"killed_after_blocks": killed_at, "blocks": layers, "resumed": run, "weight_files": len(shards),
            "byte_identical": identical}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("bench-big"))
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--layers", type=int, nargs="+", default=[26, 8])
    ap.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"])
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--resume-demo", action="store_true", help="kill -9 a Wanda run on the deepest model, resume it, "
                    "compare its weight files with the uninterrupted run's (needs wanda in --methods)")
    args = ap.parse_args()
    compress_cmd = [sys.executable, "-m", "compress.cli"]
    results = {}
    for layers in args.layers:
        model = build(args.work / f"llama-{layers}L-bf16", layers)
        size = sum(p.stat().st_size for p in model.glob("*.safetensors"))
        for method in args.methods:
            name = f"{method}-{layers}L"
            out = args.work / f"out-{name}"
            run = timed([*compress_cmd, "prune", *_prune_args(model, method, args), "--out", str(out), "--overwrite"],
                        args.work / f"{name}.log")
            results[name] = {"layers": layers, "checkpoint_bytes": size, **run}
            print(name, json.dumps(results[name]), flush=True)
    if args.resume_demo:
        layers = max(args.layers)
        results["resume"] = resume_demo(compress_cmd, args.work / f"llama-{layers}L-bf16", args.work / f"out-wanda-{layers}L",
                                        args.work / "resumed", layers, args)
        print("resume", json.dumps(results["resume"]), flush=True)
    out_json = args.json or args.work / "streaming.json"
    out_json.write_text(json.dumps({"protocol": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2))


if __name__ == "__main__":
    main()
