"""The shape of the code: imports point one way, no cycles, modules of one job, one import name.

The import graph is read with ``ast`` from the sources, counting imports inside functions (they
run too) and leaving out those under ``if TYPE_CHECKING:`` (they never run). An edge goes to the
module an import names: ``from elbolab.models.gmm import fit`` is an edge to ``models.gmm.fit``
when that is a module, else to the package ``models.gmm``. Python runs a package's
``__init__`` before its submodules; that is not an edge (a package re-exporting its modules would
otherwise be a cycle with each of them), so a module must not import its own package's
``__init__``: it imports the module that defines the name.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: the four packages, lowest first: each may import only those before it
LAYERS = ("models", "guides", "inference", "experiments")
MAX_LINES = 500


def modules() -> dict[str, Path]:
    """Dotted name (without ``elbolab.``) -> source file, for every module of the four packages."""
    out = {}
    for top in LAYERS:
        for f in sorted((ROOT / top).rglob("*.py")):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


def _type_checking_only(tree) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for stmt in node.body:
                skip.update(id(n) for n in ast.walk(stmt))
    return skip


def imported(tree, name: str, is_package: bool, known) -> list[str]:
    """The modules of ``known`` that module ``name`` imports (see the module docstring)."""
    def resolve(dotted):
        dotted = dotted.removeprefix("elbolab.")
        while dotted and dotted not in known:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    skip, out = _type_checking_only(tree), []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [resolve(a.name) for a in node.names if a.name.startswith("elbolab.")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name if is_package else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    pkg = pkg.rpartition(".")[0]
                base = "elbolab." + pkg + (f".{base}" if base else "")
            if not base.startswith("elbolab"):
                continue
            for a in node.names:
                full = f"{base}.{a.name}".removeprefix("elbolab.")
                out.append(full if full in known else resolve(base))
    return [m for m in out if m and m != name]


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: set(imported(ast.parse(f.read_text()), name, f.name == "__init__.py", mods))
            for name, f in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_reader_sees_function_level_imports_and_cycles():
    src = textwrap.dedent("""
        from typing import TYPE_CHECKING
        from elbolab.models import numerics
        if TYPE_CHECKING:
            from elbolab.inference.result import FitResult
        def f():
            from elbolab.guides.auto import latent_sites
    """)
    known = {"models", "models.numerics", "guides.auto", "inference.result"}
    assert sorted(imported(ast.parse(src), "models.x", False, known)) == [
        "guides.auto", "models.numerics"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_anywhere():
    found = cycles(import_graph())
    assert not found, "import cycles (each a group of modules that import each other):\n" + \
        "\n".join("  " + " <-> ".join(c) for c in found)


def test_imports_point_one_way():
    """models <- guides <- inference <- experiments: a package imports only those before it."""
    rank = {top: i for i, top in enumerate(LAYERS)}
    up = [f"{m} -> {t}" for m, targets in import_graph().items() for t in sorted(targets)
          if rank[t.split(".")[0]] > rank[m.split(".")[0]]]
    assert not up, "imports pointing up (models <- guides <- inference <- experiments):\n" + \
        "\n".join(up)


def test_no_module_imports_its_own_package_init():
    """A module imports the module that defines a name, not its package's re-export of it."""
    bad = []
    for m, targets in import_graph().items():
        own = [p for p in targets if m.startswith(p + ".") and p.count(".") >= 1]
        bad += [f"{m} -> {p}" for p in own if not modules()[m].name == "__init__.py"]
    assert not bad, "\n".join(bad)


def test_modules_stay_small():
    big = {name: n for name, f in modules().items()
           if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines (split them by job): {big}"


def test_arviz_is_called_from_one_module():
    """Every ArviZ call goes through elbolab.inference.arviz_io (ArviZ 1.x would be one file)."""
    users = []
    for name, f in modules().items():
        for node in ast.walk(ast.parse(f.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "arviz" or n.startswith("arviz.") for n in names):
                users.append(name)
    assert sorted(set(users)) == ["inference.arviz_io"]


def test_pyproject_installs_every_package_under_one_name():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {"elbolab"} | {f"elbolab.{m}" for m, f in modules().items()
                             if f.name == "__init__.py"}
    assert set(meta["packages"]) == folders
    assert {k: v for k, v in meta["package-dir"].items() if k != "elbolab"} == {
        f"elbolab.{top}": top for top in LAYERS}


FOREIGN = {
    # a researcher's folder: the most common file names in ML code, shadowing generic packages
    "models.py": "raise RuntimeError('the user models.py was imported')\n",
    "inference.py": "raise RuntimeError('the user inference.py was imported')\n",
    "guides.py": "raise RuntimeError('the user guides.py was imported')\n",
    "experiments.py": "raise RuntimeError('the user experiments.py was imported')\n",
}

def readme_first_fit() -> str:
    """The README's first code block (the first fit), as written there."""
    text = (ROOT / "README.md").read_text()
    start = text.index("```python", text.index("## A first fit")) + len("```python")
    return text[start:text.index("```", start)]


def _in(folder: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(argv, cwd=folder, env=env, capture_output=True, text=True, timeout=300)


def test_runs_from_a_folder_with_its_own_models_and_inference(tmp_path):
    """The README's API from a folder holding models.py and inference.py (``python script.py``
    puts the folder first on sys.path), and ``python -c`` (the current folder first)."""
    for name, text in FOREIGN.items():
        (tmp_path / name).write_text(text)
    example = readme_first_fit().replace("num_steps=1000", "num_steps=50")  # the imports matter
    (tmp_path / "script.py").write_text(example)
    out = _in(tmp_path, sys.executable, "script.py")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "log p(x) =" in out.stdout
    out = _in(tmp_path, sys.executable, "-c", "from elbolab import inference; "
              "from elbolab.models.gmm import BayesianGMM; print(inference.__file__)")
    assert out.returncode == 0, out.stderr[-3000:]
    assert str(tmp_path) not in out.stdout


def test_cli_fit_of_a_users_model_next_to_their_models_py(tmp_path):
    """``elbolab run fit --model mine:Model`` puts the current folder on the path: a models.py
    there must not replace elbolab's."""
    for name, text in FOREIGN.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "mine.py").write_text((ROOT / "examples" / "my_model.py").read_text())
    cli = Path(sys.executable).with_name("elbolab")
    out = _in(tmp_path, str(cli), "run", "fit", "--model", "mine:NoisyMean", "--quick",
              "--out", str(tmp_path / "run"))
    assert out.returncode == 0, out.stderr[-3000:]
