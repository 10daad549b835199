"""The bad-input table (issue 10): data loaders, the public API and the family constructors.

Every case is an input a user can plausibly give. Each asserts the exception type, that the
message starts with (or, for messages about a file, contains) the name of the field at fault,
and that nothing was written: the test's folder holds exactly what the case put there before
the call. ``len(CASES)`` is the figure the README reports. Cases run in milliseconds: every one
must fail before any work.
"""

from __future__ import annotations

import builtins
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from elbolab import inference
from elbolab.inference import mcmc, svi
from elbolab.inference.closed_form import em
from elbolab.inference.svi.settings import Optimizer
from elbolab.models.capabilities import MissingCapability
from elbolab.models.data import load_array
from elbolab.models.data.images import load_images
from elbolab.models.fa.bayes import BayesianFactorAnalysis
from elbolab.models.fa.model import FactorAnalysis
from elbolab.models.gmm.model import BayesianGMM
from elbolab.models.vae.model import VAE
from elbolab.models.validate import TooLarge, as_data


@dataclass(frozen=True)
class Case:
    """``setup(tmp_path, monkeypatch)`` writes the case's inputs and returns the call to make."""

    id: str
    setup: Callable
    exc: type[BaseException]
    field: str  # the message starts with "<field>:" (or contains it, ``anywhere``)
    anywhere: bool = False


CASES: list[Case] = []


def case(id, exc, field, anywhere=False):
    def register(setup):
        CASES.append(Case(id, setup, exc, field, anywhere))
        return setup

    return register


def call(fn, *args, **kwargs):
    """A case whose inputs need no files."""
    return lambda tmp, mp: (lambda: fn(*args, **kwargs))


# ----------------------------------------------------------------------------- data


def _gmm_x():
    return BayesianGMM(K=2, prior_var=4.0).simulate(20, seed=0)[0]


def _fa():
    fam = FactorAnalysis(2, dim=5)
    x, truth = fam.simulate(30, seed=0)
    return x, truth


X_G = _gmm_x()
X_F, TRUTH_F = _fa()

BAD_DATA = {
    "nan": lambda x: torch.where(torch.arange(x.numel()).reshape(x.shape) == 3,
                                 torch.tensor(math.nan, dtype=x.dtype), x),
    "inf": lambda x: torch.where(torch.arange(x.numel()).reshape(x.shape) == 1,
                                 torch.tensor(math.inf, dtype=x.dtype), x),
    "3-d": lambda x: x.reshape(1, *x.shape),
    "empty": lambda x: x[:0],
}
FAMILIES = {  # name -> (family factory, data, engines it has)
    "gmm": (lambda: BayesianGMM(K=2, prior_var=4.0), X_G, ("em", "cavi", "svi", "mcmc")),
    "fa": (lambda: FactorAnalysis(2, params=TRUTH_F), X_F, ("em", "cavi", "svi", "mcmc")),
    "bayes-fa": (lambda: BayesianFactorAnalysis(2), X_F, ("cavi", "svi", "mcmc")),
}

for fam_name, (factory, x0, engines) in FAMILIES.items():
    for engine in engines:
        for bad, corrupt in BAD_DATA.items():
            bad_x = corrupt(x0)
            CASES.append(Case(f"fit-{engine}-{fam_name}-{bad}-data",
                              lambda tmp, mp, e=engine, f=factory, x=bad_x: (
                                  lambda: inference.fit(e, f(), x, seed=0)),
                              ValueError, "x"))


# ----------------------------------------------------------------------------- loaders


def _write(name: str, content):
    def setup(tmp, mp):
        p = tmp / name
        if isinstance(content, bytes):
            p.write_bytes(content)
        elif isinstance(content, str):
            p.write_text(content)
        else:
            content(p)
        return lambda: load_array(p, name="--data")

    return setup


def _load_kw(name, content, **kw):
    def setup(tmp, mp):
        p = tmp / name
        content(p) if callable(content) else p.write_text(content)
        return lambda: load_array(p, name="--data", **kw)

    return setup


