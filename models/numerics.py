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
