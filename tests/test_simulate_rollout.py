"""Rollouts on the tiny random model: records, determinism, every setting x teacher x reward, rewards, teachers."""

from __future__ import annotations

import pytest
import torch

from clarify_lit.data.records import load_records, write_records
from clarify_lit.data.tasks import QATask
from clarify_lit.simulate import prompts
from clarify_lit.simulate.rewards import (
    CorrectReward,
    GoldProbReward,
    LLMJudgeReward,
    WeightedReward,
    make_reward,
    parse_judge_scores,
)
from clarify_lit.simulate.rollout import RolloutSpec, rollout_tasks
from clarify_lit.simulate.teachers import (
    ChatBackend,
    HFChatBackend,
    LLMTeacher,
    RetrievalTeacher,
    ScriptedTeacher,
    bm25_scores,
    make_teacher,
    referenced_options,
    tokens,
)

TASKS = [
    QATask(
        "sciq/1",
        "sciq",
        "What do plants need to make food?",
        ["sunlight", "sand", "salt", "smoke"],
        "A",
        knowledge="Plants make food by photosynthesis, which uses light energy. Sand is made of small rocks. "
        "Salt is a mineral that dissolves in water. Smoke comes from burning.",
    ),
    QATask("openbookqa/2", "openbookqa", "Which is a source of heat?", ["ice", "fire", "snow", "rain"], "B"),
]


def roll(tiny, teacher=None, reward=None, **kw):
    """``rollout_tasks`` on TASKS; ``kw`` overrides the spec's fields."""
    model, tok = tiny
    spec = dict(
        setting="reasoning", mode="thinking", n_turns=3, temperatures=[0.0, 1.0], max_new_tokens=6, batch_size=4, seed=0
    )
    spec.update(kw)
    return rollout_tasks(
        model, tok, TASKS, RolloutSpec(**spec), teacher=teacher, reward=reward, model_name="tiny-random"
    )


class FakeJudge(ChatBackend):
    """Replies from a script (one list per call), to test the judge's parsing and retries."""

    name = "fake"

    def __init__(self, script):
        self.script = list(script)
        self.calls = 0

    def chat(self, requests, *, temperature=0.0, max_new_tokens=128, seed=0):
        reply = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        return [reply for _ in requests]


def check_records(records, tmp_path, n_turns=3):
    path = write_records(tmp_path / "r.jsonl", records)
    loaded, summary = load_records(path)
    assert summary.skipped == 0 and len(loaded) == len(records)
    for r in loaded:
        assert r.id == f"{r.task_id}#run{r.run}"
        assert r.messages[0]["role"] == "system"
        assert [m["role"] for m in r.messages[1:]] == ["user", "assistant"] * n_turns
        assert r.reward >= 0
        assert r.gold in "ABCD"
        assert {"setting", "mode", "n_turns", "model", "reward_missing"} <= set(r.meta)
    return loaded


def test_records_fields_and_determinism(tiny, tmp_path):
    a = roll(tiny)
    b = roll(tiny)
    assert [r.to_dict() for r in a] == [r.to_dict() for r in b]
    c = roll(tiny, seed=1)
    assert [r.messages for r in a if r.temperature == 0.0] == [r.messages for r in c if r.temperature == 0.0]
    assert [r.id for r in a] == ["sciq/1#run0", "sciq/1#run1", "openbookqa/2#run0", "openbookqa/2#run1"]
    assert [r.temperature for r in a] == [0.0, 1.0, 0.0, 1.0]
    loaded = check_records(a, tmp_path)
    first = loaded[0]
    assert first.meta["setting"] == "reasoning" and first.meta["n_turns"] == 3 and first.meta["model"] == "tiny-random"
    assert first.reward_components == {
        "correct": first.reward,
        "parsed": float(first.prediction is not None),
        "hedged": 0.0,
    }
    for r in loaded:  # which assistant turns hit max_new_tokens: 1-based turn numbers
        assert all(1 <= t <= 3 for t in r.meta["truncated_turns"])
    assert "Which" not in first.messages[3]["content"]  # T2 is not T1


def test_greedy_rollout_independent_of_batching(tiny):
    a = roll(tiny, temperatures=[0.0], batch_size=1)
    b = roll(tiny, temperatures=[0.0], batch_size=4, sort_by_length=False)
    assert [r.messages for r in a] == [r.messages for r in b]


