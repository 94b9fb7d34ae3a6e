"""The run directory: atomic commits, manifest and checksums (store.py), metrics sinks (rundir/metrics.py)."""
