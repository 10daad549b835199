"""A study as a command: ``entry`` runs it, turns its errors into at most three lines
``prog: message`` (status 2), a warning into one line, and Ctrl-C or SIGTERM into the same
clean stop; the run's unfinished folder is handled by :mod:`elbolab.experiments.core.rundir`."""

from __future__ import annotations

import signal
import sys
import threading
import warnings

import torch

from elbolab.experiments.core import rundir
from elbolab.experiments.core.study import CliError
from elbolab.inference.evaluation.psis import reason as error_line


def entry(prog: str, fn, argv) -> int:
    """Run a study's ``fn(argv)`` as a command: a :class:`CliError` (or a ``SystemExit`` with a
    message) is printed as at most three lines ``prog: message`` on stderr and re-raised with
    exit status 2; any failure removes the run's unfinished folder; torch's thread count is
    restored afterwards. A warning raised during the run is one line ``prog: warning: ...`` on
    stderr (the console and the run's log), not Python's file:line and source line."""
    threads = torch.get_num_threads()
    term = _terminate_as_interrupt()
    try:
        with warnings.catch_warnings():  # the caller's filters and showwarning come back after
            warnings.showwarning = _one_line_warning(prog)
            return fn(argv) or 0
    except CliError as exc:
        rundir.abort()
        exc.message = whole_message(exc.message, exc)
        _print_error(prog, exc.message)
        raise
    except SystemExit as exc:
        if exc.code in (None, 0):
            raise
        rundir.abort()
        if isinstance(exc.code, str):
            msg = whole_message(exc.code.removeprefix(f"{prog}: "), exc)
            _print_error(prog, msg)
            raise CliError(msg) from None
        raise
    except KeyboardInterrupt:
        note = rundir.abort(interrupted=True)
        if note:
            print(f"{prog}: {note}", file=sys.stderr)
        raise
    except BaseException:
        rundir.abort()
        raise
    finally:
        torch.set_num_threads(threads)
        if term is not None:
            signal.signal(signal.SIGTERM, term)


def _terminate_as_interrupt():
    """A SIGTERM (``kill``, a scheduler's time limit) ends the run as Ctrl-C does: the
    unfinished folder is kept for ``--resume`` and the study says so. Returns the handler to
    restore (None off the main thread, where signals cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt(f"terminated (signal {signum})")

    return signal.signal(signal.SIGTERM, handler)


def whole_message(message: str, exc: BaseException) -> str:
    """``message`` with its first line completed when it was cut at a trailing ':' (a one-line
    error built from an exception's first line, e.g. "... raised ValueError: Error while packing
    tensors at site 'eta':"): the rest comes from the exception it was raised from or while
    handling (``__cause__``/``__context__``, kept even under ``from None``), as
    :func:`error_line` writes it."""
    lines = str(message).splitlines()
    head = lines[0].rstrip() if lines else ""
    source = exc.__cause__ or exc.__context__
    if not head.endswith(":") or source is None:
        return message
    full = error_line(source, limit=600)
    first = next((ln.strip() for ln in str(source).splitlines() if ln.strip()), "")
    if first and head.endswith(first) and len(full) > len(first):
        head = head[: -len(first)] + full
    elif not (first and head.endswith(first)):
        head = f"{head} {full}"
    return "\n".join([head, *lines[1:]])


def _one_line_warning(prog: str):
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"{prog}: warning: {message}", file=file or sys.stderr)
    return show


def _print_error(prog: str, message: str) -> None:
    lines = [ln for ln in str(message).splitlines() if ln.strip()] or ["error"]
    text = "\n".join([f"{prog}: {lines[0]}", *lines[1:3]])
    print(text[:2000], file=sys.stderr)


__all__ = ["entry", "whole_message"]
