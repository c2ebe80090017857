"""Preference pairs packed with their shared prefix: one row per pair, the common prefix computed once.

A DPO pair's chosen and rejected sequences start with the same tokens: the whole prompt for final-answer pairs (system
+ question, ~75 % of the tokens with SmolLM2), the prefix up to the branching step for StepDPO, the system prompt and
first teacher turn for whole-conversation pairs. Stacking them as two rows computes that prefix twice. Here each pair
is one row ``[prefix | chosen rest | rejected rest]`` with

* a 4D attention mask: the prefix is causal; chosen-rest tokens see the prefix and the earlier chosen-rest tokens;
  rejected-rest tokens see the prefix and the earlier rejected-rest tokens, never the chosen rest;
* position ids that restart after the prefix for the rejected rest (both continuations sit at positions p, p+1, …);
* explicit targets: for each trained token of either sequence, the row and position of the hidden state that predicts
  it (the last prefix position predicts the first token of *both* continuations) and which sequence it belongs to.

The log-probs are the same as with two stacked rows (same attention pattern, same positions); only the shared tokens
are not computed twice. The prefix is the longest common prefix on which both the token ids and the labels agree, so
a trained token inside it counts in both sequences' sums, as it would unpacked.

Needs an attention implementation that takes an arbitrary mask (``sdpa``, the default, or ``eager``).

The collation (:func:`clarify_lit.data.pair_collation.pack_pairs`) belongs to the data layer; this module computes the
log-probs of a packed batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from clarify_lit.data.pair_collation import PACKED_KEY
from clarify_lit.train.logprobs import chunked_head_logps, uses_gradient_checkpointing


def _model_mask(model, mask: Tensor, dtype: torch.dtype) -> Tensor:
    impl = getattr(getattr(model, "config", None), "_attn_implementation", "sdpa") or "sdpa"
    if impl == "sdpa":
        return mask
    if impl == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    raise ValueError(
        f"packed DPO pairs need an attention implementation that takes a 4D mask (sdpa or eager), "
        f"the model uses {impl!r}: set data.share_pair_prefix=false"
    )


def packed_sequence_logps(model, batch: dict, chunk_size: int = 1024, recompute: bool | None = None) -> Tensor:
    """Sequence log-probs ``[2n]`` (chosen 1..n, then rejected 1..n) of a :func:`pack_pairs` batch: sums over each
    sequence's trained tokens, LM head applied to the predicting positions only, ``chunk_size`` at a time
    (``recompute``: the chunks' logits recomputed in backward, ``chunked_head_logps``; ``None``: only under gradient
    checkpointing)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(base, "model", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    mask = _model_mask(base, batch["attention_mask"], torch.float32)
    n = batch["n_pairs"]
    rows, pos, y, seq = batch["pair_row"], batch["pair_pos"], batch[PACKED_KEY], batch["pair_seq"]
    if decoder is None or head is None:  # unusual architecture: the full logits
        logits = (
            model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"])
            .logits[rows, pos]
            .float()
        )
        lp = logits.gather(-1, y[:, None]).squeeze(-1) - logits.logsumexp(-1)
    else:
        hidden = decoder(
            input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"]
        ).last_hidden_state
        if recompute is None:
            recompute = uses_gradient_checkpointing(base)
        lp = chunked_head_logps(head, hidden[rows, pos], y, chunk_size, recompute=recompute)
    out = torch.zeros(2 * n, dtype=lp.dtype, device=lp.device)
    return out.index_add(0, seq, lp)
