"""Zero-shot through compress eval vs lm-eval's own CLI (issue 6) on SmolLM2-135M, offline.

The task is ``arc_local``: arc_easy's prompt format and metrics (its YAML, with the data swapped) over 40
grade-school science questions written for this project in ARC's schema (``tasks/arc_local.jsonl``), since
the hub copy of ARC is unreachable here. The task YAML is written at run time, pointing at the jsonl.

Runs, one at a time, each timed with its peak RSS (``quality.timed``):
1. ``lm_eval --model hf --model_args pretrained=DENSE,dtype=float32`` (lm-eval's CLI, its own loading);
2. ``compress eval DENSE --tasks arc_local`` and the same on each ``--folders`` (pruned, ...).

    python benchmarks/zeroshot.py --work bench-work --folders bench-work/compress-wanda-0.5
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import prepare, protocol_parser, timed  # noqa: E402

HERE = Path(__file__).resolve().parent
YAML = """task: arc_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
doc_to_choice: "{{{{choices.text}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def main() -> None:
    ap = protocol_parser(__doc__, peer=False)
    ap.add_argument("--folders", nargs="*", default=[], type=Path, help="compressed folders to evaluate too")
    args = ap.parse_args()
    _, dense_dir, _ = prepare(args.work, args.data, args.nsamples, args.calib_seqlen)
    tasks = args.work / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    (tasks / "arc_local.yaml").write_text(YAML.format(data=HERE / "tasks" / "arc_local.jsonl"))
    bin_dir = Path(sys.executable).parent
    results = {}
    peer_out = args.work / "lm_eval_cli"
    timing = timed([str(bin_dir / "lm_eval"), "--model", "hf", "--model_args", f"pretrained={dense_dir},dtype=float32",
                    "--tasks", "arc_local", "--include_path", str(tasks), "--device", "cpu", "--batch_size", "1",
                    "--output_path", str(peer_out)], args.work / "lm_eval_cli.log")
    peer_json = next(peer_out.rglob("results_*.json"))
    peer = json.loads(peer_json.read_text())["results"]["arc_local"]
    results["lm_eval_cli_dense"] = {**timing, "acc": peer["acc,none"], "acc_norm": peer["acc_norm,none"]}
    for folder in [dense_dir, *args.folders]:
        out = args.work / f"zs-{folder.name}.json"
        timing = timed([str(bin_dir / "compress"), "eval", str(folder), "--tasks", "arc_local", "--include-path",
                        str(tasks), "--offline", "--device", "cpu", "--json", str(out)], args.work / f"zs-{folder.name}.log")
        metrics = json.loads(out.read_text())["zero_shot"]["tasks"]["arc_local"]
        results[f"compress_{folder.name}"] = {**timing, "acc": metrics["acc"], "acc_norm": metrics["acc_norm"], "json": str(out)}
    (args.work / "zeroshot.json").write_text(json.dumps(results, indent=2))
    print("| run | acc | acc_norm | s | peak RSS MiB |\n|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['acc']:.4f} | {r['acc_norm']:.4f} | {r['seconds']:.0f} | {r['peak_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
