"""Ray Data generation stage: every (prompt, sample) exactly once, shards idempotent, seeds per sample.

    .venv/bin/pytest tests/unit/rollout/test_pipeline.py
"""

from __future__ import annotations

import dataclasses

import pyarrow as pa
import pytest

from tspin_ray.rollout.phases import GenPhase, prompt_rows, row_keys
from tspin_ray.rollout.seeds import sample_seed
from tspin_ray.rollout.shards import check_complete, done_keys, read_shards
from tspin_ray.workers.generation_stage import generation_dataset


def _rows(n: int, t: int = 0, given: dict | None = None) -> pa.Table:
    from tspin_ray.data.loading import Example

    return prompt_rows([Example(f"p{i}", f"{i}+{i}=", str(2 * i)) for i in range(n)], t, given=given)


def _kwargs(ckpt, out_dir, samples=2, score_ref=False, iteration=0) -> GenPhase:
    return GenPhase(model_path=str(ckpt), iteration=iteration, seed=7, samples=samples, max_new_tokens=5,
                    temperature=1.0, top_p=1.0, max_response_tokens=16, max_length=48, score_ref=score_ref,
                    out_dir=str(out_dir) if out_dir else None, checkpoint="c0ffee")


def _run(rows, phase, batch_size=8, max_actors=2, first=()):
    ds = generation_dataset(rows, phase, batch_size=batch_size, min_actors=1, max_actors=max_actors,
                            num_cpus=0.5, num_gpus=0, resources={}, max_attempts=2, first=first)
    return ds.take_all()


def test_a_ramp_of_small_first_batches_changes_no_sample(ray_session, tiny_ckpt, tmp_path):
    """A streamed phase starts with small batches (phases.ramp): one shard per batch of the sizes asked
    for, and every sample equal to the one a uniform batching draws (per-sample seeds)."""
    import doctest

    import pyarrow.parquet as pq

    from tspin_ray.rollout import phases

    assert doctest.testmod(phases).failed == 0
    assert phases.ramp(64, 2, 256) == (32, 32) and phases.ramp(32, 1, 8) == () and phases.ramp(4, 8, 16) == (1,) * 8
    rows = _rows(37)
    plain = _run(rows, _kwargs(tiny_ckpt, tmp_path / "plain"), max_actors=1)
    ramped = _run(rows, _kwargs(tiny_ckpt, tmp_path / "ramp"), max_actors=1, first=(3, 3))
    sizes = sorted(pq.read_metadata(f).num_rows for f in (tmp_path / "ramp").glob("part-*.parquet"))
    assert sizes == [3, 3, 7, 8, 8, 8]
    by_id = {r["prompt_id"]: list(map(list, r["generated_ids"])) for r in plain}
    assert {r["prompt_id"]: list(map(list, r["generated_ids"])) for r in ramped} == by_id


@pytest.mark.parametrize("split", [False, True], ids=["iterator", "streaming_split"])
def test_a_trainer_gets_the_first_block_while_the_second_is_still_made(ray_session, tmp_path, split):
    """A streamed epoch's first micro-batch reaches the trainer as soon as the first generation batch
    exists (trainer.micro_batches), not once the second does too, as Ray Data's default prefetch window
    would have it: then the ramp's small first batch would gain nothing. Both ways a rank reads
    (trainer_group.rank_iterators): the dataset's own iterator, and a streaming_split shard."""
    import threading
    import time

    from tspin_ray.rollout.shards import block_dataset
    from tspin_ray.workers.trainer_rank import micro_batches

    gate, second_done = tmp_path / "gate", tmp_path / "second-done"

    def make(batch):  # the second block waits for the gate (or 60 s), as a slow generation batch would
        if batch["i"][0] >= 4:
            deadline = time.time() + 60
            while not gate.exists() and time.time() < deadline:
                time.sleep(0.02)
            second_done.touch()
        return batch

    ds = block_dataset([pa.table({"i": list(range(4))}), pa.table({"i": list(range(4, 12))})]).map_batches(
        make, batch_size=None, batch_format="numpy", num_cpus=0.01)
    iterator = ds.streaming_split(1, equal=True)[0] if split else ds.iterator()
    got, errors = [], []

    def consume():
        try:
            for b in micro_batches(iterator, 4):
                got.append((b["i"].tolist(), second_done.exists()))
                gate.touch()
        except Exception as e:  # surfaced below: a thread's exception would vanish
            errors.append(e)

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    t.join(timeout=180)
    assert not t.is_alive() and not errors
    assert got == [([0, 1, 2, 3], False), ([4, 5, 6, 7], True), ([8, 9, 10, 11], True)]


