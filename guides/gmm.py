"""Variational families for the Bayesian GMM (models/gmm.py), swappable by name.

* ``mean-field``: q(mu_k) = N(m_k, s_k^2 I), q(c_i) = Cat(phi_i) - the CAVI family of
  Blei et al. (2017; updates in models/gmm.py eqs. 6-8); bound "elbo". c is marked for
  enumeration in the guide, so TraceEnum_ELBO sums over q(c) exactly (still the mean-field ELBO,
  not the collapsed bound).
* ``collapsed``: q(mu_k) = N(m_k, s_k^2 I) only; c is summed out by TraceEnum_ELBO
  ("elbo-collapsed", tighter: it is log p(x) - KL(q(mu) || p(mu | x))).
* ``auto-normal`` / ``auto-mvn``: Pyro's AutoNormal / AutoMultivariateNormal over mu only (the
  model is shown to them through ``poutine.block(expose=["mu"])``); c summed out as above.

Every builder takes ``seed`` for its random initialization (default: drawn from torch's global
generator, which the engines seed with the fit's seed). The means start at K data points chosen by
k-means++ seeding (:func:`spread_means`), which breaks the label symmetry (all means at one value is
a saddle) and rarely puts two means in one cluster: SVI runs once, without CAVI's restarts, and a
guide started with two means in one cluster can stay in that local optimum (AutoMultivariateNormal
did, 120 nats below the others, on the default experiment with uniform seeding).
Parameters live in the active Pyro param store; build and fit inside ``inference.runtime.isolated``.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal, init_to_value

from guides.base import GuideSpec
from models.gmm import BayesianGMM, CaviState, spread_means
from models.validate import integer, positive

#: Pyro param names of the mean-field and collapsed guides
LOC, SCALE, PROBS = "q_mu_loc", "q_mu_scale", "q_c_probs"


def _generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded by ``seed``, or (None) by a draw from torch's global generator."""
    if seed is None:
        seed = int(torch.randint(2**31 - 1, (1,)))
    return torch.Generator().manual_seed(integer(seed, "seed", minimum=0))


def _initial(family: BayesianGMM, x, seed: int | None, init: CaviState | None):
    """(m (K, d), s (K,), phi (n, K)) from ``init`` (a CAVI state) or k-means++ seeding."""
    if init is not None:
        return _unpack(init)
    m = spread_means(x, family.K, _generator(seed))
    s = x.new_ones(family.K)
    return m, s, family.responsibilities(x, m)


def _unpack(state: CaviState, field: str = "init"):
    """(m, s, phi) of a CAVI state, detached (s = sqrt(s2), the sd of q(mu_k))."""
    if not isinstance(state, CaviState):
        raise TypeError(
            f"{field}: expected a models.gmm.CaviState (CAVI's state), got {type(state).__name__}"
        )
    return state.m.detach(), state.s2.sqrt().detach(), state.phi.detach()


def _mean_field(m, s, phi, *, fixed: bool, enumerate_c: bool):
    """The mean-field guide q(mu) q(c) with initial (or, if ``fixed``, constant) values."""
    K, n = m.shape[0], phi.shape[0]
    infer = {"enumerate": "parallel"} if enumerate_c else {}
    if not fixed:  # exact zeros map to -inf on the unconstrained scale: keep a floor
        phi = phi.clamp_min(1e-10)
        phi = phi / phi.sum(-1, keepdim=True)

    def guide(x, subsample_size=None):
        if fixed:
            loc, scale, probs = m, s, phi
        else:
            loc = pyro.param(LOC, m.clone())
            scale = pyro.param(SCALE, s.clone(), constraint=constraints.positive)
            probs = pyro.param(PROBS, phi.clone(), constraint=constraints.simplex)
        with pyro.plate("components", K, dim=-1):
            pyro.sample("mu", dist.Normal(loc, scale[:, None].expand(loc.shape)).to_event(1))
        with pyro.plate("data", n, subsample_size=subsample_size, dim=-1, device=loc.device) as i:
            pyro.sample("c", dist.Categorical(probs=probs[i]), infer=infer)

    return guide


