"""Activation sparsity (issue 4) on SmolLM2-135M: TEAL, CHESS and WINA at 25/40/50%, and with Wanda 50%.

Same protocol as ``quality.py``: thresholds calibrated on 128 x 512 tokens of valid.txt (seed 0); perplexity
on the first 50 windows of 1024 tokens of test.txt with the thresholds active on every token, and the
achieved activation sparsity of every targeted linear measured on that test text.

    python benchmarks/activations.py --work bench-work
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import prepare, protocol_parser, timed  # noqa: E402

# 50% first (the papers' ordering), then the combination with weight sparsity, then the lower targets
RUNS = {f"{method}-50": ["--act-sparsity", "0.5", "--act-method", method] for method in ("teal", "wina", "chess")}
RUNS["wanda50+wina-40"] = ["--method", "wanda", "--sparsity", "0.5", "--act-sparsity", "0.4", "--act-method", "wina"]
RUNS.update({f"{method}-{int(s * 100)}": ["--act-sparsity", str(s), "--act-method", method]
             for s in (0.4, 0.25) for method in ("teal", "wina", "chess")})
# the WINA <= TEAL ordering at 50%: with the papers' single threshold set per linear, and on another calibration sample
RUNS.update({f"{method}-50-positions-off": ["--act-sparsity", "0.5", "--act-method", method, "--act-positions", "off"]
             for method in ("teal", "wina")})
RUNS.update({f"{method}-50-seed1": ["--act-sparsity", "0.5", "--act-method", method, "--seed", "1"]
             for method in ("teal", "wina")})
# absolute thresholds (the papers'), with and without position bands, against the default token-relative ones
RUNS.update({f"{method}-{int(s * 100)}-scale-none": ["--act-sparsity", str(s), "--act-method", method, "--act-scale", "none"]
             for s in (0.5, 0.4) for method in ("teal", "wina")})
RUNS.update({f"{method}-50-scale-none-positions-off": ["--act-sparsity", "0.5", "--act-method", method, "--act-scale", "none",
                                                       "--act-positions", "off"] for method in ("teal", "wina")})


def evaluate(folder: Path, data: Path, seqlen: int, limit: int) -> dict:
    import compress
    from compress.evals.perplexity import perplexity

    model, tok = compress.load(str(folder), with_tokenizer=True)
    ppl = perplexity(model, tok, str(data / "test.txt"), seqlen=seqlen, limit=limit).ppl
    return {"ppl": ppl, "act_sparsity": {name: hook.sparsity for name, hook in model.compress_sparsifiers.items()}}


def main() -> None:
    ap = protocol_parser(__doc__, peer=False)
    ap.add_argument("--only", nargs="*", help=f"runs to do, of {', '.join(RUNS)}")
    ap.add_argument("--reuse", action="store_true", help="reuse finished runs in --work")
    ap.add_argument("--json", type=Path, help="write the results here (default: WORK/activations.json)")
    args = ap.parse_args()
    _, dense_dir, _ = prepare(args.work, args.data, args.nsamples, args.calib_seqlen)
    compress_bin = str(Path(sys.executable).with_name("compress"))
    out_json = args.json or args.work / "activations.json"
    results = json.loads(out_json.read_text())["results"] if args.reuse and out_json.is_file() else {}
    for name, flags in RUNS.items():
        if (args.only and name not in args.only) or (args.reuse and "ppl" in results.get(name, {})):
            continue
        out = args.work / f"compress-act-{name}"
        timing = timed([compress_bin, "prune", str(dense_dir), *flags, "--calib", str(args.data / "valid.txt"),
                        "--nsamples", str(args.nsamples), "--seqlen", str(args.calib_seqlen), "--device", "cpu",
                        "--out", str(out), "--overwrite"], args.work / f"compress-act-{name}.log")
        row = {"flags": flags, **timing, **evaluate(out, args.data, args.eval_seqlen, args.limit)}
        target = float(flags[flags.index("--act-sparsity") + 1])
        achieved = row["act_sparsity"].values()
        row.update(target=target, min_achieved=min(achieved), max_achieved=max(achieved),
                   mean_achieved=sum(achieved) / len(achieved),
                   all_within_2_points=all(abs(a - target) <= 0.02 for a in achieved))
        results[name] = row
        print(name, json.dumps({k: v for k, v in row.items() if k != "act_sparsity"}), flush=True)
        out_json.write_text(json.dumps({"protocol": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2))
    print("\n| run | ppl | target | achieved min | mean | max | all within ±2 pts | prune s |\n|---|---|---|---|---|---|---|---|")
    for name, row in results.items():
        print(f"| {name} | {row['ppl']:.2f} | {row['target']:.2f} | {row['min_achieved']:.4f} | {row['mean_achieved']:.4f} "
              f"| {row['max_achieved']:.4f} | {row['all_within_2_points']} | {row['seconds']:.0f} |")


if __name__ == "__main__":
    main()
