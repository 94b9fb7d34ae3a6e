"""Claims declared in a study config before its runs, judged on paired per-seed differences, and the
distribution tables and temperature curves of a study on a task with enumerable answers.

    tspin-ray study --config jobs/study-paths.yaml
    .venv/bin/pytest tests/unit/study/test_study.py -k "declared or distribution"

A claim says "a beats b on metric at temperature": a and b are methods of the study, or `pi0` (the seed's
pi_0) or `sft_full` (SFT on full_fraction); each is read at its final iterate, or at the one a suffix names:
`tspin@2` (after iteration 2; `@0` is pi_0) or `tspin@best` (the run's best iterate by eval.select, as its
manifest names it). So "T-SPIN improves at every iteration" is one claim per step (`tspin@1` vs `tspin@0`,
...) and "best-iterate selection recovers what the final iterate lost" is `spin@best` vs `spin`. Metrics: `exact_match`
and `nll` (greedy evaluation, metrics.jsonl; lower NLL is better), or `<split>/<name>` from
distribution.json with split `heldout` or `train` and name one of DISTRIBUTION_METRICS (lower KL is
better). `at`: one temperature of the sweep; `best`: each side at the temperature where its mean over
seeds is best (the temperature tuned for each, as Caccia et al., arXiv 1811.02549, ask); `all`: at every
temperature, and holds only if it holds at each. The verdict rule is the study's (study/stats.py: verdict).
"""

from __future__ import annotations

import dataclasses

from tspin_ray.errors import UserError
from tspin_ray.study.distribution import DistributionSpec

DISTRIBUTION_METRICS = ("validity", "coverage", "kl_uniform_model", "kl_model_uniform", "sampled_validity",
                        "sampled_coverage")
SPLITS = ("heldout", "train")
GREEDY = ("exact_match", "nll")
LOWER_IS_BETTER = ("nll", "kl_uniform_model", "kl_model_uniform")
SIDES = ("pi0", "sft_full")  # runs a claim may name besides the methods
CLAIM_KEYS = ("id", "claim", "a", "b", "metric", "at")


@dataclasses.dataclass(frozen=True)
class Claim:
    id: str
    claim: str
    a: str
    b: str
    metric: str
    at: str | float = "best"

    @property
    def sign(self) -> float:
        return -1.0 if self.metric.rpartition("/")[2] in LOWER_IS_BETTER else 1.0


def parse_distribution(raw):
    """The study's `distribution:` mapping as a DistributionSpec (None when absent)."""
    if raw is None:
        return None

    if not isinstance(raw, dict):
        raise UserError(f"distribution: expected a mapping of {', '.join(f.name for f in dataclasses.fields(DistributionSpec))}")
    fields = {f.name for f in dataclasses.fields(DistributionSpec)}
    for key in raw:
        if key not in fields:
            raise UserError(f"distribution.{key}: unknown key; valid: {', '.join(sorted(fields))}")
    try:
        values = {k: tuple(float(t) for t in v) if k == "temperatures" else v for k, v in raw.items()}
        return DistributionSpec(**values)
    except (TypeError, ValueError) as e:
        raise UserError(str(e) if str(e).startswith("distribution") else f"distribution: {e}") from None


def side(name: str) -> tuple[str, str]:
    """'tspin@2' -> ('tspin', '2'); 'tspin' -> ('tspin', '') (its final iterate)."""
    run, _, iterate = name.partition("@")
    return run, iterate


def parse_claims(raw, methods: dict, distribution, iterations: int) -> tuple[Claim, ...]:
    """The `claims:` list; each entry checked against the methods and the metrics the study measures."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise UserError("claims: expected a list of {id, claim, a, b, metric, at}")
    out, runs = [], [*methods, *SIDES]
    for i, c in enumerate(raw):
        where = f"claims[{i}]"
        if not isinstance(c, dict) or set(c) - set(CLAIM_KEYS) or not {"id", "claim", "a", "b", "metric"} <= set(c):
            raise UserError(f"{where}: expected a mapping with keys id, claim, a, b, metric (and at), got {c!r}")
        for key in ("a", "b"):
            run, iterate = side(str(c[key]))
            if run not in runs:
                raise UserError(f"{where}.{key}: '{run}' is not a method of the study (nor pi0 / sft_full)")
            if iterate and (run in SIDES or not (iterate == "best" or iterate.isdigit() and int(iterate) <= iterations)):
                raise UserError(f"{where}.{key}: '@{iterate}' expected @best or @0..@{iterations} (an iterate of a "
                                f"method; pi0 and sft_full have one)")
        metric, at = str(c["metric"]), c.get("at", "best")
        split, _, name = metric.rpartition("/")
        if metric not in GREEDY and (split not in SPLITS or name not in DISTRIBUTION_METRICS):
            raise UserError(f"{where}.metric: '{metric}' is not exact_match, nll or <heldout|train>/<"
                            f"{'|'.join(DISTRIBUTION_METRICS)}>")
        sides = [side(str(c[k]))[1] for k in ("a", "b")]
        if name.startswith("sampled_") and any(sides):
            raise UserError(f"{where}.metric: '{metric}' is sampled at the final iterates only: drop the @ of "
                            f"{c['a'] if sides[0] else c['b']}")
        if metric not in GREEDY and distribution is None:
            raise UserError(f"{where}.metric: '{metric}' needs the study's distribution: section")
        if at not in ("best", "all") and (isinstance(at, bool) or not isinstance(at, int | float) or distribution is None
                                          or float(at) not in distribution.temperatures):
            raise UserError(f"{where}.at: expected best, all or one of distribution.temperatures, got {at!r}")
        out.append(Claim(str(c["id"]), str(c["claim"]), str(c["a"]), str(c["b"]), metric, at))
    if len({c.id for c in out}) != len(out):
        raise UserError("claims: ids must be distinct")
    return tuple(out)


