"""Teacher leaks and instruction echoes (simulate/leaks.py, data/echoes.py): what counts, the per-record flags a
rollout writes, the counts in simulate's summary and in metrics/report, and the echoed block masked in training."""

from __future__ import annotations

import pytest
from fake_endpoint import FakeEndpoint, completion

from clarify_lit.data.echoes import INSTRUCTION_MARK, echo_spans, echoed_turns
from clarify_lit.data.records import ConversationRecord
from clarify_lit.data.tasks import QATask
from clarify_lit.data.tokenization import IGNORE_INDEX, tokenize_conversation
from clarify_lit.evaluate.metrics import compute_metrics
from clarify_lit.evaluate.report import COLUMNS, table_columns
from clarify_lit.evaluate.summary import MethodSummary
from clarify_lit.simulate import prompts
from clarify_lit.simulate.command import summarize
from clarify_lit.simulate.endpoint_policy import EndpointPolicyEngine
from clarify_lit.simulate.leaks import count_flags, leaked_turns, record_flags
from clarify_lit.simulate.rollout import RolloutSpec, rollout_tasks
from clarify_lit.simulate.teachers import ChatBackend, EndpointChatBackend, LLMTeacher

SEAFLOOR = QATask(
    "sciq/7",
    "sciq",
    "Where does new oceanic crust form?",
    ["rivers", "seafloor", "mountains", "deserts"],
    "B",
    knowledge="New crust forms at mid-ocean ridges on the seafloor.",
)
PLANTS = QATask("sciq/1", "sciq", "What do plants need to make food?", ["sunlight", "sand", "salt", "smoke"], "A")


def clarifying(teacher_reply: str, task: QATask = SEAFLOOR) -> list[dict[str, str]]:
    """A 2-turn clarifying conversation whose teacher answered the student's question with ``teacher_reply``."""
    return [
        {"role": "system", "content": prompts.system_prompt("clarifying", "thinking")},
        {"role": "user", "content": prompts.teacher_message(task, "clarifying", "thinking", 2, 1)},
        {"role": "assistant", "content": "What does option B mean?"},
        {"role": "user", "content": prompts.teacher_message(task, "clarifying", "thinking", 2, 2, reply=teacher_reply)},
        {"role": "assistant", "content": "Answer is B"},
    ]


@pytest.mark.parametrize(
    ("reply", "leak"),
    [
        ('The answer is "B) seafloor".', True),  # what the served SmolLM2 teacher said (issue 30)
        ("Good question! Seafloor is the correct answer.", True),
        ("The correct answer is the seafloor.", True),
        ("B is correct.", True),
        ("You should pick B.", True),
        ("Rivers carry sediment; the correct option is B.", True),
        ("The seafloor is where plates spread apart, so new crust forms there.", False),  # the gold word, no verdict
        ("Option B refers to the seafloor, the bottom of the ocean.", False),  # a letter named to explain it
        ("The answer is not B.", False),
        ("The seafloor is not the correct answer.", False),
        ("A is correct.", False),  # a verdict on another option: wrong, but no leak of the gold
        ("The answer to your question is that seafloor spreading makes crust.", False),  # the student's question
    ],
)
def test_what_counts_as_a_teacher_leak(reply, leak):
    assert bool(leaked_turns(SEAFLOOR, clarifying(reply))) is leak


def test_the_question_turn_and_the_fixed_requests_are_not_the_teachers_words():
    # turn 1 holds the options and the final request says "Answer is X": neither is the teacher speaking
    conv = clarifying("Think about where plates move apart.")
    assert leaked_turns(SEAFLOOR, conv) == [] and "Answer is X" in conv[3]["content"]
    assert record_flags(SEAFLOOR, conv, "clarifying") == {"teacher_leak": False, "echoed_instructions": []}
    assert record_flags(SEAFLOOR, conv, "reasoning") == {"echoed_instructions": []}  # scripted teacher: no check


