"""Value of asking in open mode (issue 26, item 3), measured before any training.

The reproduce split's 100 SciQ test questions (sciq, seed 0, n_train 32, n_test 100), open clarifying mode, n = 2
(ask, then the final answer in words), the open teacher (answers only a question, from the notes). Turn 1 is
scripted by each strategy below, the teacher answers it, and the untrained policy gives its final answer greedily
through the project's own rollout (``rollout_tasks`` continuing the scripted prefix at turn 2); answers are graded as
the `correct` reward grades them (``open_answer.grade_open_answer``). "base policy" rolls out both turns itself.

Trivial policies (no generation, graded the same way) sit beside them: the best constant answer (the answer text
correct on the most test questions, ``report.best_constant_open_answer``), every option named, an empty reply,
a question only. And one reference without a policy: the teacher's reply to the restated question copied as the
final answer (how often the notes name the gold option and no other).

    python experiments/open_value_of_asking.py --out results/open/value-of-asking [--dtype bfloat16] [--n 100] [--reuse]

Writes ``<out>.json`` (per strategy: accuracy, hedges, names-none, teacher fallbacks), ``<out>.md`` and every
conversation under ``<out>-rollouts/<strategy>.jsonl.gz``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
import time
from pathlib import Path

import torch

from clarify_lit.data.records import ConversationRecord, load_records
from clarify_lit.data.tasks import QATask, load_tasks
from clarify_lit.evaluate.metrics import compute_metrics
from clarify_lit.evaluate.report import best_constant_open_answer
from clarify_lit.models import load_causal_lm, load_tokenizer
from clarify_lit.simulate import prompts
from clarify_lit.simulate.open_answer import grade_open_answer
from clarify_lit.simulate.rollout import RolloutSpec, rollout_tasks
from clarify_lit.simulate.teachers import OpenTeacher

MODEL = "embedded:smollm2-135m-instruct"


def restated(task: QATask) -> str:
    q = task.question.strip()
    return q if q.endswith("?") else q.rstrip(" .:") + "?"


def scripted_turns(tasks: list[QATask], seed: int = 0) -> dict[str, list[str]]:
    rng = random.Random(seed)
    return {
        "no question": ["I will answer directly." for _ in tasks],
        "generic question": ["Can you give me a hint?" for _ in tasks],
        "question restated": [restated(t) for t in tasks],
        "one random option": [f"What is {rng.choice(t.choices).strip()}?" for t in tasks],
    }


def prefix(task: QATask, ask: str, teacher: OpenTeacher) -> list[dict[str, str]]:
    conv = [
        {"role": "system", "content": prompts.system_prompt("clarifying", "open")},
        {"role": "user", "content": prompts.teacher_message(task, "clarifying", "open", 2, 1)},
        {"role": "assistant", "content": ask},
    ]
    reply = teacher.reply([task], [conv])[0]
    conv.append({"role": "user", "content": prompts.teacher_message(task, "clarifying", "open", 2, 2, reply=reply)})
    return conv


def fixed_final(task: QATask, conv: list[dict[str, str]], answer: str, name: str) -> ConversationRecord:
    """A record whose final answer is ``answer`` (a trivial policy), graded like the reward."""
    got = grade_open_answer(answer, task.choices)
    return ConversationRecord(
        id=f"{task.task_id}#{name}",
        task_id=task.task_id,
        messages=[*conv, {"role": "assistant", "content": answer or "..."}],
        reward=float(got.letter == task.gold),
        gold=task.gold,
        prediction=got.letter,
        dataset=task.dataset,
        meta={"setting": "clarifying", "mode": "open", "choices": list(task.choices), "policy": name},
    )


def summary(records: list[ConversationRecord]) -> dict[str, float]:
    m = compute_metrics(records)
    keep = (
        "n",
        "accuracy",
        "accuracy_se",
        "hedge_rate",
        "names_none_rate",
        "single_question_rate",
        "accuracy_when_asked",
        "accuracy_when_not_asked",
    )
    return {k: m[k] for k in keep if k in m}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="results/open/value-of-asking")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--max_new_tokens", type=int, default=48)
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="read the generated strategies' rollouts from an earlier run's <out>-rollouts/ instead of "
        "generating them again (greedy: the same text on the same machine); trivial rows are rebuilt",
    )
    args = ap.parse_args()
    out = Path(args.out)
    roll_dir = Path(f"{out}-rollouts")
    roll_dir.mkdir(parents=True, exist_ok=True)
    tasks = load_tasks("sciq", seed=0, n_train=32, n_test=100, part="test")[: args.n]
    model = tok = None
    spec = RolloutSpec(
        setting="clarifying",
        mode="open",
        n_turns=2,
        temperatures=[0.0],
        max_new_tokens=args.max_new_tokens,
        batch_size=50,
        seed=0,
    )
    results: dict[str, dict] = {}
    results_records: dict[str, list[ConversationRecord]] = {}

    def path_of(name: str) -> Path:
        return roll_dir / (re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") + ".jsonl.gz")

    def save(name: str, records: list[ConversationRecord], seconds: float | None, teacher: bool) -> None:
        results_records[name] = records
        replies = [[m["content"] for m in r.messages if m["role"] == "user"][1] for r in records]
        results[name] = {
            **summary(records),
            "seconds": None if seconds is None else round(seconds, 1),
            **(
                {
                    "teacher_no_question": sum(x.startswith(prompts.OPEN_ASK_FOR_QUESTION) for x in replies),
                    "teacher_no_match": sum(x.startswith(prompts.OPEN_NOTHING_ON_THAT) for x in replies),
                }
                if teacher
                else {}
            ),
        }
        path = path_of(name)
        with gzip.open(path, "wt", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")
        print(name, results[name], flush=True)

    with torch.inference_mode():
        for name, asks in [*scripted_turns(tasks).items(), ("base policy", None)]:
            if args.reuse and path_of(name).exists():  # the greedy rollouts of an earlier run of this script
                save(name, load_records(path_of(name))[0], None, True)
                continue
            model, tok = model or load_causal_lm(MODEL, args.dtype), tok or load_tokenizer(MODEL)
            teacher = OpenTeacher()
            t0 = time.time()
            pre = None if asks is None else [prefix(t, a, teacher) for t, a in zip(tasks, asks, strict=True)]
            recs = rollout_tasks(
                model,
                tok,
                tasks,
                spec,
                teacher=teacher,
                prefixes=pre,
                start_turn=1 if asks is None else 2,
                model_name=MODEL,
            )
            save(name, recs, time.time() - t0, True)

    # trivial policies and the copy-the-notes reference (no generation)
    best_text, _ = best_constant_open_answer(results_records["base policy"])
    teacher = OpenTeacher()
    pre = [prefix(t, restated(t), teacher) for t in tasks]
    trivial = {
        f"best constant answer ({best_text!r})": lambda t, c: f"The answer is {best_text}.",
        "every option named": lambda t, c: "The answer is " + ", ".join(t.choices) + ".",
        "empty reply": lambda t, c: "",
        "a question only": lambda t, c: "What do you mean?",
        "copy the teacher's reply (reference, restated question)": lambda t, c: c[-1]["content"].split(
            "\n\n" + prompts.OPEN_FINAL
        )[0],
    }
    for name, answer in trivial.items():
        save(name, [fixed_final(t, c, answer(t, c), name) for t, c in zip(tasks, pre, strict=True)], 0.0, False)

    payload = {
        "questions": len(tasks),
        "dtype": args.dtype,
        "model": MODEL,
        "n_turns": 2,
        "max_new_tokens": args.max_new_tokens,
        "strategies": results,
        "command": f"python experiments/open_value_of_asking.py --out {args.out} --dtype {args.dtype} --n {args.n}",
    }
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    lines = [
        f"# Value of asking in open mode ({len(tasks)} SciQ test questions, SmolLM2-135M-Instruct, {args.dtype}, "
        "greedy)",
        "",
        f"`{payload['command']}`",
        "",
        "| turn 1 / policy | accuracy | hedged | names none | asks one question |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['accuracy']:.2f} ± {r['accuracy_se']:.2f} | {r.get('hedge_rate', 0):.2f} | "
            f"{r.get('names_none_rate', float('nan')):.2f} | {r.get('single_question_rate', float('nan')):.2f} |"
        )
    lines += [
        "",
        "The trivial rows and the copy reference keep the restated question as turn 1 (so the teacher's reply "
        "holds information); only their final answer is fixed. Seconds per strategy are in the JSON.",
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
