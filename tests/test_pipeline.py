"""Ray Data generation stage: every (prompt, sample) exactly once, shards idempotent, seeds per sample.

    .venv/bin/pytest tests/test_pipeline.py
"""

from __future__ import annotations

import json

import pytest

from tspin_ray.pipeline import (
    check_complete,
    done_keys,
    generation_dataset,
    read_shards,
    sample_seed,
)


def _rows(n: int, t: int = 0) -> list[dict]:
    return [{"prompt_id": f"p{i}", "prompt": f"{i}+{i}=", "response": str(2 * i), "system": "",
             "source_iteration": t, "proto_json": "", "given_json": ""} for i in range(n)]


def _kwargs(ckpt, out_dir, samples=2, score_ref=False, iteration=0):
    return dict(model_path=str(ckpt), backend="hf", engine_kwargs={}, iteration=iteration, seed=7,
                samples=samples, max_new_tokens=5, temperature=1.0, top_p=1.0, max_response_tokens=16,
                max_length=48, score_ref=score_ref, out_dir=str(out_dir) if out_dir else None)


def _run(rows, kwargs, batch_size=8, max_actors=2):
    ds = generation_dataset(rows, stage_kwargs=kwargs, batch_size=batch_size, min_actors=1,
                            max_actors=max_actors, num_cpus=0.5, num_gpus=0, resources={}, max_attempts=2)
    return ds.take_all()


def test_sample_seed_is_a_function_of_its_key():
    assert sample_seed(0, 1, "p1", 0) == sample_seed(0, 1, "p1", 0)
    keys = {(s, t, p, k) for s in (0, 1) for t in (0, 1) for p in ("a", "b") for k in (0, 1)}
    assert len({sample_seed(*key) for key in keys}) == len(keys)


def test_batches_cover_every_prompt_and_sample_once(ray_session, tiny_ckpt, tmp_path):
    rows = _rows(37)  # not a multiple of the batch size
    out = _run(rows, _kwargs(tiny_ckpt, tmp_path / "gen"))
    assert sorted(r["prompt_id"] for r in out) == sorted(r["prompt_id"] for r in rows)
    assert all(len(r["generated_ids"]) == 2 and len(r["generated"]) == 2 for r in out)
    table = read_shards(tmp_path / "gen")
    assert table.num_rows == 37 and len(list((tmp_path / "gen").glob("part-*.parquet"))) == 5
    check_complete(table, [(0, r["prompt_id"]) for r in rows], 2, "test")


def test_redone_batches_overwrite_their_shard_and_reproduce_samples(ray_session, tiny_ckpt, tmp_path):
    rows = _rows(20)
    first = {r["prompt_id"]: [list(g) for g in r["generated_ids"]] for r in _run(rows, _kwargs(tiny_ckpt, tmp_path))}
    # The same work again, as after an actor failure or a resume: same shard names, same samples.
    again = {r["prompt_id"]: [list(g) for g in r["generated_ids"]] for r in _run(rows, _kwargs(tiny_ckpt, tmp_path))}
    assert again == first
    assert read_shards(tmp_path).num_rows == 20
    assert done_keys(read_shards(tmp_path)) == {(0, f"p{i}") for i in range(20)}
    # Batch composition does not change a sample: one prompt per batch gives the same responses.
    single = {r["prompt_id"]: [list(g) for g in r["generated_ids"]]
              for r in _run(rows[:6], _kwargs(tiny_ckpt, None), batch_size=1)}
    assert single == {k: first[k] for k in single}
    # Another iteration samples differently.
    other = {r["prompt_id"]: [list(g) for g in r["generated_ids"]]
             for r in _run(rows, _kwargs(tiny_ckpt, None, iteration=1))}
    assert other != first


def test_reference_scores_and_given_responses(ray_session, tiny_ckpt):
    rows = _rows(4)
    rows[0]["given_json"] = json.dumps([[5, 6, 2], [7, 2]])  # a mixed-in previous pair: scored, not sampled
    out = {r["prompt_id"]: r for r in _run(rows, _kwargs(tiny_ckpt, None, score_ref=True))}
    assert [list(g) for g in out["p0"]["generated_ids"]] == [[5, 6, 2], [7, 2]]
    for r in out.values():
        assert r["ref_real"] < 0 and all(x < 0 for x in r["ref_generated"])


def test_check_complete_reports_missing_and_duplicates(ray_session, tiny_ckpt, tmp_path):
    _run(_rows(5), _kwargs(tiny_ckpt, tmp_path))
    table = read_shards(tmp_path)
    with pytest.raises(RuntimeError, match="1 rows missing, 0 duplicated"):
        check_complete(table, [(0, f"p{i}") for i in range(6)], 2, "iteration 0")
    import pyarrow as pa

    with pytest.raises(RuntimeError, match="0 rows missing, 5 duplicated"):
        check_complete(pa.concat_tables([table, table]), [(0, f"p{i}") for i in range(5)], 2, "iteration 0")


def test_a_failed_phase_names_the_root_cause_in_one_line(ray_session):
    """Ray wraps a worker's exception (RayTaskError, UserCodeException, a traceback); the user's one line
    carries the innermost exception's type and first line instead of a cut-off wrapper."""
    import ray

    from tspin_ray.driver import consume
    from tspin_ray.errors import RunFailed

    def engine_that_breaks(batch):  # defined here: Ray's workers cannot import the test module
        raise RuntimeError("CPU Generator does not use offset\nat sampler.py:42")

    ds = ray.data.range(8).map_batches(engine_that_breaks, batch_size=4, max_retries=0)
    with pytest.raises(RunFailed) as err:
        consume(ds.iter_batches(batch_size=None), lambda b: None, timeout=120, what="proto")
    assert str(err.value) == ("proto failed (each batch tried generation.max_attempts times): "
                              "RuntimeError: CPU Generator does not use offset")
