"""Stochastic variational inference with Pyro, for any family and any guide.

``fit`` learns the guide (and, unless ``learn_model_params=False``, the model's ``pyro.param``s)
by stochastic gradient ascent on the ELBO, then reports the ELBO of the fitted pair with the one
evaluator every engine shares (:func:`inference.elbo.estimate_elbo`). ``run_svi`` is the bare loop,
for tools that optimize a guide inside the current parameter store (e.g. per-point q*).

Guides whose family sums the discrete sites out (``GuideSpec.collapsed``) are trained with
``TraceEnum_ELBO`` and their bound is labelled ``elbo-collapsed``; the others use ``Trace_ELBO``
(or ``TraceMeanField_ELBO``, analytic KL where available, with ``mean_field_kl=True``).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.infer import (
    SVI,
    JitTrace_ELBO,
    JitTraceEnum_ELBO,
    JitTraceMeanField_ELBO,
    Trace_ELBO,
    TraceEnum_ELBO,
    TraceMeanField_ELBO,
)
from tqdm.auto import tqdm

from guides.base import GuideSpec
from inference.elbo import estimate_elbo
from inference.result import FitResult, data_fields
from inference.runtime import Timer, isolated
from models.base import MissingCapability
from models.validate import integer, non_negative, positive


@dataclass
class Settings:
    """SVI settings (Adam with per-parameter gradient clipping).

    ``tol`` > 0 stops when the mean loss per datum over the last ``window`` steps improves by less
    than ``tol`` nats on the window before. ``val_data`` with ``eval_every`` and ``patience``
    stops early on the held-out ELBO and restores the best parameters.
    """

    num_steps: int = 2000
    lr: float = 0.02
    num_particles: int = 1
    subsample_size: int | None = None
    clip_norm: float | None = 10.0
    lr_decay: float = 1.0  # total multiplicative decay of the learning rate over num_steps
    eval_particles: int = 1000
    eval_batch: int = 100
    learn_model_params: bool = True
    val_data: Any = None
    val_particles: int = 20
    eval_every: int = 0
    patience: int = 0
    checkpoint: Path | str | None = None
    checkpoint_every: int = 0
    snapshot_every: int = 50
    tol: float = 0.0
    converged_tol: float = 1e-3  # window gain (nats/datum) under which a full run counts as converged
    window: int = 100
    mean_field_kl: bool = False
    jit: bool = False
    vectorize_particles: bool = True
    num_posterior_samples: int = 200
    direct: bool = False  # torch-native step (see direct_step); needs family.log_joint
    validate: bool = False  # Pyro's distribution checks; data are validated at the boundary
    progress: bool = False

    def __post_init__(self):
        integer(self.num_steps, "num_steps", minimum=1)
        positive(self.lr, "lr")
        integer(self.num_particles, "num_particles", minimum=1)
        if self.subsample_size is not None:
            integer(self.subsample_size, "subsample_size", minimum=1)
        if self.clip_norm is not None:
            positive(self.clip_norm, "clip_norm")
        positive(self.lr_decay, "lr_decay")
        integer(self.eval_particles, "eval_particles", minimum=2)
        integer(self.eval_batch, "eval_batch", minimum=1)
        integer(self.val_particles, "val_particles", minimum=1)
        integer(self.eval_every, "eval_every", minimum=0)
        integer(self.patience, "patience", minimum=0)
        integer(self.checkpoint_every, "checkpoint_every", minimum=0)
        integer(self.snapshot_every, "snapshot_every", minimum=1)
        integer(self.window, "window", minimum=1)
        non_negative(self.tol, "tol")
        positive(self.converged_tol, "converged_tol")
        if self.patience and not (self.eval_every and self.val_data is not None):
            raise ValueError("patience: early stopping needs val_data and eval_every > 0")


@dataclass
class SviRun:
    trace: list[float] = field(default_factory=list)  # ELBO estimate per step (nats, total)
    converged: bool = False
    message: str = ""
    steps: int = 0
    val_trace: list[tuple[int, float]] = field(default_factory=list)
    stopped_early: bool = False


def make_loss(settings: Settings, collapsed: bool, max_plate_nesting: int):
    """The Pyro ELBO object for these settings (``collapsed``: any enumeration, model or guide)."""
    kw = dict(
        num_particles=settings.num_particles,
        vectorize_particles=settings.vectorize_particles and settings.num_particles > 1,
        max_plate_nesting=max_plate_nesting,
    )
    if collapsed:
        return (JitTraceEnum_ELBO if settings.jit else TraceEnum_ELBO)(**kw)
    if settings.mean_field_kl:
        return (JitTraceMeanField_ELBO if settings.jit else TraceMeanField_ELBO)(**kw)
    return (JitTrace_ELBO if settings.jit else Trace_ELBO)(**kw)


def snapshot_params() -> dict[str, torch.Tensor]:
    """Copies of the unconstrained tensors in the current param store."""
    return {k: v.detach().clone() for k, v in pyro.get_param_store().named_parameters()}


def restore_params(snapshot: dict[str, torch.Tensor]) -> None:
    """Copy a snapshot back, in place (modules keep sharing the same tensors)."""
    store = dict(pyro.get_param_store().named_parameters())
    with torch.no_grad():
        for k, v in snapshot.items():
            if k in store:
                store[k].copy_(v)


def save_checkpoint(path: Path | str, step: int, trace: list[float]) -> Path:
    """Save the param store's unconstrained tensors (a plain state dict, no pickled objects)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "params": snapshot_params(),
        "step": torch.tensor(step),
        "trace": torch.tensor(trace, dtype=torch.float64),
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def load_checkpoint(path: Path | str, model, guide, *args, **kwargs) -> dict:
    """Create the params by tracing guide and model once, then copy the checkpoint in place.

    Loads with ``weights_only=True``.
    """
    payload = torch.load(Path(path), weights_only=True, map_location="cpu")
    with torch.no_grad():
        gtr = poutine.trace(guide).get_trace(*args, **kwargs)
        poutine.trace(poutine.replay(model, trace=gtr)).get_trace(*args, **kwargs)
    store = dict(pyro.get_param_store().named_parameters())
    missing = [k for k in payload["params"] if k not in store]
    if missing:
        raise KeyError(f"checkpoint: parameters {missing} are not created by this model/guide")
    restore_params({k: v.to(store[k].device) for k, v in payload["params"].items()})
    return payload