@pytest.mark.parametrize("temperatures", [[0.0], [0.0, 0.7, 1.0]])
def test_kv_reuse_across_turns_equals_reencoding(tiny, temperatures):
    """With the KV reuse on, a greedy rollout gives the same conversations as re-encoding every turn. The tiny model
    emits byte soup that rarely survives decode → re-encode, so here most rows take the fallback (re-prefilled in
    their batch, counted as misses); the reuse itself is tested on token ids in tests/test_simulate_engine.py."""
    from clarify_lit.simulate.engine import GenerationEngine

    model, tok = tiny
    # 6 tasks: several rows per batch, prompts of different lengths
    tasks = [
        QATask(f"{t.task_id}-{k}", t.dataset, "why " * (3 * k) + t.question, t.choices, t.gold)
        for k in range(3)
        for t in TASKS
    ]
    engines = {
        reuse: GenerationEngine(model, tok, batch_size=4, max_new_tokens=6, reuse_kv_cache=reuse)
        for reuse in (True, False)
    }
    spec = RolloutSpec(
        setting="reasoning", mode="thinking", n_turns=3, temperatures=temperatures, max_new_tokens=6, seed=0
    )
    runs = {reuse: rollout_tasks(model, tok, tasks, spec, engine=e) for reuse, e in engines.items()}
    greedy = [i for i, r in enumerate(runs[False]) if r.temperature == 0.0]
    assert [runs[True][i].messages for i in greedy] == [runs[False][i].messages for i in greedy]
    # sampled rows: seeded, but a continued batch keeps its turn-1 rows, so their random draws may differ from
    # the re-encoding run's (batches formed afresh); the same call twice gives the same text
    again = rollout_tasks(model, tok, tasks, spec, engine=GenerationEngine(model, tok, batch_size=4, max_new_tokens=6))
    assert [r.messages for r in again] == [r.messages for r in runs[True]]
    stats = engines[True].stats
    if temperatures == [0.0]:
        assert stats.prompt_tokens == engines[False].stats.prompt_tokens
    # turns 2 and 3 of (nearly) every conversation were re-prefilled
    assert len(runs[True]) <= stats.reuse_misses <= 2 * len(runs[True])
    assert engines[False].stats.reuse_misses == engines[False].stats.reused_tokens == 0


@pytest.mark.parametrize("n_turns", [1, 4])
def test_reasoning_turn_counts(tiny, tmp_path, n_turns):
    records = roll(tiny, n_turns=n_turns, temperatures=[0.0])
    check_records(records, tmp_path, n_turns=n_turns)


def _teacher(kind, tiny):
    if kind == "llm-hf":
        model, tok = tiny
        return LLMTeacher(HFChatBackend(model, tok, batch_size=4), max_new_tokens=6)
    return make_teacher(kind)


def _reward(kind, tiny):
    model, tok = tiny
    if kind == "llm_judge":
        return LLMJudgeReward(
            FakeJudge(
                [
                    '{"accuracy": 3, "reasoning": 4, "comprehensiveness": 5, '
                    '"pedagogical_value": 6, "confidence_calibration": 7, "overall": 8}'
                ]
            )
        )
    if kind == "weighted":
        return make_reward(
            "weighted", judge_model=model, judge_tokenizer=tok, weights={"correct": 0.5, "gold_prob": 0.5}
        )
    return make_reward(kind, judge_model=model, judge_tokenizer=tok)


@pytest.mark.parametrize(
    ("setting", "teacher", "reward"),
    [
        ("reasoning", "scripted", "correct"),
        ("reasoning", "scripted", "gold_prob"),
        ("reasoning", "scripted", "llm_judge"),
        ("reasoning", "scripted", "weighted"),
        ("clarifying", "scripted", "correct"),
        ("clarifying", "retrieval", "gold_prob"),
        ("clarifying", "llm-hf", "weighted"),
        ("clarifying", "retrieval", "llm_judge"),
    ],
)
def test_setting_teacher_reward_matrix(tiny, tmp_path, setting, teacher, reward):
    records = roll(tiny, setting=setting, teacher=_teacher(teacher, tiny), reward=_reward(reward, tiny))
    loaded = check_records(records, tmp_path)
    for r in loaded:
        comps = r.reward_components
        assert "correct" in comps and "parsed" in comps
        if reward == "gold_prob":
            assert 0 <= r.reward <= 1 and r.reward == comps["gold_prob"]
        if reward == "llm_judge":
            assert r.reward == pytest.approx(0.8) and comps["overall"] == 8 and comps["accuracy"] == 3
        if reward == "weighted":
            assert r.reward == pytest.approx(0.5 * comps["correct"] + 0.5 * comps["gold_prob"])
    if setting == "clarifying":
        conv = loaded[0].messages
        assert "Ask me ONE specific question" in conv[1]["content"]
        teacher_reply, instruction = prompts.split_instruction(conv[3]["content"])
        assert instruction is not None and "Do not ask" in instruction
        assert teacher_reply.strip()
        if teacher == "scripted":
            assert teacher_reply == prompts.SCRIPTED_CLARIFY_REPLY


