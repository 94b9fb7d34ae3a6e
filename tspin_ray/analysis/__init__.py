"""Reading finished runs: run_reader.py, report.py (plots + report.md), figures.py."""
