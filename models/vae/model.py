"""The VAE's generative model: a non-linear factor model (Kingma & Welling 2014).

    z_n ~ N(0, I_k),    x_n | z_n ~ p(x_n | f_theta(z_n)),    f_theta an MLP decoder.

Likelihoods (per pixel, independent given z):

* ``bernoulli``: x_nd ~ Bernoulli(sigmoid(f_theta(z_n)_d)), for binary data;
* ``gaussian``: x_nd ~ N(f_theta(z_n)_d, s2_d) with s2_d = floor + softplus(r_d), a learned
  variance per feature (``variance="feature"``) or, with ``variance="point"``, r_nd from a
  second decoder head, so each data point gets its own variances. Without the floor the
  likelihood of continuous data is unbounded (a variance collapsing onto one pixel); the floor
  is reported by :meth:`VAE.settings`.

With ``hidden=()`` the decoder is linear, f(z) = W z + mu, and the Gaussian model with per-feature
variance IS factor analysis (probabilistic PCA when all s2_d are equal):
log p(x) = log N(x; mu, W W^T + diag(s2)); :meth:`VAE.as_factor_analysis` returns those
parameters and :meth:`VAE.load_factor_analysis` sets them.

The decoder is a ``torch.nn.Module`` registered with ``pyro.module(module_name, ...)`` (default
"decoder"), so SVI trains it and its ``state_dict`` is what gets saved (:meth:`VAE.save`, loaded
with ``weights_only=True``). The family owns its decoder: the SVI engine fits a copy of the family,
and the VAE trainer (``elbolab.inference.svi.train_vae``) writes the trained weights back, so training twice
continues from the first run; give families that share a param store different
``module_name``s (engines isolate the store, so this matters only when calling Pyro code by hand).

Densities: ``local_prior(x)`` (N(0, I) per row) and ``observation_dist(z)`` are the objects the
Pyro model samples from; ``log_joint`` and ``log_likelihood`` are built from them by
:class:`elbolab.models.base.LocalLatentFamily`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

from elbolab.models.base import LocalLatentFamily
from elbolab.models.fa.params import FAParams
from elbolab.models.numerics import ACTIVATIONS, LOG_2PI, inverse_softplus, mlp
from elbolab.models.validate import as_data, choice, integer, positive

LIKELIHOODS = ("bernoulli", "gaussian")
VARIANCES = ("feature", "point")


class Decoder(nn.Module):
    """z -> logits (Bernoulli) or (mean, raw variance) (Gaussian)."""

    def __init__(self, latent_dim: int, data_dim: int, hidden: Sequence[int], likelihood: str,
                 variance: str, activation: str):
        super().__init__()
        self.likelihood, self.variance = likelihood, variance
        self.body = mlp([latent_dim, *hidden], activation) if hidden else nn.Sequential()
        self.act = ACTIVATIONS[activation]() if hidden else nn.Identity()
        width = hidden[-1] if hidden else latent_dim
        self.out = nn.Linear(width, data_dim)
        if likelihood == "gaussian" and variance == "feature":
            self.raw_var = nn.Parameter(torch.zeros(data_dim))
        elif likelihood == "gaussian":
            self.var_head = nn.Linear(width, data_dim)
            nn.init.zeros_(self.var_head.weight)
            nn.init.zeros_(self.var_head.bias)

    def forward(self, z: torch.Tensor, weights: dict | None = None):
        """``weights``: tensors replacing the parameters by name (e.g. detached copies)."""
        names = None if weights is None else {id(p): k for k, p in self.named_parameters()}

        def w(t):
            return t if names is None else weights[names[id(t)]]

        def linear(layer, h):
            return F.linear(h, w(layer.weight), w(layer.bias))

        h = z
        for layer in self.body:
            h = linear(layer, h) if isinstance(layer, nn.Linear) else layer(h)
        h = self.act(h)
        out = linear(self.out, h)
        if self.likelihood == "bernoulli":
            return out, None
        raw = w(self.raw_var) if self.variance == "feature" else linear(self.var_head, h)
        return out, raw


class VAE(LocalLatentFamily):
    """Deep latent Gaussian model with an MLP decoder; see the module docstring.

    Its densities are those of :meth:`local_prior` and :meth:`observation_dist`, the objects the
    Pyro model samples from (``log_joint`` / ``log_likelihood`` come from
    :class:`elbolab.models.base.LocalLatentFamily`).
    """

    name = "vae"
    max_plate_nesting = 1
    latent_site = "z"
    obs_site = "x"

    def __init__(self, data_dim: int, latent_dim: int = 8, hidden: Sequence[int] = (256,),
                 likelihood: str = "bernoulli", variance: str = "feature",
                 var_floor: float = 1e-3, activation: str = "relu", seed: int = 0,
                 module_name: str = "decoder"):
        self.data_dim = integer(data_dim, "data_dim", minimum=1)
        self.latent_dim = integer(latent_dim, "latent_dim", minimum=1)
        if isinstance(hidden, int):
            hidden = (hidden,)
        self.hidden = tuple(integer(h, "hidden", minimum=1) for h in hidden)
        self.likelihood = choice(likelihood, "likelihood", LIKELIHOODS)
        self.variance = choice(variance, "variance", VARIANCES)
        self.var_floor = positive(var_floor, "var_floor")
        self.activation = choice(activation, "activation", list(ACTIVATIONS))
        self.seed = integer(seed, "seed", minimum=0)
        if not isinstance(module_name, str) or not module_name or "$$$" in module_name:
            raise ValueError(f"module_name: must be a plain non-empty string, got {module_name!r}")
        self.module_name = module_name
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.decoder = Decoder(self.latent_dim, self.data_dim, self.hidden, self.likelihood,
                                   self.variance, self.activation)

    # ------------------------------------------------------------------ data and settings
    def settings(self) -> dict:
        out = {"data_dim": self.data_dim, "latent_dim": self.latent_dim,
               "hidden": list(self.hidden), "likelihood": self.likelihood,
               "activation": self.activation, "seed": self.seed, "module_name": self.module_name}
        out.update(variance=self.variance, var_floor=self.var_floor)
        return out

    @property
    def linear(self) -> bool:
        return not self.hidden

    def check_data(self, x) -> torch.Tensor:
        x = as_data(x, "data", ndim=2)
        if x.shape[1] != self.data_dim:
            raise ValueError(f"data: expected {self.data_dim} columns, got shape {tuple(x.shape)}")
        if self.likelihood == "bernoulli" and not ((x == 0) | (x == 1)).all():
            raise ValueError("data: the bernoulli likelihood needs 0/1 values "
                             "(binarize first, e.g. elbolab.models.data.images.binarize)")
        return x

    def to(self, ref: torch.Tensor) -> VAE:
        """Move the decoder to the device and dtype of ``ref`` (in place; tensors keep identity)."""
        p = next(self.decoder.parameters())
        if p.device != ref.device or p.dtype != ref.dtype:
            self.decoder.to(device=ref.device, dtype=ref.dtype)
        return self

    # ------------------------------------------------------------------ the model
    def frozen_weights(self) -> dict:
        """Detached copies of the decoder's weights, cached until a weight changes (in place or
        replaced), so that NUTS's JIT-compiled potential sees constants."""
        key = tuple((id(p), p._version, p.device, p.dtype) for p in self.decoder.parameters())
        if getattr(self, "_frozen_key", None) != key:
            with torch.no_grad():
                self._frozen = {k: p.detach().clone() for k, p in self.decoder.named_parameters()}
            self._frozen_key = key
        return self._frozen

    def decode(self, z: torch.Tensor, detach: bool = False):
        """(logits, None) or (mean, variance) for latents ``z`` (..., k), with the decoder moved
        to z's device and dtype; ``detach``: with constant copies of the weights
        (:meth:`frozen_weights`)."""
        self.to(z)
        out, raw = self.decoder(z, self.frozen_weights() if detach else None)
        if raw is None:
            return out, None
        return out, self.var_floor + F.softplus(raw)

    def local_prior(self, x: torch.Tensor) -> dist.Distribution:
        """p(z_n) = N(0, I_k) for the rows of ``x``: batch (n,), event (k,)."""
        zeros = torch.zeros(x.shape[0], self.latent_dim, device=x.device, dtype=x.dtype)
        return dist.Normal(zeros, 1.0).to_event(1)

    def observation_dist(self, z: torch.Tensor, detach: bool = False) -> dist.Distribution:
        """p(x | z): batch shape ``z.shape[:-1]``, event shape (D,); ``detach`` as in
        :meth:`decode`."""
        out, var = self.decode(z, detach)
        if self.likelihood == "bernoulli":
            base = dist.Bernoulli(logits=out, validate_args=False)
        else:
            base = dist.Normal(out, var.sqrt().expand_as(out), validate_args=False)
        return base.to_event(1)

    def model(self, x: torch.Tensor, subsample_size: int | None = None):
        """z_n ~ N(0, I), x_n ~ p(x | f(z_n)) in plate "data" (dim -1); minibatches scale by N/B."""
        self.to(x)
        # the module computes with its own weights; in a fresh store they ARE the store's
        pyro.module(self.module_name, self.decoder)
        super().model(x, subsample_size)

    def log_likelihood(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x_n | z_n), shape (..., n): the density of :meth:`observation_dist` written out
        (no distribution objects; the SVI engine's direct step calls it every step):
        Bernoulli sum_d [x log sigmoid(f) + (1 - x) log sigmoid(-f)] = -BCE-with-logits;
        Gaussian -1/2 sum_d [(x - m)^2 / v + log v + log 2 pi]."""
        out, var = self.decode(z)
        if var is None:
            return -F.binary_cross_entropy_with_logits(out, x.expand_as(out),
                                                       reduction="none").sum(-1)
        return -0.5 * ((x - out).pow(2) / var + var.log() + LOG_2PI).sum(-1)

    def log_joint(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log N(z_n; 0, I) + log p(x_n | z_n), shape (..., n) (:meth:`local_prior` written out)."""
        prior = -0.5 * z.pow(2).sum(-1) - 0.5 * self.latent_dim * LOG_2PI
        return prior + self.log_likelihood(x, z)

    def mcmc_model(self, x: torch.Tensor, subsample_size: int | None = None):
        """The same model with the decoder's weights as constants (detached, not registered):
        NUTS over z for a fixed decoder, and JIT-traceable."""
        self.to(x)
        with pyro.plate("data", x.shape[0], subsample_size=subsample_size, dim=-1,
                        device=x.device) as idx:
            xb = x if subsample_size is None else x.index_select(0, idx)
            z = pyro.sample(self.latent_site, self.local_prior(xb))
            pyro.sample(self.obs_site, self.observation_dist(z, detach=True), obs=xb)

    def mcmc_init(self, x: torch.Tensor) -> None:
        """No special start: Pyro's initialization of z."""
        return None

    # ------------------------------------------------------------------ densities
    def pointwise_log_likelihood(self, samples: dict, x: torch.Tensor) -> torch.Tensor:
        """log p(x_n | z_n) for draws ``samples["z"]`` (chain, draw, n, k): (chain, draw, n)."""
        with torch.no_grad():
            return self.log_likelihood(x, samples[self.latent_site].to(x))

    def posterior_invariants(self, samples: dict, x: torch.Tensor) -> dict:
        """With the decoder fixed z is identified: diagnose z itself and the log likelihood."""
        z = samples[self.latent_site]
        return {"z": z, "log_lik": self.pointwise_log_likelihood(samples, x).sum(-1)}

    # ------------------------------------------------------------------ generation
    def simulate(self, n: int, *, seed: int = 0, device=None, dtype=torch.float64,
                 return_latents: bool = False):
        """Draw ``n`` points from the model with the current decoder (seeded, CPU generator):
        z from N(0, I), x from the parameters of :meth:`observation_dist`."""
        n = integer(n, "n", minimum=1)
        gen = torch.Generator().manual_seed(integer(seed, "seed", minimum=0))
        ref = torch.empty(0, dtype=dtype, device=device)
        z = torch.randn(n, self.latent_dim, generator=gen, dtype=dtype).to(ref)
        with torch.no_grad():
            base = self.observation_dist(z).base_dist
            if self.likelihood == "bernoulli":
                u = torch.rand(base.probs.shape, generator=gen, dtype=dtype).to(ref)
                x = (u < base.probs).to(dtype)
            else:
                eps = torch.randn(base.loc.shape, generator=gen, dtype=dtype).to(ref)
                x = base.loc + base.scale * eps
        return (x, z) if return_latents else x

    def mean(self, z: torch.Tensor) -> torch.Tensor:
        """E[x | z]: pixel probabilities (Bernoulli) or decoder means (Gaussian)."""
        return self.observation_dist(z).mean

    # ------------------------------------------------------------------ factor analysis
    def _check_fa(self) -> None:
        if not (self.linear and self.likelihood == "gaussian" and self.variance == "feature"):
            raise ValueError("decoder: only a linear decoder (hidden=()) with a gaussian "
                             "likelihood and per-feature variance is a factor analysis model")

    def as_factor_analysis(self):
        """FAParams(W (D, k), mu (D,), psi (D,)) of the linear-Gaussian decoder: same model."""
        self._check_fa()
        with torch.no_grad():
            W = self.decoder.out.weight.detach().clone()
            mu = self.decoder.out.bias.detach().clone()
            psi = self.var_floor + F.softplus(self.decoder.raw_var.detach())
        return FAParams(W=W, mu=mu, psi=psi)

    def load_factor_analysis(self, params) -> VAE:
        """Set the linear decoder to FAParams (W (D, k), mu, psi); needs psi > var_floor."""
        self._check_fa()
        W, mu, psi = (torch.as_tensor(t) for t in (params.W, params.mu, params.psi))
        if W.shape != (self.data_dim, self.latent_dim):
            want = (self.data_dim, self.latent_dim)
            raise ValueError(f"W: expected shape {want}, got {tuple(W.shape)}")
        if mu.shape != (self.data_dim,) or psi.shape != (self.data_dim,):
            raise ValueError(f"mu: mu and psi need shape ({self.data_dim},)")
        if not (psi > self.var_floor).all():
            raise ValueError(f"psi: every noise variance must exceed var_floor={self.var_floor}")
        p = self.decoder.out.weight
        with torch.no_grad():
            self.decoder.out.weight.copy_(W.to(p))
            self.decoder.out.bias.copy_(mu.to(p))
            self.decoder.raw_var.copy_(inverse_softplus(psi.to(p) - self.var_floor))
        return self

    # ------------------------------------------------------------------ saving
    def state_dict(self) -> dict:
        return {k: v.detach().clone() for k, v in self.decoder.state_dict().items()}

    def load_state_dict(self, state: dict) -> VAE:
        p = next(self.decoder.parameters())
        self.decoder.load_state_dict({k: v.to(p) for k, v in state.items()})
        return self

    def save(self, path: str | Path) -> Path:
        """Decoder state_dict plus hyperparameters (plain values only)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"settings": self.settings(), "decoder": self.state_dict()}, path)
        return path

    @classmethod
    def load(cls, path: str | Path, *, map_location="cpu") -> VAE:
        payload = torch.load(Path(path), weights_only=True, map_location=map_location)
        s = dict(payload["settings"])
        vae = cls(s.pop("data_dim"), s.pop("latent_dim"), tuple(s.pop("hidden")), **s)
        saved = next(iter(payload["decoder"].values()))  # keep the saved device and dtype
        vae.decoder.to(device=saved.device, dtype=saved.dtype)
        return vae.load_state_dict(payload["decoder"])
