"""The settings of ``vae_gaps`` (flags, ``--config`` keys, ``--quick`` defaults) and its checks,
run before any training: one dataclass (:mod:`elbolab.experiments.core.study`)."""

from __future__ import annotations

from dataclasses import dataclass

from elbolab.experiments.core import common
from elbolab.experiments.core.study import StudySettings, list_engines_guides, setting
from elbolab.models.data import images

DESCRIPTION = ("VAE on digits: IWAE/AIS evidence, the Cremer et al. (2018) gap study, generation "
               "and imputation.")
ENGINES = ("svi", "mcmc")
#: encoders a VAE can be trained with by name
TRAINABLE = ("mlp", "flow", "linear-diag", "linear-full")
#: the label of an encoder in the tables (``vae_gaps.ENCODERS``: "ffg" is the mlp encoder)
LABELS = {"mlp": "ffg", "flow": "flow"}


@dataclass
class Settings(StudySettings):
    """The study's settings (flags, ``--config`` keys); ``--quick`` defaults: about a minute."""

    engines: str = setting("svi,mcmc", "svi (training, the gaps; always) and mcmc (the NUTS "
                           "reference over z)", comma_list=True)
    guides: str = setting("mlp,flow", "encoders the VAE is trained with, comma list of "
                          + ", ".join(TRAINABLE) + " (mlp is the FFG encoder every later stage "
                          "uses)", comma_list=True)
    dtype: str = setting("float32", "floating-point type of data and fits",
                         choices=("float32", "float64"))
    threads: int | None = setting(1, "torch CPU threads (small networks: one is fastest)",
                                  kind=int)
    latent_dim: int = setting(8, "latent dimension")
    hidden: str = setting("256", "hidden sizes of decoder and encoders, comma list", quick="16",
                          comma_list=True)
    likelihood: str = setting("bernoulli", "bernoulli: binarized pixels; gaussian: [0, 1] "
                              "intensities", choices=("bernoulli", "gaussian"))
    var_floor: float = setting(1e-3, "gaussian likelihood: variance floor")
    svi_epochs: int = setting(1000, "max SVI training epochs, passes over the training images "
                              "(a cap: training stops once the held-out ELBO has not improved "
                              "for --patience evaluations)", quick=2)
    batch_size: int = setting(128, "minibatch size")
    svi_lr: float = setting(1e-3, "Adam learning rate")
    patience: int = setting(10, "early stop after this many held-out evaluations (every 5 "
                            "epochs) without improvement; 0 = off")
    flow: str = setting("iaf", "flow of the flow encoder", choices=("iaf", "coupling", "spline"))
    num_flows: int = setting(2, "flow layers", quick=1)
    gap_points: int = setting(50, "train and test images in the gap study (each)", quick=6)
    qstar_steps: int = setting(1000, "max SVI steps for q*", quick=30)
    iwae_particles: int = setting(5000, "IWAE samples per point", quick=50)
    eval_particles: int = setting(1000, "draws per point for ELBO estimates", quick=20)
    ais_steps: int = setting(300, "AIS temperatures", quick=10)
    ais_chains: int = setting(8, "AIS chains per point", quick=4)
    capacities: str = setting("16,64,256", "encoder widths of the capacity sweep", quick="4,16",
                              comma_list=True)
    capacity_epochs: int = setting(1000, "max epochs per encoder of the capacity sweep (early "
                                   "stopped like --svi-epochs)", quick=1)
    sa_steps: str = setting("0,5,20,100", "semi-amortized K values", quick="0,3",
                            comma_list=True)
    nuts_points: int = setting(3, "test images for NUTS", quick=1)
    nuts_samples: int = setting(150, "NUTS draws per chain", quick=15)
    nuts_warmup: int = setting(150, "NUTS warmup steps per chain", quick=15)
    nuts_chains: int = setting(2, "NUTS chains", quick=1)
    nuts_depth: int = setting(8, "NUTS max tree depth")
    nuts_jit: bool = setting(True, "NUTS with the compiled potential", negatable=True)
    impute_points: int = setting(200, "test images for imputation", quick=20)
    impute_particles: int = setting(1000, "importance-sampling particles", quick=50)
    gibbs_steps: int = setting(50, "pseudo-Gibbs sweeps", quick=6)
    validate: bool = setting(False, "keep Pyro's validation on")
    strategy: str = setting("none", "training of the study's VAEs: none (this process), ddp (one "
                            "process per device, started by Lightning's launcher, torchrun or "
                            "SLURM; every process runs this command, rank 0 writes the study) "
                            "or ddp_spawn (processes spawned from this one); later stages run "
                            "in one process", choices=("none", "ddp", "ddp_spawn"))
    devices: int = setting(1, "processes per node for --strategy (GPUs with --device cuda)")
    num_nodes: int = setting(1, "nodes for --strategy ddp")


    @classmethod
    def upgrade_saved(cls, saved: dict) -> dict:
        """As :meth:`StudySettings.upgrade_saved`; a run saved before ``--nuts-warmup`` existed
        warmed NUTS up for as many steps as it drew."""
        if "mcmc_samples" in saved and "nuts_warmup" not in saved:
            saved["nuts_warmup"] = saved["mcmc_samples"]
        return super().upgrade_saved(saved)


