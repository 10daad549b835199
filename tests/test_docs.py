"""Every code block of README.md and docs/*.md runs as a reader would copy it.

The blocks of every page run in order in one reader's folder, where ``make demo`` has run once
(the module's fixture: the tour at ``--quick`` into ``runs/demo``), so a command may use what the
demo or an earlier command wrote (``elbolab report runs/fit-mfa`` after the run that made it):

- ``python`` blocks run as scripts with the suite's interpreter and must exit 0;
- ``bash`` blocks run line by line in one bash, after ``.venv`` in that folder points at the
  suite's environment (so ``source .venv/bin/activate`` works as the README says; docs pages,
  read after the README, run with it activated). Commands that
  train run at smoke settings: ``elbolab run``/``tour`` get ``--quick`` (and ``--no-progress``)
  unless the line has them; ``make demo`` has already run (the fixture);
- ``text`` blocks are output (``--help`` listings), not commands.

A few commands cannot run here; :data:`NOT_RUN` names each with the reason, and a test fails
when an entry no longer matches a line of the docs (so the list cannot hide a new command).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)

#: command prefixes that are not run here, with the reason
NOT_RUN = {
    "make test": "the suite itself",
    "make demo": None,  # run once for the module by the `reader` fixture
    "elbolab run vae_gaps --device cuda": "needs GPUs",
    "MASTER_ADDR=": "needs several nodes with GPUs",
    "torchrun": "needs several nodes with GPUs",
}
# training commands (their smoke settings are used here)
TRAINS = re.compile(r"^(elbolab (run|tour)\b|python -m elbolab\.experiments\.)")


def blocks(page: Path) -> list[tuple[int, str, str]]:
    """(line, language, code) of every fenced block of ``page``."""
    text = page.read_text()
    return [(text[: m.start()].count("\n") + 1, m.group(1), m.group(2))
            for m in FENCE.finditer(text)]


def commands(code: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, comments and blanks dropped."""
    joined = code.replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line and not line.startswith("#"):
            out.append(re.sub(r"\s+", " ", line))
    return out


def runnable(cmd: str) -> str | None:
    """The command as run here, or None when it is in :data:`NOT_RUN`."""
    if cmd.startswith("make demo"):
        return None  # the fixture ran it
    for prefix, reason in NOT_RUN.items():
        if reason and cmd.startswith(prefix):
            return None
    if TRAINS.match(cmd):
        if "--quick" not in cmd:
            cmd += " --quick"
        if "--no-progress" not in cmd and "tour" not in cmd.split()[:2]:
            cmd += " --no-progress"
    return cmd


ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def reader(tmp_path_factory) -> Path:
    """A reader's folder after ``make demo``: ``.venv`` is the suite's environment and
    ``runs/demo`` holds the tour (at ``--quick``)."""
    folder = tmp_path_factory.mktemp("reader")
    venv = Path(sys.prefix)
    if (venv / "bin" / "activate").exists():
        (folder / ".venv").symlink_to(venv)
    else:  # not a virtual environment: an activate that puts this interpreter first
        (folder / ".venv" / "bin").mkdir(parents=True)
        (folder / ".venv" / "bin" / "activate").write_text(
            f'export PATH="{Path(sys.executable).parent}:$PATH"\n')
    r = subprocess.run([sys.executable, "-m", "elbolab.experiments.cli", "tour", "--quick", "--out",
                        "runs/demo"], cwd=folder, env=ENV, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return folder


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_every_code_block_runs_as_written(page, reader):
    found = blocks(page)
    if not found:
        pytest.skip(f"{page.name} has no code block")
    for line, lang, code in found:
        where = f"{page.relative_to(ROOT)}:{line}"
        if lang == "python":
            script = reader / f"block_{page.stem}_{line}.py"
            script.write_text(code)
            r = subprocess.run([sys.executable, script.name], cwd=reader, env=ENV,
                               capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, f"{where} (python) failed:\n{r.stderr[-3000:]}"
        elif lang in ("bash", "sh", "console"):
            cmds = [c for c in map(runnable, commands(code)) if c is not None]
            if not cmds:
                continue
            # README's block activates .venv itself; a docs page is read after it (they say so)
            head = "" if page.name == "README.md" else "source .venv/bin/activate\n"
            script = "set -e\n" + head + "\n".join(f"echo '+ {c}'\n{c}" for c in cmds)
            r = subprocess.run(["bash", "-c", script], cwd=reader, env=ENV, capture_output=True,
                               text=True, timeout=420)
            assert r.returncode == 0, (f"{where} (bash) failed:\n{r.stdout[-2000:]}\n"
                                       f"{r.stderr[-3000:]}")
        else:
            assert lang in ("text", "toml", "json", ""), f"{where}: unknown block language {lang!r}"


def test_every_command_left_out_is_still_in_the_docs():
    cmds = [c for page in PAGES for _, lang, code in blocks(page) if lang == "bash"
            for c in commands(code)]
    for prefix in NOT_RUN:
        assert any(c.startswith(prefix) for c in cmds), f"NOT_RUN: {prefix!r} is in no docs command"


def test_a_python_block_that_fails_is_reported(tmp_path):
    """The runner is not a no-op: a block raising NameError (the README's old `x`) fails."""
    page = tmp_path / "page.md"
    page.write_text("text\n\n```python\nprint(x)\n```\n")
    (_line, lang, code), = blocks(page)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert lang == "python" and r.returncode != 0 and "NameError" in r.stderr
    assert commands("a \\\n  b  # note\n# c\n\nd\n") == ["a b", "d"]
    assert runnable("elbolab run fit --model m:M") == "elbolab run fit --model m:M --quick --no-progress"
