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
"""

from __future__ import annotations

import torch
from torch import Tensor

from clarify_lit.data.tokenization import IGNORE_INDEX
from clarify_lit.train.logprobs import chunked_head_logps, uses_gradient_checkpointing

PACKED_KEY = "pair_tokens"  # present in a batch iff it is packed


def _common_prefix(a_ids, a_lab, b_ids, b_lab) -> int:
    n = min(len(a_ids), len(b_ids))
    p = 0
    while p < n and a_ids[p] == b_ids[p] and a_lab[p] == b_lab[p]:
        p += 1
    return p


def pack_pairs(samples: list[dict], pad_token_id: int, pad_to_multiple_of: int = 1) -> dict:
    """Collate tokenized pairs (``chosen_input_ids``/``chosen_labels``/``rejected_…``) into the packed layout.

    Returns ``input_ids``, ``position_ids`` ``[n, T]``, ``attention_mask`` ``[n, 1, T, T]`` (bool, True = attend),
    ``token_mask`` ``[n, T]`` (real tokens), the flat targets ``pair_row``, ``pair_pos`` (predicting position),
    ``pair_tokens`` (target id), ``pair_seq`` (0..n−1 chosen, n..2n−1 rejected) and ``n_pairs``.
    """
    n = len(samples)
    rows, positions, segments = [], [], []
    t_row, t_pos, t_tok, t_seq = [], [], [], []
    for i, s in enumerate(samples):
        c_ids, c_lab = s["chosen_input_ids"], s["chosen_labels"]
        r_ids, r_lab = s["rejected_input_ids"], s["rejected_labels"]
        p = _common_prefix(c_ids, c_lab, r_ids, r_lab)
        c_rest, r_rest = len(c_ids) - p, len(r_ids) - p
        rows.append(list(c_ids) + list(r_ids[p:]))
        positions.append(list(range(len(c_ids))) + list(range(p, len(r_ids))))
        segments.append([0] * p + [1] * c_rest + [2] * r_rest)
        shift = (0, c_rest)  # a token at index k ≥ p sits at packed position k (chosen) or k + c_rest (rejected)
        for seq, lab in enumerate((c_lab, r_lab)):
            for k in range(1, len(lab)):
                if lab[k] != IGNORE_INDEX:
                    t_row.append(i)
                    t_pos.append(k - 1 if k - 1 < p else k - 1 + shift[seq])
                    t_tok.append(lab[k])
                    t_seq.append(i + seq * n)
    width = -(-max(len(r) for r in rows) // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((n, width), dtype=torch.long)
    seg = torch.full((n, width), 3, dtype=torch.long)  # 3 = padding
    for i, (r, pos, sg) in enumerate(zip(rows, positions, segments)):
        input_ids[i, : len(r)] = torch.tensor(r)
        position_ids[i, : len(pos)] = torch.tensor(pos)
        seg[i, : len(sg)] = torch.tensor(sg)
    idx = torch.arange(width)
    causal = idx[None, :, None] >= idx[None, None, :]  # [1, q, k]
    seg_q, seg_k = seg[:, :, None], seg[:, None, :]
    allowed = causal & ((seg_k == 0) | (seg_k == seg_q)) & (seg_q != 3)
    allowed |= torch.eye(width, dtype=torch.bool)[None]  # padding attends to itself only (no all-masked row)
    return {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": allowed[:, None],
            "token_mask": (seg != 3).long(), "pair_row": torch.tensor(t_row, dtype=torch.long),
            "pair_pos": torch.tensor(t_pos, dtype=torch.long), PACKED_KEY: torch.tensor(t_tok, dtype=torch.long),
            "pair_seq": torch.tensor(t_seq, dtype=torch.long), "n_pairs": n}


def _model_mask(model, mask: Tensor, dtype: torch.dtype) -> Tensor:
    impl = getattr(getattr(model, "config", None), "_attn_implementation", "sdpa") or "sdpa"
    if impl == "sdpa":
        return mask
    if impl == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    raise ValueError(f"packed DPO pairs need an attention implementation that takes a 4D mask (sdpa or eager), "
                     f"the model uses {impl!r}: set data.share_pair_prefix=false")


def packed_sequence_logps(model, batch: dict, chunk_size: int = 1024) -> Tensor:
    """Sequence log-probs ``[2n]`` (chosen 1..n, then rejected 1..n) of a :func:`pack_pairs` batch: sums over each
    sequence's trained tokens, LM head applied to the predicting positions only, ``chunk_size`` at a time."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(base, "model", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    mask = _model_mask(base, batch["attention_mask"], torch.float32)
    n = batch["n_pairs"]
    rows, pos, y, seq = batch["pair_row"], batch["pair_pos"], batch[PACKED_KEY], batch["pair_seq"]
    if decoder is None or head is None:  # unusual architecture: the full logits
        logits = model(input_ids=batch["input_ids"], attention_mask=mask,
                       position_ids=batch["position_ids"]).logits[rows, pos].float()
        lp = logits.gather(-1, y[:, None]).squeeze(-1) - logits.logsumexp(-1)
    else:
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=mask,
                         position_ids=batch["position_ids"]).last_hidden_state
        lp = chunked_head_logps(head, hidden[rows, pos], y, chunk_size, recompute=uses_gradient_checkpointing(base))
    out = torch.zeros(2 * n, dtype=lp.dtype, device=lp.device)
    return out.index_add(0, seq, lp)
