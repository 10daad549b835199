"""Simulation-based calibration (Talts, Betancourt, Simpson, Vehtari & Gelman 2018) and its
variational form VSBC (Yao, Vehtari, Simpson & Gelman 2018). Slow: ``make test-slow``.

SBC. Draw theta ~ p(theta), x ~ p(x | theta), then L draws theta_l from the posterior sampler;
the rank r = #{l : f(theta_l) < f(theta)} of any statistic f is uniform on {0, ..., L} when the
sampler draws from p(theta | x). Ranks are grouped into 10 bins of (L + 1) / 10 values and tested
for uniformity by Pearson's chi-square (9 dof); a check passes at p > 0.001 (so ~1 false alarm
in 1000 checks). Statistics are label- / rotation-invariant where the posterior has those
symmetries (GMM: the sorted means); for FA with fixed parameters z_n is identified.

VSBC. For a variational q with Gaussian marginals, p_j = q(theta_j < theta_j^true) =
Phi((theta_j^true - m_j) / s_j). If q's marginals were the posterior's, p would be uniform; VSBC
checks the weaker property Yao et al. use for point estimates: p is symmetric about 1/2 (the mean
is unbiased), by a two-sample Kolmogorov-Smirnov test of p against 1 - p (p > 0.001). A q
with too small a variance (mean-field on a correlated posterior) stays symmetric but is not
uniform: its p pile up at 0 and 1, which the chi-square rejects.

Every check adds a line to the table printed at the end of the run (``report`` fixture, tests/
conftest.py). Times measured on the 2-core machine, one thread, listed per test: ~4 minutes in
all. The KS test of p against 1 - p treats the reflected sample as a second sample, as Yao et al.
do; on the data of the VSBC test the exact posterior's own p gives KS p = 0.04 (chance).
"""

import math

import numpy as np
import pyro
import pytest
import torch
from scipy import stats

from elbolab import inference
from elbolab.inference import mcmc
from elbolab.models.fa.model import FactorAnalysis, FAParams
from elbolab.models.gmm.evidence import exact_posterior_draws
from elbolab.models.gmm.model import BayesianGMM, sorted_means

pytestmark = pytest.mark.slow

LEVEL = 1e-3
BINS = 10
L = 99  # posterior draws per replication: ranks 0..99, 10 per bin
HEADER = (f"{'check':<44} {'statistic':<14} {'ranks':>6} {'chi2(9)':>8} {'p':>8} "
          f"{'KS sym p':>9}  verdict (level {LEVEL:g})")