LOADER = [
    ("missing-csv", lambda tmp, mp: (lambda: load_array(tmp / "nope.csv", name="--data")),
     FileNotFoundError),
    ("missing-npy", lambda tmp, mp: (lambda: load_array(tmp / "nope.npy", name="--data")),
     FileNotFoundError),
    ("missing-no-extension", lambda tmp, mp: (lambda: load_array(tmp / "nope", name="--data")),
     FileNotFoundError),
    ("directory", lambda tmp, mp: (lambda: load_array(tmp, name="--data")), IsADirectoryError),
    ("directory-named-csv", lambda tmp, mp: ((tmp / "d.csv").mkdir(), lambda: load_array(
        tmp / "d.csv", name="--data"))[1], IsADirectoryError),
    ("file-as-folder", lambda tmp, mp: ((tmp / "f").write_text("1\n"), lambda: load_array(
        tmp / "f" / "x.csv", name="--data"))[1], FileNotFoundError),
    ("empty-path", lambda tmp, mp: (lambda: load_array("", name="--data")), ValueError),
    ("path-none", lambda tmp, mp: (lambda: load_array(None, name="--data")), TypeError),
    ("empty-file", _write("e.csv", ""), ValueError),
    ("blank-lines-only", _write("b.csv", "\n\n  \n"), ValueError),
    ("text-one-line", _write("t.csv", "hello world\n"), ValueError),
    ("text-lines", _write("t.csv", "hello\nworld\nagain\n"), ValueError),
    ("header-only", _write("h.csv", "a,b,c\n"), ValueError),
    ("ragged-long-row", _write("r.csv", "a,b\n1,2\n3,4,5\n"), ValueError),
    ("ragged-short-row", _write("r.csv", "a,b\n1,2\n3\n"), ValueError),
    ("ragged-no-header", _write("r.csv", "1,2\n3,4,5\n"), ValueError),
    ("non-numeric-cell", _write("n.csv", "a,b\n1,2\n3,x\n"), ValueError),
    ("complex-cell", _write("c.csv", "a,b\n1,2\n3,1+2j\n"), ValueError),
    ("complex-cell-no-header", _write("c.csv", "1,2+0j\n3,4\n"), ValueError),
    ("latin1-bytes", _write("l.csv", "a,b\n1,\xe9\n".encode("latin-1")), ValueError),
    ("nul-bytes", _write("z.csv", b"a,b\n1,\x002\n"), ValueError),
    ("binary-garbage-csv", _write("g.csv", bytes(range(256)) * 4), ValueError),
    ("inf-cell", _write("i.csv", "a,b\n1,inf\n"), ValueError),
    ("overflow-cell", _write("o.csv", "a,b\n1,1e999\n"), ValueError),
    ("txt-ragged", _write("r.txt", "1 2\n3 4 5\n"), ValueError),
    ("txt-words", _write("w.txt", "1 2\n3 four\n"), ValueError),
    ("no-extension", _write("data", "a,b\n1,2\n"), ValueError),
    ("json-extension", _write("d.json", "[[1, 2]]"), ValueError),
    ("garbage-npy", _write("g.npy", b"not an array at all"), ValueError),
    ("truncated-npy", _write("t.npy", lambda p: p.write_bytes(_npy_bytes(np.ones((3, 2)))[:60])),
     ValueError),
    ("object-npy", _write("o.npy", lambda p: np.save(p, np.array([{"a": 1}, None]),
                                                     allow_pickle=True)), ValueError),
    ("string-npy", _write("s.npy", lambda p: np.save(p, np.array([["a", "b"]]))), ValueError),
    ("structured-npy", _write("st.npy", lambda p: np.save(
        p, np.zeros(3, dtype=[("a", "f8"), ("b", "f8")]))), ValueError),
    ("datetime-npy", _write("dt.npy", lambda p: np.save(
        p, np.array(["2024-01-01"], dtype="datetime64[D]"))), ValueError),
    ("complex-npy", _write("c.npy", lambda p: np.save(p, np.ones((3, 2)) + 1j)), ValueError),
    ("neg-inf-npy", _write("i.npy", lambda p: np.save(p, np.array([[1.0, -np.inf]]))),
     ValueError),
    ("empty-npy", _write("e.npy", lambda p: np.save(p, np.zeros((0, 3)))), ValueError),
    ("garbage-npz", _write("g.npz", b"PK\x03\x04 broken zip"), ValueError),
    ("npz-several-arrays", _write("s.npz", lambda p: np.savez(p, a=np.ones((3, 2)),
                                                               b=np.zeros((3, 2)))), ValueError),
    ("npz-no-arrays", _write("n.npz", lambda p: np.savez(p)), ValueError),
    ("npz-object-array", _write("o.npz", lambda p: np.savez(p, x=np.array([None, {}])),),
     ValueError),
    ("npz-complex", _write("c.npz", lambda p: np.savez(p, x=np.ones(3) * 1j)), ValueError),
    ("npz-missing-key", _load_kw("k.npz", lambda p: np.savez(p, a=np.ones((2, 2))), key="x"),
     ValueError),
    ("nan-not-allowed-csv", _load_kw("n.csv", "a,b\n1,\n", allow_nan=False), ValueError),
    ("nan-not-allowed-npy", _load_kw("n.npy", lambda p: np.save(p, np.array([[np.nan, 1.0]])),
                                     allow_nan=False), ValueError),
    ("wrong-ndim-3d", _load_kw("w.npy", lambda p: np.save(p, np.ones((2, 2, 2))), ndim=2),
     ValueError),
    ("wrong-ndim-scalar", _load_kw("w.npy", lambda p: np.save(p, np.float64(3.0)), ndim=2),
     ValueError),
    ("wrong-ndim-csv-as-1d", _load_kw("w.csv", "a,b\n1,2\n", ndim=1), ValueError),
]
for name, setup, exc in LOADER:
    CASES.append(Case(f"load-{name}", setup, exc, "--data"))


