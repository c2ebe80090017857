"""Open mode (issue 26): the question without its options, the answer in words, the teacher that answers questions
only, and the grading every trivial policy must lose to."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clarify_lit.data.records import ConversationRecord
from clarify_lit.data.tasks import LETTERS, QATask
from clarify_lit.evaluate.metrics import compute_metrics
from clarify_lit.models import FrozenModels
from clarify_lit.simulate import prompts
from clarify_lit.simulate.open_answer import (
    grade_open_answer,
    holds_one_question,
    named_options,
    questions_in,
)
from clarify_lit.simulate.options import RewardOptions, TeacherOptions, build_reward, build_teacher
from clarify_lit.simulate.rewards import CorrectReward
from clarify_lit.simulate.rollout import RolloutSpec, rollout_tasks
from clarify_lit.simulate.teachers import OpenTeacher, split_sentences

CELL = ["mitochondria", "nucleus", "ribosome", "cell wall"]

TASKS = [
    QATask(
        "sciq/1",
        "sciq",
        "What do plants need to make food?",
        ["sunlight", "sand", "salt", "smoke"],
        "A",
        knowledge="Plants make food by photosynthesis, which uses energy from sunlight. Sand is made of small "
        "rocks. Salt is a mineral that dissolves in water. Smoke comes from burning wood.",
    ),
    QATask(
        "sciq/2",
        "sciq",
        "Which organelle makes energy for the cell?",
        CELL,
        "A",
        knowledge="The mitochondria are the powerhouse of the cell and make energy. The nucleus holds the DNA. "
        "Ribosomes build proteins.",
    ),
]


# ---------------------------------------------------------------------------------------------------------------
# grading


@pytest.mark.parametrize(
    "text, letter, hedged",
    [
        ("The answer is mitochondria.", "A", False),
        ("The answer is the mitochondrion.", "A", False),  # inflection
        ("MITOCHONDRIA", "A", False),
        ("The answer is the cell walls.", "D", False),
        ("The answer is mitochondria or the nucleus.", None, True),  # two options: a hedge
        ("mitochondria, nucleus, ribosome, cell wall", None, True),  # every option named
        ("The answer is: The answer is:", None, False),  # names none
        ("", None, False),
        ("<thinking>nucleus? ribosome?</thinking> The answer is ribosomes.", "C", False),  # thinking is not read
        ("The answer is energy.", None, False),
    ],
)
def test_grade_open_answer_table(text, letter, hedged):
    got = grade_open_answer(text, CELL)
    assert (got.letter, got.hedged) == (letter, hedged)


def test_an_option_inside_a_longer_one_is_not_named_twice():
    assert named_options("The answer is salt water.", ["water", "salt water", "oil", "sand"]) == [1]
    assert named_options("water, then salt water", ["water", "salt water", "oil", "sand"]) == [0, 1]


def test_questions_in_a_turn():
    assert questions_in("I think so. What makes energy? And where? Fine.") == ["What makes energy?", "And where?"]
    assert questions_in("<thinking>why?</thinking>The answer is A.") == []
    assert holds_one_question("What makes energy in a cell?")
    assert not holds_one_question("What? Why?")
    assert not holds_one_question("The answer is the nucleus.")


# ---------------------------------------------------------------------------------------------------------------
# the reward and trivial policies: each scores 0 or its base rate, never more


def _conversation(task: QATask, final: str, ask: str = "What is it?") -> list[dict[str, str]]:
    return [
        {"role": "system", "content": prompts.system_prompt("clarifying", "open")},
        {"role": "user", "content": prompts.teacher_message(task, "clarifying", "open", 2, 1)},
        {"role": "assistant", "content": ask},
        {"role": "user", "content": prompts.teacher_message(task, "clarifying", "open", 2, 2, reply="Notes.")},
        {"role": "assistant", "content": final},
    ]


def _many_tasks(n: int = 40, seed: int = 0) -> list[QATask]:
    rng = random.Random(seed)
    words = [
        "iron",
        "oxygen",
        "carbon dioxide",
        "nitrogen",
        "gravity",
        "friction",
        "magma",
        "protein",
        "glucose",
        "chlorophyll",
        "neutron",
        "proton",
        "electron",
        "enzyme",
        "mitosis",
        "meiosis",
    ]
    tasks = []
    for i in range(n):
        choices = rng.sample(words, 4)
        tasks.append(QATask(f"t/{i}", "sciq", f"Question {i}?", choices, rng.choice(LETTERS)))
    return tasks


def _score(tasks, finals):
    reward = CorrectReward(open_answers=True)
    return [r.value for r in reward.score(tasks, [_conversation(t, f) for t, f in zip(tasks, finals, strict=True)])]


def test_trivial_policies_earn_nothing_or_their_base_rate():
    tasks = _many_tasks()
    gold_text = [t.choices[LETTERS.index(t.gold)] for t in tasks]
    assert sum(_score(tasks, [f"The answer is {', '.join(t.choices)}." for t in tasks])) == 0  # every option
    assert sum(_score(tasks, [" or ".join(t.choices) for t in tasks])) == 0
    assert sum(_score(tasks, ["" for _ in tasks])) == 0  # empty reply
    assert sum(_score(tasks, ["What is the answer?" for _ in tasks])) == 0  # a question only
    assert sum(_score(tasks, ["The answer is: The answer is: The answer is:" for _ in tasks])) == 0  # template
    for t in tasks:  # echoing the question earns nothing (it names no option)
        assert _score([t], [t.question])[0] == 0
    # a constant answer text earns exactly the share of questions whose gold it is, and only if no other option
    # is that text: the most frequent gold text is the best constant, and it earns its frequency
    most = max(set(gold_text), key=gold_text.count)
    got = sum(_score(tasks, [f"The answer is {most}." for _ in tasks]))
    assert got == gold_text.count(most)


@settings(max_examples=40, deadline=None)
@given(
    filler=st.lists(
        st.sampled_from("the a is of and that it what then so very because maybe".split()), min_size=0, max_size=30
    ),
    inside=st.booleans(),
)
def test_filler_words_never_earn(filler, inside):
    tasks = _many_tasks(8)
    text = " ".join(filler)
    final = f"<thinking>{text}</thinking> The answer is {text}" if inside else f"The answer is {text}."
    assert sum(_score(tasks, [final] * len(tasks))) == 0


def test_reward_components_count_names_none_and_hedges():
    task = TASKS[1]
    reward = CorrectReward(open_answers=True)
    none, hedge, right = reward.score(
        [task] * 3, [_conversation(task, f) for f in ("I do not know.", "nucleus or ribosome", "mitochondria")]
    )
    assert none.components["names_none"] == 1 and none.value == 0
    assert hedge.components["hedged"] == 1 and hedge.components["names_none"] == 0 and hedge.value == 0
    assert right.value == 1 and right.components["names_none"] == 0
    assert reward.describe() == "correct:open"


def test_open_mode_builds_only_the_correct_reward():
    models = FrozenModels("cpu")
    assert build_reward(RewardOptions(kind="correct"), policy="", models=models, mode="open").open_answers
    for kind in ("rubric", "gold_prob", "llm_judge"):
        with pytest.raises(NotImplementedError, match="open mode"):
            build_reward(RewardOptions(kind=kind), policy="", models=models, mode="open")
    assert isinstance(
        build_teacher(TeacherOptions(), setting="clarifying", policy="", models=models, mode="open"), OpenTeacher
    )


# ---------------------------------------------------------------------------------------------------------------
# the open teacher: information only through questions, only from that question's knowledge


def test_open_teacher_gives_nothing_without_a_question():
    teacher = OpenTeacher()
    for turn in ("The answer is sunlight.", "I think plants need something.", ""):
        assert teacher.answer(TASKS[0], turn) == prompts.OPEN_ASK_FOR_QUESTION
    assert teacher.no_question == 3


def test_open_teacher_answers_from_that_questions_knowledge_only():
    teacher = OpenTeacher(top_k=1)
    reply = teacher.answer(TASKS[0], "How do plants make food?")
    assert reply in split_sentences(TASKS[0].knowledge)  # one sentence of this task's notes, nothing added
    assert "photosynthesis" in reply
    # the most relevant sentence to *this* question, not to the task's question or its options
    assert teacher.answer(TASKS[0], "What about the salt?") == "Salt is a mineral that dissolves in water."
    # nothing in the notes: a fixed reply, counted
    assert teacher.answer(TASKS[0], "Who won the football match?") == prompts.OPEN_NOTHING_ON_THAT
    assert teacher.no_match == 1


def test_open_teacher_never_sees_the_options():
    # the same question with other options gets the same reply: options are not part of its input
    task = TASKS[1]
    other = QATask(task.task_id, task.dataset, task.question, ["a", "b", "c", "d"], "B", knowledge=task.knowledge)
    q = "What makes energy in the cell?"
    assert OpenTeacher().answer(task, q) == OpenTeacher().answer(other, q)


# ---------------------------------------------------------------------------------------------------------------
# prompts and the rollout


def test_open_prompts_hide_the_options():
    task = TASKS[0]
    first = prompts.teacher_message(task, "clarifying", "open", 2, 1)
    assert task.question in first and prompts.OPEN_ASK in first
    final = prompts.teacher_message(task, "clarifying", "open", 2, 2, reply="Sand is made of small rocks.")
    assert final.startswith("Sand is made") and final.endswith(prompts.OPEN_FINAL)
    for text in (first, final, prompts.system_prompt("clarifying", "open")):
        assert "A)" not in text and "sunlight" not in text
    assert prompts.turn_kinds("clarifying", 3, "open") == ["ask", "ask", "final"]
    with pytest.raises(NotImplementedError, match="open mode"):
        prompts.system_prompt("clarifying", "open", adaptive=True)
    with pytest.raises(ValueError, match="thinking mode"):
        prompts.check_setting("clarifying", "standard", 2)


def test_open_rollout_records(tiny):
    model, tok = tiny
    spec = RolloutSpec(
        setting="clarifying", mode="open", n_turns=2, temperatures=[0.0, 1.0], max_new_tokens=6, batch_size=4, seed=0
    )
    records = rollout_tasks(model, tok, TASKS, spec, model_name="tiny-random")
    assert len(records) == 4
    for r, task in zip(records, [TASKS[0]] * 2 + [TASKS[1]] * 2, strict=True):
        users = [m["content"] for m in r.messages if m["role"] == "user"]
        assert not any(c in u for u in users for c in task.choices if c not in task.question)  # never shown
        assert r.meta["choices"] == task.choices and r.meta["mode"] == "open"
        assert r.meta["teacher"] == "open" and r.meta["reward"] == "correct:open"
        assert r.meta["question_prompt"] == f"Question: {task.question}"
        assert r.reward == float(grade_open_answer(r.messages[-1]["content"], task.choices).letter == task.gold)
    with pytest.raises(ValueError, match="reward grades lettered answers"):
        rollout_tasks(model, tok, TASKS, spec, reward=CorrectReward(), model_name="tiny-random")


def test_open_metrics_read_the_options_from_meta():
    task = TASKS[1]

    def record(i, ask, final):
        return ConversationRecord(
            id=f"r{i}",
            task_id=task.task_id,
            messages=_conversation(task, final, ask),
            reward=0.0,
            gold="A",
            meta={"setting": "clarifying", "mode": "open", "choices": task.choices},
        )

    m = compute_metrics(
        [
            record(0, "What makes energy?", "mitochondria"),
            record(1, "Hi.", "I do not know"),
            record(2, "What? Why?", "nucleus or ribosome"),
            record(3, "No.", "mitochondria"),
        ]
    )
    assert m["accuracy"] == 0.5
    assert m["names_none_rate"] == 0.25 and m["hedge_rate"] == 0.25
    assert m["single_question_rate"] == 0.25  # "What? Why?" holds two
    assert m["accuracy_when_asked"] == 1.0 and m["accuracy_when_not_asked"] == pytest.approx(1 / 3)


def test_best_constant_open_answer_and_caption():
    from clarify_lit.evaluate.report import best_constant_open_answer, constant_caption, letters_table

    def rec(i, choices, gold):
        return ConversationRecord(
            id=f"q{i}#run0",
            task_id=f"q{i}",
            messages=_conversation(TASKS[0], "x"),
            reward=0.0,
            gold=gold,
            meta={"mode": "open", "choices": choices, "setting": "clarifying"},
        )

    records = [
        rec(0, ["oxygen", "iron", "salt", "sand"], "A"),
        rec(1, ["iron", "oxygen", "salt", "sand"], "B"),
        rec(2, ["iron", "gold", "salt", "sand"], "A"),
        rec(2, ["iron", "gold", "salt", "sand"], "A"),
    ]
    # "oxygen" is right on q0 and q1, "iron" on q2: 2 of the 3 questions (q2's two runs count once)
    assert best_constant_open_answer(records) == ("oxygen", pytest.approx(2 / 3))
    assert 'always "The answer is oxygen." scores accuracy 0.667 on these 3 questions' in constant_caption(records)
    assert letters_table([], {}) == ""
