"""NUTS as the reference engine, with diagnostics on label- and rotation-invariant quantities.

Three kernels, chosen from declared capabilities (``Settings.kernel``,
:mod:`elbolab.inference.mcmc.kernels`): a family with
:class:`~elbolab.models.capabilities.CompiledPotential` and data on the CPU runs each trajectory
in machine code (:mod:`elbolab.inference.mcmc.compiled`); one with
:class:`~elbolab.models.capabilities.BatchedPotential` runs all chains in one computation
(:mod:`elbolab.inference.mcmc.batched`); both under Stan's adaptation
(:mod:`elbolab.inference.mcmc.adapt`), one generator seeded by ``seed``, after the checks of a
declared potential against the model's trace. Any other model runs Pyro's NUTS, chain c seeded
``seed + c``, one chain after another or one worker process each (``Settings.chain_method``,
:mod:`elbolab.inference.mcmc.chains`): the same draws either way. Every kernel is deterministic
on CPU. Discrete sites named in ``family.discrete_sites`` are summed out by enumeration.
R-hat and bulk/tail ESS (Vehtari et al. 2021, via ArviZ) are computed on
``family.posterior_invariants(samples, x)``: raw mixture means or factor loadings mix across labels or
rotations, so their R-hat says nothing.
"""

from __future__ import annotations

import copy
import math
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
from pyro.infer import config_enumerate
from tqdm.auto import tqdm

from elbolab.inference import arviz_io
from elbolab.inference.budget import check_mcmc
from elbolab.inference.mcmc import adapt
from elbolab.inference.mcmc.arrays import Random, host_state, on_host
from elbolab.inference.mcmc.chains import run_chains
from elbolab.inference.mcmc.kernels import KERNEL_NOTES, check_start, choose, flat_potential
from elbolab.inference.mcmc.potential import check_against_model
from elbolab.inference.mcmc.prepare import hand_back, prepared
from elbolab.inference.result import FitResult, check_settings, data_fields
from elbolab.inference.runtime import (
    Timer,
    device_note,
    isolated,
    one_thread,
    show_progress,
)
from elbolab.inference.tracing import to_numpy
from elbolab.models.capabilities import (
    BatchedPotential,
    McmcModel,
    PointwiseLogLikelihood,
    PosteriorInvariants,
)
from elbolab.models.program import as_family
from elbolab.models.validate import boolean, choice, integer, positive, probability

KERNELS = ("auto", "compiled", "batched", "pyro")
CHAIN_METHODS = ("auto", "sequential", "parallel")
MIN_DRAWS = 4  # per chain, for split R-hat and ESS


@dataclass
class Settings:
    num_samples: int = 500
    warmup: int = 500
    num_chains: int = 4
    target_accept: float = 0.8
    max_tree_depth: int = 8
    jit: bool = True  # compiled potential: ~3x faster here
    #: "auto": for a family declaring CompiledPotential with data on the CPU, the compiled kernel
    #: (the whole trajectory in machine code, :mod:`.compiled`); else for one declaring
    #: BatchedPotential the batched kernel (all chains in one computation, :mod:`.batched`);
    #: else Pyro's NUTS chain by chain. "compiled" / "batched" / "pyro" force one
    kernel: str = "auto"
    #: how Pyro's kernel runs several chains: "sequential" (one after another, in this process;
    #: what "auto" means) or "parallel" (one worker process each, spawned: the model must pickle,
    #: i.e. be defined at module level). The batched kernel runs them in one computation: with
    #: kernel="auto", naming a chain method chooses Pyro's kernel; kernel="batched" takes none.
    chain_method: str = "auto"
    #: Pyro's progress bar per chain: None (default) shows it when stderr is a terminal or in a
    #: notebook (:func:`elbolab.inference.runtime.show_progress`), True/False force it
    progress: bool | None = None
    #: thresholds for ``converged`` (Vehtari et al. 2021: R-hat < 1.01, ESS > 100 per chain)
    rhat_max: float = 1.01
    ess_per_chain: int = 100

    def __post_init__(self):
        self.num_samples = integer(self.num_samples, "num_samples", minimum=1)
        self.warmup = integer(self.warmup, "warmup", minimum=0)
        self.num_chains = integer(self.num_chains, "num_chains", minimum=1)
        # 2^30 leapfrogs per draw is out of reach; deeper would overflow the compiled tree counter
        self.max_tree_depth = integer(self.max_tree_depth, "max_tree_depth", minimum=1, maximum=30)
        probability(self.target_accept, "target_accept", open_left=True, open_right=True)
        if positive(self.rhat_max, "rhat_max", allow_inf=True) < 1:
            raise ValueError(f"rhat_max: must be >= 1, got {self.rhat_max!r}")
        self.ess_per_chain = integer(self.ess_per_chain, "ess_per_chain", minimum=0)
        boolean(self.jit, "jit")
        choice(self.kernel, "kernel", KERNELS)
        choice(self.chain_method, "chain_method", CHAIN_METHODS)
        if self.kernel in ("batched", "compiled") and self.chain_method != "auto":
            raise ValueError(f"chain_method: {self.chain_method!r} is for Pyro's kernel; "
                             f"kernel={self.kernel!r} runs the chains itself")
        if self.progress is not None:
            boolean(self.progress, "progress")


