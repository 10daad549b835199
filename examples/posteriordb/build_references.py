"""Rebuild ``examples/posteriordb/data/*.json`` and ``tests/data/posteriordb/*.json`` from posteriordb.

    git clone https://github.com/stan-dev/posteriordb /tmp/posteriordb
    python examples/posteriordb/build_references.py /tmp/posteriordb

Reads from the repository's git objects at HEAD (works on a bare mirror too):

- ``posterior_database/data/data/<data>.json.zip``: the data; only the keys the Pyro model takes
  are kept (the keys are the model's keyword arguments).
- ``posterior_database/reference_posteriors/draws/draws/<posterior>.json.zip``: the reference
  draws (10 chains x 1,000 draws, thinned by 10 from 10,000 post-warmup iterations per chain).
  Only their summary is written: per component the mean, the sd and the number of draws.
- ``posterior_database/reference_posteriors/draws/info/<posterior>.info.json``: posteriordb's own
  bulk effective sample size per component (about 10,000: the thinned draws are nearly
  independent), written next to the summary so tests can derive the reference's Monte Carlo error.
"""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
DB = "posterior_database"

#: posterior name -> (data name, keys of the data the Pyro model takes)
POSTERIORS = {
    "eight_schools-eight_schools_noncentered": ("eight_schools", ["J", "y", "sigma"]),
    "kidiq-kidscore_momiq": ("kidiq", ["N", "kid_score", "mom_iq"]),
    "arK-arK": ("arK", ["K", "T", "y"]),
    "garch-garch11": ("garch", ["T", "y", "sigma1"]),
    "low_dim_gauss_mix-low_dim_gauss_mix": ("low_dim_gauss_mix", ["N", "y"]),
    "arma-arma11": ("arma", ["T", "y"]),
    "mesquite-logmesquite": (
        "mesquite",
        ["N", "weight", "diam1", "diam2", "canopy_height", "total_height", "density", "group"],
    ),
}


def git(repo: Path, *args: str) -> bytes:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True).stdout


def unzip_json(blob: bytes):
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        (name,) = z.namelist()
        return json.loads(z.read(name))


def summarize(chains: list[dict], info: dict) -> dict:
    names = list(chains[0])
    ess = dict(zip(info["diagnostics"]["diagnostic_information"]["names"],
                   info["diagnostics"]["effective_sample_size_bulk"], strict=True))
    out = {}
    for name in names:
        xs = [x for chain in chains for x in chain[name]]
        n = len(xs)
        mean = math.fsum(xs) / n
        sd = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
        out[name] = {"mean": mean, "sd": sd, "n": n, "ess_bulk": ess.get(name)}
    return out


def main(repo: str) -> None:
    repo = Path(repo)
    commit = git(repo, "rev-parse", "HEAD").decode().strip()
    for posterior, (data_name, keys) in POSTERIORS.items():
        data_path = f"{DB}/data/data/{data_name}.json.zip"
        draws_path = f"{DB}/reference_posteriors/draws/draws/{posterior}.json.zip"
        info_path = f"{DB}/reference_posteriors/draws/info/{posterior}.info.json"
        post = json.loads(git(repo, "show", f"HEAD:{DB}/posteriors/{posterior}.json"))
        model_path = f"{DB}/models/stan/{post['model_name']}.stan"
        data = unzip_json(git(repo, "show", f"HEAD:{data_path}"))
        (HERE / "data" / f"{data_name}.json").write_text(
            json.dumps({k: data[k] for k in keys}) + "\n")
        info = json.loads(git(repo, "show", f"HEAD:{info_path}"))
        summary = {
            "posterior": posterior,
            "source": "https://github.com/stan-dev/posteriordb",
            "commit": commit,
            "draws_last_changed_in": git(repo, "log", "-1", "--format=%H", "--", draws_path)
            .decode().strip(),
            "draws_path": draws_path,
            "data_path": data_path,
            "model_path": model_path,
            "inference": info["inference"],
            "parameters": summarize(unzip_json(git(repo, "show", f"HEAD:{draws_path}")), info),
        }
        out = ROOT / "tests" / "data" / "posteriordb" / f"{posterior}.json"
        out.write_text(json.dumps(summary, indent=1) + "\n")
        print(f"{posterior}: {len(summary['parameters'])} components -> {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "posteriordb")