def _npy_bytes(arr):
    import io

    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _unreadable(suffix, writer):
    """A file the user may not read: chmod 000 (as root, which reads anything, ``open`` is made
    to refuse that one path, as the kernel would for anyone else)."""

    def setup(tmp, mp):
        p = tmp / f"locked{suffix}"
        writer(p)
        p.chmod(0)
        real_open = builtins.open

        def guarded(file, *a, **k):
            if str(file) == str(p):
                raise PermissionError(13, "Permission denied", str(p))
            return real_open(file, *a, **k)

        mp.setattr(builtins, "open", guarded)
        return lambda: load_array(p, name="--data")

    return setup


CASES += [
    Case("load-unreadable-csv", _unreadable(".csv", lambda p: p.write_text("a\n1\n")),
         PermissionError, "--data"),
    Case("load-unreadable-npy", _unreadable(".npy", lambda p: np.save(p, np.ones((2, 2)))),
         PermissionError, "--data"),
]


def _images(name, writer, **kw):
    def setup(tmp, mp):
        p = tmp / name
        writer(p)
        return lambda: load_images(p, **kw)

    return setup


CASES += [
    Case("images-1d", _images("v.npy", lambda p: np.save(p, np.arange(5.0))), ValueError, "data"),
    Case("images-nan", _images("n.npy", lambda p: np.save(p, np.array([[np.nan, 1.0]]))),
         ValueError, "data"),
    Case("images-several-arrays", _images("s.npz", lambda p: np.savez(
        p, a=np.ones((4, 4)), b=np.ones((4, 4)), y=np.arange(4))), ValueError, "data"),
    Case("images-test-fraction", _images("t.npy", lambda p: np.save(p, np.ones((4, 4))),
                                         test_fraction=1.5), ValueError, "test_fraction"),
    Case("images-threshold", _images("t.npy", lambda p: np.save(p, np.ones((4, 4))),
                                     threshold=0.0), ValueError, "threshold"),
    Case("images-seed", _images("t.npy", lambda p: np.save(p, np.ones((4, 4))), seed=-1),
         ValueError, "seed"),
]

