"""Value of asking (issue 15, part 1): Base accuracy on SciQ test questions when turn 2 carries the teacher's answer
to a fixed question about each option ("What does option X mean?"), for three teachers: the scripted nudge (no
information), the retrieval teacher dropping sentences with the gold text (the old default) and the retrieval
teacher blanking the gold text (the new default). Two accuracies: the letter with the highest next-token logit
after the forced prefix "Answer is" (all n questions), and the greedy generated final answer parsed by the project's
parser (first n_gen questions)."""

import json
import sys
import time

import torch

from clarify_lit.data.tasks import LETTERS, load_tasks
from clarify_lit.models import load_causal_lm, load_tokenizer
from clarify_lit.simulate import prompts
from clarify_lit.simulate.engine import GenerationEngine
from clarify_lit.simulate.parsing import analyze_answer
from clarify_lit.simulate.teachers import RetrievalTeacher, ScriptedTeacher

torch.set_num_threads(2)
n, n_gen = int(sys.argv[1]), int(sys.argv[2])
M = "embedded:smollm2-135m-instruct"
model, tok = load_causal_lm(M, "bfloat16"), load_tokenizer(M)
tasks = load_tasks("sciq", seed=0, n_train=32, n_test=100, part="test")[:n]
eng = GenerationEngine(model, tok, batch_size=50, max_new_tokens=48)
letter_ids = [tok(" " + x, add_special_tokens=False)["input_ids"][0] for x in LETTERS]
teachers = {
    "scripted": ScriptedTeacher(),
    "retrieval_drop": RetrievalTeacher(hide_mode="drop"),
    "retrieval_blank": RetrievalTeacher(hide_mode="blank"),
}
out = {}
for name, teacher in teachers.items():
    convs, rows = [], []
    for t in tasks:
        for x in LETTERS:
            ask = f"What does option {x} mean?"
            c = [
                {"role": "system", "content": prompts.system_prompt("clarifying", "thinking")},
                {"role": "user", "content": prompts.teacher_message(t, "clarifying", "thinking", 2, 1)},
                {"role": "assistant", "content": ask},
            ]
            reply = teacher.reply([t], [c])[0]
            c.append(
                {"role": "user", "content": prompts.teacher_message(t, "clarifying", "thinking", 2, 2, reply=reply)}
            )
            convs.append(c)
            rows.append((t, x, reply))
    t0 = time.time()
    prefixes = [eng.encode(c, assistant_prefix="Answer is") for c in convs]
    lp = eng.next_token_logprobs(prefixes)[:, letter_ids]
    pick = [LETTERS[int(i)] for i in lp.argmax(-1)]
    logit_acc = sum(p == t.gold for p, (t, _, _) in zip(pick, rows)) / len(rows)
    gen_rows = [i for i, (t, _, _) in enumerate(rows) if tasks.index(t) < n_gen]
    gens = eng.generate([convs[i] for i in gen_rows], 0.0, seed=0) if gen_rows else []
    parsed = [analyze_answer(g.text, rows[i][0].choices).letter for g, i in zip(gens, gen_rows)]
    gen_acc = sum(p == rows[i][0].gold for p, i in zip(parsed, gen_rows)) / len(gen_rows) if gen_rows else None
    fmt = sum(p is not None for p in parsed) / len(gen_rows) if gen_rows else None
    used = sum(
        not r.startswith("Good question. Think about") and r != prompts.SCRIPTED_CLARIFY_REPLY for _, _, r in rows
    ) / len(rows)
    gold_leak = sum(t.choices[LETTERS.index(t.gold)].lower() in r.lower() for t, _, r in rows)
    probs = torch.softmax(lp, -1)
    gold_p = sum(float(probs[i, LETTERS.index(t.gold)]) for i, (t, _, _) in enumerate(rows)) / len(rows)
    out[name] = {
        "questions": len(tasks),
        "conversations": len(rows),
        "letter_logit_accuracy": logit_acc,
        "gold_letter_probability": gold_p,
        "picked": {x: pick.count(x) for x in LETTERS},
        "generated_questions": n_gen,
        "generated_accuracy": gen_acc,
        "generated_format_rate": fmt,
        "replies_from_knowledge": used,
        "replies_quoting_gold_text": gold_leak,
        "seconds": round(time.time() - t0),
        "example_replies": [r for _, _, r in rows[:4]],
    }
    print(name, {k: v for k, v in out[name].items() if k != "example_replies"}, flush=True)
json.dump(out, open(f"value_of_asking_{n}_{n_gen}.json", "w"), indent=1)
