"""What the ``fit`` study says about each SVI row: did it converge, and how far is its bound from
EM's maximum likelihood, split into its parameters' share and its guide's.

With point parameters theta, every SVI bound obeys

    ELBO(theta_svi, q) <= log p(x | theta_svi) <= max_theta log p(x | theta) ~ EM's log-likelihood,

so the shortfall EM - ELBO is the sum of two non-negative parts: ``params`` = EM - log p(x |
theta_svi), how much worse SVI's parameters are than EM's (an optimization result: a slower or
worse optimum, or EM's own optimum if negative), and ``guide`` = log p(x | theta_svi) - ELBO, the
guide's gap at SVI's own parameters (the row's ``gap``). A part counts as zero within
:func:`tolerance` nats: ``max(1, 0.01 n)`` plus three standard errors of the numbers involved.

:func:`verdicts` returns the sentences for each SVI fit (its bound against EM's when EM ran; why
it is not converged when it is not); the study prints them under :func:`header` and writes them
to ``run.json`` (``verdicts``) and the ``notes`` of summary.csv.
"""

from __future__ import annotations

import math

from elbolab.models.capabilities import Evidence

#: nats per data point that count as "within" EM's log-likelihood (plus the Monte Carlo error)
PER_DATUM = 0.01


def tolerance(n: int, *ses: float) -> float:
    """Nats within which two totals count as equal: ``max(1, PER_DATUM n)`` + 3 combined SEs."""
    se = math.sqrt(sum(s * s for s in ses if s is not None and math.isfinite(s)))
    return max(1.0, PER_DATUM * n) + 3.0 * se


def em_reference(results, evidence):
    """The study's EM row (bound ``log-likelihood``) as (its log-likelihood, SE, the FitResult):
    the exact evidence at EM's estimate where computed, else EM's objective; None without one."""
    for r, ev in zip(results, evidence):
        if r.engine == "em" and r.bound == "log-likelihood" and math.isfinite(r.elbo):
            if ev is not None and math.isfinite(ev.value):
                return ev.value, ev.se, r
            return r.elbo, 0.0, r
    return None


def not_converged(r) -> str:
    """Why an SVI fit is not converged, from its settings and diagnostics; ``""`` if it is."""
    if r.converged:
        return ""
    d, s = r.diagnostics, r.settings
    if d.get("diverged"):
        return f"diverged ({r.message.split(';')[0]})"
    steps, cap = d.get("steps"), s.get("num_steps")
    gain, se = d.get("projected_gain_per_datum", math.nan), d.get("projected_gain_se", math.nan)
    window, tol = s.get("window"), s.get("converged_tol")
    if gain is None or not math.isfinite(gain):
        return f"not converged after {steps} steps (too few to judge)"
    where = (f"stopped at the step cap ({cap} steps)" if steps == cap
             else f"stopped after {steps} steps")
    return (f"not converged: {where}, the ELBO still rising {gain:.1e} +- {se:.1e} nats/datum "
            f"per {window} steps (converged: < {tol:g} with 2 se); more steps: --svi-steps "
            f"{2 * cap}")


def verdict(r, ev: Evidence | None, em: tuple | None, n: int) -> list[str]:
    """The sentences for one SVI row (none when there is nothing to say): its bound against EM's
    log-likelihood ``em`` split into its parameters' and its guide's shares, then why it is not
    converged."""
    parts = []
    why = not_converged(r)
    if em is not None and math.isfinite(r.elbo):
        em_ll, em_se = em[0], em[1]
        short = em_ll - r.elbo
        tol = tolerance(n, r.elbo_se, em_se)
        if ev is None or not math.isfinite(ev.value):
            parts.append(f"ELBO {r.elbo:.1f}, {short:.1f} nats below EM (no log p(x) at its "
                         "parameters to split it)")
        else:
            params, guide = em_ll - ev.value, ev.value - r.elbo
            tol_p, tol_g = tolerance(n, ev.se, em_se), tolerance(n, ev.se, r.elbo_se)
            if abs(short) <= tol and abs(params) <= tol_p and guide >= -tol_g:
                parts.append(f"ELBO {r.elbo:.1f}, within {abs(short):.1f} nats of EM "
                             f"(tolerance {tol:.1f}): {params:.1f} from its parameters + "
                             f"{guide:.1f} its guide's gap")
            else:
                if params > tol_p:
                    what = ("worse: SVI's steps from its start ended near a worse optimum than "
                            "EM's, or are still on their way")
                elif params < -tol_p:
                    what = "better: EM stopped at a worse optimum"
                else:
                    what = "as good as EM's"
                parts.append(f"ELBO {r.elbo:.1f}; EM - ELBO = {short:.1f} nats = {params:.1f} "
                             f"from its parameters (log p(x) {ev.value:.1f} at them; {what}) + "
                             f"{guide:.1f} its guide's gap at them ({guide / n:.3f} nats/datum)")
                if guide < -tol_g:
                    parts.append("the ELBO exceeds log p(x) at its own parameters by more than "
                                 "its Monte Carlo error: not a bound; check the model's evidence")
                if params > tol_p and not why:
                    why = ("converged there: another start (--seed) may find EM's optimum; the "
                           "ELBO is a bound at SVI's parameters, not at EM's")
    if why:
        parts.append(why)
    return parts


def verdicts(results, evidence, n: int) -> dict[str, list[str]]:
    """``{"svi/<guide>": sentences}`` for the SVI rows that have something to say."""
    em = em_reference(results, evidence)
    out = {}
    for r, ev in zip(results, evidence):
        if r.engine != "svi":
            continue
        parts = verdict(r, ev, em, n)
        if parts:
            out[f"svi/{r.guide}"] = parts
    return out


def header(results, evidence, restarts: int | None) -> str:
    """The line above the verdicts: EM's log-likelihood and the inequality that splits them."""
    em = em_reference(results, evidence)
    if em is None:
        return "SVI fits:"
    best = f", best of {restarts} restarts" if restarts and restarts > 1 else ""
    if not em[2].converged:
        return (f"SVI against EM's log-likelihood {em[0]:.1f} nats{best} (EM not converged: "
                "short of its maximum, so SVI's parameters may beat it):")
    return (f"SVI against EM's log-likelihood {em[0]:.1f} nats{best}, a maximum likelihood: "
            "ELBO <= log p(x) at SVI's parameters <= the maximum:")


__all__ = ["PER_DATUM", "em_reference", "header", "not_converged", "tolerance", "verdict",
           "verdicts"]
