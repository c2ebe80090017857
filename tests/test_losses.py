"""Pure losses on hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clarify_lit.train.losses import dpo_sigmoid_loss, sequence_logps, standardize_rewards, weighted_nll_loss

TRL_NAMES = {
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
}


def _sigmoid_nll(x: float) -> float:
    return -math.log(1.0 / (1.0 + math.exp(-x)))


# ------------------------------------------------------------------------------------------------ weighted NLL
def test_weighted_nll_docstring_example():
    lp = torch.tensor([[-1.0, -2.0], [-3.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    w = torch.tensor([0.5, 2.0])
    loss, m = weighted_nll_loss(lp, mask, w)
    assert loss.item() == pytest.approx(2.5, abs=1e-7)  # (0.5·3 + 2·3) / 3
    assert m["nll"].item() == pytest.approx(2.0)  # (1 + 2 + 3) / 3, unweighted
    assert m["weight_mean"].item() == pytest.approx(1.25)
    assert m["tokens"].item() == 3
    # a masked position never contributes, whatever its value
    lp2 = lp.clone()
    lp2[1, 1] = -100.0
    assert weighted_nll_loss(lp2, mask, w)[0].item() == pytest.approx(2.5, abs=1e-7)


def test_weighted_nll_num_tokens_override():
    lp = torch.tensor([[-1.0, -2.0], [-3.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    w = torch.tensor([0.5, 2.0])
    # the optimizer step has 6 trained tokens in all: this micro-batch contributes 7.5 / 6
    loss, m = weighted_nll_loss(lp, mask, w, num_tokens=6)
    assert loss.item() == pytest.approx(7.5 / 6)
    assert m["nll"].item() == pytest.approx(2.0) and m["tokens"].item() == 3  # metrics stay per batch
    assert weighted_nll_loss(lp, mask, w, num_tokens=torch.tensor(1.5))[0].item() == pytest.approx(5.0)


def test_weighted_nll_gradient_is_reward_weighted():
    lp = torch.tensor([[-1.0, -2.0], [-3.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, _ = weighted_nll_loss(lp, mask, torch.tensor([0.5, 2.0]))
    loss.backward()
    assert torch.allclose(lp.grad, torch.tensor([[-0.5, -0.5], [-2.0, 0.0]]) / 3)


def test_all_ones_weights_equal_plain_sft_cross_entropy():
    torch.manual_seed(0)
    B, T, V = 3, 7, 11
    logits = torch.randn(B, T, V, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T))
    labels[0, :3] = -100
    labels[1, 5:] = -100
    labels[2, ::2] = -100
    mask = labels != -100
    token_logps = torch.log_softmax(logits, -1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    loss, m = weighted_nll_loss(token_logps * mask, mask, torch.ones(B, dtype=torch.float64))
    ce = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), ignore_index=-100, reduction="mean")
    assert torch.allclose(loss, ce, rtol=1e-12, atol=0)
    assert torch.allclose(m["nll"], ce, rtol=1e-12, atol=0)
    assert m["tokens"].item() == mask.sum().item()


def test_weighted_nll_shape_checks():
    with pytest.raises(ValueError, match="differ"):
        weighted_nll_loss(torch.zeros(2, 3), torch.ones(2, 4), torch.ones(2))
    with pytest.raises(ValueError, match="weights must have shape"):
        weighted_nll_loss(torch.zeros(2, 3), torch.ones(2, 3), torch.ones(3))


def test_sequence_logps_sums_masked_tokens():
    lp = torch.tensor([[-1.0, -2.0, -4.0], [-3.0, -5.0, -7.0]])
    mask = torch.tensor([[1, 0, 1], [0, 1, 1]])
    assert sequence_logps(lp, mask).tolist() == [-5.0, -12.0]


# ------------------------------------------------------------------------------------------------ DPO
def test_dpo_docstring_example():
    loss, m = dpo_sigmoid_loss(
        torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]), torch.tensor([-11.0]), beta=0.1
    )
    assert loss.item() == pytest.approx(0.5981, abs=1e-4)
    assert loss.item() == pytest.approx(_sigmoid_nll(0.2), rel=1e-6)
    assert set(m) == TRL_NAMES
    assert m["rewards/chosen"].item() == pytest.approx(0.1)
    assert m["rewards/rejected"].item() == pytest.approx(-0.1)
    assert m["rewards/margins"].item() == pytest.approx(0.2)
    assert m["rewards/accuracies"].item() == 1.0
    assert m["logps/chosen"].item() == -10.0 and m["logps/rejected"].item() == -12.0


def test_dpo_metrics_are_batch_means():
    # pair 1 = the docstring example; pair 2: policy (−5, −4) vs reference (−5, −5), β = 0.1
    # → chosen reward 0, rejected reward 0.1, margin −0.1 (a wrong-way pair)
    loss, m = dpo_sigmoid_loss(
        torch.tensor([-10.0, -5.0]),
        torch.tensor([-12.0, -4.0]),
        torch.tensor([-11.0, -5.0]),
        torch.tensor([-11.0, -5.0]),
        beta=0.1,
    )
    assert loss.item() == pytest.approx((_sigmoid_nll(0.2) + _sigmoid_nll(-0.1)) / 2, rel=1e-6)
    assert m["rewards/chosen"].item() == pytest.approx(0.05)
    assert m["rewards/rejected"].item() == pytest.approx(0.0, abs=1e-7)
    assert m["rewards/margins"].item() == pytest.approx(0.05)
    assert m["rewards/accuracies"].item() == 0.5
    assert m["logps/chosen"].item() == pytest.approx(-7.5) and m["logps/rejected"].item() == pytest.approx(-8.0)
    # β scales the rewards: β = 1 gives margins 2 and −1
    loss1, m1 = dpo_sigmoid_loss(
        torch.tensor([-10.0, -5.0]),
        torch.tensor([-12.0, -4.0]),
        torch.tensor([-11.0, -5.0]),
        torch.tensor([-11.0, -5.0]),
        beta=1.0,
    )
    assert m1["rewards/margins"].item() == pytest.approx(0.5)
    assert loss1.item() == pytest.approx((_sigmoid_nll(2.0) + _sigmoid_nll(-1.0)) / 2, rel=1e-6)


def test_dpo_policy_equal_reference_is_log2():
    torch.manual_seed(0)
    c, r = -torch.rand(5) * 50, -torch.rand(5) * 50
    loss, m = dpo_sigmoid_loss(c, r, c.clone(), r.clone(), beta=0.1)
    assert abs(loss.item() - math.log(2)) < 1e-7
    assert m["rewards/margins"].item() == 0.0 and m["rewards/accuracies"].item() == 0.0


def test_dpo_gradient_pushes_chosen_up_rejected_down():
    c = torch.tensor([-10.0], requires_grad=True)
    r = torch.tensor([-10.0], requires_grad=True)
    loss, _ = dpo_sigmoid_loss(c, r, torch.tensor([-10.0]), torch.tensor([-10.0]), beta=0.1)
    loss.backward()
    # d/dc −log σ(β(c − r)) at 0 = −β σ(0) = −0.05
    assert c.grad.item() == pytest.approx(-0.05) and r.grad.item() == pytest.approx(0.05)


# ------------------------------------------------------------------------------------------------ Swift weights
def test_standardize_rewards_example():
    w, std = standardize_rewards(torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    assert std.item() == pytest.approx(math.sqrt(2 / 9)) and std.item() == pytest.approx(0.4714, abs=1e-4)
    assert w.tolist() == pytest.approx([math.sqrt(2), -1 / math.sqrt(2), -1 / math.sqrt(2)])
    assert w.tolist() == pytest.approx([1.4142, -0.7071, -0.7071], abs=1e-4)
    # population std: standardized weights have mean 0 and (1/m) Σ w² = 1
    assert w.mean().item() == pytest.approx(0.0, abs=1e-12) and (w**2).mean().item() == pytest.approx(1.0)


def test_standardize_rewards_eps_and_zero_spread():
    w, std = standardize_rewards(torch.tensor([1.0, 0.0]), eps=1.0)
    assert std.item() == pytest.approx(0.5) and w.tolist() == pytest.approx([0.5 / 1.5, -0.5 / 1.5])
    w0, std0 = standardize_rewards(torch.tensor([0.3, 0.3, 0.3]))
    assert std0.item() == 0.0 and torch.isnan(w0).all()  # 0/0: the caller (Swift) decides
