"""Self-play health: figures by hand, the collapse warning and the best iterate on the issue's T-SPIN run.

    .venv/bin/pytest tests/unit/controller/test_health.py
"""

from __future__ import annotations

import pyarrow as pa
import pytest

from tspin_ray.config.schema import EvalConfig
from tspin_ray.controller.health import evaluation_figures, judge, sample_figures, selection


def rule(select: str, nll_factor: float, min_distinct: float, max_unfinished: float) -> EvalConfig:
    """The eval keys judge reads: eval.select and the three collapse thresholds."""
    return EvalConfig(select=select, collapse_nll_factor=nll_factor, collapse_min_distinct=min_distinct,
                      collapse_max_unfinished=max_unfinished)


def test_evaluation_figures_by_hand():
    answers = {"a": "4", "b": "4", "c": "7", "d": "9"}
    ended = {"a": True, "b": True, "c": False, "d": True}
    got = evaluation_figures(answers, ended, heldout_nll=12.0, heldout_rows=4, train_nll=6.0, train_rows=3)
    assert got == {"health/logp_real_heldout": -3.0, "health/logp_real_train": -2.0, "health/distinct_greedy": 0.75,
                   "health/unfinished_greedy": 0.25}


def test_sample_figures_count_this_iterations_own_samples():
    # SPIN mixes iteration 0's pairs into iteration 1: only source_iteration 1's samples count
    table = pa.table({"source_iteration": [1, 1, 0], "generated_ids": [[[5, 6, 2], [5, 6, 2]], [[7, 2]], [[9, 9, 9, 9]]]})
    assert sample_figures(table) == {"health/distinct_samples": pytest.approx(2 / 3),
                                     "health/sample_tokens": pytest.approx(8 / 3)}
    assert sample_figures(None) == {}


# The T-SPIN run of the issue (SmolLM2, 64 arithmetic questions): held-out NLL 1.79 -> 0.98 -> 2.93, exact
# match 0 -> 0.19 -> 0, and pi_2 answering "4" to 31 of the 32 held-out prompts.
HISTORY = [("pi_0", {"eval/nll": 1.79, "eval/exact_match": 0.0, "health/distinct_greedy": 0.9}),
           ("pi_1", {"eval/nll": 0.98, "eval/exact_match": 0.19, "health/distinct_greedy": 0.8}),
           ("pi_2", {"eval/nll": 2.93, "eval/exact_match": 0.0, "health/distinct_greedy": 2 / 32})]


def test_the_collapsed_tspin_run_warns_at_pi_2_and_picks_pi_1():
    healthy = judge(HISTORY[:2], rule("nll", 1.5, 0.2, 0.5))
    assert not healthy.collapsed and healthy.best == "pi_1" and healthy.figures() == {
        "health/best_iterate": 1, "health/nll_vs_best": pytest.approx(0.98 / 1.79)}
    v = judge(HISTORY, rule("nll", 1.5, 0.2, 0.5))
    assert v.collapsed and v.best == "pi_1" and v.best_value == 0.98
    assert v.figures() == {"health/best_iterate": 1, "health/nll_vs_best": pytest.approx(2.93 / 0.98)}
    assert v.warning(stops=False) == (
        "warning: pi_2 looks collapsed: held-out NLL 2.93 is 2.99x the best so far (0.98, pi_1; "
        "eval.collapse_nll_factor 1.5); distinct greedy answers 0.06 of the held-out prompts < 0.2 "
        "(eval.collapse_min_distinct; pi_0 0.90). Best iterate: pi_1 (eval/nll 0.98, eval.select; checkpoints/best); "
        "eval.stop_on_collapse: true stops a run here")
    assert v.warning(stops=True).endswith("the run stops here (eval.stop_on_collapse)")


def test_thresholds_and_selection_come_from_the_config():
    assert not judge(HISTORY, rule("nll", 3.5, 0.05, 0.5)).collapsed  # 2.99x < 3.5 and 0.06 > 0.05
    assert judge(HISTORY, rule("nll", 3.5, 0.1, 0.5)).reasons[0].startswith("distinct greedy answers 0.06")
    assert judge(HISTORY, rule("exact_match", 1.5, 0.2, 0.5)).best == "pi_1"
    assert selection("lm_eval/gsm8k/exact_match") == ("eval/lm_eval/gsm8k/exact_match", False)
    assert selection("nll") == ("eval/nll", True)
    first = judge(HISTORY[:1], rule("nll", 1.5, 0.02, 0.5))  # pi_0 alone: the best, and never judged collapsed
    assert first.best == "pi_0" and not first.collapsed and first.nll_vs_best == 1.0
    low = [(k, {**row, "health/distinct_greedy": 0.03}) for k, row in HISTORY[:2]]  # answers repeat from pi_0 on
    assert not judge(low, rule("nll", 1.5, 0.2, 0.5)).collapsed


# Seed 1's T-SPIN of the real-model study (docs/results.md): its answers turned into SmolLM2's chat style,
# cut at 16 tokens ("To calculate 52 - 44, you simply subtract 52"); NLL rose only 1.22x, answers stayed
# distinct, exact match went 0.292 -> 0.0.
TALKS_ON = [("pi_0", {"eval/nll": 0.416, "health/distinct_greedy": 1.0, "health/unfinished_greedy": 0.04}),
            ("pi_1", {"eval/nll": 0.389, "health/distinct_greedy": 0.98, "health/unfinished_greedy": 0.42}),
            ("pi_2", {"eval/nll": 0.473, "health/distinct_greedy": 1.0, "health/unfinished_greedy": 0.94})]


def test_answers_that_run_out_of_tokens_are_a_collapse_the_nll_check_misses():
    assert not judge(TALKS_ON[:2], rule("nll", 1.5, 0.2, 0.5)).collapsed  # 0.42 unfinished: not yet
    v = judge(TALKS_ON, rule("nll", 1.5, 0.2, 0.5))
    assert v.reasons == ("0.94 of the held-out greedy answers end unfinished at eval.max_new_tokens > 0.5 "
                         "(eval.collapse_max_unfinished; pi_0 0.04)",) and v.best == "pi_1"
    assert not judge(TALKS_ON, rule("nll", 1.5, 0.2, 0.95)).collapsed  # the threshold comes from the config
    long = [(k, {**row, "health/unfinished_greedy": 1.0}) for k, row in TALKS_ON]  # answers longer than the limit
    assert not judge(long, rule("nll", 1.5, 0.2, 0.5)).collapsed  # from pi_0 on: not a collapse
