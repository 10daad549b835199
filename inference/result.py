"""The one result object every engine returns."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from elbolab.inference.tracing import site_is_plate, to_numpy
from elbolab.models.capabilities import BOUNDS

__all__ = ["BOUNDS", "FitResult", "check_settings", "data_fields", "site_is_plate", "to_numpy"]


class _Conditioned:
    """A family whose model has its global latents fixed (observed) at ``fixed``."""

    def __init__(self, family, fixed: dict):
        from pyro import poutine

        self.base, self.fixed = family, fixed
        self.name = f"{family.name} | globals fixed"
        self.max_plate_nesting = family.max_plate_nesting
        self.discrete_sites = family.discrete_sites
        # the globals take their values and leave the trace: densities are those of p(x, z | globals)
        self.model = poutine.block(poutine.condition(family.model, data=fixed), hide=list(fixed))

    def check_data(self, x):
        return self.base.check_data(x)

    def settings(self) -> dict:
        return {**self.base.settings(), "conditioned_on": sorted(self.fixed)}


def check_settings(settings, cls: type, engine: str):
    """``settings`` or ``cls()``; an error naming both when it is another engine's settings."""
    if settings is None:
        return cls()
    if not isinstance(settings, cls):
        raise TypeError(
            f"settings: the {engine} engine takes elbolab.inference.{engine}.Settings, got "
            f"{type(settings).__module__}.{type(settings).__name__}"
        )
    return settings


