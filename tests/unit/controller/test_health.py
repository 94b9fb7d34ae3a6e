"""Self-play health: figures by hand, the collapse warning and the best iterate on the issue's T-SPIN run.

    .venv/bin/pytest tests/unit/controller/test_health.py
"""

from __future__ import annotations

import pyarrow as pa
import pytest

from tspin_ray.controller.health import evaluation_figures, judge, sample_figures, selection


def test_evaluation_figures_by_hand():
    answers = {"a": "4", "b": "4", "c": "7", "d": "9"}
    got = evaluation_figures(answers, heldout_nll=12.0, heldout_rows=4, train_nll=6.0, train_rows=3)
    assert got == {"health/logp_real_heldout": -3.0, "health/logp_real_train": -2.0, "health/distinct_greedy": 0.75}


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
    healthy = judge(HISTORY[:2], "nll", 1.5, 0.2)
    assert not healthy.collapsed and healthy.best == "pi_1" and healthy.figures() == {
        "health/best_iterate": 1, "health/nll_vs_best": pytest.approx(0.98 / 1.79)}
    v = judge(HISTORY, "nll", 1.5, 0.2)
    assert v.collapsed and v.best == "pi_1" and v.best_value == 0.98
    assert v.figures() == {"health/best_iterate": 1, "health/nll_vs_best": pytest.approx(2.93 / 0.98)}
    assert v.warning(stops=False) == (
        "warning: pi_2 looks collapsed: held-out NLL 2.93 is 2.99x the best so far (0.98, pi_1; "
        "eval.collapse_nll_factor 1.5); distinct greedy answers 0.06 of the held-out prompts < 0.2 "
        "(eval.collapse_min_distinct; pi_0 0.90). Best iterate: pi_1 (eval/nll 0.98, eval.select; checkpoints/best); "
        "eval.stop_on_collapse: true stops a run here")
    assert v.warning(stops=True).endswith("the run stops here (eval.stop_on_collapse)")


def test_thresholds_and_selection_come_from_the_config():
    assert not judge(HISTORY, "nll", 3.5, 0.05).collapsed  # 2.99x < 3.5 and 0.06 > 0.05
    assert judge(HISTORY, "nll", 3.5, 0.1).reasons[0].startswith("distinct greedy answers 0.06")
    assert judge(HISTORY, "exact_match", 1.5, 0.2).best == "pi_1"
    assert selection("lm_eval/gsm8k/exact_match") == ("eval/lm_eval/gsm8k/exact_match", False)
    assert selection("nll") == ("eval/nll", True)
    first = judge(HISTORY[:1], "nll", 1.5, 0.02)  # pi_0 alone: the best, and never judged collapsed
    assert first.best == "pi_0" and not first.collapsed and first.nll_vs_best == 1.0
    low = [(k, {**row, "health/distinct_greedy": 0.03}) for k, row in HISTORY[:2]]  # answers repeat from pi_0 on
    assert not judge(low, "nll", 1.5, 0.2).collapsed
