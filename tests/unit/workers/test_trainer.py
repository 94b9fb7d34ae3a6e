"""Trainer actors: a DeepSpeed step equals a plain single-process torch step; 2 ranks equal 1 rank.

    .venv/bin/pytest tests/unit/workers/test_trainer.py
"""

from __future__ import annotations

import json

import pytest
import ray
import torch

from tests.helpers.trainers import BEGIN, addition_rows, epoch_records, group_step, one_rank
from tspin_ray.algorithms.inputs import batch_logprobs
from tspin_ray.algorithms.logprobs import sequence_logprobs
from tspin_ray.algorithms.objectives import OBJECTIVES, Objective, tspin
from tspin_ray.models.checkpoints import load_model
from tspin_ray.workers.records import OptimizerSetup
from tspin_ray.workers.trainer_rank import start_trainers

TSPIN = OBJECTIVES["tspin"]


def _reference_step(ckpt, rows) -> tuple[float, float]:
    """The same step by hand in this process: mean T-SPIN loss over the global batch, AdamW."""
    model = load_model(ckpt)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    batch = {k: [r[k] for r in rows] for k in rows[0]}
    losses, _ = tspin(**batch_logprobs(model, batch, TSPIN, {"beta": 0.1}, pad_id=0), alpha=1.0, beta=0.1)
    loss = losses.mean()
    loss.backward()
    opt.step()
    return float(loss.detach()), float(sum(p.detach().double().sum() for p in model.parameters()))


@pytest.fixture(scope="module")
def reference(tiny_ckpt):
    return _reference_step(tiny_ckpt, addition_rows(tiny_ckpt))


@pytest.mark.parametrize("backend,world,zero,offload", [
    ("torch", 1, 0, "none"), ("deepspeed", 1, 0, "none"), ("torch", 2, 0, "none"), ("deepspeed", 2, 2, "none"),
    ("deepspeed", 1, 2, "optimizer"), ("deepspeed", 2, 3, "all")])
def test_group_step_equals_single_process_step(ray_session, tiny_ckpt, reference, backend, world, zero, offload):
    loss, fingerprint = group_step(tiny_ckpt, addition_rows(tiny_ckpt), backend, world, zero, offload=offload)
    ref_loss, ref_fingerprint = reference
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert fingerprint == pytest.approx(ref_fingerprint, rel=1e-6)
    assert fingerprint != pytest.approx(_reference_params(tiny_ckpt), rel=1e-9)  # the step changed weights


