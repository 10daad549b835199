"""The settings of ``fa_gaps`` (flags, ``--config`` keys, ``--quick`` defaults) and the checks
that need no data: one dataclass (:mod:`elbolab.experiments.core.study`)."""

from __future__ import annotations

from dataclasses import dataclass

from elbolab import guides
from elbolab.experiments.core import common
from elbolab.experiments.core.study import StudySettings, list_engines_guides, setting
from elbolab.models.fa.model import FactorAnalysis

DESCRIPTION = ("Factor analysis / PPCA: engines, swappable guides and the exact decomposition of "
               "the gaps.")
DEFAULT_GUIDES = "exact,mean-field,full-rank,linear-diag,linear-full,mlp"
ENGINES = ("em", "cavi", "svi", "mcmc")
#: guides the study can train by name (semi-amortized needs a trained encoder passed in code)
STUDY_GUIDES = tuple(g for g in guides.for_family(FactorAnalysis(1)) if g != "semi-amortized")


@dataclass
class Settings(StudySettings):
    """The study's settings (flags, ``--config`` keys); ``--quick`` defaults: about a minute."""

    engines: str = setting(
        ",".join(ENGINES), "engines, comma list of em (always: every other row uses its fit), "
        "cavi (fixed-EM CAVI and Bayesian-FA VB), svi, mcmc (NUTS on the Bayesian FA)",
        comma_list=True)
    guides: str = setting(DEFAULT_GUIDES, "guides trained with the EM parameters fixed, comma "
                          "list of " + ", ".join(STUDY_GUIDES), comma_list=True)
    threads: int | None = setting(1, "torch CPU threads (tiny tensors: one avoids OpenMP "
                                  "barriers)", kind=int)
    n: int = setting(300, "simulated data points", quick=60)
    dim: int = setting(8, "data dimension d of simulated data", quick=5)
    latent_dim: int = setting(2, "latent dimension k")
    model: str = setting("fa", "factor analysis or probabilistic PCA", choices=("fa", "ppca"))
    missing_frac: float = setting(0.2, "fraction of test entries hidden for the imputation study")
    test_frac: float = setting(0.2, "held-out rows")
    joint_guides: str = setting("mean-field,linear-full,mlp", "guides also trained jointly with "
                                "the parameters ('' for none)", comma_list=True)
    svi_steps: int = setting(2000, "SVI steps per fit", quick=40)
    svi_lr: float = setting(0.02, "SVI learning rate")
    hidden: str = setting("32", "MLP encoder hidden sizes, comma list", comma_list=True)
    eval_particles: int = setting(500, "particles per ELBO estimate", quick=50)
    impute_particles: int = setting(2000, "particles for importance-resampling imputation",
                                    quick=300)
    em_iter: int = setting(2000, "max EM / CAVI iterations", quick=300)
    qstar_optimizer: str = setting("auto", "how q* is optimized: auto = L-BFGS on the closed "
                                   "form (FA), svi = generic", choices=("auto", "svi"))
    nuts_samples: int = setting(
        1000, "NUTS draws per chain, Bayesian FA (the largest R-hat over all invariants, 45 at "
        "d = 8, stays < 1.01 only with ~500 effective draws per chain; folded (tail) quantities "
        "get an ESS of about half the draws)", quick=30)
    nuts_warmup: int = setting(140, "NUTS warmup steps per chain (below 150 Pyro adapts the mass "
                               "matrix on one window of 75% of the warmup, at 150 on 25 draws)",
                               quick=30)
    nuts_chains: int = setting(3, "NUTS chains", quick=2)
    nuts_depth: int = setting(3, "NUTS max tree depth (in the identified, whitened coordinates "
                              "a U-turn takes ~7 leapfrog steps)")
    nuts_jit: bool = setting(True, "NUTS with the compiled potential", negatable=True)

    @property
    def engine_list(self) -> list[str]:
        return _split(self.engines)

    @property
    def guide_list(self) -> list[str]:
        return _split(self.guides) if "svi" in self.engine_list else []

    @property
    def joint_list(self) -> list[str]:
        return _split(self.joint_guides) if "svi" in self.engine_list else []

    @property
    def hidden_sizes(self) -> tuple[int, ...]:
        return tuple(int(h) for h in _split(self.hidden))


def _split(text: str) -> list[str]:
    return [t.strip() for t in str(text).split(",") if t.strip()]


def parse(argv) -> Settings:
    """Settings from defaults, --quick, --config and flags, checked before any work."""
    args = common.settings(Settings, argv, "fa_gaps", DESCRIPTION)
    check(args)
    return args


def check(args: Settings) -> None:
    """Every check the flags allow on their own, naming the flag."""
    for name, lo in (("n", 10), ("dim", 2), ("svi_steps", 1), ("latent_dim", 1),
                     ("eval_particles", 2), ("impute_particles", 2), ("em_iter", 1),
                     ("nuts_samples", 4), ("nuts_warmup", 0), ("nuts_chains", 1),
                     ("nuts_depth", 1)):
        if name not in ("n", "dim") or args.data is None:
            args.at_least(name, lo)
    for name in ("missing_frac", "test_frac"):
        args.in_open_unit(name)
    args.finite_positive("svi_lr")
    args.ints("hidden", 1)
    engines, _ = list_engines_guides(args, ENGINES, STUDY_GUIDES)
    if "em" not in engines:
        raise args.error("engines", "em is needed: every other row of the study uses its fit")
    joint = args.names("joint_guides", STUDY_GUIDES, what="guide", allow_empty=True)
    if "exact" in joint:
        raise args.error("joint_guides", "'exact' is the posterior at fixed parameters; it "
                         "cannot be trained jointly with them")
    if joint and "svi" not in engines and args.given("joint_guides"):
        raise args.error("joint_guides", "applies to SVI, which --engines leaves out")
    if args.data is None and args.latent_dim >= args.dim:
        raise args.error("latent_dim", f"must be < --dim ({args.dim}), got {args.latent_dim}")


#: engine/family field -> study flag, to name the flag in errors raised below the study
FIELD_FLAGS = {"latent_dim": "latent_dim", "k": "latent_dim", "num_steps": "svi_steps", "lr": "svi_lr",
               "eval_particles": "eval_particles", "max_iter": "em_iter",
               "num_samples": "nuts_samples", "warmup": "nuts_warmup", "num_chains": "nuts_chains",
               "max_tree_depth": "nuts_depth", "hidden": "hidden"}
