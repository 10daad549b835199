"""Per-data-point importance-weighted (IWAE) log-evidence estimates, and Pyro tracing helpers.

For fixed model parameters and a proposal q(z_n | x_n), the IWAE bound of data point n is
(Burda, Grosse & Salakhutdinov 2016, eq. 8)

    L_S(x_n) = log (1/S) sum_s w_s,   w_s = p(x_n, z_s) / q(z_s | x_n),   z_s ~ q(. | x_n),

with E[L_S] <= E[L_{S+1}] <= log p(x_n) and L_S -> log p(x_n) as S -> inf. The S draws are taken in
chunks; each chunk keeps only logsumexp_s log w_s and logsumexp_s 2 log w_s per point, which combine
exactly across chunks (logsumexp of the chunk values), so memory is O(chunk_size * n).

Standard error (delta method). With m = mean_s w_s, Var(m) = Var(w) / S and
Var(log m) ~= Var(w) / (S E[w]^2). Plugging in the unbiased sample variance,

    se(L_S)^2 = sum_s (w_s - m)^2 / (S (S - 1) m^2) = (S / ESS - 1) / (S - 1),
    ESS = (sum_s w_s)^2 / sum_s w_s^2,

computed from the two logsumexps alone. It is the Monte Carlo spread of L_S, not its (negative)
bias, which is about -se^2 / 2; with heavy-tailed weights (ESS << S) both are underestimated.
Draws are independent across data points, so the total's se is the root sum of squares.

Global sites. The per-point value is log p(x_n, z_n | theta) with theta fixed: the model's
sites outside the plate ``"data"`` must be parameters (``pyro.param``, module weights, constants)
or sample sites whose values are passed in ``fixed`` (they are conditioned on and their own log
prior is left out, as it belongs to no data point). Any other site outside the data plate is an
error, so a number is never silently mixed with log p(theta). This is what makes the estimate
per data point where Pyro's ``RenyiELBO(alpha=0)`` (one weight per joint sample) is not.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.util import site_is_subsample

from models.validate import as_data, integer

#: default number of (data point x sample) pairs per chunk when ``chunk_size`` is not given
CHUNK_ELEMENTS = 2**17

LogJoint = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class EvidenceEstimate:
    """A log evidence estimate in nats, per data point and summed, with standard errors.

    ``method`` is ``"iwae"`` (stochastic lower bound), ``"ais"`` (stochastic lower bound) or
    ``"bdmc-upper"`` (stochastic upper bound from reverse AIS).
    """

    per_point: torch.Tensor
    se_per_point: torch.Tensor
    total: float
    total_se: float
    method: str
    num_samples: int
    details: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.per_point.shape[0])

    @property
    def per_datum(self) -> float:
        return self.total / self.n

    def to_evidence(self):
        """As a :class:`models.Evidence` (total over the data, with its method)."""
        from models.base import Evidence

        details = {"num_samples": self.num_samples}
        details.update({k: v for k, v in self.details.items() if not isinstance(v, torch.Tensor)})
        return Evidence(self.total, self.total_se, self.method, self.n, details)


def log_mean_exp_se(lse1: torch.Tensor, lse2: torch.Tensor, s: int):
    """(log mean w, delta-method se, ESS) from logsumexp log w and logsumexp 2 log w over s draws.

    se^2 = (s / ESS - 1) / (s - 1) (see the module docstring); NaN when s == 1.
    """
    value = lse1 - math.log(s)
    ratio = torch.exp(math.log(s) + lse2 - 2 * lse1)  # s / ESS, >= 1 up to rounding
    ess = s / ratio
    if s > 1:
        se = torch.sqrt(torch.clamp(ratio - 1, min=0) / (s - 1))
    else:
        se = torch.full_like(value, math.nan)
    return value, se, ess


def make_estimate(lse1, lse2, s: int, method: str, details: dict | None = None):
    value, se, ess = log_mean_exp_se(lse1, lse2, s)
    total_se = float(torch.sqrt((se.double() ** 2).sum())) if s > 1 else math.nan
    info = {"ess": ess, "min_ess": float(ess.min())}
    info.update(details or {})
    return EvidenceEstimate(value, se, float(value.double().sum()), total_se, method, s, info)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device):
    """Seed torch's generator(s) for the block and restore the previous state afterwards."""
    seed = integer(seed, "seed", minimum=0)
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _skip(site) -> bool:
    """Not a random variable: params, plates' subsample sites, pyro.deterministic."""
    return (site["type"] != "sample" or site_is_subsample(site)
            or bool(site["infer"].get("_deterministic")))


def _in_plate(site, name: str) -> bool:
    for frame in site["cond_indep_stack"]:
        if frame.name == name:
            if frame.dim != -1:
                raise ValueError(f"model: plate {name!r} must use dim=-1, got dim={frame.dim}")
            return True
    return False


