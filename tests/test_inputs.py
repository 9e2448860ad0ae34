"""Damaged or wrong inputs end in one line that names the file and what is wrong, exit 2, nothing written; and
`compress report` never puts a delta across two measuring protocols."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from compress.cli import app
from compress.config import Pattern, PruneConfig, Recipe
from compress.evals.report import markdown, read_run
from tests.conftest import build

runner = CliRunner()


@pytest.fixture
def sharded(tmp_path, tokenizer):
    """A tiny Llama saved as several safetensors shards with transformers' index."""
    folder = tmp_path / "sharded"
    build("llama", num_hidden_layers=3).save_pretrained(folder, max_shard_size="100KB")
    tokenizer.save_pretrained(folder)
    assert len(list(folder.glob("*.safetensors"))) > 3
    return folder


def _cut(file, keep_bytes_less: int) -> None:
    size = file.stat().st_size
    with open(file, "r+b") as fh:
        fh.truncate(size - keep_bytes_less)


class Trap:
    """Unpickling this would call print: a checkpoint that holds more than tensors."""

    def __reduce__(self):
        return (print, ("code from the checkpoint ran",))


def _damage(kind: str, folder):
    """Damage a saved model folder in place; return the text the error line must contain."""
    shards = sorted(folder.glob("model-*.safetensors"))
    if kind == "first file cut in half":
        _cut(shards[0], shards[0].stat().st_size // 2)
        return f"{shards[0].name}: truncated"
    if kind == "later shard cut short":
        _cut(shards[-2], 100)
        return f"{shards[-2].name}: truncated"
    if kind == "header garbage":
        shards[1].write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"\x00" * 64)
        return f"{shards[1].name}: damaged safetensors header"
    if kind == "shard missing":
        shards[2].unlink()
        return f"names {shards[2].name} (and 0 more), which is missing"
    if kind == "tensor of the wrong shape":
        name = "model.layers.1.mlp.up_proj.weight"
        shard = next(s for s in shards if name in load_file(s))
        tensors = load_file(shard)
        tensors[name] = torch.zeros(100, 64)
        save_file(tensors, shard, metadata={"format": "pt"})
        return f"tensor '{name}' has shape [100, 64] where config.json makes it [128, 64]"
    if kind == "pickle checkpoint":
        tensors = {k: v for s in shards for k, v in load_file(s).items()}
        for s in [*shards, folder / "model.safetensors.index.json"]:
            s.unlink()
        torch.save({**tensors, "trap": Trap()}, folder / "pytorch_model.bin")
        return "torch's weights-only loader refused the pickle checkpoint pytorch_model.bin"
    if kind == "no config.json":
        (folder / "config.json").unlink()
        return "is not a model folder (no config.json)"
    raise ValueError(kind)


DAMAGE = ["first file cut in half", "later shard cut short", "header garbage", "shard missing",
          "tensor of the wrong shape", "pickle checkpoint", "no config.json"]


def _one_error(result) -> str:
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1, result.output
    assert "Traceback" not in result.output and "code from the checkpoint ran" not in result.output
    return errors[0]


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_model_is_named_before_any_work_and_nothing_is_written(kind, sharded, calib_txt, tmp_path):
    expected = _damage(kind, sharded)
    out = tmp_path / "out"
    result = runner.invoke(app, ["prune", str(sharded), "--sparsity", "0.5", "--calib", str(calib_txt),
                                 "--nsamples", "4", "--seqlen", "32", "--device", "cpu", "--out", str(out)])
    error = _one_error(result)
    assert expected in error and "writing" not in error, error
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


@pytest.mark.parametrize("kind", ["first file cut in half", "tensor of the wrong shape", "pickle checkpoint"])
def test_eval_of_a_damaged_model_is_one_line(kind, sharded, calib_txt):
    expected = _damage(kind, sharded)
    error = _one_error(runner.invoke(app, ["eval", str(sharded), "--ppl", str(calib_txt), "--device", "cpu"]))
    assert expected.split(":")[-1].strip() in error, error


def test_info_of_a_damaged_folder_is_one_line(sharded):
    expected = _damage("later shard cut short", sharded)
    assert expected in _one_error(runner.invoke(app, ["info", str(sharded)]))


def test_a_file_cut_during_the_run_is_a_read_failure_not_a_write_failure(sharded, calib_txt, tmp_path, monkeypatch):
    from compress import checkpoint

    real = checkpoint.load_module
    weight_map = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    last = sharded / weight_map["model.layers.2.mlp.down_proj.weight"]

    def cut_before_the_last_block(ckpt, module, prefix):
        if prefix.endswith(".2"):
            _cut(last, 100)
        return real(ckpt, module, prefix)

    monkeypatch.setattr(checkpoint, "load_module", cut_before_the_last_block)
    out = tmp_path / "out"
    result = runner.invoke(app, ["prune", str(sharded), "--sparsity", "0.5", "--calib", str(calib_txt),
                                 "--nsamples", "4", "--seqlen", "32", "--device", "cpu", "--out", str(out)])
    error = _one_error(result)
    assert error.startswith(f"error: reading {sharded} failed:") and "truncated data for tensor" in error, error
    assert not out.exists()


