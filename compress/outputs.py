"""Output folders: one writer each, replaced only where that is safe, never seen half-written.

A command that writes a folder ``OUT`` first *claims* it (``claim``), before any work:

- **One writer.** An exclusive ``fcntl`` lock on ``.OUT.lock`` beside it, held until the new folder is in
  place. A second run on the same ``OUT`` is refused at once, naming the first one's pid; the kernel drops
  the lock when its holder dies, even by ``kill -9``, so a crash never leaves ``OUT`` locked.
- **Leftovers repaired.** An overwrite swaps folders in three steps (``OUT`` -> ``.OUT.old``, the new folder
  -> ``OUT``, ``.OUT.old`` removed). A run killed between them leaves ``.OUT.old``; the next claim restores it
  (killed before the new folder was in place) or removes it (killed after), and says which.
- **Overwrite policy.** ``--overwrite`` replaces only an empty folder or one compress wrote (it holds the
  command's marker file, e.g. compression.json, naming compress's version); never an input's folder, a folder
  containing an input, ``/`` or the home folder.

The new output is written in a sibling folder (``.OUT.partial`` for resumable runs, else ``.OUT.tmp-*``) and
renamed into place when complete (``Claim.writing``), so ``OUT`` is always either the old output or the new.
A resumable run keeps its resume state (``resume/state.json``) until the rename has happened: once the
computation is finished the state says so (``finish_state``), and ``--resume`` then only moves the finished
folder into place instead of recomputing it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import platform
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

METADATA = "compression.json"  # what compress prune writes last into a model folder; marks it as compress's
RESUME_STATE = "resume/state.json"
GGUF_FILE = "model.gguf"  # a single-file output (``--out X.gguf``) is written here in its folder, then moved
GGUF_METADATA_KEY = "compress.compression_json"  # compression.json's content inside a GGUF compress wrote


def is_file_output(out: Path) -> bool:
    """Whether ``out`` names a single file (a ``.gguf``) rather than a model folder."""
    return Path(out).suffix == ".gguf"


class OutputError(ValueError):
    """The output cannot be written as asked: the message names the value and the fix."""


def partial_folder(out: Path) -> Path:
    """Where a resumable run of ``out`` writes until it is complete."""
    return Path(out).with_name(f".{Path(out).name}.partial")


def _old_folder(out: Path) -> Path:
    return out.with_name(f".{out.name}.old")


def _lock_file(out: Path) -> Path:
    return out.with_name(f".{out.name}.lock")


def versions() -> dict:
    """The versions a written folder records (compress's own marks the folder as compress's)."""
    from importlib.metadata import PackageNotFoundError, version

    import torch
    import transformers

    import compress

    found = {"compress": compress.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
             "python": platform.python_version()}
    for package in ("lm_eval", "compressed-tensors"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def written_by_compress(folder: Path, marker: str = METADATA) -> bool:
    """Whether ``folder`` holds ``marker``, a JSON object whose ``versions`` name compress (for a ``.gguf``
    file: its ``GGUF_METADATA_KEY`` entry)."""
    try:
        if is_file_output(folder) and Path(folder).is_file():
            import gguf

            field = gguf.GGUFReader(str(folder)).fields.get(GGUF_METADATA_KEY)
            data = json.loads(field.contents()) if field is not None else None
        else:
            data = json.loads((Path(folder) / marker).read_text())
    except (OSError, ValueError, IndexError, KeyError):
        return False
    return isinstance(data, dict) and isinstance(data.get("versions"), dict) and "compress" in data["versions"]


class _Lock:
    """An exclusive lock on ``.OUT.lock``, its holder's pid written in it; the file is removed on release."""

    def __init__(self, out: Path):
        self.path = _lock_file(out)
        self.fd: int | None = None

    def acquire(self) -> None:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise OutputError(f"cannot write beside the output ({self.path}: {err.strerror}): choose a "
                                  f"writable --out") from err
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                holder = os.read(fd, 32).decode(errors="replace").strip()
                os.close(fd)
                if err.errno not in (errno.EAGAIN, errno.EACCES):
                    raise OutputError(f"cannot lock {self.path} ({err.strerror}): choose an --out on a local "
                                      f"file system") from err
                out = self.path.with_name(self.path.name[1:-len(".lock")])
                raise OutputError(f"{str(out)!r} is being written by another compress run (pid {holder or 'unknown'}): "
                                  f"wait for it to end or choose another --out") from None
            try:  # the holder before us may have removed the file between our open and our lock: take the new one
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # while still holding it, so no one locks a file about to vanish
            os.close(self.fd)
            self.fd = None