# ----------------------------------------------------------------------------- as_data
CASES += [
    Case("as-data-none", call(as_data, None), ValueError, "data"),
    Case("as-data-complex-tensor", call(as_data, torch.ones(3, 2, dtype=torch.complex64)),
         TypeError, "data"),
    Case("as-data-complex-numpy", call(as_data, np.ones((3, 2)) * (1 + 1j)), TypeError, "data"),
    Case("as-data-strings", call(as_data, [["a", "b"]]), TypeError, "data"),
    Case("as-data-ragged-list", call(as_data, [[1.0, 2.0], [3.0]]), TypeError, "data"),
    Case("as-data-object", call(as_data, np.array([None, 1.0], dtype=object)), TypeError, "data"),
    Case("as-data-3d", call(as_data, np.ones((2, 2, 2))), ValueError, "data"),
    Case("as-data-no-rows", call(as_data, np.zeros((0, 2))), ValueError, "data"),
    Case("as-data-nan", call(as_data, np.array([[np.nan]])), ValueError, "data"),
    Case("as-data-inf", call(as_data, torch.tensor([[1.0, -math.inf]])), ValueError, "data"),
]

# ----------------------------------------------------------------------------- families
CONSTRUCTORS = [
    ("gmm-K-0", lambda: BayesianGMM(K=0), ValueError, "K"),
    ("gmm-K-negative", lambda: BayesianGMM(K=-3), ValueError, "K"),
    ("gmm-K-float", lambda: BayesianGMM(K=2.5), TypeError, "K"),
    ("gmm-K-string", lambda: BayesianGMM(K="3"), TypeError, "K"),
    ("gmm-K-bool", lambda: BayesianGMM(K=True), TypeError, "K"),
    ("gmm-K-none", lambda: BayesianGMM(K=None), TypeError, "K"),
    ("gmm-prior-var-0", lambda: BayesianGMM(prior_var=0.0), ValueError, "prior_var"),
    ("gmm-prior-var-negative", lambda: BayesianGMM(prior_var=-1.0), ValueError, "prior_var"),
    ("gmm-prior-var-nan", lambda: BayesianGMM(prior_var=math.nan), ValueError, "prior_var"),
    ("gmm-prior-var-inf", lambda: BayesianGMM(prior_var=math.inf), ValueError, "prior_var"),
    ("gmm-prior-var-1e301", lambda: BayesianGMM(prior_var=1e301), ValueError, "prior_var"),
    ("gmm-prior-var-1e-320", lambda: BayesianGMM(prior_var=1e-320), ValueError, "prior_var"),
    ("gmm-prior-var-huge-int", lambda: BayesianGMM(prior_var=10**400), ValueError, "prior_var"),
    ("gmm-prior-var-1e300-simulate", lambda: BayesianGMM(prior_var=1e300).simulate(30, seed=0),
     ValueError, "prior_var"),
    ("gmm-dim-0", lambda: BayesianGMM(dim=0), ValueError, "dim"),
    ("gmm-simulate-n-0", lambda: BayesianGMM().simulate(0), ValueError, "n"),
    ("gmm-simulate-seed-2**64", lambda: BayesianGMM().simulate(5, seed=2**64), ValueError, "seed"),
    ("gmm-data-overflow", lambda: BayesianGMM().check_data(np.array([[1e300], [2.0]])),
     ValueError, "x"),
    ("gmm-data-wrong-columns", lambda: BayesianGMM(dim=2).check_data(np.ones((4, 3))),
     ValueError, "x"),
    ("gmm-evidence-method", lambda: BayesianGMM().log_evidence(X_G, "magic"), ValueError,
     "method"),
    ("fa-latent-0", lambda: FactorAnalysis(0), ValueError, "latent_dim"),
    ("fa-latent-gt-dim", lambda: FactorAnalysis(6, dim=5), ValueError, "latent_dim"),
    ("fa-latent-eq-dim", lambda: FactorAnalysis(5, dim=5), ValueError, "latent_dim"),
    ("fa-latent-gt-data", lambda: FactorAnalysis(7).check_data(X_F), ValueError, "latent_dim"),
    ("fa-kind", lambda: FactorAnalysis(2, kind="pca"), ValueError, "kind"),
    ("fa-min-var-0", lambda: FactorAnalysis(2, min_var=0.0), ValueError, "min_var"),
    ("fa-min-var-nan", lambda: FactorAnalysis(2, min_var=math.nan), ValueError, "min_var"),
    ("fa-init", lambda: FactorAnalysis(2, init="zeros"), ValueError, "init"),
    ("fa-params-type", lambda: FactorAnalysis(2, params={"W": 1}), TypeError, "params"),
    ("fa-dim-1", lambda: FactorAnalysis(1, dim=1), ValueError, "dim"),
    ("fa-data-underflow-f32", lambda: FactorAnalysis(2).check_data((X_F * 1e-20).float()),
     ValueError, "x"),
    ("fa-data-overflow", lambda: FactorAnalysis(2).check_data(X_F * 1e300), ValueError, "x"),
    ("bayes-fa-latent-gt-dim", lambda: BayesianFactorAnalysis(6, dim=5), ValueError,
     "latent_dim"),
    ("bayes-fa-alpha-0", lambda: BayesianFactorAnalysis(2, alpha=0.0), ValueError, "alpha"),
    ("bayes-fa-a0-negative", lambda: BayesianFactorAnalysis(2, a0=-1.0), ValueError, "a0"),
    ("bayes-fa-b0-nan", lambda: BayesianFactorAnalysis(2, b0=math.nan), ValueError, "b0"),
    ("bayes-fa-mu-scale-inf", lambda: BayesianFactorAnalysis(2, mu_scale=math.inf), ValueError,
     "mu_scale"),
    ("vae-data-dim-0", lambda: VAE(0), ValueError, "data_dim"),
    ("vae-latent-0", lambda: VAE(4, latent_dim=0), ValueError, "latent_dim"),
    ("vae-hidden-0", lambda: VAE(4, hidden=0), ValueError, "hidden"),
    ("vae-hidden-negative", lambda: VAE(4, hidden=(8, -3)), ValueError, "hidden"),
    ("vae-hidden-float", lambda: VAE(4, hidden=(8.5,)), TypeError, "hidden"),
    ("vae-likelihood", lambda: VAE(4, likelihood="poisson"), ValueError, "likelihood"),
    ("vae-variance", lambda: VAE(4, likelihood="gaussian", variance="pixel"), ValueError,
     "variance"),
    ("vae-var-floor-0", lambda: VAE(4, var_floor=0.0), ValueError, "var_floor"),
    ("vae-activation", lambda: VAE(4, activation="gelu-ish"), ValueError, "activation"),
    ("vae-seed-negative", lambda: VAE(4, seed=-1), ValueError, "seed"),
    ("vae-module-name", lambda: VAE(4, module_name=""), ValueError, "module_name"),
    ("vae-data-columns", lambda: VAE(4, hidden=(8,)).check_data(np.ones((3, 5))), ValueError,
     "data"),
    ("vae-bernoulli-data", lambda: VAE(2, hidden=(8,)).check_data(np.full((3, 2), 0.5)),
     ValueError, "data"),
]
for name, fn, exc, field in CONSTRUCTORS:
    CASES.append(Case(name, lambda tmp, mp, fn=fn: fn, exc, field))

