"""Numbers a user would notice for the objectives (docs/concepts.md). Run: .venv/bin/pytest tests/unit/algorithms/test_objectives.py"""

from __future__ import annotations

import doctest
import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from tspin_ray.algorithms import objectives
from tspin_ray.algorithms.objectives import (
    OBJECTIVES,
    get_objective,
    sft,
    space,
    spin,
    tspin,
)
from tspin_ray.config.schema import ObjectiveConfig


def t(*values, grad=False):
    return torch.tensor(values, dtype=torch.float64, requires_grad=grad)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# lp(y) = -10, lp_ref(y) = -12, lp(y') = -20, lp_ref(y') = -19
SPIN_KW = dict(policy_real=t(-10.0), ref_real=t(-12.0), policy_generated=t(-20.0), ref_generated=t(-19.0))


def test_docstring_examples_hold():
    result = doctest.testmod(objectives, extraglobs={"torch": torch})
    assert result.attempted >= 6 and result.failed == 0


def test_sft_is_token_mean_nll():
    loss, metrics = sft(policy_real=t(-12.0, -3.0), real_lengths=torch.tensor([4, 6]), beta=0.1)
    # -(-12) / 4 = 3.0 ; -(-3) / 6 = 0.5
    torch.testing.assert_close(loss, t(3.0, 0.5))
    assert metrics["nll/real"].item() == pytest.approx(1.75)
    assert metrics["logps/real"].item() == pytest.approx(-7.5)


def test_spin_hand_value_and_metrics():
    loss, m = spin(**SPIN_KW, beta=0.1)
    # t = 0.1 * ((-10 + 12) - (-20 + 19)) = 0.1 * (2 - (-1)) = 0.3 ; loss = log(1 + exp(-0.3))
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.3)))
    assert loss.item() == pytest.approx(0.554355, abs=1e-6)
    assert m["rewards/real"].item() == pytest.approx(0.2)  # 0.1 * 2
    assert m["rewards/generated"].item() == pytest.approx(-0.1)  # 0.1 * -1
    assert m["rewards/margins"].item() == pytest.approx(0.3)
    assert m["rewards/accuracies"].item() == 1.0
    assert m["logps/real"].item() == -10.0 and m["logps/generated"].item() == -20.0


def test_spin_hinge():
    loss, _ = spin(**SPIN_KW, beta=0.1, loss_type="hinge")
    assert loss.item() == pytest.approx(0.7)  # relu(1 - 0.3)
    loss, _ = spin(**SPIN_KW, beta=1.0, loss_type="hinge")
    assert loss.item() == 0.0  # relu(1 - 3)
    with pytest.raises(ValueError, match="sigmoid"):
        spin(**SPIN_KW, loss_type="ipo")


def test_spin_is_log2_when_policy_equals_reference():
    lp_y, lp_gen = t(-10.0, -3.5, -40.0), t(-20.0, -1.0, -7.0)
    for beta in (0.1, 5.0):
        loss, m = spin(
            policy_real=lp_y,
            ref_real=lp_y.clone(),
            policy_generated=lp_gen,
            ref_generated=lp_gen.clone(),
            beta=beta,
        )
        torch.testing.assert_close(loss, torch.full((3,), math.log(2), dtype=torch.float64))
        assert m["rewards/accuracies"].item() == 0.0  # ties are not "real > generated"


def test_spin_equals_dpo_sigmoid_formula():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-50 * torch.rand(8, generator=g, dtype=torch.float64) for _ in range(4))
    beta = 0.3
    # DPO (Rafailov et al.): -log sigma(beta * (log pi/ref (chosen) - log pi/ref (rejected)))
    logits = (pc - pr) - (rc - rr)
    dpo = -torch.log(torch.sigmoid(beta * logits))
    loss, _ = spin(policy_real=pc, policy_generated=pr, ref_real=rc, ref_generated=rr, beta=beta)
    torch.testing.assert_close(loss, dpo)