def test_sample_seed_is_a_function_of_its_key():
    assert sample_seed(0, 1, "p1", 0) == sample_seed(0, 1, "p1", 0)
    keys = {(s, t, p, k) for s in (0, 1) for t in (0, 1) for p in ("a", "b") for k in (0, 1)}
    assert len({sample_seed(*key) for key in keys}) == len(keys)


def test_batches_cover_every_prompt_and_sample_once(ray_session, tiny_ckpt, tmp_path):
    rows = _rows(37)  # not a multiple of the batch size
    out = _run(rows, _kwargs(tiny_ckpt, tmp_path / "gen"))
    assert sorted(r["prompt_id"] for r in out) == sorted(rows.column("prompt_id").to_pylist())
    assert all(len(r["generated_ids"]) == 2 and len(r["generated"]) == 2 for r in out)
    table = read_shards(tmp_path / "gen")
    assert table.num_rows == 37 and len(list((tmp_path / "gen").glob("part-*.parquet"))) == 5
    check_complete(table, [(0, p) for p in rows.column("prompt_id").to_pylist()], 2, "test")
    # Every row names the weights that made it (and, when scoring, the engine that scored it).
    assert set(table.column("checkpoint").to_pylist()) == {"c0ffee"} and set(table.column("scorer").to_pylist()) == {""}


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
              for r in _run(rows.slice(0, 6), _kwargs(tiny_ckpt, None), batch_size=1)}
    assert single == {k: first[k] for k in single}
    # Another iteration samples differently.
    other = {r["prompt_id"]: [list(g) for g in r["generated_ids"]]
             for r in _run(rows, _kwargs(tiny_ckpt, None, iteration=1))}
    assert other != first


def test_reference_scores_and_given_responses(ray_session, tiny_ckpt):
    given = pa.concat_tables([_rows(1, given={"p0": [[5, 6, 2], [7, 2]]}), _rows(4).slice(1)])
    # p0: a mixed-in previous pair, scored, not sampled
    out = {r["prompt_id"]: r for r in _run(given, _kwargs(tiny_ckpt, None, score_ref=True))}
    assert [list(g) for g in out["p0"]["generated_ids"]] == [[5, 6, 2], [7, 2]]
    for r in out.values():
        assert r["ref_real"] < 0 and all(x < 0 for x in r["ref_generated"])
        assert r["scorer"] == "hf:float32"


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

    from tspin_ray.deadlines import consume
    from tspin_ray.errors import RunFailed

    def engine_that_breaks(batch):  # defined here: Ray's workers cannot import the test module
        raise RuntimeError("CPU Generator does not use offset\nat sampler.py:42")

    ds = ray.data.range(8).map_batches(engine_that_breaks, batch_size=4, max_retries=0)
    with pytest.raises(RunFailed) as err:
        consume(ds.iter_batches(batch_size=None), lambda b: None, timeout=120, what="proto")
    assert str(err.value) == ("proto failed (each batch tried generation.max_attempts times): "
                              "RuntimeError: CPU Generator does not use offset")


def test_derived_seeds_never_collide_across_iterations_and_epochs():
    """seed*1000 + t*10 + epoch gave iteration 0 epoch 10 the permutation of iteration 1 epoch 0 (SFT's
    30 epochs reused the iterations' ones); a hash of the whole tuple does not."""
    from tspin_ray.rollout.seeds import derive_seed

    keys = [(s, "train", t, e) for s in (0, 1) for t in range(5) for e in range(30)]
    keys += [(s, "sft", e) for s in (0, 1) for e in range(30)]
    assert len({derive_seed(*k) for k in keys}) == len(keys)
    assert derive_seed(0, 1, "p1", 0) == sample_seed(0, 1, "p1", 0)  # sample seeds are unchanged