# ----------------------------------------------------------------------------- settings values
SVI_BAD = [  # flat option -> bad values
    ("lr", [0, -1.0, math.nan, math.inf, "0.1"]),
    ("lr_decay", [0, math.nan]),
    ("clip_norm", [0, -1.0]),
    ("num_particles", [0, 10**7, 2.5]),
    ("subsample_size", [0]),
    ("num_steps", [0, -5]),
    ("tol", [-1.0, math.nan]),
    ("converged_tol", [0]),
    ("window", [1]),
    ("val_particles", [0]),
    ("eval_every", [-1]),
    ("checkpoint_every", [-1]),
    ("eval_particles", [1, 10**8]),
    ("eval_batch", [0]),
    ("num_posterior_samples", [-1]),
]
for opt, values in SVI_BAD:
    for v in values:
        exc = TypeError if isinstance(v, str) or (opt == "num_particles" and v == 2.5) else ValueError
        CASES.append(Case(f"svi-{opt}-{v!r}", call(svi.Settings, **{opt: v}), exc, opt))
        CASES.append(Case(f"fit-svi-{opt}-{v!r}",
                          call(inference.fit, "svi", BayesianGMM(K=2), X_G, **{opt: v}), exc, opt))
CASES += [
    Case("svi-patience-without-val", call(svi.Settings, patience=3), ValueError, "patience"),
    Case("svi-checkpoint-every-without-path", call(svi.Settings, checkpoint_every=10),
         ValueError, "checkpoint"),
    Case("svi-direct-with-jit", call(svi.Settings, direct=True, jit=True), ValueError, "jit"),
    Case("svi-unknown-flat-option", call(svi.Settings, num_step=10), TypeError, "svi.Settings"),
    Case("svi-group-wrong-type", call(svi.Settings, optimizer=svi.Settings()), TypeError,
         "optimizer"),
    Case("svi-group-and-flat", call(svi.Settings, optimizer=Optimizer(), lr=0.1), TypeError,
         "optimizer"),
]
for flag in ("vectorize_particles", "mean_field_kl", "jit", "direct", "learn_model_params",
             "skip_nonfinite", "validate", "progress"):  # "false" is truthy: never coerced
    CASES.append(Case(f"svi-{flag}-string", call(svi.Settings, **{flag: "false"}), TypeError,
                      flag))
