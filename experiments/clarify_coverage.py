"""Per-turn behaviour of logged clarifying conversations and reward variance per question under `correct` vs the
rubric (issue 15 part 2/3). Usage: clarify_coverage.py conversations.jsonl[.gz] ...

With seeded exploration (records carrying meta.explore_prefixes) the per-turn rates are also given for the seeded
and the unseeded runs apart (`by_runs`)."""

import json
import sys
from collections import defaultdict

from clarify_lit.data.records import ConversationRecord, load_records
from clarify_lit.data.tasks import QATask
from clarify_lit.evaluate.metrics import choices_from_messages
from clarify_lit.simulate.parsing import analyze_answer, uses_thinking_tags
from clarify_lit.simulate.rubric import RubricReward, asks_one_question


def per_turn(recs: list[ConversationRecord]) -> list[dict]:
    n, rows = len(recs), []
    ch = [choices_from_messages(r) for r in recs]
    for t in range(3):
        turns = [[m["content"] for m in r.messages if m["role"] == "assistant"][t] for r in recs]
        rows.append(
            {
                "turn": t + 1,
                "question_rate": sum("?" in x for x in turns) / n,
                "one_question_about_one_option": sum(asks_one_question(x, c) for x, c in zip(turns, ch)) / n,
                "thinking_tags": sum(uses_thinking_tags(x) for x in turns) / n,
                "answer_format": sum(analyze_answer(x, c).letter is not None for x, c in zip(turns, ch)) / n,
                "truncated": sum((t + 1) in (r.meta.get("truncated_turns") or []) for r in recs) / n,
            }
        )
    return rows


recs = [r for path in sys.argv[1:] for r in load_records(path)[0]]  # plain or .gz; validated
n = len(recs)
out = {"conversations": n, "questions": len({r.task_id for r in recs}), "per_turn": per_turn(recs)}
seeded = [r for r in recs if "explore_prefixes" in r.meta]
if seeded:
    plain = [r for r in recs if "explore_prefixes" not in r.meta]
    out["by_runs"] = {
        "seeded": {"conversations": len(seeded), "per_turn": per_turn(seeded)},
        "unseeded": {"conversations": len(plain), "per_turn": per_turn(plain)},
    }
rub = RubricReward()
by_task = defaultdict(list)
for r in recs:
    task = QATask(r.task_id, r.dataset or "", "", choices_from_messages(r), r.gold)
    by_task[r.task_id].append(
        (
            (r.reward_components or {}).get("correct", r.reward),
            rub.score([task], [r.messages])[0].value,
            "explore_prefixes" in r.meta,
        )
    )
out["questions_with_reward_variance"] = {
    "correct": sum(len({a for a, _, _ in v}) > 1 for v in by_task.values()) / len(by_task),
    "rubric": sum(len({round(b, 6) for _, b, _ in v}) > 1 for v in by_task.values()) / len(by_task),
}
out["mean_reward"] = {
    "correct": sum(a for v in by_task.values() for a, _, _ in v) / n,
    "rubric": sum(b for v in by_task.values() for _, b, _ in v) / n,
}
if seeded:
    out["mean_rubric_by_runs"] = {
        k: sum(b for v in by_task.values() for _, b, s in v if s == want)
        / sum(s == want for v in by_task.values() for _, _, s in v)
        for k, want in (("seeded", True), ("unseeded", False))
    }
    # per question: does a seeded run beat the best unseeded one (what reward-weighting can pick up)?
    out["questions_where_a_seeded_run_is_best"] = sum(
        max((b for _, b, s in v if s), default=-1) > max((b for _, b, s in v if not s), default=-1)
        for v in by_task.values()
    ) / len(by_task)
print(json.dumps(out, indent=1))