def rank_counts(ranks: np.ndarray) -> np.ndarray:
    ranks = np.asarray(ranks).ravel()
    assert ranks.min() >= 0 and ranks.max() <= L
    return np.bincount(ranks // ((L + 1) // BINS), minlength=BINS)


def record(report, check, statistic, counts, ks_p=math.nan, expect_uniform=True):
    chi = stats.chisquare(counts)
    uniform = chi.pvalue > LEVEL
    verdict = ("uniform" if uniform else "NOT uniform") + (
        "" if expect_uniform else " (expected: not uniform)")
    if not report:
        report.append(HEADER)
    ks = "" if math.isnan(ks_p) else f"{ks_p:9.4f}"
    report.append(f"{check:<44} {statistic:<14} {counts.sum():>6} {chi.statistic:8.1f} "
                  f"{chi.pvalue:8.4f} {ks:>9}  {verdict}")
    return chi.pvalue


def ranks_of(draws: torch.Tensor, truth: torch.Tensor) -> np.ndarray:
    """draws (L, ...) and truth (...) -> integer ranks (...)."""
    assert draws.shape[0] == L
    return (draws < truth).sum(0).cpu().numpy()


# -- GMM ------------------------------------------------------------------------------------------
GMM_K, GMM_N = 2, 8


def gmm_replications(R, seed0):
    fam = BayesianGMM(K=GMM_K, prior_var=4.0)
    xs, mus = [], []
    for r in range(R):
        x, truth = fam.simulate(GMM_N, seed=seed0 + r)
        xs.append(x)
        mus.append(truth["mu"])
    return fam, torch.stack(xs), torch.stack(mus)


def test_sbc_gmm_exact_posterior(report):
    """1000 replications (n = 8, K = 2, s2 = 4): the exact posterior by enumerating the 2^7
    assignments (elbolab.models.gmm.evidence.exact_posterior_draws). ~3 s."""
    fam, x, mu = gmm_replications(1000, seed0=0)
    ranks = []
    for r in range(x.shape[0]):
        g = torch.Generator().manual_seed(r)
        draws = sorted_means(exact_posterior_draws(fam, x[r], L, g))  # (L, K, 1)
        ranks.append(ranks_of(draws[..., 0], sorted_means(mu[r])[..., 0]))
    ranks = np.stack(ranks)  # (R, K)
    for k in range(GMM_K):
        p = record(report, "GMM exact posterior (n=8, K=2), 1000 reps", f"mu_sorted[{k}]",
                   rank_counts(ranks[:, k]))
        assert p > LEVEL


def test_sbc_gmm_nuts(report):
    """100 replications sampled in one NUTS run of the engine's runner (elbolab.inference.mcmc.nuts.run_nuts)
    on a model that stacks them in a plate, built from the family's own distributions (each
    replication's posterior is a factor of the joint, so every marginal is its posterior).
    One chain, 300 warmup + 495 draws thinned by 5. ~60 s."""
    fam, x, mu_true = gmm_replications(100, seed0=5000)

    def stacked(x):
        with pyro.plate("reps", x.shape[0], dim=-2):
            with pyro.plate("components", fam.K, dim=-1):
                mu = pyro.sample("mu", fam.mean_prior(x))
            with pyro.plate("data", x.shape[1], dim=-1):
                pyro.sample("obs", fam.likelihood(mu), obs=x)

    s = mcmc.Settings(num_samples=5 * L, warmup=300, num_chains=1, jit=True)
    run = mcmc.run_nuts(stacked, (x,), s, seed=0, max_plate_nesting=2)
    draws = sorted_means(run.samples["mu"][0, ::5])[..., 0]  # (L, R, K)
    ranks = ranks_of(draws, sorted_means(mu_true)[..., 0])
    for k in range(GMM_K):
        p = record(report, "GMM NUTS (n=8, K=2), 100 reps", f"mu_sorted[{k}]",
                   rank_counts(ranks[:, k]))
        assert p > LEVEL


# -- factor analysis with fixed parameters: z_n | x_n -------------------------------------------
def fa_family(correlated: bool):
    """FA with d = 5, k = 2. ``correlated``: near-parallel loadings, so the posterior of z_n has
    correlation -0.92 (mean-field's sds are then 0.40 of the true ones)."""
    if correlated:
        W = torch.tensor([[1.0, 0.9], [1.0, 1.1], [0.9, 1.0], [1.1, 1.0], [1.0, 1.0]],
                         dtype=torch.float64)
    else:
        W = torch.tensor([[1.0, 0.0], [0.5, 1.0], [0.0, 0.8], [-0.7, 0.3], [0.4, -0.6]],
                         dtype=torch.float64)
    params = FAParams(W, torch.zeros(5, dtype=torch.float64),
                      torch.tensor([0.5, 0.4, 0.6, 0.3, 0.5], dtype=torch.float64))
    return FactorAnalysis(2, params=params)


def fa_replications(fam, n, seed):
    """z_n ~ p(z), x_n ~ p(x | z_n) from the family's own distribution objects."""
    torch.manual_seed(seed)
    like = torch.zeros(n, 5, dtype=torch.float64)
    z = fam.local_prior(like).sample()
    x = fam.observation_dist(z).sample()
    return x, z


def test_sbc_fa_exact_posterior(report):
    """2000 data points, each a replication (fixed parameters make them independent); the exact
    Gaussian posterior of elbolab.models.fa.model. ~2 s."""
    fam = fa_family(correlated=False)
    x, z = fa_replications(fam, 2000, seed=0)
    post = fam.exact_posterior(x).distribution()
    g = torch.Generator().manual_seed(1)
    eps = torch.randn((L, *z.shape), generator=g, dtype=torch.float64)
    draws = post.loc + torch.einsum("nij,lnj->lni", post.scale_tril, eps)
    ranks = ranks_of(draws, z)
    for j in range(2):
        p = record(report, "FA exact p(z | x), 2000 points", f"z[{j}]", rank_counts(ranks[:, j]))
        assert p > LEVEL


def test_sbc_fa_nuts(report):
    """NUTS over z (the mcmc engine, parameters fixed) for 200 points at once: one chain, 300
    warmup + 990 draws thinned by 10. ~50 s."""
    fam = fa_family(correlated=False)
    x, z = fa_replications(fam, 200, seed=2)
    s = mcmc.Settings(num_samples=10 * L, warmup=300, num_chains=1, jit=True)
    fit = inference.fit("mcmc", fam, x, s, seed=0)
    draws = fit.samples["z"][0, ::10]  # (L, n, k)
    ranks = ranks_of(draws, z)
    for j in range(2):
        p = record(report, "FA NUTS over z (engine mcmc), 200 points", f"z[{j}]",
                   rank_counts(ranks[:, j]))
        assert p > LEVEL


@pytest.mark.parametrize("guide", ["full-rank", "mean-field"])
def test_vsbc_fa_svi(report, guide):
    """VSBC for SVI with local Gaussian guides on 1000 points of the correlated FA (parameters
    fixed). Both q's means are unbiased (mean-field's optimum has the exact mean for a Gaussian
    posterior), so p is symmetric for both; full-rank's q is the posterior, so p is uniform;
    mean-field's sds are ~0.4 of the posterior's, so its p is not. 40-60 s each."""
    fam = fa_family(correlated=True)
    x, z = fa_replications(fam, 1000, seed=3)
    fit = inference.fit("svi", fam, x, seed=0, guide=guide)
    with fit.fitted() as (_, q):
        loc, tril = q.moments(x)
    sd = (tril @ tril.transpose(-1, -2)).diagonal(dim1=-2, dim2=-1).sqrt()
    pv = torch.distributions.Normal(0.0, 1.0).cdf((z - loc.detach()) / sd.detach()).numpy()
    ranks = np.minimum((pv * (L + 1)).astype(int), L)  # p binned like a rank
    for j in range(2):
        ks = stats.ks_2samp(pv[:, j], 1 - pv[:, j]).pvalue
        p = record(report, f"VSBC: SVI {guide} on correlated FA, 1000 pts", f"z[{j}]",
                   rank_counts(ranks[:, j]), ks_p=ks, expect_uniform=guide == "full-rank")
        assert ks > LEVEL  # symmetric: unbiased means
        assert (p > LEVEL) == (guide == "full-rank")
