"""Your own model through a study: every engine a family supports, in the built-in studies' table.

    elbolab run fit --model mypkg.mymodule:MyFamily [--model-args '{"K": 2}'] --data data.csv \\
        --engines svi,mcmc --guides mean-field,mlp
    python -c "import elbolab.experiments.fit as f; f.run(family, x, engines='em,svi', out='runs/mine')"

``--model`` names the family by import path, ``package.module:Name`` (``importlib`` and then
``getattr`` along the dotted ``Name``; never ``eval``; the current folder is on the import path):
a class (called with ``--model-args``, a JSON object of keyword arguments), a factory function, or
a family instance. It must implement the model contract (:class:`elbolab.models.capabilities.PyroFamily`); the engines it can run follow from its
capabilities: ``em`` needs ClosedFormEM, ``cavi`` ClosedFormCAVI, ``svi`` and ``mcmc`` any Pyro
model (``mcmc`` a continuous latent; learnable ``pyro.param``s are fixed at the EM estimate, else
at the first SVI fit's). Guides are the family's (``elbolab.guides.for_family``); a guide that leaves the
model's enumerated discrete sites to enumeration trains and is scored on the collapsed bound
(``elbo-collapsed``, TraceEnum_ELBO). Without ``--data`` a family with a simulator draws ``--n``
points.

Writes (into ``--out``, atomically): ``summary.csv`` (the columns of every study, then ``params``:
where the row's parameters come from, ``iwae``/``ais`` evidence estimates with SEs, PSIS k-hat
columns, ``notes``), ``gaps.csv`` (the Cremer et al. decomposition per amortized guide, when it
applies), ``mcmc.nc``, ``mcmc_diagnostics.csv`` and trace / rank plots (NUTS),
``elbo_traces.png`` and ``run.json``.
The log evidence of a row is at that row's parameters: exact when the family has ExactEvidence,
else the tightest of AIS and IWAE (see :mod:`elbolab.experiments.fit_evidence`).
"""

from __future__ import annotations

import json
import sys
from dataclasses import MISSING, dataclass, fields

import pandas as pd
import torch

from elbolab import inference
from elbolab.experiments import fit_verdict
from elbolab.experiments.core import common, plots, rundir
from elbolab.experiments.core.study import RENAMED, CliError, StudySettings, setting
from elbolab.experiments.fit_evidence import (
    NotApplicable,
    evaluate,
    gap_row,
    model_param_names,
    params_from,
)
from elbolab.experiments.fit_family import ENGINES, choose, resolve_family, supported_engines
from elbolab.inference import arviz_io, mcmc, svi
from elbolab.inference.closed_form import em
from elbolab.models.capabilities import Evidence, MissingCapability, Simulator, capabilities_of
from elbolab.models.data import load_array

#: summary.csv columns after the ones every study has (then the engines' ``diag_*`` columns)
EXTRA_COLUMNS = ["params", "iterations", "iwae", "iwae_se", "ais", "ais_se", "khat",
                 "khat_max_point", "khat_frac_points_above", "is_ess", "psis_samples",
                 "psis_note", "notes"]
FIELD_FLAGS = {"lr": "svi_lr", "num_particles": "svi_particles", "num_steps": "svi_steps",
               "eval_particles": "eval_particles", "num_samples": "nuts_samples",
               "warmup": "nuts_warmup", "num_chains": "nuts_chains", "max_tree_depth": "nuts_depth",
               "max_iter": "em_iter", "n_init": "restarts"}


@dataclass
class Settings(StudySettings):
    """The fit study's settings (flags, ``--config`` keys); ``--quick``: a smoke run."""

    model: str = setting("", "the family by import path, 'package.module:Name' (a class, factory "
                         "or instance), e.g. elbolab.models.mfa:MixtureOfFactorAnalysers")
    model_args: str = setting("{}", "keyword arguments of the family's constructor, a JSON object")
    engines: str = setting("", "engines, comma list of em, cavi, svi, mcmc (default: every one "
                           "the family supports)", comma_list=True)
    guides: str = setting("", "SVI guides, comma list of the family's guides (default: its "
                          "default guide)", comma_list=True)
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


def parse(argv) -> Settings:
    args = common.settings(Settings, argv, "fit", __doc__.splitlines()[0])
    check(args)
    return args


def check(args: Settings) -> None:
    """The checks the settings allow on their own, naming the flag."""
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


def load_data(args, family, device, dtype):
    """(x, info): ``--data``, else ``--n`` points from the family's simulator."""
    if args.data is None:
        if not isinstance(family, Simulator):
            raise args.error("data", f"required: the {family.name} family has no simulator (the "
                             "Simulator capability)")
        try:
            out = family.simulate(args.n, seed=args.seed, device=device, dtype=dtype)
        except (TypeError, ValueError) as exc:
            raise CliError(f"--model-args: {str(exc).splitlines()[0]} (or give --data)") from None
        return (out[0] if isinstance(out, tuple) else out), {"simulated": True, "n": args.n}
    try:
        arr = load_array(args.data, name="--data")
        x = family.check_data(torch.as_tensor(arr, dtype=dtype, device=device))
    except (OSError, TypeError, ValueError) as exc:
        raise common.data_error(exc) from None
    return x, {"data_file": str(args.data)}


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