def parse(argv) -> Settings:
    """Settings from defaults, --quick, --config and flags."""
    return common.settings(Settings, argv, "vae_gaps", DESCRIPTION)


def resolve(args: Settings) -> dict:
    """The study's sizes as a dict (comma lists parsed), after every check the flags allow."""
    cfg = {k: getattr(args, k) for k in ("svi_epochs", "hidden", "gap_points", "qstar_steps",
                                         "ais_steps", "ais_chains", "iwae_particles",
                                         "eval_particles", "capacities", "capacity_epochs",
                                         "sa_steps", "nuts_points", "nuts_samples",
                                         "nuts_warmup", "nuts_chains", "nuts_depth", "nuts_jit",
                                         "impute_points", "impute_particles", "gibbs_steps",
                                         "num_flows")}
    cfg["hidden"] = tuple(args.ints("hidden", 1))
    cfg["capacities"] = args.ints("capacities", 1)
    cfg["sa_steps"] = args.ints("sa_steps", 0)
    args.at_least("num_flows", 0)
    args.at_least("batch_size", 1)
    args.at_least("patience", 0)
    args.finite_positive("svi_lr")
    args.finite_positive("var_floor")
    for key in ("svi_epochs", "gap_points", "qstar_steps", "ais_steps", "ais_chains",
                "iwae_particles", "capacity_epochs", "nuts_points", "nuts_samples", "nuts_chains",
                "nuts_depth", "impute_points", "impute_particles", "gibbs_steps"):
        args.at_least(key, 1)
    args.at_least("nuts_warmup", 0)
    args.at_least("eval_particles", 2)
    if args.latent_dim < 2:
        raise args.error("latent_dim", f"must be >= 2 (flows and the latent map need 2), got "
                         f"{args.latent_dim}")
    engines, trained = list_engines_guides(args, ENGINES, TRAINABLE)
    if "svi" not in engines:
        raise args.error("engines", "svi is needed: it trains the VAEs every stage studies")
    if "mlp" not in trained:
        raise args.error("guides", "needs mlp: the FFG encoder's model is the one the capacity, "
                         "semi-amortized, NUTS and imputation stages study")
    cfg["engines"], cfg["kinds"] = engines, [LABELS.get(g, g) for g in trained]
    _check_strategy(args)
    return cfg


def _check_strategy(args: Settings) -> None:
    args.at_least("devices", 1)
    args.at_least("num_nodes", 1)
    if args.strategy == "none":
        for key in ("devices", "num_nodes"):
            if getattr(args, key) != 1:
                raise args.error(key, "more than one process needs --strategy ddp or ddp_spawn")
        return
    if args.patience:
        raise args.error("patience", f"early stopping is not available with --strategy "
                         f"{args.strategy} (held-out evaluations run between steps, in one "
                         f"process); give --patience 0 and a fixed --svi-epochs")
    for key in ("checkpoint_every", "resume"):
        if getattr(args, key):
            raise args.error(key, f"not available with --strategy {args.strategy} (the "
                             "distributed trainer runs a fixed number of steps, unsaved)")
    if args.strategy == "ddp_spawn" and args.num_nodes != 1:
        raise args.error("num_nodes", "several nodes need --strategy ddp (one process per "
                         "device, started on every node)")
    world = args.devices * args.num_nodes
    if args.batch_size % world:
        raise args.error("batch_size", f"the global batch must be a multiple of the {world} "
                         f"processes, got {args.batch_size}")


def check_data(args: Settings, data) -> None:
    """The checks that need the data (before any training)."""
    d = data.data_dim
    if args.latent_dim >= d:
        raise args.error("latent_dim", f"must be < the data dimension {d} (the factor-analysis "
                         f"imputation baseline fits that many factors), got {args.latent_dim}")
    try:
        fit_idx, _ = images.split(data.x_train.shape[0], 0.1, args.seed)
    except ValueError as exc:
        raise common.data_error(exc) from None
    if len(fit_idx) < 2 or data.x_test.shape[0] < 1:
        raise common.CliError(f"--data: too few images ({data.x_train.shape[0]} train, "
                              f"{data.x_test.shape[0]} test) for a training and a held-out split")
