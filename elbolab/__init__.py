"""elbolab: latent-variable models as Pyro model/guide pairs, with interchangeable inference engines.

The four subpackages live at the top of the repository and are installed under this name
(``pyproject.toml``, ``[tool.setuptools.package-dir]``); imports point one way:

    elbolab.models  <-  elbolab.guides  <-  elbolab.inference  <-  elbolab.experiments
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("elbolab")
except PackageNotFoundError:  # pragma: no cover - running from a source tree that is not installed
    __version__ = "0+unknown"
