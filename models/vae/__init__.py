"""The variational autoencoder's generative model (Bernoulli, or Gaussian with learned variance)."""

from elbolab.models.vae.model import VAE, Decoder

__all__ = ["VAE", "Decoder"]
