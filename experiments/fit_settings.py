"""The ``fit`` study's inputs: its settings (flags, ``--config`` keys, Python keywords) and its data.

``--data`` for a model family is one array (``.csv`` with a header row, ``.npy``, ``.npz``;
:func:`elbolab.models.data.load_array`); without it a family with a simulator draws ``--n`` points.
For a plain Pyro program (:class:`elbolab.models.program.Program`) the file holds the program's
arguments, by name:

* ``.json``: an object whose keys are the program's keyword arguments. A number stays a number
  (eight schools' ``J``), a string a string, ``null`` None; a list of numbers (nested for more
  dimensions) becomes a tensor the way ``torch.tensor`` makes it: whole numbers an int64 tensor
  (indices, counts), any number written with a decimal point or exponent a floating tensor,
  true/false a bool tensor;
* ``.npz``: one keyword argument per array; a 0-d array becomes a number, integer and boolean
  arrays keep their dtype;
* ``.csv`` (a header row): one keyword argument per column, a 1-D tensor (a column of whole
  numbers int64, else floating); for a number such as ``J`` use ``.json`` or ``.npz``;
* ``.npy``: one array, the program's only positional argument.

Floating tensors take ``--dtype`` when it is given, else torch's default dtype (float32): the
dtype of the program's own float literals, priors and ``nn`` modules, as under Pyro itself (the
study's float64 default would not multiply with a float32 ``nn.Linear``).

Every file is read and checked before any work: an error names the file and the key (a value
that is not numbers, NaN or inf, a key the program lacks with its parameters listed).
"""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from elbolab.experiments.core import common
from elbolab.experiments.core.study import RENAMED, CliError, StudySettings, setting
from elbolab.inference import mcmc, svi
from elbolab.inference.closed_form import em
from elbolab.models.capabilities import Simulator
from elbolab.models.data import load_array
from elbolab.models.program import Program

FIELD_FLAGS = {"lr": "svi_lr", "num_particles": "svi_particles", "num_steps": "svi_steps",
               "eval_particles": "eval_particles", "num_samples": "nuts_samples",
               "warmup": "nuts_warmup", "num_chains": "nuts_chains", "max_tree_depth": "nuts_depth",
               "max_iter": "em_iter", "n_init": "restarts"}
#: the files a plain Pyro program's arguments come from (module docstring)
PROGRAM_SUFFIXES = (".json", ".npz", ".csv", ".npy")


