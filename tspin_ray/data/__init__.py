"""SFT data: loading and validating rows (loading.py) and the built-in tasks with exact checkers (tasks.py)."""
