"""Training a VAE (decoder and encoder together) by minibatch SVI, in epochs.

:func:`train_vae` is :func:`elbolab.inference.svi.fit` with the settings a VAE is trained with: Adam on
minibatches of ``batch_size`` (the plate's N/B scaling), ``epochs`` of ceil(n / batch_size)
steps, optional early stopping on a held-out ELBO and checkpoints. Guides that give q(z_n | x_n)
as ``distribution(x, idx)`` (:func:`elbolab.guides.amortized.supports_direct`) are trained with the
engine's torch-native step (same estimator as Pyro's ``Trace_ELBO``, ~1.5x faster on small
networks; see ``bench/vae_throughput.py``); any other guide goes through Pyro's ELBO.

Early stopping. With ``val_data``, the held-out ELBO per datum (``val_particles`` draws per point,
default 100) is evaluated every ``eval_every_epochs``; after ``patience`` evaluations without a
new best the run stops and the best evaluation's parameters are restored (also at the ``epochs``
cap). ``epochs`` is then a cap, not a budget. :func:`training_outcome` says how a run ended: early
stopped (step, best held-out ELBO and its step) or at the cap (with the slope of the training
ELBO over the last window, the engine's convergence test), or diverged.
"""

from __future__ import annotations

import math

import torch

from elbolab import guides
from elbolab.guides.amortized import supports_direct
from elbolab.guides.base import GuideSpec
from elbolab.inference.result import FitResult
from elbolab.inference.svi import engine as svi
from elbolab.models.validate import integer

#: how a VAE is trained unless said otherwise (single-draw ELBO, constant Adam rate, no draws
#: from q kept); other ``elbolab.inference.svi.Settings`` fields keep the engine's defaults
VAE_DEFAULTS = {"num_particles": 1, "lr_decay": 1.0,
                "num_posterior_samples": 0, "val_particles": 100}


def train_vae(family, x, *, guide="mlp", guide_options: dict | None = None, epochs: int = 50,
              batch_size: int = 128, lr: float = 1e-3, val_data=None, eval_every_epochs: int = 1,
              patience: int = 0, checkpoint=None, checkpoint_every_epochs: int = 0,
              checkpoint_every: int = 0, resume=None, eval_particles: int = 100, seed: int = 0,
              progress: bool = False, **settings) -> FitResult:
    """Train ``family``'s decoder and the encoder ``guide`` by SVI (Adam, minibatches of
    ``batch_size`` with the plate's N/B scaling) through :func:`elbolab.inference.svi.fit`; epochs become
    steps of ceil(n / batch_size).

    With ``val_data`` and ``patience`` it stops early on the held-out ELBO (evaluated every
    ``eval_every_epochs``) and restores the best parameters; ``checkpoint`` (a path) gets the
    param store's tensors every ``checkpoint_every_epochs`` (or every ``checkpoint_every`` steps;
    a resumable checkpoint of :mod:`elbolab.inference.svi.checkpoint`), and ``resume`` (such a checkpoint's
    path, from a run with the same arguments) continues it.
    ``strategy="ddp"`` or ``"ddp_spawn"`` with ``devices`` (and ``num_nodes``, ``accelerator``)
    trains data-parallel on Lightning (:mod:`elbolab.inference.svi.distributed`; ``batch_size`` is the
    global batch, a multiple of the processes; no held-out evaluation).
    ``family``'s decoder ends with the trained weights (on the data's device and dtype), so a
    second call continues training. Returns the engine's FitResult (``state.guide`` is the
    trained encoder, ``state.family`` the engine's fitted copy of ``family``). Other keyword
    arguments are fields of ``elbolab.inference.svi.Settings`` (unknown names are errors there), over
    :data:`VAE_DEFAULTS`; ``direct`` defaults to whether the built guide supports the
    torch-native step (:func:`direct_capable`).
    """
    x = family.check_data(x)
    n = x.shape[0]
    epochs = integer(epochs, "epochs", minimum=1)
    batch = min(integer(batch_size, "batch_size", minimum=1), n)
    eval_every_epochs = integer(eval_every_epochs, "eval_every_epochs", minimum=0)
    checkpoint_every_epochs = integer(checkpoint_every_epochs, "checkpoint_every_epochs", minimum=0)
    checkpoint_every = integer(checkpoint_every, "checkpoint_every", minimum=0)
    per_epoch = math.ceil(n / batch)
    with_val = val_data is not None and eval_every_epochs > 0
    strategy = settings.get("strategy")
    if strategy == "none":  # the command line's name for one process
        strategy = settings["strategy"] = None
    if strategy is not None and val_data is not None:
        raise ValueError(f"val_data: held-out evaluation and early stopping are not available "
                         f"with strategy={strategy!r} (a fixed number of epochs is trained)")
    if "direct" not in settings:  # the distributed trainer runs Pyro's ELBO
        settings["direct"] = strategy is None and direct_capable(family, x, guide, guide_options)
    s = svi.Settings(
        num_steps=epochs * per_epoch, lr=lr, subsample_size=batch if batch < n else None,
        val_data=val_data if with_val else None,
        eval_every=eval_every_epochs * per_epoch if with_val else 0,
        patience=patience if with_val else 0, checkpoint=checkpoint,
        checkpoint_every=(checkpoint_every or checkpoint_every_epochs * per_epoch) if checkpoint
        else 0,
        eval_particles=eval_particles, eval_batch=min(eval_particles, 50), progress=progress,
        **{**VAE_DEFAULTS, **settings},
    )
    res = svi.fit(family, x, s, seed=seed, guide=guide, guide_options=guide_options,
                  resume=resume)
    if res is None:
        return None  # a distributed process other than global rank 0
    # the engine fits a copy of the family; a VAE owns its decoder, so it keeps the trained one
    family.to(x).load_state_dict(res.state.family.state_dict())
    return res