def build_mean_field(
    family,
    x,
    *,
    seed: int | None = None,
    init: CaviState | None = None,
    fixed: bool = False,
    enumerate_c: bool = True,
):
    """q(mu_k) = N(m_k, s_k^2 I), q(c_i) = Cat(phi_i); params ``q_mu_loc`` (K, d),
    ``q_mu_scale`` (K,) > 0, ``q_c_probs`` (n, K) on the simplex.

    ``enumerate_c`` marks c for parallel enumeration: under ``TraceEnum_ELBO`` the expectation
    over q(c) is then a sum (same bound, the mean-field ELBO, with far less gradient noise than
    the score-function estimator ``Trace_ELBO`` uses; ``Trace_ELBO`` ignores the mark and warns).
    ``init``: start at a CAVI state instead of k-means++ seeding.
    """
    x = family.check_data(x)
    m, s, phi = _initial(family, x, seed, init)
    if phi.shape != (x.shape[0], family.K):
        raise ValueError(f"init: phi must be shaped (n, K) = {(x.shape[0], family.K)}")
    return _mean_field(m, s, phi, fixed=fixed, enumerate_c=enumerate_c)


def mean_field_guide_from(state: CaviState, *, fixed: bool = True, enumerate_c: bool = True):
    """The mean-field guide holding CAVI's state (:class:`models.gmm.CaviState`).

    ``fixed=True`` (default): the values are constants, so the guide describes exactly that q
    whatever the param store holds (for ELBO evaluation). ``fixed=False``: they are the initial
    values of ``pyro.param`` sites (to warm-start SVI; use a fresh param store).
    ``enumerate_c``: as in :func:`build_mean_field`.
    """
    m, s, phi = _unpack(state, "state")
    return _mean_field(m, s, phi, fixed=fixed, enumerate_c=enumerate_c)


def build_collapsed(family, x, *, seed: int | None = None, init: CaviState | None = None):
    """q(mu_k) = N(m_k, s_k^2 I) only; c enumerated in the model (TraceEnum_ELBO). ``init``:
    start q(mu) at a CAVI state's."""
    x = family.check_data(x)
    m, s, _ = _initial(family, x, seed, init)
    K = family.K

    def guide(x, subsample_size=None):
        loc = pyro.param(LOC, m.clone())
        scale = pyro.param(SCALE, s.clone(), constraint=constraints.positive)
        with pyro.plate("components", K, dim=-1):
            pyro.sample("mu", dist.Normal(loc, scale[:, None].expand(loc.shape)).to_event(1))

    return guide


def _auto(cls, family, x, seed: int | None, init_scale: float):
    x = family.check_data(x)
    values = {"mu": spread_means(x, family.K, _generator(seed))}
    return cls(
        poutine.block(family.model, expose=["mu"]),
        init_loc_fn=init_to_value(values=values),
        init_scale=positive(init_scale, "init_scale"),
    )


def build_auto_normal(family, x, *, seed: int | None = None, init_scale: float = 0.1):
    """AutoNormal over mu (diagonal Gaussian over all K*d coordinates)."""
    return _auto(AutoNormal, family, x, seed, init_scale)


def build_auto_mvn(family, x, *, seed: int | None = None, init_scale: float = 0.1):
    """AutoMultivariateNormal over mu (full-covariance Gaussian over the K*d coordinates)."""
    return _auto(AutoMultivariateNormal, family, x, seed, init_scale)


def guide_specs() -> dict[str, GuideSpec]:
    """Name -> GuideSpec for the GMM family (registered for ``guides.for_family``)."""
    return {
        "mean-field": GuideSpec(
            "mean-field",
            build_mean_field,
            collapsed=False,
            description="q(mu_k)=N(m_k,s_k^2 I) q(c_i)=Cat(phi_i); sum over q(c) exact",
            enumerated=True,
        ),
        "collapsed": GuideSpec(
            "collapsed", build_collapsed, True, False, "q(mu_k)=N(m_k,s_k^2 I); c summed out"
        ),
        "auto-normal": GuideSpec(
            "auto-normal", build_auto_normal, True, False, "AutoNormal over mu; c summed out"
        ),
        "auto-mvn": GuideSpec(
            "auto-mvn", build_auto_mvn, True, False, "AutoMultivariateNormal over mu; c summed out"
        ),
    }


__all__ = [
    "LOC",
    "PROBS",
    "SCALE",
    "build_auto_mvn",
    "build_auto_normal",
    "build_collapsed",
    "build_mean_field",
    "guide_specs",
    "mean_field_guide_from",
    "spread_means",
]
