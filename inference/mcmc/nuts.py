"""NUTS (Pyro) as the reference engine, with diagnostics on label- and rotation-invariant quantities.

Chains run one after another with seeds ``seed, seed + 1, ...`` (deterministic on CPU; no worker
processes). Discrete sites named in ``family.discrete_sites`` are summed out by enumeration.
R-hat and bulk/tail ESS (Vehtari et al. 2021, via ArviZ) are computed on
``family.posterior_invariants(samples, x)``: raw mixture means or factor loadings mix across labels or
rotations, so their R-hat says nothing.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from pyro import poutine
from pyro.infer import MCMC, NUTS, config_enumerate

from elbolab.inference import arviz_io
from elbolab.inference.budget import check_mcmc
from elbolab.inference.result import FitResult, check_settings, data_fields
from elbolab.inference.runtime import (
    Timer,
    device_note,
    isolated,
    one_thread,
    seed_everything,
    show_progress,
)
from elbolab.inference.tracing import site_is_plate, to_numpy
from elbolab.models.capabilities import McmcModel, PointwiseLogLikelihood, PosteriorInvariants
from elbolab.models.validate import boolean, integer, positive, probability


@dataclass
class Settings:
    num_samples: int = 500
    warmup: int = 500
    num_chains: int = 4
    target_accept: float = 0.8
    max_tree_depth: int = 8
    jit: bool = True  # compiled potential: ~3x faster here
    #: Pyro's progress bar per chain: None (default) shows it when stderr is a terminal or in a
    #: notebook (:func:`elbolab.inference.runtime.show_progress`), True/False force it
    progress: bool | None = None
    #: thresholds for ``converged`` (Vehtari et al. 2021: R-hat < 1.01, ESS > 100 per chain)
    rhat_max: float = 1.01
    ess_per_chain: int = 100

    def __post_init__(self):
        integer(self.num_samples, "num_samples", minimum=1)
        integer(self.warmup, "warmup", minimum=0)
        integer(self.num_chains, "num_chains", minimum=1)
        integer(self.max_tree_depth, "max_tree_depth", minimum=1)
        probability(self.target_accept, "target_accept", open_left=True, open_right=True)
        if positive(self.rhat_max, "rhat_max", allow_inf=True) < 1:
            raise ValueError(f"rhat_max: must be >= 1, got {self.rhat_max!r}")
        integer(self.ess_per_chain, "ess_per_chain", minimum=0)
        boolean(self.jit, "jit")
        if self.progress is not None:
            boolean(self.progress, "progress")


@dataclass
class NutsRun:
    samples: dict[str, torch.Tensor]  # site -> (chain, draw, ...)
    divergences: list[int] = field(default_factory=list)  # per chain
    diverging: torch.Tensor | None = None  # (chain, draw) bool


def run_nuts(
    model,
    args: tuple,
    settings: Settings,
    seed: int,
    kwargs: dict | None = None,
    init_params: dict | None = None,
    max_plate_nesting: int | None = None,
    enumerate_discrete: bool = False,
) -> NutsRun:
    """Run ``settings.num_chains`` NUTS chains of any Pyro model; stack draws as (chain, draw, ...)."""
    kwargs = kwargs or {}
    if enumerate_discrete:
        model = config_enumerate(model, default="parallel")
    per_chain, divergences, diverging = [], [], []
    jit = settings.jit
    for chain in range(settings.num_chains):
        try:
            mcmc = _one_chain(model, args, kwargs, settings, seed + chain, init_params,
                              max_plate_nesting, jit)
        except RuntimeError as exc:
            # the JIT cannot trace some models (e.g. a network's weights read through
            # pyro.module): run those uncompiled; a model that fails without JIT still raises.
            if not jit:
                raise
            reason = str(exc).splitlines()[0][:200]
            warnings.warn(f"NUTS: JIT compilation failed ({reason}); running without JIT",
                          stacklevel=2)
            jit = False
            mcmc = _one_chain(model, args, kwargs, settings, seed + chain, init_params,
                              max_plate_nesting, jit)
        per_chain.append(mcmc.get_samples())
        idx = mcmc.diagnostics().get("divergences", {}).get("chain 0", [])
        divergences.append(len(idx))
        flags = torch.zeros(settings.num_samples, dtype=torch.bool)
        flags[list(idx)] = True
        diverging.append(flags)
    samples = {k: torch.stack([c[k] for c in per_chain]) for k in per_chain[0]}
    return NutsRun(samples, divergences, torch.stack(diverging))


def _one_chain(model, args, kwargs, settings, seed, init_params, max_plate_nesting, jit) -> MCMC:
    seed_everything(seed)
    kernel = NUTS(
        model,
        target_accept_prob=settings.target_accept,
        max_tree_depth=settings.max_tree_depth,
        jit_compile=jit,
        ignore_jit_warnings=True,
        max_plate_nesting=max_plate_nesting,
    )
    mcmc = MCMC(
        kernel,
        num_samples=settings.num_samples,
        warmup_steps=settings.warmup,
        num_chains=1,
        initial_params=init_params,
        disable_progbar=not show_progress(settings.progress),
    )
    mcmc.run(*args, **kwargs)
    return mcmc


def invariant_diagnostics(invariants: dict[str, torch.Tensor]) -> dict[str, float]:
    """Worst R-hat and smallest bulk/tail ESS over all invariant quantities (ArviZ)."""
    if not invariants:
        return {}
    draws = [to_numpy(v) for v in invariants.values()]
    out = {}
    for name, fn in (
        ("r_hat_max", arviz_io.rhat),
        ("ess_bulk_min", lambda d: arviz_io.ess(d, "bulk")),
        ("ess_tail_min", lambda d: arviz_io.ess(d, "tail")),
    ):
        vals = np.concatenate([np.ravel(fn(d)) for d in draws])
        vals = vals[np.isfinite(vals)]
        if vals.size:
            out[name] = float(vals.max() if name.startswith("r_hat") else vals.min())
        else:
            out[name] = math.nan
    return out


def convergence(diag: dict, settings: Settings | None = None) -> tuple[bool, str]:
    """(converged, why not) of NUTS draws by the rule ``fit`` applies (Vehtari et al. 2021):
    at least two chains, worst R-hat <= ``settings.rhat_max`` and smallest bulk and tail ESS >=
    ``settings.ess_per_chain`` x chains. ``diag``: :func:`invariant_diagnostics` (``r_hat_max``,
    ``ess_bulk_min``, ``ess_tail_min``); a missing or NaN entry fails its test. ``why`` is empty
    when converged, else e.g. "R-hat 1.058 (need <= 1.01), ESS bulk/tail 97/60 (need >= 200)"."""
    settings = settings or Settings()

    def value(key, default):
        v = diag.get(key)
        return default if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)

    min_ess = settings.ess_per_chain * settings.num_chains
    converged = bool(
        settings.num_chains > 1
        and value("r_hat_max", math.inf) <= settings.rhat_max
        and value("ess_bulk_min", 0) >= min_ess
        and value("ess_tail_min", 0) >= min_ess
    )
    if converged:
        return True, ""
    r_hat = value("r_hat_max", math.nan)
    return False, (
        (f"R-hat {r_hat:.3f} (need <= {settings.rhat_max})" if math.isfinite(r_hat) else
         f"no R-hat ({settings.num_chains} chain{'s' if settings.num_chains > 1 else ''}; "
         "it needs >= 2)")
        + f", ESS bulk/tail {value('ess_bulk_min', math.nan):.0f}/"
        f"{value('ess_tail_min', math.nan):.0f} (need >= {min_ess})"
    )


def fit(
    family,
    x,
    settings: Settings | None = None,
    *,
    seed: int = 0,
    init_params: dict | None = None,
    fix_params=None,
) -> FitResult:
    """NUTS on ``family.mcmc_model`` (:class:`~elbolab.models.capabilities.McmcModel`) or ``family.model``.

    Every latent site is sampled (discrete ones summed out by enumeration). A model with learnable
    ``pyro.param``s is an error unless ``fix_params`` fixes them: a dict name -> value, or a
    :class:`FitResult` whose fitted model parameters are used (e.g. an SVI fit). ``init_params``
    (site -> unconstrained value) starts every chain there; default ``family.mcmc_init(x)``.
    R-hat and bulk/tail ESS are computed on ``family.posterior_invariants`` when the family has
    :class:`~elbolab.models.capabilities.PosteriorInvariants`, else on every sampled site.
    """
    settings = check_settings(settings, Settings, "mcmc")
    family = copy.deepcopy(family)
    x = family.check_data(x)
    model = family.mcmc_model if isinstance(family, McmcModel) else family.model
    if init_params is None and isinstance(family, McmcModel):
        init_params = family.mcmc_init(x)
    with isolated(seed), one_thread(x), Timer(x.device) as timer:
        model, discrete = _prepared(model, x, fix_params, family)
        check_mcmc(model, x, settings)  # memory of the draws, before any step
        run = run_nuts(
            model,
            (x,),
            settings,
            seed,
            init_params=init_params,
            max_plate_nesting=family.max_plate_nesting,
            enumerate_discrete=bool(discrete),
        )
    samples = dict(run.samples)
    if isinstance(family, PosteriorInvariants):
        invariants = family.posterior_invariants(samples, x)
    else:
        invariants = samples
    log_lik = (
        {"x": family.pointwise_log_likelihood(samples, x)}
        if isinstance(family, PointwiseLogLikelihood)
        else {}
    )
    diag = invariant_diagnostics(invariants)
    diag["divergences"] = int(sum(run.divergences))
    converged, why = convergence(diag, settings)
    why = f"; not converged: {why}" if why else ""
    return FitResult(
        **data_fields(family, x, seed),
        engine="mcmc",
        guide="nuts",
        bound="none",
        posterior={k: v.mean(dim=(0, 1)) for k, v in samples.items()},
        samples={
            **samples,
            **{
                ("log_lik_total" if k == "log_likelihood" else k): v
                for k, v in invariants.items()
                if k not in samples
            },
        },
        log_likelihood=log_lik,
        sample_stats={"diverging": run.diverging},
        seconds=timer.seconds,
        converged=converged,
        message=(
            f"{settings.num_chains} chains x {settings.num_samples} draws; "
            f"{diag['divergences']} divergences{why}" + _note("mcmc", x)
        ),
        settings={**family.settings(), **vars(settings)},
        diagnostics=diag,
        state=run,
    )


def _note(engine: str, x) -> str:
    note = device_note(engine, x)
    return f"; {note}" if note else ""


def _prepared(model, x, fix_params, family):
    """The model with its ``pyro.param``s fixed (or an error naming them), and its discrete latent
    sites; an error if nothing continuous is left to sample."""
    fixed = _fixed_values(fix_params)
    if fixed:
        model = poutine.substitute(model, data=fixed)
    with torch.no_grad():
        tr = poutine.trace(config_enumerate(model, default="parallel")).get_trace(x)
    params = [k for k, s in tr.nodes.items() if s["type"] == "param" and k not in fixed]
    if params:
        raise ValueError(
            f"fix_params: the {family.name} model has learnable parameters {params} that NUTS "
            "would leave at their initial values; fix them (fix_params=<an SVI FitResult> or a "
            "dict name -> value)"
        )
    latent = {
        k: s for k, s in tr.nodes.items()
        if s["type"] == "sample" and not s["is_observed"] and not site_is_plate(s)
    }
    discrete = [k for k, s in latent.items() if s["fn"].has_enumerate_support]
    if len(discrete) == len(latent):
        raise ValueError(
            f"model: the {family.name} model has no continuous latent site for NUTS to sample "
            f"(latent sites: {sorted(latent) or 'none'})"
        )
    return model, discrete


def _fixed_values(fix_params) -> dict:
    if fix_params is None:
        return {}
    if isinstance(fix_params, FitResult):
        params = fix_params.model_params()
        if not params:
            raise ValueError("fix_params: the given FitResult holds no fitted model parameters")
        return params
    if isinstance(fix_params, dict):
        return {k: torch.as_tensor(v) for k, v in fix_params.items()}
    raise TypeError(f"fix_params: must be a FitResult or a dict, got {type(fix_params).__name__}")


__all__ = ["NutsRun", "Settings", "convergence", "fit", "invariant_diagnostics", "run_nuts"]
