"""What every study shares: settings and flags (``study.py``), the run folder (``rundir.py``),
the set-up, data and references of a run (``common.py``) and its figures (``plots.py``)."""
