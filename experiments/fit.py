"""Your own model through a study: every engine a family or a Pyro program supports, in one table.

    elbolab run fit --model mypkg.mymodule:MyFamily [--model-args '{"K": 2}'] --data data.csv \\
        --engines svi,mcmc --guides mean-field,mlp
    elbolab run fit --model schools:model --data schools.json [--guide auto-mvn|pkg.mod:guide]
    python -c "import elbolab.experiments.fit as f; f.run(family, x, engines='em,svi', out='runs/mine')"

``--model`` names the model by import path, ``package.module:Name`` (``importlib`` and then
``getattr`` along the dotted ``Name``; never ``eval``; the current folder is on the import path):
a family class (called with ``--model-args``, a JSON object of keyword arguments), a factory
function, or a family instance, implementing the model contract
(:class:`elbolab.models.capabilities.PyroFamily`); or a plain Pyro program, a function or a
``PyroModule`` (class or instance), wrapped as :class:`elbolab.models.program.Program`, whose
arguments ``--data`` gives (a .json/.npz of keyword arguments, a .csv of columns:
:mod:`elbolab.experiments.fit_settings`; :mod:`elbolab.experiments.fit_family` says which is
which). The engines it can run follow from its capabilities: ``em`` needs ClosedFormEM, ``cavi``
ClosedFormCAVI (a program has neither: they are skipped with a note), ``svi`` and ``mcmc`` any
Pyro model (``mcmc`` a continuous latent; learnable ``pyro.param``s are fixed at the EM
estimate, else at the first SVI fit's). Guides are the model's (``elbolab.guides.for_family``)
by name, or a guide function / PyroModule by import path (``--guides``, or ``--guide`` for one);
a guide that leaves the model's enumerated discrete sites to enumeration trains and is scored on
the collapsed bound (``elbo-collapsed``, TraceEnum_ELBO). Without ``--data`` a family with a
simulator draws ``--n`` points.

Writes (into ``--out``, atomically): ``summary.csv`` (the columns of every study, then ``params``:
where the row's parameters come from, ``iwae``/``ais`` evidence estimates with SEs, PSIS k-hat
columns, ``notes``), ``gaps.csv`` (the Cremer et al. decomposition per amortized guide, when it
applies), ``mcmc.nc``, ``mcmc_diagnostics.csv`` and trace / rank plots (NUTS),
``elbo_traces.png`` and ``run.json``.
The log evidence of a row is at that row's parameters: exact when the family has ExactEvidence,
else the tightest of AIS and IWAE (see :mod:`elbolab.experiments.fit_evidence`).
"""

from __future__ import annotations

import sys

import pandas as pd
import torch

from elbolab import inference
from elbolab.experiments import fit_verdict
from elbolab.experiments.core import common, plots, rundir
from elbolab.experiments.core.study import CliError
from elbolab.experiments.fit_evidence import (
    NotApplicable,
    evaluate,
    gap_row,
    model_param_names,
    params_from,
)
from elbolab.experiments.fit_family import ENGINES, choose, resolve_family, supported_engines
from elbolab.experiments.fit_settings import (
    Settings,
    check,
    engine_settings,
    guide_flag,
    load_data,
    make_settings,
)
from elbolab.inference import arviz_io
from elbolab.models.capabilities import Evidence, MissingCapability, capabilities_of
from elbolab.models.program import Program, as_family

#: summary.csv columns after the ones every study has (then the engines' ``diag_*`` columns)
EXTRA_COLUMNS = ["params", "iterations", "iwae", "iwae_se", "ais", "ais_se", "khat",
                 "khat_max_point", "khat_frac_points_above", "is_ess", "psis_samples",
                 "psis_note", "notes"]


def parse(argv) -> Settings:
    args = common.settings(Settings, argv, "fit", __doc__.splitlines()[0])
    check(args)
    return args


# -- the study ------------------------------------------------------------------------------
def study(args: Settings, family=None, x=None) -> dict:
    """Run the study (``family``/``x`` from Python, else from ``--model``/``--data``)."""
    device, dtype = common.setup(args, "fit")
    progress = args.progress and not args.quick
    family = family if family is not None else resolve_family(args.model, args.model_args)
    if isinstance(family, str):
        family = resolve_family(family, args.model_args)
    family = as_family(family)  # a plain Pyro program from Python: a Program
    ascent, svi_s, nuts_s = engine_settings(args, progress)
    if x is None:
        x, data_info = load_data(args, family, device, dtype)
    else:
        x, data_info = family.check_data(x), {"given": "in Python"}
        device = x.device
    engines, specs, skipped = choose(args, family, x, args.given("guides") or _python_given(args))
    out = common.open_run(args, "fit")
    if isinstance(family, Program):
        shape = (f"arguments {', '.join(sorted(x.kwargs)) or f'{len(x.args)} positional'}, "
                 f"n={x.shape[0]} (plate {family.data_plate!r})")
    else:
        shape = f"n={x.shape[0]}, d={tuple(x.shape[1:])}"
    print(f"{family.name} ({type(family).__name__}): {shape}, engines {','.join(engines)}, "
          f"guides {','.join(s.name for s in specs) or '-'}, device={x.device}")
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
        ck, resume = common.checkpointing(args, f"svi-{spec.name.replace(':', '-')}")
        r = attempt(args, family, f"svi/{spec.name}", notes, lambda s=spec, c=ck, rs=resume:
                    inference.fit("svi", family, x, svi_s.replace(**c) if c else svi_s,
                                  seed=args.seed, guide=s, resume=rs), flag=guide_flag(args))
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
    program = isinstance(family, Program)
    where = (args.model or family.settings()["program"] if program else
             args.model or f"{type(family).__module__}:{type(family).__qualname__}")
    final = common.finish(out, args, device, {
        "family": {"model": where, "kind": "program" if program else "family",
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
        what = "program" if isinstance(family, Program) else "family"
        text = f"{engine} cannot run on the {family.name} {what}: {common.error_line(exc)}"
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
        raise common.CliError(f"--model: the model or an engine on it raised "
                              f"{type(exc).__name__}: {common.error_line(exc)}") from None


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["ENGINES", "Settings", "main", "make_settings", "resolve_family", "run", "study",
           "supported_engines"]
