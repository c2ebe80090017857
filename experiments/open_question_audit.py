"""Rote or real? The turn-1 questions of open-mode evaluations (issue 26's goals: asking rate >= 0.6, accuracy of
conversations that ask above those that do not, at least 50 distinct turn-1 questions in 100 test conversations).

    python experiments/open_question_audit.py --out results/open/question-audit.json \
        LABEL=path/to/rollouts.jsonl[.gz] [LABEL=…]

Per evaluation: conversations, turn 1 holding exactly one question (rate), distinct such questions (exact text,
case- and space-normalised), the most frequent one and its share, the share of turn-1 replies that start with the
same first three words as the most common start (a template), accuracy when asked / not asked, and how often the
teacher found something in its notes for the question (replies other than its two fixed ones).
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

from clarify_lit.data.records import load_records
from clarify_lit.evaluate.metrics import is_correct
from clarify_lit.simulate import prompts
from clarify_lit.simulate.open_answer import holds_one_question, questions_in


def audit(path: str) -> dict[str, float | int | str]:
    records, _ = load_records(path)
    turn1 = [next(m["content"] for m in r.messages if m["role"] == "assistant") for r in records]
    teacher2 = [[m["content"] for m in r.messages if m["role"] == "user"][1] for r in records]
    asked = [holds_one_question(t) for t in turn1]
    correct = [is_correct(r, path) for r in records]
    questions = [re.sub(r"\s+", " ", questions_in(t)[0].lower()) for t, a in zip(turn1, asked, strict=True) if a]
    top_q, top_n = Counter(questions).most_common(1)[0] if questions else ("", 0)
    starts = Counter(" ".join(t.split()[:3]).lower() for t in turn1)
    top_start, top_start_n = starts.most_common(1)[0]
    informed = [not t.startswith((prompts.OPEN_ASK_FOR_QUESTION, prompts.OPEN_NOTHING_ON_THAT)) for t in teacher2]
    n_asked = sum(asked)
    return {
        "conversations": len(records),
        "asks_one_question": n_asked / len(records),
        "distinct_questions": len(set(questions)),
        "most_frequent_question": top_q,
        "most_frequent_question_share": top_n / len(records),
        "most_common_start": top_start,
        "most_common_start_share": top_start_n / len(records),
        "accuracy": sum(correct) / len(records),
        "accuracy_when_asked": sum(c for c, a in zip(correct, asked, strict=True) if a) / n_asked if n_asked else None,
        "accuracy_when_not_asked": (
            sum(c for c, a in zip(correct, asked, strict=True) if not a) / (len(records) - n_asked)
        )
        if n_asked < len(records)
        else None,
        "teacher_informed": sum(informed) / len(records),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("inputs", nargs="+", help="LABEL=rollouts file")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = {}
    for item in args.inputs:
        label, _, path = item.partition("=")
        out[label] = {"rollouts": path, **audit(path)}
        print(
            label,
            {k: (round(v, 3) if isinstance(v, float) else v) for k, v in out[label].items() if k != "rollouts"},
            flush=True,
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
