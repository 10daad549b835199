"""Small numerical helpers shared by families, guides and engines (one copy of each)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
from torch import nn

LOG_2PI = math.log(2 * math.pi)

#: Activations by name, for decoders and encoders.
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "softplus": nn.Softplus, "elu": nn.ELU}


def mlp(sizes: Sequence[int], activation: str = "relu", **kw) -> nn.Sequential:
    """Linear layers of ``sizes`` with ``activation`` between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b, **kw))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


def inverse_softplus(y):
    """x with softplus(x) = y (tensor or float), stable for large y."""
    if not torch.is_tensor(y):
        return float(y + math.log(-math.expm1(-y)))
    return y + torch.log(-torch.expm1(-y))


@contextlib.contextmanager
def one_thread(t: torch.Tensor | None = None):
    """Run small CPU work on one torch thread (restored afterwards).

    Tiny ops (a k x k Cholesky, a NUTS step of a small model) spend milliseconds in OpenMP
    barriers when the cores are busy and microseconds on one thread. No-op for CUDA tensors.
    """
    n = torch.get_num_threads()
    if (t is not None and t.device.type != "cpu") or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def minibatch_indices(n: int, size: int | None, device=None,
                      generator: torch.Generator | None = None) -> torch.Tensor | None:
    """``size`` distinct indices of range(n), a uniformly random subset in random order, drawn in
    O(size log size) from ``generator`` (default torch's) (None when ``size`` is None or >= n:
    the full plate).

    Sequential sampling without replacement: i.i.d. uniform draws, keeping the first occurrence
    of each value, until ``size`` distinct values are in hand (about size^2 / 2n repeats). For
    n <= 32 size a permutation of range(n) is cheaper (measured on CPU) and is used instead.
    """
    if size is None or size >= n:
        return None
    if generator is not None:
        device = generator.device
    if n <= 32 * size:
        return torch.randperm(n, device=device, generator=generator)[:size]
    out = torch.empty(0, dtype=torch.long, device=device)
    while out.numel() < size:
        need = size - out.numel()
        extra = torch.randint(n, (need + need * size // n + 8,), device=device, generator=generator)
        draw = torch.cat([out, extra])
        uniq, inverse = torch.unique(draw, return_inverse=True)
        first = torch.full_like(uniq, draw.numel()).scatter_reduce_(
            0, inverse, torch.arange(draw.numel(), device=device), "amin")
        out = draw[first.sort().values][:size]
    return out


def importance_summary(log_w: torch.Tensor) -> tuple[float, float, float]:
    """(log mean w, its delta-method standard error, effective sample size) of S importance
    log-weights: log((1/S) sum w_s), sd(w) / (sqrt(S) mean(w)), (sum w)^2 / sum w^2 (computed
    with the largest weight factored out)."""
    top = log_w.max()
    w = torch.exp(log_w - top)
    mean = w.mean()
    value = float(torch.log(mean) + top)
    se = float(w.std() / (math.sqrt(log_w.numel()) * mean))
    ess = float(w.sum() ** 2 / (w**2).sum())
    return value, se, ess


def softmax(a: torch.Tensor, dim: int) -> torch.Tensor:
    """Stable softmax from elementwise ops (torch.softmax spawns a thread pool per call on CPU,
    which costs milliseconds per tiny call on a loaded machine)."""
    e = torch.exp(a - a.amax(dim, keepdim=True))
    return e / e.sum(dim, keepdim=True)
