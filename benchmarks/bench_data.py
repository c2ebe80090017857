"""Benchmark conversation records, built from real simulator output.

``benchmarks/data/smollm2_sciq_conversations.jsonl.gz`` (18 KB) holds the 128 conversations that ``make demo`` logged
with SmolLM2-135M-Instruct on SciQ (reasoning setting, scripted teacher, 3 assistant turns of ≤ 40 new tokens):
16 training questions × 3 temperatures (``clarify simulate``) and 16 held-out questions × 5 policies (``clarify
evaluate`` rollouts). They are 283–348 SmolLM2 tokens long (118 trained assistant tokens on average).

``make_records(n)`` turns them into ``n`` records (a multiple of 3): tasks of 3 runs of the *same* question (so the
final-answer DPO prompt is shared by chosen and rejected, as TRL's prompt/chosen/rejected format needs). Rewards are
synthetic, a per-task permutation of (1, 0.5, 0): every task has a reward gap (one DPO pair per task) and Refit sees
non-trivial weights. Rewards change no compute, only the weights' values. With ``n`` > 128 texts repeat.
"""

from __future__ import annotations

import gzip
import itertools
import json
from pathlib import Path

POOL = Path(__file__).resolve().parent / "data" / "smollm2_sciq_conversations.jsonl.gz"
PERMUTATIONS = list(itertools.permutations([1.0, 0.5, 0.0]))


def load_pool() -> dict[str, list[list[dict]]]:
    """The pool's conversations grouped by question: ``{task_id: [messages, ...]}`` (3 or 5 runs per question)."""
    groups: dict[str, list[list[dict]]] = {}
    with gzip.open(POOL, "rt") as fh:
        for line in fh:
            row = json.loads(line)
            groups.setdefault(row["task_id"], []).append(row["messages"])
    return groups


def make_records(n_conversations: int, scale_text: int = 1) -> list[dict]:
    """``n_conversations`` records (rounded up to a multiple of 3), 3 runs per task.

    ``scale_text`` > 1 repeats each assistant turn's text that many times (longer sequences, same structure), for the
    sequence-length scaling curve.
    """
    groups = load_pool()
    keys = sorted(groups)
    combos = {k: list(itertools.combinations(range(len(groups[k])), 3)) for k in keys}
    records = []
    for t in range((n_conversations + 2) // 3):
        key = keys[t % len(keys)]
        runs = combos[key][(t // len(keys)) % len(combos[key])]
        rewards = PERMUTATIONS[t % len(PERMUTATIONS)]
        for j, (i, reward) in enumerate(zip(runs, rewards)):
            messages = [dict(m) for m in groups[key][i]]
            if scale_text > 1:
                for m in messages:
                    if m["role"] == "assistant":
                        m["content"] = " ".join([m["content"]] * scale_text)
            records.append(
                {
                    "id": f"bench-{t}#run{j}",
                    "task_id": f"bench-{t}",
                    "dataset": "sciq",
                    "run": j,
                    "temperature": [0.3, 0.7, 1.0][j],
                    "reward": reward,
                    "messages": messages,
                    "meta": {"source_task": key},
                }
            )
    return records


def write_records(path: str | Path, n_conversations: int, scale_text: int = 1) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for r in make_records(n_conversations, scale_text):
            fh.write(json.dumps(r) + "\n")
    return path
