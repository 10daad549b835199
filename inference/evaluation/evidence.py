"""Per-data-point importance-weighted (IWAE) log-evidence estimates, as :class:`Evidence`.

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

Every estimator here and in :mod:`elbolab.inference.evaluation.ais` returns a :class:`elbolab.models.capabilities.Evidence`:
``value`` (nats, summed over the data) and ``se``, ``method`` (``"iwae"``, ``"ais"``,
``"bdmc-upper"``), ``n``, and ``details`` with ``pointwise`` (n,) and ``pointwise_se`` (n,)
(tensors on the data's device and dtype), ``ess`` (n,), ``min_ess``, ``num_samples`` and the
estimator's own settings and diagnostics. The per-point log joint from a Pyro model and its
treatment of global sites are in :mod:`elbolab.inference.tracing`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import pyro
import pyro.poutine as poutine
import torch

from elbolab.inference.runtime import Timer
from elbolab.inference.tracing import LogJoint, per_point_log_prob, pyro_log_joint
from elbolab.models.capabilities import Evidence
from elbolab.models.validate import as_data, integer

#: default number of (data point x sample) pairs per chunk when ``chunk_size`` is not given
CHUNK_ELEMENTS = 2**17


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


def pointwise_evidence(values: torch.Tensor, se: torch.Tensor, method: str,
                       details: dict | None = None) -> Evidence:
    """An :class:`Evidence` from per-point values and independent per-point standard errors:
    value = sum_n values_n, se = sqrt(sum_n se_n^2)."""
    total_se = float(torch.sqrt((se.double() ** 2).sum()))
    info = {"pointwise": values, "pointwise_se": se, **(details or {})}
    return Evidence(float(values.double().sum()), total_se, method, int(values.shape[0]), info)


def evidence_from_logsumexp(lse1, lse2, s: int, method: str, details: dict | None = None,
                            *, negate: bool = False) -> Evidence:
    """log mean_s w per point from the two logsumexps (:func:`log_mean_exp_se`), as an Evidence
    (``negate``: report -log mean w, the BDMC upper bound from reverse weights)."""
    value, se, ess = log_mean_exp_se(lse1, lse2, s)
    info = {"ess": ess, "min_ess": float(ess.min()), "num_samples": s, **(details or {})}
    return pointwise_evidence(-value if negate else value, se, method, info)


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


def chunks(total: int, size: int):
    """(start, length) of consecutive blocks of at most ``size`` covering ``range(total)``."""
    start = 0
    while start < total:
        yield start, min(size, total - start)
        start += size


def check_proposal(q, n: int) -> None:
    """``q`` must be a torch Distribution with batch shape (n,) (one per data point)."""
    if not isinstance(q, torch.distributions.Distribution):
        raise TypeError(f"proposal: must give a torch Distribution, got {type(q).__name__}")
    if tuple(q.batch_shape) != (n,):
        raise ValueError(
            f"proposal: batch shape must be ({n},) (one distribution per data point), got "
            f"{tuple(q.batch_shape)}"
        )


def _accumulate(draw: Callable[[int], torch.Tensor], s: int, chunk: int):
    """Run ``draw(c) -> log w (c, n)`` over chunks of s draws; logsumexp of log w and 2 log w."""
    parts1, parts2 = [], []
    for _, c in chunks(s, chunk):
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


def _finish(parts, s, method, details, x) -> Evidence:
    lse1 = torch.cat([p[0] for p in parts])
    lse2 = torch.cat([p[1] for p in parts])
    if not torch.isfinite(lse1).all():
        bad = int((~torch.isfinite(lse1)).sum())
        details = {**details, "warning": f"{bad} point(s) had no finite importance weight"}
    return evidence_from_logsumexp(lse1.to(x.dtype), lse2.to(x.dtype), s, method, details)


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
) -> Evidence:
    """Per-data-point IWAE bound L_S(x_n) (module docstring, Burda et al. 2016 eq. 8).

    Each chunk of ``c`` draws traces the guide once under ``pyro.plate("particles", c)`` (log q is
    the sum of the guide's sites in the plate ``"data"``, auxiliary sites included), then the model
    with those values replayed (:func:`elbolab.inference.tracing.pyro_log_joint`, which says how global
    sites and ``fixed`` are treated). ``batch_size`` data rows at a time (default all): model and
    guide are then called on ``x[i:j]``, so they must read the data points from the rows of ``x``.
    Guide parameters are read, never changed. Result tensors follow ``x``'s device and dtype;
    ``seed`` fixes the draws without touching the global RNG.
    """
    x, s, b, c = _check_common(x, num_samples, chunk_size, batch_size)
    nesting = integer(max_plate_nesting, "max_plate_nesting", minimum=1)
    log_joint = pyro_log_joint(model, latent=latent, fixed=fixed, model_kwargs=model_kwargs,
                               max_plate_nesting=nesting, event_dim=event_dim)
    g_kwargs = dict(model_kwargs or {}) if guide_kwargs is None else dict(guide_kwargs)
    parts = []
    with seeded(seed, x.device), torch.no_grad():
        for i, m in chunks(x.shape[0], b):
            xb = x[i:i + m]

            def draw(cc, xb=xb, m=m):
                with pyro.plate("particles", cc, dim=-(nesting + 1), device=x.device):
                    gtr = poutine.trace(guide).get_trace(xb, **g_kwargs)
                if latent not in gtr.nodes:
                    raise ValueError(f"latent: the guide has no site {latent!r}")
                z = gtr.nodes[latent]["value"]
                log_q = per_point_log_prob(gtr, cc, m, nesting=nesting, fixed={}, latent=latent,
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
) -> Evidence:
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
        for i, m in chunks(n, b):
            xb = x[i:i + m]
            q = proposal if fixed_q else proposal(xb)
            check_proposal(q, m)

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


def iwae_throughput(log_joint: LogJoint, proposal, x, *, num_samples: int = 1000,
                    chunk_size: int | None = None, repeats: int = 3, seed: int = 0) -> dict:
    """Data points x samples per second of :func:`iwae_from_log_joint` (best of ``repeats``)."""
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
