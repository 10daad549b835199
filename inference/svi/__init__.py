"""The SVI engine: stochastic variational inference with Pyro, for any family and any guide.

``engine.py`` ``fit`` (the engine); ``settings.py`` its settings; ``loop.py`` the loop
(``run_svi``); ``steps.py`` one step (Pyro's ELBO or the direct torch step) and the optimizer
(``sparse_adam.py``); ``run.py`` the run's record and convergence test; ``state.py`` what a fit
keeps; ``pair.py`` the model/guide pair (coverage, parameters, posterior draws);
``checkpoint.py`` resumable runs; ``distributed.py`` and ``ddp.py`` data-parallel runs on
Lightning; ``train_vae.py`` the VAE's training path.
"""

from elbolab.inference.svi.engine import fit
from elbolab.inference.svi.loop import run_svi
from elbolab.inference.svi.run import SviRun
from elbolab.inference.svi.settings import Settings
from elbolab.inference.svi.state import SviState, resolve_guide
from elbolab.inference.svi.steps import direct_step

__all__ = ["Settings", "SviRun", "SviState", "direct_step", "fit", "resolve_guide", "run_svi"]
