"""Amortized Gaussian guides: one encoder x_n -> q(z_n | x_n) shared by all data points.

* ``linear-diag``:  m = A x + a,  s = softplus(B x + b) + s_min            (diagonal covariance)
* ``linear-full``:  m = A x + a,  L = tril(C x + c) with diagonal softplus(.) + s_min
* ``mlp``:          h = MLP(x);  m = A h + a,  s = softplus(B h + b) + s_min  (diagonal)

For factor analysis the exact posterior N(M (x - mu), L^-1) is in the ``linear-full`` family
(mean linear in x, covariance constant), so a converged linear-full encoder has no amortization
gap there. Inputs are flattened to (b, d). ``s_min`` (``min_scale``, default 1e-6) only keeps the
log density finite. Encoders are built with the data's device and dtype.

Every encoder records its constructor arguments in ``guide.config`` (plain values, with the class
name under ``"type"``), so a saved ``state_dict`` can be loaded into
``encoder_from_config(config, like=x)``. :func:`save_encoder` writes both into one file
(``torch.save`` of plain tensors and JSON-able values, no pickled objects) and
:func:`load_encoder` rebuilds the encoder from it with ``torch.load(..., weights_only=True)``, so
a saved encoder needs no guessing of its hidden sizes. :func:`supports_direct` says whether a
built guide can be trained by the SVI engine's torch-native step.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from elbolab.guides.local import LatentGuide, data_of, latent_dim_of, no_extra
from elbolab.models.numerics import ACTIVATIONS, inverse_softplus
from elbolab.models.validate import integer, non_negative, positive

#: encoder classes by name (every subclass of EncoderGuide), for :func:`encoder_from_config`
ENCODER_TYPES: dict[str, type] = {}


def supports_direct(guide) -> bool:
    """Whether the SVI engine's torch-native step (``elbolab.inference.svi.engine.direct_step``) can train
    ``guide``: it must give q(z_n | x_n) for a minibatch as ``guide.distribution(x, idx)``."""
    return callable(getattr(guide, "distribution", None))


def encoder_body(data_dim: int, hidden: Sequence[int], activation: str, **kw) -> nn.Sequential:
    """``Linear -> activation`` for each hidden width (the trunk shared by the loc/scale heads)."""
    layers, width = [], data_dim
    for h in hidden:
        layers += [nn.Linear(width, h, **kw), ACTIVATIONS[activation]()]
        width = h
    return nn.Sequential(*layers)


class EncoderGuide(LatentGuide):
    """Shared parts of the amortized guides: input flattening, scale heads, ``config``."""

    amortized = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        ENCODER_TYPES[cls.__name__] = cls

    def __init__(self, data_dim, latent_dim, *, init_scale=1.0, min_scale=1e-6, site="z",
                 plate="data", name=None):
        super().__init__(latent_dim, site=site, plate=plate, name=name)
        self.data_dim = integer(data_dim, "data_dim", minimum=1)
        self.init_scale = positive(init_scale, "init_scale")
        self.min_scale = non_negative(min_scale, "min_scale")
        if self.min_scale >= self.init_scale:
            raise ValueError(f"min_scale: must be below init_scale={init_scale}, got {min_scale}")
        self.config = {"type": type(self).__name__, "data_dim": self.data_dim,
                       "latent_dim": self.latent_dim, "init_scale": self.init_scale,
                       "min_scale": self.min_scale, "site": self.site, "plate": self.plate,
                       "name": self.pyro_name}

    def _inputs(self, x, idx):
        rows = x if idx is None else x.index_select(0, idx)
        rows = rows.reshape(rows.shape[0], -1)
        if rows.shape[1] != self.data_dim:
            raise ValueError(f"data: encoder expects {self.data_dim} features, got {rows.shape[1]}")
        return rows

    def positive_scale(self, raw):
        """softplus(raw) + min_scale: a scale head's output as a standard deviation."""
        return F.softplus(raw) + self.min_scale

    def _init_scale_head(self, layer: nn.Linear, diag_index=None):
        with torch.no_grad():
            layer.weight.mul_(0.01)
            bias = inverse_softplus(self.init_scale - self.min_scale)
            if diag_index is None:
                layer.bias.fill_(bias)
            else:
                layer.bias.zero_()
                layer.bias[diag_index] = bias