def _site_log_prob(site, s: int, n: int, nesting: int, what: str) -> torch.Tensor:
    """log prob of a site in the data plate, summed over event and inner plate dims -> (s, n)."""
    if not (isinstance(site["scale"], float | int) and site["scale"] == 1):
        raise ValueError(
            f"{what}: site {site['name']!r} is scaled (subsampling or poutine.scale); "
            "per-point evidence needs the unscaled model (subsample_size=None)"
        )
    lp = site["fn"].log_prob(site["value"])
    if site["mask"] is not None and site["mask"] is not True:
        lp = torch.where(torch.as_tensor(site["mask"], device=lp.device), lp, lp.new_zeros(()))
    while lp.dim() < nesting + 1:
        lp = lp.unsqueeze(0)
    if lp.dim() > nesting + 1:
        raise ValueError(
            f"{what}: site {site['name']!r} has {lp.dim()} batch dims, more than "
            f"max_plate_nesting + 1 = {nesting + 1}; raise max_plate_nesting"
        )
    if nesting > 1:
        lp = lp.sum(dim=tuple(range(-nesting, -1)))
    return lp.expand(s, n)


def _per_point_log_prob(trace, s: int, n: int, *, nesting: int, fixed, latent, what: str,
                        data_plate: str = "data"):
    """Sum of the log-probs of the sites in the data plate of ``trace`` -> (s, n)."""
    total = None
    found = False
    for name, site in trace.nodes.items():
        if _skip(site):
            continue
        if not _in_plate(site, data_plate):
            if name in fixed:
                continue
            if what == "guide":
                raise ValueError(
                    f"guide: site {name!r} lies outside the plate {data_plate!r}; the per-point "
                    "IWAE needs a guide over the local latent only (fix global sites in the model)"
                )
            if site["is_observed"]:
                raise ValueError(
                    f"{what}: observed site {name!r} lies outside the plate {data_plate!r}; it "
                    "belongs to no data point"
                )
            raise ValueError(
                f"fixed: {what} site {name!r} is a global latent (outside the plate "
                f"{data_plate!r}); pass its value in fixed={{{name!r}: ...}}"
            )
        if name in fixed:
            raise ValueError(f"fixed: site {name!r} lies inside the plate {data_plate!r}")
        if what == "model" and not site["is_observed"] and name != latent:
            raise ValueError(
                f"latent: the model has a second unobserved per-point site {name!r}; only the "
                f"site {latent!r} is integrated out"
            )
        found = found or name == latent
        lp = _site_log_prob(site, s, n, nesting, what)
        total = lp if total is None else total + lp
    if not found:
        raise ValueError(f"latent: no site {latent!r} in the plate {data_plate!r} of the {what}")
    return total


def pyro_log_joint(
    model,
    *,
    latent: str = "z",
    fixed: dict | None = None,
    model_kwargs: dict | None = None,
    max_plate_nesting: int = 1,
    event_dim: int = 1,
) -> LogJoint:
    """``log_joint(x, z) -> (..., n)``: log p(x_n, z_n | theta) per data point, from a Pyro model.

    ``z`` has shape ``(..., n, *event)``; the leading dims are flattened into a
    ``pyro.plate("particles", S, dim=-(max_plate_nesting + 1))`` around the model, the site
    ``latent`` is conditioned on ``z`` (and the sites in ``fixed`` on their values), and the
    log-probs of all sites in the plate ``"data"`` are summed over their event dims (module
    docstring: treatment of global sites). ``event_dim``: event dims of the latent (1 for a
    vector z_n). Differentiable in ``z``.
    """
    fixed = dict(fixed or {})
    kwargs = dict(model_kwargs or {})
    nesting = integer(max_plate_nesting, "max_plate_nesting", minimum=1)
    event_dim = integer(event_dim, "event_dim", minimum=0)

    def log_joint(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        lead, event = _split_latent(z, n, event_dim)
        s = math.prod(lead)
        zf = z.reshape((s, n) + event)
        data = {latent: zf, **fixed}
        with pyro.plate("particles", s, dim=-(nesting + 1), device=x.device):
            trace = poutine.trace(poutine.condition(model, data=data)).get_trace(x, **kwargs)
        lp = _per_point_log_prob(trace, s, n, nesting=nesting, fixed=fixed, latent=latent,
                                 what="model")
        return lp.reshape(lead + (n,))

    return log_joint


def _split_latent(z: torch.Tensor, n: int, event_dim: int):
    """(leading dims, event shape) of z shaped (..., n, *event) with ``event_dim`` event dims."""
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"z: expected a tensor, got {type(z).__name__}")
    d = z.dim() - 1 - event_dim
    if d < 0 or z.shape[d] != n:
        raise ValueError(
            f"z: expected shape (..., {n}, <{event_dim} event dims>) to match {n} data points, "
            f"got {tuple(z.shape)}"
        )
    return tuple(z.shape[:d]), tuple(z.shape[d + 1:])