def run_svi(
    model,
    guide,
    args: tuple,
    settings: Settings,
    kwargs: dict | None = None,
    *,
    collapsed: bool = False,
    max_plate_nesting: int = 1,
    n: int | None = None,
    step_fn=None,
) -> SviRun:
    """Optimize inside the current param store. Stops with the reason on a non-finite loss and
    restores the last good snapshot; never seeds or clears anything.

    ``step_fn`` (optional) replaces Pyro's ``SVI.step``: a callable taking one gradient step and
    returning the loss (used by the direct path, :func:`direct_step`)."""
    kwargs = dict(kwargs or {})
    if settings.subsample_size is not None:
        kwargs["subsample_size"] = settings.subsample_size
    n = n or (args[0].shape[0] if args and hasattr(args[0], "shape") else 1)
    if not settings.learn_model_params:
        model = poutine.block(model, hide_types=["param"])
    if step_fn is None:
        loss = make_loss(settings, collapsed, max_plate_nesting)
        svi = SVI(model, guide, pyro.optim.ClippedAdam(_adam_args(settings)), loss)

        def step_fn():
            return svi.step(*args, **kwargs)

    run = SviRun()
    with pyro.validation_enabled(settings.validate):
        _loop(step_fn, run, settings, n, model, guide, collapsed, max_plate_nesting)
    return run


def _adam_args(settings: Settings) -> dict:
    gamma = settings.lr_decay ** (1.0 / settings.num_steps)
    return {"lr": settings.lr, "clip_norm": settings.clip_norm or math.inf, "lrd": gamma}


def direct_step(family, guide, x: torch.Tensor, settings: Settings):
    """A torch-native SVI step: the same reparameterized ELBO estimate as ``Trace_ELBO``, without
    Pyro's tracing (for speed on small networks).

    Needs ``family.log_joint(x, z) -> (..., n)`` and ``guide.distribution(x, idx)`` (a
    reparameterizable q(z_n | x_n) with batch shape (B,)). Per step: idx ~ a uniform minibatch of
    size B, z_p ~ q (P particles), loss = -(n / B) * mean_p sum_n [log p(x_n, z_pn) - log q(z_pn)],
    the unbiased estimate of -ELBO that Trace_ELBO with plate subsampling computes.
    The optimized tensors are the param store's (guide's, and the model's unless
    ``learn_model_params=False``), so checkpoints, snapshots and the evaluator see them.
    """
    from pyro.optim.clipped_adam import ClippedAdam

    if not callable(getattr(family, "log_joint", None)):
        raise ValueError(f"direct: the {family.name} family has no log_joint(x, z)")
    if not callable(getattr(guide, "distribution", None)):
        raise ValueError("direct: the guide has no distribution(x, idx)")
    with torch.no_grad():
        gtr = poutine.trace(guide).get_trace(x)
        mtr = poutine.trace(family.model).get_trace(x)
    names = {m["name"] for m in gtr.nodes.values() if m["type"] == "param"}
    if settings.learn_model_params:
        names |= {m["name"] for m in mtr.nodes.values() if m["type"] == "param"}
    params = [p for k, p in pyro.get_param_store().named_parameters() if k in names]
    opt = ClippedAdam(params, **_adam_args(settings))
    n, batch, particles = x.shape[0], settings.subsample_size, settings.num_particles

    def step():
        idx = None if batch is None else torch.randperm(n, device=x.device)[:batch]
        xb = x if idx is None else x[idx]
        q = guide.distribution(x, idx)
        z = q.rsample((particles,))
        elbo = (family.log_joint(xb, z) - q.log_prob(z)).sum(-1).mean(0) * (n / xb.shape[0])
        opt.zero_grad()
        (-elbo).backward()
        opt.step()
        return float(-elbo.detach())

    return step


