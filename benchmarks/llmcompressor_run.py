"""Run llm-compressor's ``oneshot`` (Wanda or SparseGPT) as the peer to compare with. Runs in its own venv.

Feeds it the exact calibration token windows ``compress`` samples (a tensor file written by
``benchmarks/quality.py``), saves the pruned model as plain dense safetensors, and writes wall time and
peak RSS to ``timing.json`` in the output folder.

    python benchmarks/llmcompressor_run.py MODEL_DIR CALIB.pt wanda 0.5|2:4 OUT_DIR
"""

import json
import resource
import sys
import time

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer


def main(model_dir: str, calib_path: str, method: str, pattern: str, out: str) -> None:
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    start = time.perf_counter()
    tokens = torch.load(calib_path)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = Dataset.from_dict({"input_ids": tokens.tolist(), "attention_mask": torch.ones_like(tokens).tolist()})
    nm = ":" in pattern
    # lm_head is tied to the embeddings here: the modifier's default targets prune both, which
    # compress keeps dense (Wanda 50%: 54.4 instead of 40-41). A plain "lm_head" does not match the name
    # llm-compressor builds ("lm_head." with a trailing dot); its docs ask for "re:.*lm_head".
    kwargs = dict(sparsity=0.5 if nm else float(pattern), mask_structure=pattern if nm else "0:0", ignore=["re:.*lm_head"])
    modifier = {"wanda": WandaPruningModifier, "sparsegpt": SparseGPTModifier}[method](**kwargs)
    t0 = time.perf_counter()
    model = oneshot(
        model=model,
        tokenizer=tokenizer,
        dataset=data,
        recipe=[modifier],
        num_calibration_samples=tokens.shape[0],
        max_seq_length=tokens.shape[1],
        shuffle_calibration_samples=False,
    )
    oneshot_s = time.perf_counter() - t0
    model.save_pretrained(out, save_compressed=False)
    tokenizer.save_pretrained(out)
    timing = {
        "method": method,
        "pattern": pattern,
        "oneshot_seconds": oneshot_s,
        "process_seconds": time.perf_counter() - start,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    with open(f"{out}/timing.json", "w") as fh:
        json.dump(timing, fh, indent=2)
    print(json.dumps(timing))


if __name__ == "__main__":
    main(*sys.argv[1:])
