"""Training a VAE (decoder and encoder together) by minibatch SVI, in epochs.

:func:`train_vae` is :func:`inference.svi.fit` with the settings a VAE is trained with: Adam on
minibatches of ``batch_size`` (the plate's N/B scaling), ``epochs`` of ceil(n / batch_size)
steps, optional early stopping on a held-out ELBO and checkpoints. Guides that give q(z_n | x_n)
as ``distribution(x, idx)`` (:func:`guides.amortized.supports_direct`) are trained with the
engine's torch-native step (same estimator as Pyro's ``Trace_ELBO``, ~1.5x faster on small
networks; see ``bench/vae_throughput.py``); any other guide goes through Pyro's ELBO.
"""

from __future__ import annotations

import math

import torch

import guides
from guides.amortized import supports_direct
from guides.base import GuideSpec
from inference import svi
from inference.result import FitResult
from models.validate import integer

#: how a VAE is trained unless said otherwise (single-draw ELBO, constant Adam rate, no draws
#: from q kept); other ``inference.svi.Settings`` fields keep the engine's defaults
VAE_DEFAULTS = {"num_particles": 1, "lr_decay": 1.0, "snapshot_every": 50,
                "num_posterior_samples": 0}


def train_vae(family, x, *, guide="mlp", guide_options: dict | None = None, epochs: int = 50,
              batch_size: int = 128, lr: float = 1e-3, val_data=None, eval_every_epochs: int = 1,
              patience: int = 0, checkpoint=None, checkpoint_every_epochs: int = 0,
              eval_particles: int = 100, seed: int = 0, progress: bool = False,
              **settings) -> FitResult:
    """Train ``family``'s decoder and the encoder ``guide`` by SVI (Adam, minibatches of
    ``batch_size`` with the plate's N/B scaling) through :func:`inference.svi.fit`; epochs become
    steps of ceil(n / batch_size).

    With ``val_data`` and ``patience`` it stops early on the held-out ELBO (evaluated every
    ``eval_every_epochs``) and restores the best parameters; ``checkpoint`` (a path) gets the
    param store's tensors every ``checkpoint_every_epochs`` (state dicts, ``weights_only``).
    ``family``'s decoder ends with the trained weights (on the data's device and dtype), so a
    second call continues training. Returns the engine's FitResult (``state.guide`` is the
    trained encoder, ``state.family`` the engine's fitted copy of ``family``). Other keyword
    arguments are fields of ``inference.svi.Settings`` (unknown names are errors there), over
    :data:`VAE_DEFAULTS`; ``direct`` defaults to whether the built guide supports the
    torch-native step (:func:`direct_capable`).
    """
    x = family.check_data(x)
    n = x.shape[0]
    epochs = integer(epochs, "epochs", minimum=1)
    batch = min(integer(batch_size, "batch_size", minimum=1), n)
    eval_every_epochs = integer(eval_every_epochs, "eval_every_epochs", minimum=0)
    checkpoint_every_epochs = integer(checkpoint_every_epochs, "checkpoint_every_epochs", minimum=0)
    per_epoch = math.ceil(n / batch)
    with_val = val_data is not None and eval_every_epochs > 0
    if "direct" not in settings:
        settings["direct"] = direct_capable(family, x, guide, guide_options)
    s = svi.Settings(
        num_steps=epochs * per_epoch, lr=lr, subsample_size=batch if batch < n else None,
        val_data=val_data if with_val else None,
        eval_every=eval_every_epochs * per_epoch if with_val else 0,
        patience=patience if with_val else 0, checkpoint=checkpoint,
        checkpoint_every=checkpoint_every_epochs * per_epoch if checkpoint else 0,
        eval_particles=eval_particles, eval_batch=min(eval_particles, 50), progress=progress,
        **{**VAE_DEFAULTS, **settings},
    )
    res = svi.fit(family, x, s, seed=seed, guide=guide, guide_options=guide_options)
    # the engine fits a copy of the family; a VAE owns its decoder, so it keeps the trained one
    family.to(x).load_state_dict(res.state.family.state_dict())
    return res


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


__all__ = ["VAE_DEFAULTS", "direct_capable", "train_vae"]
