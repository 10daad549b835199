"""The ``elbolab`` console script: ``elbolab list`` and ``elbolab run NAME [flags]``."""

from __future__ import annotations

import difflib
import importlib
import shlex
import sys

EXPERIMENTS = {
    "gmm_engines": "Bayesian GMM: exact EM, CAVI, SVI (several guides) and NUTS against the exact evidence",
    "fa_gaps": "Factor analysis / PPCA: engines, guides and the exact decomposition of the inference gap",
    "vae_gaps": "VAE on digits: IWAE/AIS evidence, the Cremer et al. gap study, generation and imputation",
    "fit": "Your own model (--model package.module:Name): every engine it supports, evidence, gaps",
}
# elbolab COMMAND [flags] -> elbolab.experiments.<module>.main(flags)
COMMANDS = {"tour": "tour", "report": "report.build", "compare": "compare"}
USAGE = (
    "usage: elbolab list | elbolab run NAME [flags]   (elbolab run NAME --help for flags)\n"
    "       elbolab tour [--out DIR] [--quick]      the three studies and one report\n"
    "       elbolab report RUN_DIR...               (re)build a run's report.html/.md\n"
    "       elbolab compare RUN_DIR... [--out DIR]  merge runs into one table and figure"
)


def studies(indent: str = "") -> str:
    return "\n".join(f"{indent}{name:12s} {text}" for name, text in EXPERIMENTS.items())


def _hint(word: str, rest: list[str]) -> str:
    """'; did you mean 'elbolab ...'?' for the command or study closest to ``word`` (a study
    typed as a command becomes ``elbolab run STUDY``), with the rest of the command line kept."""
    commands = {c: ["elbolab", c] for c in ("list", "run", *COMMANDS)}
    commands.update({s: ["elbolab", "run", s] for s in EXPERIMENTS})
    near = difflib.get_close_matches(word, list(commands), n=1, cutoff=0.6)
    if not near:
        return ""
    return f"; did you mean {shlex.join([*commands[near[0]], *rest])!r}?"


def main(argv=None) -> int:
    """The console script; Ctrl-C or a SIGTERM ends a study with one line and status 130 (its
    unfinished folder handled as the study says), not a traceback."""
    try:
        return _main(argv)
    except KeyboardInterrupt as exc:
        why = str(exc) or "interrupted"
        print(f"elbolab: {why}", file=sys.stderr)
        return 130


def _main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv[0] == "list":
        print(studies())
        return 0
    if argv[0] in COMMANDS:
        return importlib.import_module(f"elbolab.experiments.{COMMANDS[argv[0]]}").main(argv[1:]) or 0
    if argv[0] == "run":
        if len(argv) < 2 or argv[1] in ("-h", "--help"):
            print(f"usage: elbolab run NAME [flags]   (elbolab run NAME --help for its flags); "
                  f"the studies:\n{studies('  ')}", file=sys.stderr if len(argv) < 2 else sys.stdout)
            return 2 if len(argv) < 2 else 0
        name = argv[1]
        if name not in EXPERIMENTS:
            near = difflib.get_close_matches(name, list(EXPERIMENTS), n=1, cutoff=0.6)
            hint = (f"did you mean {shlex.join(['elbolab', 'run', near[0], *argv[2:]])!r}?"
                    if near else f"the studies: {', '.join(EXPERIMENTS)} (elbolab run NAME)")
            print(f"elbolab: unknown study {name!r}; {hint}", file=sys.stderr)
            return 2
        module = importlib.import_module(f"elbolab.experiments.{name}")
        return module.main(argv[2:]) or 0
    hint = _hint(argv[0], argv[1:]) or "; try 'elbolab --help' or 'elbolab list'"
    print(f"elbolab: unknown command {argv[0]!r}{hint}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
