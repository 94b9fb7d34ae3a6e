"""The training objectives as pure torch functions, and their registry (formulas: docs/concepts.md).

    .venv/bin/pytest tests/unit/algorithms/test_objectives.py

Every input is a per-example float tensor of shape [B] holding a SUMMED response log-prob (prompt masked,
EOS included, no length normalisation): `policy_real` = lp(y), `policy_generated` = lp(y'),
`policy_proto` = lp(y0), `ref_real` = lp_ref(y), `ref_generated` = lp_ref(y'). Arguments are keyword-only
and each function also accepts `**unused`, so a caller may pass one superset of kwargs to any objective
(e.g. `beta` to `sft`); unknown keys are ignored. `OBJECTIVES` holds each one's registry entry: its loss,
the tensors and hyper-parameters it reads, and what generation must provide for it.

Each returns `(loss, metrics)`: `loss` is the per-example loss [B] (reduce it yourself, e.g. `.mean()`),
`metrics` maps names to detached 0-dim tensors (batch means; call `.item()` when logging).
`nll_weight > 0` adds `nll_weight * (-policy_real / real_lengths)` per example; 0 gives the papers' loss.
`dpop_lambda > 0` (SPIN, T-SPIN) puts DPOP's hinge inside the sigmoid instead (Smaug, arXiv 2402.13228):
the margin loses `dpop_lambda * max(0, lp_ref(y) - lp(y))`, so y may not fall below pi_t's likelihood.
`rft` is the positive control of the study: NLL on the samples the task's checker accepts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

Metrics = dict[str, torch.Tensor]


def _mean(x: torch.Tensor) -> torch.Tensor:
    return x.detach().float().mean()


def _add_nll(loss, policy_real, real_lengths, nll_weight):
    if nll_weight == 0.0:
        return loss
    if real_lengths is None:
        raise ValueError("nll_weight > 0 needs real_lengths (response tokens of y per example)")
    return loss + nll_weight * (-policy_real / real_lengths)


def _dpop(policy_real, ref_real, dpop_lambda):
    """DPOP's penalty lambda * max(0, lp_ref(y) - lp(y)) (0 when off)."""
    if dpop_lambda == 0.0:
        return 0.0
    if ref_real is None:
        raise ValueError("dpop_lambda > 0 needs ref_real (lp_ref(y) under pi_t)")
    return dpop_lambda * torch.relu(ref_real - policy_real)


def sft(*, policy_real: torch.Tensor, real_lengths: torch.Tensor, **unused) -> tuple[torch.Tensor, Metrics]:
    """Token-mean negative log-likelihood of the annotated response: ``loss = -lp(y) / n_tokens(y)``.

    Example:
        >>> loss, m = sft(policy_real=torch.tensor([-12.0]), real_lengths=torch.tensor([4]))
        >>> loss  # 12 / 4
        tensor([3.])
    """
    nll = -policy_real / real_lengths
    return nll, {"logps/real": _mean(policy_real), "nll/real": _mean(nll)}


def spin(
    *,
    policy_real: torch.Tensor,
    policy_generated: torch.Tensor,
    ref_real: torch.Tensor,
    ref_generated: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    nll_weight: float = 0.0,
    real_lengths: torch.Tensor | None = None,
    dpop_lambda: float = 0.0,
    **unused,
) -> tuple[torch.Tensor, Metrics]:
    """SPIN (Chen et al. 2024, arXiv 2401.01335): DPO with chosen = real y, rejected = generated y',
    reference = the previous iterate pi_t that sampled y'::

        t    = beta * ((lp(y) - lp_ref(y)) - (lp(y') - lp_ref(y')) - dpop_lambda * max(0, lp_ref(y) - lp(y)))
        loss = -logsigmoid(t)       # loss_type "sigmoid"
        loss = relu(1 - t)          # loss_type "hinge"

    dpop_lambda 0 (default) is the paper's loss; > 0 is DPOP (Smaug, arXiv 2402.13228, eq. 3).
    When policy == reference, t = 0 and the sigmoid loss is log 2.

    Example (beta 0.1, lp(y) -10, lp_ref(y) -12, lp(y') -20, lp_ref(y') -19):
        t = 0.1 * ((-10 + 12) - (-20 + 19)) = 0.1 * 3 = 0.3;
        sigmoid: log(1 + exp(-0.3)) = 0.5544; hinge: 1 - 0.3 = 0.7.

        >>> kw = dict(policy_real=torch.tensor([-10.0]), ref_real=torch.tensor([-12.0]),
        ...           policy_generated=torch.tensor([-20.0]), ref_generated=torch.tensor([-19.0]))
        >>> spin(**kw)[0]
        tensor([0.5544])
        >>> spin(**kw, loss_type="hinge")[0]
        tensor([0.7000])

    With DPOP (dpop_lambda 5, lp(y) -13 below lp_ref(y) -12): t = 0.1 * ((-1) - (-1) - 5 * 1) = -0.5;
    loss = log(1 + e^0.5) = 0.9741.

        >>> spin(**{**kw, "policy_real": torch.tensor([-13.0])}, dpop_lambda=5.0)[0]
        tensor([0.9741])
    """
    reward_real = beta * (policy_real - ref_real)
    reward_gen = beta * (policy_generated - ref_generated)
    t = reward_real - reward_gen - beta * _dpop(policy_real, ref_real, dpop_lambda)
    if loss_type == "sigmoid":
        loss = -F.logsigmoid(t)
    elif loss_type == "hinge":
        loss = torch.relu(1 - t)
    else:
        raise ValueError(f"unknown SPIN loss_type {loss_type!r}; valid: 'sigmoid', 'hinge'")
    loss = _add_nll(loss, policy_real, real_lengths, nll_weight)
    return loss, {
        "rewards/real": _mean(reward_real),
        "rewards/generated": _mean(reward_gen),
        "rewards/margins": _mean(t),
        "rewards/accuracies": _mean(reward_real > reward_gen),
        "logps/real": _mean(policy_real),
        "logps/generated": _mean(policy_generated),
    }


