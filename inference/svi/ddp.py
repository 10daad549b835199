"""Distributed data-parallel SVI with PyTorch Lightning (Pyro's documented route: a
LightningModule around the ELBO, Lightning's DDP strategy).

For any family whose data sit in one plate named ``"data"`` (the VAE, the GMM, factor analysis,
a user's model), with any guide of ``elbolab.guides.for_family(family)``::

    from elbolab.inference.svi.ddp import fit_ddp
    run = fit_ddp(vae, x, guide="mlp", devices=2, num_steps=2000, subsample_size=256, lr=1e-3)
    run.trace        # the all-reduced ELBO estimate of every step (nats, total over the data)
    run.params       # the fitted parameters (Pyro param store names -> tensors)

What one step does, on W processes (ranks; ``devices`` x ``num_nodes``): the global minibatch of
step t, B = ``subsample_size`` distinct indices drawn from a generator seeded by (seed, t)
(:func:`elbolab.models.numerics.minibatch_indices`), is split into W shards of B / W rows (rank r takes
rows r, r + W, ...). Rank r seeds torch with (seed, t, r), conditions the plate's subsample site
on its shard (so the model and the guide see exactly those rows, each term scaled by n / (B/W))
and computes its ELBO estimate L_r; DDP averages the gradients, so every rank applies the gradient
of (1/W) sum_r L_r = (n/B) sum_{i in batch} [...], the unbiased minibatch estimate of the ELBO
over the global batch, with the engine's optimizer (:func:`elbolab.inference.svi.steps.adam`:
ClippedAdam, same rate, decay and clipping as ``elbolab.inference.fit("svi", ...)``). All ranks start
from the same parameters (built with the same seed; DDP also broadcasts rank 0's) and apply the
same all-reduced gradients, so they stay identical. The logged ELBO is the all-reduced one,
(1/W) sum_r L_r, gathered from every rank.

:func:`fit_single` computes the same steps in one process (the W shard losses of each step
averaged before one backward pass): what the distributed run must equal, up to the order of the
floating-point sums in the all-reduce.

Launch: ``strategy="ddp_spawn"`` (default; works from a function call, a notebook or a test:
processes are spawned and the result comes back through a file written by rank 0) or
``strategy="ddp"`` (Lightning's launcher re-runs the command in each process, or ``torchrun`` /
SLURM start them: every process calls :func:`fit_ddp`, rank 0 returns the result). Needs
``lightning`` (``pip install 'elbolab[ddp]'``); CPU processes use the gloo backend, GPUs NCCL.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pyro
import torch
from pyro import poutine
from torch import nn

from elbolab.inference.runtime import isolated, seed_everything
from elbolab.inference.svi.settings import Settings
from elbolab.inference.svi.state import resolve_guide
from elbolab.inference.svi.steps import adam, make_loss
from elbolab.models.numerics import minibatch_indices
from elbolab.models.validate import choice, integer

RESULT_FILE = "ddp_result.pt"
STRATEGIES = ("ddp_spawn", "ddp", "auto")


@dataclass
class DdpRun:
    """The outcome of :func:`fit_ddp` / :func:`fit_single`: fitted parameters (constrained values
    by Pyro param name, on the CPU; ``unconstrained``: the optimized tensors), the all-reduced ELBO estimate of each step (nats, total), the
    largest difference of any parameter between ranks at the end (0 when they stayed identical),
    the number of processes and the wall time."""

    params: dict[str, torch.Tensor]
    trace: list[float]
    rank_spread: float
    world_size: int
    seconds: float = math.nan
    settings: dict = field(default_factory=dict)
    unconstrained: dict[str, torch.Tensor] = field(default_factory=dict)


def _step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7919 + rank) % (2**63 - 1)


def global_batch(n: int, size: int, seed: int, step: int) -> torch.Tensor:
    """The B = ``size`` distinct indices of step ``step`` (the same on every rank)."""
    g = torch.Generator().manual_seed(_step_seed(seed, step, 10**6))
    idx = minibatch_indices(n, size, generator=g)
    return torch.arange(n) if idx is None else idx


class _Pair:
    """Model, guide and loss of one process, with parameters created and held as nn.Parameters
    (so DDP can all-reduce their gradients): the shard loss of a step."""

    def __init__(self, family, x, spec, guide_options, settings: Settings, seed: int):
        self.family, self.x, self.settings = family, x, settings
        pyro.clear_param_store()
        seed_everything(seed)
        self.guide = spec.build(family, x, **(guide_options or {}))
        enum = spec.collapsed or spec.enumerated
        self.loss = make_loss(settings, enum, family.max_plate_nesting)
        first = torch.arange(min(2, x.shape[0]))
        with torch.no_grad(), pyro.validation_enabled(False):
            self.shard_loss(first)  # creates every param of the model and the guide
        store = pyro.get_param_store()
        state = store.get_state()
        params = {k: v if isinstance(v, nn.Parameter) else nn.Parameter(v.detach())
                  for k, v in state["params"].items()}
        store.clear()
        store.set_state({"params": params, "constraints": state["constraints"]})
        self.names = sorted(params)
        self.parameters = [params[k] for k in self.names]

    def shard_loss(self, idx: torch.Tensor) -> torch.Tensor:
        """-ELBO estimate from the rows ``idx`` (each term scaled by n / len(idx))."""
        idx = idx.to(self.x.device)
        data = {"data": idx}
        kw = {"subsample_size": len(idx)}
        with pyro.validation_enabled(self.settings.validate):
            return self.loss.differentiable_loss(
                poutine.condition(self.family.model, data=data),
                poutine.condition(self.guide, data=data), self.x, **kw)

    def constrained(self) -> dict[str, torch.Tensor]:
        store = pyro.get_param_store()
        return {k: store[k].detach().cpu().clone() for k in self.names}

    def unconstrained(self) -> dict[str, torch.Tensor]:
        """The optimized tensors themselves (loading these loses nothing at a constraint's
        boundary, where inverting a constrained value can give an infinity)."""
        u = dict(pyro.get_param_store().named_parameters())
        return {k: u[k].detach().cpu().clone() for k in self.names}


def _check(family, x, settings, devices, num_nodes):
    x = family.check_data(x)
    world = integer(devices, "devices", minimum=1) * integer(num_nodes, "num_nodes", minimum=1)
    batch = settings.objective.subsample_size
    if batch is None:
        raise ValueError("subsample_size: distributed SVI needs a global minibatch size")
    if batch % world or batch > x.shape[0]:
        raise ValueError(f"subsample_size: {batch} must be a multiple of the {world} processes "
                         f"and at most the {x.shape[0]} data points")
    return x, world


def fit_single(family, x, settings: Settings | None = None, *, world_size: int = 2, seed: int = 0,
               guide=None, guide_options: dict | None = None, **flat) -> DdpRun:
    """The steps of :func:`fit_ddp` with ``world_size`` shards, computed in this process: the
    reference a distributed run must equal."""
    settings = settings or Settings(**flat)
    family = copy.deepcopy(family)  # a fit never changes the caller's family (a VAE's decoder)
    x, world = _check(family, x, settings, world_size, 1)
    spec = resolve_guide(family, guide)
    t0 = time.perf_counter()
    with isolated(seed):
        pair = _Pair(family, x, spec, guide_options, settings, seed)
        opt = adam(pair.parameters, settings, settings.stopping.num_steps)
        trace, b = [], settings.objective.subsample_size
        for t in range(settings.stopping.num_steps):
            idx = global_batch(x.shape[0], b, seed, t)
            losses = []
            for r in range(world):
                torch.manual_seed(_step_seed(seed, t, r))
                losses.append(pair.shard_loss(idx[r::world]))
            loss = torch.stack(losses).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            trace.append(-float(loss.detach()))
        params, free = pair.constrained(), pair.unconstrained()
    return DdpRun(params, trace, 0.0, world, time.perf_counter() - t0, settings.flat(), free)


try:  # optional: pip install 'elbolab[ddp]'
    import lightning as L
except ImportError:  # pragma: no cover - depends on the install
    L = None


def _all_reduce(t: torch.Tensor, op: str) -> torch.Tensor:
    """A blocking all-reduce (sum, max or min) of a copy of ``t`` over the process group (``t``
    itself when there is none)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return t
    out = t.clone()
    dist.all_reduce(out, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                             "min": dist.ReduceOp.MIN}[op])
    return out


