"""NUTS on the Bayesian GMM: ``elbolab.inference.fit("mcmc", BayesianGMM(3), x)`` against NumPyro.

``python -m bench.nuts_gmm [--n 1000 --warmup 500 --draws 1000 --repeat 3 --seed 0]``

The same model on both sides (eqs. 1-3 of ``models/gmm.py`` with c summed out: mu_k ~ N(0, s2),
x_i ~ sum_k (1/K) N(mu_k, 1)), one chain of ``warmup`` + ``draws`` NUTS iterations (target
acceptance 0.8; elbolab's default max tree depth 8, NumPyro's 10), float64 (float32 for the
``--device cuda`` row, which runs only where torch sees a GPU). elbolab runs its default kernel:
on the CPU the compiled one (the trajectory in machine code, Numba), on a GPU the batched one
(chains in one computation, in torch on the device); its one-off costs (imports, loading the
compiled kernel from Numba's disk cache) are paid once per process outside the timing, as JAX's
compilation is for NumPyro warm. The figure is the
bulk ESS per second end to end (the whole call: compilation, warm-up, sampling), the ESS the
smallest over the K sorted means (label-invariant), computed by the same ArviZ call on both sides.
NumPyro runs cold (once, a new MCMC object: JAX compiles) and warm (the same object run again,
the compiled code loaded from JAX's persistent compilation cache: NumPyro recompiles its
sampling loop on every ``run`` otherwise, 1.6 s of a 2 s re-run here); it is optional
(``pip install 'elbolab[bench]'``); without it the row says so and is skipped.

Agreement: the posterior means of the sorted means within 4 combined Monte Carlo standard errors.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from bench.common import Row, agree, interleaved, mean_load, skipped_row

GOAL = 1.0


def _sorted(draws: np.ndarray) -> np.ndarray:
    """Draws (chain, draw, K, d) as (chain, draw, K d), the means sorted by their first
    coordinate (label-invariant: :func:`elbolab.models.gmm.sorted_means`)."""
    from elbolab.models.gmm import sorted_means

    s = sorted_means(torch.as_tensor(draws)).numpy()
    return s.reshape(*s.shape[:2], -1)


def _ess_and_means(draws: np.ndarray):
    """(smallest bulk ESS, means, MCSEs) of the sorted means; draws (chain, draw, K, d)."""
    from elbolab.inference import arviz_io

    s = _sorted(draws)
    return float(arviz_io.ess(s).min()), s.reshape(-1, s.shape[-1]).mean(0), arviz_io.mcse_mean(s)


def _rhat_over_runs(runs: list) -> float:
    """The largest split R-hat of the sorted means with every chain of every run as a chain:
    near 1 when all of them sampled one mode, far above when some sat in another (a
    multimodal posterior), where ESS/s compares nothing."""
    from elbolab.inference import arviz_io

    return float(arviz_io.rhat(_sorted(np.concatenate(runs))).max())


_CACHE: list = []


def _persistent_compilation_cache(jax) -> None:
    """JAX's persistent compilation cache in a temporary folder, for this process: NumPyro's
    ``MCMC.run`` compiles its sampling loop again on every call (1.6 s here for this model, of
    a 2 s "warm" run), so without it "warm" would time a compilation. With it a re-run loads
    the compiled loop and times the sampling alone: NumPyro at its best."""
    if not _CACHE:
        import tempfile

        _CACHE.append(tempfile.mkdtemp(prefix="jax-cache-"))
        jax.config.update("jax_compilation_cache_dir", _CACHE[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def _numpyro_model(K, d, prior_var):
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as nd

    def model(x):
        mu = numpyro.sample("mu", nd.Normal(jnp.zeros((K, d)), math.sqrt(prior_var)).to_event(2))
        comp = nd.Normal(mu, 1.0).to_event(1)
        mix = nd.MixtureSameFamily(nd.Categorical(probs=jnp.ones(K) / K), comp)
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", mix, obs=x)

    return model


def run(n=1000, K=3, prior_var=10.0, warmup=500, draws=1000, repeat=3, seed=0,
        verbose=True, chains=1, d=1, device="cpu", start="uniform") -> list[Row]:
    """One row; ``device="cuda"``: elbolab's chains on the GPU in float32 (NumPyro on JAX's own
    default device, float32 too), a row that says why it is skipped when there is no GPU.
    ``start``: "uniform" (each side's default, uniform in (-2, 2)) or "kmeans": every chain of
    both sides at scikit-learn's k-means centres (what a user does for a posterior with local
    modes, where chains from random starts sit in different ones)."""

    cuda = device == "cuda"
    where = ", on CUDA (float32)" if cuda else ""
    if cuda and not torch.cuda.is_available():
        return [skipped_row(f"NUTS, GMM K={K}, d={d}, n={n}, {chains} chains{where}",
                            ">= NumPyro warm", "no CUDA device here: the CUDA row runs where "
                            "torch.cuda.is_available()")]
    try:
        import jax
        import numpyro
    except ImportError:
        return [skipped_row(f"NUTS, GMM K={K}, d={d}, n={n}, {chains} chain(s), ESS/s vs NumPyro",
                            ">= NumPyro warm", "NumPyro not installed (pip install "
                            "'elbolab[bench]'): NUTS row skipped")]
    from elbolab import inference
    from elbolab.models.gmm.model import BayesianGMM

    jax.config.update("jax_enable_x64", not cuda)
    _persistent_compilation_cache(jax)
    numpyro.set_host_device_count(1)
    fam = BayesianGMM(K, prior_var, dim=d)
    x, _ = fam.simulate(n, seed=seed, dtype=torch.float32 if cuda else torch.float64)
    xj = jax.numpy.asarray(x.numpy())
    x = x.to(device)
    init = None
    if start == "kmeans":
        from sklearn.cluster import KMeans

        init = KMeans(K, n_init=10, random_state=seed).fit(xj).cluster_centers_.astype(
            np.float32 if cuda else np.float64)
        where += ", every chain started at the k-means centres"
    model = _numpyro_model(K, d, prior_var)
    method = "vectorized" if chains > 1 else "sequential"
    out = {"elbolab": [], "cold": [], "warm": []}  # every run's draws: ESS is a median over runs

    def ours():
        r = inference.fit("mcmc", fam, x, seed=seed + len(out["elbolab"]), warmup=warmup,
                          num_samples=draws, num_chains=chains,
                          init_params=None if init is None else {"mu": torch.as_tensor(init)})
        out["elbolab"].append(r.samples["mu"].double().cpu().numpy())  # synchronizes a GPU

    def make():
        strategy = (numpyro.infer.init_to_uniform if init is None else
                    numpyro.infer.init_to_value(values={"mu": jax.numpy.asarray(init)}))
        kernel = numpyro.infer.NUTS(model, target_accept_prob=0.8, init_strategy=strategy)
        return numpyro.infer.MCMC(kernel, num_warmup=warmup, num_samples=draws,
                                  num_chains=chains, chain_method=method, progress_bar=False)

    warm = {"mcmc": make(), "runs": 0}

    def cold():
        m = make()
        t0 = time.perf_counter()
        m.run(jax.random.PRNGKey(seed + len(out["cold"])), xj)
        out["cold"].append(np.asarray(m.get_samples(group_by_chain=True)["mu"], np.float64))
        return time.perf_counter() - t0

    def warm_run():
        m = warm["mcmc"]
        if warm["runs"] == 0:  # compile once outside the timing (what "warm" means)
            m.run(jax.random.PRNGKey(seed + 99), xj)
        warm["runs"] += 1
        t0 = time.perf_counter()
        m.run(jax.random.PRNGKey(seed + warm["runs"]), xj)
        out["warm"].append(np.asarray(m.get_samples(group_by_chain=True)["mu"], np.float64))
        return time.perf_counter() - t0

    # the process's one-off imports (ArviZ, Pyro's distributions: about 1 s) outside the timing,
    # as NumPyro's compilation is for "warm"; every cost of a fit stays inside it
    inference.fit("mcmc", fam, x, seed=seed, warmup=5, num_samples=5, num_chains=chains)
    # cold once, first: it compiles; later new objects would load the persistent cache
    cold_t = interleaved({"numpyro cold": cold}, 1)
    t = {**cold_t, **interleaved({"elbolab": ours, "numpyro warm": warm_run}, repeat)}
    # ESS varies from seed to seed as much as the times do: the median over each side's runs
    ess = {k: (float(np.median([_ess_and_means(r)[0] for r in runs])),
               *_ess_and_means(runs[-1])[1:]) for k, runs in out.items()}
    (e_o, m_o, s_o), (e_w, m_w, s_w) = ess["elbolab"], ess["warm"]
    tol = 4 * float(np.sqrt(s_o**2 + s_w**2).max())
    checks = [agree("posterior means of the sorted means (4 MCSE)",
                    float(np.abs(m_o - m_w).max()), 0.0, tol)]
    checks += [agree(f"{who}: every chain of every run in one mode (R-hat of the sorted means "
                     "over all of them, within 0.05 of 1)", _rhat_over_runs(out[key]), 1.0, 0.05)
               for who, key in (("elbolab", "elbolab"), ("NumPyro", "warm"))
               if repeat * chains > 1]  # R-hat needs two chains: one run of one chain has none
    rate = {k: ess[key][0] / t[k].median
            for k, key in (("elbolab", "elbolab"), ("numpyro cold", "cold"),
                           ("numpyro warm", "warm"))}
    if verbose:
        print(f"  NUTS ESS (median over runs): elbolab {e_o:.0f}, numpyro warm {e_w:.0f}, cold "
              f"{ess['cold'][0]:.0f}; {'; '.join(map(str, checks))}")
    vs = "NumPyro warm" + (" (vectorized chains)" if chains > 1 else "")
    return [Row(
        f"NUTS, GMM K={K}, d={d}, n={n}, {warmup} warm-up + {draws} draws, {chains} chain"
        f"{'s' if chains > 1 else ''}{where}, ESS/s end to end",
        f"{rate['elbolab']:.0f} ESS/s ({t['elbolab'].spread(1, '{:.3g}')} s, ESS {e_o:.0f})",
        f"{vs} {rate['numpyro warm']:.0f} ESS/s ({t['numpyro warm'].spread(1, '{:.3g}')}"
        f" s), cold {rate['numpyro cold']:.0f} ESS/s ({t['numpyro cold'].spread(1, '{:.3g}')} s)",
        rate["elbolab"] / rate["numpyro warm"], f">= 1x {vs}", GOAL, mean_load(t), checks,
        note="ESS is the smallest bulk ESS of the sorted means (median over each side's runs, "
             "each run its own seed); "
             f"elbolab/NumPyro cold = {rate['elbolab'] / rate['numpyro cold']:.2f}x")]


def main(argv=None) -> list[Row]:
    p = argparse.ArgumentParser(prog="python -m bench.nuts_gmm", description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--draws", type=int, default=1000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chains", type=int, default=1)
    p.add_argument("--K", type=int, default=3)
    p.add_argument("--d", type=int, default=1)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--start", choices=("uniform", "kmeans"), default="uniform")
    a = p.parse_args(argv)
    rows = run(a.n, K=a.K, warmup=a.warmup, draws=a.draws, repeat=a.repeat, seed=a.seed,
               chains=a.chains, d=a.d, device=a.device, start=a.start)
    from bench.common import details, table

    print(table(rows))
    print(details(rows))
    return rows


if __name__ == "__main__":
    main()
