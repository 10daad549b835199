"""The MCMC engine: NUTS (Pyro) over the model's continuous latents, the reference posterior.

``nuts.py`` ``fit``, ``run_nuts`` and the convergence diagnostics of a run.
"""

from elbolab.inference.mcmc.nuts import (
    NutsRun,
    Settings,
    convergence,
    fit,
    invariant_diagnostics,
    run_nuts,
)

__all__ = ["NutsRun", "Settings", "convergence", "fit", "invariant_diagnostics", "run_nuts"]
