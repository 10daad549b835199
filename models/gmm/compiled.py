"""The GMM's NUTS potential compiled (Numba): eq. 5 with c summed out, and its gradient.

U(mu) = ||mu||^2 / (2 s2) - sum_i logsumexp_k a_ik - const,  a_ik = x_i . mu_k - ||mu_k||^2 / 2,
dU/dmu_k = mu_k (sum_i r_ik + 1/s2) - sum_i r_ik x_i,  r_i = softmax_k(a_i),

with const = -||x||^2/2 - n log K - n d/2 log 2pi - K d/2 (log s2 + log 2pi), as in
:meth:`elbolab.models.gmm.BayesianGMM.batched_potential`. Every loop runs along the data (a_ik
stored (K, n), the data transposed (d, n)) with no call inside, so LLVM vectorizes it: the
exponentials by :func:`elbolab.models.compiled.exp_nonpositive`, the sums over points with
reassociation allowed (their rounding differs from a left-to-right sum, not their value). No
logarithm per point: sum_i log z_i is taken as the log of products of z_i in [1, K], 32 at a time
(no overflow for K < 2^31). About 7 µs for K = 3, n = 1000 against 23 µs for the same loops
point by point with ``math.exp``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from elbolab.models.compiled import SIGNATURE, exp_nonpositive

BLOCK = 32  # points per logarithm


@njit(SIGNATURE, fastmath={"contract", "reassoc"}, error_model="numpy", cache=True)
def gmm_potential(q, xt, params, grad):
    """U(q) and its gradient (module docstring) for q = mu flat (K d,), the data transposed
    xt (d, n) and params = (K, s2, const)."""
    K, s2, const = int(params[0]), params[1], params[2]
    d, n = xt.shape
    for v in q:
        if not math.isfinite(v):
            return math.nan
    a = np.empty((K, n))
    sq = np.zeros(K)
    for k in range(K):
        for j in range(d):
            sq[k] += q[k * d + j] * q[k * d + j]
        row = a[k]
        c = -0.5 * sq[k]
        for i in range(n):
            row[i] = c
        for j in range(d):
            m = q[k * d + j]
            xj = xt[j]
            for i in range(n):
                row[i] += m * xj[i]
    top = a[0].copy()
    for k in range(1, K):
        row = a[k]
        for i in range(n):
            top[i] = max(top[i], row[i])
    lse = 0.0
    for i in range(n):
        lse += top[i]
    for k in range(K):
        row = a[k]
        for i in range(n):
            row[i] -= top[i]
    e = np.empty((K, n))
    exp_nonpositive(a.reshape(-1), e.reshape(-1), np.empty(K * n, dtype=np.int64))
    z = e[0].copy()
    for k in range(1, K):
        row = e[k]
        for i in range(n):
            z[i] += row[i]
    for b in range(0, n, BLOCK):  # sum_i log z_i as logs of products of BLOCK
        p = 1.0
        for i in range(b, min(b + BLOCK, n)):
            p *= z[i]
        lse += math.log(p)
    for i in range(n):
        z[i] = 1.0 / z[i]
    U = 0.0
    for k in range(K):
        row = e[k]
        Rk = 0.0
        for i in range(n):
            row[i] *= z[i]
            Rk += row[i]
        for j in range(d):
            xj = xt[j]
            Gkj = 0.0
            for i in range(n):
                Gkj += row[i] * xj[i]
            grad[k * d + j] = q[k * d + j] * (Rk + 1.0 / s2) - Gkj
        U += sq[k]
    return 0.5 * U / s2 - lse - const


__all__ = ["gmm_potential"]