@dataclass
class Settings(StudySettings):
    """The fit study's settings (flags, ``--config`` keys); ``--quick``: a smoke run."""

    model: str = setting("", "the model by import path 'package.module:Name': a family (class, "
                         "factory or instance, e.g. elbolab.models.mfa:MixtureOfFactorAnalysers) "
                         "or a plain Pyro program (a function, PyroModule class or instance; "
                         "--data gives its arguments)")
    model_args: str = setting("{}", "keyword arguments of the family's (or PyroModule's) "
                              "constructor, a JSON object")
    dtype: str = setting("float64", "floating-point type of data and fits (a program's data: "
                         "float32, torch's default, unless given)", choices=("float32", "float64"))
    data: Path | None = setting(None, "a family's data: CSV (header row), .npy or .npz array; a "
                                "program's arguments: .json or .npz (keys are its keyword "
                                "arguments), .csv (one per column) or .npy (one positional)",
                                kind=Path, shown="simulated")
    engines: str = setting("", "engines, comma list of em, cavi, svi, mcmc (default: every one "
                           "the model supports)", comma_list=True)
    guides: str = setting("", "SVI guides, comma list of the model's guides by name or "
                          "'package.module:guide' (a guide function, PyroModule class or "
                          "instance) (default: its default guide)", comma_list=True)
    guide: str = setting("", "one SVI guide, as --guides with one entry: a name (e.g. "
                         "auto-normal) or 'package.module:guide'")
    threads: int | None = setting(1, "torch CPU threads (small models run faster on one)",
                                  kind=int)
    n: int = setting(200, "points to simulate when no --data is given", quick=60)
    restarts: int = setting(3, "EM random restarts", quick=1)
    em_iter: int = setting(1000, "EM iterations per restart at most", quick=200)
    svi_steps: int = setting(2000, "SVI steps per fit", quick=100)
    svi_lr: float = setting(0.05, "Adam learning rate")
    svi_particles: int = setting(4, "particles per SVI gradient", quick=2)
    eval_particles: int = setting(1000, "particles per ELBO estimate", quick=100)
    iwae_particles: int = setting(1000, "importance samples per point for IWAE (0: none)",
                                  quick=100)
    ais_steps: int = setting(100, "AIS temperatures, families with LocalDensities (0: none)",
                             quick=10)
    ais_chains: int = setting(16, "AIS chains per data point", quick=4)
    psis_samples: int = setting(1000, "draws for the PSIS k-hat of each variational fit (0: none)",
                                quick=100)
    gaps: bool = setting(True, "the gap decomposition of each amortized guide (when it applies)",
                         negatable=True)
    qstar_steps: int = setting(1000, "SVI steps of the per-point optimum q* (gap decomposition)",
                               quick=50)
    gap_particles: int = setting(500, "draws per point for the gap decomposition", quick=50)
    nuts_samples: int = setting(500, "NUTS draws per chain", quick=30)
    nuts_warmup: int = setting(300, "NUTS warmup steps per chain", quick=30)
    nuts_chains: int = setting(2, "NUTS chains")
    nuts_depth: int = setting(6, "NUTS max tree depth", quick=4)
    nuts_jit: bool = setting(False, "NUTS with the compiled potential", negatable=True)


def check(args: Settings) -> None:
    """The checks the settings allow on their own, naming the flag. ``--guide`` becomes the
    one entry of ``--guides`` (its source kept)."""
    for name in ("restarts", "em_iter", "svi_steps", "svi_particles", "nuts_samples", "nuts_chains",
                 "nuts_depth", "qstar_steps", "ais_chains"):
        args.at_least(name, 1)
    for name in ("iwae_particles", "ais_steps", "psis_samples", "nuts_warmup"):
        args.at_least(name, 0)
    args.at_least("eval_particles", 2)
    args.at_least("gap_particles", 2)
    args.finite_positive("svi_lr")
    if args.data is None:
        args.at_least("n", 1)
    if str(args.guide).strip():
        if "," in args.guide:
            raise args.error("guide", f"one guide, got {args.guide!r} (several: --guides)")
        if str(args.guides).strip() and args.guides.strip() != args.guide.strip():
            raise args.error("guide", "give one guide with --guide or a list with --guides, "
                             "not both")
        args.guides = args.guide.strip()
        args.sources["guides"] = args.sources.get("guide", "default")


def guide_flag(args) -> str:
    """The setting the guides came from: ``guide`` or ``guides`` (for error messages)."""
    return "guide" if str(args.guide).strip() else "guides"


def engine_settings(args, progress: bool):
    try:
        return (em.Settings(max_iter=args.em_iter, tol=1e-8, n_init=args.restarts),
                svi.Settings(num_steps=args.svi_steps, lr=args.svi_lr,
                             num_particles=args.svi_particles, eval_particles=args.eval_particles,
                             eval_batch=min(200, args.eval_particles), progress=progress,
                             **common.svi_threads(args)),
                mcmc.Settings(num_samples=args.nuts_samples, warmup=args.nuts_warmup,
                              num_chains=args.nuts_chains, max_tree_depth=args.nuts_depth,
                              jit=args.nuts_jit, progress=progress))
    except (TypeError, ValueError) as exc:
        raise common.field_error(args, exc, FIELD_FLAGS) from None