def proposal_from(
    program,
    x: torch.Tensor,
    *,
    latent: str = "z",
    fixed: dict | None = None,
    kwargs: dict | None = None,
) -> torch.distributions.Distribution:
    """The distribution of site ``latent`` in one trace of ``program(x, **kwargs)``.

    With the model this is the prior p(z_n) (batch shape ``(n,)``); with an amortized guide it is
    q(z_n | x_n). ``program`` may have no other unobserved sample site (the distribution must not
    depend on other random draws); use :func:`iwae` with the guide for guides with auxiliary
    sites.
    """
    fixed = dict(fixed or {})
    with torch.no_grad():
        trace = poutine.trace(poutine.condition(program, data=fixed)).get_trace(x, **(kwargs or {}))
    if latent not in trace.nodes:
        raise ValueError(f"latent: the program has no site {latent!r}")
    for name, site in trace.nodes.items():
        if not _skip(site) and not site["is_observed"] and name != latent:
            raise ValueError(
                f"latent: site {latent!r} may depend on the other random site {name!r}; "
                "proposal_from needs it to be the only unobserved site"
            )
    fn = trace.nodes[latent]["fn"]
    if tuple(fn.batch_shape) != (x.shape[0],):
        raise ValueError(
            f"latent: site {latent!r} has batch shape {tuple(fn.batch_shape)}, expected "
            f"({x.shape[0]},) (one draw per data point in the plate 'data')"
        )
    return fn


def _chunks(total: int, size: int):
    start = 0
    while start < total:
        yield start, min(size, total - start)
        start += size


def _accumulate(draw: Callable[[int], torch.Tensor], s: int, chunk: int):
    """Run ``draw(c) -> log w (c, n)`` over chunks of s draws; logsumexp of log w and 2 log w."""
    parts1, parts2 = [], []
    for _, c in _chunks(s, chunk):
        log_w = draw(c)
        log_w = torch.nan_to_num(log_w, nan=-math.inf)
        parts1.append(torch.logsumexp(log_w, dim=0))
        parts2.append(torch.logsumexp(2 * log_w, dim=0))
    return torch.logsumexp(torch.stack(parts1), 0), torch.logsumexp(torch.stack(parts2), 0)