# -- the study ------------------------------------------------------------------------------
def study(args: Settings, family=None, x=None) -> dict:
    """Run the study (``family``/``x`` from Python, else from ``--model``/``--data``)."""
    device, dtype = common.setup(args, "fit")
    progress = args.progress and not args.quick
    family = family if family is not None else resolve_family(args.model, args.model_args)
    if isinstance(family, str):
        family = resolve_family(family, args.model_args)
    ascent, svi_s, nuts_s = engine_settings(args, progress)
    if x is None:
        x, data_info = load_data(args, family, device, dtype)
    else:
        x, data_info = family.check_data(x), {"given": "in Python"}
        device = x.device
    engines, specs, skipped = choose(args, family, x, args.given("guides") or _python_given(args))
    out = common.open_run(args, "fit")
    print(f"{family.name} ({type(family).__name__}): n={x.shape[0]}, d={tuple(x.shape[1:])}, "
          f"engines {','.join(engines)}, guides {','.join(s.name for s in specs) or '-'}, "
          f"device={x.device}")
    param_names = model_param_names(family, x)
    results, where, evidence, extra, gap_rows, notes = [], [], [], [], [], dict(skipped)

    def add(r, params, label, variational, own=None):
        if own is None:
            ev, cols = evaluate(family, x, r, params, args, variational=variational)
        else:
            ev, cols = own
        results.append(r)
        where.append(label)
        evidence.append(ev)
        extra.append(cols)

    fixed_source = None
    for eng in ("em", "cavi"):
        if eng in engines:
            r = attempt(args, family, eng, notes,
                        lambda e=eng: inference.fit(e, family, x, ascent, seed=args.seed))
            if r is None:
                continue
            if not param_names and r.bound == "log-likelihood":
                # the family's parameters are constants, which EM re-estimates: its objective is
                # the exact log likelihood at its own estimate (elbolab.models.capabilities.BOUNDS)
                own = (Evidence(r.elbo, 0.0, "em-objective", x.shape[0]),
                       {"notes": "EM re-estimates the family's fixed parameters; log_evidence "
                                 "is its objective, the exact log likelihood at its estimate"})
                add(r, None, "em estimate", variational=False, own=own)
                continue
            try:
                p = params_from(r, param_names)
            except NotApplicable as exc:
                p, notes[f"{eng}/{r.guide}"] = None, str(exc)
            add(r, p, eng if param_names else "fixed", variational=False)
            if eng == "em" and p is not None:
                fixed_source = (p, "em")
    for spec in specs:
        ck, resume = common.checkpointing(args, f"svi-{spec.name}")
        r = attempt(args, family, f"svi/{spec.name}", notes, lambda s=spec, c=ck, rs=resume:
                    inference.fit("svi", family, x, svi_s.replace(**c) if c else svi_s,
                                  seed=args.seed, guide=s, resume=rs), flag="guides")
        if r is None:
            continue
        add(r, None, "learned" if param_names else "fixed", variational=True)
        if fixed_source is None and param_names:
            fixed_source = (params_from(r, param_names), f"svi/{spec.name}")
        if args.gaps and spec.amortized:
            try:
                gap_rows.append(gap_row(family, x, r, evidence[-1], args))
            except NotApplicable as exc:
                notes[f"gaps/{spec.name}"] = str(exc)
    nuts = None
    if "mcmc" in engines:
        if param_names and fixed_source is None:
            raise CliError(f"--engines: mcmc needs values of the model parameters {param_names}; "
                           "no em or svi fit gave them")
        fixed = fixed_source[0] if param_names else None
        nuts = attempt(args, family, "mcmc", notes, lambda: inference.fit(
            "mcmc", family, x, nuts_s, seed=args.seed, fix_params=fixed))
    if nuts is not None:
        add(nuts, fixed, f"fixed at {fixed_source[1]}" if param_names else "fixed",
            variational=False)

    # what each SVI row's numbers mean next to EM's, and why a fit is not converged
    verdicts = fit_verdict.verdicts(results, evidence, x.shape[0])
    for r, cols in zip(results, extra):
        said = verdicts.get(f"{r.engine}/{r.guide}", [])
        cols["notes"] = "; ".join(t for t in (cols.get("notes"), *said) if t)
    summary = summary_table(results, evidence, extra, where)
    summary.to_csv(out / "summary.csv", index=False)
    gap_df = pd.DataFrame(gap_rows)
    if gap_rows:
        gap_df.to_csv(out / "gaps.csv", index=False)
    if nuts is not None:
        arviz_io.write_netcdf(nuts.to_inference_data(), out / "mcmc.nc")
        plots.mcmc_outputs(nuts.samples, out)
    for r, label in zip(results, where):
        r.settings["params"] = label  # legends tell fixed from learned parameters
    # one log p(x) line only when every row has the same exact evidence (the same parameters)
    same = bool(evidence) and all(ev is not None and ev.exact for ev in evidence) \
        and len({ev.value for ev in evidence}) == 1
    plots.plot_bounds(results, out / "elbo_traces.png", f"{family.name}: objective per datum",
                      evidence[0] if same and evidence else None)
    final = common.finish(out, args, device, {
        "family": {"model": args.model or f"{type(family).__module__}:{type(family).__qualname__}",
                   "name": family.name, "settings": family.settings(),
                   "capabilities": capabilities_of(family), "model_params": param_names},
        "data": data_info, "n": x.shape[0], "engines": engines,
        "guides": [s.name for s in specs],
        "bounds": {f"{r.engine}/{r.guide}": r.bound for r in results},
        "diagnostics": {f"{r.engine}/{r.guide}": r.diagnostics for r in results},
        "messages": {f"{r.engine}/{r.guide}": r.message for r in results},
        "notes": notes,
        "verdicts": {k: "; ".join(v) for k, v in verdicts.items()},
    })
    common.print_table(summary, [c for c in ("engine", "guide", "bound", "params", "elbo",
                                             "elbo_se", "log_evidence", "log_evidence_method",
                                             "gap", "khat", "seconds", "converged")
                                 if c in summary.columns],
                       title=f"{family.name}: engines (nats; gap = log p(x) - ELBO at the row's "
                             "parameters)")
    if gap_rows:
        common.print_table(gap_df, ["guide", "local_family", "approximation_gap",
                                    "amortization_gap", "inference_gap"],
                           title="gap decomposition (nats per data point)")
    if verdicts:
        print("\n" + fit_verdict.header(results, evidence,
                                        args.restarts if "em" in engines else None))
        for key, parts in verdicts.items():
            print(f"  {key}: {parts[0]}" + "".join(f"\n    {p}" for p in parts[1:]))
    for key, text in notes.items():
        print(f"note: {key}: {text}")
    print(f"\nwrote {', '.join(sorted(p.name for p in final.iterdir()))} to {final}/")
    return {"summary": summary, "gaps": gap_df, "out": final, "results": results}