class LinearEncoderGuide(EncoderGuide):
    """q(z_n | x_n) = N(A x_n + a, S(x_n)) with a linear diagonal or full-covariance head."""

    def __init__(self, data_dim, latent_dim, *, full=False, like, init_scale=1.0, min_scale=1e-6,
                 site="z", plate="data", name=None):
        self.kind = "linear-full" if full else "linear-diag"
        self.diagonal = not full
        super().__init__(data_dim, latent_dim, init_scale=init_scale, min_scale=min_scale,
                         site=site, plate=plate, name=name)
        self.config["full"] = bool(full)
        d, k = self.data_dim, self.latent_dim
        kw = {"device": like.device, "dtype": like.dtype}
        self.loc_net = nn.Linear(d, k, **kw)
        if full:
            rows, cols = torch.tril_indices(k, k, device=like.device)
            self.register_buffer("tril_rows", rows, persistent=False)
            self.register_buffer("tril_cols", cols, persistent=False)
            self.scale_net = nn.Linear(d, rows.numel(), **kw)
            self._init_scale_head(self.scale_net, (rows == cols).nonzero().squeeze(-1))
        else:
            self.scale_net = nn.Linear(d, k, **kw)
            self._init_scale_head(self.scale_net)

    def moments(self, x, idx=None):
        h = self._inputs(x, idx)
        loc = self.loc_net(h)
        raw = self.scale_net(h)
        if self.diagonal:
            return loc, torch.diag_embed(self.positive_scale(raw))
        k = self.latent_dim
        diag = self.tril_rows == self.tril_cols
        vals = torch.where(diag, self.positive_scale(raw), raw)
        tril = raw.new_zeros(raw.shape[0], k, k)
        tril[:, self.tril_rows, self.tril_cols] = vals
        return loc, tril


class MLPEncoderGuide(EncoderGuide):
    """q(z_n | x_n) = N(m(x_n), diag s(x_n)^2) from an MLP with configurable hidden sizes."""

    kind = "mlp"
    diagonal = True

    def __init__(self, data_dim, latent_dim, *, hidden=(64,), activation="softplus", like,
                 init_scale=1.0, min_scale=1e-6, site="z", plate="data", name=None):
        super().__init__(data_dim, latent_dim, init_scale=init_scale, min_scale=min_scale,
                         site=site, plate=plate, name=name)
        if isinstance(hidden, int):
            hidden = (hidden,)
        self.hidden = tuple(integer(h, "hidden", minimum=1) for h in hidden)
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"activation: must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.activation = activation
        self.config.update(hidden=list(self.hidden), activation=activation)
        kw = {"device": like.device, "dtype": like.dtype}
        self.body = encoder_body(self.data_dim, self.hidden, activation, **kw)
        width = self.hidden[-1] if self.hidden else self.data_dim
        self.loc_net = nn.Linear(width, self.latent_dim, **kw)
        self.scale_net = nn.Linear(width, self.latent_dim, **kw)
        self._init_scale_head(self.scale_net)

    def moments(self, x, idx=None):
        h = self.body(self._inputs(x, idx))
        return self.loc_net(h), torch.diag_embed(self.positive_scale(self.scale_net(h)))

    def loc_scale(self, x, idx=None):
        """(mean, standard deviation) of q(z_n | x_n) for the rows ``idx``, (b, k) each: what
        the SVI engine's direct step draws from without building a distribution object."""
        h = self.body(self._inputs(x, idx))
        return self.loc_net(h), self.positive_scale(self.scale_net(h))

    def distribution(self, x, idx=None):
        import pyro.distributions as dist

        return dist.Normal(*self.loc_scale(x, idx)).to_event(1)


