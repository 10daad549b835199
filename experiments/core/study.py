"""A study's settings: one dataclass, built from defaults <- ``--quick`` defaults <- ``--config``
file <- flags given on the command line (each layer overrides the one before it).

A study declares its settings as a dataclass over :class:`StudySettings` whose fields are made by
:func:`setting` (default, help, ``--quick`` default, choices). From it come the argparse flags
(``--svi-steps`` for the field ``svi_steps``; ``--help`` shows every default and quick default),
the keys a ``--config FILE.toml`` may hold (the flag names, ``svi-steps = 100``; an unknown key is
an error) and the record in ``run.json`` of where each value came from. ``--quick`` only sets
defaults: a flag given explicitly always wins, and is then validated like any other value.

Errors at the command line are :class:`CliError`: one line naming the flag, exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import tomllib
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from elbolab.inference.runtime import interactive

#: old flag -> the name every study now uses for that quantity (issue 17: one name per setting).
#: Prefixes name the engine (``svi-``, ``nuts-``); draws from a guide q are ``particles``, draws
#: of NUTS ``samples``. An old name on the command line or in a ``--config`` file is a one-line
#: error naming the new one; a resumed run's saved settings under an old key are read under it.
RENAMED = {
    "steps": "svi-steps", "lr": "svi-lr", "epochs": "svi-epochs",
    "chains": "nuts-chains", "mcmc-chains": "nuts-chains", "mcmc-samples": "nuts-samples",
    "mcmc-points": "nuts-points", "jit": "nuts-jit", "no-jit": "no-nuts-jit",
    "elbo-samples": "eval-particles", "iwae-samples": "iwae-particles",
    "is-particles": "impute-particles",
}
#: old flag -> what to do instead, for flags that are gone
REMOVED = {"no-nuts": "removed; leave mcmc out of --engines"}


class CliError(SystemExit):
    """A bad flag, file or setting. ``str(err)`` is the message; the exit status is 2.

    Raised by the studies' checks; :func:`cli_entry` prints it as ``prog: message`` on stderr."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = str(message).strip()

    def __str__(self) -> str:
        return self.message


def setting(default, help: str, *, quick=MISSING, choices=None, kind=None, flag=None,
            negatable: bool = False, comma_list: bool = False, config: bool = True,
            shown: str | None = None):
    """A study setting: ``default``, one line of ``help``, the ``quick`` default (if it differs),
    ``choices``, the value ``kind`` (``int``, ``float``, ``str``, ``bool``, ``Path``; inferred from
    the default when it is not None), the ``flag`` name if it is not the field name with dashes,
    ``negatable`` booleans get ``--x/--no-x``, ``comma_list`` strings accept a TOML array;
    ``shown``: how ``--help`` shows a default of None."""
    kind = kind or type(default)
    meta = {"help": help, "quick": quick, "choices": choices, "kind": kind, "flag": flag,
            "negatable": negatable, "comma_list": comma_list, "config": config, "shown": shown}
    return field(default=default, metadata=meta)


def internal(default=None, factory=None):
    """A field that is no flag (filled in by :func:`resolve`)."""
    meta = {"internal": True}
    if factory is not None:
        return field(default_factory=factory, repr=False, compare=False, metadata=meta)
    return field(default=default, repr=False, compare=False, metadata=meta)


