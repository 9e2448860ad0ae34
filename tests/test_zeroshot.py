"""Zero-shot through the real lm-eval on tiny models and a task written by the test; reports on synthetic JSONs."""

import json

import pytest
from typer.testing import CliRunner

from compress.cli import app

runner = CliRunner()

QUESTIONS = [
    ("The sun rises in the", ["east", "west", "sea", "cup"], 0),
    ("Water freezes at zero degrees", ["Celsius", "apples", "loudly", "green"], 0),
    ("A week has seven", ["days", "moons", "rivers", "chairs"], 0),
    ("Cats like to chase", ["mice", "planets", "taxes", "verbs"], 0),
    ("The opposite of hot is", ["cold", "tall", "blue", "fast"], 0),
    ("Bread is made from", ["flour", "glass", "iron", "smoke"], 0),
]


@pytest.fixture
def task_dir(tmp_path):
    """A multiple-choice task in lm-eval's format, its data a local jsonl (works offline)."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    data = folder / "tiny_mc.jsonl"
    data.write_text("\n".join(json.dumps({"question": q, "choices": c, "answer": a}) for q, c, a in QUESTIONS) + "\n")
    (folder / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""")
    return folder


def test_eval_tasks_equal_lm_eval_on_the_same_folder(saved_model, task_dir, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    model_dir = saved_model("llama")
    out = tmp_path / "zs.json"
    result = runner.invoke(app, ["eval", str(model_dir), "--tasks", "tiny_mc", "--include-path", str(task_dir),
                                 "--offline", "--device", "cpu", "--json", str(out)])
    assert result.exit_code == 0, result.output
    ours = json.loads(out.read_text())
    assert "ppl" not in ours  # --tasks alone: no perplexity
    metrics = ours["zero_shot"]["tasks"]["tiny_mc"]
    assert {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"} <= set(metrics)
    assert ours["zero_shot"]["protocol"]["n_samples"]["tiny_mc"] == len(QUESTIONS)
    assert "lm_eval" in ours["versions"]

    theirs = simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype=float32", tasks=["tiny_mc"],
                             task_manager=TaskManager(include_path=str(task_dir)), batch_size=1, device="cpu",
                             bootstrap_iters=1000)["results"]["tiny_mc"]
    assert metrics["acc"] == theirs["acc,none"] and metrics["acc_norm"] == theirs["acc_norm,none"]


def test_eval_combines_perplexity_tasks_and_activation_sparsity(saved_model, task_dir, calib_txt, tmp_path):
    model_dir = saved_model("qwen2")
    pruned = tmp_path / "p"
    prune = runner.invoke(app, ["prune", str(model_dir), "--out", str(pruned), "--calib", str(calib_txt), "--nsamples",
                                "4", "--seqlen", "32", "--device", "cpu", "--sparsity", "0.5", "--act-sparsity", "0.3"])
    assert prune.exit_code == 0, prune.output
    out = tmp_path / "both.json"
    result = runner.invoke(app, ["eval", str(pruned), "--ppl", str(calib_txt), "--seqlen", "32", "--limit", "3",
                                 "--tasks", "tiny_mc", "--include-path", str(task_dir), "--device", "cpu", "--json", str(out)])
    assert result.exit_code == 0, result.output
    both = json.loads(out.read_text())
    assert both["windows"] == 3 and both["zero_shot"]["protocol"]["limit"] == 3
    assert both["compression"]["recipe"]["act"]["sparsity"] == 0.3
    assert both["activation_sparsity"] and all(0 < s < 1 for s in both["activation_sparsity"].values())


def test_unknown_task_is_one_line_exit_2(saved_model, task_dir):
    result = runner.invoke(app, ["eval", str(saved_model("llama")), "--tasks", "no_such_task", "--include-path",
                                 str(task_dir), "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert "lm-eval has no task 'no_such_task'" in result.output


def _result(path, ppl, acc, recipe=None, sparsity=0.0, weights_format="dense"):
    compression = {"recipe": recipe, "format": weights_format, "report": {"sparsity": sparsity, "layers": []}} if recipe else None
    path.write_text(json.dumps({"model": str(path), "ppl": ppl, "compression": compression,
                                "zero_shot": {"mean_accuracy": acc, "tasks": {"arc_easy": {"acc": acc}}}}))
    return path


def test_report_puts_dense_first_with_deltas_and_writes_plots(tmp_path):
    wanda = lambda s: {"prune": {"method": "wanda", "pattern": {"sparsity": s, "n": 0, "m": 0}}}  # noqa: E731
    files = [_result(tmp_path / "w50.json", 40.0, 0.50, wanda(0.5), 0.5),
             _result(tmp_path / "dense.json", 20.0, 0.60),
             _result(tmp_path / "w30.json", 25.0, 0.58, wanda(0.3), 0.3, "packed")]
    out = tmp_path / "report"
    result = runner.invoke(app, ["report", *map(str, files), "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = [line for line in (out / "report.md").read_text().splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split(" | ")[0].strip("| ") for r in rows] == ["dense", "w30", "w50"]
    assert "| +20.00 |" in rows[2] and "| -0.1000 |" in rows[2]
    assert [r.split(" | ")[2] for r in rows] == ["dense", "packed", "dense"]
    for png in ("ppl.png", "accuracy.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / png).stat().st_size > 1000


def test_report_rejects_a_file_that_is_not_a_result(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"hello": 1}')
    result = runner.invoke(app, ["report", str(bad), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "has no perplexity or zero-shot result" in result.output
    assert not (tmp_path / "r").exists()


def test_offline_missing_task_data_is_one_line_exit_2(saved_model, task_dir):
    (task_dir / "tiny_mc.jsonl").unlink()
    result = runner.invoke(app, ["eval", str(saved_model("llama")), "--tasks", "tiny_mc", "--include-path",
                                 str(task_dir), "--offline", "--device", "cpu"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot load the data of ['tiny_mc']" in errors[0] and "--include-path" in errors[0]
