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
    denom = n_batch if num_tokens is None else torch.as_tensor(num_tokens, dtype=token_logps.dtype,
                                                                 device=token_logps.device)
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

    ``loss = −mean log σ(β·[(π_c − ref_c) − (π_r − ref_r)])``. When policy == reference the argument is 0 and the loss is
    ``log 2 ≈ 0.6931``.

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