def tspin(
    *,
    policy_real: torch.Tensor,
    policy_generated: torch.Tensor,
    policy_proto: torch.Tensor | None = None,
    alpha: float = 1.0,
    beta: float = 0.1,
    nll_weight: float = 0.0,
    real_lengths: torch.Tensor | None = None,
    dpop_lambda: float = 0.0,
    ref_real: torch.Tensor | None = None,
    anchor_real: torch.Tensor | None = None,
    policy_generated_history: torch.Tensor | None = None,
    **unused,
) -> tuple[torch.Tensor, Metrics]:
    """T-SPIN (Wang et al. 2025, "Triplets Better Than Pairs", arXiv 2601.08198). Reference-free;
    triplets (y, y', y0) with y0 the proto-synthetic response sampled once from pi_0::

        current = lp(y)  - lp(y')
        history = lp(y') - lp(y0)
        loss    = -logsigmoid(alpha * current) - beta * logsigmoid(alpha * history)

    Study variants (defaults off = the paper's loss):
    - dpop_lambda > 0: current -= dpop_lambda * max(0, lp_ref(y) - lp(y)), lp_ref = pi_t (DPOP's hinge;
      the only reference T-SPIN then reads).
    - pair_scope first_divergence (algorithms/inputs.py): the log-probs given are those of the sequences cut after
      their first differing token, so each term contrasts that one token (Step-DPO's first wrong step,
      arXiv 2406.18629); `anchor_real` then carries the full lp(y) for the NLL anchor and the hinge
      (logged as logps/real_full), and `policy_generated_history` y''s token against y0 for the historical
      term. logps/* and rewards/* then log the divergent tokens' log-probs, like with like.
    Logged advantages are the log-prob differences alone; DPOP's penalty is logged as dpop/penalty.

    beta = 0 gives the reference-free pairwise logistic loss -logsigmoid(alpha * (lp(y) - lp(y'))); then
    y0 is not needed (policy_proto None: iteration 0, where the trainers skip its forward) and the
    historical metrics are left out.
    "rewards/*" metrics use the reward alpha * lp so reports can compare with SPIN's.

    Example (alpha 1, beta 0.1, lp(y) -10, lp(y') -12, lp(y0) -15):
        current = 2, history = 3; loss = log(1 + e^-2) + 0.1 * log(1 + e^-3)
        = 0.126928 + 0.1 * 0.048587 = 0.1318.

        >>> tspin(policy_real=torch.tensor([-10.0]), policy_generated=torch.tensor([-12.0]),
        ...       policy_proto=torch.tensor([-15.0]))[0]
        tensor([0.1318])
    """
    full_real = policy_real if anchor_real is None else anchor_real
    current = policy_real - policy_generated
    penalty = _dpop(full_real, ref_real, dpop_lambda)
    loss = -F.logsigmoid(alpha * (current - penalty))
    metrics = {"advantage/current": _mean(current), "advantage/current_accuracy": _mean(current > 0)}
    if dpop_lambda:
        metrics["dpop/penalty"] = _mean(penalty)
    if anchor_real is not None:
        metrics["logps/real_full"] = _mean(anchor_real)
    if policy_proto is not None:
        history = (policy_generated if policy_generated_history is None else policy_generated_history) - policy_proto
        loss = loss - beta * F.logsigmoid(alpha * history)
        metrics.update({"advantage/historical": _mean(history), "advantage/historical_accuracy": _mean(history > 0),
                        "logps/proto": _mean(policy_proto)})
    elif beta != 0:
        raise ValueError(f"T-SPIN with beta={beta} needs lp(y0) (policy_proto)")
    loss = _add_nll(loss, full_real, real_lengths, nll_weight)
    return loss, {
        **metrics,
        "logps/real": _mean(policy_real),
        "logps/generated": _mean(policy_generated),
        "rewards/real": _mean(alpha * policy_real),
        "rewards/generated": _mean(alpha * policy_generated),
        "rewards/margins": _mean(alpha * current),
        "rewards/accuracies": _mean(alpha * policy_real > alpha * policy_generated),
    }


