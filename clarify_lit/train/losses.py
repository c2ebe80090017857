"""Pure loss functions: tensors in, ``(loss, metrics)`` out. No model, no Lightning, no data.

All of them take per-token log-probabilities of the *target* tokens (``token_logps[b, t] = log π(y_t | y_<t)``)
with a mask saying which tokens are trained (assistant turns only). Sequence log-probs are sums over the mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def weighted_nll_loss(
    token_logps: Tensor, loss_mask: Tensor, weights: Tensor, num_tokens: Tensor | float | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """Reward-weighted negative log-likelihood (Refit; Swift with standardized weights; SFT with weights 1).

    ``loss = −Σ_i w_i Σ_t m_it · logp_it / N`` where ``N`` is the number of trained (assistant) tokens of the whole
    optimizer batch (``num_tokens``; defaults to ``Σ m`` of this batch). Weights are per conversation, not per token.
    With all ``w_i = 1`` this is exactly the mean token cross-entropy of plain SFT.

    Worked example: two conversations, token log-probs ``[[-1, -2], [-3, 0]]`` with mask ``[[1, 1], [1, 0]]``
    (3 trained tokens) and weights ``[0.5, 2]``:
    ``loss = −(0.5·(−1 −2) + 2·(−3)) / 3 = (1.5 + 6) / 3 = 2.5``.

    Metrics: ``nll`` (unweighted mean token NLL, comparable across objectives), ``weight_mean``, ``tokens``.
    """
    if token_logps.shape != loss_mask.shape:
        raise ValueError(f"token_logps {tuple(token_logps.shape)} and loss_mask {tuple(loss_mask.shape)} differ")
    if weights.shape != token_logps.shape[:1]:
        raise ValueError(f"weights must have shape ({token_logps.shape[0]},), got {tuple(weights.shape)}")
    mask = loss_mask.to(token_logps.dtype)
    seq_logps = (token_logps * mask).sum(dim=-1)
    n_batch = mask.sum()
    denom = (
        n_batch
        if num_tokens is None
        else torch.as_tensor(num_tokens, dtype=token_logps.dtype, device=token_logps.device)
    )
    loss = -(weights.to(token_logps.dtype) * seq_logps).sum() / denom.clamp_min(1.0)
    metrics = {
        "nll": (-seq_logps.sum() / n_batch.clamp_min(1.0)).detach(),
        "weight_mean": weights.float().mean().detach(),
        "tokens": n_batch.detach(),
    }
    return loss, metrics


def dpo_sigmoid_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DPO (Rafailov et al. 2023), sigmoid loss, on sequence log-probs (sums over trained tokens).

    ``loss = −mean log σ(β·[(π_c − ref_c) − (π_r − ref_r)])``. When policy == reference the argument is 0 and the loss
    is ``log 2 ≈ 0.6931``.

    Worked example: β = 0.1, policy (c, r) = (−10, −12), reference (c, r) = (−11, −11):
    chosen reward = 0.1·(−10 + 11) = 0.1, rejected reward = 0.1·(−12 + 11) = −0.1, margin = 0.2,
    loss = −log σ(0.2) = 0.5981.

    Metrics use TRL's names: ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``,
    ``logps/chosen``, ``logps/rejected``.
    """
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)
    margins = chosen_rewards - rejected_rewards
    loss = -F.logsigmoid(margins).mean()
    metrics = {
        "rewards/chosen": chosen_rewards.detach().mean(),
        "rewards/rejected": rejected_rewards.detach().mean(),
        "rewards/margins": margins.detach().mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().detach(),
        "logps/chosen": policy_chosen_logps.detach().mean(),
        "logps/rejected": policy_rejected_logps.detach().mean(),
    }
    return loss, metrics


def sequence_logps(token_logps: Tensor, loss_mask: Tensor) -> Tensor:
    """Sum of trained-token log-probs per sequence: ``[B, T] → [B]``."""
    return (token_logps * loss_mask.to(token_logps.dtype)).sum(dim=-1)


def standardize_rewards(rewards: Tensor, eps: float = 0.0) -> tuple[Tensor, Tensor]:
    """Swift's per-question standardization over the m runs: ``(r − mean) / (std + eps)``, population std (1/m).

    Returns ``(weights, std)``. Worked example: rewards ``[1, 0, 0]`` → mean 1/3, std √(2/9) = 0.4714,
    weights ``[1.4142, −0.7071, −0.7071]``. Groups with zero spread give 0/0: callers decide (see ``Swift``).
    """
    mean = rewards.mean()
    std = rewards.std(unbiased=False)
    return (rewards - mean) / (std + eps), std


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    alpha: float = 0.5,
    temperature: float = 2.0,
    num_tokens: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Knowledge distillation (Hinton et al. 2015) on the trained positions (STaR-GATE-D).

    ``student_logits``, ``teacher_logits``: ``[N, V]`` logits at the N trained (assistant) positions; ``targets``:
    ``[N]`` the logged tokens there. With ``p = softmax(teacher / T)``, ``q = softmax(student / T)``:

    ``loss = [α·T²·Σ_n KL(p_n ‖ q_n) + (1 − α)·Σ_n −log softmax(student_n)[y_n]] / N``

    (KL at temperature T, scaled by T² so its gradient keeps the CE term's scale; CE at temperature 1, the SFT
    loss). ``N`` is ``num_tokens`` (the optimizer step's trained tokens, as in :func:`weighted_nll_loss`; defaults to
    the rows here), so the loss of a sequence cut into chunks is the sum of the chunks' losses. No gradient flows
    into the teacher.

    Worked example: one position, V = 2, T = 2, α = 0.5, student logits ``[0, 0]``, teacher logits
    ``[2·ln 3, 0]``, target 0. Then p = softmax([ln 3, 0]) = (3/4, 1/4), q = (1/2, 1/2),
    KL = 3/4·ln(3/2) + 1/4·ln(1/2) = 0.130812, T²·KL = 0.523248, CE = ln 2 = 0.693147,
    loss = 0.5·0.523248 + 0.5·0.693147 = 0.608198.

    Metrics (sums divided by N, so they add over chunks too): ``kl`` (the unscaled KL at T), ``nll`` (the CE,
    comparable with the other objectives' ``nll``).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} logits "
            "differ (teacher and student must share the vocabulary)"
        )
    if targets.shape != student_logits.shape[:1]:
        raise ValueError(f"targets must have shape ({student_logits.shape[0]},), got {tuple(targets.shape)}")
    s = student_logits.float()
    with torch.no_grad():
        t_logp = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
        t_p = t_logp.exp()
    s_logp_t = F.log_softmax(s / temperature, dim=-1)
    kl = (t_p * (t_logp - s_logp_t)).sum()
    ce = -(s.gather(-1, targets[:, None]).squeeze(-1) - s.logsumexp(-1)).sum()
    denom = torch.as_tensor(targets.shape[0] if num_tokens is None else num_tokens, dtype=s.dtype, device=s.device)
    denom = denom.clamp_min(1.0)
    loss = (alpha * temperature**2 * kl + (1 - alpha) * ce) / denom
    return loss, {"kl": (kl / denom).detach(), "nll": (ce / denom).detach()}
