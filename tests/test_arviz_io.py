"""elbolab's ArviZ calls (``inference/arviz_io.py``) with Numba installed: ArviZ 0.23 then takes
its Numba kernels, some of which break under NumPy >= 2.4; ours take its NumPy path and leave
the caller's setting as it was."""

from __future__ import annotations

import math

import arviz as az
import numpy as np

from elbolab.inference import arviz_io


def test_mcse_of_independent_draws_and_the_callers_numba_setting():
    """Independent N(0, 1) draws: MCSE of the mean sd/sqrt(N) and of the sd sd/sqrt(2N) (the
    normal's, to first order), within 10% (the error of ArviZ's ESS estimate at N = 4000 is a
    few percent); ArviZ's own Numba flag is the same after every call."""
    x = np.random.default_rng(0).normal(size=(4, 1000))
    before = az.Numba.numba_flag
    m, s = arviz_io.mcse_mean(x), arviz_io.mcse_sd(x)
    assert m.shape == s.shape == ()
    assert abs(float(m) * math.sqrt(4000) - 1) < 0.1
    assert abs(float(s) * math.sqrt(8000) - 1) < 0.1
    assert abs(float(arviz_io.ess(x)) / 4000 - 1) < 0.15 and float(arviz_io.rhat(x)) < 1.01
    assert az.Numba.numba_flag == before