def _repair(out: Path) -> None:
    """Finish or undo what a killed run left beside ``out`` (called under the lock, so nothing else writes)."""
    leftovers = sorted(p for p in out.parent.glob(f".{out.name}.old*")  # .old, and .old-PID of older versions
                       if p.is_dir() and re.fullmatch(r"\.old(-\d+)?", p.name[len(out.name) + 1:]))
    for old in leftovers:
        if out.exists():
            shutil.rmtree(old)
            log.warning("removed %s: the previous output of an overwrite that was killed after the new output "
                        "was in place", old)
        else:
            old.rename(out)
            log.warning("restored %s from %s: an overwrite was killed before the new output was in place", out, old)
    for tmp in (p for p in out.parent.glob(f".{out.name}.tmp-*") if p.is_dir()):
        shutil.rmtree(tmp, ignore_errors=True)
        log.warning("removed %s, left by a run that was killed while writing", tmp)
    partial = partial_folder(out)
    if is_file_output(out) and (_read_state(partial / RESUME_STATE) or {}).get("finished") \
            and not (partial / GGUF_FILE).exists():
        shutil.rmtree(partial)
        log.warning("removed %s: the folder of a run that was killed just after its file was in place", partial)
    state = out / Path(RESUME_STATE).parent
    if written_by_compress(out) and (_read_state(out / RESUME_STATE) or {}).get("finished"):
        shutil.rmtree(state)
        log.warning("removed %s: the resume state of a run that was killed just after its output was in place", state)


def _read_state(path: Path) -> dict | None:
    """A resume state file's JSON, ``None`` when there is none (or a kill left it unreadable)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def check_output(out: Path, overwrite: bool, marker: str = METADATA) -> None:
    """Refuse an existing ``out`` unless ``overwrite``, and refuse to overwrite what compress may not replace.

    Raises:
        OutputError: naming the folder, the reason and the fix.
    """
    if not out.exists():
        return
    if is_file_output(out):
        if not out.is_file():
            raise OutputError(f"output {str(out)!r} exists and is not a file: choose another --out")
        if not overwrite:
            raise OutputError(f"output file {str(out)!r} exists: pass --overwrite or choose another --out")
        if not written_by_compress(out):
            raise OutputError(f"--overwrite replaces only a GGUF file compress wrote; {str(out)!r} is not one: "
                              f"choose another --out")
        return
    if not out.is_dir():
        raise OutputError(f"output {str(out)!r} exists and is not a folder: choose another --out")
    if not overwrite:
        raise OutputError(f"output folder {str(out)!r} exists: pass --overwrite or choose another --out")
    if any(out.iterdir()) and not written_by_compress(out, marker):
        sample = next(iter(sorted(p.name for p in out.iterdir())))
        raise OutputError(f"--overwrite replaces only an empty folder or one compress wrote (with {marker}); "
                          f"{str(out)!r} holds other files (e.g. {sample!r}): choose another --out")


def _check_not_precious(out: Path, inputs: tuple[str, ...]) -> None:
    """Refuse an ``out`` that is ``/``, the home folder, an input or a folder containing one (before the lock:
    these are properties of the paths alone)."""
    real = out.resolve()
    if real == Path("/").resolve() or real == Path.home().resolve():
        raise OutputError(f"--out {str(out)!r} is the root or your home folder, which compress never writes over: "
                          f"choose another --out")
    for given in inputs:
        source = Path(given).expanduser()
        if source.exists() and (source.resolve() == real or real in source.resolve().parents):
            what = "is" if source.resolve() == real else "contains"
            raise OutputError(f"--out {str(out)!r} {what} the input {given!r}, which a run must never delete: "
                              f"choose another --out")


def finish_state(folder: Path, fingerprint: dict) -> None:
    """Mark the resumable run in ``folder`` as finished (its output complete): ``--resume`` will only move it
    into place. Written atomically, then the block states it replaces are dropped."""
    state = folder / RESUME_STATE
    state.parent.mkdir(exist_ok=True)
    tmp = state.with_name(f".{state.name}.partial")
    tmp.write_text(json.dumps({"fingerprint": fingerprint, "finished": True}) + "\n")
    os.replace(tmp, state)
    for old in state.parent.glob("state-*.safetensors"):
        old.unlink()


def read_state(out: Path) -> dict | None:
    """The resume state of ``out``'s unfinished run, if any."""
    return _read_state(partial_folder(out) / RESUME_STATE)