def training_outcome(result: FitResult) -> dict:
    """How an SVI training run ended, as plain values for a summary row.

    ``training_end``: ``"early-stopped"`` (the held-out ELBO had not improved for ``patience``
    evaluations), ``"converged"`` (the ``tol`` slope test stopped it), ``"diverged"``, or
    ``"step-cap"`` (ran all its steps); ``training_steps``; ``best_val_elbo_per_datum`` and
    ``best_val_step`` (the held-out evaluation whose parameters were kept; NaN / -1 without held-
    out data); ``train_slope_per_window`` +- ``train_slope_se``: the projected gain of the training
    ELBO over one more window of ``window`` steps (nats/datum; NaN when not measured), and
    ``training_note``, one sentence saying all that.
    """
    run = getattr(result.state, "run", None)
    if result.engine != "svi" or run is None:
        raise ValueError(f"result: training_outcome needs an SVI fit, got a {result.engine} fit")
    window = int(result.settings.get("window", 0) or 0)
    best_step, best_val = -1, math.nan
    if run.val_trace:
        best_step, best_val = max(run.val_trace, key=lambda sv: sv[1])
    if run.diverged:
        end = "diverged"
    elif run.stopped_early:
        end = "early-stopped"
    elif run.message.startswith("converged at step"):
        end = "converged"
    else:
        end = "step-cap"
    best = (f"best held-out ELBO {best_val:.4f} nats/datum at step {best_step} (those weights "
            "kept)" if run.val_trace else "no held-out evaluation")
    slope = (f"training ELBO slope {run.slope:+.4f} +- {run.slope_se:.4f} nats/datum per "
             f"{window} steps" if math.isfinite(run.slope) else
             f"training ELBO slope not measured (fewer steps than one window of {window})")
    if end == "early-stopped":
        note = f"early-stopped at step {run.steps}; {best}"
    elif end == "step-cap":
        note = f"reached the cap of {run.steps} steps; {slope}; {best}"
    else:
        note = f"{run.message}; {best}"
    strategy = result.settings.get("strategy")
    if strategy is not None and end != "diverged":
        world = int(result.settings.get("devices", 1)) * int(result.settings.get("num_nodes", 1))
        note += f"; trained on {world} processes ({strategy})"
    return {"training_end": end, "training_steps": int(run.steps),
            "best_val_elbo_per_datum": float(best_val), "best_val_step": int(best_step),
            "train_slope_per_window": float(run.slope), "train_slope_se": float(run.slope_se),
            "training_note": note}


def direct_capable(family, x, guide, guide_options: dict | None = None) -> bool:
    """Whether ``guide`` (a name of the family's guides, a GuideSpec or a built guide), built for
    ``family`` and ``x``, supports the torch-native SVI step. A name or spec is built once on a
    forked random state, so the training run's draws are unchanged."""
    if callable(guide) and not isinstance(guide, GuideSpec):
        return supports_direct(guide)
    if isinstance(guide, GuideSpec):
        spec = guide
    else:
        specs = guides.for_family(family)
        name = guide or guides.default_for(family)
        if name not in specs:
            return False  # the engine names the error
        spec = specs[name]
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        return supports_direct(spec.build(family, x, **(guide_options or {})))


__all__ = ["VAE_DEFAULTS", "direct_capable", "train_vae", "training_outcome"]