def test_spin_gradient_signs():
    real, gen = t(-10.0, grad=True), t(-20.0, grad=True)
    loss, _ = spin(policy_real=real, policy_generated=gen, ref_real=t(-12.0), ref_generated=t(-19.0))
    loss.sum().backward()
    assert real.grad.item() < 0  # descent pushes lp(y) up
    assert gen.grad.item() > 0  # descent pushes lp(y') down
    # d/d lp(y) of -logsigmoid(beta * (...)) = -beta * sigmoid(-0.3)
    assert real.grad.item() == pytest.approx(-0.1 / (1 + math.exp(0.3)))


def test_tspin_hand_value_and_metrics():
    loss, m = tspin(
        policy_real=t(-10.0), policy_generated=t(-12.0), policy_proto=t(-15.0), alpha=1.0, beta=0.1
    )
    # current = -10 + 12 = 2 ; history = -12 + 15 = 3
    # loss = log(1 + e^-2) + 0.1 * log(1 + e^-3) = 0.126928 + 0.0048587
    assert loss.item() == pytest.approx(softplus(-2) + 0.1 * softplus(-3))
    assert loss.item() == pytest.approx(0.131787, abs=1e-6)
    assert m["advantage/current"].item() == 2.0 and m["advantage/historical"].item() == 3.0
    assert m["advantage/current_accuracy"].item() == 1.0
    assert m["advantage/historical_accuracy"].item() == 1.0
    assert m["logps/proto"].item() == -15.0
    assert m["rewards/real"].item() == -10.0 and m["rewards/margins"].item() == 2.0
    # alpha scales the advantages inside the sigmoid: alpha 0.5 -> log(1 + e^-1) + 0.1 * log(1 + e^-1.5)
    loss, m = tspin(policy_real=t(-10.0), policy_generated=t(-12.0), policy_proto=t(-15.0), alpha=0.5)
    assert loss.item() == pytest.approx(softplus(-1) + 0.1 * softplus(-1.5))
    assert m["rewards/real"].item() == -5.0


def test_tspin_beta0_is_pairwise_logistic():
    real, gen, proto = t(-10.0, -30.0, -5.0), t(-12.0, -25.0, -5.0), t(-1.0, -100.0, -3.0)
    loss, m = tspin(policy_real=real, policy_generated=gen, policy_proto=proto, alpha=2.0, beta=0.0)
    torch.testing.assert_close(loss, -F.logsigmoid(2.0 * (real - gen)))
    assert m["advantage/current_accuracy"].item() == pytest.approx(1 / 3)  # only 2 > 0 among (2, -5, 0)


def test_tspin_without_y0_at_beta0_equals_the_loss_with_it():
    """Iteration 0 (beta 0) runs no y0 forward: policy_proto None gives the same loss, no historical metrics."""
    real, gen, proto = t(-10.0, -30.0), t(-12.0, -25.0), t(-1.0, -100.0)
    with_y0, m_with = tspin(policy_real=real, policy_generated=gen, policy_proto=proto, beta=0.0, nll_weight=0.5,
                            real_lengths=t(4.0, 5.0))
    without, m = tspin(policy_real=real, policy_generated=gen, beta=0.0, nll_weight=0.5, real_lengths=t(4.0, 5.0))
    torch.testing.assert_close(without, with_y0)
    assert set(m_with) - set(m) == {"advantage/historical", "advantage/historical_accuracy", "logps/proto"}
    with pytest.raises(ValueError, match=r"T-SPIN with beta=0.1 needs lp\(y0\)"):
        tspin(policy_real=real, policy_generated=gen, beta=0.1)
    tspin_entry = OBJECTIVES["tspin"]
    assert tspin_entry.proto({"beta": 0.1}) and tspin_entry.proto({})
    assert not tspin_entry.proto({"beta": 0.0}) and not OBJECTIVES["spin"].proto({"beta": 0.1})


