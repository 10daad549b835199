"""Which NUTS kernel runs, chosen from declared capabilities (``Settings.kernel``), and the checks
a declared potential passes before any step.

:func:`choose` reads :class:`~elbolab.models.capabilities.CompiledPotential` and
:class:`~elbolab.models.capabilities.BatchedPotential` and the data's device, never guesses;
:func:`check_start` checks the starting points and the potential's shapes and values there.
"""

from __future__ import annotations

import numpy as np
import torch

from elbolab.inference.mcmc.potential import trace_potential
from elbolab.models.capabilities import BatchedPotential, CompiledPotential

KERNEL_NOTES = {"compiled": "compiled kernel, each trajectory in machine code",
                "batched": "batched kernel, chains in one computation", "pyro": "Pyro NUTS"}


def check_start(flat, potential, state, chains: int) -> None:
    """The family's starting points and potential, before any step: ``init`` gives (C, D) with
    D = ``flat.dim``, the potential U (C,) and grad U (C, D), finite at every start (a chain
    started where U is NaN or inf never moves)."""
    C, D = chains, flat.dim
    if tuple(state.shape) != (C, D):
        raise ValueError(f"batched_potential: init({C}, generator) must give the starting "
                         f"points as ({C}, {D}) (chains, FlatPotential.dim), got "
                         f"{tuple(state.shape)}")
    try:
        U, g = (np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v)
                for v in potential(state))
    except (TypeError, ValueError, AttributeError, RuntimeError) as exc:
        raise ValueError(f"batched_potential: its potential failed on the ({C}, {D}) starting "
                         "points (it takes a torch tensor q (C, D) and gives torch tensors U "
                         f"(C,) and grad U (C, D)): {type(exc).__name__}: {exc}") from exc
    if U.shape != (C,) or g.shape != (C, D):
        raise ValueError(f"batched_potential: the potential of ({C}, {D}) points must give U "
                         f"({C},) and grad U ({C}, {D}), got {U.shape} and {g.shape}")
    bad = ~(np.isfinite(U) & np.isfinite(g).all(-1))
    if bad.any():
        c = int(np.flatnonzero(bad)[0])
        q = np.asarray(state[c].cpu() if isinstance(state, torch.Tensor) else state[c])
        raise ValueError(
            f"NUTS: U or its gradient is not finite at the start of chain {c}, q = "
            f"{np.array2string(q, precision=4, threshold=8)} (U = {float(U[c])!r}); start "
            "elsewhere (init_params), or check the potential there")


def flat_potential(family, model, x):
    """The family's declared potential, else one read from the model's own trace."""
    if isinstance(family, BatchedPotential):
        return family.batched_potential(x)
    return trace_potential(model, x, family.max_plate_nesting)


def choose(family, settings, fix_params, x) -> str:
    """Which kernel runs, from declared capabilities (``Settings.kernel``): "compiled" for a
    family declaring CompiledPotential with data on the CPU, "batched" for one declaring
    BatchedPotential (or asked for: the potential is then read from the model's trace by
    :func:`elbolab.inference.mcmc.potential.trace_potential`), else "pyro"."""
    if settings.kernel == "pyro" or settings.chain_method != "auto":
        return "pyro"  # a chain method names Pyro's kernel (Settings.chain_method)
    if settings.kernel != "auto" and fix_params is not None:
        raise ValueError(f"kernel: {settings.kernel!r} takes no fix_params (parameters fixed in "
                         "the model); use kernel='pyro'")
    compiled = isinstance(family, CompiledPotential)
    name = getattr(family, "name", type(family).__name__)
    if compiled and not isinstance(family, BatchedPotential) and settings.kernel != "batched":
        raise ValueError(f"kernel: {name!r} declares compiled_potential but no "
                         "batched_potential, which gives the compiled kernel its starting points "
                         "and site names (a FlatPotential: docs/api.md); declare it too, or use "
                         "kernel='pyro'")
    if settings.kernel == "compiled":
        if not compiled:
            raise ValueError(f"kernel: 'compiled' needs a family declaring CompiledPotential (a "
                             f"Numba potential, docs/api.md); {name!r} declares none: use "
                             "'batched' or 'pyro'")
        if x.device.type != "cpu":
            raise ValueError(f"kernel: 'compiled' runs on the CPU; the data are on {x.device}: "
                             "use 'batched' (chains on the device)")
        return "compiled"
    if settings.kernel == "batched":
        return "batched"
    if fix_params is not None:
        return "pyro"
    if compiled and x.device.type == "cpu":
        return "compiled"
    return "batched" if isinstance(family, BatchedPotential) else "pyro"


__all__ = ["KERNEL_NOTES", "check_start", "choose", "flat_potential"]
