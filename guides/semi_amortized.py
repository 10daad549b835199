"""Semi-amortized guide (Kim, Wiseman, Miller, Sontag & Rush 2018, "Semi-amortized VAEs").

An amortized diagonal-Gaussian encoder gives lambda_0(x_n) = (m_0, log s_0); then K steps of
stochastic gradient ascent on each data point's own ELBO refine a local copy (Kim et al. Alg. 1):

    ELBO_n(lambda) = E_{eps}[log p(x_n, m + s * eps)] + sum_j log s_j + k/2 log(2 pi e),
    v_{t+1} = mu v_t + g_t,  lambda_{t+1} = lambda_t + lr * v_{t+1},   g_t = grad ELBO_n(lambda_t),

with ``inner_particles`` reparameterized draws per step, each point's gradient clipped to norm
``max_grad_norm``; q(z_n | x_n) = N(m_K, diag s_K^2). Defaults (lr 0.03, 32 draws, no momentum)
were chosen on binarized digits (z = 8): single-draw steps with momentum made q worse there.
log p(x_n, z) comes from ``family.log_joint(x, z) -> (..., n)`` (model parameters are read,
never changed by the inner loop).

By name (``elbolab.guides.for_family(vae)["semi-amortized"]``, ``svi.fit(..., guide="semi-amortized")``)
without ``encoder=``, a NEW encoder is built: the ``mlp`` encoder with :data:`DEFAULT_ENCODER`
(one hidden layer of 64 softplus units, diagonal Gaussian; override with ``encoder_options``),
trained through the refinement with ``encoder_grad="straight-through"`` (the default for a new
encoder; ``"full"`` is allowed, ``"none"`` is an error since the encoder would never learn).
With ``encoder=`` (a trained amortized guide with ``moments``) the default is ``"none"``.

Gradients to the encoder (``encoder_grad``):

* ``"none"`` (default with a given encoder): the encoder is frozen -- lambda_0 is computed without gradients and its
  weights are not registered, so SVI with this guide trains only the model (the setting of the
  gap study: how much of the amortization gap K steps recover).
* ``"straight-through"``: the outer ELBO's gradient at lambda_K is passed to lambda_0 as if
  d lambda_K / d lambda_0 = I (cheap; biased gradient for the encoder).
* ``"full"``: back-propagation through the K inner steps (``create_graph=True``, second order);
  the exact gradient of ELBO(lambda_K(x; phi), theta) (Kim et al. use a finite-difference
  Hessian-vector product for the same quantity).

Each call re-runs the refinement with fresh draws (global torch RNG), so an ELBO or IWAE estimate
averaged over calls is the expectation over the refinement noise too.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch

from elbolab.guides.local import LatentGuide, data_of, latent_dim_of, no_extra
from elbolab.models.validate import choice, integer, non_negative, positive

ENCODER_GRADS = ("none", "straight-through", "full")
#: the encoder built when none is given (options of ``elbolab.guides.amortized.build_mlp``)
DEFAULT_ENCODER = {"hidden": (64,), "activation": "softplus"}


class SemiAmortizedGuide(LatentGuide):
    """Encoder output refined by ``steps`` SVI steps per data point (module docstring)."""

    kind = "semi-amortized"
    diagonal = True
    amortized = True

    def __init__(self, family, encoder: LatentGuide, *, steps=10, inner_lr=0.03,
                 momentum=0.0, inner_particles=32, max_grad_norm=10.0, encoder_grad="none",
                 site="z", plate="data", name=None):
        super().__init__(encoder.latent_dim, site=site, plate=plate, name=name)
        if not callable(getattr(family, "log_joint", None)):
            raise TypeError("family: the semi-amortized guide needs family.log_joint(x, z)")
        if not callable(getattr(encoder, "moments", None)):
            raise TypeError("encoder: needs a moments(x, idx) -> (loc, scale_tril) method")
        self.steps = integer(steps, "steps", minimum=0)
        self.inner_lr = positive(inner_lr, "inner_lr")
        self.momentum = non_negative(momentum, "momentum")
        self.inner_particles = integer(inner_particles, "inner_particles", minimum=1)
        self.max_grad_norm = positive(max_grad_norm, "max_grad_norm", allow_inf=True)
        self.encoder_grad = choice(encoder_grad, "encoder_grad", ENCODER_GRADS)
        self._family = family  # not a submodule: the model's weights are not the guide's
        if self.encoder_grad == "none":
            object.__setattr__(self, "_encoder", encoder)  # frozen: not registered with Pyro
        else:
            self.encoder = encoder

    @property
    def base_encoder(self) -> LatentGuide:
        return self._encoder if self.encoder_grad == "none" else self.encoder

    def initial(self, x, idx=None):
        """lambda_0 = (loc, log scale) from the encoder (diagonal of its scale_tril)."""
        if self.encoder_grad == "none":
            with torch.no_grad():
                loc, tril = self.base_encoder.moments(x, idx)
        else:
            loc, tril = self.base_encoder.moments(x, idx)
        return loc, tril.diagonal(dim1=-2, dim2=-1).log()

    def refine(self, x, idx=None, steps: int | None = None):
        """(m_K, log s_K) after ``steps`` (default ``self.steps``) inner SVI steps."""
        steps = self.steps if steps is None else integer(steps, "steps", minimum=0)
        rows = x if idx is None else x.index_select(0, idx)
        loc0, logs0 = self.initial(x, idx)
        # second-order tracking only where the outer computation records gradients
        full = self.encoder_grad == "full" and torch.is_grad_enabled() and loc0.requires_grad
        loc, logs = (loc0, logs0) if full else (loc0.detach(), logs0.detach())
        v_loc, v_logs = torch.zeros_like(loc), torch.zeros_like(logs)
        with torch.enable_grad():
            if not full:
                loc, logs = loc.requires_grad_(True), logs.requires_grad_(True)
            for _ in range(steps):
                eps = torch.randn((self.inner_particles, *loc.shape), device=loc.device,
                                  dtype=loc.dtype)
                z = loc + logs.exp() * eps
                # per-point ELBO, summed over points (points do not interact)
                elbo = self._family.log_joint(rows, z).mean(0) + logs.sum(-1)
                g_loc, g_logs = torch.autograd.grad(elbo.sum(), (loc, logs), create_graph=full)
                sq = (g_loc**2).sum(-1, keepdim=True) + (g_logs**2).sum(-1, keepdim=True)
                norm = torch.sqrt(sq)
                factor = torch.clamp(self.max_grad_norm / (norm + 1e-12), max=1.0)
                if not full:
                    factor = factor.detach()
                v_loc = self.momentum * v_loc + factor * g_loc
                v_logs = self.momentum * v_logs + factor * g_logs
                loc = loc + self.inner_lr * v_loc
                logs = logs + self.inner_lr * v_logs
                if not full:
                    loc = loc.detach().requires_grad_(True)
                    logs = logs.detach().requires_grad_(True)
                    v_loc, v_logs = v_loc.detach(), v_logs.detach()
        if full:
            return loc, logs
        if self.encoder_grad == "straight-through":
            return loc0 + (loc - loc0).detach(), logs0 + (logs - logs0).detach()
        return loc.detach(), logs.detach()

    def moments(self, x, idx=None):
        loc, logs = self.refine(x, idx)
        return loc, torch.diag_embed(logs.exp())

    def distribution(self, x, idx=None):
        loc, logs = self.refine(x, idx)
        return dist.Normal(loc, logs.exp()).to_event(1)


def build_semi_amortized(family, x, *, encoder=None, latent_dim=None, steps=10, inner_lr=0.03,
                         momentum=0.0, inner_particles=32, max_grad_norm=10.0,
                         encoder_grad=None, encoder_options=None, site="z", plate="data",
                         name=None, **options):
    """``GuideSpec.build``: wraps ``encoder`` (a trained amortized guide with ``moments``;
    ``encoder_grad`` defaults to "none"), or builds a new ``mlp`` encoder from
    :data:`DEFAULT_ENCODER` updated with ``encoder_options`` (``encoder_grad`` defaults to
    "straight-through" and must not be "none")."""
    no_extra(options, "semi-amortized")
    x = data_of(family, x)
    if encoder is None:
        from elbolab.guides.amortized import build_mlp

        if encoder_grad is None:
            encoder_grad = "straight-through"
        if encoder_grad == "none":
            raise ValueError("encoder_grad: a new (untrained) encoder needs 'straight-through' "
                             "or 'full' so that it learns; or pass encoder=")
        opts = {**DEFAULT_ENCODER, "site": site, "plate": plate, **(encoder_options or {})}
        encoder = build_mlp(family, x, latent_dim=latent_dim_of(family, latent_dim), **opts)
    elif encoder_options:
        raise TypeError("encoder_options: only for a new encoder; got encoder= as well")
    if encoder_grad is None:
        encoder_grad = "none"
    return SemiAmortizedGuide(family, encoder, steps=steps, inner_lr=inner_lr, momentum=momentum,
                              inner_particles=inner_particles, max_grad_norm=max_grad_norm,
                              encoder_grad=encoder_grad, site=site, plate=plate, name=name)


__all__ = ["DEFAULT_ENCODER", "ENCODER_GRADS", "SemiAmortizedGuide", "build_semi_amortized"]
