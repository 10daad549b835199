"""VAE training throughput on the default path against an independent plain PyTorch loop.

``python -m bench.vae_default [--epochs 20 --repeat 3 --seed 0]``

elbolab: :func:`elbolab.inference.svi.train_vae.train_vae` with its defaults (the path the studies use: MLP
encoder, Adam through the SVI engine, minibatches of 128 with N/B scaling, the engine's choice of
step), VAE 64-256-8 on scikit-learn's digits (binarized, float32). Its final ELBO evaluation is
cut to 2 particles so the time is the training's.
Plain loop (written here, sharing no code with elbolab): the same architecture (encoder d-64-8
with softplus, the default "mlp" guide; decoder 8-256-d with ReLU) as ``nn.Sequential`` modules, ``torch.optim.Adam`` (lr 1e-3), an epoch-wise shuffle into batches of
128 and the single-draw estimate (N/B) sum_b [log p(x_b | z_b) + log p(z_b) - log q(z_b | x_b)].
Both run the same number of steps; images per second = 128 * steps / seconds.

Agreement: after the same steps both reach the same training ELBO per image within 2 nats
(each pair evaluated with 20 draws per image; different initializations, same budget).
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

from bench.common import Row, agree, interleaved, mean_load

BATCH, LATENT, HIDDEN, ENC_HIDDEN, GOAL = 128, 8, 256, 64, 0.9
LOG_2PI = math.log(2 * math.pi)


class PlainVAE(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(d, ENC_HIDDEN), nn.Softplus())
        self.loc, self.raw = nn.Linear(ENC_HIDDEN, LATENT), nn.Linear(ENC_HIDDEN, LATENT)
        self.dec = nn.Sequential(nn.Linear(LATENT, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, d))

    def elbo(self, xb: torch.Tensor) -> torch.Tensor:
        """Per-image single-draw ELBO estimates (B,)."""
        h = self.enc(xb)
        loc, scale = self.loc(h), nn.functional.softplus(self.raw(h)) + 1e-6
        eps = torch.randn_like(loc)
        z = loc + scale * eps
        ll = -nn.functional.binary_cross_entropy_with_logits(self.dec(z), xb,
                                                             reduction="none").sum(-1)
        log_p = -0.5 * (z * z).sum(-1) - 0.5 * LATENT * LOG_2PI
        log_q = (-0.5 * eps * eps - scale.log()).sum(-1) - 0.5 * LATENT * LOG_2PI
        return ll + log_p - log_q


def plain_loop(x: torch.Tensor, steps: int, seed: int) -> PlainVAE:
    torch.manual_seed(seed)
    net = PlainVAE(x.shape[1])
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    n, done = x.shape[0], 0
    while done < steps:
        perm = torch.randperm(n)
        for s in range(0, n, BATCH):
            if done == steps:
                break
            xb = x[perm[s:s + BATCH]]
            loss = -net.elbo(xb).sum() * (n / xb.shape[0])
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
    return net


def run(epochs=20, repeat=3, seed=0, verbose=True) -> list[Row]:
    from elbolab.inference.svi.train_vae import train_vae
    from elbolab.models.data.images import load_digits
    from elbolab.models.vae.model import VAE

    x = load_digits(binarize=True, seed=seed).x_train
    n = x.shape[0]
    steps = epochs * math.ceil(n / BATCH)
    kept = {}

    def ours():
        vae = VAE(x.shape[1], LATENT, (HIDDEN,), likelihood="bernoulli", seed=seed)
        kept["elbolab"] = train_vae(vae, x, epochs=epochs, batch_size=BATCH, seed=seed,
                                    eval_particles=2)

    def plain():
        kept["plain"] = plain_loop(x, steps, seed)

    t = interleaved({"elbolab": ours, "plain": plain}, repeat)
    res = kept["elbolab"]
    with torch.no_grad():
        torch.manual_seed(seed)
        plain_elbo = float(torch.stack([kept["plain"].elbo(x) for _ in range(20)]).mean())
    ours_elbo = res.elbo_estimate(x, num_particles=20).value / n
    checks = [agree("training ELBO per image after equal steps (nats)", ours_elbo, plain_elbo,
                    2.0)]
    rate = {k: BATCH * steps / v.median for k, v in t.items()}
    direct = res.settings.get("direct")
    if verbose:
        print(f"  VAE: {steps} steps; elbolab step {'direct' if direct else 'Pyro'}; {checks[0]}")
    return [Row(
        f"VAE on digits (z={LATENT}, 64-{HIDDEN}, batch {BATCH}), `train_vae` defaults, images/s",
        f"{rate['elbolab']:.0f} images/s ({t['elbolab'].spread(1, '{:.3g}')} s)",
        f"plain PyTorch loop {rate['plain']:.0f} images/s ({t['plain'].spread(1, '{:.3g}')} s)",
        rate["elbolab"] / rate["plain"], f">= {GOAL:g}x an independent plain loop", GOAL,
        mean_load(t), checks,
        note=f"{steps} steps each; elbolab's step: {'direct (torch-native)' if direct else 'Pyro'}"
             f"; ELBO/image elbolab {ours_elbo:.2f}, plain {plain_elbo:.2f}")]


def main(argv=None) -> list[Row]:
    p = argparse.ArgumentParser(prog="python -m bench.vae_default",
                                description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    rows = run(a.epochs, a.repeat, a.seed)
    from bench.common import details, table

    print(table(rows))
    print(details(rows))
    return rows


if __name__ == "__main__":
    main()