def test_tspin_gradient_signs():
    real, gen, proto = t(-10.0, grad=True), t(-12.0, grad=True), t(-15.0, grad=True)
    loss, _ = tspin(policy_real=real, policy_generated=gen, policy_proto=proto, beta=0.1)
    loss.sum().backward()
    assert real.grad.item() < 0  # y pushed up
    assert proto.grad.item() > 0  # y0 pushed down
    # d/d lp(y0) = beta * alpha * sigmoid(-history) = 0.1 * sigmoid(-3)
    assert proto.grad.item() == pytest.approx(0.1 / (1 + math.exp(3)))
    # beta = 0: y0 gets no gradient at all
    proto.grad = None
    tspin(policy_real=real, policy_generated=gen, policy_proto=proto, beta=0.0)[0].sum().backward()
    assert proto.grad.item() == 0.0


def test_space_mu1_closed_form():
    loss, m = space(**SPIN_KW)
    # r(y) = -10 + 12 = 2 ; r(y') = -20 + 19 = -1 ; loss = log(1 + e^-2) + log(1 + e^-1)
    assert loss.item() == pytest.approx(softplus(-2) + softplus(-1))
    assert loss.item() == pytest.approx(0.440190, abs=1e-6)
    assert m["rewards/real"].item() == 2.0 and m["rewards/generated"].item() == -1.0
    assert m["rewards/margins"].item() == 3.0 and m["rewards/accuracies"].item() == 1.0
    g = torch.Generator().manual_seed(1)
    pr, pg, rr, rg = (-30 * torch.rand(6, generator=g, dtype=torch.float64) for _ in range(4))
    loss, _ = space(policy_real=pr, policy_generated=pg, ref_real=rr, ref_generated=rg, mu=1)
    torch.testing.assert_close(loss, -F.logsigmoid(pr - rr) - F.logsigmoid(-(pg - rg)))


def test_space_shape_b_and_b_by_mu_agree():
    base = dict(policy_real=t(-10.0, -4.0), ref_real=t(-12.0, -4.5))
    one_d, _ = space(**base, policy_generated=t(-20.0, -3.0), ref_generated=t(-19.0, -2.0))
    two_d, _ = space(**base, policy_generated=t(-20.0, -3.0)[:, None], ref_generated=t(-19.0, -2.0)[:, None])
    torch.testing.assert_close(one_d, two_d)
    assert one_d.shape == (2,)
    # mu = 4 with 4 identical columns == mu = 4 with the single column
    rep, _ = space(
        **base,
        policy_generated=t(-20.0, -3.0)[:, None].expand(2, 4),
        ref_generated=t(-19.0, -2.0)[:, None].expand(2, 4),
    )
    single, _ = space(**base, policy_generated=t(-20.0, -3.0), ref_generated=t(-19.0, -2.0), mu=4)
    torch.testing.assert_close(rep, single)
    with pytest.raises(ValueError, match="same shape"):
        space(**base, policy_generated=t(-20.0, -3.0), ref_generated=t(-19.0, -2.0)[:, None])


def test_space_mu4_hand_value():
    r_gen = t(-1.0, 0.0, 1.0, -2.0)  # r(y'_k) for k = 1..4
    loss, m = space(
        policy_real=t(-10.0),
        ref_real=t(-12.0),
        policy_generated=(r_gen - 7.0)[None],
        ref_generated=torch.full((1, 4), -7.0, dtype=torch.float64),
    )
    # mu defaults to 4 columns; r(y) = 2
    # softplus(log 4 - 2) = log(1 + 4 e^-2) = 0.432653
    # 4 * mean_k softplus(r_k - log 4) = sum_k log(1 + e^{r_k} / 4)
    #   = log(1 + e^-1/4) + log(1.25) + log(1 + e/4) + log(1 + e^-2/4) = 0.086904 + 0.223144 + 0.518942 + 0.033277
    expected = math.log(1 + 4 * math.exp(-2)) + sum(math.log(1 + math.exp(r) / 4) for r in (-1, 0, 1, -2))
    assert loss.item() == pytest.approx(expected)
    assert loss.item() == pytest.approx(1.295592, abs=1e-6)
    assert m["rewards/generated"].item() == pytest.approx(-0.5)  # mean(-1, 0, 1, -2)
    assert m["rewards/accuracies"].item() == 1.0  # 2 beats every r_k
    with pytest.raises(ValueError, match="mu"):
        space(**SPIN_KW, mu=0)