def test_reasoning_rejects_a_non_scripted_teacher(tiny):
    with pytest.raises(ValueError, match="scripted"):
        roll(tiny, teacher=RetrievalTeacher())


def test_bad_tasks_are_named(tiny):
    model, tok = tiny
    bad = QATask("x/1", "x", "q", ["a", "b", "c"], "A")
    with pytest.raises(ValueError, match="x/1"):
        rollout_tasks(model, tok, [bad], RolloutSpec(max_new_tokens=2))
    with pytest.raises(ValueError, match="twice"):
        rollout_tasks(model, tok, [TASKS[0], TASKS[0]], RolloutSpec(max_new_tokens=2))


# ---------------------------------------------------------------------------------------------------------------
# rewards


def _conv(final: str):
    return [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": final},
    ]


def test_correct_reward_counts_parse_failures():
    res = CorrectReward().score(TASKS, [_conv("The answer is A"), _conv("no idea")])
    assert [r.value for r in res] == [1.0, 0.0]
    assert [r.components["parsed"] for r in res] == [1.0, 0.0]


def test_gold_prob_is_a_distribution(tiny):
    model, tok = tiny
    reward = GoldProbReward(model, tok, batch_size=2)
    convs = [_conv("The answer is A"), _conv("The answer is B"), _conv("hm")]
    probs = reward.letter_probs([TASKS[0], TASKS[1], TASKS[0]], convs)
    assert probs.shape == (3, 4)
    assert torch.allclose(probs.sum(-1), torch.ones(3), atol=1e-5)
    # tiny's tokenizer splits " B" in two tokens: the multi-token path must agree with a direct computation
    assert not reward.single_token
    prefix = reward.engine.encode(prompts.gold_prob_request(TASKS[0], convs[0]), assistant_prefix="The answer is")
    with torch.no_grad():
        logits = [
            model(torch.tensor([prefix + ids[:-1]])).logits[0].float().log_softmax(-1) for ids in reward.letter_ids
        ]
    direct = torch.stack(
        [sum(lp[len(prefix) - 1 + k, ids[k]] for k in range(len(ids))) for lp, ids in zip(logits, reward.letter_ids)]
    )
    assert torch.allclose(probs[0], direct.softmax(-1), atol=1e-4)


def test_llm_judge_retries_then_records_missing(tiny, tmp_path):
    good = (
        '{"accuracy": 10, "reasoning": 9, "comprehensiveness": 8, "pedagogical_value": 7, '
        '"confidence_calibration": 6, "overall": 5}'
    )
    judge = FakeJudge(["not json", f"Sure! ```json\n{good}\n```"])
    res = LLMJudgeReward(judge, max_attempts=3).score(TASKS, [_conv("The answer is A")] * 2)
    assert judge.calls == 2 and [r.value for r in res] == [0.5, 0.5]
    never = FakeJudge(["I refuse"])
    judge_reward = LLMJudgeReward(never, max_attempts=3)
    res = judge_reward.score(TASKS, [_conv("x")] * 2)
    assert never.calls == 3 and all(r.missing for r in res) and judge_reward.missing == 2
    assert res[0].components["overall"] is None and res[0].components["llm_judge"] is None
    records = roll(tiny, temperatures=[0.0], reward=LLMJudgeReward(FakeJudge(["nope"]), max_attempts=2))
    loaded = check_records(records, tmp_path)
    assert all(r.meta["reward_missing"] is True and r.reward == 0.0 for r in loaded)
    assert all(r.reward_components["llm_judge"] is None for r in loaded)


@pytest.mark.parametrize(
    ("text", "overall"),
    [
        ('{"overall": 7}', 7.0),
        ('Scores: {"Accuracy": "9", "Overall Score": 6.5}', 6.5),
        ('{"overall": 11}', None),
        ('{"overall": "high"}', None),
        ("Accuracy: 8/10\nOverall: 4/10", 4.0),
        ("nothing here", None),
    ],
)
def test_parse_judge_scores(text, overall):
    scores = parse_judge_scores(text)
    assert (scores or {}).get("overall") == overall


def test_weighted_reward_validation():
    with pytest.raises(ValueError, match=">= 0"):
        WeightedReward({"correct": CorrectReward()}, {"correct": -1.0})
    with pytest.raises(ValueError):
        make_reward("weighted")
    with pytest.raises(ValueError, match="judge"):
        make_reward("gold_prob")