def make_settings(**values) -> Settings:
    """Settings from keyword arguments (``quick=True`` applies the quick defaults first)."""
    known = {f.name: f for f in fields(Settings) if not f.metadata.get("internal")}
    unknown = sorted(set(values) - set(known))
    old = {k.replace("-", "_"): v.replace("-", "_") for k, v in RENAMED.items()}
    for name in unknown:
        if old.get(name) in known:
            raise TypeError(f"settings: {name} renamed {old[name]}")
    if unknown:
        raise TypeError(f"settings: unknown {unknown}; the fit study takes {sorted(known)}")
    out, sources = {}, {}
    for name, f in known.items():
        out[name], sources[name] = f.default, "default"
        if values.get("quick") and f.metadata["quick"] is not MISSING:
            out[name], sources[name] = f.metadata["quick"], "quick"
        if name in values:
            v = values[name]
            if name in ("engines", "guides") and not isinstance(v, str):
                v = ",".join(v)
            if name == "model_args" and isinstance(v, dict):
                v = json.dumps(v)
            out[name], sources[name] = v, "python"
    return Settings(**out, sources=sources)


# -- the data ---------------------------------------------------------------------------------
def load_data(args, family, device, dtype):
    """(x, info): a program's arguments from ``--data``; a family's array from ``--data``, else
    ``--n`` points from its simulator."""
    if isinstance(family, Program):
        return load_program_data(args, family, device, dtype)
    if args.data is None:
        if not isinstance(family, Simulator):
            raise args.error("data", f"required: the {family.name} family has no simulator (the "
                             "Simulator capability)")
        try:
            out = family.simulate(args.n, seed=args.seed, device=device, dtype=dtype)
        except (TypeError, ValueError) as exc:
            raise CliError(f"--model-args: {common.error_line(exc)} (or give --data)") from None
        return (out[0] if isinstance(out, tuple) else out), {"simulated": True, "n": args.n}
    if Path(args.data).suffix.lower() == ".json":
        raise args.error("data", f"{str(args.data)!r}: a .json file holds a plain Pyro program's "
                         f"keyword arguments; the {family.name} family takes one array (.csv, "
                         ".npy or .npz)")
    try:
        arr = load_array(args.data, name="--data")
        x = family.check_data(torch.as_tensor(arr, dtype=dtype, device=device))
    except (OSError, TypeError, ValueError) as exc:
        raise common.data_error(exc) from None
    return x, {"data_file": str(args.data)}


def load_program_data(args, program: Program, device, dtype):
    """(ProgramData, info) from ``--data`` (module docstring), checked against the program's
    parameters and traced once (:meth:`Program.check_data`)."""
    if args.data is None:
        raise args.error("data", f"required: the program {program.name!r} takes its data as "
                         "arguments; give them as a .json or .npz file (keys are its keyword "
                         "arguments) or a .csv (one argument per column)")
    if not (args.given("dtype") or args.sources.get("dtype") == "python"):  # the dtype of the program's own float literals and modules
        dtype = torch.get_default_dtype()
        args.dtype = str(dtype).removeprefix("torch.")
        args.sources["dtype"] = "torch's default, for a program"
    path = Path(args.data)
    where = f"{str(path)!r}"
    try:
        values = read_arguments(path, dtype, device)
    except OSError as exc:
        raise common.data_error(exc) from None
    except ValueError as exc:
        raise CliError(f"--data: {where}: {common.error_line(exc)}") from None
    try:
        x = program.check_data(values)
    except (TypeError, ValueError) as exc:
        text = common.error_line(exc)
        if text.startswith("model:"):  # the program itself failed on the data
            hint = (f"; the data are {args.dtype} (--dtype), the program's own tensors may not "
                    "be" if "dtype" in text.lower() or "Double" in text else "")
            raise CliError(f"--model: {text.removeprefix('model:').strip()} (with the data of "
                           f"{where}{hint})") from None
        raise CliError(f"--data: {where}: {text.removeprefix('data:').strip()}") from None
    named = values if isinstance(values, dict) else {"arg0": values[0]}
    shown = {k: (list(v.shape) if torch.is_tensor(v) else v) for k, v in named.items()}
    return x, {"data_file": str(path), "arguments": shown, "data_plate": program.data_plate,
               "n": x.shape[0], "dtype": args.dtype}