@dataclass
class StudySettings:
    """The settings every study has (a study's dataclass redeclares a field to change its
    default: ``engines``, ``guides``, ``dtype``, ``threads``)."""

    seed: int = setting(0, "random seed")
    device: str = setting("auto", "where to run", choices=("auto", "cpu", "cuda"))
    dtype: str = setting("float64", "floating-point type of data and fits",
                         choices=("float32", "float64"))
    data: Path | None = setting(None, "CSV (header row) or .npy/.npz file", kind=Path,
                                shown="simulated")
    out: Path | None = setting(None, "output folder", kind=Path, shown="runs/<study>")
    overwrite: bool = setting(False, "replace the finished run in --out (the whole folder)")
    engines: str = setting("", "engines to run, comma list", comma_list=True)
    guides: str = setting("", "SVI guides, comma list", comma_list=True)
    checkpoint_every: int = setting(
        0, "save every SVI fit every N steps (resumable with --resume; 0 = off)")
    quick: bool = setting(False, "a smoke run: small default settings (flags given still win)")
    no_progress: bool = setting(False, "hide progress bars")
    threads: int | None = setting(None, "torch CPU threads", kind=int)
    # filled in by resolve(), not flags
    config: Path | None = internal()
    resume: Path | None = internal()
    sources: dict = internal(factory=dict)

    # -- helpers for the studies' checks -------------------------------------------------------
    def flag(self, name: str) -> str:
        f = _field(type(self), name)
        return "--" + (f.metadata.get("flag") or name.replace("_", "-"))

    def error(self, name: str, text: str) -> CliError:
        """``--flag: text``, saying where the value came from unless the command line."""
        src = self.sources.get(name, "default")
        note = {"config": f" (from --config {self.config})", "quick": " (the --quick default)",
                "resume": " (saved with the run being resumed)"}.get(src, "")
        return CliError(f"{self.flag(name)}{note}: {text}")

    def at_least(self, name: str, minimum: int | float) -> None:
        v = getattr(self, name)
        if v is None or v < minimum:
            raise self.error(name, f"must be >= {minimum}, got {v}")

    def finite_positive(self, name: str) -> None:
        v = getattr(self, name)
        if not (isinstance(v, int | float) and 0 < v < math.inf):
            raise self.error(name, f"must be a positive finite number, got {v}")

    def in_open_unit(self, name: str) -> None:
        v = getattr(self, name)
        if not (isinstance(v, int | float) and 0 < v < 1):
            raise self.error(name, f"must lie in (0, 1), got {v}")

    def names(self, name: str, valid, *, what: str = "name", allow_empty: bool = False) -> list:
        """The comma list ``name`` as a list, every entry one of ``valid`` (else an error that
        lists them), no repeats."""
        text = getattr(self, name)
        out = [t.strip() for t in str(text).split(",") if t.strip()]
        if not out and not allow_empty:
            raise self.error(name, f"empty list; choose from {', '.join(valid)}")
        for t in out:
            if t not in valid:
                raise self.error(name, f"unknown {what} {t!r}; valid: {', '.join(valid)}")
        dup = sorted({t for t in out if out.count(t) > 1})
        if dup:
            raise self.error(name, f"repeated {what}(s) {dup}")
        return out

    def ints(self, name: str, minimum: int, *, allow_empty: bool = False) -> list[int]:
        """The comma list ``name`` of integers, each >= ``minimum``."""
        text = getattr(self, name)
        try:
            out = [int(t) for t in str(text).split(",") if t.strip()]
        except ValueError:
            raise self.error(name, f"expected a comma list of integers, got {text!r}") from None
        if not out and not allow_empty:
            raise self.error(name, "needs at least one value")
        if any(v < minimum for v in out):
            raise self.error(name, f"every value must be >= {minimum}, got {text!r}")
        return out

    @property
    def progress(self) -> bool:
        """Progress bars: unless ``--no-progress``, and only when a person is watching (stderr
        a terminal or a notebook), never into a redirected log."""
        return not self.no_progress and interactive()

    def given(self, name: str) -> bool:
        """Whether ``name`` was set by the user (flag or config), not a default."""
        return self.sources.get(name, "default") in ("command line", "config", "resume")

    @classmethod
    def upgrade_saved(cls, saved: dict) -> dict:
        """The settings saved by a run started before a flag was renamed, under today's names
        (``steps`` -> ``svi_steps``; ``no_nuts = true`` -> mcmc left out of ``engines``)."""
        for old, new in RENAMED.items():
            old_key, new_key = old.replace("-", "_"), new.replace("-", "_")
            if old_key in saved and not old.startswith("no-") and new_key not in saved:
                saved[new_key] = saved.pop(old_key)
        if saved.pop("no_nuts", False) and "engines" in saved:
            saved["engines"] = ",".join(e for e in str(saved["engines"]).split(",")
                                        if e.strip() != "mcmc")
        return saved

    def values(self) -> dict:
        """The settings as plain values (for run.json and the resume record)."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)
                if not f.metadata.get("internal")}


def _plain(v):
    return str(v) if isinstance(v, Path) else v


def _field(cls, name: str) -> dataclasses.Field:
    for f in fields(cls):
        if f.name == name:
            return f
    raise KeyError(name)


def _flags(cls) -> dict[str, dataclasses.Field]:
    """flag name without dashes -> field, for the settings that are flags."""
    return {(f.metadata.get("flag") or f.name.replace("_", "-")): f for f in fields(cls)
            if not f.metadata.get("internal")}


def renamed(cls) -> dict[str, str]:
    """old flag (no dashes) -> the error's text, for the old names whose new flag ``cls`` has."""
    flags = _flags(cls)
    out = {old: f"renamed --{new}" for old, new in RENAMED.items()
           if new.removeprefix("no-") in flags and old not in flags}
    if "engines" in flags:
        out.update({old: text for old, text in REMOVED.items() if old not in flags})
    return out


