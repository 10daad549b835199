"""One NUTS transition per chain, compiled (Numba): the whole trajectory in machine code.

The same sampler as :mod:`.batched` (multinomial NUTS, Stan's; Betancourt 2017, sec. A.4), for
a potential that is itself compiled (:class:`~elbolab.models.capabilities.CompiledPotential`):
with both compiled, a leapfrog costs the potential and a few vector updates, with no Python
between steps. What differs from :mod:`.batched`:

* One chain at a time (a loop over chains), so a trajectory stops the moment it turns or
  diverges, inside a subtree too, as Stan's recursion does; the batched kernel keeps all chains
  in step and completes every subtree it starts.
* The recursion is a binary counter: leaf j of a subtree of 2^d leaves merges with the pending
  subtrees of sizes 1, 2, 4, ... while bit i of j is set, so the merges happen in the order
  and with the operands of the recursive doubling (:func:`elbolab.inference.mcmc.batched.build`).
* Randomness comes in from outside: the momenta (C, D) and one 64-bit seed per chain per
  transition, drawn by the caller's :class:`~elbolab.inference.mcmc.arrays.Random`; the seed
  starts a splitmix64 stream (Steele, Lea & Flood 2014) for the directions and the multinomial
  choices, as many as the trajectory takes. A seed fixes the draws, no generator state outlives
  a transition, and a deep tree costs only the uniforms it uses.
* Everything is float64.

``potential(q, x, params, grad) -> U`` is of the one type :data:`elbolab.models.compiled.SIGNATURE`
and reaches the kernel as a first-class function, so the kernel compiles once for every family
and Numba's cache on disk serves later processes.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np
from numba import njit, types
from numba.core.types.function_type import WrapperAddressProtocol
from numba.experimental.function_type import _get_wrapper_address

from elbolab.inference.mcmc.batched import MAX_DELTA_H, Transition
from elbolab.models.compiled import SIGNATURE

_FN = types.FunctionType(SIGNATURE)
_VEC, _MAT = types.float64[::1], types.float64[:, ::1]


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


@njit(cache=True)
def _uniform(state):
    """The next number of the splitmix64 stream in ``state`` (uint64 (1,), advanced), as a
    uniform in (0, 1): the top 53 bits, offset by half a step, so its log is finite."""
    state[0] += _GOLDEN
    z = state[0]
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    z = z ^ (z >> np.uint64(31))
    return ((z >> np.uint64(11)) + 0.5) * (1.0 / 9007199254740992.0)


@njit(cache=True)
def _turning(rho, p_a, p_b, inv_mass):
    """The no-U-turn criterion fails: rho . M^{-1} p_a <= 0 or rho . M^{-1} p_b <= 0."""
    a = 0.0
    b = 0.0
    for i in range(rho.shape[0]):
        a += inv_mass[i] * p_a[i] * rho[i]
        b += inv_mass[i] * p_b[i] * rho[i]
    return a <= 0.0 or b <= 0.0


@njit(cache=True)
def _merge_turns(rho_left, rho_right, p_ls, p_le, p_rs, p_re, inv_mass, tmp):
    """Turning of the merge of a left (earlier) and a right subtree: on the whole, and Stan's
    extra checks (left start with right start, left end with right end)."""
    for i in range(tmp.shape[0]):
        tmp[i] = rho_left[i] + rho_right[i]
    if _turning(tmp, p_ls, p_re, inv_mass):
        return True
    for i in range(tmp.shape[0]):
        tmp[i] = rho_left[i] + p_rs[i]
    if _turning(tmp, p_ls, p_rs, inv_mass):
        return True
    for i in range(tmp.shape[0]):
        tmp[i] = rho_right[i] + p_le[i]
    return _turning(tmp, p_le, p_re, inv_mass)


@njit(cache=True)
def _subtree(potential, x, params, q, p, g, eps, inv_mass, H0, depth, rs,
             prop_q, prop_g, prop_U, rho, p_start, p_end,
             s_q, s_g, s_U, s_rho, s_ps, s_pe, s_lw, tmp):
    """Grow 2^depth leapfrogs of signed size ``eps`` from (q, p, g), which are advanced in
    place to the subtree's far end. Returns (valid, diverging, log_w, accept_sum, leapfrogs,
    iu); the subtree's proposal, momentum sum and end momenta land in prop_*, rho, p_start and
    p_end. s_* (depth + 1 rows) hold the pending subtrees of the binary counter."""
    D = q.shape[0]
    accept = 0.0
    n_leaves = 1 << depth
    for j in range(n_leaves):
        # a leapfrog step
        for i in range(D):
            p[i] -= 0.5 * eps * g[i]
            q[i] += eps * inv_mass[i] * p[i]
        U = potential(q, x, params, g)
        kin = 0.0
        for i in range(D):
            p[i] -= 0.5 * eps * g[i]
            kin += inv_mass[i] * p[i] * p[i]
        dH = U + 0.5 * kin - H0
        if not dH <= MAX_DELTA_H:  # also NaN: a divergence
            return False, True, -math.inf, accept, j + 1
        accept += 1.0 if dH <= 0.0 else math.exp(-dH)
        # the leaf as the current subtree, level 0
        lw = -dH
        for i in range(D):
            prop_q[i] = q[i]
            prop_g[i] = g[i]
            rho[i] = p[i]
            p_start[i] = p[i]
            p_end[i] = p[i]
        pU = U
        level = 0
        while (j >> level) & 1:  # merge with the pending subtree of this size (it came first)
            total = np.logaddexp(s_lw[level], lw)
            take_right = math.log(_uniform(rs)) < lw - total
            if not take_right:
                for i in range(D):
                    prop_q[i] = s_q[level, i]
                    prop_g[i] = s_g[level, i]
                pU = s_U[level]
            if _merge_turns(s_rho[level], rho, s_ps[level], s_pe[level], p_start, p_end,
                            inv_mass, tmp):
                return False, False, -math.inf, accept, j + 1
            for i in range(D):
                rho[i] += s_rho[level, i]
                p_start[i] = s_ps[level, i]
            lw = total
            level += 1
        if level < depth:  # pending: wait for its sibling
            for i in range(D):
                s_q[level, i] = prop_q[i]
                s_g[level, i] = prop_g[i]
                s_rho[level, i] = rho[i]
                s_ps[level, i] = p_start[i]
                s_pe[level, i] = p_end[i]
            s_U[level] = pU
            s_lw[level] = lw
    prop_U[0] = pU
    return True, False, lw, accept, n_leaves


@njit(cache=True)
def _one(potential, x, params, z, out, step, inv_mass, max_depth, normals, seed):
    """One transition of one chain from the packed point z = [q | p | grad U | U] into out."""
    D = inv_mass.shape[0]
    q0 = z[:D]
    g0 = z[2 * D:3 * D]
    U0 = z[3 * D]
    p0 = np.empty(D)
    kin = 0.0
    for i in range(D):
        p0[i] = normals[i] / math.sqrt(inv_mass[i])
        kin += inv_mass[i] * p0[i] * p0[i]
    H0 = U0 + 0.5 * kin
    # the trajectory's ends in time (left, right) and the running proposal
    ql, pl, gl = q0.copy(), p0.copy(), g0.copy()
    qr, pr, gr = q0.copy(), p0.copy(), g0.copy()
    out[:D] = q0
    out[D:2 * D] = p0
    out[2 * D:3 * D] = g0
    out[3 * D] = U0
    rho = p0.copy()
    log_w = 0.0
    # work space
    q, p, g = np.empty(D), np.empty(D), np.empty(D)
    prop_q, prop_g, prop_U = np.empty(D), np.empty(D), np.empty(1)
    t_rho, t_ps, t_pe, tmp = np.empty(D), np.empty(D), np.empty(D), np.empty(D)
    rows = max_depth + 1
    s_q, s_g, s_rho = np.empty((rows, D)), np.empty((rows, D)), np.empty((rows, D))
    s_ps, s_pe = np.empty((rows, D)), np.empty((rows, D))
    s_U, s_lw = np.empty(rows), np.empty(rows)
    rs = np.empty(1, dtype=np.uint64)
    rs[0] = seed
    accept = 0.0
    leapfrogs = 0
    diverging = False
    depth = 0
    for d in range(max_depth):
        fwd = _uniform(rs) < 0.5
        eps = step if fwd else -step
        if fwd:
            q[:] = qr
            p[:] = pr
            g[:] = gr
        else:
            q[:] = ql
            p[:] = pl
            g[:] = gl
        valid, div, t_lw, acc, n = _subtree(
            potential, x, params, q, p, g, eps, inv_mass, H0, d, rs, prop_q, prop_g, prop_U,
            t_rho, t_ps, t_pe, s_q, s_g, s_U, s_rho, s_ps, s_pe, s_lw, tmp)
        accept += acc
        leapfrogs += n
        depth += 1
        if not valid:
            diverging = div
            break
        # biased progressive sampling: the new subtree's proposal with min(1, W_new / W_old)
        if math.log(_uniform(rs)) < t_lw - log_w:
            out[:D] = prop_q
            out[2 * D:3 * D] = prop_g
            out[3 * D] = prop_U[0]
        log_w = np.logaddexp(log_w, t_lw)
        # the trajectory in travel order: (far end, near end) then the new subtree
        if fwd:
            turn = _merge_turns(rho, t_rho, pl, pr, t_ps, t_pe, inv_mass, tmp)
            qr[:] = q
            pr[:] = p
            gr[:] = g
        else:
            turn = _merge_turns(rho, t_rho, pr, pl, t_ps, t_pe, inv_mass, tmp)
            ql[:] = q
            pl[:] = p
            gl[:] = g
        for i in range(D):
            rho[i] += t_rho[i]
        if turn:
            break
    return accept / max(leapfrogs, 1), diverging, depth, leapfrogs


@njit(types.Tuple((_MAT, _VEC, types.boolean[::1], _VEC, _VEC))(
    _FN, _MAT, _VEC, _MAT, _VEC, _MAT, types.int64, _MAT, types.uint64[::1]), cache=True)
def _all(potential, x, params, z, step, inv_mass, max_depth, normals, seeds):
    C = z.shape[0]
    out = np.empty_like(z)
    accept = np.empty(C)
    diverging = np.empty(C, dtype=np.bool_)
    depth = np.empty(C)
    leapfrogs = np.empty(C)
    for c in range(C):
        a, dv, dp, n = _one(potential, x, params, z[c], out[c], step[c], inv_mass[c], max_depth,
                            normals[c], seeds[c])
        accept[c] = a
        diverging[c] = dv
        depth[c] = dp
        leapfrogs[c] = n
    return out, accept, diverging, depth, leapfrogs


@njit(types.Tuple((_VEC, _MAT))(_FN, _MAT, _VEC, _MAT), cache=True)
def _evaluate(potential, x, params, q):
    """(U (C,), grad U (C, D)) of points q (C, D)."""
    C, D = q.shape
    U = np.empty(C)
    g = np.empty((C, D))
    for c in range(C):
        U[c] = potential(q[c], x, params, g[c])
    return U, g


class _FirstClass(WrapperAddressProtocol):
    """A compiled potential as a first-class function whose address and type are looked up
    once: Numba resolves a dispatcher passed as an argument anew on every call (about 50 µs,
    as much as two leapfrogs here)."""

    def __init__(self, fn):
        name = getattr(fn, "__name__", fn)
        try:
            self.address = _get_wrapper_address(fn, SIGNATURE)
        except Exception as exc:  # a Python function, or an @njit of other types
            raise ValueError(
                f"compiled potential: {name!r} must be a Numba @njit function of "
                "elbolab.models.compiled.SIGNATURE (U = fn(q, x, params, grad), all float64); "
                f"{type(exc).__name__}: {str(exc).splitlines()[0]}") from None
        if getattr(fn, "targetoptions", {}).get("error_model") != "numpy":
            raise ValueError(
                f"compiled potential: {name!r} must be compiled with error_model='numpy' "
                "(@njit(SIGNATURE, error_model='numpy')): under Numba's default a division by "
                "zero raises, and an exception inside a function called from compiled code "
                "cannot reach the sampler, which would read U = 0 and go on")
        self._numba_type_ = _FN

    def __wrapper_address__(self) -> int:
        return self.address

    def signature(self):
        return SIGNATURE


@contextmanager
def _interrupts():
    """Ctrl-C during a compiled call as the KeyboardInterrupt it is: Numba reports a signal that
    arrives inside compiled code as a SystemError caused by it, which a caller (the command
    line's interrupt handling, a notebook) would take for a crash."""
    try:
        yield
    except SystemError as exc:
        cause = exc
        while cause is not None:
            if isinstance(cause, KeyboardInterrupt):
                raise KeyboardInterrupt from None
            cause = cause.__cause__ or cause.__context__
        raise


class Compiled:
    """A family's compiled potential as the kernel's two entry points: ``__call__(q)`` ->
    (U, grad U) for C points (NumPy, float64), and ``transition`` with the signature of
    :func:`elbolab.inference.mcmc.batched.transition`."""

    def __init__(self, potential, x: np.ndarray, params: np.ndarray):
        self.fn = _FirstClass(potential)
        self.x = np.ascontiguousarray(x, dtype=np.float64)
        self.params = np.ascontiguousarray(params, dtype=np.float64).reshape(-1)
        if self.x.ndim != 2:
            raise ValueError(f"compiled potential: the data must be a matrix, got {self.x.shape}")

    def __call__(self, q: np.ndarray):
        with _interrupts():
            return _evaluate(self.fn, self.x, self.params,
                             np.ascontiguousarray(q, dtype=np.float64))

    def transition(self, z, step_size, inv_mass, potential, max_depth, rng, adapting=True):
        C, D = inv_mass.shape
        normals = rng.normal((C, D))
        seeds = rng.seeds(C)
        f64 = lambda a: np.ascontiguousarray(a, dtype=np.float64)  # noqa: E731
        with _interrupts():
            out, accept, diverging, depth, leapfrogs = _all(
                self.fn, self.x, self.params, f64(z), f64(step_size), f64(inv_mass), max_depth,
                f64(normals), seeds)
        return Transition(out, accept, diverging, depth, leapfrogs)


def check_against(compiled: Compiled, reference, q: np.ndarray) -> None:
    """The compiled potential must be the batched one (``reference``: q (C, D) float64 ->
    (U, grad U)), the same density with every constant: checked at the points ``q`` and at
    q + 1/2, to 1e-8 relative in U and 1e-6 relative to the largest gradient (float64 on both
    sides: what differs is the order of sums). A family whose two potentials disagree would
    otherwise sample another posterior than its model's, silently. NaN on either side counts as
    a disagreement."""
    for points in (q, q + 0.5):
        U, g = compiled(points)
        U_ref, g_ref = (np.asarray(v, dtype=np.float64) for v in reference(points))
        with np.errstate(invalid="ignore"):
            bad_U = ~(np.abs(U - U_ref) <= 1e-8 * (1 + np.abs(U_ref)))
            bad_g = ~(np.abs(g - g_ref).max(-1) <= 1e-6 * (1 + np.abs(g_ref).max(-1)))
        if not (bad_U.any() or bad_g.any()):
            continue
        c = int(np.flatnonzero(bad_U | bad_g)[0])
        at = np.array2string(points[c], precision=4, threshold=8)
        if bad_U[c]:
            raise ValueError(
                f"compiled_potential: disagrees with batched_potential at q = {at}: U "
                f"{float(U[c])!r} against {float(U_ref[c])!r}; both must be -log p(q, x) with "
                "every constant kept")
        j = int(np.nanargmax(np.abs(g[c] - g_ref[c]))) if np.isfinite(g[c]).any() else 0
        raise ValueError(
            f"compiled_potential: the same U as batched_potential at q = {at}, but not the same "
            f"gradient: coordinate {j} is {float(g[c, j])!r} against {float(g_ref[c, j])!r}; fn "
            "must write every grad[j] = dU/dq_j (the buffer arrives holding anything)")


__all__ = ["Compiled", "check_against"]
