"""The single controller: the iteration loop (driver.py), the trainer group handle, y0, timings, progress."""