def space(
    *,
    policy_real: torch.Tensor,
    policy_generated: torch.Tensor,
    ref_real: torch.Tensor,
    ref_generated: torch.Tensor,
    mu: int | None = None,
    nll_weight: float = 0.0,
    real_lengths: torch.Tensor | None = None,
    **unused,
) -> tuple[torch.Tensor, Metrics]:
    """SPACE (Wang et al. 2025, arXiv 2512.07175): noise contrastive estimation of real vs synthetic with
    absolute rewards r(u) = lp(u) - lp_ref(u), lp_ref = the sampler of y' (previous iterate)::

        loss = softplus(log(mu) - r(y)) + mu * mean_k softplus(r(y'_k) - log(mu))
        mu = 1:  loss = -logsigmoid(r(y)) - logsigmoid(-r(y'))

    `policy_generated` / `ref_generated` are [B] (one y' per prompt) or [B, K] (K samples y'_k); `mu`
    (the noise ratio) defaults to K (1 for [B]). The mean over k is a Monte Carlo estimate, so an explicit
    `mu` different from K is allowed. "rewards/accuracies" is the fraction of pairs (y, y'_k) with
    r(y) > r(y'_k); "rewards/generated" averages over k too.

    Example (mu 1, r(y) = -10 + 12 = 2, r(y') = -20 + 19 = -1):
        loss = log(1 + e^-2) + log(1 + e^-1) = 0.126928 + 0.313262 = 0.4402.
    Example (mu 4, r(y) = 2, r(y'_k) = 0 for all 4 k):
        loss = log(1 + 4 e^-2) + 4 * log(1 + 1/4) = 0.432653 + 0.892574 = 1.3252.

        >>> space(policy_real=torch.tensor([-10.0]), ref_real=torch.tensor([-12.0]),
        ...       policy_generated=torch.tensor([-20.0]), ref_generated=torch.tensor([-19.0]))[0]
        tensor([0.4402])
        >>> space(policy_real=torch.tensor([-10.0]), ref_real=torch.tensor([-12.0]),
        ...       policy_generated=torch.full((1, 4), -7.0), ref_generated=torch.full((1, 4), -7.0))[0]
        tensor([1.3252])
    """
    if policy_generated.shape != ref_generated.shape:
        raise ValueError(
            f"policy_generated {tuple(policy_generated.shape)} and ref_generated "
            f"{tuple(ref_generated.shape)} must have the same shape"
        )
    if policy_generated.dim() == 1:
        policy_generated, ref_generated = policy_generated[:, None], ref_generated[:, None]
    if policy_generated.dim() != 2 or policy_generated.shape[0] != policy_real.shape[0]:
        raise ValueError(
            f"policy_generated must be [B] or [B, K] with B = {policy_real.shape[0]}, "
            f"got {tuple(policy_generated.shape)}"
        )
    mu = policy_generated.shape[1] if mu is None else mu
    if mu < 1:
        raise ValueError(f"mu must be >= 1, got {mu}")
    log_mu = math.log(mu)
    r_real = policy_real - ref_real
    r_gen = policy_generated - ref_generated  # [B, K]
    loss = F.softplus(log_mu - r_real) + mu * F.softplus(r_gen - log_mu).mean(dim=1)
    loss = _add_nll(loss, policy_real, real_lengths, nll_weight)
    return loss, {
        "rewards/real": _mean(r_real),
        "rewards/generated": _mean(r_gen),
        "rewards/margins": _mean(r_real - r_gen.mean(dim=1)),
        "rewards/accuracies": _mean(r_real[:, None] > r_gen),
    }