def test_space_gradient_signs():
    real, gen = t(-10.0, grad=True), t(-20.0, -18.0, grad=True)
    space(
        policy_real=real, ref_real=t(-12.0), policy_generated=gen[None], ref_generated=t(-19.0, -19.0)[None]
    )[0].sum().backward()
    assert real.grad.item() < 0 and (gen.grad > 0).all()


@pytest.mark.parametrize("name", ["spin", "tspin", "space"])
def test_nll_weight_adds_exactly_the_nll_term(name):
    kw = dict(SPIN_KW, policy_proto=t(-15.0), real_lengths=torch.tensor([4]))
    fn = get_objective(name).loss
    plain, _ = fn(**kw)
    with_nll, _ = fn(**kw, nll_weight=0.5)
    # 0.5 * (-(-10) / 4) = 1.25
    assert (with_nll - plain).item() == pytest.approx(1.25)
    with pytest.raises(ValueError, match="real_lengths"):
        fn(**dict(kw, real_lengths=None), nll_weight=0.5)


def test_unknown_objective_lists_valid_names():
    with pytest.raises(ValueError) as err:
        get_objective("dpo")
    for name in ("sft", "spin", "tspin", "space"):
        assert name in str(err.value)
    assert get_objective("tspin").loss is tspin


def test_dpop_hinge_hand_values():
    # SPIN, beta 0.1, lambda 5: lp(y) -13 is 1 below lp_ref(y) -12; margins (-13+12) - (-20+19) = 0
    # t = 0.1 * (0 - 5 * 1) = -0.5 -> softplus(0.5) = 0.974077
    kw = dict(SPIN_KW, policy_real=t(-13.0))
    assert spin(**kw, dpop_lambda=5.0)[0].item() == pytest.approx(softplus(0.5), abs=1e-12)
    # lp(y) above lp_ref(y): the hinge is 0 and the loss is SPIN's own
    assert spin(**SPIN_KW, dpop_lambda=5.0)[0].item() == pytest.approx(spin(**SPIN_KW)[0].item(), abs=1e-12)
    # T-SPIN, alpha 2, beta 0: current = -13 - (-20) - 5 * max(0, -12 + 13) = 2 -> softplus(-4)
    loss, m = tspin(policy_real=t(-13.0), policy_generated=t(-20.0), ref_real=t(-12.0), alpha=2.0, beta=0.0,
                    dpop_lambda=5.0)
    assert loss.item() == pytest.approx(softplus(-4.0), abs=1e-12)
    assert m["advantage/current"].item() == 7.0 and m["dpop/penalty"].item() == 5.0  # logged apart
    with pytest.raises(ValueError, match="ref_real"):
        tspin(policy_real=t(-13.0), policy_generated=t(-20.0), beta=0.0, dpop_lambda=5.0)


def test_dpop_hinge_pushes_y_up_only_below_the_reference():
    below, above = t(-13.0, grad=True), t(-11.0, grad=True)
    for real in (below, above):
        tspin(policy_real=real, policy_generated=t(-13.0), ref_real=t(-12.0), beta=0.0, dpop_lambda=5.0)[0].backward()
    # d/d lp(y) of softplus(-(lp(y) - lp(y') - 5 relu(lp_ref - lp(y)))): -(1 + 5) * sigmoid(-margin) below
    assert below.grad.item() == pytest.approx(-6.0 * torch.sigmoid(t(5.0)).item(), rel=1e-9)
    assert above.grad.item() == pytest.approx(-1.0 * torch.sigmoid(t(-2.0)).item(), rel=1e-9)