# ---------------------------------------------------------------------------------------------------------------
# teachers


def test_retrieval_teacher_answers_from_knowledge_without_the_answer():
    teacher = RetrievalTeacher()
    task = QATask(
        "t/1",
        "t",
        "What causes day and night?",
        ["the Moon", "clouds", "Earth's orbit", "Earth's rotation"],
        "D",
        knowledge="Earth spins on its axis once a day. Earth's rotation causes day and night. The "
        "side facing the Sun has daylight. One orbit around the Sun takes a year. Clouds are "
        "made of water.",
    )
    reply, used = teacher.answer(task, "What does option C mean by orbit?")
    assert used and "orbit around the Sun takes a year" in reply
    # the sentence that explains the answer is kept, with the gold option's text blanked
    reply2, used2 = teacher.answer(task, "Is Earth's rotation the same as spinning?")
    assert used2 and "____ causes day and night" in reply2 and "rotation" not in reply2.lower()
    # the older mode drops such sentences instead
    reply_drop, _ = RetrievalTeacher(hide_mode="drop").answer(task, "Is Earth's rotation the same as spinning?")
    assert "spins on its axis" in reply_drop and "causes day and night" not in reply_drop
    assert "rotation causes" in RetrievalTeacher(hide_gold_text=False).answer(task, "Is Earth's rotation real?")[0]
    for text in (reply, reply2, reply_drop):
        assert "option d" not in text.lower() and "correct" not in text.lower() and "answer is" not in text.lower()
    assert len(reply.split()) <= 62
    # no knowledge: point at the option asked about without judging it, in the same words for every option
    reply3, used3 = teacher.answer(TASKS[1], "Is (B) hot?")
    assert not used3 and "option B means" in reply3 and "fire" not in reply3
    conv = [{"role": "assistant", "content": "Is (B) hot?"}]
    assert teacher.reply([TASKS[1]], [conv]) == [reply3] and teacher.fallbacks == 1


GOLD_FORMS = [
    # (gold option, knowledge mentioning it in other forms)
    ("a zygospore", "Fungi that reproduce sexually make zygospores. A Zygospore survives winter. Spores spread."),
    (
        "carbon dioxide",
        "Plants take in Carbon Dioxide through stomata. Animals breathe out carbon-dioxide. Oxygen is released.",
    ),
    ("evaporation", "Water evaporates from the sea. Evaporating water cools the surface. Rain falls later."),
    ("energy", "Food stores energy. Energies of photons differ. Cells use energetic molecules."),
    ("mitochondria", "The mitochondrion makes ATP. Mitochondria have two membranes. Chloroplasts make sugar."),
]


@pytest.mark.parametrize(("gold", "knowledge"), GOLD_FORMS)
def test_retrieval_teacher_never_says_the_gold_text(gold, knowledge):
    """Whatever the student asks, no reply contains the gold option's text in any inflection (issue 15)."""
    import re

    choices = [gold, "a rock", "salt water", "ice"]
    task = QATask(
        "t/g", "t", f"Which of these is linked to {gold.split()[-1][:3]}...?", choices, "A", knowledge=knowledge
    )
    stem = re.sub(r"(ies|es|s|y|e|ion)$", "", gold.split()[-1].lower())[:6]
    questions = [f"What does option {x} mean?" for x in "ABCD"] + [
        f"Is {gold} made by plants?",
        "What happens in winter?",
        "Tell me about option A",
        "",
        "Does (A) store food?",
        f"Is it {gold}s?",
    ]
    for teacher in (RetrievalTeacher(), RetrievalTeacher(hide_mode="drop"), RetrievalTeacher(top_k=5)):
        for q in questions:
            reply, _ = teacher.answer(task, q)
            assert stem not in reply.lower(), (teacher.hide_mode, q, reply)


def test_retrieval_helpers():
    assert referenced_options("Is option B or (c) right? What about sand?", ["x", "y", "z", "sand"]) == [1, 2, 3]
    assert referenced_options("a b c", ["x", "y", "z", "w"]) == []
    assert tokens("The Plants are growing!") == ["plant", "growing"]
    scores = bm25_scores(["plant", "light"], [["plant", "light", "energy"], ["rock"], ["plant"]])
    assert scores[0] > scores[2] > scores[1] == 0


def test_scripted_teacher_and_factory():
    assert ScriptedTeacher().reply(TASKS, [[], []]) == [prompts.SCRIPTED_CLARIFY_REPLY] * 2
    with pytest.raises(ValueError, match="backend"):
        make_teacher("llm")
    with pytest.raises(ValueError):
        make_teacher("oracle")  # type: ignore[arg-type]
