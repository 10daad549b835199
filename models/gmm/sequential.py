"""log p(x) of the Bayesian GMM (:mod:`elbolab.models.gmm.model`) by sequential importance sampling over partitions.

p(x | c) depends on c only through the partition of the points it induces (the components share
their prior), so with the uniform p(c_i) = 1/K

    p(x) = sum over partitions P of {1..n} into at most K blocks of
           K^-n K! / (K - |P|)!  prod_{blocks b} p(x_b),                        (eq. S1)

p(x_b) the conjugate marginal of eq. 4 of :mod:`elbolab.models.gmm.model`. Building P point by point (Liu 1996;
MacEachern, Clyde & Liu 1999), point i joins one of the B blocks opened so far with prior
probability 1/K each or opens a new one with probability (K - B)/K; the product of those
probabilities is the prefactor of eq. S1. Each particle draws point i's move from the exact
one-step conditional

    q(move) ∝ prior(move) N(x_i; m_b, (1 + v_b) I),   v_b = 1 / (1/s2 + n_b),  m_b = v_b S_b

(n_b, S_b: count and sum of block b; a new block has n_b = 0, so m = 0 and v = s2) and its weight
is multiplied by the normalizer sum_move prior(move) N(...). The weights are unbiased for p(x)
(every term is a one-step marginal likelihood), for any K, including K > n: empty components
need no sampling. log p(x) = log mean(w); se = sd(w) / (sqrt(S) mean(w)) (delta method).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from elbolab.models.capabilities import Evidence
from elbolab.models.numerics import LOG_2PI, importance_summary
from elbolab.models.validate import check_size, integer

if TYPE_CHECKING:
    from elbolab.models.gmm.model import BayesianGMM


def sequential(family: BayesianGMM, x: torch.Tensor, num_samples: int, seed: int) -> Evidence:
    """log p(x) (nats, float64) by the sequential importance sampler of the module docstring,
    ``num_samples`` particles seeded by ``seed``; x is ``(n, d)`` float64."""
    n, d = x.shape
    K, s2 = family.K, family.prior_var
    S = integer(num_samples, "num_samples", minimum=2)
    B = min(K, n)  # at most min(K, n) blocks are ever open
    check_size(4 * S * B * (d + 2), "num_samples", f"sequential importance sampling with K={K}",
               device=x.device)
    gen = torch.Generator().manual_seed(integer(seed, "seed", minimum=0))
    kw = {"device": x.device, "dtype": x.dtype}
    counts = torch.zeros(S, B, **kw)
    sums = torch.zeros(S, B, d, **kw)
    opened = torch.zeros(S, dtype=torch.long, device=x.device)
    log_w = torch.zeros(S, **kw)
    slot = torch.arange(B, device=x.device)
    rows = torch.arange(S, device=x.device)
    log_k = math.log(K)
    for i in range(n):
        xi = x[i]
        nb = min(B, i + 1)  # slots that can be in use: i blocks at most, plus a new one
        cnt, sm, sl = counts[:, :nb], sums[:, :nb], slot[:nb]
        v = 1.0 / (1.0 / s2 + cnt)  # (S, nb); a new block: v = s2
        var = 1.0 + v
        sq = ((xi - sm * v.unsqueeze(-1)) ** 2).sum(-1)
        log_pred = -0.5 * d * (LOG_2PI + torch.log(var)) - 0.5 * sq / var
        new = torch.log((K - opened).clamp_min(1).to(x.dtype)) - log_k
        log_prior = torch.where(sl < opened[:, None], -log_k,
                                torch.where(sl == opened[:, None], new[:, None], -math.inf))
        lp = log_prior + log_pred
        lz = torch.logsumexp(lp, -1)
        log_w = log_w + lz
        cdf = torch.cumsum(torch.exp(lp - lz[:, None]), -1)
        u = torch.rand(S, generator=gen, dtype=torch.float64).to(**kw) * cdf[:, -1]
        move = (cdf < u[:, None]).sum(-1).clamp(max=nb - 1)
        move = torch.minimum(move, opened.clamp(max=B - 1))  # never past the first empty slot
        counts[rows, move] += 1
        sums[rows, move] += xi
        opened = opened + (move == opened).long()
    value, se, ess = importance_summary(log_w)
    return Evidence(value, se, "sequential", n, {"num_samples": S, "ess": ess})


__all__ = ["sequential"]
