"""Prompt layout per setting, mode and number of turns."""

from __future__ import annotations

import pytest

from clarify_lit.data.tasks import QATask
from clarify_lit.simulate import prompts

TASK = QATask(
    "arc_easy/1",
    "arc_easy",
    "Which gas do plants take in?",
    ["oxygen", "carbon dioxide", "helium", "neon"],
    "B",
    knowledge="Plants take in carbon dioxide. They release oxygen.",
)


def messages_for(setting, mode, n):
    return [
        prompts.teacher_message(
            TASK, setting, mode, n, t, reply="Teacher says hi." if prompts.needs_teacher_reply(setting, n, t) else None
        )
        for t in range(1, n + 1)
    ]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("mode", ["thinking", "standard"])
def test_reasoning_layout(mode, n):
    kinds = prompts.turn_kinds("reasoning", n)
    assert len(kinds) == n and kinds[-1] == "final"
    if n >= 3:
        assert kinds[:2] == ["initial", "critique"] and kinds[2:-1] == ["elaborate"] * (n - 3)
    msgs = messages_for("reasoning", mode, n)
    # T1 holds the dataset line, the question and the four lettered choices
    assert "grade-school science exam" in msgs[0]
    assert "Which gas do plants take in?" in msgs[0]
    assert all(f"{letter}) " in msgs[0] for letter in "ABCD")
    assert "The answer is X" in msgs[-1]
    if n >= 2:
        assert "initial thoughts" in msgs[0]
        assert "Question:" not in msgs[-1]
    if n >= 3:
        assert "incorrect" in msgs[1]
        assert ("key concepts" in msgs[1]) is (mode == "standard")
    for m in msgs[2:-1]:
        assert "elaborate on the key concepts" in m
    thinking_tags = all("<thinking></thinking>" in m for m in msgs)
    assert thinking_tags is (mode == "thinking")
    # the scripted teacher never reveals the gold answer
    assert not any("carbon dioxide" in m and "correct" in m.lower() for m in msgs)
    sys = prompts.system_prompt("reasoning", mode)
    assert "The answer is X" in sys and ("<thinking>" in sys) is (mode == "thinking")


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_clarifying_layout(n):
    kinds = prompts.turn_kinds("clarifying", n)
    assert kinds[0] == "ask" and kinds[-1] == "final"
    assert kinds.count("reason") == (1 if n >= 3 else 0)
    msgs = messages_for("clarifying", "thinking", n)
    assert msgs[0].startswith("Question: Which gas")
    assert "A) oxygen\nB) carbon dioxide\nC) helium\nD) neon" in msgs[0]
    assert "Ask me ONE specific question about any ONE of the options." in msgs[0]
    for t in range(2, n + 1):
        # every teacher turn after an "ask" turn starts with the teacher's answer
        assert msgs[t - 1].startswith("Teacher says hi.") is (kinds[t - 2] == "ask")
    # every clarifying turn carries an instruction block with the word limit, split off cleanly
    for m in msgs:
        text, instruction = prompts.split_instruction(m)
        assert instruction is not None and "50-60 words" in instruction
        assert prompts.INSTRUCTION_MARK not in text
    assert "Answer is X" in prompts.split_instruction(msgs[-1])[1]
    assert "Which gas do plants take in?" in prompts.split_instruction(msgs[-1])[1]  # the question is repeated
    if n >= 3:
        assert "Do not ask" in prompts.split_instruction(msgs[-2])[1]
    sys = prompts.system_prompt("clarifying", "thinking")
    assert "curious student" in sys and "lowercase <thinking>" in sys and "Answer is X" in sys


def test_clarifying_needs_the_teacher_reply():
    with pytest.raises(ValueError, match="teacher's answer"):
        prompts.teacher_message(TASK, "clarifying", "thinking", 3, 2, reply=None)


@pytest.mark.parametrize(
    ("setting", "mode", "n"),
    [
        ("clarifying", "standard", 3),
        ("clarifying", "thinking", 1),
        ("reasoning", "thinking", 0),
        ("other", "thinking", 3),
    ],
)
def test_bad_settings(setting, mode, n):
    with pytest.raises(ValueError):
        prompts.check_setting(setting, mode, n)


def test_instruction_round_trip():
    text = prompts.with_instruction("Hello.", "Be brief.")
    assert prompts.split_instruction(text) == ("Hello.", "Be brief.")
    assert prompts.split_instruction("Hello.") == ("Hello.", None)
    assert prompts.with_instruction("Hello.", None) == "Hello."


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("openbookqa", "open-book"),
        ("ARC-Challenge", "grade-school"),
        ("sciq", "science exam"),
        ("mmlu", "professional"),
        ("mathdial", "math"),
        ("cosql", "SQL"),
        ("something", "multiple-choice"),
    ],
)
def test_dataset_line(name, needle):
    assert needle in prompts.dataset_line(name)


def test_judge_and_teacher_requests():
    conv = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": prompts.with_instruction("Q?", "secret instruction")},
        {"role": "assistant", "content": "The answer is B"},
    ]
    judge = prompts.judge_request(TASK, conv)
    assert judge[0]["role"] == "system"
    user = judge[1]["content"]
    for key, _ in prompts.JUDGE_CRITERIA:
        assert f'"{key}"' in user
    assert "Correct answer: B) carbon dioxide" in user
    assert "Assistant: The answer is B" in user
    assert "secret instruction" not in user and "sys" not in user.split("Conversation:")[1]
    teacher = prompts.teacher_request(TASK, "What is option C?\n\n[Instructions for your reply: x]")
    assert "never" in teacher[0]["content"].lower()
    assert 'The student asks: "What is option C?"' in teacher[1]["content"]
    assert "Background notes" in teacher[1]["content"]
    hidden = prompts.teacher_request(TASK, "What is C?", show_gold=False, show_knowledge=False)[1]["content"]
    assert "Correct answer" not in hidden and "Background" not in hidden
    gp = prompts.gold_prob_request(TASK, conv)
    assert gp[-1]["role"] == "user" and "Student: The answer is B" in gp[-1]["content"]


def test_format_choices_needs_four():
    with pytest.raises(ValueError, match="4 choices"):
        prompts.format_choices(["a", "b"])