CASES += [
    Case("mcmc-jit-int", call(mcmc.Settings, jit=1), TypeError, "jit"),
    Case("mcmc-progress-string", call(mcmc.Settings, progress="no"), TypeError, "progress"),
    Case("em-progress-string", call(inference.fit, "em", BayesianGMM(K=2), X_G, progress="no"),
         TypeError, "progress"),
]
MCMC_BAD = [("num_samples", [0]), ("warmup", [-1]), ("num_chains", [0]),
            ("target_accept", [0.0, 1.0, 1.5]), ("max_tree_depth", [0]), ("rhat_max", [0.9]),
            ("ess_per_chain", [-1])]
for opt, values in MCMC_BAD:
    for v in values:
        CASES.append(Case(f"mcmc-{opt}-{v!r}", call(mcmc.Settings, **{opt: v}), ValueError, opt))
ASCENT_BAD = [("max_iter", [0]), ("n_init", [0]), ("tol", [-1.0, math.nan])]
for opt, values in ASCENT_BAD:
    for v in values:
        CASES.append(Case(f"em-{opt}-{v!r}", call(inference.fit, "em", BayesianGMM(K=2), X_G,
                                                  **{opt: v}), ValueError, opt))

# ----------------------------------------------------------------------------- the API
G = BayesianGMM(K=2, prior_var=4.0)
CASES += [
    Case("fit-unknown-engine", call(inference.fit, "vi", G, X_G), ValueError, "engine"),
    Case("fit-seed-2**64", call(inference.fit, "cavi", G, X_G, seed=2**64), ValueError, "seed"),
    Case("fit-seed-negative", call(inference.fit, "cavi", G, X_G, seed=-1), ValueError, "seed"),
    Case("fit-seed-float", call(inference.fit, "cavi", G, X_G, seed=1.5), ValueError, "seed"),
    Case("fit-seed-string", call(inference.fit, "cavi", G, X_G, seed="0"), ValueError, "seed"),
    Case("fit-seed-bool", call(inference.fit, "cavi", G, X_G, seed=True), ValueError, "seed"),
    Case("fit-seed-none", call(inference.fit, "svi", G, X_G, seed=None), ValueError, "seed"),
    Case("fit-svi-subsample-gt-n", call(inference.fit, "svi", G, X_G, subsample_size=21),
         ValueError, "subsample_size"),
    Case("fit-svi-num-particles-1e7", call(inference.fit, "svi", G, X_G, num_particles=10**7),
         ValueError, "num_particles"),
    Case("fit-svi-unknown-option", call(inference.fit, "svi", G, X_G, num_step=10), TypeError,
         "svi"),
    Case("fit-em-unknown-option", call(inference.fit, "em", G, X_G, guide="map"), TypeError,
         "em"),
    Case("fit-mcmc-unknown-option", call(inference.fit, "mcmc", G, X_G, lr=0.1), TypeError,
         "mcmc"),
    Case("fit-svi-settings-and-options", call(inference.fit, "svi", G, X_G, svi.Settings(),
                                              lr=0.1), TypeError, "svi"),
    Case("fit-svi-mcmc-settings", call(inference.fit, "svi", G, X_G, mcmc.Settings()), TypeError,
         "settings"),
    Case("fit-em-svi-settings", call(inference.fit, "em", G, X_G, svi.Settings()), TypeError,
         "settings"),
    Case("fit-cavi-dict-settings", call(inference.fit, "cavi", G, X_G, {"max_iter": 5}),
         TypeError, "settings"),
    Case("fit-mcmc-em-settings", call(inference.fit, "mcmc", G, X_G, em.Settings()), TypeError,
         "settings"),
    Case("fit-svi-unknown-guide", call(inference.fit, "svi", G, X_G, guide="nope"), ValueError,
         "guide"),
    Case("fit-em-bayes-fa-no-capability", call(inference.fit, "em", BayesianFactorAnalysis(2),
                                               X_F), MissingCapability, "EM", anywhere=True),
    Case("fit-cavi-fa-without-params", call(inference.fit, "cavi", FactorAnalysis(2), X_F),
         ValueError, "params"),
    Case("fit-mcmc-fa-learnable-params", call(inference.fit, "mcmc", FactorAnalysis(2), X_F),
         ValueError, "fix_params"),
    Case("fit-gmm-wrong-columns", call(inference.fit, "cavi", BayesianGMM(K=2, dim=2), X_G),
         ValueError, "x"),
    Case("fit-fa-too-few-columns", call(inference.fit, "em", FactorAnalysis(5), X_F),
         ValueError, "latent_dim"),
    Case("fit-gmm-string-data", call(inference.fit, "em", G, [["a"], ["b"]]), TypeError, "x"),
    Case("fit-gmm-complex-data", call(inference.fit, "em", G, np.ones(5) * 1j), TypeError, "x"),
    Case("fit-gmm-overflow-data", call(inference.fit, "cavi", G, X_G * 1e300), ValueError, "x"),
    Case("fit-bayes-fa-f32-tiny", call(inference.fit, "cavi", BayesianFactorAnalysis(2),
                                       (X_F * 1e-20).float()), ValueError, "x"),
    Case("fit-bayes-fa-f32-huge", call(inference.fit, "cavi", BayesianFactorAnalysis(2),
                                       (X_F * 1e18).float()), ValueError, "x"),
    Case("fit-em-K-1e9", call(inference.fit, "em", BayesianGMM(K=10**9), X_G), TooLarge, "K"),
    Case("fit-cavi-K-1e9", call(inference.fit, "cavi", BayesianGMM(K=10**9), X_G), TooLarge, "K"),
    Case("evidence-importance-num-samples", call(G.log_evidence, X_G, "importance",
                                                 num_samples=10**12), TooLarge, "num_samples"),
    Case("evidence-sequential-num-samples", call(BayesianGMM(K=50).log_evidence, X_G,
                                                 num_samples=10**12), TooLarge, "num_samples"),
    Case("fit-mcmc-num-samples-1e10", call(inference.fit, "mcmc", G, X_G, num_samples=10**10),
         TooLarge, "num_samples"),
    Case("fit-svi-posterior-samples-1e10", call(inference.fit, "svi", G, X_G,
                                                num_posterior_samples=10**10),
         TooLarge, "num_posterior_samples"),
]


