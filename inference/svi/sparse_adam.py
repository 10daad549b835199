"""ClippedAdam with lazy per-row updates for sparse gradients (local variational parameters).

A local parameter (one row per data point, e.g. the logits of q(c_i)) read through an embedding
lookup with ``sparse=True`` (:func:`torch.nn.functional.embedding`) gets a sparse gradient that
names only the rows of the minibatch. Dense Adam would still move every row every step (its
moment estimates decay and keep pushing rows that were not in the batch), so a step would cost
O(n). :class:`LazyClippedAdam` updates only the rows named in the gradient, each with its own step
count t_r (the number of minibatches that contained row r):

    g_r   = clamp(grad_r, -clip_norm, clip_norm)            (+ weight_decay * theta_r)
    m_r   = b1 m_r + (1 - b1) g_r,   v_r = b2 v_r + (1 - b2) g_r^2       (g_r - m_r if centered)
    theta_r -= lr_t sqrt(1 - b2^t_r) / (1 - b1^t_r) * m_r / (sqrt(v_r) + eps)

with the group's decayed rate lr_t (lr times lrd per step, as in ClippedAdam). Rows outside the
batch keep their values and moments: the lazy Adam of TensorFlow's ``LazyAdam`` and of
``torch.optim.SparseAdam``, with Pyro's clipping and rate decay. Dense gradients get exactly
:class:`pyro.optim.clipped_adam.ClippedAdam`'s update (as multi-tensor ops). Duplicate rows in one gradient are summed
first (the gradient of a row used twice).

:meth:`LazyClippedAdam.guarded_step` is the update the SVI engine uses: applied only if every
touched value stays usable afterwards, else undone exactly, so a diverging run keeps its last
good state at the cost of copying what one step touches (the batch's rows of a local parameter,
not all n).
"""

from __future__ import annotations

import math

import torch
from pyro.optim.clipped_adam import ClippedAdam


