"""The console entry point re-executes once with tcmalloc/jemalloc preloaded when one is installed."""

import subprocess
import sys

import pytest

from compress import launch


class _Exec(Exception):
    pass


@pytest.fixture
def calls(monkeypatch):
    seen = {}

    def execve(path, argv, env):
        seen.update(path=path, argv=argv, env=env)
        raise _Exec

    monkeypatch.setattr(launch.os, "execve", execve)
    monkeypatch.setattr("compress.cli.main", lambda: seen.setdefault("cli", True))
    monkeypatch.setattr(launch, "_glibc_fixed_mmap_threshold", lambda: seen.setdefault("glibc", True))
    monkeypatch.setattr(sys, "argv", ["compress", "prune", "m", "--out", "x"])
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv(launch.ENV, raising=False)
    return seen


def test_reexecutes_with_the_allocator_preloaded(calls, monkeypatch):
    monkeypatch.setattr(launch, "find_allocator", lambda: "/opt/lib/libjemalloc.so.2")
    with pytest.raises(_Exec):
        launch.main()
    assert calls["argv"][1:] == ["-m", "compress.cli", "prune", "m", "--out", "x"]
    assert calls["env"]["LD_PRELOAD"] == "/opt/lib/libjemalloc.so.2"


@pytest.mark.parametrize("case", ["opted-out", "none-installed", "already-preloaded"])
def test_runs_in_place_otherwise(case, calls, monkeypatch):
    monkeypatch.setattr(launch, "find_allocator", lambda: None if case == "none-installed" else "/l/libtcmalloc.so.4")
    if case == "opted-out":
        monkeypatch.setenv(launch.ENV, "glibc")
    if case == "already-preloaded":
        monkeypatch.setenv("LD_PRELOAD", "/l/libtcmalloc.so.4")
    launch.main()
    assert calls.get("cli") and "argv" not in calls
    assert calls.get("glibc", False) == (case != "already-preloaded")  # glibc tuned only when it serves malloc


def test_the_command_runs_through_the_launcher():
    result = subprocess.run([sys.executable, "-m", "compress.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "prune" in result.stdout, result.stderr
