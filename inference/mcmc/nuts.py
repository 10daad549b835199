"""NUTS as the reference engine, with diagnostics on label- and rotation-invariant quantities.

Two kernels, chosen from declared capabilities (``Settings.kernel``): a family with
:class:`~elbolab.models.capabilities.BatchedPotential` runs all chains in one computation
(:mod:`elbolab.inference.mcmc.batched`, one generator seeded by ``seed``); any other model runs
Pyro's NUTS chain after chain with seeds ``seed, seed + 1, ...``. Both are deterministic on CPU
(no worker processes). Discrete sites named in ``family.discrete_sites`` are summed out by
enumeration.
R-hat and bulk/tail ESS (Vehtari et al. 2021, via ArviZ) are computed on
``family.posterior_invariants(samples, x)``: raw mixture means or factor loadings mix across labels or
rotations, so their R-hat says nothing.
"""

from __future__ import annotations

import copy
import difflib
import math
import sys
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from pyro import poutine
from pyro.infer import MCMC, NUTS, config_enumerate
from pyro.poutine.messenger import Messenger
from tqdm.auto import tqdm

from elbolab.inference import arviz_io
from elbolab.inference.budget import check_mcmc
from elbolab.inference.mcmc import adapt
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
from elbolab.models.capabilities import (
    BatchedPotential,
    McmcModel,
    MissingCapability,
    PointwiseLogLikelihood,
    PosteriorInvariants,
)
from elbolab.models.validate import boolean, choice, integer, positive, probability

KERNELS = ("auto", "batched", "pyro")


@dataclass
class Settings:
    num_samples: int = 500
    warmup: int = 500
    num_chains: int = 4
    target_accept: float = 0.8
    max_tree_depth: int = 8
    jit: bool = True  # compiled potential: ~3x faster here
    #: "auto": the batched kernel (all chains in one computation, :mod:`.batched`) for a family
    #: declaring BatchedPotential, else Pyro's NUTS chain by chain; "batched" / "pyro" force one
    kernel: str = "auto"
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
        choice(self.kernel, "kernel", KERNELS)
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


def run_batched(flat, settings: Settings, seed: int) -> NutsRun:
    """All chains in one computation (:mod:`elbolab.inference.mcmc.batched`, Stan's adaptation
    in :mod:`elbolab.inference.mcmc.adapt`) on a family's :class:`FlatPotential`."""
    q0 = flat.init(settings.num_chains, torch.Generator().manual_seed(seed))
    gen = torch.Generator(device=q0.device).manual_seed(seed)
    total = settings.warmup + settings.num_samples
    with tqdm(total=total, desc="nuts (batched)", disable=not show_progress(settings.progress),
              leave=False, file=sys.stderr) as bar:
        draws = adapt.run(flat.potential, q0, warmup=settings.warmup,
                          num_samples=settings.num_samples, target_accept=settings.target_accept,
                          max_depth=settings.max_tree_depth, gen=gen, on_step=bar.update)
    samples = flat.to_sites(draws.q)
    return NutsRun(samples, [int(d) for d in draws.diverging.sum(1)], draws.diverging.cpu())


def _use_batched(family, settings: Settings, fix_params, init_params) -> bool:
    """The batched kernel when the family declares BatchedPotential (``kernel="auto"``), or when
    asked (``"batched"``: an error naming what is missing if it cannot apply)."""
    if settings.kernel == "pyro":
        return False
    capable = isinstance(family, BatchedPotential)
    if settings.kernel == "batched":
        if not capable:
            raise MissingCapability(
                f"kernel: 'batched' needs the BatchedPotential capability, which the "
                f"{family.name} family does not declare; use kernel='pyro' (or 'auto')")
        if fix_params is not None or init_params is not None:
            raise ValueError("kernel: 'batched' takes neither fix_params nor init_params; use "
                             "kernel='pyro'")
        return True
    return capable and fix_params is None and init_params is None


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
    """Worst R-hat and smallest bulk/tail ESS over all invariant quantities (ArviZ). R-hat needs
    two chains or more: with one it is NaN (not asked of ArviZ), and :func:`convergence` says
    why."""
    if not invariants:
        return {}
    draws = [to_numpy(v) for v in invariants.values()]
    out = {}
    if min(d.shape[0] for d in draws) < 2:
        out["r_hat_max"] = math.nan
    for name, fn in (
        ("r_hat_max", arviz_io.rhat),
        ("ess_bulk_min", lambda d: arviz_io.ess(d, "bulk")),
        ("ess_tail_min", lambda d: arviz_io.ess(d, "tail")),
    ):
        if name in out:
            continue
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
    ``pyro.param``s, or networks registered with ``pyro.module`` or written as ``PyroModule``s, is
    an error naming them unless ``fix_params`` fixes them: a dict name -> value (names as in the
    param store: ``"decoder$$$0.weight"``), or a :class:`FitResult` whose fitted model parameters
    are used (e.g. an SVI fit). A network's weights are copied into its own parameters for the
    run (a network computes with them, whatever ``pyro.param`` returns) and handed back after;
    a name the model lacks or a wrong shape is an error. NaN or inf in an observed site is an
    error naming the site, before any work. ``init_params``
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
    loaded: list = []  # (module parameter, its own value): handed back at the end
    try:
        with isolated(seed), one_thread(x), Timer(x.device) as timer:
            batched = _use_batched(family, settings, fix_params, init_params)
            model, discrete = _prepared(model, x, fix_params, family, loaded)
            check_mcmc(model, x, settings)  # memory of the draws, before any step
            run = run_batched(family.batched_potential(x), settings, seed) if batched else run_nuts(
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
    finally:
        _hand_back(loaded)
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
            f"{settings.num_chains} chains x {settings.num_samples} draws "
            f"({'batched kernel, chains in one computation' if batched else 'Pyro NUTS'}); "
            f"{diag['divergences']} divergences{why}" + _note("mcmc", x)
        ),
        settings={**family.settings(), **vars(settings)},
        diagnostics=diag,
        state=run,
    )


