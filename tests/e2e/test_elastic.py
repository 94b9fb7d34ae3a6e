"""Elastic generators on a multi-node Ray cluster on one machine (`ray.cluster_utils.Cluster`): the
generation pool grows onto generator nodes that join mid-run, and survives losing one.

    .venv/bin/pytest tests/e2e/test_elastic.py -s      (-s prints the measured timings)

The head has 4 CPUs and no `generator` resource; each generator node has 1 CPU and {generator: 1}, so a
generator actor ({generator: 1} from `resources`) can only run on a generator node, one per node. Each case
runs in a child process (`python -m tests.e2e.test_elastic CASE OUT`): a Cluster needs a `ray.init` of its own,
which must not meet the session-wide local Ray of tests/conftest.py (ray_session) in this process, and
the child gets a private RAY_TMPDIR, because Cluster writes its address to <RAY_TMPDIR>/ray/
ray_current_cluster, where every other process's plain `ray.init()` on this machine would find it.
Every process of the child's cluster carries a marker variable; teardown ends exactly those.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from tests.procs import MARK, die_with_parent, end_marked, free_port, marked_pids  # noqa: F401

REPO = Path(__file__).resolve().parents[2]
PROMPTS, BATCH, NEW_TOKENS = 800, 4, 24  # 200 batches: ~20 s for one generator actor on an idle core
CASE_TIMEOUT = 240  # a safety net: each case took 45-75 s at load average 11-14 on 2 cores, 110-120 s at 23


# ---------------------------------------------------------------- the child (runs the cluster)

def _tagged_stage():
    """GenerateStage plus a `generator` column naming the actor (node id : pid) that made each row.
    Only the returned batch gets it: the Parquet shards are written inside GenerateStage, unchanged."""
    import ray

    from tspin_ray.workers.generation_stage import GenerateStage

    class TaggedGenerateStage(GenerateStage):
        def __call__(self, batch):
            out = super().__call__(batch)
            out["generator"] = [f"{ray.get_runtime_context().get_node_id()}:{os.getpid()}"] * len(out["prompt_id"])
            return out

    return TaggedGenerateStage


def child(case: str, out_path: str) -> None:
    import ray
    import ray.data
    from ray.cluster_utils import Cluster

    import tspin_ray.workers.generation_stage as stage
    from tspin_ray.config.schema import TinyModelSpec
    from tspin_ray.controller.trainer_group import WORKER_ENV
    from tspin_ray.data.loading import Example
    from tspin_ray.models.tiny import save_tiny
    from tspin_ray.rollout.phases import GenPhase, prompt_rows

    work = Path(out_path).parent
    report: dict = {"case": case, "events": []}

    def event(what: str, **kw):
        report["events"].append({"t": round(time.time() - t_start, 2), "what": what, **kw})

    t_start = time.time()
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=4, include_dashboard=False, dashboard_agent_listen_port=free_port(),
        ray_client_server_port=free_port(), metrics_export_port=free_port(),
        runtime_env_agent_port=free_port()))
    try:
        ray.init(address=cluster.address, runtime_env={"env_vars": WORKER_ENV}, log_to_driver=False)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        event("head up")
        nodes = {}

        def add_generator_node():
            t0 = time.time()
            node = cluster.add_node(num_cpus=1, resources={"generator": 1})
            nodes[node.node_id] = node
            report.setdefault("add_node_s", []).append(round(time.time() - t0, 2))
            event("node added", node=node.node_id[:8])
            return node

        for _ in range({"grow": 1, "lose": 2}[case]):
            add_generator_node()
        ckpt = work / "pi"
        save_tiny(ckpt, TinyModelSpec(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, seed=0))
        rows = prompt_rows([Example(f"p{i}", f"{i}+{i}=", str(2 * i)) for i in range(PROMPTS)], 0)
        phase = GenPhase(model_path=str(ckpt), iteration=0, seed=7, samples=1, max_new_tokens=NEW_TOKENS,
                         temperature=1.0, top_p=1.0, max_response_tokens=16, max_length=48, out_dir=str(work / "gen"))
        original = stage.GenerateStage
        stage.GenerateStage = _tagged_stage()
        try:
            ds = stage.generation_dataset(rows, phase, batch_size=BATCH, min_actors=1,
                                             max_actors=4, num_cpus=1, num_gpus=0, resources={"generator": 1},
                                             max_attempts=3)
        finally:
            stage.GenerateStage = original
        # (seconds since the first batch was asked for: when the batch was generated on its actor,
        #  generator, prompt ids). Generation time, not arrival time: finished batches may still be in
        #  flight to this consumer when their node goes.
        batches = []
        added_at: dict[str, float] = {}
        removed = None
        t_iter = time.time()
        event("iteration starts")
        for i, b in enumerate(ds.iter_batches(batch_size=None, batch_format="numpy")):
            gens = {str(g) for g in b["generator"]}
            assert len(gens) == 1, gens
            made = float(max(b["gen_done"])) - t_iter
            batches.append((round(made, 2), gens.pop(), [str(p) for p in b["prompt_id"]]))
            if case == "grow" and i == 3:  # a few batches in: two more generator nodes join
                for _ in range(2):
                    asked = round(time.time() - t_iter, 2)  # from asking for the node to its first batch
                    node = add_generator_node()
                    added_at[node.node_id] = asked
            if case == "lose" and removed is None and i >= 10:
                # Lose the node of the generator that made this batch (it is mid-way through its next one),
                # once both nodes have served batches.
                serving = {g.split(":")[0] for _, g, _ in batches}
                if len(serving & set(nodes)) >= 2:
                    victim = batches[-1][1].split(":")[0]
                    t0 = time.time()
                    removed_at = round(t0 - t_iter, 2)
                    cluster.remove_node(nodes.pop(victim))
                    removed = {"node": victim, "at": removed_at,
                               "remove_s": round(time.time() - t0, 2), "after_batches": i + 1}
                    event("node removed", node=victim[:8])
        event("iteration done")
        report.update(batches=batches, added_at=added_at, removed=removed, total_s=round(time.time() - t_iter, 2),
                      gen_dir=str(work / "gen"))
    finally:
        Path(out_path).write_text(json.dumps(report))
        ray.shutdown()
        cluster.shutdown()


# ---------------------------------------------------------------- the tests (parent side)

def run_case(case: str) -> dict:
    work = Path(tempfile.mkdtemp(prefix="tse-", dir="/tmp"))  # short: Ray's socket paths have a limit
    mark = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({MARK: mark, "RAY_TMPDIR": str(work), "RAY_AUTH_MODE": "disabled",
                "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", "PYTHONUNBUFFERED": "1"})
    out = work / "report.json"
    log = work / "child.log"
    try:
        for _attempt in range(2):
            with open(log, "wb") as f:
                p = subprocess.run([sys.executable, "-m", "tests.e2e.test_elastic", case, str(out)], cwd=REPO, env=env,
                                   stdout=f, stderr=subprocess.STDOUT, timeout=CASE_TIMEOUT,
                                   preexec_fn=die_with_parent)
            text = log.read_text(errors="replace")
            # Ray waits a fixed 30 s for a new head to register: a loaded 2-core machine once took longer.
            # Retry that start once; any other failure is the test's.
            if p.returncode == 0 or "node timed out during startup" not in text:
                break
        assert p.returncode == 0 and out.exists(), f"child exited {p.returncode}:\n{text[-6000:]}"
        report = json.loads(out.read_text())
        from tspin_ray.rollout.shards import read_shards

        report["table"] = read_shards(Path(report["gen_dir"]))
        report["shards"] = len(list(Path(report["gen_dir"]).glob("part-*.parquet")))
        return report
    except subprocess.TimeoutExpired:
        raise AssertionError(f"case {case} took over {CASE_TIMEOUT}s:\n"
                             f"{log.read_text(errors='replace')[-6000:]}") from None
    finally:
        end_marked(mark)
        shutil.rmtree(work, ignore_errors=True)


def check_every_prompt_once(report: dict) -> None:
    from tspin_ray.rollout.shards import check_complete

    expected = [(0, f"p{i}") for i in range(PROMPTS)]
    check_complete(report["table"], expected, 1, report["case"])  # every prompt once, 1 sample each
    served = [p for _, _, ids in report["batches"] for p in ids]
    assert sorted(served) == sorted(p for _, p in expected), "the stream repeated or dropped prompts"
    assert report["shards"] == PROMPTS // BATCH  # a redone batch replaced its shard, never added one


@pytest.mark.slow  # 70 s here; losing a node mid-run (the harder case) stays in the default suite
def test_pool_grows_onto_generator_nodes_that_join_mid_run():
    r = run_case("grow")
    check_every_prompt_once(r)
    gens = {g for _, g, _ in r["batches"]}
    nodes = {g.split(":")[0] for g in gens}
    new_nodes = r["added_at"]  # node id -> when add_node was called
    first_use = {n: min(t for t, g, _ in r["batches"] if g.startswith(n)) for n in new_nodes
                 if any(g.startswith(n) for g in gens)}
    print(f"\n[grow] add_node {r['add_node_s']} s; generators {len(gens)} on {len(nodes)} nodes; "
          f"batches per generator {[sum(1 for _, x, _ in r['batches'] if x == g) for g in gens]}; "
          f"add_node called -> first batch on that node: "
          f"{ {n[:8]: round(first_use[n] - new_nodes[n], 1) for n in first_use} } s; total {r['total_s']} s")
    assert len(gens) >= 2 and len(gens) <= 4, gens  # grew, and never past max_actors
    assert first_use, f"no batch came from a node that joined mid-run: {gens}"
    assert all(first_use[n] > new_nodes[n] for n in first_use)


@pytest.mark.chaos
def test_losing_a_generator_node_mid_run_loses_no_prompt():
    r = run_case("lose")
    assert r["removed"], f"never had two serving generator nodes: {r['events']}"
    check_every_prompt_once(r)
    victim, at = r["removed"]["node"], r["removed"]["at"]
    before = {g for t, g, _ in r["batches"] if t <= at}
    after = [(t, g) for t, g, _ in r["batches"] if t > at]
    replacements = {g: min(t for t, x in after if x == g) for _, g in after if g not in before}
    print(f"\n[lose] removed a node after {r['removed']['after_batches']} batches at {at} s "
          f"(remove_node {r['removed']['remove_s']} s); {len(after)} batches generated after it; first batch "
          f"of each replacement generator: { {g.split(':')[1]: t for g, t in replacements.items()} } s; "
          f"last batch {max(t for t, _, _ in r['batches'])} s")
    assert after and not any(g.startswith(victim) for _, g in after), "a batch was generated on a removed node"


if __name__ == "__main__":
    child(sys.argv[1], sys.argv[2])
