"""The ``elbolab`` console script: ``elbolab list`` and ``elbolab run NAME [flags]``."""

from __future__ import annotations

import importlib
import sys

EXPERIMENTS = {
    "gmm_engines": "Bayesian GMM: exact EM, CAVI, SVI (several guides) and NUTS against the exact evidence",
    "fa_gaps": "Factor analysis / PPCA: engines, guides and the exact decomposition of the inference gap",
    "vae_gaps": "VAE on digits: IWAE/AIS evidence, the Cremer et al. gap study, generation and imputation",
    "fit": "Your own model (--model package.module:Name): every engine it supports, evidence, gaps",
}
# elbolab COMMAND [flags] -> experiments.<module>.main(flags)
COMMANDS = {"tour": "tour", "report": "report", "compare": "compare"}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(
            "usage: elbolab list | elbolab run NAME [flags]   (elbolab run NAME --help for flags)\n"
            "       elbolab tour [--out DIR] [--quick]      the three studies and one report\n"
            "       elbolab report RUN_DIR...               (re)build a run's report.html/.md\n"
            "       elbolab compare RUN_DIR... [--out DIR]  merge runs into one table and figure"
        )
        return 0
    if argv[0] == "list":
        for name, text in EXPERIMENTS.items():
            print(f"{name:12s} {text}")
        return 0
    if argv[0] in COMMANDS:
        return importlib.import_module(f"experiments.{COMMANDS[argv[0]]}").main(argv[1:]) or 0
    if argv[0] == "run" and len(argv) >= 2:
        name = argv[1]
        if name not in EXPERIMENTS:
            print(
                f"elbolab: unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}",
                file=sys.stderr,
            )
            return 2
        module = importlib.import_module(f"experiments.{name}")
        return module.main(argv[2:]) or 0
    print(f"elbolab: unknown command {' '.join(argv)!r}; try 'elbolab list'", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
