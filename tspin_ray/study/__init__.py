"""Research on top of runs: study plans, declared claims and their verdicts, distributional metrics."""
