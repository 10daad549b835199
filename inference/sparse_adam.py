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
:class:`pyro.optim.clipped_adam.ClippedAdam`'s update. Duplicate rows in one gradient are summed
first (the gradient of a row used twice).
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
        for group in self.param_groups:
            group["lr"] *= group["lrd"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if p.grad.is_sparse or "row_step" in state:
                    self._rows(p, group, state)
                else:
                    self._dense(p, group, state)
        return loss

    @staticmethod
    def _dense(p, group, state) -> None:
        """ClippedAdam's update of every element."""
        grad = p.grad.clamp(-group["clip_norm"], group["clip_norm"])
        if len(state) == 0:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        beta1, beta2 = group["betas"]
        state["step"] += 1
        if group["weight_decay"] != 0:
            grad = grad.add(p, alpha=group["weight_decay"])
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        grad_var = (grad - exp_avg) if group["centered_variance"] else grad
        exp_avg_sq.mul_(beta2).addcmul_(grad_var, grad_var, value=1 - beta2)
        denom = exp_avg_sq.sqrt().add_(group["eps"])
        bias_correction1 = 1 - beta1 ** state["step"]
        bias_correction2 = 1 - beta2 ** state["step"]
        step_size = group["lr"] * math.sqrt(bias_correction2) / bias_correction1
        p.addcdiv_(exp_avg, denom, value=-step_size)

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


__all__ = ["LazyClippedAdam"]
