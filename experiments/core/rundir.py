"""Atomic run folders: a study writes into ``<out>.incomplete`` and renames it to ``<out>`` when done.

* An interrupted run leaves only ``<out>.incomplete`` (never files that look finished); with
  ``--checkpoint-every`` it holds the SVI checkpoints and ``--resume`` continues it.
* ``<out>`` holding a finished run (a ``run.json``) is refused unless ``--overwrite``; then the old
  folder is replaced whole, after the new run completed (a failed run keeps the old one).
* A run that fails removes its folder (and any parent folders it created).
* ``run.json`` is written last; its ``files`` list is exactly what the folder holds.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from elbolab.experiments.core.study import CliError

SUFFIX = ".incomplete"
LOCK = ".lock"  # pid and host of the run writing the folder
SAVED = ".settings.json"  # the settings, for --resume
CHECKPOINTS = "checkpoints"


def incomplete_path(out: Path) -> Path:
    return out.with_name(out.name + SUFFIX)


def is_finished_run(path: Path) -> bool:
    return path.is_dir() and (path / "run.json").is_file()


def _lock_owner(folder: Path) -> int | None:
    """The pid of a live process on this host writing ``folder``, else None."""
    try:
        pid_text, host = (folder / LOCK).read_text().split()[:2]
        pid = int(pid_text)
    except (OSError, ValueError):
        return None
    if host != socket.gethostname() or pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return pid


def has_checkpoints(folder: Path) -> bool:
    return any((folder / CHECKPOINTS).glob("*.pt")) if (folder / CHECKPOINTS).is_dir() else False


def check_out(out: Path, *, overwrite: bool, resuming: bool = False) -> None:
    """Everything about ``--out`` that can be checked without creating anything."""
    shown = str(out)
    if out.name in ("", ".", ".."):
        raise CliError(f"--out: {shown!r} names no folder of its own; give a path like runs/x")
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise CliError(f"--out: {shown!r} exists and is not a folder")
        if is_finished_run(out):
            if not overwrite:
                raise CliError(f"--out: {shown!r} holds a finished run; pass --overwrite to "
                               "replace it (the whole folder), or choose another --out")
        elif any(out.iterdir()):
            raise CliError(f"--out: {shown!r} is a non-empty folder that holds no run (no "
                           "run.json); choose another --out")
    anc = out.absolute().parent
    while not anc.exists() and not anc.is_symlink():
        anc = anc.parent
    if not anc.is_dir():
        raise CliError(f"--out: cannot create {shown!r}: {str(anc)!r} is not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise CliError(f"--out: cannot create {shown!r}: {str(anc)!r} is not writable")
    tmp = incomplete_path(out)
    if (tmp.exists() or tmp.is_symlink()) and not resuming:
        if not tmp.is_dir():
            raise CliError(f"--out: {str(tmp)!r} (the run's working folder) exists and is not a "
                           "folder")
        owner = _lock_owner(tmp)
        if owner is not None:
            raise CliError(f"--out: another run (pid {owner}) is writing {str(tmp)!r}")
        if has_checkpoints(tmp) and not overwrite:
            raise CliError(f"--out: {str(tmp)!r} holds an interrupted run with checkpoints; "
                           f"continue it with --resume {tmp}, or start over with --overwrite")


def find_resume(path: Path, study: str) -> tuple[Path, dict]:
    """The folder of the interrupted run ``path`` (its ``.incomplete`` folder or the ``--out`` it
    was given) and its saved settings."""
    path = Path(path)
    if path.name.endswith(SUFFIX) and path.is_dir():
        tmp = path
    elif incomplete_path(path).is_dir():
        tmp = incomplete_path(path)
    elif is_finished_run(path):
        raise CliError(f"--resume: {str(path)!r} holds a finished run; nothing to resume")
    else:
        raise CliError(f"--resume: no interrupted run at {str(path)!r} (looked for "
                       f"{str(incomplete_path(path))!r})")
    try:
        saved = json.loads((tmp / SAVED).read_text())
        settings = saved["settings"]
    except (OSError, ValueError, KeyError, TypeError):
        raise CliError(f"--resume: {str(tmp)!r} holds no readable saved settings "
                       f"({SAVED}); it cannot be resumed") from None
    if saved.get("study") != study:
        raise CliError(f"--resume: {str(tmp)!r} is a run of {saved.get('study')!r}, not {study!r}")
    owner = _lock_owner(tmp)
    if owner is not None:
        raise CliError(f"--resume: a run (pid {owner}) is still writing {str(tmp)!r}")
    return tmp, settings


@dataclass
class RunFolder:
    """The folder a run writes into (``path``), and where it goes when complete (``out``)."""

    out: Path
    path: Path
    study: str
    resumed: bool = False
    created_parents: list[Path] = field(default_factory=list)
    # when this process opened it (wall clock and this process's CPU time): run.json's timings
    started: float = field(default_factory=time.perf_counter)
    cpu_started: float = field(default_factory=time.process_time)

    def timings(self) -> dict:
        """Wall and CPU seconds since the folder was opened (of this process: a resumed run
        counts from its resumption)."""
        return {"wall_seconds": round(time.perf_counter() - self.started, 2),
                "cpu_seconds": round(time.process_time() - self.cpu_started, 2)}

    def checkpoint(self, name: str) -> Path:
        return self.path / CHECKPOINTS / f"{name}.pt"


_current: RunFolder | None = None


def open_run(out: Path, study: str, settings: dict, *, resume: bool) -> RunFolder:
    """Create ``<out>.incomplete`` (or reopen it to resume: its checkpoints are kept, every other
    file goes) and make it the current run's folder."""
    global _current
    tmp = incomplete_path(out)
    created = []
    try:
        if resume:
            for p in tmp.iterdir():
                if p.name in (CHECKPOINTS, SAVED):
                    continue
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        else:
            if tmp.exists() or tmp.is_symlink():
                _remove(tmp)
            parent = tmp.absolute().parent
            missing = []
            while not parent.exists():
                missing.append(parent)
                parent = parent.parent
            for p in reversed(missing):
                p.mkdir()
                created.append(p)
            tmp.mkdir()
        (tmp / LOCK).write_text(f"{os.getpid()} {socket.gethostname()}\n")
        (tmp / SAVED).write_text(json.dumps({"study": study, "settings": settings}, indent=1))
    except OSError as exc:
        for p in reversed(created):
            _rmdir_quiet(p)
        if not resume:
            _remove(tmp)
        raise CliError(f"--out: cannot create {str(out)!r} ({exc.strerror or exc})") from None
    _current = RunFolder(out, tmp, study, resume, created)
    return _current


