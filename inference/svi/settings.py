"""Settings of the SVI engine, grouped by what they control.

``Settings`` holds six groups: :class:`Optimizer` (how parameters move), :class:`Objective`
(which ELBO estimator is differentiated), :class:`Stopping` (when the run ends and what counts as
converged), :class:`Checkpointing` (what is saved during the run), :class:`Evaluation` (how the
fitted pair is scored afterwards) and :class:`Distributed` (training over several processes). Flat keywords are accepted too and routed to their group, so
``Settings(num_steps=500, lr=0.01)`` reads as before; an unknown name is an error listing the
valid ones, and a setting that cannot apply to the chosen path is an error (checked where the path
is chosen, in :func:`elbolab.inference.svi.fit`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from elbolab.models.validate import boolean, integer, non_negative, positive


@dataclass
class Optimizer:
    """Adam with per-parameter gradient clipping; ``lr_decay`` is the total multiplicative decay
    of the learning rate over the run (geometric per step)."""

    lr: float = 0.02
    lr_decay: float = 0.1
    clip_norm: float | None = 10.0

    def __post_init__(self):
        positive(self.lr, "lr")
        positive(self.lr_decay, "lr_decay")
        if self.clip_norm is not None:
            positive(self.clip_norm, "clip_norm")


@dataclass
class Objective:
    """The differentiated estimator: ``num_particles`` draws per step, an optional minibatch
    (``subsample_size``), Pyro's ``Trace_ELBO`` (``TraceMeanField_ELBO`` with ``mean_field_kl``,
    compiled with ``jit``), or the torch-native step (``direct``: same estimator, no tracing;
    needs a :class:`~elbolab.models.capabilities.LocalDensities` family and a guide with
    ``distribution(x, idx)``). ``learn_model_params=False`` keeps the model's ``pyro.param``s
    fixed. ``skip_nonfinite``: instead of stopping, skip a step whose loss, gradient or update is
    not finite (a non-finite loss also undoes the update before it) and count them."""

    num_particles: int = 4
    subsample_size: int | None = None
    vectorize_particles: bool = True
    mean_field_kl: bool = False
    jit: bool = False
    direct: bool = False
    learn_model_params: bool = True
    skip_nonfinite: bool = False

    def __post_init__(self):
        for flag in ("vectorize_particles", "mean_field_kl", "jit", "direct", "learn_model_params",
                     "skip_nonfinite"):
            boolean(getattr(self, flag), flag)
        self.num_particles = integer(self.num_particles, "num_particles", minimum=1, maximum=100_000)
        if self.subsample_size is not None:
            self.subsample_size = integer(self.subsample_size, "subsample_size", minimum=1)
        if self.direct and (self.jit or self.mean_field_kl):
            bad = "jit" if self.jit else "mean_field_kl"
            raise ValueError(f"{bad}: does not apply with direct=True (the torch-native step)")


@dataclass
class Stopping:
    """``num_steps`` at most. Converged means the ELBO has stopped rising: the least-squares slope
    of the last ``window`` per-datum ELBO values, times ``window``, is below ``converged_tol``
    nats/datum by more than 2 standard errors of the slope (see ``elbolab.inference.svi.engine``). ``tol`` > 0
    stops the run as soon as that holds. ``val_data`` with ``eval_every`` and ``patience`` stops on
    the held-out ELBO and restores the best parameters."""

    num_steps: int = 3000
    tol: float = 0.0
    converged_tol: float = 2e-3
    window: int = 500
    val_data: Any = None
    val_particles: int = 20
    eval_every: int = 0
    patience: int = 0

    def __post_init__(self):
        self.num_steps = integer(self.num_steps, "num_steps", minimum=1)
        non_negative(self.tol, "tol")
        positive(self.converged_tol, "converged_tol")
        self.window = integer(self.window, "window", minimum=2)
        self.val_particles = integer(self.val_particles, "val_particles", minimum=1)
        self.eval_every = integer(self.eval_every, "eval_every", minimum=0)
        self.patience = integer(self.patience, "patience", minimum=0)
        if self.patience and not (self.eval_every and self.val_data is not None):
            raise ValueError("patience: early stopping needs val_data and eval_every > 0")


@dataclass
class Checkpointing:
    """Save the run every ``every`` steps to ``path`` (tensors only; resumable)."""

    path: Path | str | None = None
    every: int = 0

    def __post_init__(self):
        self.every = integer(self.every, "checkpoint_every", minimum=0)
        if self.every and self.path is None:
            raise ValueError("checkpoint: checkpoint_every > 0 needs a checkpoint path")


@dataclass
class Evaluation:
    """The reported ELBO of the fitted pair: ``eval_particles`` draws in vectorized batches of
    ``eval_batch``; ``num_posterior_samples`` draws from q for the ``samples`` of the result."""

    eval_particles: int = 1000
    eval_batch: int = 100
    num_posterior_samples: int = 200

    def __post_init__(self):
        self.eval_particles = integer(self.eval_particles, "eval_particles", minimum=2, maximum=10_000_000)
        self.eval_batch = integer(self.eval_batch, "eval_batch", minimum=1)
        self.num_posterior_samples = integer(self.num_posterior_samples, "num_posterior_samples", minimum=0)


#: distributed strategies (PyTorch Lightning's names)
STRATEGIES = ("ddp", "ddp_spawn")


@dataclass
class Distributed:
    """Data-parallel training with PyTorch Lightning's DDP (:mod:`elbolab.inference.svi.ddp`): ``strategy``
    None (this process), ``"ddp_spawn"`` (spawns the processes; works from a call, a notebook or a
    test) or ``"ddp"`` (Lightning's launcher, ``torchrun`` or SLURM start one process per device:
    every process runs the same program); ``devices`` processes per node on ``num_nodes`` nodes;
    ``accelerator`` ``"cpu"`` (gloo), ``"gpu"`` (NCCL) or ``"auto"`` (gpu when the data are on
    CUDA)."""

    strategy: str | None = None
    devices: int = 1
    num_nodes: int = 1
    accelerator: str = "auto"

    def __post_init__(self):
        if self.strategy == "none":  # the command line's name for None
            self.strategy = None
        if self.strategy is not None and self.strategy not in STRATEGIES:
            raise ValueError(f"strategy: must be None or one of {list(STRATEGIES)}, got "
                             f"{self.strategy!r}")
        self.devices = integer(self.devices, "devices", minimum=1)
        self.num_nodes = integer(self.num_nodes, "num_nodes", minimum=1)
        if self.accelerator not in ("auto", "cpu", "gpu"):
            raise ValueError(f"accelerator: must be 'auto', 'cpu' or 'gpu', got "
                             f"{self.accelerator!r}")
        if self.strategy == "ddp_spawn" and self.num_nodes != 1:
            raise ValueError("num_nodes: several nodes need strategy='ddp' (one process per "
                             "device, started on every node); ddp_spawn runs on one node")
        if self.strategy is None and (self.devices != 1 or self.num_nodes != 1):
            bad = "devices" if self.devices != 1 else "num_nodes"
            raise ValueError(f"{bad}: more than one process needs strategy='ddp' or "
                             f"'ddp_spawn'")
        if self.strategy is None and self.accelerator != "auto":
            raise ValueError("accelerator: applies to a distributed strategy only (one process "
                             "computes where the data are)")

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes


_GROUPS = {
    "optimizer": Optimizer,
    "objective": Objective,
    "stopping": Stopping,
    "checkpointing": Checkpointing,
    "evaluation": Evaluation,
    "distributed": Distributed,
}
#: flat keyword -> (group, field)
_FLAT = {f.name: (g, f.name) for g, cls in _GROUPS.items() for f in fields(cls)}
_FLAT["checkpoint"] = ("checkpointing", "path")
_FLAT["checkpoint_every"] = ("checkpointing", "every")
del _FLAT["path"], _FLAT["every"]


@dataclass(init=False)
class Settings:
    """SVI settings in six groups (see the module docstring); flat keywords are routed.

    Three run-time options sit outside the groups: ``validate`` (Pyro's distribution checks;
    data are validated at the boundary), ``progress`` (a tqdm bar on stderr that appears once a
    run has lasted :data:`elbolab.inference.runtime.PROGRESS_DELAY` seconds; ``None``, the default, shows
    it when stderr is a terminal or in a notebook, True/False force it) and ``threads`` (torch
    CPU threads for the fit, restored afterwards; one by default, because an SVI step is many
    ops on a few thousand elements that run several times faster on one thread than split over
    busy cores; ``None`` leaves torch's setting; ignored for data on a GPU and with a
    distributed ``strategy``)."""

    optimizer: Optimizer = field(default_factory=Optimizer)
    objective: Objective = field(default_factory=Objective)
    stopping: Stopping = field(default_factory=Stopping)
    checkpointing: Checkpointing = field(default_factory=Checkpointing)
    evaluation: Evaluation = field(default_factory=Evaluation)
    distributed: Distributed = field(default_factory=Distributed)
    validate: bool = False
    progress: bool | None = None
    threads: int | None = 1

    def __init__(self, *, optimizer=None, objective=None, stopping=None, checkpointing=None,
                 evaluation=None, distributed=None, validate: bool = False,
                 progress: bool | None = None, threads: int | None = 1, **flat):
        unknown = sorted(set(flat) - set(_FLAT))
        if unknown:
            raise TypeError(
                f"svi.Settings: unknown option(s) {unknown}; valid: {sorted(_FLAT)} or the groups "
                f"{sorted(_GROUPS)}, {', '.join(RUNTIME_OPTIONS)}"
            )
        given = {"optimizer": optimizer, "objective": objective, "stopping": stopping,
                 "checkpointing": checkpointing, "evaluation": evaluation,
                 "distributed": distributed}
        for group, cls in _GROUPS.items():
            kw = {f: flat[k] for k, (g, f) in _FLAT.items() if g == group and k in flat}
            obj = given[group]
            if obj is not None and not isinstance(obj, cls):
                raise TypeError(f"{group}: must be an svi.{cls.__name__}, got {type(obj).__name__}")
            if obj is not None and kw:
                raise TypeError(f"{group}: given both as a group and as flat options {sorted(kw)}")
            setattr(self, group, obj if obj is not None else cls(**kw))
        self.validate = boolean(validate, "validate")
        self.progress = None if progress is None else boolean(progress, "progress")
        self.threads = None if threads is None else integer(threads, "threads", minimum=1)

    def _runtime(self) -> dict:
        return {k: getattr(self, k) for k in RUNTIME_OPTIONS}

    FLAT_OPTIONS: tuple[str, ...] = ()

    def replace(self, **flat) -> Settings:
        """A copy with some flat options changed (validated like the constructor)."""
        current = {k: getattr(getattr(self, g), f) for k, (g, f) in _FLAT.items()}
        runtime = {k: flat.pop(k) if k in flat else v for k, v in self._runtime().items()}
        return Settings(**runtime, **{**current, **flat})

    def flat(self) -> dict:
        """Every option by its flat name (for run.json and result rows); ``val_data`` omitted."""
        out = {k: getattr(getattr(self, g), f) for k, (g, f) in _FLAT.items() if k != "val_data"}
        out["checkpoint"] = None if out["checkpoint"] is None else str(out["checkpoint"])
        return {**out, **self._runtime()}

    def as_dict(self) -> dict:
        """Grouped, as plain values."""
        d = {g: asdict(getattr(self, g)) for g in _GROUPS}
        d["stopping"].pop("val_data")
        d["checkpointing"]["path"] = (
            None if self.checkpointing.path is None else str(self.checkpointing.path))
        return {**d, **self._runtime()}


#: the options outside the groups (how the run is carried out, not what it computes)
RUNTIME_OPTIONS = ("validate", "progress", "threads")
FLAT_OPTIONS = tuple(sorted(_FLAT))
Settings.FLAT_OPTIONS = FLAT_OPTIONS
Settings.RUNTIME_OPTIONS = RUNTIME_OPTIONS

__all__ = ["FLAT_OPTIONS", "RUNTIME_OPTIONS", "STRATEGIES", "Checkpointing", "Distributed",
           "Evaluation", "Objective", "Optimizer", "Settings", "Stopping"]
