"""The contract between model families and engines: one Protocol per capability.

A family is an object that implements :class:`PyroFamily` (required) and any of the optional
capabilities below. Engines, guides and studies check a capability with :func:`require` (or
``isinstance(family, Capability)``), never by looking up attribute names, and a missing capability
raises :class:`MissingCapability` naming the engine, the family and the interface.

=========================  ========================================================  ==========================
capability                 what it provides                                          read by
=========================  ========================================================  ==========================
``PyroFamily`` (required)  ``name``, ``max_plate_nesting``, ``discrete_sites``,      every engine
                           ``check_data(x)``, ``model(x, subsample_size=None)``,
                           ``settings()``
``Simulator``              ``simulate(n, *, seed, device, dtype) -> (x, truth)``     studies, tests
``ExactEvidence``          ``log_evidence(x) -> Evidence`` (total, nats)             studies (gap column)
``PointwiseEvidence``      ``log_evidence_pointwise(x) -> (n,)`` (no global latent)  gap decomposition
``LocalDensities``         ``latent_dim``, ``latent_site``, ``local_prior(x)``,      direct SVI step, guides,
                           ``observation_dist(z)``; ``log_joint(x, z) -> (..., n)``  IWAE/AIS, imputation
``ExactLocalPosterior``    ``exact_posterior(x) -> GaussianPosterior``               ``exact`` guide, gaps
``ExactInvariantPosterior`` ``exact_invariant_moments(x) -> dict[str, Moments]``     studies (reference)
``ClosedFormEM``           ``em() -> CoordinateAscent``                              ``em`` engine
``ClosedFormCAVI``         ``cavi() -> CoordinateAscent``                            ``cavi`` engine
``McmcModel``              ``mcmc_model(x, subsample_size=None)``, ``mcmc_init(x)``  ``mcmc`` engine
``PosteriorInvariants``    ``posterior_invariants(samples, x) -> dict``              ``mcmc`` diagnostics
``PointwiseLogLikelihood`` ``pointwise_log_likelihood(samples, x) -> (c, d, n)``     ArviZ ``log_likelihood``
``ExactImputation``        ``impute_exact(x_nan) -> Tensor``                         imputation studies
=========================  ========================================================  ==========================

A :class:`CoordinateAscent` is one closed-form algorithm (EM or CAVI): ``init``, ``step``,
``objective`` (nats, summed over the data, every constant kept) and ``posterior`` on a typed
dataclass state, with the name of its bound (a key of :data:`BOUNDS`) and of its variational
family (``guide``). The shared loop :func:`elbolab.models.ascent.ascend` runs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

#: Names of the bounds/objectives a result can carry (the ``bound`` column of every table).
BOUNDS = {
    "elbo": "ELBO over all latents (discrete sites explicit in q)",
    "elbo-collapsed": "ELBO with discrete sites summed out exactly (tighter)",
    "log-joint-map": "log p(x, theta) at the MAP estimate (not a bound on log p(x))",
    "log-likelihood": "log p(x | theta) at the estimate (exact marginal likelihood of the data)",
    "iwae": "importance-weighted bound",
    "ais": "annealed importance sampling lower bound",
    "none": "no ELBO (sampler)",
}


class MissingCapability(NotImplementedError):
    """An engine was asked to run on a family that lacks what the engine needs."""


@dataclass
class Evidence:
    """A log evidence in nats, summed over the data, with how it was computed.

    ``method`` says how (``exact``, ``quadrature``, ``importance``, ``iwae``, ``ais``, ...); ``se``
    is its standard error (0 when exact); ``pointwise`` holds per-point values when known;
    ``diagnostics`` holds estimator diagnostics (ESS, Pareto k-hat, ...).
    """

    value: float
    se: float = 0.0
    method: str = "exact"
    n: int = 1
    details: dict = field(default_factory=dict)

    @property
    def per_datum(self) -> float:
        return self.value / self.n

    @property
    def exact(self) -> bool:
        return self.method in ("exact", "enumeration") or self.se == 0.0

    @property
    def pointwise(self) -> torch.Tensor | None:
        return self.details.get("pointwise")


@dataclass
class GaussianPosterior:
    """q(z_n | x_n) = N(mean_n, cov_n) for every data point: ``mean`` (n, k), ``cov`` (n, k, k)
    (or (k, k) when shared by all points, as in factor analysis)."""

    mean: torch.Tensor
    cov: torch.Tensor

    def __iter__(self):  # unpacks as (mean, cov)
        return iter((self.mean, self.cov))

    def distribution(self):
        cov = self.cov.expand(self.mean.shape[0], *self.cov.shape[-2:])
        return torch.distributions.MultivariateNormal(self.mean, covariance_matrix=cov)


@dataclass
class Moments:
    """Posterior mean and sd of one quantity (with Monte Carlo SEs when estimated by sampling)."""

    mean: torch.Tensor
    sd: torch.Tensor
    mean_se: torch.Tensor | None = None
    sd_se: torch.Tensor | None = None
    num_samples: int = 0


# ------------------------------------------------------------------------------------ required


@runtime_checkable
class PyroFamily(Protocol):
    """Required of every family: a Pyro model and a boundary check of the data.

    ``model(x, subsample_size=None)`` puts the per-point sites in
    ``pyro.plate("data", n, subsample_size=..., dim=-1)``; ``check_data(x)`` validates and returns
    a tensor with the caller's device and dtype; ``discrete_sites`` names the discrete latent sites
    marked for enumeration; ``settings()`` returns the hyperparameters as plain values.
    """

    name: str
    max_plate_nesting: int
    discrete_sites: tuple[str, ...]

    def check_data(self, x) -> torch.Tensor: ...

    def model(self, x: torch.Tensor, subsample_size: int | None = None): ...

    def settings(self) -> dict: ...


# ------------------------------------------------------------------------------------ optional


@runtime_checkable
class Simulator(Protocol):
    def simulate(self, n: int, *, seed: int = 0, device=None, dtype=torch.float64): ...


@runtime_checkable
class ExactEvidence(Protocol):
    def log_evidence(self, x) -> Evidence: ...


@runtime_checkable
class PointwiseEvidence(Protocol):
    """Exact log p(x_n) per point (families whose points are independent: no global latent)."""

    def log_evidence(self, x) -> Evidence: ...

    def log_evidence_pointwise(self, x) -> torch.Tensor: ...


@runtime_checkable
class LocalDensities(Protocol):
    """A per-point latent ``latent_site`` of size ``latent_dim`` with prior ``local_prior(x)``
    (batch (n,), event (k,)) and observation model ``observation_dist(z)`` (batch (..., n), event =
    one row), the very distribution objects the Pyro model samples from. ``log_joint(x, z)`` =
    log p(z_n) + log p(x_n | z_n), shape (..., n) (see :class:`elbolab.models.base.LocalLatentFamily`)."""

    latent_dim: int
    latent_site: str

    def local_prior(self, x: torch.Tensor): ...

    def observation_dist(self, z: torch.Tensor): ...

    def log_joint(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class ExactLocalPosterior(Protocol):
    def exact_posterior(self, x) -> GaussianPosterior: ...


@runtime_checkable
class ExactInvariantPosterior(Protocol):
    """Exact posterior moments of label/rotation-invariant summaries (e.g. sorted means)."""

    def exact_invariant_moments(self, x) -> dict[str, Moments]: ...


@runtime_checkable
class CoordinateAscent(Protocol):
    """One closed-form coordinate-ascent algorithm (EM or CAVI) on a typed dataclass state."""

    bound: str
    guide: str

    def init(self, x: torch.Tensor, generator: torch.Generator) -> Any: ...

    def step(self, x: torch.Tensor, state: Any) -> Any: ...

    def objective(self, x: torch.Tensor, state: Any) -> float: ...

    def posterior(self, x: torch.Tensor, state: Any) -> dict[str, torch.Tensor]: ...


@runtime_checkable
class ClosedFormEM(Protocol):
    def em(self) -> CoordinateAscent: ...


@runtime_checkable
class ClosedFormCAVI(Protocol):
    def cavi(self) -> CoordinateAscent: ...


@runtime_checkable
class McmcModel(Protocol):
    """A model for NUTS with the same posterior over the sampled sites (e.g. discrete sites summed
    out in closed form, or whitened coordinates) and a starting point (``None``: Pyro's)."""

    def mcmc_model(self, x: torch.Tensor, subsample_size: int | None = None): ...

    def mcmc_init(self, x: torch.Tensor) -> dict | None: ...


@runtime_checkable
class PosteriorInvariants(Protocol):
    """Label/rotation-invariant summaries of posterior draws, ``(chain, draw, ...)`` each."""

    def posterior_invariants(self, samples: dict, x: torch.Tensor) -> dict: ...


@runtime_checkable
class PointwiseLogLikelihood(Protocol):
    """log p(x_n | globals) for posterior draws, ``(chain, draw, n)``."""

    def pointwise_log_likelihood(self, samples: dict, x: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class ExactImputation(Protocol):
    """E[x_mis | x_obs] in closed form (missing entries are NaN)."""

    def impute_exact(self, x_nan: torch.Tensor) -> torch.Tensor: ...


@dataclass
class FlatPotential:
    """NUTS's target for C chains at once, in flat unconstrained coordinates q of shape (C, D):
    ``potential(q)`` -> (U (C,), grad U (C, D)) with U = -log p(q, x) (every constant kept, any
    Jacobian included); ``to_sites(q)`` maps (..., D) to the model's latent sites by name;
    ``init(C, generator)`` gives starting points (C, D) on the data's device and dtype;
    ``from_sites(values)`` maps site name -> unconstrained value (the site's own shape) to a
    point (D,), an error naming a missing, unknown or misshapen site (None: no such map)."""

    dim: int
    potential: Any
    to_sites: Any
    init: Any
    from_sites: Any = None


def flat_point(given: dict, shapes: dict, like: torch.Tensor) -> torch.Tensor:
    """Unconstrained values by site name (shapes ``shapes``) laid out flat in that order, as
    ``like``; a missing, unknown or misshapen site is an error naming it."""
    if not isinstance(given, dict):
        raise ValueError(f"init_params: must be a dict site -> unconstrained value, got "
                         f"{type(given).__name__}")
    missing, unknown = sorted(set(shapes) - set(given)), sorted(set(given) - set(shapes))
    if missing or unknown:
        raise ValueError(f"init_params: the latent sites are {sorted(shapes)}; missing "
                         f"{missing}, unknown {unknown}")
    parts = []
    for name, shape in shapes.items():
        try:
            v = torch.as_tensor(given[name]).to(like)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"init_params: {name!r} must be a tensor or array of numbers, got "
                             f"{type(given[name]).__name__}") from exc
        if tuple(v.shape) != tuple(shape):
            raise ValueError(f"init_params: {name!r} must be shaped {tuple(shape)} (unconstrained), "
                             f"got {tuple(v.shape)}")
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"init_params: {name!r} has NaN or inf")
        parts.append(v.reshape(-1))
    return torch.cat(parts)


