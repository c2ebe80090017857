"""The rubric reward, version 1 vs 2, on the committed rollouts of the `clarify` preset's rubric cell (issue 15).

1. Every evaluated policy's rollouts (trained under rubric v1) rescored with `clarify rescore` under v2 and v1.
2. The project's trivial policies played on the same 100 test questions (each assistant turn replaced by a constant
   reply; the teacher turns kept) and scored under both versions: what a policy that does nothing earns.

Usage: python experiments/rubric_v2_audit.py [ROLLOUTS_DIR] [OUT_JSON]
(default: results/clarify/sciq-clarifying-thinking-rubric-rollouts, results/experiments/rubric_v2_audit.json).
"""

import json
import math
import statistics
import sys
import tempfile
from pathlib import Path

from clarify_lit.data.records import load_records, write_records
from clarify_lit.simulate.options import DataOptions, RewardOptions
from clarify_lit.simulate.rescore import RescoreConfig, run
from clarify_lit.simulate.rubric import DEFAULT_MIN_WORDS

DATA = DataOptions(dataset="sciq", part="test", n_train=32, n_test=100, seed=0)  # the preset's split
TRIVIAL = {
    "constant answer A": "The answer is A.",
    "constant option line A": "A) {a}",
    "every option": "The answer is A, B, C, D.",
    "echo of the options": "A) {a} B) {b} C) {c} D) {d}",
    "empty reply": "...",
    "a question": "What does option A mean?",
}


def v1_score(task_choices, messages, gold):
    """Rubric version 1 (before 2026-11-30's fix): concise = any turn of at most 60 words."""
    from clarify_lit.simulate.parsing import analyze_answer, uses_thinking_tags
    from clarify_lit.simulate.rubric import THINK_REQUEST, asks_one_question

    a = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    final = analyze_answer(messages[a[-1]]["content"], task_choices)
    asked = [i for i in a if messages[i - 1]["role"] == "user" and THINK_REQUEST in messages[i - 1]["content"]]
    c = {
        "correct": float(final.letter == gold),
        "asks_one": float(asks_one_question(messages[a[0]]["content"], task_choices)),
        "thinking": sum(uses_thinking_tags(messages[i]["content"]) for i in asked) / len(asked) if asked else 1.0,
        "concise": sum(len(messages[i]["content"].split()) <= 60 for i in a) / len(a),
    }
    return float(final.letter is not None) * (0.4 * c["correct"] + 0.2 * (c["asks_one"] + c["thinking"] + c["concise"]))


def mean_se(xs):
    return statistics.fmean(xs), statistics.stdev(xs) / math.sqrt(len(xs))


def main():
    src = Path(sys.argv[1] if len(sys.argv) > 1 else "results/clarify/sciq-clarifying-thinking-rubric-rollouts")
    out = Path(sys.argv[2] if len(sys.argv) > 2 else "results/experiments/rubric_v2_audit.json")
    from clarify_lit.simulate.options import load_data_tasks

    tasks = {t.task_id: t for t in load_data_tasks(DATA)}
    result = {"rollouts": str(src), "min_words": DEFAULT_MIN_WORDS, "policies": {}, "trivial": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for f in sorted(src.glob("seed*-*.jsonl.gz")):
            name = f.name.removesuffix(".jsonl.gz")
            if name.endswith("-logged"):
                continue
            summary = run(
                RescoreConfig(inputs=[str(f)], output=f"{tmp}/{name}", data=DATA, reward=RewardOptions(kind="rubric"))
            )
            after = summary["files"][f.name.removesuffix(".gz")]
            result["policies"][name] = {
                "v1": after["before"]["mean_reward"],
                "v1_se": after["before"]["se_reward"],
                "v2": after["after"]["mean_reward"],
                "v2_se": after["after"]["se_reward"],
                "components_v2": after["components_mean"],
            }
        base, _ = load_records(src / "seed0-Base.jsonl.gz")
        for label, template in TRIVIAL.items():
            played = []
            for r in base:
                t = tasks[r.task_id]
                reply = template.format(**dict(zip("abcd", t.choices, strict=True)))
                msgs = [dict(m, content=reply) if m["role"] == "assistant" else m for m in r.messages]
                played.append({**r.to_dict(), "messages": msgs})
            path = write_records(f"{tmp}/{label.replace(' ', '_')}.jsonl", played)
            summary = run(
                RescoreConfig(
                    inputs=[str(path)],
                    output=f"{tmp}/{label.replace(' ', '_')}-v2",
                    data=DATA,
                    reward=RewardOptions(kind="rubric"),
                )
            )
            v2 = [r.reward for r in load_records(Path(tmp) / f"{label.replace(' ', '_')}-v2" / path.name)[0]]
            v1 = [v1_score(tasks[p["task_id"]].choices, p["messages"], tasks[p["task_id"]].gold) for p in played]
            result["trivial"][label] = {
                "reply": template,
                "v1": mean_se(v1),
                "v2": mean_se(v2),
            }
        gold_a = statistics.fmean(float(tasks[r.task_id].gold == "A") for r in base)
        result["gold_share_A"] = gold_a
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print("| policy | rubric v1 | rubric v2 |\n|---|---|---|")
    for name, p in result["policies"].items():
        print(f"| {name} | {p['v1']:.3f} ± {p['v1_se']:.3f} | {p['v2']:.3f} ± {p['v2_se']:.3f} |")
    for label, p in result["trivial"].items():
        print(f"| *{label}* | {p['v1'][0]:.3f} ± {p['v1'][1]:.3f} | {p['v2'][0]:.3f} ± {p['v2'][1]:.3f} |")
    print(f"gold share of A: {gold_a:.2f}")


if __name__ == "__main__":
    main()
