"""Posterior checks against a reference, and MCMC convergence per quantity.

Reference comparison (one table per study): for each method and scalar quantity (label- or
rotation-invariant where the model has those symmetries: sorted means for the GMM, entries of
W W^T + Psi for FA), the error of the posterior mean against the reference posterior (exact where
tractable, else NUTS), also in reference sds, the ratio of posterior sds, and the 1-Wasserstein
distance between the method's draws and the reference's marginal draws
(``scipy.stats.wasserstein_distance``: the integral of |F - G| of the two empirical CDFs). A
point estimate (EM, a MAP) is a point mass a: its sd ratio is NaN and its W1 to P is E_P |X - a|.

MCMC: R-hat (rank-normalized split R-hat) and bulk/tail ESS (Vehtari et al. 2021) and the MCSE of
the mean, per scalar component, via ArviZ.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyro
import torch
from pyro import poutine

from elbolab.inference import arviz_io
from elbolab.inference.evaluation.evidence import seeded
from elbolab.inference.tracing import site_is_plate, to_numpy
from elbolab.models.capabilities import ExactLocalPosterior, require
from elbolab.models.validate import integer

PARTICLES = "_reference_particles"

# -- comparison with a reference posterior -------------------------------------------------------
REFERENCE_COLUMNS = ["method", "quantity", "mean", "sd", "ref_mean", "ref_sd", "mean_error",
                     "mean_error_in_ref_sd", "sd_ratio", "w1", "w1_in_ref_sd", "draws",
                     "reference", "ref_draws"]
#: added by :func:`flag_reference`: whether the reference converged, and the mark of the
#: provisional numbers when it did not
FLAG_COLUMNS = ["ref_converged", "ref_flag"]


def reference_table(draws: dict, reference: str, quantities=None) -> pd.DataFrame:
    """Per method and scalar quantity: error of the mean, sd ratio and W1 against ``reference``.

    ``draws``: method -> array (S, m) of draws of m scalar quantities (S = 1 for a point
    estimate), including the reference's own draws under the key ``reference``. ``quantities``:
    m names (default ``q[j]``). mean_error = mean - ref_mean; sd_ratio = sd / ref_sd (NaN for
    a point estimate); w1 = scipy.stats.wasserstein_distance between the draws.
    """
    from scipy.stats import wasserstein_distance

    if reference not in draws:
        raise ValueError(f"reference: {reference!r} is not among the methods {sorted(draws)}")
    arrays = {k: _as_2d(v, k) for k, v in draws.items()}
    ref = arrays[reference]
    m = ref.shape[1]
    names = list(quantities) if quantities is not None else [f"q[{j}]" for j in range(m)]
    if len(names) != m:
        raise ValueError(f"quantities: expected {m} names, got {len(names)}")
    ref_mean, ref_sd = ref.mean(0), ref.std(0, ddof=1)
    rows = []
    for method, a in arrays.items():
        if method == reference:
            continue
        if a.shape[1] != m:
            raise ValueError(f"draws: {method!r} has {a.shape[1]} quantities, the reference {m}")
        mean = a.mean(0)
        sd = a.std(0, ddof=1) if a.shape[0] > 1 else np.full(m, np.nan)
        for j in range(m):
            w1 = wasserstein_distance(a[:, j], ref[:, j])
            rows.append({"method": method, "quantity": names[j], "mean": mean[j], "sd": sd[j],
                         "ref_mean": ref_mean[j], "ref_sd": ref_sd[j],
                         "mean_error": mean[j] - ref_mean[j],
                         "mean_error_in_ref_sd": (mean[j] - ref_mean[j]) / ref_sd[j],
                         "sd_ratio": sd[j] / ref_sd[j], "w1": w1, "w1_in_ref_sd": w1 / ref_sd[j],
                         "draws": a.shape[0], "reference": reference, "ref_draws": ref.shape[0]})
    return pd.DataFrame(rows, columns=REFERENCE_COLUMNS)


def flag_reference(table: pd.DataFrame, converged: bool, why: str = "") -> pd.DataFrame:
    """``table`` (a :func:`reference_table`) with ``ref_converged`` and ``ref_flag`` on every
    row: a reference whose MCMC did not converge (:func:`elbolab.inference.mcmc.nuts.convergence`) makes
    every number against it provisional, and ``ref_flag`` says so on each of them (empty for a
    converged or exact reference)."""
    table = table.copy()
    table["ref_converged"] = bool(converged)
    table["ref_flag"] = "" if converged else [
        reference_flag(ref, why) for ref in table.get("reference", pd.Series([""] * len(table)))]
    return table


def reference_flag(reference: str, why: str = "") -> str:
    """The mark of a number computed against an unconverged ``reference``."""
    return f"provisional: reference {reference} NOT converged" + (f" ({why})" if why else "")


def _as_2d(v, name) -> np.ndarray:
    a = np.asarray(to_numpy(v), dtype=np.float64)
    a = a.reshape(a.shape[0], -1) if a.ndim > 1 else a.reshape(-1, 1)
    if not np.isfinite(a).all():
        raise ValueError(f"draws: {name!r} holds non-finite values")
    return a


# -- MCMC per quantity ----------------------------------------------------------------------------
def component_names(name: str, shape) -> list[str]:
    """``name[i,j,...]`` for every index of ``shape`` (C order), ``name`` for a scalar: the one
    spelling of a component used by every table and figure."""
    shape = tuple(shape)
    return [f"{name}[{','.join(map(str, idx))}]" if shape else name for idx in np.ndindex(*shape)]


def mcmc_table(samples: dict, var_names=None, labels: dict | None = None) -> pd.DataFrame:
    """R-hat, bulk/tail ESS and MCSE of the mean for every scalar component of the chosen
    ``samples`` (name -> (chain, draw, ...)), via ArviZ (Vehtari et al. 2021), worst R-hat first.
    Components are named by :func:`component_names` unless ``labels`` gives a variable's names
    (a list, one per component in C order; e.g. ``C[0,3]`` for the entries of a flattened
    upper triangle)."""
    names = list(var_names) if var_names is not None else list(samples)
    missing = [v for v in names if v not in samples]
    if missing:
        raise ValueError(f"var_names: {missing} not among the samples {sorted(samples)}")
    rows = []
    for v in names:
        full = np.asarray(to_numpy(samples[v]), dtype=np.float64)
        a = full.reshape(full.shape[0], full.shape[1], -1)
        quantities = list((labels or {}).get(v) or component_names(v, full.shape[2:]))
        if len(quantities) != a.shape[2]:
            raise ValueError(f"labels: {len(quantities)} names for {v!r}, which has "
                             f"{a.shape[2]} components")
        for j in range(a.shape[2]):
            d = a[:, :, j]
            stats = {k: float(v) for k, v in arviz_io.chain_statistics(d).items()}
            if d.shape[0] < 2:  # one chain: no between-chain comparison
                stats["r_hat"] = math.nan
            rows.append({"quantity": quantities[j], "mean": d.mean(), "sd": d.std(ddof=1),
                         **stats, "chains": d.shape[0], "draws": d.shape[1]})
    df = pd.DataFrame(rows)
    return df.sort_values("r_hat", ascending=False, na_position="last").reset_index(drop=True)


def guide_draws(guide, x, *, num_samples: int = 1000, max_plate_nesting: int = 1,
                seed: int = 0) -> dict[str, torch.Tensor]:
    """``num_samples`` joint draws of every latent site of ``guide(x)`` (vectorized by an outer
    plate at dim -(max_plate_nesting + 1)), each shaped (S, *plates the site is in, *event);
    seeded without touching the caller's random state. Guide parameters are read, not changed."""
    S = integer(num_samples, "num_samples", minimum=1)
    nest = integer(max_plate_nesting, "max_plate_nesting", minimum=1)

    def vectorized(*args):
        with pyro.plate(PARTICLES, S, dim=-(nest + 1)):
            return guide(*args)

    with seeded(seed, x.device), torch.no_grad():
        tr = poutine.trace(vectorized).get_trace(x)
    out = {}
    for name, site in tr.nodes.items():
        if site["type"] != "sample" or site_is_plate(site) or site["is_observed"]:
            continue
        if site["infer"].get("is_auxiliary"):
            continue
        v = site["value"]
        n_event = len(site["fn"].event_shape)
        batch = v.shape[: v.dim() - n_event]
        dims = {f.dim for f in site["cond_indep_stack"] if f.vectorized and f.name != PARTICLES}
        keep = [i for i in range(len(batch)) if i == len(batch) - nest - 1
                or (i >= len(batch) - nest and i - len(batch) in dims)
                or i < len(batch) - nest - 1]
        out[name] = v.reshape(*[batch[i] for i in keep], *v.shape[len(batch):])
    return out