def _budget(fn_kwargs, budget="2e6"):
    """A fit under a small memory budget (ELBOLAB_MEMORY_BUDGET, in bytes)."""

    def setup(tmp, mp):
        mp.setenv("ELBOLAB_MEMORY_BUDGET", budget)
        return lambda: inference.fit("svi", G, X_G, seed=0, **fn_kwargs)

    return setup


CASES += [
    Case("fit-svi-budget-num-particles", _budget({"num_particles": 100_000}), TooLarge,
         "num_particles"),
    Case("fit-svi-budget-eval-batch", _budget({"eval_batch": 100_000,
                                               "eval_particles": 100_000}), TooLarge, "eval_batch"),
    Case("budget-env-not-a-number", _budget({}, budget="lots"), ValueError,
         "ELBOLAB_MEMORY_BUDGET"),
]


def _with_path(make_call):
    """Cases whose call would write into the test folder: nothing may appear there."""

    def setup(tmp, mp):
        return make_call(tmp)

    return setup


CASES += [
    Case("fit-svi-bad-data-with-checkpoint", _with_path(lambda tmp: lambda: inference.fit(
        "svi", G, BAD_DATA["nan"](X_G), checkpoint=tmp / "run" / "ck.pt", checkpoint_every=5)),
        ValueError, "x"),
    Case("fit-svi-bad-setting-with-checkpoint", _with_path(lambda tmp: lambda: inference.fit(
        "svi", G, X_G, checkpoint=tmp / "ck.pt", checkpoint_every=5, lr=-1.0)),
        ValueError, "lr"),
    Case("fit-svi-resume-missing", _with_path(lambda tmp: lambda: inference.fit(
        "svi", G, X_G, num_steps=5, resume=tmp / "none.pt")), FileNotFoundError, "checkpoint"),
    Case("fit-svi-resume-directory", _with_path(lambda tmp: lambda: inference.fit(
        "svi", G, X_G, num_steps=5, resume=tmp)), FileNotFoundError, "checkpoint"),
    Case("result-load-empty-folder", _with_path(lambda tmp: lambda: inference.FitResult.load(
        tmp)), FileNotFoundError, "folder"),
]


