"""VAE training throughput: elbolab's SVI engine against a plain PyTorch loop, and IWAE throughput.

``python -m bench.vae_throughput [--steps 300 --repeat 3 --threads 1 --seed 0]``

The same VAE (digits binarized, z = 8, encoder 64-256-8 and decoder 8-256-64 MLPs, Bernoulli
likelihood, batch 128, Adam lr 1e-3, float32, CPU) is trained for ``--steps`` steps by

* elbolab: :func:`elbolab.inference.svi.loop.run_svi` (the engine's loop: ClippedAdam, minibatches with N/B
  scaling, NaN checks, snapshots every 50 steps) with Pyro's Trace_ELBO, validation on and off,
  JitTrace_ELBO, TraceMeanField_ELBO (analytic KL; jitted or not: the jitted one recompiles under
  plate subsampling and is very slow, avoid it), and the engine's torch-native step
  (``Settings(direct=True)``, :func:`elbolab.inference.svi.engine.direct_step`: the same estimator, no tracing);
* plain PyTorch: the same encoder and decoder modules, ``torch.optim.Adam``, and the same
  single-sample minibatch ELBO estimate
  (N/B) sum_b [log p(x_b | z_b) + log p(z_b) - log q(z_b | x_b)],
  z_b = m + s * eps (or with the KL term in closed form, to pair with TraceMeanField_ELBO).

Each configuration runs ``--repeat`` times, interleaved with the others, best time kept (the
machine may be shared). Images per second = batch * steps / seconds; ratio = elbolab / plain
with the matching ELBO estimator. Also the IWAE evaluation throughput of
:func:`elbolab.inference.evaluation.evidence.iwae_from_log_joint` (data points x samples per second).
"""

from __future__ import annotations

import argparse
import math
import time

import pyro
import torch

from elbolab.guides.amortized import build_mlp
from elbolab.inference import svi
from elbolab.inference.evaluation.evidence import iwae_from_log_joint
from elbolab.inference.runtime import isolated
from elbolab.models.data.images import load_digits
from elbolab.models.vae.model import VAE

BATCH, LATENT, HIDDEN = 128, 8, 256


def _pair(seed, x):
    vae = VAE(x.shape[1], LATENT, (HIDDEN,), likelihood="bernoulli", seed=seed)
    torch.manual_seed(seed)
    enc = build_mlp(vae, x, hidden=(HIDDEN,), activation="relu")
    return vae, enc


def run_elbolab(x, steps, seed, *, validate=True, jit=False, mean_field_kl=False, direct=False):
    vae, enc = _pair(seed, x)
    # one draw per step and a constant rate, as in the plain loop
    s = svi.Settings(num_steps=steps, lr=1e-3, lr_decay=1.0, num_particles=1,
                     subsample_size=BATCH, jit=jit, mean_field_kl=mean_field_kl, direct=direct)
    old = pyro.infer.util.is_validation_enabled()
    pyro.enable_validation(validate)
    try:
        with isolated(seed):
            step = svi.direct_step(vae, enc, x, s) if direct else None
            svi.run_svi(vae.model, enc, (x,), s, step_fn=step)  # warm-up (JIT, allocator)
            t0 = time.perf_counter()
            run = svi.run_svi(vae.model, enc, (x,), s, step_fn=step)
            seconds = time.perf_counter() - t0
    finally:
        pyro.enable_validation(old)
    return seconds, run.trace[-1] / x.shape[0]


