"""Preference pairs packed with their shared prefix: the collation half (the log-probs are computed by
``clarify_lit.train.pair_logprobs``, whose docstring describes the layout).

Each pair becomes one row ``[prefix | chosen rest | rejected rest]`` with a 4D attention mask that keeps the two
continuations apart, position ids that restart after the prefix for the rejected rest, and explicit targets (row,
predicting position, token, sequence) for every trained token of either sequence.
"""

from __future__ import annotations

import torch

from clarify_lit.data.tokenization import IGNORE_INDEX

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
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "attention_mask": allowed[:, None],
        "token_mask": (seg != 3).long(),
        "pair_row": torch.tensor(t_row, dtype=torch.long),
        "pair_pos": torch.tensor(t_pos, dtype=torch.long),
        PACKED_KEY: torch.tensor(t_tok, dtype=torch.long),
        "pair_seq": torch.tensor(t_seq, dtype=torch.long),
        "n_pairs": n,
    }