@dataclass
class NutsRun:
    samples: dict[str, torch.Tensor]  # site -> (chain, draw, ...)
    divergences: list[int] = field(default_factory=list)  # per chain
    diverging: torch.Tensor | None = None  # (chain, draw) bool
    tree_depth: torch.Tensor | None = None  # (chain, draw): the compiled and batched kernels


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
    out = run_chains(model, args, kwargs, settings, seed, init_params, max_plate_nesting)
    samples = {k: torch.stack([draws[k] for draws, _, _ in out]) for k in out[0][0]}
    diverging = torch.zeros(settings.num_chains, settings.num_samples, dtype=torch.bool)
    for c, (_, idx, _) in enumerate(out):
        diverging[c, idx] = True
    return NutsRun(samples, [len(idx) for _, idx, _ in out], diverging)


def run_batched(flat, settings: Settings, seed: int, init_params: dict | None = None,
                compiled: tuple | None = None, reference=None, check=None) -> NutsRun:
    """All chains under one adaptation loop (Stan's, :mod:`elbolab.inference.mcmc.adapt`) on a
    family's :class:`FlatPotential`: in one computation (:mod:`elbolab.inference.mcmc.batched`;
    the chains' state in NumPy on the CPU, on the device in torch on a GPU, :mod:`.arrays`), or,
    given ``compiled`` (a family's ``compiled_potential``), each trajectory in machine code
    (:mod:`elbolab.inference.mcmc.compiled`, float64 on the CPU), checked first against
    ``reference``, the batched potential on float64 data. ``check(q0)`` runs on the starting
    points before any step (a family's potential against its model's trace). Every chain starts at
    ``init_params`` (site -> unconstrained value) when given, as Pyro's kernel does."""
    q0 = flat.init(settings.num_chains, torch.Generator().manual_seed(seed))
    if init_params is not None:
        if flat.from_sites is None:
            raise ValueError("init_params: this model's batched potential takes no starting "
                             "values; use kernel='pyro'")
        q0 = flat.from_sites(init_params).to(q0).expand_as(q0).clone()
    if not isinstance(q0, torch.Tensor):
        raise ValueError(f"batched_potential: init must give a torch tensor, got "
                         f"{type(q0).__name__}")
    state = host_state(q0)
    if compiled is not None:
        from elbolab.inference.mcmc.compiled import Compiled, check_against

        state = state.astype(np.float64)
        potential = Compiled(*compiled)  # (fn, x, params)
        check_start(flat, potential, state, settings.num_chains)
        step = potential.transition
    else:
        potential = flat.potential if state is q0 else on_host(flat.potential)
        check_start(flat, potential, state, settings.num_chains)
        step = adapt.transition
    if check is not None:
        check(q0)
    if compiled is not None:
        check_against(potential, on_host(reference), state)
    total = settings.warmup + settings.num_samples
    desc = f"nuts ({'batched' if compiled is None else 'compiled'})"
    with tqdm(total=total, desc=desc, disable=not show_progress(settings.progress),
              leave=False, file=sys.stderr) as bar:
        draws = adapt.run(potential, state, warmup=settings.warmup,
                          num_samples=settings.num_samples, target_accept=settings.target_accept,
                          max_depth=settings.max_tree_depth, rng=Random(seed, state),
                          on_step=bar.update, step=step)
    q = torch.as_tensor(draws.q).to(q0)
    diverging = torch.as_tensor(draws.diverging).cpu()
    depth = torch.as_tensor(draws.depth).cpu().to(torch.int64)
    return NutsRun(flat.to_sites(q), [int(d) for d in diverging.sum(1)], diverging, depth)