def test_shards_of_other_weights_are_set_aside_and_regenerated(ray_session, tmp_path):
    """A shard records the checkpoint that generated it (and the engine that scored it). Shards of other
    weights (a fallback to an older checkpoint, allow_config_change) go to stale/, their rows are
    generated again, and the manifest says why; shards written before rows recorded it are kept."""
    from tests.helpers import small_config
    from tspin_ray.config.schema import from_dict
    from tspin_ray.controller.driver import Driver
    from tspin_ray.controller.prepare import prepare
    from tspin_ray.rollout.shards import shard_name, write_shard

    driver = Driver(prepare(from_dict(small_config(tmp_path))), quiet=True)
    rows = prompt_rows(driver.prep.train[:8], 0)
    out = tmp_path / "gen"

    def shard(start: int, n: int, **origin) -> str:
        part = rows.slice(start, n).select(["prompt_id", "source_iteration"])
        for key, value in origin.items():
            part = part.append_column(key, pa.array([value] * n, pa.string()))
        keys = [f"0:{p}" for p in part.column("prompt_id").to_pylist()]
        write_shard(part, out, keys)
        return shard_name(keys)

    shard(0, 2, checkpoint="new", scorer="hf:float32")
    old = shard(2, 2, checkpoint="old", scorer="hf:float32")
    shard(4, 2)  # an older tspin-ray's shard: no checkpoint column
    rescored = shard(6, 2, checkpoint="new", scorer="vllm:bfloat16")
    phase = driver.phase(tmp_path / "pi", 0, samples=1, temperature=1.0, max_new_tokens=4, score_ref=True,
                         out_dir=out, checkpoint="new")
    todo = driver.missing(rows, phase, "gen_0")
    ids = rows.column("prompt_id").to_pylist()
    assert todo.column("prompt_id").to_pylist() == ids[2:4] + ids[6:8]
    assert sorted(f.name for f in (out / "stale").iterdir()) == sorted([old, rescored])
    entry = driver.run.entry("stale_gen_0")
    assert entry["files"] == sorted([old, rescored]) and entry["reason"].endswith("not new/hf:float32: regenerated")
    assert driver.missing(rows, phase, "gen_0").num_rows == 4  # nothing more moves; still to generate
    # Without reference scoring (T-SPIN) the scorer does not matter, only the weights.
    assert driver.missing(rows, dataclasses.replace(phase, score_ref=False), "gen_0").num_rows == 4


def test_generation_datasets_with_gpus_and_a_ramp_build_without_a_gpu(ray_session, tiny_ckpt, tmp_path):
    """Ray Data's map_batches refuses batch_size None with GPUs; the per-phase pool (one block per call,
    so a ramp's small blocks stay small) is built anyway. Built, not run: this machine has no GPU."""
    import ray

    ds = generation_dataset(_rows(10), _kwargs(tiny_ckpt, tmp_path), batch_size=4, min_actors=1, max_actors=1,
                            num_cpus=1, num_gpus=1, resources={}, max_attempts=2, first=(2,))
    assert isinstance(ds, ray.data.Dataset)  # map_batches itself raises "You must provide `batch_size`" here


def test_long_lived_pool_gets_every_actor_back_for_each_phase(ray_session, tmp_path):
    """An index a killed forwarding task never returned (simulated: taken and kept) is back at the next phase."""
    from tests.helpers import small_config
    from tspin_ray.config.schema import from_dict
    from tspin_ray.workers.generator_pool import GeneratorPool

    cfg = from_dict(small_config(tmp_path, generation={"persistent": True},
                                 resources={"generators_min": 1, "generators_max": 2, "generator_cpus": 0.5}))
    pool = GeneratorPool(cfg)
    try:
        pool.dataset(_rows(4), _kwargs("unused", None), 2, 1)
        assert sorted([pool.idle.get(), pool.idle.get()]) == [0, 1] and pool.idle.empty()  # both leaked
        pool.dataset(_rows(4), _kwargs("unused", None), 2, 1)
        assert pool.idle.size() == 2
    finally:
        pool.shutdown()


def test_a_vllm_engine_running_two_batches_at_once_keeps_every_sample(ray_session, tiny_ckpt, tmp_path):
    """generation.engine_batches: 2: a long-lived vLLM actor runs two batches at once (their requests share
    its steps). Every row comes back once, each with exactly the samples the engine draws for its seeds
    in a call of its own."""
    pytest.importorskip("vllm")
    from tests.helpers import small_config
    from tspin_ray.config.schema import from_dict
    from tspin_ray.rollout.seeds import sample_seed
    from tspin_ray.workers.engines import make_engine
    from tspin_ray.workers.generator_pool import GeneratorPool

    cfg = from_dict(small_config(tmp_path, generation={"persistent": True, "backend": "vllm", "engine_batches": 2}))
    phase = dataclasses.replace(_kwargs(tiny_ckpt, tmp_path / "gen"), engine=dataclasses.replace(
        GenPhase("", 0).engine, backend="vllm", max_model_len=49))
    rows = _rows(48)
    pool = GeneratorPool(cfg)
    try:
        assert pool.slots == 2 and pool.idle.size() == 0
        got = pool.dataset(rows, phase, 8, 1).take_all()
    finally:
        pool.shutdown()
    table = read_shards(tmp_path / "gen")
    check_complete(table, row_keys(rows), 2, "two batches at once")
    assert len(got) == 48 and len(table.column("generator").unique()) == 1
    engine = make_engine("vllm", str(tiny_ckpt), dtype="float32", max_model_len=49)
    for r in got:
        pid = str(r["prompt_id"])
        alone = engine.generate([list(r["prompt_ids"])] * 2, [sample_seed(7, 0, pid, s) for s in range(2)],
                                max_new_tokens=5, temperature=1.0, top_p=1.0)
        assert [list(g) for g in r["generated_ids"]] == [a[:16] or [engine.format.end_of_turn] for a in alone], pid
