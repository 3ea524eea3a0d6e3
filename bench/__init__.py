"""The performance suite (``python -m bench.suite``, ``make bench``) and the measurements it
is made of; each script runs as a module from the repository root (``python -m bench.X``)."""