def _refuse_old_flags(cls, argv) -> None:
    """An old flag name in ``argv`` (``--steps 5``, ``--steps=5``): ``--steps: renamed
    --svi-steps``. Tokens after ``--`` are not flags."""
    old = renamed(cls)
    for tok in argv:
        if tok == "--":
            return
        name = str(tok)[2:].split("=", 1)[0] if str(tok).startswith("--") else None
        if name in old:
            raise CliError(f"--{name}: {old[name]}")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit status 2 (argparse's usage block is many lines)
        raise CliError(f"{message}{self._hint(message)} (see {self.prog} --help)")

    def _hint(self, message: str) -> str:
        """``; did you mean --svi-steps?`` for each misspelled flag of an "unrecognized
        arguments" message that is close to one of this parser's flags."""
        if not message.startswith("unrecognized arguments:"):
            return ""
        flags = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
        hints = []
        for tok in message.split(":", 1)[1].split():
            if tok.startswith("--"):
                near = difflib.get_close_matches(tok.split("=", 1)[0], flags, n=1, cutoff=0.75)
                hints += [(tok.split("=", 1)[0], near[0])] if near else []
        if len(hints) == 1:
            return f"; did you mean {hints[0][1]}?"
        return ("; did you mean " + ", ".join(f"{new} for {old}" for old, new in hints) + "?"
                if hints else "")


def _fmt(v) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "on" if v else "off"
    if v == "":
        return "''"
    return str(v)


def _float(text: str) -> float:
    return float(text)


def build_parser(cls, prog: str, description: str) -> argparse.ArgumentParser:
    """Flags for every setting of ``cls``; only flags given appear in the parsed namespace."""
    old = renamed(cls)
    epilog = ("renamed flags (an old name is an error): "
              + ", ".join(f"--{k} -> {v.removeprefix('renamed ')}" for k, v in old.items())
              if old else None)
    p = _Parser(prog=prog, description=description, argument_default=argparse.SUPPRESS,
                allow_abbrev=False, epilog=epilog)
    own = p.add_argument_group(f"{prog} settings")
    common = p.add_argument_group("settings every study has")
    base = {f.name for f in fields(StudySettings)}
    for name, f in _flags(cls).items():
        m = f.metadata
        quick = "" if m["quick"] is MISSING else f"; --quick: {_fmt(m['quick'])}"
        default = m["shown"] if f.default is None and m["shown"] else _fmt(f.default)
        text = f"{m['help']} (default: {default}{quick})".replace("%", "%%")
        group = common if f.name in base else own
        kw: dict[str, Any] = {"dest": f.name, "help": text}
        if m["kind"] is bool:
            kw["action"] = argparse.BooleanOptionalAction if m["negatable"] else "store_true"
        else:
            kw["type"] = {int: int, float: _float, Path: Path}.get(m["kind"], str)
            kw["metavar"] = m["choices"] and "{" + ",".join(m["choices"]) + "}" or \
                {int: "N", float: "X", Path: "PATH"}.get(m["kind"], "TEXT")
            if m["choices"]:
                kw["choices"] = m["choices"]
        group.add_argument(f"--{name}", **kw)
    common.add_argument("--config", metavar="FILE.toml", type=Path,
                   help="read settings from a TOML file: keys are the flag names "
                        "(svi-steps = 100); flags given on the command line override it")
    common.add_argument("--resume", metavar="RUN_DIR", type=Path,
                   help="continue an interrupted run (its folder, or the --out it was given) with "
                        "its saved settings, from the SVI checkpoints it wrote")
    return p


def read_config(path: Path, cls) -> dict:
    """Settings from a TOML file, checked against ``cls``: {field name: value}."""
    path = Path(path)
    if not path.exists():
        raise CliError(f"--config: no such file {str(path)!r}")
    if not path.is_file():
        raise CliError(f"--config: {str(path)!r} is not a file")
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise CliError(f"--config: {str(path)!r} is not valid TOML ({exc})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"--config: cannot read {str(path)!r} ({exc})") from None
    flags = {k: f for k, f in _flags(cls).items() if f.metadata.get("config", True)}
    out = {}
    for key, value in data.items():
        name = key.replace("_", "-")
        f = flags.get(name)
        if f is None and name in renamed(cls):
            text = renamed(cls)[name]
            if text.startswith("renamed --"):
                text = f"renamed {text.removeprefix('renamed --')!r}"
            raise CliError(f"--config: {key!r} in {str(path)!r}: {text}")
        if f is None:
            near = difflib.get_close_matches(name, list(flags), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise CliError(f"--config: unknown setting {key!r} in {str(path)!r}{hint}")
        out[f.name] = _coerce(value, f, key, path)
    return out


def _coerce(value, f: dataclasses.Field, key: str, path: Path):
    m, where = f.metadata, f"--config: {key!r} in {str(path)!r}"
    kind = m["kind"]
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind is Path:
        ok = isinstance(value, str) and value != ""
        value = Path(value) if ok else value
    else:
        if m["comma_list"] and isinstance(value, list):
            ok = all(isinstance(v, str | int) and not isinstance(v, bool) for v in value)
            value = ",".join(str(v) for v in value) if ok else value
        else:
            ok = isinstance(value, str)
    if not ok:
        name = {bool: "true or false", int: "an integer", float: "a number",
                Path: "a path (string)"}.get(kind, "a string" + (" or an array" if m["comma_list"]
                                                                 else ""))
        raise CliError(f"{where}: expected {name}, got {value!r}")
    if m["choices"] and value not in m["choices"]:
        raise CliError(f"{where}: must be one of {', '.join(m['choices'])}, got {value!r}")
    return value


def resolve(cls, argv, prog: str, description: str, *, saved: dict | None = None):
    """The settings of one run: defaults <- quick defaults <- config <- explicit flags.

    ``saved`` (the settings of a run being resumed) replaces the first three layers; a flag
    given together with ``--resume`` must then agree with the saved value."""
    _refuse_old_flags(cls, argv)
    ns = vars(build_parser(cls, prog, description).parse_args(list(argv)))
    config_path, resume = ns.pop("config", None), ns.pop("resume", None)
    cfg = read_config(config_path, cls) if config_path is not None else {}
    quick = ns.get("quick", cfg.get("quick", False))
    values, sources = {}, {}
    for f in fields(cls):
        if f.metadata.get("internal"):
            continue
        values[f.name], sources[f.name] = f.default, "default"
        if quick and f.metadata["quick"] is not MISSING:
            values[f.name], sources[f.name] = f.metadata["quick"], "quick"
        if f.name in cfg:
            values[f.name], sources[f.name] = cfg[f.name], "config"
        if f.name in ns:
            values[f.name], sources[f.name] = ns[f.name], "command line"
    return cls(**values, config=config_path, resume=resume, sources=sources), ns


def from_saved(cls, saved: dict, explicit: dict, *,
               runtime=("no_progress", "threads", "overwrite")):
    """Settings of a run being resumed: its saved values; flags given now must agree, except the
    ``runtime`` ones (progress bars, threads, replacing a finished run at --out), which may
    change."""
    known = {f.name: f for f in fields(cls) if not f.metadata.get("internal")}
    saved = cls.upgrade_saved(dict(saved))
    unknown = sorted(set(saved) - set(known))
    if unknown:
        raise CliError(f"--resume: the saved settings hold unknown setting(s) {unknown}")
    values = {k: (Path(v) if known[k].metadata["kind"] is Path and v is not None else v)
              for k, v in saved.items()}
    sources = {k: "resume" for k in values}
    for k, v in explicit.items():
        if k in runtime:
            values[k], sources[k] = v, "command line"
        elif _plain(v) != _plain(values.get(k)):
            flag = "--" + (known[k].metadata.get("flag") or k.replace("_", "-"))
            raise CliError(f"--resume: the run was started with {flag} {_fmt(values.get(k))}; "
                           f"a resumed run keeps its settings (drop {flag} {_fmt(v)})")
    return cls(**values, sources=sources)


def list_engines_guides(s: StudySettings, engines, guides_valid) -> tuple[list, list]:
    """``--engines`` checked against ``engines`` and ``--guides`` against ``guides_valid`` (the
    guides the family supports); guides given without svi among the engines is an error."""
    eng = s.names("engines", list(engines), what="engine")
    gd = s.names("guides", list(guides_valid), what="guide", allow_empty="svi" not in eng)
    if "svi" not in eng and s.given("guides") and gd:
        raise s.error("guides", "applies to SVI, which --engines leaves out")
    return eng, (gd if "svi" in eng else [])


__all__ = ["RENAMED", "REMOVED", "CliError", "StudySettings", "build_parser", "from_saved", "internal",
           "list_engines_guides", "read_config", "renamed", "resolve", "setting"]
