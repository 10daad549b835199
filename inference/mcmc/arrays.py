"""The array library NUTS's bookkeeping runs in: NumPy on the CPU, torch on a GPU.

The kernel (:mod:`.batched`, :mod:`.adapt`) is written once against the functions NumPy and
torch share (``where``, ``concatenate``, ``logaddexp``, ``clip``, ...) and takes its library from
its arrays (:func:`namespace`). A tree's bookkeeping is many operations on arrays of a few
numbers, where the cost is the call, not the arithmetic: NumPy's calls are 2 to 10 times cheaper
than torch's on the CPU (an add 0.3 against 1.2 µs, a slice 0.1 against 1.6 µs), so CPU chains
keep their state in NumPy and reach the family's torch potential through :func:`on_host`, which
shares memory both ways (no copies). On a GPU the state stays in torch, on the device.
"""

from __future__ import annotations

import numpy as np
import torch


def namespace(x):
    """``numpy`` for a NumPy array, ``torch`` for a tensor."""
    return np if isinstance(x, np.ndarray) else torch


class Random:
    """Uniform and standard normal draws in the library, dtype and device of ``like``, from one
    generator seeded by ``seed`` (NumPy's PCG64 on the host, torch's on the tensor's device)."""

    def __init__(self, seed: int, like):
        self.numpy = isinstance(like, np.ndarray)
        self.dtype = like.dtype
        if self.numpy:
            self.gen = np.random.default_rng(seed)
        else:
            self.device = like.device
            self.gen = torch.Generator(device=like.device).manual_seed(seed)

    def uniform(self, shape: tuple):
        if self.numpy:
            return self.gen.random(shape, dtype=self.dtype)
        return torch.rand(shape, generator=self.gen, device=self.device, dtype=self.dtype)

    def seeds(self, n: int) -> np.ndarray:
        """``n`` 64-bit seeds (uint64), for generators inside compiled code (host only)."""
        if not self.numpy:
            raise ValueError("seeds: drawn on the host only")
        return self.gen.integers(0, 2**64, size=n, dtype=np.uint64)

    def normal(self, shape: tuple):
        if self.numpy:
            return self.gen.standard_normal(shape, dtype=self.dtype)
        return torch.randn(shape, generator=self.gen, device=self.device, dtype=self.dtype)


def on_host(potential):
    """A torch potential ``q -> (U, grad U)`` as one on NumPy arrays (CPU tensors and arrays
    share memory: nothing is copied)."""

    def host(q: np.ndarray):
        U, g = potential(torch.from_numpy(q))
        return U.detach().numpy(), g.detach().numpy()

    return host


def host_state(q0: torch.Tensor):
    """``q0`` as the state the kernel should keep: a NumPy array for a CPU tensor, else itself."""
    return q0.detach().numpy().copy() if q0.device.type == "cpu" else q0


__all__ = ["Random", "host_state", "namespace", "on_host"]