def rft(
    *,
    policy_generated: torch.Tensor,
    generated_lengths: torch.Tensor,
    generated_valid: torch.Tensor,
    policy_real: torch.Tensor | None = None,
    real_lengths: torch.Tensor | None = None,
    nll_weight: float = 0.0,
    **unused,
) -> tuple[torch.Tensor, Metrics]:
    """Rejection-sampling fine-tuning (Yuan et al. 2023, arXiv 2308.01825): token-mean NLL of the samples
    y' that the task's checker accepts (v = 1), nothing for the others; with `nll_weight` the usual NLL on
    y as well, so RFT = SFT on y plus the verified samples, the study's positive control::

        loss = v * (-lp(y') / |y'|) + nll_weight * (-lp(y) / |y|)

    Example (lp(y') -6 over 3 tokens, verified; a second y' rejected; nll_weight 0):

        >>> rft(policy_generated=torch.tensor([-6.0, -9.0]), generated_lengths=torch.tensor([3.0, 3.0]),
        ...     generated_valid=torch.tensor([1.0, 0.0]))[0]
        tensor([2., 0.])
    """
    nll_gen = -policy_generated / generated_lengths
    loss = _add_nll(generated_valid * nll_gen, policy_real, real_lengths, nll_weight)
    return loss, {"rft/verified": _mean(generated_valid), "nll/generated": _mean(nll_gen),
                  "logps/generated": _mean(policy_generated),
                  **({"logps/real": _mean(policy_real)} if policy_real is not None else {})}


def _never(params: dict) -> bool:
    return False


@dataclass(frozen=True)
class Objective:
    """Everything the rest of tspin-ray asks of an objective; adding one is one entry in `OBJECTIVES`.

    The trainer computes `inputs` (plus what `proto`/`reference` switch on) in one forward and calls
    `loss(**inputs, **params)`; the config accepts `params` for it; the driver generates y' only when
    `inputs` holds `policy_generated`, and asks the generator for lp_ref only when `reference` says so.
    """
    loss: Callable[..., tuple[torch.Tensor, Metrics]]
    inputs: tuple[str, ...]  # the tensors `loss` always reads (see the module docstring)
    params: tuple[str, ...] = ()  # the objective.* hyper-parameters it reads (its loss's and pair_scope)
    proto: Callable[[dict], bool] = _never  # whether it reads lp(y0) under these hyper-parameters
    reference: Callable[[dict], bool] = _never  # whether it reads lp_ref(y), lp_ref(y') scored under pi_t
    grouped: bool = False  # the k samples of a prompt form one example ([B, k]); else one pair per sample
    mixes_previous: bool = False  # the default of objective.mix_previous: add the previous iteration's pairs
    first_iteration: tuple[tuple[str, Any], ...] = ()  # hyper-parameters forced in iteration 0
    samples_param: str | None = None  # the hyper-parameter that sets samples per prompt (else generation's)

    @property
    def opponent(self) -> bool:
        """Whether it trains against samples y' of the current iterate (False: nothing is generated)."""
        return "policy_generated" in self.inputs

    @property
    def verified(self) -> bool:
        """Whether it reads a built-in task checker's verdict on every y' (so it needs data.task)."""
        return "generated_valid" in self.inputs

    @property
    def reads_y0(self) -> bool:
        return self.proto is not _never


OBJECTIVES: dict[str, Objective] = {
    "sft": Objective(sft, ("policy_real", "real_lengths")),
    "spin": Objective(spin, ("policy_real", "policy_generated", "ref_real", "ref_generated"),
                      ("beta", "loss_type", "nll_weight", "dpop_lambda"), reference=lambda p: True,
                      mixes_previous=True),
    # beta = 0 in iteration 0: y' and y0 come from one policy there (docs/concepts.md), so no y0 forward
    "tspin": Objective(tspin, ("policy_real", "policy_generated"),
                       ("alpha", "beta", "nll_weight", "dpop_lambda", "pair_scope"),
                       proto=lambda p: p.get("beta", 0.1) != 0,
                       reference=lambda p: p.get("dpop_lambda", 0.0) != 0, first_iteration=(("beta", 0.0),)),
    "space": Objective(space, ("policy_real", "policy_generated", "ref_real", "ref_generated"),
                       ("mu", "nll_weight"), reference=lambda p: True, grouped=True, samples_param="mu"),
    "rft": Objective(rft, ("policy_generated", "generated_lengths", "generated_valid"), ("nll_weight",)),
}


def get_objective(name: str) -> Objective:
    """The registry entry called `name`; ValueError listing the valid names otherwise."""
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"unknown objective {name!r}; valid: {', '.join(OBJECTIVES)}") from None
