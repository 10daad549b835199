"""The variational autoencoder example (Pyro's examples/vae/vae.py, pyro-ppl/pyro at
ff6ae1c9572591791aae8842bcd702fcf0b46fd6), with its own ``Encoder`` and ``Decoder`` modules,
registered in the model and the guide with ``pyro.module`` as the example does.

Sized down to run in seconds on a CPU: 6 x 6 binary images instead of MNIST's 28 x 28 (the
example's hard-coded 784 is ``n_pixels`` here), a 2-dimensional latent code and 32 hidden units
(the example: 50 and 400). The images are synthetic (``data()``): four bar patterns, each pixel
flipped with probability 0.05.

    from elbolab import inference
    from examples.pyro.vae import VAE, data
    vae = VAE()
    svi = inference.fit("svi", vae.model, data(), guide=vae.guide, num_steps=3000, lr=1e-2)
    nuts = inference.fit("mcmc", vae.model, data(), fix_params=svi)   # under the fitted decoder

``model`` and ``guide`` at module level are those of one ``VAE()`` built with a fixed seed.
"""

import pyro
import pyro.distributions as dist
import torch
import torch.nn as nn

SIDE = 6


# define the PyTorch module that parameterizes the
# diagonal gaussian distribution q(z|x)
class Encoder(nn.Module):
    def __init__(self, n_pixels, z_dim, hidden_dim):
        super().__init__()
        self.n_pixels = n_pixels
        # setup the three linear transformations used
        self.fc1 = nn.Linear(n_pixels, hidden_dim)
        self.fc21 = nn.Linear(hidden_dim, z_dim)
        self.fc22 = nn.Linear(hidden_dim, z_dim)
        # setup the non-linearities
        self.softplus = nn.Softplus()

    def forward(self, x):
        # first shape the mini-batch to have pixels in the rightmost dimension
        x = x.reshape(-1, self.n_pixels)
        # then compute the hidden units
        hidden = self.softplus(self.fc1(x))
        # then return a mean vector and a (positive) square root covariance
        z_loc = self.fc21(hidden)
        z_scale = torch.exp(self.fc22(hidden))
        return z_loc, z_scale


# define the PyTorch module that parameterizes the
# observation likelihood p(x|z)
class Decoder(nn.Module):
    def __init__(self, n_pixels, z_dim, hidden_dim):
        super().__init__()
        # setup the two linear transformations used
        self.fc1 = nn.Linear(z_dim, hidden_dim)
        self.fc21 = nn.Linear(hidden_dim, n_pixels)
        # setup the non-linearities
        self.softplus = nn.Softplus()

    def forward(self, z):
        hidden = self.softplus(self.fc1(z))
        # return the parameter for the output Bernoulli
        loc_img = torch.sigmoid(self.fc21(hidden))
        return loc_img


class VAE(nn.Module):
    def __init__(self, n_pixels=SIDE * SIDE, z_dim=2, hidden_dim=32, seed=0):
        super().__init__()
        # the networks' initial weights from their own seed (the global RNG is left alone)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.encoder = Encoder(n_pixels, z_dim, hidden_dim)
            self.decoder = Decoder(n_pixels, z_dim, hidden_dim)
        self.n_pixels = n_pixels
        self.z_dim = z_dim

    # define the model p(x|z)p(z)
    def model(self, x):
        # register PyTorch module `decoder` with Pyro
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            # setup hyperparameters for prior p(z)
            z_loc = torch.zeros(x.shape[0], self.z_dim, dtype=x.dtype, device=x.device)
            z_scale = torch.ones(x.shape[0], self.z_dim, dtype=x.dtype, device=x.device)
            # sample from prior (value will be sampled by guide when computing the ELBO)
            z = pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))
            # decode the latent code z
            loc_img = self.decoder.forward(z)
            # score against actual images
            pyro.sample(
                "obs",
                dist.Bernoulli(loc_img, validate_args=False).to_event(1),
                obs=x.reshape(-1, self.n_pixels),
            )
            # return the loc so we can visualize it later
            return loc_img

    # define the guide (i.e. variational distribution) q(z|x)
    def guide(self, x):
        # register PyTorch module `encoder` with Pyro
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            # use the encoder to get the parameters used to define q(z|x)
            z_loc, z_scale = self.encoder.forward(x)
            # sample the latent code z
            pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))


def data(n=40, flip=0.05, seed=0):
    """The keyword argument ``x``: ``n`` binary 6 x 6 images (flattened to 36 pixels), each one
    of four bar patterns (a horizontal or vertical bar, at the top/left or bottom/right) with every
    pixel flipped with probability ``flip``."""
    gen = torch.Generator().manual_seed(seed)
    patterns = torch.zeros(4, SIDE, SIDE)
    patterns[0, :2, :] = 1  # horizontal bar, top
    patterns[1, -2:, :] = 1  # horizontal bar, bottom
    patterns[2, :, :2] = 1  # vertical bar, left
    patterns[3, :, -2:] = 1  # vertical bar, right
    which = torch.arange(n) % 4
    images = patterns[which].reshape(n, -1)
    flips = torch.rand(images.shape, generator=gen) < flip
    return {"x": torch.where(flips, 1 - images, images)}


_default = VAE()
model = _default.model
guide = _default.guide