def encoder_from_config(config: dict, *, like: torch.Tensor) -> EncoderGuide:
    """A new encoder of the type and settings in ``config`` (an encoder's ``config``), on the
    device and dtype of ``like``; load the saved ``state_dict`` into it."""
    cfg = dict(config)
    kind = cfg.pop("type", None)
    if kind not in ENCODER_TYPES:
        raise ValueError(f"config: type must be one of {sorted(ENCODER_TYPES)}, got {kind!r}")
    return ENCODER_TYPES[kind](**cfg, like=like)


#: the ``format`` tag of files written by :func:`save_encoder`
ENCODER_FORMAT = "elbolab-encoder/1"


def save_encoder(path, guide: EncoderGuide) -> Path:
    """Write ``guide``'s ``config`` and ``state_dict`` (tensors moved to the CPU, dtype kept) to
    ``path`` with ``torch.save``; the file is replaced whole (written aside, then renamed)."""
    if not isinstance(guide, EncoderGuide):
        inner = getattr(guide, "base_encoder", None)
        hint = " (a semi-amortized guide: save its .base_encoder)" if inner is not None else ""
        raise TypeError(f"guide: save_encoder needs an amortized encoder (mlp, linear-diag, "
                        f"linear-full, flow), got {type(guide).__name__}{hint}")
    config = json.loads(json.dumps(guide.config))  # plain JSON values (tuples become lists)
    payload = {"format": ENCODER_FORMAT, "config": config,
               "state_dict": {k: v.detach().cpu().clone() for k, v in guide.state_dict().items()}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def load_encoder(path, *, like: torch.Tensor | None = None) -> EncoderGuide:
    """The encoder saved by :func:`save_encoder` at ``path``, rebuilt from its config and loaded
    (``weights_only=True``), on the device and dtype of ``like`` (default: the CPU and the saved
    weights' dtype, so a float64 encoder comes back bit for bit)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no saved encoder at {path}")
    payload = torch.load(path, weights_only=True, map_location="cpu")
    if not isinstance(payload, dict) or payload.get("format") != ENCODER_FORMAT:
        raise ValueError(f"path: {path} is not an encoder saved by save_encoder "
                         f"(format {ENCODER_FORMAT!r})")
    state = payload["state_dict"]
    if like is None:
        dtypes = [v.dtype for v in state.values() if v.is_floating_point()]
        like = torch.empty(0, dtype=dtypes[0] if dtypes else torch.get_default_dtype())
    encoder = encoder_from_config(payload["config"], like=like)
    encoder.load_state_dict(state)
    return encoder


def data_dim_of(x) -> int:
    """Features per data point (a row of ``x`` flattened)."""
    return int(x[0].numel())


def _linear_builder(full: bool, label: str):
    def build(family, x, *, latent_dim=None, site="z", plate="data", name=None, init_scale=1.0,
              min_scale=1e-6, **options):
        no_extra(options, label)
        x = data_of(family, x)
        return LinearEncoderGuide(data_dim_of(x), latent_dim_of(family, latent_dim), full=full,
                                  like=x, init_scale=init_scale, min_scale=min_scale, site=site,
                                  plate=plate, name=name)

    build.__name__ = f"build_{label.replace('-', '_')}"
    build.__doc__ = f"``GuideSpec.build`` of the linear encoder ({label})."
    return build


build_linear_diag = _linear_builder(False, "linear-diag")
build_linear_full = _linear_builder(True, "linear-full")


def build_mlp(family, x, *, latent_dim=None, hidden=(64,), activation="softplus", site="z",
              plate="data", name=None, init_scale=1.0, min_scale=1e-6, **options):
    """``GuideSpec.build`` of the MLP encoder (diagonal Gaussian)."""
    no_extra(options, "mlp")
    x = data_of(family, x)
    return MLPEncoderGuide(data_dim_of(x), latent_dim_of(family, latent_dim), hidden=hidden,
                           activation=activation, like=x, init_scale=init_scale,
                           min_scale=min_scale, site=site, plate=plate, name=name)