@pytest.mark.parametrize("args,expected", [
    (["--ppl", "SHORT"], "fewer than --seqlen 256"),
    ([], "cannot load wikitext2 from the hub"),  # the default text, out of reach offline
])
def test_eval_errors_on_the_text_are_one_line(args, expected, saved_model, tmp_path, monkeypatch):
    import datasets

    short = tmp_path / "short.txt"
    short.write_text("only a few words here")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # fail at once, not after the network's retries
    args = [str(short) if a == "SHORT" else a for a in args]
    result = runner.invoke(app, ["eval", str(saved_model("llama")), *args, "--device", "cpu"])
    assert expected in _one_error(result)


@pytest.mark.parametrize("spec,expected", [
    ("out/pruned/", "does not exist"), ("./missing", "does not exist"), ("a/b/c", "does not exist"),
])
def test_a_model_path_that_does_not_exist_is_named_as_a_path(spec, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    error = _one_error(runner.invoke(app, ["eval", spec, "--device", "cpu"]))
    assert f"model path {spec!r} does not exist" in error, error


def _result(tmp_path, name, *, ppl=None, windows=50, seqlen=1024, text="abc", tasks=None, limit=None, sparsity=None):
    recipe = Recipe(prune=PruneConfig("wanda", Pattern(sparsity))).to_dict() if sparsity is not None else None
    meta = None if sparsity is None else {"recipe": recipe,
                                          "report": {"sparsity": sparsity, "layers": []}, "format": "dense"}
    data = {"model": name, "compression": meta}
    if ppl is not None:
        data.update(ppl=ppl, windows=windows, seqlen=seqlen, source="test.txt", text_sha256=text)
    if tasks:
        data["zero_shot"] = {"tasks": {t: {"acc": 0.5} for t in tasks}, "mean_accuracy": 0.5,
                             "protocol": {"limit": limit, "num_fewshot": None}}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(data))
    return path


def test_report_puts_no_delta_across_perplexity_protocols(tmp_path):
    runs = [read_run(_result(tmp_path, "dense", ppl=21.5)),
            read_run(_result(tmp_path, "wanda50", ppl=38.7, sparsity=0.5)),
            read_run(_result(tmp_path, "wanda50-20w", ppl=35.0, windows=20, sparsity=0.5)),
            read_run(_result(tmp_path, "wanda50-other", ppl=30.0, text="def", sparsity=0.5))]
    table = markdown(runs)
    main, _, other = table.partition("Measured under another protocol")
    assert "+17.20" in main and "wanda50-20w" not in main and "wanda50-other" not in main
    assert "perplexity windows 20 vs 50" in other and "perplexity text another text" in other
    assert "+13.50" not in table and "+8.50" not in table  # no delta across protocols anywhere


def test_report_separates_zero_shot_runs_with_other_tasks_or_limits(tmp_path):
    runs = [read_run(_result(tmp_path, "dense", tasks=["arc_easy", "piqa"], limit=100)),
            read_run(_result(tmp_path, "same", tasks=["arc_easy", "piqa"], limit=100, sparsity=0.5)),
            read_run(_result(tmp_path, "fewer", tasks=["arc_easy"], limit=100, sparsity=0.5)),
            read_run(_result(tmp_path, "limited", tasks=["arc_easy", "piqa"], limit=20, sparsity=0.5))]
    main, _, other = markdown(runs).partition("Measured under another protocol")
    assert "| same |" in main and "fewer" not in main and "limited" not in main
    assert "zero-shot tasks ['arc_easy'] vs ['arc_easy', 'piqa']" in other and "zero-shot limit 20 vs 100" in other


def test_report_command_refuses_nothing_comparable_and_writes_its_marker(tmp_path):
    files = [_result(tmp_path, "dense", ppl=21.5), _result(tmp_path, "w", ppl=30.0, windows=20, sparsity=0.5)]
    out = tmp_path / "report"
    result = runner.invoke(app, ["report", *map(str, files), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "perplexity windows 20 vs 50" in (out / "report.md").read_text() and (out / "report.json").is_file()
    again = runner.invoke(app, ["report", *map(str, files), "--out", str(out), "--overwrite"])
    assert again.exit_code == 0, again.output
    assert _one_error(runner.invoke(app, ["report", *map(str, files), "--out", str(tmp_path), "--overwrite"]))
    assert os.path.exists(files[0])