def attempt(args, family, engine: str, notes: dict, fit, *, flag: str = "engines"):
    """``fit()``, or, when the family cannot do it (a ValueError or MissingCapability from the
    engine, e.g. CAVI over q(z) with learnable parameters): an error naming ``flag`` if the user
    asked for it, else None with a note (an engine chosen by default is skipped, and says so)."""
    try:
        return fit()
    except (ValueError, MissingCapability) as exc:
        text = f"{engine} cannot run on the {family.name} family: {str(exc).splitlines()[0]}"
        if args.given(flag) or args.sources.get(flag) == "python":
            raise args.error(flag, text) from None
        notes[engine] = f"skipped: {text}"
        return None


def summary_table(results, evidence, extra, where) -> pd.DataFrame:
    rows = []
    for r, ev, cols, label in zip(results, evidence, extra, where):
        row = r.to_row(ev)
        if ev is None:
            row["log_evidence_method"] = "none"
        row["params"] = label
        row.update(cols)
        rows.append(row)
    df = pd.DataFrame(rows)
    first = [c for c in [*common.SUMMARY_COLUMNS, *EXTRA_COLUMNS] if c in df.columns]
    return df[first + [c for c in df.columns if c not in first]]


# -- from Python --------------------------------------------------------------------------------
def _python_given(args) -> bool:
    return args.sources.get("guides") == "python"


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


def run(family, x=None, *, engines=None, guides=None, out=None, seed: int = 0,
        quick: bool = False, **settings) -> dict:
    """The study from Python: ``family`` (a family, or an import path 'package.module:Name' with
    ``model_args=``), data ``x`` (default: simulated), ``engines``/``guides`` (lists or comma
    strings; default: every supported engine, the default guide), ``out`` (default runs/fit),
    any other setting of :class:`Settings` by name. Bad input raises ValueError naming it.
    Returns {"summary", "gaps", "out", "results"}."""
    given = {k: v for k, v in (("engines", engines), ("guides", guides), ("out", out))
             if v is not None}
    args = make_settings(seed=seed, quick=quick, **given, **settings)
    threads = torch.get_num_threads()
    try:
        check(args)
        return study(args, family=family, x=x)
    except CliError as exc:
        rundir.abort()
        raise ValueError(exc.message) from None
    except BaseException:
        rundir.abort()
        raise
    finally:
        torch.set_num_threads(threads)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return common.entry("fit", _study_of_a_users_model, argv)


def _study_of_a_users_model(argv) -> int:
    """The study, with errors raised inside the user's model reported as one clear line."""
    settings = parse(argv)
    try:
        return study(settings) and 0
    except (ValueError, TypeError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise common.CliError(
            f"--model: the model or an engine on it raised {type(exc).__name__}: {first}") from None


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["ENGINES", "Settings", "main", "make_settings", "resolve_family", "run", "study",
           "supported_engines"]
