"""The parameters of factor analysis / PPCA: loadings W (d, k), mean mu (d,), noise psi (d,)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from elbolab.models.validate import float_tensor_fields


@dataclass
class FAParams:
    """W (d, k) loadings, mu (d,) mean, psi (d,) diagonal noise variances."""

    W: torch.Tensor
    mu: torch.Tensor
    psi: torch.Tensor

    def __post_init__(self):
        float_tensor_fields(self, ("W", "mu", "psi"))
        if self.W.dim() != 2:
            raise ValueError(f"W: expected shape (d, k), got {tuple(self.W.shape)}")
        d = self.W.shape[0]
        for name in ("mu", "psi"):
            if tuple(getattr(self, name).shape) != (d,):
                shape = tuple(getattr(self, name).shape)
                raise ValueError(f"{name}: expected shape ({d},), got {shape}")
        if not (self.psi > 0).all():
            raise ValueError("psi: noise variances must be > 0")

    @property
    def dim(self) -> int:
        return self.W.shape[0]

    @property
    def latent_dim(self) -> int:
        return self.W.shape[1]

    def to(self, ref=None, dtype=None) -> FAParams:
        """Move to the device/dtype of a reference tensor (or an explicit device and dtype)."""
        if isinstance(ref, torch.Tensor):
            device, dtype = ref.device, ref.dtype
        else:
            device = ref
        return FAParams(*(t.to(device=device, dtype=dtype) for t in (self.W, self.mu, self.psi)))

    def covariance(self) -> torch.Tensor:
        """C = W W^T + Psi (d, d)."""
        return self.W @ self.W.T + torch.diag(self.psi)

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {"W": self.W, "mu": self.mu, "psi": self.psi}

    @classmethod
    def from_dict(cls, d: dict) -> FAParams:
        missing = [k for k in ("W", "mu", "psi") if k not in d]
        if missing:
            raise ValueError(f"params: missing entries {missing}")
        return cls(d["W"], d["mu"], d["psi"])

    def save(self, path) -> Path:
        """A plain dict of tensors (loads with ``torch.load(weights_only=True)``)."""
        path = Path(path)
        torch.save({k: v.detach().cpu() for k, v in self.as_dict().items()}, path)
        return path

    @classmethod
    def load(cls, path, map_location=None) -> FAParams:
        return cls.from_dict(torch.load(path, map_location=map_location, weights_only=True))