def _check_common(x, num_samples, chunk_size, batch_size, name="x"):
    x = as_data(x, name, ndim=(1, 2, 3, 4))
    s = integer(num_samples, "num_samples", minimum=1)
    n = x.shape[0]
    b = n if batch_size is None else min(integer(batch_size, "batch_size", minimum=1), n)
    if chunk_size is None:
        c = max(1, min(s, CHUNK_ELEMENTS // b))
    else:
        c = min(integer(chunk_size, "chunk_size", minimum=1), s)
    return x, s, b, c


def _finish(parts, s, method, details, x):
    lse1 = torch.cat([p[0] for p in parts])
    lse2 = torch.cat([p[1] for p in parts])
    if not torch.isfinite(lse1).all():
        bad = int((~torch.isfinite(lse1)).sum())
        details = {**details, "warning": f"{bad} point(s) had no finite importance weight"}
    est = make_estimate(lse1.to(x.dtype), lse2.to(x.dtype), s, method, details)
    return est


def iwae(
    model,
    guide,
    x,
    *,
    num_samples: int = 1000,
    chunk_size: int | None = None,
    batch_size: int | None = None,
    latent: str = "z",
    fixed: dict | None = None,
    model_kwargs: dict | None = None,
    guide_kwargs: dict | None = None,
    max_plate_nesting: int = 1,
    event_dim: int = 1,
    seed: int = 0,
) -> EvidenceEstimate:
    """Per-data-point IWAE bound L_S(x_n) (module docstring, Burda et al. 2016 eq. 8).

    Each chunk of ``c`` draws traces the guide once under ``pyro.plate("particles", c)`` (log q is
    the sum of the guide's sites in the plate ``"data"``, auxiliary sites included), then the model
    with those values replayed (:func:`pyro_log_joint`). ``batch_size`` data rows at a time
    (default all): model and guide are then called on ``x[i:j]``, so they must read the data
    points from the rows of ``x``. Guide parameters are read, never changed. Result tensors
    follow ``x``'s device and dtype; ``seed`` fixes the draws without touching the global RNG.
    """
    x, s, b, c = _check_common(x, num_samples, chunk_size, batch_size)
    nesting = integer(max_plate_nesting, "max_plate_nesting", minimum=1)
    log_joint = pyro_log_joint(model, latent=latent, fixed=fixed, model_kwargs=model_kwargs,
                               max_plate_nesting=nesting, event_dim=event_dim)
    g_kwargs = dict(model_kwargs or {}) if guide_kwargs is None else dict(guide_kwargs)
    parts = []
    with seeded(seed, x.device), torch.no_grad():
        for i, m in _chunks(x.shape[0], b):
            xb = x[i:i + m]

            def draw(cc, xb=xb, m=m):
                with pyro.plate("particles", cc, dim=-(nesting + 1), device=x.device):
                    gtr = poutine.trace(guide).get_trace(xb, **g_kwargs)
                if latent not in gtr.nodes:
                    raise ValueError(f"latent: the guide has no site {latent!r}")
                z = gtr.nodes[latent]["value"]
                log_q = _per_point_log_prob(gtr, cc, m, nesting=nesting, fixed={}, latent=latent,
                                            what="guide")
                return log_joint(xb, z) - log_q

            parts.append(_accumulate(draw, s, c))
    return _finish(parts, s, "iwae", {"chunk_size": c, "batch_size": b}, x)


def iwae_from_log_joint(
    log_joint: LogJoint,
    proposal,
    x,
    *,
    num_samples: int = 1000,
    chunk_size: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    return_samples: bool = False,
) -> EvidenceEstimate:
    """IWAE with a plain ``log_joint(x, z) -> (..., n)`` and a torch Distribution proposal.

    ``proposal`` is a Distribution with batch shape ``(n,)`` (q(z_n | x_n) or the prior), or a
    callable ``proposal(x_rows) -> Distribution`` (needed with ``batch_size`` < n). With
    ``return_samples=True`` the draws ``z`` (S, n, ...) and log weights (S, n) are put in
    ``details`` (for checks on tiny problems only).
    """
    x, s, b, c = _check_common(x, num_samples, chunk_size, batch_size)
    n = x.shape[0]
    if not callable(log_joint):
        raise TypeError("log_joint: must be callable log_joint(x, z) -> (..., n)")
    fixed_q = isinstance(proposal, torch.distributions.Distribution)
    if fixed_q and b < n:
        raise ValueError(
            "batch_size: a Distribution proposal covers all n points at once; pass a callable "
            "proposal(x_rows) to batch over data points"
        )
    if not fixed_q and not callable(proposal):
        raise TypeError("proposal: must be a torch Distribution or a callable x -> Distribution")
    parts, kept = [], []
    with seeded(seed, x.device), torch.no_grad():
        for i, m in _chunks(n, b):
            xb = x[i:i + m]
            q = proposal if fixed_q else proposal(xb)
            _check_proposal(q, m)

            def draw(cc, xb=xb, q=q):
                z = q.sample((cc,))
                log_w = log_joint(xb, z) - q.log_prob(z)
                if return_samples:
                    kept.append((z, log_w))
                return log_w

            parts.append(_accumulate(draw, s, c))
    details = {"chunk_size": c, "batch_size": b}
    if return_samples:
        if b < n:
            raise ValueError("return_samples: only without batch_size")
        details["z"] = torch.cat([k[0] for k in kept])
        details["log_weights"] = torch.cat([k[1] for k in kept])
    return _finish(parts, s, "iwae", details, x)


def _check_proposal(q, n: int) -> None:
    if not isinstance(q, torch.distributions.Distribution):
        raise TypeError(f"proposal: must give a torch Distribution, got {type(q).__name__}")
    if tuple(q.batch_shape) != (n,):
        raise ValueError(
            f"proposal: batch shape must be ({n},) (one distribution per data point), got "
            f"{tuple(q.batch_shape)}"
        )


def iwae_throughput(log_joint: LogJoint, proposal, x, *, num_samples: int = 1000,
                    chunk_size: int | None = None, repeats: int = 3, seed: int = 0) -> dict:
    """Data points x samples per second of :func:`iwae_from_log_joint` (best of ``repeats``)."""
    from inference.runtime import Timer

    x = as_data(x, "x", ndim=(1, 2, 3, 4))
    repeats = integer(repeats, "repeats", minimum=1)
    iwae_from_log_joint(log_joint, proposal, x, num_samples=min(num_samples, 8), seed=seed)
    best = math.inf
    for r in range(repeats):
        with Timer(x.device) as t:
            iwae_from_log_joint(log_joint, proposal, x, num_samples=num_samples,
                                chunk_size=chunk_size, seed=seed + r)
        best = min(best, t.seconds)
    pairs = x.shape[0] * num_samples
    return {"n": x.shape[0], "num_samples": num_samples, "seconds": best,
            "point_samples_per_s": pairs / best, "device": str(x.device),
            "dtype": str(x.dtype).replace("torch.", "")}