class LazyClippedAdam(ClippedAdam):
    """:class:`pyro.optim.clipped_adam.ClippedAdam`; a parameter whose gradient is sparse (rows of
    its first dimension) is updated lazily, row by row (module docstring). The optimizer state of
    such a parameter holds ``exp_avg``, ``exp_avg_sq`` and ``row_step`` (the per-row step counts,
    in the parameter's dtype so a saved state loads back unchanged)."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._update()
        return loss

    def _update(self) -> None:
        """The update of every parameter with a gradient (under no_grad; without the profiling
        hooks torch wraps ``step`` in, which cost as much as the update of a small network)."""
        for group in self.param_groups:
            group["lr"] *= group["lrd"]
            dense = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if p.grad.is_sparse or "row_step" in state:
                    self._rows(p, group, state)
                else:
                    dense.append(p)
            if dense:
                self._dense(dense, group)

    @torch.no_grad()
    def guarded_step(self, valid=None, keep_state: bool = False) -> tuple[list, bool]:
        """:meth:`step`, kept only if every value it touched is usable afterwards. Returns the
        parameters that refused it (empty: kept) and whether their gradients were finite.

        Undone, with the parameters, moments, step counts and rate restored exactly, when a
        touched value is non-finite after the update (a NaN gradient, or an infinite one that
        ``clip_norm`` did not clip, always leads there) or ``valid(p, rows)`` is False (``rows``:
        the updated rows of a lazily updated parameter, None for all of it; e.g. a constraint
        check of the constrained value). ``keep_state``: also restore the moments (needed only if
        optimization goes on after a refusal). Costs a copy of what the step touches (the batch's
        rows of a local parameter) and one fused finiteness check."""
        touched = []  # (param, rows or None, gradient values)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    p.grad = p.grad.coalesce()
                    touched.append((p, p.grad.indices()[0], p.grad.values()))
                else:
                    touched.append((p, None, p.grad))
        saved = self._save(touched, keep_state)
        self._update()
        bad = _nonfinite([(p, p if rows is None else p[rows]) for p, rows, _ in touched])
        if not bad and valid is not None:
            bad = [p for p, rows, _ in touched if not valid(p, rows)]
        if not bad:
            self._last = saved
            return [], True
        self._restore(saved)
        ids = {id(p) for p in bad}
        return bad, not _nonfinite([(p, g) for p, _, g in touched if id(p) in ids])

    @torch.no_grad()
    def undo_last(self) -> bool:
        """Undo the last update :meth:`guarded_step` kept (once; with its moments if it was
        taken with ``keep_state``), e.g. when the loss at the parameters it produced is
        non-finite. False when there is none to undo."""
        saved, self._last = getattr(self, "_last", None), None
        if saved is None:
            return False
        self._restore(saved)
        return True

    def _save(self, touched, keep_state: bool) -> tuple:
        lrs = [group["lr"] for group in self.param_groups]
        values = [(p, rows, (p if rows is None else p[rows]).clone()) for p, rows, _ in touched]
        states = []
        if keep_state:
            for p, rows, _ in touched:
                st = self.state.get(p, {})
                states.append((p, rows, {k: v if not torch.is_tensor(v) else
                                         (v if rows is None or v.shape[:1] != p.shape[:1] else
                                          v[rows]).clone() for k, v in st.items()}))
        return lrs, values, states

    def _restore(self, saved) -> None:
        lrs, values, states = saved
        for group, lr in zip(self.param_groups, lrs):
            group["lr"] = lr
        for p, rows, old in values:
            if rows is None:
                p.copy_(old)
            else:
                p.index_copy_(0, rows, old)
        for p, rows, old in states:
            if not old:
                self.state.pop(p, None)
                continue
            st = self.state[p]
            for k, v in old.items():
                if rows is None or not torch.is_tensor(v) or st[k].shape[:1] != p.shape[:1]:
                    st[k] = v
                else:
                    st[k].index_copy_(0, rows, v)

    def _dense(self, params, group) -> None:
        """ClippedAdam's update of every element of ``params``, as multi-tensor (foreach) ops."""
        for p in params:
            state = self.state[p]
            if len(state) == 0:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
        states = [self.state[p] for p in params]
        grads = [p.grad for p in params]
        clip = group["clip_norm"]
        if math.isfinite(clip):
            grads = torch._foreach_clamp_max(torch._foreach_clamp_min(grads, -clip), clip)
        if group["weight_decay"] != 0:
            grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        beta1, beta2 = group["betas"]
        exp_avg = [s["exp_avg"] for s in states]
        exp_avg_sq = [s["exp_avg_sq"] for s in states]
        torch._foreach_mul_(exp_avg, beta1)
        torch._foreach_add_(exp_avg, grads, alpha=1 - beta1)
        grad_var = torch._foreach_sub(grads, exp_avg) if group["centered_variance"] else grads
        torch._foreach_mul_(exp_avg_sq, beta2)
        torch._foreach_addcmul_(exp_avg_sq, grad_var, grad_var, value=1 - beta2)
        denom = torch._foreach_sqrt(exp_avg_sq)
        torch._foreach_add_(denom, group["eps"])
        steps = [-group["lr"] * math.sqrt(1 - beta2 ** s["step"]) / (1 - beta1 ** s["step"])
                 for s in states]
        torch._foreach_addcdiv_(params, exp_avg, denom, steps)

    @staticmethod
    def _rows(p, group, state) -> None:
        """The lazy update of the rows named in the gradient (O(rows), not O(n))."""
        grad = p.grad
        if grad.is_sparse:
            grad = grad.coalesce()
            rows, values = grad.indices()[0], grad.values()
        else:  # a dense gradient for a lazily-updated parameter: every row is in it
            rows, values = torch.arange(p.shape[0], device=p.device), grad
        if len(state) == 0:
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
            state["row_step"] = p.new_zeros(p.shape[0])
        beta1, beta2 = group["betas"]
        g = values.clamp(-group["clip_norm"], group["clip_norm"])
        if group["weight_decay"] != 0:
            g = g + group["weight_decay"] * p[rows]
        t = state["row_step"][rows] + 1
        state["row_step"][rows] = t
        m = state["exp_avg"][rows].mul_(beta1).add_(g, alpha=1 - beta1)
        gv = (g - m) if group["centered_variance"] else g
        v = state["exp_avg_sq"][rows].mul_(beta2).addcmul_(gv, gv, value=1 - beta2)
        state["exp_avg"][rows] = m
        state["exp_avg_sq"][rows] = v
        shape = (-1,) + (1,) * (p.dim() - 1)
        step_size = (group["lr"] * torch.sqrt(1 - beta2**t) / (1 - beta1**t)).reshape(shape)
        p.index_add_(0, rows, -step_size * m / (v.sqrt() + group["eps"]))


def _nonfinite(pairs) -> list[torch.Tensor]:
    """The parameters whose paired tensor holds a NaN or an infinity. Fast path: one fused 2-norm
    per tensor (finite norms: all finite); a non-finite norm (possibly an overflow of large finite
    values) is confirmed element by element."""
    pairs = [(p, t) for p, t in pairs if t.numel()]
    if not pairs:
        return []
    ok = torch.isfinite(torch.stack(torch._foreach_norm([t for _, t in pairs], 2)))
    if bool(ok.all()):
        return []
    return [p for (p, t), k in zip(pairs, ok.tolist()) if not k and not bool(t.isfinite().all())]


__all__ = ["LazyClippedAdam"]
