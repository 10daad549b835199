"""The EM and CAVI engines: one body over the family's :class:`~elbolab.models.capabilities.CoordinateAscent`.

As in scikit-learn's mixture code, EM and CAVI differ only in the algorithm object the family
returns (``family.em()`` or ``family.cavi()``); the loop, its stopping rule, restarts and the
handling of a non-finite objective are :func:`elbolab.models.ascent.ascend`'s.
"""

from __future__ import annotations

import copy
import math

import torch

from elbolab.inference.result import FitResult, data_fields
from elbolab.inference.runtime import Timer, isolated
from elbolab.models.ascent import AscentSettings, ascend
from elbolab.models.capabilities import ClosedFormCAVI, ClosedFormEM, require
from elbolab.models.numerics import one_thread
from elbolab.models.program import as_family

#: engine name -> (capability, how the family hands out its algorithm)
_ALGORITHMS = {
    "em": (ClosedFormEM, lambda family: family.em()),
    "cavi": (ClosedFormCAVI, lambda family: family.cavi()),
}


def fit_closed_form(engine: str, family, x, settings: AscentSettings | None, seed: int) -> FitResult:
    """Run the family's closed-form algorithm for ``engine`` ("em" or "cavi") to convergence.

    ``FitResult.state`` is the algorithm's own dataclass state; ``posterior`` its ``posterior``.
    """
    family = as_family(family)  # a plain program: the error below names what it lacks
    capability, get = _ALGORITHMS[engine]
    require(family, capability, engine.upper())
    if settings is None:
        settings = AscentSettings()
    elif not isinstance(settings, AscentSettings):
        raise TypeError(
            f"settings: {engine} takes inference.{engine}.Settings (AscentSettings), got "
            f"{type(settings).__name__}"
        )
    family = copy.deepcopy(family)  # a fit never changes the caller's family
    x = family.check_data(x)
    algo = get(family)
    with isolated(seed), one_thread(x), Timer(x.device) as timer:
        gen = torch.Generator().manual_seed(seed)
        run = ascend(
            lambda g: algo.init(x, g),
            lambda s: algo.step(x, s),
            lambda s: algo.objective(x, s),
            x.shape[0],
            settings,
            gen,
            label=engine,
        )
        if not math.isfinite(run.trace[-1]):  # every restart started at a non-finite objective
            big = float(x.detach().abs().max())
            raise ValueError(
                f"x: the {engine} objective of the {family.name} family is {run.trace[-1]} at its "
                f"start on these data ({str(x.dtype).removeprefix('torch.')}, |x| up to "
                f"{big:.3g}): no finite answer; rescale the data or use float64")
        posterior = algo.posterior(x, run.state)
    return FitResult(
        **data_fields(family, x, seed),
        engine=engine,
        guide=algo.guide,
        bound=algo.bound,
        elbo=run.trace[-1],
        elbo_se=0.0,
        trace=run.trace,
        posterior=posterior,
        seconds=timer.seconds,
        converged=run.converged,
        message=run.message,
        settings={**family.settings(), **vars(settings)},
        diagnostics={"max_decrease": run.max_decrease, "restart": run.restart},
        state=run.state,
    )