def _save_into_file(tmp, mp):
    (tmp / "taken").write_text("a file")
    res = inference.FitResult("gmm", "cavi", "mean-field", "elbo", 3)
    return lambda: res.save(tmp / "taken")


CASES.append(Case("result-save-onto-a-file", _save_into_file, NotADirectoryError, "folder"))


def _save_below_file(tmp, mp):
    (tmp / "taken").write_text("a file")
    res = inference.FitResult("gmm", "cavi", "mean-field", "elbo", 3)
    return lambda: res.save(tmp / "taken" / "sub")


CASES.append(Case("result-save-below-a-file", _save_below_file, OSError, "folder"))


# ----------------------------------------------------------------------------- issue 21
def _meta(x):
    return x.to("meta")


CASES += [
    # a local guide cannot evaluate held-out points: one line, no Pyro trace-shape table
    Case("fit-svi-local-guide-val-data", call(
        inference.fit, "svi", FactorAnalysis(2, params=TRUTH_F), X_F, guide="mean-field",
        val_data=X_F[:5], eval_every=1, num_steps=3), ValueError, "val_data"),
    # float32 data of size 1e-150 round to 0: said so, not torch's eigh failure
    Case("fit-em-fa-f32-underflow-to-zero", call(inference.fit, "em", FactorAnalysis(2),
                                                 (X_F * 1e-150).float()), ValueError, "x"),
    Case("fit-em-fa-all-columns-constant", call(inference.fit, "em", FactorAnalysis(2),
                                                torch.ones(30, 5, dtype=torch.float64)),
         ValueError, "x"),
    # tensors on the meta device hold no values: refused at the boundary, naming the device
    Case("fit-cavi-gmm-meta-device", call(inference.fit, "cavi", G, _meta(X_G)), ValueError, "x"),
    Case("fit-em-fa-meta-device", call(inference.fit, "em", FactorAnalysis(2), _meta(X_F)),
         ValueError, "x"),
    Case("fit-svi-fa-meta-device", call(inference.fit, "svi", FactorAnalysis(2), _meta(X_F)),
         ValueError, "x"),
]


# ----------------------------------------------------------------------------- the table


def test_the_table_is_large_and_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), [i for i in ids if ids.count(i) > 1]
    assert len(CASES) >= 120


def _listing(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size if p.is_file() else -1)
            for p in folder.rglob("*")}


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_bad_input(c: Case, tmp_path, monkeypatch):
    run = c.setup(tmp_path, monkeypatch)
    before = _listing(tmp_path)
    with pytest.raises(c.exc) as info:
        run()
    monkeypatch.undo()  # restore open() before looking at the folder
    message = str(info.value)
    pattern = re.escape(c.field) if c.anywhere else "^" + re.escape(c.field) + ":"
    assert re.search(pattern, message), f"{c.id}: {message!r} does not name {c.field!r}"
    assert len(message.splitlines()) <= 3, f"{c.id}: message of {len(message.splitlines())} lines"
    assert _listing(tmp_path) == before, f"{c.id}: files were written"