def _lightning():
    if L is None:  # pragma: no cover - depends on the install
        raise ImportError("strategy: distributed SVI needs PyTorch Lightning; install it with "
                          "pip install 'elbolab[ddp]' (or pip install lightning)")
    return L


if L is not None:

    class OwnedGroupDDP(L.pytorch.strategies.DDPStrategy):
        """Lightning's DDP strategy, which also destroys the process group it created when the
        run ends. Lightning leaves a gloo group alive until the process exits; its worker
        threads then release their tensors while the interpreter is being finalized, and a
        rank dies with SIGABRT ("terminate called without an active exception") when that
        happens late, i.e. under load (pytorch/pytorch#190489). A group that existed before
        (a user's own ``init_process_group``) is left alone."""

        def setup_environment(self) -> None:
            self._owns_group = not torch.distributed.is_initialized()
            super().setup_environment()

        def teardown(self) -> None:
            super().teardown()
            if getattr(self, "_owns_group", False) and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
                self._owns_group = False

    class SviModule(L.LightningModule):
        """The ELBO of a family's model and a guide as a LightningModule (one global minibatch
        per training step, sharded across the ranks; see the module docstring). Module-level so
        spawned processes can unpickle it."""

        def __init__(self, family, x, guide, guide_options, settings, seed, out):
            super().__init__()
            # the guide goes by name where it has one: a family's composed guides are closures,
            # rebuilt in each process rather than pickled
            self.ctx = (family, x, guide, guide_options, settings, seed, str(out))
            self.pair: _Pair | None = None
            self.params = nn.ParameterList()
            self.trace: list[float] = []

        def setup(self, stage: str) -> None:
            family, x, guide, opts, settings, seed, _ = self.ctx
            # spawned processes receive the family's tensors in shared memory: every rank would
            # update one decoder; each rank trains its own copy
            family = copy.deepcopy(family)
            # each rank computes on its own device (cuda:<local rank> on GPUs), not the caller's
            x = x.to(self.trainer.strategy.root_device)
            self.pair = _Pair(family, x, resolve_guide(family, guide), opts, settings, seed)
            self.params = nn.ParameterList(self.pair.parameters)

        def configure_optimizers(self):
            settings = self.ctx[4]
            return adam(list(self.params), settings, settings.stopping.num_steps)

        def training_step(self, batch, batch_idx):
            family, x, _, _, settings, seed, _ = self.ctx
            world, rank = self.trainer.world_size, self.global_rank
            step = int(batch[0])
            idx = global_batch(x.shape[0], settings.objective.subsample_size, seed, step)
            torch.manual_seed(_step_seed(seed, step, rank))
            loss = self.pair.shard_loss(idx[rank::world])
            elbo = -_all_reduce(loss.detach(), "sum") / world  # the all-reduced estimate
            self.trace.append(float(elbo))
            self.log("elbo", elbo, on_step=True, prog_bar=True)
            return loss

        def on_train_end(self) -> None:
            flat = torch.cat([p.detach().reshape(-1) for p in self.params])
            diff = _all_reduce(flat, "max") - _all_reduce(flat, "min")  # elementwise across ranks
            spread = float(diff.max())
            sizes = [p.numel() for p in self.params]
            by_name = {k: float(d.max()) for k, d in zip(self.pair.names, diff.split(sizes))}
            if self.global_rank == 0:
                torch.save({"params": self.pair.constrained(),
                            "unconstrained": self.pair.unconstrained(),
                            "spread_by_param": by_name,
                            "trace": torch.tensor(self.trace, dtype=torch.float64),
                            "rank_spread": torch.tensor(spread),
                            "world_size": torch.tensor(self.trainer.world_size)},
                           Path(self.ctx[6]) / RESULT_FILE)