def _note(engine: str, x) -> str:
    note = device_note(engine, x)
    return f"; {note}" if note else ""


def _prepared(model, x, fix_params, family, loaded: list):
    """The model with its ``pyro.param``s fixed (or an error naming them), and its discrete latent
    sites; an error if nothing continuous is left to sample, or if an observed site holds NaN/inf.

    Parameters of networks (``pyro.module`` or ``PyroModule``) compute with the module's own
    tensors whatever ``pyro.param`` returns, so their fixed values are copied into the module's
    parameters in place; ``loaded`` gets (parameter, its own value) to hand back after the run."""
    fixed = _fixed_values(fix_params)
    inits = _ParamInits()
    with torch.no_grad(), warnings.catch_warnings():
        # names of the family's model that the NUTS model (mcmc_model) lacks: checked below
        warnings.filterwarnings("ignore", "pyro.module data did not find params")
        tr = poutine.trace(inits(poutine.substitute(config_enumerate(model, default="parallel"),
                                                    data=fixed))).get_trace(x)
        names = {k for k, s in tr.nodes.items() if s["type"] == "param"}
        if fixed and model != family.model:  # the names an SVI fit of family.model knows
            with poutine.block():
                ftr = poutine.trace(inits(family.model)).get_trace(x)
            names |= {k for k, s in ftr.nodes.items() if s["type"] == "param"}
    _check_observed(tr)
    unknown = sorted(set(fixed) - names)
    if unknown:
        hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(
            k, sorted(names), n=1)) else repr(k) for k in unknown]
        raise ValueError(
            f"fix_params: {', '.join(hints)} not a parameter of the {family.name} model "
            f"(its parameters: {sorted(names) or 'none'})")
    params = [k for k, s in tr.nodes.items() if s["type"] == "param" and k not in fixed]
    if params:
        raise ValueError(
            f"fix_params: the {family.name} model has learnable parameters {params} that NUTS "
            "would leave at their initial values; fix them (fix_params=<an SVI FitResult> or a "
            "dict name -> value)"
        )
    modules = {k: p for k, p in inits.parameters.items() if k in fixed}
    for k, p in modules.items():
        if tuple(fixed[k].shape) != tuple(p.shape):
            raise ValueError(f"fix_params: {k!r} has shape {tuple(fixed[k].shape)}; the model's "
                             f"network parameter has shape {tuple(p.shape)}")
    with torch.no_grad():
        for k, p in modules.items():
            loaded.append((p, p.detach().clone()))
            p.copy_(fixed[k].to(device=p.device, dtype=p.dtype))
    plain = {k: v for k, v in fixed.items() if k not in modules}
    if plain:
        model = poutine.substitute(model, data=plain)
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


class _ParamInits(Messenger):
    """Records the ``nn.Parameter`` each ``pyro.param`` statement is given, by name: the module's
    own tensor for ``pyro.module`` and a ``PyroModule``'s parameters."""

    def __init__(self):
        super().__init__()
        self.parameters: dict[str, torch.nn.Parameter] = {}

    def _pyro_param(self, msg):
        args = msg["args"]
        if len(args) > 1 and isinstance(args[1], torch.nn.Parameter):
            self.parameters.setdefault(msg["name"], args[1])


def _hand_back(loaded: list) -> None:
    """The networks' own values back (a module outside the family copy is the caller's)."""
    with torch.no_grad():
        for p, value in reversed(loaded):
            p.copy_(value)
    loaded.clear()


def _check_observed(tr) -> None:
    """NaN or inf in an observed value is an error naming the site: NUTS would only say that it
    cannot find valid initial parameters (and under a mask, 0 x NaN still poisons gradients)."""
    for name, site in tr.nodes.items():
        if site["type"] != "sample" or not site["is_observed"] or site_is_plate(site):
            continue
        value = site["value"]
        if not torch.is_tensor(value) or not value.is_floating_point():
            continue
        nan, inf = int(value.isnan().sum()), int(value.isinf().sum())
        if not nan and not inf:
            continue
        counts = " and ".join(
            f"{c} {what} value{'s' if c > 1 else ''}"
            for c, what in ((nan, "NaN"), (inf, "infinite")) if c)
        masked = site["mask"] is not None and site["mask"] is not True
        raise ValueError(
            f"x: observed site {name!r} has {counts}; NUTS needs finite data (its gradients "
            "are NaN otherwise): drop or impute those entries"
            + ("; under a mask, still replace them with any finite value" if masked else ""))


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