@dataclass
class FitResult:
    """What an engine produced, with everything needed to compare it with the others.

    ``elbo`` is in nats, summed over the ``n_data`` points and keeping every constant; ``bound``
    names which bound it is (see :data:`BOUNDS`). ``posterior`` holds point estimates or
    variational parameters (tensors); ``samples`` holds draws shaped ``(chain, draw, ...)`` and
    ``log_likelihood`` pointwise values shaped ``(chain, draw, n)``.

    ``state`` by engine: ``em``/``cavi``: the family algorithm's dataclass state (e.g.
    ``elbolab.models.gmm.fit.CaviState``); ``svi``: :class:`elbolab.inference.svi.state.SviState` (the fitted guide, the
    parameters, the guide spec and the run); ``mcmc``: :class:`elbolab.inference.mcmc.nuts.NutsRun`.
    """

    model: str
    engine: str
    guide: str
    bound: str
    n_data: int
    elbo: float = math.nan
    elbo_se: float = math.nan
    trace: list[float] = field(default_factory=list)
    posterior: dict[str, torch.Tensor] = field(default_factory=dict)
    samples: dict[str, Any] = field(default_factory=dict)
    log_likelihood: dict[str, Any] = field(default_factory=dict)
    sample_stats: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    converged: bool = False
    message: str = ""
    settings: dict = field(default_factory=dict)
    diagnostics: dict = field(default_factory=dict)
    state: Any = None
    #: latent site -> names of its leading dims (plates), for ArviZ (plain programs)
    dims: dict[str, list[str]] = field(default_factory=dict)

    def __repr__(self) -> str:
        """One line: what ran and what came out (the fields are all there as attributes)."""
        draws = {k: tuple(v.shape) for k, v in self.samples.items() if hasattr(v, "shape")}
        return (f"FitResult(model={self.model!r}, engine={self.engine!r}, guide={self.guide!r}, "
                f"bound={self.bound!r}, elbo={self.elbo:.6g}, elbo_se={self.elbo_se:.3g}, "
                f"n_data={self.n_data}, converged={self.converged}, "
                f"iterations={len(self.trace)}, samples={draws})")

    def __post_init__(self):
        if self.bound not in BOUNDS:
            raise ValueError(f"bound: must be one of {sorted(BOUNDS)}, got {self.bound!r}")

    # -- a fit you can keep --------------------------------------------------------------------
    def fitted(self):
        """Context manager yielding ``(model, guide)`` with the fitted parameters (SVI fits)."""
        from elbolab.inference.persist import fitted_pair

        return fitted_pair(self)

    def elbo_estimate(self, x=None, *, num_particles: int = 1000, batch_size: int = 100,
                      seed: int = 0):
        """The ELBO of the fitted pair on ``x`` (default: nothing; pass the data), nats total."""
        from elbolab.inference.elbo import estimate_elbo
        from elbolab.inference.runtime import seed_everything

        with self.fitted() as (model, guide):
            seed_everything(seed)
            spec = self.state.spec
            x = self._data(x)
            return estimate_elbo(model, guide, x, num_particles=num_particles,
                                 batch_size=batch_size, collapsed=spec.collapsed,
                                 enumerate=spec.collapsed or spec.enumerated,
                                 max_plate_nesting=self.state.family.max_plate_nesting)

    def iwae(self, x, *, num_samples: int = 1000, seed: int = 0, fixed=None,
             latent: str | None = None):
        """IWAE evidence estimate of ``x`` under the fitted model, with the fitted guide.

        A model with global latents has no per-point evidence: pass ``fixed`` (site -> value, or
        ``"median"`` for the fitted global guide's median) to estimate log p(x | globals) instead
        (not a bound on log p(x)); ``method`` and ``details["conditioned_on"]`` then say so.
        ``latent``: the local latent site (default: the model's one local site).
        """
        from elbolab.inference.evaluation.evidence import iwae

        x = self._data(x)
        with self.fitted() as (model, guide):
            fam = self.state.family
            local, fixed = self._local_guide(guide, x, fixed, "iwae")
            latent = latent or self._local_site(model, x)
            ev = iwae(model, local, x, num_samples=num_samples, seed=seed, fixed=fixed or None,
                      latent=latent, max_plate_nesting=fam.max_plate_nesting,
                      event_dim=self._event_dim(model, x, latent))
        if fixed:
            ev.details["conditioned_on"] = {k: v.detach().cpu() for k, v in fixed.items()}
            ev.method = f"{ev.method} | globals fixed: log p(x | globals), not a bound on log p(x)"
        return ev

    def _local_guide(self, guide, x, fixed, what: str):
        """(the guide of the local sites, the global values it is conditioned on)."""
        has_globals = getattr(guide, "global_guide", None) is not None
        if not has_globals:
            return guide, None
        if fixed is None:
            from elbolab.guides.auto import latent_sites

            glob = sorted(latent_sites(self.state.family.model, x)[0])
            raise ValueError(
                f"fixed: the model has global latent(s) {glob}, so {what} can only be computed "
                "given them; pass fixed='median' (the fitted guide's median) or fixed={site: value}")
        if isinstance(fixed, str):
            if fixed != "median":
                raise ValueError(f"fixed: must be 'median' or a dict site -> value, got {fixed!r}")
            fixed = guide.global_median(x)
        return guide.local_part, fixed

    def _local_site(self, model, x) -> str:
        from elbolab.guides.auto import latent_sites

        local = sorted(latent_sites(model, x)[1])
        if len(local) != 1:
            raise ValueError(f"latent: the model has local latent sites {local}; name one")
        return local[0]

    @staticmethod
    def _event_dim(model, x, latent: str) -> int:
        """Event dims of the local site ``latent`` (0 for a scalar z_n, 1 for a vector)."""
        from elbolab.guides.auto import latent_sites

        site = latent_sites(model, x)[1].get(latent)
        return 1 if site is None else site["fn"].event_dim

    def posterior_samples(self, num_samples: int = 1000, *, seed: int = 0, x=None) -> dict:
        """Posterior draws of every latent site, by its own name.

        NUTS: all its draws, ``(chain, draw, ...)`` (``num_samples``, ``seed``, ``x`` unused).
        SVI: ``num_samples`` draws from the fitted guide, ``(1, num_samples, ...)``; ``x``
        defaults to the data the fit was built on (kept in memory, not saved). EM and CAVI hold
        point estimates or q's parameters (``posterior``), not draws: an error says so."""
        from elbolab.inference.runtime import seed_everything
        from elbolab.inference.svi.pair import posterior_draws

        if self.engine == "mcmc":
            sites = getattr(self.state, "samples", None) or self.samples
            return {k: self.samples[k] for k in sites if k in self.samples}
        if self.engine != "svi":
            raise ValueError(f"posterior_samples: a {self.engine} fit holds "
                             f"{sorted(self.posterior)} (point estimates or q's parameters), not "
                             "draws; fit with 'svi' or 'mcmc' for draws")
        x = self._data(x)
        with self.fitted() as (_, guide):
            seed_everything(seed)
            samples, _ = posterior_draws(self.state.family, guide, x, num_samples)
        return samples

    def decompose_gaps(self, x=None, local_family=None, *, fixed=None, **options):
        """The gap decomposition (:func:`elbolab.inference.evaluation.gaps.decompose_gaps`) of the fitted amortized
        guide under the fitted model. With global latents (a composed guide) the model is
        conditioned on them (``fixed``: ``"median"`` for the fitted global guide's median, or a
        dict), the gaps are those of log p(x | globals), the log evidence defaults to
        :meth:`iwae` under the same conditioning, and ``frame.attrs["conditioned_on"]`` says so."""
        from elbolab.inference.evaluation.gaps import decompose_gaps

        x = self._data(x)
        with self.fitted() as (_, guide):
            family, amortized = self.state.family, guide
            local, fixed = self._local_guide(guide, x, fixed, "the gap decomposition")
            if fixed:
                family = _Conditioned(family, fixed)
                amortized = guide.local_guides[0] if len(guide.local_guides) == 1 else None
                if amortized is None:
                    raise ValueError("guide: the gap decomposition needs one per-point local "
                                     "guide (e.g. 'linear-diag', 'mlp') for the local site")
                if "log_evidence" not in options:
                    options["log_evidence"] = self.iwae(x, num_samples=2000, fixed=fixed)
            frame = decompose_gaps(family, x, amortized, local_family, **options)
        if fixed:
            frame.attrs["conditioned_on"] = {k: v.detach().cpu().tolist() for k, v in fixed.items()}
        return frame

    def _data(self, x, self_n: bool = True):
        """``x`` checked by the fitted family; a guide with one q per point needs the fit's n."""
        if x is None:
            x = getattr(self.state, "data", None)
        if x is None:
            raise ValueError("x: pass the data (a loaded result keeps the fit, not the data)")
        x = self.state.family.check_data(x)
        spec = getattr(self.state, "spec", None)
        if spec is not None and not spec.amortized and x.shape[0] != self.n_data:
            raise ValueError(
                f"x: the {self.guide!r} guide was fitted on {self.n_data} points and is not "
                f"amortized (a per-point guide holds one q per point; a guide function may too); "
                f"got {x.shape[0]} (evaluate on the same data, or fit an amortized guide)")
        return x

    def save(self, folder):
        """Save to ``folder`` (see :mod:`elbolab.inference.persist`); returns the folder."""
        from elbolab.inference.persist import save

        return save(self, folder)

    @classmethod
    def load(cls, folder, family=None, x=None, *, guide=None) -> FitResult:
        """Load a saved result; with ``family`` (a family or the plain Pyro program) and ``x`` an
        SVI fit's guide is rebuilt, bit for bit. A guide that was a function or PyroModule is
        passed again as ``guide``."""
        from elbolab.inference.persist import load

        return load(cls, folder, family, x, guide=guide)

    def model_params(self) -> dict[str, torch.Tensor]:
        """The fitted model parameters (``pyro.param`` sites of the model, constrained values)."""
        names = getattr(self.state, "model_param_names", ())
        params = getattr(self.state, "params", {}) or {}
        return {k: params[k] for k in names if k in params}

    @property
    def elbo_per_datum(self) -> float:
        return self.elbo / self.n_data

    def to_row(self, log_evidence=None) -> dict:
        """One row of a comparison table; ``gap`` = log evidence - ELBO when both are known."""
        le, le_se, le_method = math.nan, math.nan, ""
        if log_evidence is not None:
            le, le_se, le_method = log_evidence.value, log_evidence.se, log_evidence.method
        gap = le - self.elbo if self.bound not in ("none", "log-joint-map") else math.nan
        row = {
            "model": self.model,
            "engine": self.engine,
            "guide": self.guide,
            "bound": self.bound,
            "n": self.n_data,
            "elbo": self.elbo,
            "elbo_se": self.elbo_se,
            "elbo_per_datum": self.elbo_per_datum,
            "log_evidence": le,
            "log_evidence_se": le_se,
            "log_evidence_method": le_method,
            "gap": gap,
            "gap_per_datum": gap / self.n_data,
            "seconds": self.seconds,
            "device": self.device,
            "dtype": self.dtype,
            "seed": self.seed,
            "converged": self.converged,
            "iterations": len(self.trace),
        }
        row.update({f"diag_{k}": v for k, v in self.diagnostics.items() if np.isscalar(v)})
        return row

    def to_frame(self, log_evidence=None):
        import pandas as pd

        return pd.DataFrame([self.to_row(log_evidence)])

    def to_inference_data(self):
        """An ArviZ ``InferenceData`` (posterior, log_likelihood, sample_stats groups).

        Point estimates become one chain with one draw, so every engine converts.
        """
        from elbolab.inference import arviz_io

        def with_chain_draw(d: dict) -> dict:
            return {k: to_numpy(v) for k, v in d.items()}

        if self.samples:
            posterior = with_chain_draw(self.samples)
        else:
            posterior = {k: to_numpy(v)[None, None] for k, v in self.posterior.items()}
        log_lik = with_chain_draw(self.log_likelihood) if self.log_likelihood else None
        stats = with_chain_draw(self.sample_stats) if self.sample_stats else None
        dims = {k: v for k, v in self.dims.items() if k in posterior}
        attrs = {
            "model": self.model,
            "engine": self.engine,
            "guide": self.guide,
            "bound": self.bound,
            "elbo": self.elbo,
            "elbo_se": self.elbo_se,
            "seed": self.seed,
            "device": self.device,
        }
        return arviz_io.inference_data(
            posterior=posterior, log_likelihood=log_lik, sample_stats=stats, attrs=attrs, dims=dims
        )


def data_fields(family, x: torch.Tensor, seed: int) -> dict:
    """The FitResult fields every engine fills the same way from the family and the data."""
    return {
        "model": family.name,
        "n_data": x.shape[0],
        "device": str(x.device),
        "dtype": str(x.dtype).replace("torch.", ""),
        "seed": seed,
        "dims": dict(getattr(family, "site_dims", {}) or {}),
    }
