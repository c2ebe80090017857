"""Turn-1 coverage of the clarifying prompts: which conditioning makes the base policy ask one question about an
option? (issue 15, part 2). Base SmolLM2-135M bf16, 24 SciQ training questions x 3 temperatures, 64 new tokens."""

import json
import sys
import time

import torch

from clarify_lit.data.tasks import load_tasks
from clarify_lit.models import load_causal_lm, load_tokenizer
from clarify_lit.simulate import prompts
from clarify_lit.simulate.engine import GenerationEngine
from clarify_lit.simulate.parsing import analyze_answer, is_single_question

torch.set_num_threads(2)
M = "embedded:smollm2-135m-instruct"
model, tok = load_causal_lm(M, "bfloat16"), load_tokenizer(M)
tasks = load_tasks("sciq", seed=0, n_train=32, n_test=100, part="train")[
    : int(__import__("os").environ.get("NQ", "24"))
]
eng = GenerationEngine(model, tok, batch_size=72, max_new_tokens=64)
SYS = prompts.CLARIFYING_SYSTEM_PROMPT
EX = (
    "\n\nExample of a good first turn:\nQuestion: Which gas do plants take in for photosynthesis?\nA) oxygen\nB) "
    "carbon dioxide\n"
    "C) helium\nD) neon\nStudent: Does option B, carbon dioxide, get used up when plants make sugar?"
)


def t1_current(t):
    return prompts.clarifying_teacher_turn(t, "ask", None, None)


def t1_plain(t):
    return (
        f"{prompts.format_question(t)}\n\nBefore you answer, ask me ONE short question about ONE of the options "
        "(A, B, C or D). Reply with the question only, ending with '?'."
    )


def t1_starter(t):
    return (
        f"{prompts.format_question(t)}\n\nDo not answer yet. Ask me ONE short question about ONE option, "
        'for example: "What does option C mean?" Reply with your question only.'
    )


def t1_starter2(t):
    return (
        f"{prompts.format_question(t)}\n\nDo not answer yet. Reply with ONE question about ONE option, "
        'like "Is option C a kind of ...?" or "What does option A mean?"'
    )


variants = {
    "starter2": (SYS, t1_starter2),
    "current": (SYS, t1_current),
    "plain": (SYS, t1_plain),
    "example_sys+plain": (SYS + EX, t1_plain),
    "starter": (SYS, t1_starter),
    "example_sys+starter": (SYS + EX, t1_starter),
}
which = sys.argv[1:] or list(variants)
temps = [0.3, 0.7, 1.0]
out = {}
for name in which:
    sysmsg, t1 = variants[name]
    convs = [[{"role": "system", "content": sysmsg}, {"role": "user", "content": t1(t)}] for t in tasks for _ in temps]
    rows = [(t, T) for t in tasks for T in temps]
    t0 = time.time()
    gens = eng.generate(convs, [T for _, T in rows], seed=0)
    sq = [is_single_question(g.text, t.choices) for g, (t, _) in zip(gens, rows)]
    q = ["?" in g.text for g in gens]
    ans = [analyze_answer(g.text, t.choices).letter is not None for g, (t, _) in zip(gens, rows)]
    out[name] = {
        "single_question": sum(sq) / len(sq),
        "has_question_mark": sum(q) / len(q),
        "commits_to_answer": sum(ans) / len(ans),
        "cut": sum(g.truncated for g in gens) / len(gens),
        "seconds": round(time.time() - t0),
        "examples": [g.text[:160] for g in gens[:6]],
    }
    print(name, {k: v for k, v in out[name].items() if k != "examples"}, flush=True)
    for e in out[name]["examples"][:4]:
        print("   ", repr(e))
json.dump(out, open(f"ask_variants_{'_'.join(which)}.json", "w"), indent=1)
