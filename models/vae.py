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
with ``weights_only=True``). The family owns its decoder: fitting it twice continues from the
weights of the first fit; make one family per trained model, and give families that share a
param store different ``module_name``s (engines isolate the store, so this matters only when
calling Pyro code by hand).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

from models.base import ModelFamily
from models.validate import as_data, choice, integer, positive

LIKELIHOODS = ("bernoulli", "gaussian")
VARIANCES = ("feature", "point")
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "softplus": nn.Softplus, "elu": nn.ELU}


def mlp(sizes: Sequence[int], activation: str = "relu") -> nn.Sequential:
    """Linear layers ``sizes[0] -> ... -> sizes[-1]`` with ``activation`` between them."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


def inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    """x with softplus(x) = y (y > 0), stable for large y."""
    return y + torch.log(-torch.expm1(-y))


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
        names = {id(p): k for k, p in self.named_parameters()}

        def w(t):
            return t if weights is None else weights[names[id(t)]]

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


class VAE(ModelFamily):
    """Deep latent Gaussian model with an MLP decoder; see the module docstring."""

    name = "vae"
    default_guide = "mlp"
    max_plate_nesting = 1

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
                             "(binarize first, e.g. models.digits.binarize)")
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
        """(logits, None) or (mean, variance) for latents ``z`` (..., k); ``detach``: with
        constant copies of the weights (:meth:`frozen_weights`)."""
        out, raw = self.decoder(z, self.frozen_weights() if detach else None)
        if raw is None:
            return out, None
        return out, self.var_floor + F.softplus(raw)

    def observation_dist(self, z: torch.Tensor, detach: bool = False) -> dist.Distribution:
        """p(x | z): batch shape ``z.shape[:-1]``, event shape (D,)."""
        out, var = self.decode(z, detach)
        if self.likelihood == "bernoulli":
            base = dist.Bernoulli(logits=out, validate_args=False)
        else:
            base = dist.Normal(out, var.sqrt().expand_as(out), validate_args=False)
        return base.to_event(1)

    def prior(self, n: int, ref: torch.Tensor) -> dist.Distribution:
        """p(z) for ``n`` points: batch (n,), event (k,)."""
        zeros = torch.zeros(n, self.latent_dim, device=ref.device, dtype=ref.dtype)
        return dist.Normal(zeros, 1.0).to_event(1)

    def model(self, x: torch.Tensor, subsample_size: int | None = None):
        """z_n ~ N(0, I), x_n ~ p(x | f(z_n)) in plate "data" (dim -1); minibatches scale by N/B."""
        self.to(x)
        # the module computes with its own weights; in a fresh store they ARE the store's
        pyro.module(self.module_name, self.decoder)
        n = x.shape[0]
        with pyro.plate("data", n, subsample_size=subsample_size, dim=-1, device=x.device) as idx:
            xb = x if subsample_size is None else x.index_select(0, idx)
            z = pyro.sample("z", self.prior(xb.shape[0], x))
            pyro.sample("x", self.observation_dist(z), obs=xb)

    def mcmc_model(self, x: torch.Tensor, subsample_size: int | None = None):
        """The same model with the decoder's weights as constants (detached, not registered):
        NUTS over z for a fixed decoder, and JIT-traceable."""
        self.to(x)
        n = x.shape[0]
        with pyro.plate("data", n, subsample_size=subsample_size, dim=-1, device=x.device) as idx:
            xb = x if subsample_size is None else x.index_select(0, idx)
            z = pyro.sample("z", self.prior(xb.shape[0], x))
            pyro.sample("x", self.observation_dist(z, detach=True), obs=xb)

    # ------------------------------------------------------------------ densities
    def log_likelihood(self, x: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None = None):
        """log p(x_n | z_n) summed over the pixels (only where ``mask`` is True): shape (..., n)."""
        self.to(z)
        out, var = self.decode(z)
        if self.likelihood == "bernoulli":
            lp = -F.binary_cross_entropy_with_logits(out, x.expand_as(out), reduction="none")
        else:
            lp = -0.5 * (math.log(2 * math.pi) + var.log() + (x - out) ** 2 / var)
        if mask is not None:
            lp = torch.where(mask, lp, torch.zeros((), device=lp.device, dtype=lp.dtype))
        return lp.sum(-1)

    def log_prior(self, z: torch.Tensor) -> torch.Tensor:
        """log N(z; 0, I): shape z.shape[:-1]."""
        return -0.5 * (z.pow(2).sum(-1) + self.latent_dim * math.log(2 * math.pi))

    def log_joint(self, x: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None = None):
        """log p(x_n, z_n) = log p(z_n) + log p(x_n | z_n), shape (..., n) for z (..., n, k)."""
        return self.log_prior(z) + self.log_likelihood(x, z, mask)

    def pointwise_log_likelihood(self, samples: dict, x: torch.Tensor) -> torch.Tensor:
        """log p(x_n | z_n) for draws ``samples["z"]`` (chain, draw, n, k): (chain, draw, n)."""
        with torch.no_grad():
            return self.log_likelihood(x, samples["z"].to(x))

    def mcmc_invariants(self, samples: dict, x: torch.Tensor) -> dict:
        """With the decoder fixed z is identified: diagnose z itself and the log likelihood."""
        return {"z": samples["z"], "log_lik": self.pointwise_log_likelihood(samples, x).sum(-1)}

    # ------------------------------------------------------------------ generation
    def simulate(self, n: int, *, seed: int = 0, device=None, dtype=torch.float64,
                 return_latents: bool = False):
        """Draw ``n`` points from the model with the current decoder (seeded, CPU generator)."""
        n = integer(n, "n", minimum=1)
        gen = torch.Generator().manual_seed(integer(seed, "seed", minimum=0))
        ref = torch.empty(0, dtype=dtype, device=device)
        z = torch.randn(n, self.latent_dim, generator=gen, dtype=dtype).to(ref)
        self.to(ref)
        with torch.no_grad():
            out, var = self.decode(z)
            if self.likelihood == "bernoulli":
                u = torch.rand(out.shape, generator=gen, dtype=dtype).to(ref)
                x = (u < torch.sigmoid(out)).to(dtype)
            else:
                eps = torch.randn(out.shape, generator=gen, dtype=dtype).to(ref)
                x = out + var.sqrt() * eps
        return (x, z) if return_latents else x

    def mean(self, z: torch.Tensor) -> torch.Tensor:
        """E[x | z]: pixel probabilities (Bernoulli) or decoder means (Gaussian)."""
        self.to(z)
        out, _ = self.decode(z)
        return torch.sigmoid(out) if self.likelihood == "bernoulli" else out

    # ------------------------------------------------------------------ factor analysis
    def _check_fa(self) -> None:
        if not (self.linear and self.likelihood == "gaussian" and self.variance == "feature"):
            raise ValueError("decoder: only a linear decoder (hidden=()) with a gaussian "
                             "likelihood and per-feature variance is a factor analysis model")

    def as_factor_analysis(self):
        """FAParams(W (D, k), mu (D,), psi (D,)) of the linear-Gaussian decoder: same model."""
        from models.fa import FAParams

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
        return vae.load_state_dict(payload["decoder"])

    # ------------------------------------------------------------------ guides
    def guides(self) -> dict:
        """Guides by name: the shared latent guides (``guides.latent_guides``, no "exact"), the
        amortized ``flow`` encoder, the per-point ``local-flow`` and ``semi-amortized``."""
        return vae_guides()


def vae_guides() -> dict:
    """The shared latent guides without "exact" (flows and semi-amortized included)."""
    from guides import latent_guides

    return latent_guides(exact=False)


#: guides trained with the engine's torch-native step (same estimator, ~1.5x faster than Pyro's
#: Trace_ELBO here; see bench/vae_throughput.py); the others go through Pyro's ELBO
DIRECT_GUIDES = ("mlp", "linear-diag", "linear-full", "flow")


def train_vae(family: VAE, x, *, guide="mlp", guide_options: dict | None = None, epochs: int = 50,
              batch_size: int = 128, lr: float = 1e-3, val_data=None, eval_every_epochs: int = 1,
              patience: int = 0, checkpoint=None, checkpoint_every_epochs: int = 0,
              eval_particles: int = 100, seed: int = 0, progress: bool = False, **settings):
    """Train decoder and encoder by SVI (Adam, minibatches of ``batch_size`` with the plate's N/B
    scaling) through :func:`inference.svi.fit`; epochs become steps of ceil(n / batch_size).

    With ``val_data`` and ``patience`` it stops early on the held-out ELBO (evaluated every
    ``eval_every_epochs``) and restores the best parameters; ``checkpoint`` (a path) gets the
    param store's tensors every ``checkpoint_every_epochs`` (state dicts, ``weights_only``).
    Returns the engine's FitResult (``state["guide"]`` is the trained encoder). Extra keyword
    arguments go to ``inference.svi.Settings``.
    """
    from inference import svi

    x = family.check_data(x)
    n = x.shape[0]
    epochs = integer(epochs, "epochs", minimum=1)
    batch = min(integer(batch_size, "batch_size", minimum=1), n)
    eval_every_epochs = integer(eval_every_epochs, "eval_every_epochs", minimum=0)
    checkpoint_every_epochs = integer(checkpoint_every_epochs, "checkpoint_every_epochs", minimum=0)
    per_epoch = math.ceil(n / batch)
    with_val = val_data is not None and eval_every_epochs > 0
    s = svi.Settings(
        num_steps=epochs * per_epoch, lr=lr, subsample_size=batch if batch < n else None,
        val_data=val_data if with_val else None,
        eval_every=eval_every_epochs * per_epoch if with_val else 0,
        patience=patience if with_val else 0, checkpoint=checkpoint,
        checkpoint_every=checkpoint_every_epochs * per_epoch if checkpoint else 0,
        eval_particles=eval_particles, eval_batch=min(eval_particles, 50), progress=progress,
        **{"num_posterior_samples": 0, "direct": guide in DIRECT_GUIDES, **settings},
    )
    return svi.fit(family, x, s, seed=seed, guide=guide, guide_options=guide_options)


def pseudo_gibbs_impute(family: VAE, encoder, x, mask=None, *, steps: int = 50,
                        burn_in: int = 10, fill=None, seed: int = 0):
    """Pseudo-Gibbs imputation (Rezende, Mohamed & Wierstra 2014, sec. 5.3): start from ``fill``
    (a (D,) or (n, D) tensor; default: the observed column means, 0.5 where a column has none),
    then repeat z ~ q(z | x~), x~_mis ~ p(x_mis | z) (observed entries kept); the result averages
    E[x_mis | z] over the ``steps - burn_in`` last sweeps. ``encoder``: an amortized guide with
    ``distribution(x)`` (e.g. ``guides.make("mlp", ...)`` after training). Returns x with the
    missing entries (NaN, or ``mask`` True) filled.
    """
    from inference.evidence import seeded
    from inference.impute import missing_mask

    x, mask = missing_mask(x, mask)
    steps = integer(steps, "steps", minimum=1)
    burn_in = integer(burn_in, "burn_in", minimum=0, maximum=steps - 1)
    if fill is None:
        obs = (~mask).to(x.dtype)
        zero = torch.zeros((), device=x.device, dtype=x.dtype)
        total = torch.where(mask, zero, x).sum(0)
        fill = torch.where(obs.sum(0) > 0, total / obs.sum(0).clamp_min(1), zero + 0.5)
    fill = torch.as_tensor(fill, device=x.device, dtype=x.dtype).expand_as(x)
    filled = torch.where(mask, fill, x)
    acc = torch.zeros_like(filled)
    with seeded(seed, x.device), torch.no_grad():
        for t in range(steps):
            z = encoder.distribution(filled).sample()
            draw = family.observation_dist(z).sample()
            if t >= burn_in:
                acc += family.mean(z)
            filled = torch.where(mask, draw, x)
    return torch.where(mask, acc / (steps - burn_in), x)