def check_unfinished(out: Path, resume: bool) -> bool:
    """Refuse (at the claim, before any work) to run over an unfinished run's folder unless ``resume``.

    Returns:
        Whether the run to resume is already finished (only its move into place is left).
    """
    partial = partial_folder(out)
    saved = read_state(out)
    finished = bool(saved and saved.get("finished"))
    if partial.exists() and not resume:
        what = ("a finished run of this output that was killed before it was moved into place: pass --resume to "
                "move it there without recomputing" if finished else
                "an unfinished run of this output: pass --resume to continue it")
        raise OutputError(f"{str(partial)!r} holds {what}, or delete that folder")
    if resume and saved is None:
        log.info("--resume: no unfinished run of %s to continue; starting from the first block", out)
    return finished


def check_fingerprint(out: Path, fingerprint: dict) -> None:
    """Refuse to resume a run whose model files, calibration, recipe or versions differ from this run's
    (``fingerprint``)."""
    saved = read_state(out)
    before = (saved or {}).get("fingerprint")
    if before is None:
        return
    differ = sorted(k for k in {*before, *fingerprint} if before.get(k) != fingerprint.get(k))
    if differ:
        raise OutputError(f"--resume: the unfinished run in {str(partial_folder(out))!r} differs from this one in "
                          f"{', '.join(differ)}: rerun it as it was, or delete that folder")


class Claim:
    """``out`` taken by this run (see ``claim``): write the new output with ``writing``."""

    def __init__(self, out: Path):
        self.out = out

    @contextmanager
    def writing(self, resumable: bool = False):
        """Yield a folder beside ``out`` to write the new output in; when the block ends without error it
        replaces ``out``, else it is removed (kept, with ``resumable``, when it holds a resume state)."""
        out = self.out
        if resumable:
            tmp = partial_folder(out)
            tmp.mkdir(exist_ok=True)
        else:
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            yield tmp
            self._move_into_place(tmp)
        except BaseException:
            if resumable and (tmp / RESUME_STATE).is_file():
                log.warning("kept the unfinished run in %s: rerun the same command with --resume to continue it", tmp)
            elif tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _move_into_place(self, tmp: Path) -> None:
        """Three renames and removals; ``_repair`` completes or undoes them after a kill between any two. A
        file output is one atomic rename of the file, then the folder is removed."""
        out, old = self.out, _old_folder(self.out)
        if is_file_output(out):
            os.replace(tmp / GGUF_FILE, out)
            shutil.rmtree(tmp)
            return
        if out.exists():
            os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(out / Path(RESUME_STATE).parent, ignore_errors=True)
        if old.exists():
            shutil.rmtree(old)


@contextmanager
def claim(out: Path, overwrite: bool, inputs: tuple[str, ...] = (), marker: str = METADATA):
    """Take ``out`` for this run until the block ends: never an input, the root or the home folder; its lock;
    leftovers of a killed run repaired; the overwrite policy checked (``check_output``). Creates ``out``'s
    parent folders if needed (removed again if the run writes nothing).

    Raises:
        OutputError: another run holds ``out``, or ``out`` may not be written (see ``check_output``).
    """
    out = Path(out)
    _check_not_precious(out, inputs)
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create the folder of --out {str(out)!r} ({err.strerror}): choose a writable "
                          f"--out") from err
    lock = _Lock(out)
    try:
        lock.acquire()
        try:
            _repair(out)
            check_output(out, overwrite, marker)
            yield Claim(out)
        finally:
            lock.release()
    finally:
        for folder in created:  # innermost first; stops at the first that is not empty
            try:
                folder.rmdir()
            except OSError:
                break
