"""Killed runs resume to byte-identical weights; nothing about an unfinished or failed run is silently lost."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from compress import outputs
from compress.cli import app
from tests.conftest import build

runner = CliRunner()
ARGS = ["--method", "sparsegpt", "--pattern", "2:4", "--quant", "w4g16", "--nsamples", "4", "--seqlen", "32",
        "--device", "cpu", "--save-every", "0"]

# Runs the CLI in a child process that SIGKILLs itself once block KILL_AFTER's resume state is on disk.
KILLER = textwrap.dedent("""
    import os, signal, sys
    from compress import export
    kill_after = int(os.environ["KILL_AFTER"])
    save = export.StreamedOutput._save
    def save_then_die(self, state):
        save(self, state)
        if state.next_block > kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    export.StreamedOutput._save = save_then_die
    from compress.cli import app
    app(sys.argv[1:])
""")


@pytest.fixture
def deep_model(tmp_path, tokenizer):
    folder = tmp_path / "deep"
    build("llama", num_hidden_layers=5).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _shards(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def _gguf_tensors(path):
    import gguf

    return {t.name: (t.tensor_type, bytes(t.data)) for t in gguf.GGUFReader(str(path)).tensors}


@pytest.mark.parametrize("fmt", ["dense", "gguf"])
def test_killed_run_resumes_to_byte_identical_weights(deep_model, calib_txt, tmp_path, fmt):
    suffix, extra = ("", []) if fmt == "dense" else (".gguf", ["--format", "gguf"])
    whole, killed = tmp_path / f"whole{suffix}", tmp_path / f"killed{suffix}"
    args = ARGS if fmt == "dense" else [a.replace("w4g16", "w4g32") for a in ARGS]  # GGUF blocks hold 32
    common = ["prune", str(deep_model), "--calib", str(calib_txt), *args, *extra]
    assert runner.invoke(app, [*common, "--out", str(whole)]).exit_code == 0

    env = {**os.environ, "KILL_AFTER": "2", "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.run([sys.executable, "-c", KILLER, *common, "--out", str(killed)], env=env,
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    partial = outputs.partial_folder(killed)
    assert not killed.exists() and json.loads((partial / outputs.RESUME_STATE).read_text())["state"]["next_block"] == 3

    again = runner.invoke(app, [*common, "--out", str(killed)])
    assert again.exit_code == 2 and "pass --resume" in again.output  # reported, not silently deleted
    assert partial.is_dir()

    resumed = runner.invoke(app, [*common, "--out", str(killed), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert not partial.exists()
    if fmt == "gguf":  # one file: its tensors byte for byte (the metadata holds the run's timings)
        assert killed.is_file() and _gguf_tensors(killed) == _gguf_tensors(whole)
        return
    assert not (killed / "resume").exists()
    assert _shards(killed) == _shards(whole)
    layers = json.loads((killed / "compression.json").read_text())["report"]["layers"]
    assert [r["name"] for r in layers] == [r["name"] for r in json.loads((whole / "compression.json").read_text())["report"]["layers"]]


def test_resume_refuses_a_different_recipe_and_keeps_the_unfinished_run(deep_model, calib_txt, tmp_path):
    out = tmp_path / "out"
    common = ["prune", str(deep_model), "--calib", str(calib_txt), *ARGS]
    env = {**os.environ, "KILL_AFTER": "0", "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", KILLER, *common, "--out", str(out)], env=env, capture_output=True, timeout=300)
    partial = outputs.partial_folder(out)
    before = _shards(partial)
    other = [a if a != "w4g16" else "w4g32" for a in common]
    result = runner.invoke(app, [*other, "--out", str(out), "--resume"])
    assert result.exit_code == 2 and "differs from this one in recipe" in result.output, result.output
    assert _shards(partial) == before


@pytest.mark.parametrize("failure", ["os", "safetensors"])
def test_a_failed_save_leaves_the_previous_output_and_says_why(deep_model, calib_txt, tmp_path, monkeypatch, failure):
    out = tmp_path / "out"
    common = ["prune", str(deep_model), "--calib", str(calib_txt), *ARGS, "--out", str(out)]
    assert runner.invoke(app, common).exit_code == 0
    previous = _shards(out)
    source = _shards(deep_model)

    from compress import checkpoint

    real = checkpoint.ShardWriter.write

    def disk_full_at_third_shard(self, k, tensors):
        if k == 2 and failure == "os":
            raise OSError(28, "No space left on device", str(self.folder / self.shard_name(k)))
        if k == 2:  # what safetensors' own writer raises on a full disk (seen on this machine)
            from safetensors import SafetensorError

            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        real(self, k, tensors)

    monkeypatch.setattr(checkpoint.ShardWriter, "write", disk_full_at_third_shard)
    result = runner.invoke(app, [*common, "--overwrite"])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0], result.output
    assert _shards(out) == previous and _shards(deep_model) == source
    assert (outputs.partial_folder(out) / outputs.RESUME_STATE).is_file()  # blocks 0-1 kept for --resume


def test_max_memory_runs_bounded_to_the_same_weights_and_refuses_what_cannot_fit(deep_model, calib_txt, tmp_path, caplog):
    common = ["prune", str(deep_model), "--calib", str(calib_txt), *ARGS]
    free, tight = tmp_path / "free", tmp_path / "tight"
    assert runner.invoke(app, [*common, "--out", str(free), "--max-memory", "0"]).exit_code == 0
    # 4 x 32 tokens: hidden states 32 KiB per copy; 700 KB fits the bounded mode and a block, not the parked one
    with caplog.at_level("INFO", logger="compress"):
        result = runner.invoke(app, [*common, "--out", str(tight), "--max-memory", "500KB"])
    assert result.exit_code == 0, result.output
    assert "-> bounded" in caplog.text
    assert _shards(tight) == _shards(free)

    for budget, message in (("50KB", "lower --nsamples or --seqlen, or raise --max-memory"),
                            ("lots", "--max-memory 'lots' is not a size")):
        out = tmp_path / f"refused-{budget}"
        result = runner.invoke(app, [*common, "--out", str(out), "--max-memory", budget])
        assert result.exit_code == 2 and message in result.output, result.output
        assert not out.exists() and not outputs.partial_folder(out).exists()