def _loop(step_fn, run, settings, n, model, guide, collapsed, max_plate_nesting):
    recent: deque[float] = deque(maxlen=2 * settings.window)
    snap, snap_step = None, 0
    best_val, best_snap, bad_evals = -math.inf, None, 0
    bar = tqdm(range(settings.num_steps), desc="svi", disable=not settings.progress, leave=False)
    for step in bar:
        try:
            value = step_fn()
        except (ValueError, RuntimeError) as exc:  # distribution validation on NaN parameters
            if step == 0 or not _mentions_nonfinite(str(exc)):
                raise
            value, reason = math.nan, f" ({str(exc).splitlines()[0][:160]})"
        else:
            reason = ""
        if not math.isfinite(value):
            if snap is not None:
                restore_params(snap)
            run.message = (
                f"stopped at step {step + 1}: loss became {value}{reason}; restored the "
                f"parameters of step {snap_step}"
            )
            return run
        run.trace.append(-value)
        run.steps = step + 1
        if step % settings.snapshot_every == 0:
            snap, snap_step = snapshot_params(), run.steps
        recent.append(value / n)
        if settings.progress and step % 50 == 0:
            bar.set_postfix(elbo_per_datum=f"{-value / n:.4f}")
        if (
            settings.checkpoint
            and settings.checkpoint_every
            and run.steps % settings.checkpoint_every == 0
        ):
            save_checkpoint(settings.checkpoint, run.steps, run.trace)
        if (
            settings.eval_every
            and settings.val_data is not None
            and run.steps % settings.eval_every == 0
        ):
            val = (
                estimate_elbo(
                    model,
                    guide,
                    settings.val_data,
                    num_particles=max(2, settings.val_particles),
                    batch_size=settings.val_particles,
                    collapsed=collapsed,
                    max_plate_nesting=max_plate_nesting,
                ).value
                / settings.val_data.shape[0]
            )
            run.val_trace.append((run.steps, val))
            if val > best_val:
                best_val, best_snap, bad_evals = val, snapshot_params(), 0
            else:
                bad_evals += 1
                if settings.patience and bad_evals >= settings.patience:
                    restore_params(best_snap)
                    run.stopped_early, run.converged = True, True
                    run.message = (
                        f"early stop at step {run.steps}: held-out ELBO did not improve for "
                        f"{bad_evals} evaluations; restored best ({best_val:.4f}/datum)"
                    )
                    return run
        if settings.tol and len(recent) == recent.maxlen:
            w = settings.window
            old, new = sum(list(recent)[:w]) / w, sum(list(recent)[w:]) / w
            if old - new < settings.tol:
                run.converged = True
                run.message = f"converged at step {run.steps} (window gain {old - new:.2e} < tol)"
                return run
    if best_snap is not None:
        restore_params(best_snap)
    # Ran out of steps: call it converged only if the ELBO has stopped rising, i.e. the mean over
    # the last window beats the window before by less than ``converged_tol`` nats per datum.
    w = min(settings.window, len(run.trace) // 2)
    if w:
        gain = (sum(run.trace[-w:]) - sum(run.trace[-2 * w : -w])) / (w * n)
        run.converged = gain < settings.converged_tol
        run.message = run.message or (
            f"ran {run.steps} steps; last-window gain {gain:.2e} nats/datum "
            f"({'<' if run.converged else '>='} converged_tol {settings.converged_tol:g})"
        )
    run.message = run.message or f"ran {run.steps} steps"
    return run


def _mentions_nonfinite(text: str) -> bool:
    t = text.lower()
    return "nan" in t or "inf" in t or "invalid values" in t


def resolve_guide(family, guide) -> GuideSpec:
    """A guide given by name (looked up in ``family.guides()``), as a GuideSpec, or a callable."""
    if isinstance(guide, GuideSpec):
        return guide
    if callable(guide):
        return GuideSpec(getattr(guide, "__name__", type(guide).__name__), lambda f, x, **_: guide)
    if not callable(getattr(family, "guides", None)):
        raise MissingCapability(
            f"SVI needs a guide; the {family.name} family names none (pass guide=GuideSpec or a callable)"
        )
    specs = family.guides()
    name = guide or getattr(family, "default_guide", None) or next(iter(specs))
    if name not in specs:
        raise ValueError(
            f"guide: the {family.name} family has guides {sorted(specs)}, got {name!r}"
        )
    return specs[name]


def fit(
    family,
    x,
    settings: Settings | None = None,
    *,
    seed: int = 0,
    guide=None,
    guide_options: dict | None = None,
    **_,
) -> FitResult:
    """Fit ``guide`` (name, GuideSpec or callable) to ``family.model`` on data ``x``."""
    settings = settings or Settings()
    x = family.check_data(x)
    if settings.val_data is not None:
        settings.val_data = family.check_data(settings.val_data)
    spec = resolve_guide(family, guide)
    nest = getattr(family, "max_plate_nesting", 1)
    with isolated(seed), Timer(x.device) as timer:
        guide_fn = spec.build(family, x, **(guide_options or {}))
        enum = spec.collapsed or spec.enumerated
        step_fn = None
        if settings.direct:
            if enum:
                raise ValueError(f"direct: guide {spec.name!r} needs enumeration (use Pyro's ELBO)")
            step_fn = direct_step(family, guide_fn, x, settings)
        run = run_svi(
            family.model, guide_fn, (x,), settings, collapsed=enum, max_plate_nesting=nest,
            step_fn=step_fn,
        )
        est = estimate_elbo(
            family.model,
            guide_fn,
            x,
            num_particles=settings.eval_particles,
            batch_size=settings.eval_batch,
            collapsed=spec.collapsed,
            enumerate=enum,
            max_plate_nesting=nest,
        )
        params = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
        guide_params = _guide_param_names(guide_fn, x)
        samples, log_lik = _posterior_draws(family, guide_fn, x, settings.num_posterior_samples)
    return FitResult(
        **data_fields(family, x, seed),
        engine="svi",
        guide=spec.name,
        bound=est.bound,
        elbo=est.value,
        elbo_se=est.se,
        trace=run.trace,
        posterior={k: v for k, v in params.items() if k in guide_params},
        samples=samples,
        log_likelihood=log_lik,
        seconds=timer.seconds,
        converged=run.converged,
        message=run.message,
        settings={
            **family.settings(),
            **{k: v for k, v in vars(settings).items() if k != "val_data"},
        },
        diagnostics={"steps": run.steps, "eval_particles": est.num_particles},
        state={"guide": guide_fn, "params": params, "spec": spec, "run": run},
    )


def _guide_param_names(guide_fn, x) -> set[str]:
    with torch.no_grad():
        tr = poutine.trace(guide_fn).get_trace(x)
    names = {s["name"] for s in tr.nodes.values() if s["type"] == "param"}
    return names or set(pyro.get_param_store().keys())


def _posterior_draws(family, guide_fn, x, num_samples: int):
    """Draws from q, shaped (1 chain, draw, ...), and the pointwise log likelihood if the family
    can compute it (for ArviZ). Vectorized with an outer plate; shapes taken from one plain draw."""
    if num_samples <= 0:
        return {}, {}

    def latent(tr):
        return {
            name: site["value"]
            for name, site in tr.nodes.items()
            if site["type"] == "sample"
            and not site["is_observed"]
            and not site["infer"].get("is_auxiliary")
        }

    nest = getattr(family, "max_plate_nesting", 1)
    with torch.no_grad():
        shapes = {k: v.shape for k, v in latent(poutine.trace(guide_fn).get_trace(x)).items()}
        try:
            with pyro.plate("_posterior_draws", num_samples, dim=-(nest + 1)):
                vec = latent(poutine.trace(guide_fn).get_trace(x))
            samples = {k: vec[k].reshape(num_samples, *shapes[k]).unsqueeze(0) for k in shapes}
        except (RuntimeError, ValueError, KeyError):  # guides that cannot be vectorized
            draws = [latent(poutine.trace(guide_fn).get_trace(x)) for _ in range(num_samples)]
            samples = {k: torch.stack([d[k] for d in draws]).unsqueeze(0) for k in shapes}
    log_lik = {}
    if callable(getattr(family, "pointwise_log_likelihood", None)):
        try:
            log_lik = {"x": family.pointwise_log_likelihood(samples, x)}
        except (KeyError, MissingCapability):
            log_lik = {}
    return samples, log_lik