def test_what_counts_as_an_instruction_echo():
    ask = prompts.ASK_INSTRUCTION
    echo = f"{INSTRUCTION_MARK} Ask a question that helps you.] What does option B mean?"
    (span,) = echo_spans(echo, ask)
    assert echo[slice(*span)] == f"{INSTRUCTION_MARK} Ask a question that helps you.]"
    unclosed = "What is B? [Instructions for your reply: " + ask
    assert [unclosed[a:b] for a, b in echo_spans(unclosed, ask)] == [unclosed[11:]]
    copied = ask.split(". Do not")[0] + ". What is B?"  # 11 instruction words copied without the marker
    assert [copied[a:b] for a, b in echo_spans(copied, ask)] == [
        "Ask ONE short, specific question about ONE of the options."
    ]
    assert echo_spans("What does option B mean? Ask one question.", ask) == []  # a few shared words: no echo
    final = prompts.final_clarify_instruction(SEAFLOOR)
    restated = "Where does new oceanic crust form? A) rivers B) seafloor C) mountains D) deserts. Answer is B"
    assert echo_spans(restated, final, visible=prompts.format_question(SEAFLOOR)) == []  # the question restated


class EchoingPolicy(FakeEndpoint):
    """A policy server whose first reply copies the instruction block, as the served SmolLM2 did (issue 30)."""

    def respond(self, handler, body, index):
        last = body["messages"][-1]["content"]
        _, instruction = prompts.split_instruction(last)
        text = (
            f"{INSTRUCTION_MARK} {instruction}] What does option B mean?"
            if "Question:" in last
            else "Answer is B <thinking>new crust forms on the seafloor</thinking>"
        )
        handler.send(200, completion(text))


class LeakyTeacher(ChatBackend):
    name = "leaky"

    def chat(self, requests, *, temperature=0.0, max_new_tokens=128, seed=0):
        return [
            'The answer is "B) seafloor".' if "seafloor" in r[-1]["content"] else "Plants use light energy."
            for r in requests
        ]


def test_a_rollout_flags_both_and_the_summary_metrics_and_report_count_them(tmp_path):
    with EchoingPolicy() as server:
        engine = EndpointPolicyEngine(EndpointChatBackend(server.url, "policy", concurrency=1), max_new_tokens=32)
        records = rollout_tasks(
            None,
            None,
            [SEAFLOOR, PLANTS],
            RolloutSpec(setting="clarifying", mode="thinking", n_turns=2, temperatures=[0.0]),
            teacher=LLMTeacher(LeakyTeacher()),
            engine=engine,
            model_name="served",
        )
    flags = {r.task_id: (r.meta["teacher_leak"], r.meta["echoed_instructions"]) for r in records}
    assert flags == {"sciq/7": (True, [1]), "sciq/1": (False, [1])}
    assert count_flags([r.meta for r in records]) == {"teacher_leaks": 1, "echoed_instructions": 2}
    metrics = compute_metrics(records)
    assert metrics["teacher_leak_rate"] == 0.5 and metrics["echoed_instructions_rate"] == 1.0
    old = ConversationRecord(
        id="x#run0", task_id="x", messages=records[0].messages, reward=0.0, gold="B", meta={"setting": "clarifying"}
    )
    assert "teacher_leak_rate" not in compute_metrics([old])  # made before the flags: no rate, not a false 0
    shown = [MethodSummary("m", [], {"teacher_leak_rate": 0.5, "echoed_instructions_rate": 0.0})]
    assert table_columns(shown) == ["teacher_leak_rate"] and COLUMNS["teacher_leak_rate"][0] == "Teacher leaks"
    summary = summarize(records, timing={}, cfg=_cfg(), n_tasks=2, shards_total=1, shards_resumed=0, extra={})
    assert summary["teacher_leaks"] == 1 and summary["echoed_instructions"] == 2


def _cfg():
    from clarify_lit.simulate.command import SimulateConfig
    from clarify_lit.simulate.options import RolloutOptions

    return SimulateConfig(rollout=RolloutOptions(setting="clarifying", temperatures=[0.0]))


def test_the_echoed_block_is_never_trained_on(tokenizer):
    block = f"{INSTRUCTION_MARK} {prompts.ASK_INSTRUCTION}]"
    conv = clarifying("Think about where plates move apart.")
    conv[2] = {"role": "assistant", "content": f"{block} What does option B mean?"}
    assert echoed_turns(conv) == [1]
    sample = tokenize_conversation(tokenizer, conv)
    trained = tokenizer.decode([t for t, lab in zip(sample.input_ids, sample.labels) if lab != IGNORE_INDEX])
    assert "Instructions for your reply" not in trained and "Ask ONE short" not in trained
    assert "What does option B mean?" in trained and "Answer is B" in trained
    clean = clarifying("Think about where plates move apart.")
    plain = tokenize_conversation(tokenizer, clean)
    assert sample.echo_masked > 0 and plain.echo_masked == 0
