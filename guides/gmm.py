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
Parameters live in the active Pyro param store; build and fit inside ``elbolab.inference.runtime.isolated``.

Minibatches cost O(batch), not O(n). Every guide draws the batch's indices itself
(:func:`elbolab.models.numerics.minibatch_indices`: no permutation of all n points) and declares them on the ``data``
plate, so the model's plate replays the same rows. q(c) is held as unconstrained logits (n, K)
and only the batch's rows are read, by an embedding lookup with a sparse gradient; the SVI
engine's optimizer (:class:`elbolab.inference.svi.sparse_adam.LazyClippedAdam`) then moves only those rows.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.distributions import constraints
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal, init_to_value

from elbolab.guides.base import GuideSpec
from elbolab.models.gmm.fit import CaviState
from elbolab.models.gmm.model import BayesianGMM, spread_means
from elbolab.models.numerics import minibatch_indices
from elbolab.models.validate import integer, positive

#: Pyro param names of the mean-field and collapsed guides (q(c) as unconstrained logits)
LOC, SCALE, LOGITS = "q_mu_loc", "q_mu_scale", "q_c_logits"


def _batch(x: torch.Tensor, subsample_size: int | None):
    """The ``data`` plate over x's rows, over the indices the guide draws for this step (the
    model's plate of the same name replays them)."""
    n = x.shape[0]
    return pyro.plate("data", n, subsample=minibatch_indices(n, subsample_size, x.device),
                      dim=-1, device=x.device)


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
            f"{field}: expected a elbolab.models.gmm.fit.CaviState (CAVI's state), got {type(state).__name__}"
        )
    return state.m.detach(), state.s2.sqrt().detach(), state.phi.detach()


def _mean_field(m, s, phi, *, fixed: bool, enumerate_c: bool, sparse_grad: bool = True):
    """The mean-field guide q(mu) q(c) with initial (or, if ``fixed``, constant) values; q(c_i)
    is Cat(softmax(logits_i)), the logits an unconstrained (n, K) param read row by row (with a
    sparse gradient on minibatch steps when ``sparse_grad``)."""
    K, n = m.shape[0], phi.shape[0]
    infer = {"enumerate": "parallel"} if enumerate_c else {}
    # exact zeros map to -inf logits: keep a floor (softmax normalizes)
    logits0 = None if fixed else phi.clamp_min(1e-10).log().contiguous()

    def guide(x, subsample_size=None):
        if fixed:
            loc, scale = m, s
        else:
            loc = pyro.param(LOC, lambda: m.clone())
            scale = pyro.param(SCALE, lambda: s.clone(), constraint=constraints.positive)
            logits = pyro.param(LOGITS, lambda: logits0.clone())  # lazy: no O(n) copy per call
        with pyro.plate("components", K, dim=-1):
            pyro.sample("mu", dist.Normal(loc, scale[:, None].expand(loc.shape)).to_event(1))
        if x.shape[0] != n:
            raise ValueError(f"x: the guide holds q(c) for {n} points, got {x.shape[0]} rows")
        with _batch(x, subsample_size) as i:
            if fixed:
                q_c = dist.Categorical(probs=phi[i])
            else:  # only the batch's rows: a sparse gradient, moved lazily by the optimizer
                sparse = sparse_grad and subsample_size is not None
                q_c = dist.Categorical(logits=F.embedding(i, logits, sparse=sparse))
            pyro.sample("c", q_c, infer=infer)

    return guide


def build_mean_field(
    family,
    x,
    *,
    seed: int | None = None,
    init: CaviState | None = None,
    fixed: bool = False,
    enumerate_c: bool = True,
    sparse_grad: bool = True,
):
    """q(mu_k) = N(m_k, s_k^2 I), q(c_i) = Cat(softmax(l_i)); params ``q_mu_loc`` (K, d),
    ``q_mu_scale`` (K,) > 0, ``q_c_logits`` (n, K) unconstrained (read only for the batch rows).

    ``enumerate_c`` marks c for parallel enumeration: under ``TraceEnum_ELBO`` the expectation
    over q(c) is then a sum (same bound, the mean-field ELBO, with far less gradient noise than
    the score-function estimator ``Trace_ELBO`` uses; ``Trace_ELBO`` ignores the mark and warns).
    ``init``: start at a CAVI state instead of k-means++ seeding.
    ``sparse_grad``: on minibatch steps the logits get a sparse gradient (the batch's rows only),
    which the SVI engine's optimizer applies lazily; an optimizer without sparse support
    (``torch.optim.Adam``, ``pyro.optim.Adam``) needs ``sparse_grad=False`` (dense (n, K)
    gradients, a step then costs O(n)) or ``pyro.optim.PyroOptim(LazyClippedAdam, {...})``
    (:mod:`elbolab.inference.svi.sparse_adam`).
    """
    x = family.check_data(x)
    m, s, phi = _initial(family, x, seed, init)
    if phi.shape != (x.shape[0], family.K):
        raise ValueError(f"init: phi must be shaped (n, K) = {(x.shape[0], family.K)}")
    return _mean_field(m, s, phi, fixed=fixed, enumerate_c=enumerate_c, sparse_grad=sparse_grad)


def mean_field_guide_from(state: CaviState, *, fixed: bool = True, enumerate_c: bool = True):
    """The mean-field guide holding CAVI's state (:class:`elbolab.models.gmm.fit.CaviState`).

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
        loc = pyro.param(LOC, lambda: m.clone())
        scale = pyro.param(SCALE, lambda: s.clone(), constraint=constraints.positive)
        with pyro.plate("components", K, dim=-1):
            pyro.sample("mu", dist.Normal(loc, scale[:, None].expand(loc.shape)).to_event(1))
        if subsample_size is not None:
            with _batch(x, subsample_size):  # the model's data plate takes these indices
                pass

    return guide


class _BatchDeclaring:
    """An autoguide over mu that also draws the minibatch (:func:`_batch`) for the model's plate."""

    def forward(self, *args, **kwargs):
        if kwargs.get("subsample_size") is not None:
            with _batch(args[0], kwargs["subsample_size"]):
                pass
        return super().forward(*args, **kwargs)


class SubsamplingAutoNormal(_BatchDeclaring, AutoNormal):
    """:class:`~pyro.infer.autoguide.AutoNormal` that draws the model's minibatch."""


class SubsamplingAutoMultivariateNormal(_BatchDeclaring, AutoMultivariateNormal):
    """:class:`~pyro.infer.autoguide.AutoMultivariateNormal` that draws the model's minibatch."""


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
    return _auto(SubsamplingAutoNormal, family, x, seed, init_scale)


def build_auto_mvn(family, x, *, seed: int | None = None, init_scale: float = 0.1):
    """AutoMultivariateNormal over mu (full-covariance Gaussian over the K*d coordinates)."""
    return _auto(SubsamplingAutoMultivariateNormal, family, x, seed, init_scale)


def guide_specs() -> dict[str, GuideSpec]:
    """Name -> GuideSpec for the GMM family (registered for ``elbolab.guides.for_family``)."""
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
    "LOGITS",
    "SCALE",
    "SubsamplingAutoMultivariateNormal",
    "SubsamplingAutoNormal",
    "build_auto_mvn",
    "build_auto_normal",
    "build_collapsed",
    "build_mean_field",
    "guide_specs",
    "mean_field_guide_from",
    "spread_means",
]