def invariant_diagnostics(invariants: dict[str, torch.Tensor]) -> dict[str, float]:
    """Worst R-hat and smallest bulk/tail ESS over all invariant quantities (ArviZ). R-hat needs
    two chains or more, and every statistic 4 draws per chain (split chains of 2): short of that
    they are NaN (not asked of ArviZ), and :func:`convergence` says why."""
    if not invariants:
        return {}
    draws = [to_numpy(v) for v in invariants.values()]
    out = {}
    if min(d.shape[1] for d in draws) < MIN_DRAWS:
        return {"r_hat_max": math.nan, "ess_bulk_min": math.nan, "ess_tail_min": math.nan}
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
    if settings.num_samples < MIN_DRAWS:
        return False, (f"no R-hat or ESS ({settings.num_samples} draw"
                       f"{'s' * (settings.num_samples > 1)} per chain; they need >= {MIN_DRAWS})")
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
    family = copy.deepcopy(as_family(family))  # a plain Pyro program works called directly too
    x = family.check_data(x)
    if x.dtype in (torch.float16, torch.bfloat16):
        raise ValueError(f"x: NUTS needs float32 or float64 data, got {x.dtype} (its rounding "
                         "would move the energy, and the draws, by more than the sampler's own "
                         "error); pass x.float()")
    model = family.mcmc_model if isinstance(family, McmcModel) else family.model
    given = init_params  # a user's start is checked against the model's sites before any work
    if init_params is None and isinstance(family, McmcModel):
        init_params = family.mcmc_init(x)
    loaded: list = []  # (module parameter, its own value): handed back at the end
    try:
        with isolated(seed), one_thread(x), Timer(x.device) as timer:
            kernel = choose(family, settings, fix_params, x)
            model, discrete, given = prepared(model, x, fix_params, family, loaded, given)
            init_params = init_params if given is None else given
            check_mcmc(model, x, settings)  # memory of the draws, before any step
            flat = compiled = reference = check = None
            if kernel != "pyro":
                flat = flat_potential(family, model, x)
            if flat is not None and isinstance(family, BatchedPotential):
                flat64 = (flat if x.dtype == torch.float64 else
                          family.batched_potential(x.to(torch.float64)))
                reference = flat64.potential
                check = lambda q0: check_against_model(model, x, flat64, q0)  # noqa: E731
            if kernel == "compiled":
                compiled = family.compiled_potential(x)
                if not (isinstance(compiled, tuple | list) and len(compiled) == 3):
                    raise ValueError("compiled_potential: must return (fn, data, params), got "
                                     f"{type(compiled).__name__}")
            run = run_batched(flat, settings, seed, init_params,
                              compiled, reference, check) if kernel != "pyro" else run_nuts(
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
        log_lik = {}
        if isinstance(family, PointwiseLogLikelihood):
            try:
                log_lik = {"x": family.pointwise_log_likelihood(samples, x)}
            except KeyError:  # a program without a data plate, or with sites summed out
                log_lik = {}
    finally:
        hand_back(loaded)
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
        sample_stats={"diverging": run.diverging,
                      **({} if run.tree_depth is None else {"tree_depth": run.tree_depth})},
        seconds=timer.seconds,
        converged=converged,
        message=(
            f"{settings.num_chains} chain{'s' * (settings.num_chains > 1)} x "
            f"{settings.num_samples} draws "
            f"({KERNEL_NOTES[kernel]}); "
            f"{diag['divergences']} divergences{why}" + _note("mcmc", x)
        ),
        settings={**family.settings(), **vars(settings), "kernel_used": kernel},
        diagnostics=diag,
        state=run,
    )


def _note(engine: str, x) -> str:
    note = device_note(engine, x)
    return f"; {note}" if note else ""


__all__ = ["NutsRun", "Settings", "convergence", "fit", "invariant_diagnostics", "run_nuts"]