def test_zero3_ranks_load_only_their_shard_and_export_the_full_model(ray_session, tiny_ckpt, reference, tmp_path):
    """ZeRO-3 loads through zero.Init: right after `load`, before DeepSpeed's initialize, each of 2 ranks
    holds about half of the parameters (shards are padded to the world size, so at most one element more
    per parameter). The step equals the single-process one, and rank 0 exports the whole model one
    safetensors shard at a time: 359 kB of fp32 weights in files of at most 100 kB, with the index and
    config `save_pretrained` writes."""
    full = sum(p.numel() for p in load_model(tiny_ckpt).parameters())
    counts = []
    loss, fingerprint = group_step(tiny_ckpt, addition_rows(tiny_ckpt), "deepspeed", 2, 3, export_to=tmp_path / "z3",
                                    loaded=lambda actors: counts.extend(ray.get([a.param_counts.remote()
                                                                                 for a in actors])),
                                    shard_bytes=100_000)
    n_params = len(list(load_model(tiny_ckpt).parameters()))
    assert [c["full"] for c in counts] == [full, full]
    assert all(full / 2 <= c["held"] <= full / 2 + n_params for c in counts), (counts, full)
    assert (loss, fingerprint) == pytest.approx(reference, rel=1e-6)
    exported = load_model(tmp_path / "z3")
    assert sum(p.numel() for p in exported.parameters()) == full
    assert float(sum(p.detach().double().sum() for p in exported.parameters())) == pytest.approx(fingerprint, rel=1e-9)
    shards = sorted(f.name for f in (tmp_path / "z3").glob("*.safetensors"))
    n = len(shards)
    assert n >= 4 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert all((tmp_path / "z3" / f).stat().st_size <= 100_000 + 4096 for f in shards)  # + the JSON header
    index = json.loads((tmp_path / "z3" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 4 * full
    assert sorted(index["weight_map"]) == sorted(n for n, _ in exported.named_parameters())
    config = {k: v for k, v in json.loads((tmp_path / "z3" / "config.json").read_text()).items()
              if k != "transformers_version"}
    assert config == {k: v for k, v in json.loads((tiny_ckpt / "config.json").read_text()).items()
                      if k != "transformers_version"}
    assert (tmp_path / "z3" / "generation_config.json").exists() and (tmp_path / "z3" / "tokenizer.json").exists()


def test_zero3_nll_right_after_load_with_uneven_rows(ray_session, tiny_ckpt, tiny_ckpt_b):
    """Held-out NLL on a freshly loaded ZeRO-3 model (pi_0 given as a path is evaluated before any step):
    3 rows over 2 ranks in batches of 1, so rank 0 has two batches and rank 1 one. The sum equals the
    single-process sum, and nobody waits forever for a forward the other rank never runs. Loading other
    weights into the same ranks then replaces the sharded model and its engine."""
    from tspin_ray.algorithms.logprobs import sequence_logprobs

    rows = addition_rows(tiny_ckpt)[:3]
    prompts, responses = [r["prompt_ids"] for r in rows], [r["real_ids"] for r in rows]
    with torch.no_grad():
        want = [-float(sequence_logprobs(load_model(c), prompts, responses, 0).sum()) for c in (tiny_ckpt, tiny_ckpt_b)]
    actors = start_trainers(2, "deepspeed", 3, options={"num_cpus": 0.5})
    got = []
    try:
        for ckpt in (tiny_ckpt, tiny_ckpt_b):
            ray.get([a.load.remote(str(ckpt)) for a in actors])
            got.append(ray.get([a.nll.remote(prompts, responses, 1) for a in actors], timeout=120))
    finally:
        for a in actors:
            ray.kill(a)
    for (rank0, rank1), nll in zip(got, want, strict=True):
        assert rank0 == rank1  # all-reduced
        assert rank0[0] == pytest.approx(nll, rel=1e-5) and rank0[1] == sum(map(len, responses))
    assert want[0] != pytest.approx(want[1], rel=1e-3)  # two different models


def _reference_params(ckpt) -> float:
    return float(sum(p.detach().double().sum() for p in load_model(ckpt).parameters()))


def test_tspin_at_beta0_forwards_no_y0(tiny_ckpt, monkeypatch):
    """beta = 0 (iteration 0): one forward over y and y' only, with their log-probs unchanged; rows from
    iteration 0 carry no y0 at all, and a beta != 0 step on such rows is refused with the reason."""
    from tspin_ray.algorithms import inputs

    model, rows = load_model(tiny_ckpt), addition_rows(tiny_ckpt)
    batch = {k: [r[k] for r in rows] for k in rows[0]}
    sizes = []
    real = inputs.sequence_logprobs
    monkeypatch.setattr(inputs, "sequence_logprobs", lambda m, p, r, pad: sizes.append(len(p)) or real(m, p, r, pad))
    with torch.no_grad():
        full = batch_logprobs(model, batch, TSPIN, {"beta": 0.1}, pad_id=0)
        lean = batch_logprobs(model, {**batch, "proto_ids": [[] for _ in rows]}, TSPIN, {"beta": 0.0}, pad_id=0)
    assert sizes == [24, 16] and "policy_proto" not in lean
    for key in ("policy_real", "policy_generated"):
        torch.testing.assert_close(lean[key], full[key], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="a T-SPIN row has 0 y0 samples for its 1 y' samples"):
        batch_logprobs(model, {**batch, "proto_ids": [[] for _ in rows]}, TSPIN, {"beta": 0.1}, pad_id=0)


def test_length_sorted_micro_batches_keep_rows_and_cut_padding():
    """Row lengths (prompt 1 + response) 9,2,8,3 | 7,1,6,2 pad to 9 and 7: (9 + 7) x 4 = 64 tokens as given;
    regrouped as 1,2,2,3 | 6,7,8,9 they pad to 3 and 9: (3 + 9) x 4 = 48."""
    import numpy as np

    from tspin_ray.algorithms.inputs import _row_length, length_sorted

    def batch(lengths, ids):
        real = np.empty(len(lengths), dtype=object)
        for j, n in enumerate(lengths):
            real[j] = np.arange(n)
        return {"prompt_ids": [[0]] * len(lengths), "real_ids": real, "row": np.array(ids)}

    given = [batch([8, 1, 7, 2], [0, 1, 2, 3]), batch([6, 0, 5, 1], [4, 5, 6, 7])]
    out = length_sorted(given)

    def padded(bs):
        return sum(max(_row_length(b, i) for i in range(4)) * 4 for b in bs)

    assert padded(given) == 64 and padded(out) == 48
    assert [len(b["prompt_ids"]) for b in out] == [4, 4]
    assert sorted(int(r) for b in out for r in b["row"]) == list(range(8))
    assert [int(r) for r in out[0]["row"]] == [5, 1, 7, 3]  # lengths 1,2,2,3: stable among equals
    assert [int(r) for r in out[1]["row"]] == [6, 4, 2, 0]
    assert out[0]["row"].dtype == given[0]["row"].dtype and out[0]["real_ids"].dtype == object
    assert length_sorted(given[:1]) == given[:1]  # one micro-batch: nothing to regroup


@pytest.mark.parametrize("backend,zero", [("torch", 0), pytest.param("deepspeed", 0, marks=pytest.mark.slow),
                                         ("deepspeed", 2)])
def test_logged_lr_is_the_lr_each_step_used(ray_session, tiny_ckpt, backend, zero):
    """Linear schedule, 1 warmup step of 2: the first step runs at lr 0, the second at the peak 1e-2
    (transformers' schedule). DeepSpeed steps its scheduler inside engine.step, so reading the lr after
    the step logged the next step's lr: [1e-2, 0] instead of [0, 1e-2]."""
    actor = one_rank(tiny_ckpt, backend, zero)
    try:
        ray.get(actor.begin.remote(OptimizerSetup(**{**BEGIN, "schedule": "linear", "warmup_ratio": 0.5, "total_steps": 2,
                                      "global_batch_size": 4, "micro_batch_size": 4})))
        assert [r.lr for r in epoch_records(actor, addition_rows(tiny_ckpt))] == [0.0, 1e-2]
    finally:
        ray.kill(actor)


def test_a_partial_micro_batch_does_not_move_steps_between_epochs(ray_session, tiny_ckpt):
    """14 rows, micro-batch 4, global batch 8: one full step per epoch, as the schedule (14 // 8 = 1 step
    per epoch, 2 in all) was sized. A trailing micro-batch of 2 used to count as the second half of a
    step: epoch 0 took both steps (the second on 6 rows) and epoch 1 none."""
    rows = addition_rows(tiny_ckpt) + addition_rows(tiny_ckpt)[:6]
    actor = one_rank(tiny_ckpt, "torch")
    try:
        ray.get(actor.begin.remote(OptimizerSetup(**{**BEGIN, "total_steps": 2, "global_batch_size": 8, "micro_batch_size": 4})))
        epochs = [epoch_records(actor, rows), epoch_records(actor, rows)]
        assert [[r.rows for r in e] for e in epochs] == [[8], [8]]
    finally:
        ray.kill(actor)


@pytest.mark.parametrize("backend,zero", [pytest.param("torch", 0, marks=pytest.mark.slow), ("deepspeed", 2),
                                         ("deepspeed", 3)])
def test_the_previous_optimizer_is_freed_before_the_next_is_built(ray_session, tiny_ckpt, backend, zero):
    """`begin` of iteration t+1 must not hold iteration t's optimizer (a 7B's Adam states are 56 GB in
    fp32) while it builds the next one: by the time the new optimizer is made, the old one and its
    scheduler are garbage. Under ZeRO-3, DeepSpeed 0.19.8 also points every parameter at its optimizer
    (`p._z3_optimizer`, stage3.py), which destroy() leaves in place."""
    begin = {**BEGIN, "global_batch_size": 4, "micro_batch_size": 4}

    def probe(self):  # runs inside the trainer actor
        import gc
        import weakref

        import tspin_ray.workers.trainer_rank as tr

        old = [weakref.ref(self.optimizer), weakref.ref(self.scheduler)]
        make, seen = tr.make_optimizer, []

        def spy(*args, **kwargs):
            gc.collect()
            seen.append([ref() is None for ref in old])
            return make(*args, **kwargs)

        tr.make_optimizer = spy
        try:
            self.begin(OptimizerSetup(**begin))
        finally:
            tr.make_optimizer = make
        return seen

    actor = one_rank(tiny_ckpt, backend, zero)
    try:
        ray.get(actor.begin.remote(OptimizerSetup(**begin)))
        epoch_records(actor, addition_rows(tiny_ckpt)[:4])
        assert ray.get(actor.__ray_call__.remote(probe)) == [[True, True]]
    finally:
        ray.kill(actor)


def test_a_stalled_stream_fails_on_the_watchdog_with_its_key(ray_session, tiny_ckpt, tmp_path):
    """No micro-batch and no step for training.stall_timeout_s: the phase fails in one line naming the
    phase and the key, instead of waiting out a whole-epoch deadline."""
    from tests.helpers import small_config
    from tspin_ray.config.schema import from_dict
    from tspin_ray.controller.trainer_group import TrainerGroup
    from tspin_ray.errors import RunFailed

    def stuck(batch):  # a producer that stopped (a hung engine, a lost node)
        import time

        time.sleep(120)
        return batch

    group = TrainerGroup(from_dict(small_config(tmp_path, training={"stall_timeout_s": 3})))
    try:
        group.load(tiny_ckpt)
        group.begin(OptimizerSetup(**BEGIN))
        ds = ray.data.from_items(addition_rows(tiny_ckpt)).map_batches(stuck, batch_size=8)
        with pytest.raises(RunFailed) as err:
            group.train_stream(ds, what="iteration 1 epoch 0")
        assert str(err.value) == ("iteration 1 epoch 0: no micro-batch arrived and no step completed for 3s "
                                  "(training.stall_timeout_s)")
    finally:
        group.shutdown()


def test_first_divergence_scope_contrasts_the_first_differing_token_only(tiny_ckpt):
    """pair_scope first_divergence: the current margin is lp(y_d) - lp(y'_d) at the first differing
    position d, read off the full sequences' log-probs; what y' says after d changes nothing; the NLL
    anchor still sees all of y."""
    from tspin_ray.algorithms.inputs import first_divergence
    from tspin_ray.algorithms.logprobs import sequence_logprobs

    model, rows = load_model(tiny_ckpt), addition_rows(tiny_ckpt)
    batch = {k: [r[k] for r in rows] for k in rows[0]}

    def token_at(p, seq, d):  # lp(seq_d | prompt, seq_<d) = lp(seq[:d+1]) - lp(seq[:d])
        lp = sequence_logprobs(model, [p, p], [seq[:d + 1], seq[:d] or seq[:1]], 0)
        return float(lp[0] - lp[1]) if d else float(lp[0])

    with torch.no_grad():
        cut = batch_logprobs(model, batch, TSPIN, {"beta": 0.1, "pair_scope": "first_divergence"}, pad_id=0)
        whole = batch_logprobs(model, batch, TSPIN, {"beta": 0.1}, pad_id=0)
        # every y' rewritten after its first divergence from y: same cut log-probs
        ds = [first_divergence(r["real_ids"], r["generated_ids"][0]) for r in rows]
        other = {**batch, "generated_ids": [[r["generated_ids"][0][:d + 1] + [r["generated_ids"][0][-1]] * 3]
                                            for r, d in zip(rows, ds, strict=True)]}
        moved = batch_logprobs(model, other, TSPIN, {"beta": 0.1, "pair_scope": "first_divergence"}, pad_id=0)
        for i, (r, d) in enumerate(zip(rows, ds, strict=True)):
            y, g, p = r["real_ids"], r["generated_ids"][0], r["prompt_ids"]
            margin = float(cut["policy_real"][i] - cut["policy_generated"][i])
            assert margin == pytest.approx(token_at(p, y, d) - token_at(p, g, d), abs=1e-4)
        torch.testing.assert_close(moved["policy_generated"], cut["policy_generated"], rtol=0, atol=1e-5)
        torch.testing.assert_close(cut["anchor_real"], whole["policy_real"], rtol=0, atol=1e-5)
    assert set(cut) >= {"policy_proto", "policy_generated_history"}
    with pytest.raises(ValueError, match="first_divergence works with tspin only"):
        batch_logprobs(model, batch, OBJECTIVES["spin"], {"pair_scope": "first_divergence"}, pad_id=0)


def test_a_toy_objective_is_one_registry_entry(ray_session, tiny_ckpt, tmp_path, monkeypatch):
    """Adding an objective is one entry in algorithms/objectives.OBJECTIVES: the config then accepts its
    name and hyper-parameters, generation knows it needs y' and no reference, and a trainer rank steps
    on exactly its loss. Nothing else names it."""
    from tests.helpers import small_config
    from tspin_ray.config.schema import from_dict
    from tspin_ray.controller.y0 import y0_source
    from tspin_ray.errors import UserError

    def toy_hinge(*, policy_real, policy_generated, beta: float = 1.0, **unused):
        """A test-only objective: a hinge on the margin lp(y) - lp(y'), beta the margin it asks for."""
        margin = policy_real - policy_generated
        return torch.relu(beta - margin), {"toy/margin": margin.detach().mean()}

    toy = Objective(toy_hinge, ("policy_real", "policy_generated"), ("beta",))

    def register(_trainer):  # runs inside the trainer actor (nested: pickled by value, toy with it)
        from tspin_ray.algorithms.objectives import OBJECTIVES

        OBJECTIVES["toy"] = toy

    raw = small_config(tmp_path, objective={"name": "toy", "beta": 2.0})
    with pytest.raises(UserError, match=r"objective.name: 'toy' is not one of \['sft', 'spin', 'tspin', "):
        from_dict(raw)
    monkeypatch.setitem(OBJECTIVES, "toy", toy)
    obj = from_dict(raw).objective
    assert obj.loss_params == {"beta": 2.0}
    assert obj.entry.opponent and not obj.entry.reference(obj.loss_params) and y0_source(from_dict(raw)) is None
    rows = addition_rows(tiny_ckpt)[:4]
    model = load_model(tiny_ckpt)
    batch = {k: [r[k] for r in rows] for k in rows[0]}
    with torch.no_grad():
        lp_y = sequence_logprobs(model, batch["prompt_ids"], batch["real_ids"], 0)
        lp_g = sequence_logprobs(model, batch["prompt_ids"], [g[0] for g in batch["generated_ids"]], 0)
    by_hand = float(torch.relu(2.0 - (lp_y - lp_g)).mean())  # one forward per response set, no registry

    actor = one_rank(tiny_ckpt, "torch")
    try:
        ray.get(actor.__ray_call__.remote(register))
        ray.get(actor.begin.remote(OptimizerSetup(**{**BEGIN, "objective": "toy", "params": {"beta": 2.0},
                                      "global_batch_size": 4, "micro_batch_size": 4})))
        (record,) = epoch_records(actor, rows)
    finally:
        ray.kill(actor)
    assert record.loss == pytest.approx(by_hand, rel=1e-5)
    assert record.metrics["toy/margin"] == pytest.approx(float((lp_y - lp_g).mean()), rel=1e-5)


def test_the_writer_checksums_the_checkpoint_it_exports(tiny_ckpt, tmp_path, monkeypatch):
    """Rank 0 returns the sha256 and size of every file it wrote; the run commits them as they are, so the
    driver never re-reads a checkpoint (14.5 GB over a shared filesystem at 7B), and a resume verifies them."""
    from tspin_ray.checksums import checksum_dir
    from tspin_ray.rundir import store
    from tspin_ray.workers.trainer_rank import Trainer

    trainer = Trainer(0, 1, "torch")
    trainer.load(str(tiny_ckpt))
    out = tmp_path / "pi_1"
    written = trainer.export(str(out))
    assert written.seconds > 0 and "model.safetensors" in written.files and "config.json" in written.files
    assert dict(written.files) == checksum_dir(out)

    run = store.RunDir(tmp_path / "run")
    run.root.mkdir()
    (run.root / "checkpoints").mkdir()
    out.rename(run.checkpoint(1))
    monkeypatch.setattr(store, "checksum_dir", lambda *a, **k: pytest.fail("the driver re-read the checkpoint"))
    run.commit_checkpoint(1, files=dict(written.files))
    assert run.entry("pi_1")["files"] == dict(written.files)
    assert run.latest_good_checkpoint(1) == 1


def test_row_logprobs_are_each_rows_and_add_up_to_the_nll(tiny_ckpt):
    """The sync probe's trainer side: one call scores every row, each as sequence_logprobs does alone, and
    their sum is the held-out NLL's (the same forwards, in eval mode, no graph kept)."""
    from tspin_ray.algorithms.logprobs import sequence_logprobs
    from tspin_ray.workers.trainer_rank import Trainer

    trainer = Trainer(0, 1, "torch")
    trainer.load(str(tiny_ckpt))
    rows = addition_rows(tiny_ckpt)[:5]
    prompts, responses = [r["prompt_ids"] for r in rows], [r["real_ids"] for r in rows]
    got = trainer.row_logprobs(prompts, responses, batch_size=2)
    with torch.no_grad():
        alone = [float(sequence_logprobs(trainer.model, [p], [y], 0)[0]) for p, y in zip(prompts, responses, strict=True)]
    assert got == pytest.approx(alone, abs=1e-5)
    total, tokens = trainer.nll(prompts, responses, batch_size=2)
    assert total == pytest.approx(-sum(got), rel=1e-6) and tokens == sum(map(len, responses))
    assert trainer.model.training  # back to train mode for the next step


def test_a_trainer_actor_flushes_subnormals_on_every_thread(ray_session):
    # Subnormal floats take x86's slow path (bench --only denormals: 2x a step on SmolLM2); the flag is per
    # thread, so it only holds if set before the actor's OpenMP threads start.
    def kept(_self=None) -> tuple[float, int]:  # share of 4M products that stay nonzero, across the threads
        x = torch.full((4_000_000,), 1e-39, dtype=torch.float32)  # 1e-39 < 1.18e-38: subnormal in fp32
        return float(((x * 1.0001) != 0).float().mean()), torch.get_num_threads()

    class Plain:
        def kept(self):
            return kept()

    plain = ray.remote(num_cpus=2)(Plain).remote()
    assert ray.get(plain.kept.remote()) == (1.0, 2)  # the CPU's default: a plain actor keeps them
    [trainer] = start_trainers(1, "torch", 0, options={"num_cpus": 2})
    try:
        assert ray.get(trainer.__ray_call__.remote(kept)) == (0.0, 2)  # every thread of the trainer flushes
    finally:
        ray.kill(trainer)
        ray.kill(plain)
