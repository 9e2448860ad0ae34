"""One writer per output, an --overwrite that cannot delete what it must not, and no stray folder after a kill
at any step of the final swap."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from compress import outputs
from compress.cli import app
from tests.conftest import build

runner = CliRunner()
ARGS = ["--method", "sparsegpt", "--sparsity", "0.5", "--nsamples", "4", "--seqlen", "32", "--device", "cpu"]


@pytest.fixture
def model(tmp_path, tokenizer):
    folder = tmp_path / "models" / "tiny"
    build("llama", num_hidden_layers=3).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _prune(model, out, calib, *extra):
    return runner.invoke(app, ["prune", str(model), "--calib", str(calib), *ARGS, "--out", str(out), *extra])


def _files(folder: Path) -> dict[str, bytes]:
    """Every file of a folder but its metadata, which records the run's time."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != outputs.METADATA}


def _strays(parent: Path, out: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{out.name}"))


def _one_error(result) -> str:
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1, result.output
    return errors[0]


def test_a_run_on_an_output_another_run_holds_is_refused_naming_its_pid(model, calib_txt, tmp_path):
    out, other = tmp_path / "out", tmp_path / "other"
    with outputs.claim(out, overwrite=False):  # this process plays the first run
        error = _one_error(_prune(model, out, calib_txt))
        assert f"being written by another compress run (pid {os.getpid()})" in error
        assert not out.exists() and _strays(tmp_path, out) == [".out.lock"]
        assert _prune(model, other, calib_txt).exit_code == 0  # another output is not affected
    assert _strays(tmp_path, out) == []  # the lock file goes with its holder
    assert _prune(model, out, calib_txt).exit_code == 0


@pytest.mark.parametrize("where", ["the input", "its parent", "a foreign folder", "home", "root"])
def test_overwrite_refuses_what_compress_did_not_write(where, model, calib_txt, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    (home / outputs.METADATA).write_text(json.dumps({"versions": {"compress": "0.1.0"}}))  # only home-ness refuses it
    monkeypatch.setenv("HOME", str(home))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    out, reason = {"the input": (model, "is the input"), "its parent": (model.parent, "contains the input"),
                   "a foreign folder": (foreign, "holds other files (e.g. 'notes.txt')"),
                   "home": (home, "is the root or your home folder"), "root": (Path("/"), "is the root")}[where]
    before = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    error = _one_error(_prune(model, out, calib_txt, "--overwrite"))
    assert reason in error, error
    assert {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()} == before  # nothing written


def test_overwrite_replaces_an_empty_folder_and_an_earlier_output(model, calib_txt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    assert _prune(model, out, calib_txt, "--overwrite").exit_code == 0
    assert outputs.written_by_compress(out)
    result = _prune(model, out, calib_txt, "--overwrite", "--sparsity", "0.6")
    assert result.exit_code == 0, result.output
    assert json.loads((out / outputs.METADATA).read_text())["recipe"]["prune"]["pattern"]["sparsity"] == 0.6
    assert _strays(tmp_path, out) == []


@pytest.mark.parametrize("output_in_place", [True, False])
def test_a_claim_repairs_what_an_older_version_left_and_says_so(output_in_place, tmp_path, caplog):
    out = tmp_path / "out"
    old = tmp_path / ".out.old-4242"  # what versions before the lock named the previous output during a swap
    marker = json.dumps({"versions": {"compress": "0.1.0"}})
    old.mkdir()
    (old / "weights").write_text("previous")
    (old / outputs.METADATA).write_text(marker)
    if output_in_place:
        out.mkdir()
        (out / "weights").write_text("new")
        (out / outputs.METADATA).write_text(marker)
    with caplog.at_level("WARNING", logger="compress"), outputs.claim(out, overwrite=True):
        pass
    assert _strays(tmp_path, out) == []
    assert (out / "weights").read_text() == ("new" if output_in_place else "previous")
    assert ("removed" if output_in_place else "restored") in caplog.text


# The CLI in a child that SIGKILLs itself just before the DIE_AT-th rename or removal of the output's folders
# (the output, its .partial, its .old, its resume state): every step of the final swap in turn.
KILLER = textwrap.dedent("""
    import os, shutil, signal, sys
    from pathlib import Path
    out, die_at, steps = Path(os.environ["OUT"]), int(os.environ["DIE_AT"]), [0]
    def swap_step(path):
        path = Path(path)
        if path == out or path.parent == out or (path.parent == out.parent and path.name.startswith(f".{out.name}.")):
            if steps[0] == die_at:
                os.kill(os.getpid(), signal.SIGKILL)
            steps[0] += 1
    rename, rmtree = os.rename, shutil.rmtree
    os.rename = lambda src, dst, *a, **k: (swap_step(src), rename(src, dst, *a, **k))[1]
    shutil.rmtree = lambda path, *a, **k: (swap_step(path), rmtree(path, *a, **k))[1]
    from compress.cli import app
    app(sys.argv[1:])
""")
SWAP_STEPS = {0: "before anything moved", 1: "after OUT became .OUT.old", 2: "after .OUT.partial became OUT",
              3: "after OUT/resume was removed"}


@pytest.mark.parametrize("die_at", sorted(SWAP_STEPS))
def test_a_kill_at_any_step_of_the_final_swap_leaves_nothing_stray_and_recomputes_nothing_finished(
        die_at, model, calib_txt, tmp_path, caplog):
    lone, out = tmp_path / "lone", tmp_path / "out"
    command = ["prune", str(model), "--calib", str(calib_txt), *ARGS]
    assert runner.invoke(app, [*command, "--out", str(lone)]).exit_code == 0
    assert runner.invoke(app, [*command, "--sparsity", "0.3", "--out", str(out)]).exit_code == 0  # to overwrite

    env = {**os.environ, "OUT": str(out), "DIE_AT": str(die_at), "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.run([sys.executable, "-c", KILLER, *command, "--out", str(out), "--overwrite"], env=env,
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]

    with caplog.at_level("INFO", logger="compress"):
        again = runner.invoke(app, [*command, "--out", str(out), "--overwrite", "--resume"])
    assert again.exit_code == 0, again.output
    assert _strays(tmp_path, out) == [] and not (out / "resume").exists()
    assert _files(out) == _files(lone)
    finished_in_partial = die_at <= 1  # the new output was complete but not yet in place: moved, not recomputed
    assert ("nothing recomputed" in caplog.text) == finished_in_partial, caplog.text
    assert ("restored" in caplog.text) == (die_at == 1) and ("removed" in caplog.text) == (die_at >= 2), caplog.text


@pytest.mark.slow
def test_of_two_concurrent_runs_on_one_output_one_is_refused_and_the_other_writes_a_lone_runs_output(
        model, calib_txt, tmp_path):
    lone = tmp_path / "lone"
    command = [sys.executable, "-m", "compress.cli", "prune", str(model), "--calib", str(calib_txt), *ARGS]
    assert subprocess.run([*command, "--out", str(lone)], capture_output=True, timeout=300).returncode == 0
    by_lock = 0
    for attempt in range(20):
        out = tmp_path / f"out{attempt}"
        runs = [subprocess.Popen([*command, "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True) for _ in range(2)]
        ended = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
        assert sorted(code for code, _ in ended) == [0, 2], ended
        refusal = next(err for code, err in ended if code == 2)
        assert "being written by another compress run" in refusal or "exists: pass --overwrite" in refusal, refusal
        by_lock += "being written by another compress run" in refusal
        assert _files(out) == _files(lone) and _strays(tmp_path, out) == []
    print(f"refused by the lock in {by_lock} of 20 tries, the rest found the output finished")
    assert by_lock >= 10  # the runs did overlap: the lock, not luck, kept them apart