def run_plain(x, steps, seed, *, analytic_kl=False):
    vae, enc = _pair(seed, x)
    vae.to(x)
    params = list(vae.decoder.parameters()) + list(enc.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    n = x.shape[0]
    gen = torch.Generator().manual_seed(seed)

    def loop(k):
        last = math.nan
        for _ in range(k):
            idx = torch.randperm(n, generator=gen)[:BATCH]
            xb = x[idx]
            h = enc.body(xb)
            loc, scale = enc.loc_net(h), enc.positive_scale(enc.scale_net(h))
            z = loc + scale * torch.randn_like(loc)
            logits, _ = vae.decoder(z)
            ll = -torch.nn.functional.binary_cross_entropy_with_logits(
                logits, xb, reduction="none").sum(-1)
            if analytic_kl:
                kl = 0.5 * (loc**2 + scale**2 - 1).sum(-1) - scale.log().sum(-1)
                elbo = ll - kl
            else:
                log_p = -0.5 * (z**2).sum(-1) - 0.5 * LATENT * math.log(2 * math.pi)
                eps = (z - loc) / scale
                log_q = (-0.5 * eps**2 - scale.log()).sum(-1) - 0.5 * LATENT * math.log(2 * math.pi)
                elbo = ll + log_p - log_q
            loss = -elbo.sum() * (n / BATCH)
            opt.zero_grad()
            loss.backward()
            opt.step()
            last = -float(loss.detach()) / n
        return last

    loop(steps)  # warm-up
    t0 = time.perf_counter()
    last = loop(steps)
    return time.perf_counter() - t0, last


def iwae_rate(x, seed, samples, repeat):
    vae, enc = _pair(seed, x)
    vae.to(x)
    with torch.no_grad():
        q = enc.distribution(x)
    iwae_from_log_joint(vae.log_joint, q, x, num_samples=8, seed=seed)
    seconds = math.inf
    for r in range(repeat):
        t0 = time.perf_counter()
        iwae_from_log_joint(vae.log_joint, q, x, num_samples=samples, seed=seed + r)
        seconds = min(seconds, time.perf_counter() - t0)
    return x.shape[0] * samples / seconds, seconds


CONFIGS = {
    "pyro Trace_ELBO, validation on": dict(kind="svi", validate=True, pair="plain (MC KL)"),
    "pyro Trace_ELBO, validation off": dict(kind="svi", validate=False, pair="plain (MC KL)"),
    "pyro JitTrace_ELBO": dict(kind="svi", validate=False, jit=True, pair="plain (MC KL)"),
    "pyro TraceMeanField_ELBO": dict(kind="svi", validate=False, mean_field_kl=True,
                                     pair="plain (analytic KL)"),
    "pyro JitTraceMeanField_ELBO": dict(kind="svi", validate=False, jit=True,
                                        mean_field_kl=True, pair="plain (analytic KL)"),
    "elbolab direct (Settings.direct)": dict(kind="svi", validate=False, direct=True,
                                             pair="plain (MC KL)"),
    "plain (MC KL)": dict(kind="plain"),
    "plain (analytic KL)": dict(kind="plain", analytic_kl=True),
}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.vae_throughput",
                                description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300, help="timed SVI steps per run (default 300)")
    p.add_argument("--repeat", type=int, default=3, help="best of this many runs")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0 = leave)")
    p.add_argument("--iwae-samples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default=None, help="semicolon-separated configuration names to run")
    args = p.parse_args(argv)
    if args.steps < 1 or args.repeat < 1:
        raise SystemExit("--steps: --steps and --repeat must be >= 1")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    data = load_digits(binarize=True, seed=args.seed)
    x = data.x_train  # float32, CPU
    names = list(CONFIGS) if not args.only else [s.strip() for s in args.only.split(";")]
    best = {k: math.inf for k in names}
    elbo = {}
    for _ in range(args.repeat):
        for name in names:
            c = dict(CONFIGS[name])
            kind = c.pop("kind")
            c.pop("pair", None)
            fn = {"svi": run_elbolab, "plain": run_plain}[kind]
            sec, e = fn(x, args.steps, args.seed, **c)
            best[name] = min(best[name], sec)
            elbo[name] = e
    print(f"VAE 64-{HIDDEN}-{LATENT} on digits (n={x.shape[0]}), batch {BATCH}, "
          f"{args.steps} steps, "
          f"best of {args.repeat}, threads={torch.get_num_threads()}, torch {torch.__version__}, "
          f"pyro {pyro.__version__}")
    rate = {k: BATCH * args.steps / v for k, v in best.items()}
    rows = {}
    for name in names:
        pair = CONFIGS[name].get("pair")
        ratio = rate[name] / rate[pair] if pair in rate else math.nan
        rows[name] = {"images_per_s": rate[name], "ratio_to_plain": ratio,
                      "last_minibatch_elbo_per_image": elbo[name]}
        tail = f"  ratio {ratio:.2f} (vs {pair})" if pair in rate else ""
        print(f"  {name:32s} {rate[name]:9.0f} images/s{tail}")
    pts, sec = iwae_rate(data.x_test, args.seed, args.iwae_samples, args.repeat)
    print(f"  IWAE evaluation: {pts:,.0f} data points x samples per second "
          f"({data.x_test.shape[0]} points x {args.iwae_samples} samples in {sec:.2f}s)")
    rows["iwae"] = {"point_samples_per_s": pts}
    return rows


if __name__ == "__main__":
    main()