@runtime_checkable
class BatchedPotential(Protocol):
    """A potential NUTS can evaluate for all chains in one computation (the batched kernel of
    :mod:`elbolab.inference.mcmc.batched`), with the posterior of the model's continuous sites
    (discrete ones summed out)."""

    def batched_potential(self, x: torch.Tensor) -> FlatPotential: ...


@runtime_checkable
class CompiledPotential(Protocol):
    """The potential of :meth:`BatchedPotential.batched_potential` compiled with Numba, for the
    compiled NUTS kernel (:mod:`elbolab.inference.mcmc.compiled`, CPU): ``(fn, x, params)`` with
    ``fn`` an ``@njit(SIGNATURE)`` function (:mod:`elbolab.models.compiled`:
    ``fn(q, x, params, grad) -> U`` for one point), ``x`` the data as a float64 matrix and
    ``params`` the family's numbers as float64 (k,). A family declaring it declares
    :class:`BatchedPotential` too (its :class:`FlatPotential` gives the starting points and the
    site names), and the two must give the same U: the engine checks it at the starting points
    before any step."""

    def compiled_potential(self, x: torch.Tensor) -> tuple: ...


CAPABILITIES = (
    PyroFamily, Simulator, ExactEvidence, PointwiseEvidence, LocalDensities, ExactLocalPosterior,
    ExactInvariantPosterior, ClosedFormEM, ClosedFormCAVI, McmcModel, PosteriorInvariants,
    PointwiseLogLikelihood, ExactImputation, BatchedPotential, CompiledPotential,
)


def capabilities_of(family) -> list[str]:
    """Names of the capabilities ``family`` implements."""
    return [c.__name__ for c in CAPABILITIES if isinstance(family, c)]


def has(family, capability: type) -> bool:
    return isinstance(family, capability)


def require(family, capability: type, engine: str) -> None:
    """Raise :class:`MissingCapability` naming the engine, the family and the interface."""
    if not isinstance(family, capability):
        name = getattr(family, "name", type(family).__name__)
        raise MissingCapability(
            f"{engine} needs the {capability.__name__} capability; the {name} family "
            f"({type(family).__name__}) does not implement it (see models/capabilities.py)"
        )