def local_reference_table(family, x, fitted_guides: dict, *, num_samples: int = 1000,
                          seed: int = 0) -> pd.DataFrame:
    """Each local guide's q(z_n | x_n) against the exact p(z_n | x_n)
    (:class:`~elbolab.models.capabilities.ExactLocalPosterior`), per latent coordinate j, summarized over
    the n points: ``mean_error`` / ``mean_error_in_ref_sd`` are root mean squares over points,
    ``sd_ratio``, ``w1`` and ``w1_in_ref_sd`` means over points (``aggregate`` says so)."""
    from scipy.stats import wasserstein_distance

    require(family, ExactLocalPosterior, "local_reference_table")
    post = family.exact_posterior(x).distribution()
    g = torch.Generator().manual_seed(seed)
    ref = post.loc + torch.einsum(
        "nij,snj->sni", post.scale_tril,
        torch.randn((num_samples, *post.loc.shape), generator=g, dtype=torch.float64).to(x))
    ref = ref.double().cpu().numpy()
    rows = []
    for name, guide in fitted_guides.items():
        with torch.no_grad():
            q = guide.distribution(x)
            z = _seeded_sample(q, num_samples, seed + 1)
        z = z.double().cpu().numpy()
        for j in range(ref.shape[-1]):
            r, a = ref[:, :, j], z[:, :, j]
            err, rsd = a.mean(0) - r.mean(0), r.std(0, ddof=1)
            w1 = np.array([wasserstein_distance(a[:, i], r[:, i]) for i in range(r.shape[1])])
            rows.append({"method": name, "quantity": f"z[:, {j}]", "mean": a.mean(),
                         "sd": a.std(0, ddof=1).mean(), "ref_mean": r.mean(), "ref_sd": rsd.mean(),
                         "mean_error": float(np.sqrt((err**2).mean())),
                         "mean_error_in_ref_sd": float(np.sqrt(((err / rsd) ** 2).mean())),
                         "sd_ratio": float((a.std(0, ddof=1) / rsd).mean()),
                         "w1": float(w1.mean()), "w1_in_ref_sd": float((w1 / rsd).mean()),
                         "draws": num_samples, "reference": "exact p(z | x)",
                         "ref_draws": num_samples,
                         "aggregate": f"rms / mean over {r.shape[1]} points"})
    return pd.DataFrame(rows, columns=[*REFERENCE_COLUMNS, "aggregate"])


def _seeded_sample(q, num_samples, seed):
    with seeded(seed, q.mean.device):
        return q.sample((num_samples,))


__all__ = ["FLAG_COLUMNS", "REFERENCE_COLUMNS", "component_names", "flag_reference", "guide_draws",
           "local_reference_table", "mcmc_table", "reference_flag",
           "reference_table"]
