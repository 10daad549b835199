"""What a model family is: a Pyro model plus whatever is tractable about it.

A family is a small object holding hyperparameters. Engines ask it for what they need and fail
clearly when it is missing (see :func:`require`). Optional hooks, by engine:

* exact evidence:   ``log_evidence(x) -> Evidence``
* exact posterior:  ``exact_posterior(x)``
* EM:               ``em_init(x, generator)``, ``em_step(x, state)``, ``em_objective(x, state)``
* CAVI:             ``cavi_init(x, generator)``, ``cavi_step(x, state)``, ``cavi_objective(x, state)`` (closed-form ELBO)
* SVI:              ``guides()`` (name -> factory), ``model`` and the chosen guide
* MCMC:             ``mcmc_model`` (defaults to ``model``), ``mcmc_invariants(samples, x)``
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Evidence:
    """A log evidence in nats, summed over the data, with how it was computed."""

    value: float
    se: float = 0.0
    method: str = "exact"
    n: int = 1
    details: dict = field(default_factory=dict)

    @property
    def per_datum(self) -> float:
        return self.value / self.n


class MissingCapability(NotImplementedError):
    """An engine was asked to run on a family that lacks what the engine needs."""


class ModelFamily:
    """Base class of the model families; subclasses set ``name`` and implement ``model``."""

    name: str = "family"
    #: the number of discrete latent sites that the collapsed bound sums out, for labelling bounds
    discrete_sites: tuple[str, ...] = ()
    #: how deeply the model nests plates (needed by TraceEnum_ELBO)
    max_plate_nesting: int = 1

    def check_data(self, x) -> torch.Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def model(self, x: torch.Tensor):  # pragma: no cover - overridden
        raise NotImplementedError

    def simulate(self, n: int, *, seed: int = 0, device=None, dtype=torch.float64):
        raise MissingCapability(f"the {self.name} family has no simulator")

    def settings(self) -> dict:
        """Hyperparameters as plain values (for run.json and result rows)."""
        return {}

    def has(self, *hooks: str) -> bool:
        return all(callable(getattr(self, h, None)) for h in hooks)


def require(family: ModelFamily, engine: str, hooks: tuple[str, ...], what: str) -> None:
    """Raise :class:`MissingCapability` naming the engine, the family and what is missing."""
    missing = [h for h in hooks if not callable(getattr(family, h, None))]
    if missing:
        raise MissingCapability(
            f"{engine} needs {what}; the {family.name} family has none "
            f"(missing: {', '.join(missing)})"
        )