def read_arguments(path: Path, dtype, device=None):
    """The arguments in ``path``: a dict of keyword arguments, or a 1-tuple for ``.npy``.
    OSError for a file that cannot be read; ValueError naming the key otherwise."""
    suffix = path.suffix.lower()
    if suffix not in PROGRAM_SUFFIXES:
        kind = f"type {suffix!r}" if suffix else "name without an extension"
        raise ValueError(f"unsupported file {kind} for a program's arguments (use .json or .npz "
                         "with its keyword arguments as keys, .csv with one per column, or .npy)")
    if path.is_dir():
        raise IsADirectoryError(21, "is a directory", str(path))
    if not path.exists():
        raise FileNotFoundError(2, "no such file", str(path))
    if suffix == ".json":
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON ({exc.msg} at line {exc.lineno} column "
                             f"{exc.colno})") from None
        except UnicodeDecodeError:
            raise ValueError("not a text file (JSON)") from None
        if not isinstance(raw, dict):
            raise ValueError("expected a JSON object of the program's keyword arguments, e.g. "
                             f'{{"J": 8, "y": [28.0, 8.0]}}, got a {type(raw).__name__}')
        return {k: _json_value(k, v, dtype, device) for k, v in raw.items()}
    if suffix == ".csv":
        try:
            table = pd.read_csv(path)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise ValueError(f"not a CSV table with a header row ({common.error_line(exc)})") \
                from None
        return {str(k): _array_value(str(k), table[k].to_numpy(), dtype, device, "column")
                for k in table.columns}
    try:
        loaded = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise ValueError(f"not a numeric numpy file ({common.error_line(exc)})") from None
    if suffix == ".npy":
        return (_array_value("the array", loaded, dtype, device, "array"),)
    if not hasattr(loaded, "files"):
        raise ValueError("not an .npz archive (np.savez writes one)")
    out = {}
    with loaded:
        for k in loaded.files:
            try:
                arr = loaded[k]
            except ValueError as exc:  # object arrays: never unpickled
                raise ValueError(f"{k!r}: {common.error_line(exc)}") from None
            out[k] = _array_value(k, arr, dtype, device)
    return out


def _json_value(key, v, dtype, device):
    if v is None or isinstance(v, bool | str):
        return v
    if isinstance(v, int | float):
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{key!r} is {v}; remove or impute it (a model cannot condition on "
                             "NaN or inf)")
        return v
    if isinstance(v, list):
        try:
            arr = np.array(v)
        except ValueError:
            arr = None
        if arr is None or arr.dtype == object or arr.dtype.kind not in "biuf":
            raise ValueError(f"{key!r} is not a rectangular list of numbers (a tensor)")
        return _array_value(key, arr, dtype, device)
    raise ValueError(f"{key!r} is a JSON {type(v).__name__}; a keyword argument is a number, a "
                     "list of numbers (a tensor), a string, true/false or null")


def _array_value(key, arr: np.ndarray, dtype, device, what: str = "key"):
    name = key if what == "array" else f"{what} {key!r}" if what == "column" else repr(key)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} holds {arr.dtype} values, not numbers")
    if arr.dtype.kind == "f":
        bad = int((~np.isfinite(arr)).sum())
        if bad:
            raise ValueError(f"{name} has {bad} NaN or infinite value(s); remove or impute them "
                             "(a model cannot condition on them)")
    if arr.ndim == 0 and what != "array":
        return arr.item()
    t = torch.tensor(arr, device=device)  # a copy: never a view of a read-only array
    if t.is_floating_point():
        t = t.to(dtype)
    elif t.dtype not in (torch.bool, torch.uint8):
        t = t.to(torch.int64)
    return t


__all__ = ["FIELD_FLAGS", "PROGRAM_SUFFIXES", "Settings", "check", "engine_settings", "guide_flag",
           "load_data", "load_program_data", "make_settings", "read_arguments"]