def current() -> RunFolder | None:
    return _current


def finish(folder: RunFolder, write_run_json) -> list[str]:
    """Drop the working files, write run.json (``write_run_json(path, files)``, files = the final
    listing) and rename the folder into place, replacing an old run whole. Returns the files."""
    global _current
    tmp, out = folder.path, folder.out
    shutil.rmtree(tmp / CHECKPOINTS, ignore_errors=True)
    files = sorted({p.name for p in tmp.iterdir() if p.name not in (LOCK, SAVED)} | {"run.json"})
    write_run_json(tmp / "run.json", files)
    (tmp / SAVED).unlink(missing_ok=True)
    (tmp / LOCK).unlink(missing_ok=True)
    old = None
    if out.is_dir() and not out.is_symlink():
        if any(out.iterdir()):
            old = out.with_name(f".{out.name}.replaced-{os.getpid()}")
            os.rename(out, old)
        else:
            out.rmdir()
    try:
        os.rename(tmp, out)
    except OSError:
        if old is not None:  # put the old run back: never lose it for a new one that failed
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _current = None
    return sorted(p.name for p in out.iterdir())


def abort(*, interrupted: bool = False) -> str | None:
    """After a failure: remove the current run's folder (and parents it created). An interrupted
    run (Ctrl-C) that wrote checkpoints is kept for --resume; returns a note saying so."""
    global _current
    folder, _current = _current, None
    if folder is None:
        return None
    if interrupted and has_checkpoints(folder.path):
        (folder.path / LOCK).unlink(missing_ok=True)
        return f"interrupted; continue with --resume {folder.path}"
    _remove(folder.path)
    for p in reversed(folder.created_parents):
        _rmdir_quiet(p)
    return None


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink(missing_ok=True)


def _rmdir_quiet(p: Path) -> None:
    try:
        p.rmdir()
    except OSError:
        pass


__all__ = ["RunFolder", "abort", "check_out", "current", "find_resume", "finish",
           "incomplete_path", "is_finished_run", "open_run"]
