"""A run's report: ``build.py`` writes report.html/.md (``elbolab report``) from ``run_files.py``
(a run folder read back), ``tables.py`` and ``formatting.py`` (cells and rows), ``findings.py``
and ``convergence.py`` (each section's opening sentences); ``readme_tables.py`` the tables of
README.md and docs/ (``make readme-tables``)."""