def test_tspin_anchor_and_history_inputs_of_the_first_divergence_scope():
    # cut lp(y) -2, cut lp(y') -5 (current 3); full lp(y) -10 over 4 tokens; y' cut against y0 -4, y0 -6
    loss, m = tspin(policy_real=t(-2.0), policy_generated=t(-5.0), anchor_real=t(-10.0),
                    policy_generated_history=t(-4.0), policy_proto=t(-6.0), beta=0.5, nll_weight=1.0,
                    real_lengths=torch.tensor([4]))
    expected = softplus(-3.0) + 0.5 * softplus(-2.0) + 10.0 / 4
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    # logged like with like: the divergent tokens' log-probs, and the whole y apart
    assert m["logps/real"].item() == -2.0 and m["logps/real_full"].item() == -10.0
    assert m["advantage/historical"].item() == 2.0


def test_rft_is_nll_on_verified_samples_plus_the_anchor():
    kw = dict(policy_generated=t(-6.0, -9.0), generated_lengths=t(3.0, 2.0), generated_valid=t(1.0, 0.0))
    loss, m = objectives.rft(**kw)
    assert loss.tolist() == [2.0, 0.0] and m["rft/verified"].item() == 0.5
    loss, _ = objectives.rft(**kw, policy_real=t(-8.0, -8.0), real_lengths=t(4.0, 4.0), nll_weight=1.0)
    assert loss.tolist() == [4.0, 2.0]  # + 8 / 4 each
    gen = t(-6.0, -9.0, grad=True)
    objectives.rft(**{**kw, "policy_generated": gen})[0].sum().backward()
    assert gen.grad.tolist() == [-1 / 3, 0.0]  # a rejected sample gets no gradient


def test_which_objectives_read_the_reference():
    assert OBJECTIVES["spin"].reference({}) and OBJECTIVES["space"].reference({})
    tspin_entry = OBJECTIVES["tspin"]
    assert not tspin_entry.reference({"dpop_lambda": 0.0}) and tspin_entry.reference({"dpop_lambda": 1})
    assert not OBJECTIVES["rft"].reference({}) and not OBJECTIVES["sft"].reference({})


def test_registry_inputs_and_metrics_are_detached():
    pool = dict(SPIN_KW, policy_proto=t(-15.0), generated_lengths=t(3.0), generated_valid=t(1.0))
    assert set(OBJECTIVES) == {"sft", "spin", "tspin", "space", "rft"}
    assert OBJECTIVES["tspin"].inputs == ("policy_real", "policy_generated")  # + policy_proto when beta != 0
    for name, entry in OBJECTIVES.items():
        fn = entry.loss
        reads = set(entry.inputs) | ({"policy_proto"} if entry.proto({"beta": 0.1}) else set())
        inputs = {k: v.clone().requires_grad_(True) for k, v in pool.items() if k in reads}
        # a superset of kwargs is accepted and ignored where irrelevant
        loss, metrics = fn(**inputs, real_lengths=torch.tensor([4]), beta=0.1, alpha=1.0, mu=None)
        assert loss.shape == (1,) and loss.requires_grad, name
        assert metrics and all(not v.requires_grad and v.dim() == 0 for v in metrics.values()), name


def test_each_entry_names_every_hyper_parameter_its_loss_reads():
    """The config hands a loss exactly `params` (ObjectiveConfig.loss_params): a keyword the loss takes that
    is a config field but missing from its entry would silently stay at the function's default."""
    fields = set(ObjectiveConfig.__dataclass_fields__)
    for name, entry in OBJECTIVES.items():
        keywords = {p for p in inspect.signature(entry.loss).parameters if p in fields}
        assert keywords <= set(entry.params), name
        assert ObjectiveConfig(name=name).loss_params.keys() == set(entry.params)
