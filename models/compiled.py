"""The type of a compiled potential (:class:`~elbolab.models.capabilities.CompiledPotential`).

``fn(q, x, params, grad) -> U``: U(q) = -log p(q, x), every constant and any log-Jacobian kept,
for one point q (D,) in unconstrained coordinates, the data x as a matrix in the family's layout
(C order) and the family's numbers ``params`` (k,), all float64. ``fn`` writes every grad[j] =
dU/dq_j (the buffer arrives holding anything) and returns U; outside the support it returns
``math.nan`` (the sampler's divergence) and never raises.

It is compiled as ``@njit(SIGNATURE, error_model="numpy")``. An ``@njit`` function of this one
type reaches the NUTS kernel as a first-class function (:mod:`elbolab.inference.mcmc.compiled`):
the kernel compiles once for every family, and Numba's cache on disk serves later processes.
Numba's default error model raises on a division by zero, and an exception inside a function
called from compiled code cannot reach the sampler: the engine refuses such a function.
"""

import math

import numpy as np
from numba import njit, types

SIGNATURE = types.float64(types.float64[::1], types.float64[:, ::1], types.float64[::1],
                          types.float64[::1])


# exp by Cody-Waite range reduction: x = k ln2 + r, |r| <= ln2/2, e^r by its Taylor polynomial to
# r^12 (truncation error r^13/13! < 2e-16 relative), 2^k written into the exponent bits.
_LOG2E = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01  # ln 2 split so that k * _LN2_HI is exact
_LN2_LO = 1.90821492927058770002e-10


@njit(fastmath={"contract"}, cache=True)
def exp_nonpositive(a, out, bits):
    """out = exp(a) for a <= 0, within 2 ulp of ``np.exp`` on [-708, 0] (tested), a value below
    -708 taken as -708 (exp(-708) = 3.3e-308 for 0). ``bits``: int64 work space of a's size.
    One loop without calls, which LLVM vectorizes: about 5 times faster than a loop of
    ``math.exp``, which calls the C library once per number."""
    for i in range(a.shape[0]):
        x = max(a[i], -708.0)
        k = math.floor(x * _LOG2E + 0.5)
        r = (x - k * _LN2_HI) - k * _LN2_LO
        p = 1.0 / 479001600.0
        p = p * r + 1.0 / 39916800.0
        p = p * r + 1.0 / 3628800.0
        p = p * r + 1.0 / 362880.0
        p = p * r + 1.0 / 40320.0
        p = p * r + 1.0 / 5040.0
        p = p * r + 1.0 / 720.0
        p = p * r + 1.0 / 120.0
        p = p * r + 1.0 / 24.0
        p = p * r + 1.0 / 6.0
        p = p * r + 0.5
        p = p * r + 1.0
        out[i] = p * r + 1.0
        bits[i] = (np.int64(k) + 1023) << 52  # 2^k as a float64's bits
    scale = bits.view(np.float64)
    for i in range(a.shape[0]):
        out[i] *= scale[i]


__all__ = ["SIGNATURE", "exp_nonpositive"]