@contextlib.contextmanager
def _quiet(progress: bool):
    """Lightning's informational lines (accelerator found, tips) and its LeafSpec deprecation
    warning off for the fit in this process, unless ``progress``; restored afterwards."""
    if progress:
        yield
        return
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch.utilities.rank_zero",
                                              "lightning.fabric.utilities.rank_zero")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        for lg in loggers:
            lg.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


@contextlib.contextmanager
def _environment_kept():
    """The caller's environment variables as they were, after Lightning set its own
    (``MASTER_PORT``, ranks): a later run picks a free port of its own instead of reusing this
    one, and a fit leaves the caller's global state as it found it."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        for key in set(os.environ) - set(saved):
            del os.environ[key]
        os.environ.update(saved)


def _check_picklable(family, guide, guide_options, settings) -> None:
    """ddp_spawn sends the family, guide and settings to new processes by pickling: what cannot
    be pickled is an error naming it, before any process starts."""
    import pickle

    for name, obj in (("family", family), ("guide", guide), ("guide_options", guide_options),
                      ("settings", settings)):  # the data are a tensor: they always pickle
        try:
            pickle.dumps(obj)
        except Exception as exc:  # pickling raises many types (AttributeError, TypeError, ...)
            raise ValueError(
                f"{name}: strategy='ddp_spawn' sends it to new processes by pickling, which "
                f"failed ({str(exc)[:160]}); define it at module level of an importable file, "
                "pass the guide by name, or use strategy='ddp' under a launcher") from None


def fit_ddp(family, x, settings: Settings | None = None, *, guide=None,
            guide_options: dict | None = None, devices: int = 2, num_nodes: int = 1,
            accelerator: str = "cpu", strategy: str = "ddp_spawn", seed: int = 0,
            out: str | Path | None = None, progress: bool = False, **flat) -> DdpRun | None:
    """Distributed data-parallel SVI of ``guide`` on ``family.model`` and data ``x`` over
    ``devices`` processes per node on ``num_nodes`` nodes (Lightning's DDP; see the module
    docstring). ``settings`` (or flat names, as ``elbolab.inference.fit``): ``num_steps``,
    ``subsample_size`` (the global batch, a multiple of the number of processes), ``lr``,
    ``lr_decay``, ``clip_norm``, ``num_particles``. ``out``: where rank 0 writes
    ``ddp_result.pt`` (default a temporary folder). Returns the run on rank 0 (None on the others).
    """
    _lightning()
    settings = settings or Settings(**flat)
    if isinstance(strategy, str):
        strategy = choice(strategy, "strategy", STRATEGIES)
    accelerator = choice(accelerator, "accelerator", ("cpu", "gpu", "cuda", "auto"))
    family = copy.deepcopy(family)  # a fit never changes the caller's family (a VAE's decoder)
    family_x, world = _check(family, x, settings, devices, num_nodes)
    resolve_guide(family, guide)  # an unknown guide is an error here, before any process starts
    if strategy == "ddp_spawn":
        if num_nodes != 1:
            raise ValueError("num_nodes: several nodes need strategy='ddp' (one process per "
                             "device, started on every node); ddp_spawn runs on one node")
        _check_picklable(family, guide, guide_options, settings)
    tmp = None
    if out is None:
        tmp = tempfile.TemporaryDirectory(prefix="elbolab-ddp-")
        out = tmp.name
    Path(out).mkdir(parents=True, exist_ok=True)
    steps = settings.stopping.num_steps
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(steps)),
                                         batch_size=1, shuffle=False)
    module = SviModule(family, family_x, guide, guide_options, settings, seed, out)
    if isinstance(strategy, str) and strategy != "auto":
        strategy = OwnedGroupDDP(start_method="spawn" if strategy == "ddp_spawn" else "popen")
    t0 = time.perf_counter()
    with _quiet(progress), _environment_kept():
        trainer = L.Trainer(
            accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy,
            max_steps=steps, max_epochs=1, use_distributed_sampler=False, logger=False,
            enable_checkpointing=False, enable_progress_bar=progress,
            enable_model_summary=False, num_sanity_val_steps=0)
        with isolated(seed):  # rank 0 may be this process: keep the caller's param store, RNG
            trainer.fit(module, train_dataloaders=loader)
    seconds = time.perf_counter() - t0
    if trainer.global_rank != 0:
        return None
    payload = torch.load(Path(out) / RESULT_FILE, weights_only=True)
    if tmp is not None:
        tmp.cleanup()
    return DdpRun(dict(payload["params"]), [float(v) for v in payload["trace"]],
                  float(payload["rank_spread"]), int(payload["world_size"]), seconds,
                  settings.flat(), dict(payload["unconstrained"]))


__all__ = ["DdpRun", "RESULT_FILE", "SviModule", "fit_ddp", "fit_single", "global_batch"]
