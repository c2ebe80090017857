"""Adaptive-length conversations: early-answer detection, prompts, rollouts that stop early (a scripted engine forces
the agent's replies), the γ^n discount on hand-computed numbers, the clarifying-turns metric and report column,
``clarify simulate/evaluate --adaptive true``, and every data view + tokenization on groups of mixed length."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from clarify_lit.data.records import ConversationRecord, load_records, write_records
from clarify_lit.data.tasks import QATask
from clarify_lit.evaluate.metrics import compute_metrics
from clarify_lit.simulate import prompts
from clarify_lit.simulate.engine import Generation
from clarify_lit.simulate.parsing import early_answer, parse_answer_letter
from clarify_lit.simulate.rollout import RolloutSpec, rollout_tasks
from clarify_lit.simulate.teachers import ScriptedTeacher

REPO = Path(__file__).resolve().parents[1]
TASK = QATask(
    "sciq/1",
    "sciq",
    "What do plants need to make food?",
    ["sunlight", "sand", "salt", "smoke"],
    "A",
    knowledge="Plants make food by photosynthesis, which uses light energy.",
)
TASK2 = QATask("sciq/2", "sciq", "Which is a source of heat?", ["ice", "fire", "snow", "rain"], "B")


# ------------------------------------------------------------------------------------------------ the parser
@pytest.mark.parametrize(
    "text, letter",
    [
        ("The answer is A. Plants use light.", "A"),
        ("Answer is C <thinking>because of light</thinking>", "C"),
        ("I am fairly sure now. The answer is D", "D"),
        ("answer: b", "B"),
        ("Is the answer B?", None),  # a question does not answer
        ("Is the answer B or C? Tell me more.", None),
        ("<thinking>the answer is A</thinking> Is option A about light?", None),  # thinking is not a commitment
        ("What does option B mean for the plant?", None),  # marked letters never end a conversation
        ("(B) sounds odd, why?", None),
        ("B) sunlight", None),
        ("The answer is a bit unclear to me.", None),
    ],
)
def test_early_answer(text, letter):
    assert early_answer(text) == letter
    if letter is not None:  # the reward's parser reads the same letter from the turn that ended the conversation
        assert parse_answer_letter(text) == letter


# ------------------------------------------------------------------------------------------------ prompts
def test_adaptive_prompts_offer_an_early_answer():
    assert "ends the conversation" in prompts.system_prompt("reasoning", "thinking", adaptive=True)
    assert "ends the conversation" in prompts.system_prompt("clarifying", "thinking", adaptive=True)
    assert prompts.system_prompt("reasoning", "thinking") == prompts.reasoning_system_prompt("thinking")
    for setting, mode in (("reasoning", "thinking"), ("reasoning", "standard"), ("clarifying", "thinking")):
        for turn in (1, 2, 3):
            reply = "It uses light." if prompts.needs_teacher_reply(setting, 3, turn) else None
            plain = prompts.teacher_message(TASK, setting, mode, 3, turn, reply=reply)
            adaptive = prompts.teacher_message(TASK, setting, mode, 3, turn, reply=reply, adaptive=True)
            text, instruction = prompts.split_instruction(adaptive)
            assert text == prompts.split_instruction(plain)[0]  # judges see the same teacher text
            if turn == 3:  # the last turn asks for the answer anyway
                assert adaptive == plain
            else:
                assert "final answer" in instruction and (
                    "'The answer is X'" in instruction or "'Answer is X'" in instruction
                )
                assert "Do not answer" not in instruction  # the ask instruction no longer forbids answering


# ------------------------------------------------------------------------------------------------ rollouts
class ScriptedEngine:
    """Stands in for GenerationEngine: reply ``script[temperature][k]`` at the k-th assistant turn."""

    def __init__(self, script: dict[float, list[str]]):
        self.script = script
        self.calls: list[int] = []

    def generate(self, conversations, temperatures, *, seed, max_new_tokens=None):
        self.calls.append(len(conversations))
        out = []
        for conv, t in zip(conversations, temperatures, strict=True):
            k = sum(m["role"] == "assistant" for m in conv)
            out.append(Generation(text=self.script[float(t)][k], n_tokens=5, truncated=False))
        return out


SCRIPT = {  # gold is A for TASK
    0.0: ["The answer is A. Plants use light.", "unused", "unused"],  # ends at turn 1
    0.5: ["Is the answer A? What does sand do?", "Answer: A <thinking>light</thinking>", "unused"],  # turn 2
    1.0: ["Maybe (B)?", "Hmm, option C is odd.", "The answer is A."],  # runs to turn 3
}


class CountingTeacher(ScriptedTeacher):
    def __init__(self):
        self.sizes: list[int] = []

    def reply(self, tasks, conversations, *, seed=0):
        self.sizes.append(len(conversations))
        return super().reply(tasks, conversations, seed=seed)


def test_adaptive_rollout_stops_early_and_discounts(tmp_path):
    engine = ScriptedEngine(SCRIPT)
    records = rollout_tasks(
        None,
        None,
        [TASK],
        RolloutSpec(setting="reasoning", temperatures=[0.0, 0.5, 1.0], adaptive=True, discount=0.9),
        engine=engine,
        model_name="scripted",
    )
    assert engine.calls == [3, 2, 1]  # finished conversations are not advanced
    turns = [sum(m["role"] == "assistant" for m in r.messages) for r in records]
    assert turns == [1, 2, 3]
    assert [r.meta["turns_used"] for r in records] == [1, 2, 3]
    assert [r.meta["ended_early"] for r in records] == [True, True, False]
    assert all(r.meta["adaptive"] and r.meta["discount"] == 0.9 and r.meta["n_turns"] == 3 for r in records)
    assert all(r.messages[-1]["role"] == "assistant" for r in records)
    assert [r.prediction for r in records] == ["A", "A", "A"]
    # every base reward is 1 (correct); r = γ^n · 1 with n = assistant turns used
    assert [r.reward_components["undiscounted_reward"] for r in records] == [1.0, 1.0, 1.0]
    assert [r.reward for r in records] == pytest.approx([0.9, 0.81, 0.729])
    assert "ends the conversation" in records[0].messages[0]["content"]
    loaded, _ = load_records(write_records(tmp_path / "r.jsonl", records))  # valid records (end on assistant)
    assert [r.reward for r in loaded] == pytest.approx([0.9, 0.81, 0.729])

    # the metric: clarifying turns 0, 1, 2 → mean 1, SE = sd/√3 = 1/√3; two of three ended early
    m = compute_metrics(loaded)
    assert m["clarifying_turns"] == pytest.approx(1.0)
    assert m["clarifying_turns_se"] == pytest.approx(1 / math.sqrt(3))
    assert m["ended_early_rate"] == pytest.approx(2 / 3)
    assert m["ended_early_rate_se"] == pytest.approx(math.sqrt(2 / 3 * 1 / 3 / 3))
    assert m["reward"] == pytest.approx((0.9 + 0.81 + 0.729) / 3)
    assert m["accuracy"] == 1.0  # accuracy is never discounted


def test_discount_on_a_wrong_answer_and_fixed_length():
    wrong = {0.0: ["The answer is B.", "x", "x"]}
    (rec,) = rollout_tasks(
        None, None, [TASK], RolloutSpec(temperatures=[0.0], adaptive=True, discount=0.5), engine=ScriptedEngine(wrong)
    )
    assert rec.reward == 0.0 and rec.reward_components["undiscounted_reward"] == 0.0 and rec.meta["turns_used"] == 1
    # not adaptive: an early answer does not stop the conversation; γ^n is the same factor for every record
    answers = {0.0: ["The answer is A.", "More on light.", "The answer is A."]}
    (rec,) = rollout_tasks(
        None, None, [TASK], RolloutSpec(temperatures=[0.0], discount=0.5), engine=ScriptedEngine(answers)
    )
    assert rec.meta["turns_used"] == 3 and not rec.meta["ended_early"] and not rec.meta["adaptive"]
    assert rec.reward == pytest.approx(0.125)  # 0.5^3 · 1
    assert "clarifying_turns" not in compute_metrics([rec])  # the length metrics are for adaptive runs


def test_default_records_are_unchanged():
    (rec,) = rollout_tasks(None, None, [TASK], RolloutSpec(temperatures=[0.5]), engine=ScriptedEngine(SCRIPT))
    assert set(rec.meta) == {
        "setting",
        "mode",
        "n_turns",
        "model",
        "teacher",
        "reward",
        "seed",
        "max_new_tokens",
        "empty_turns",
        "truncated_turns",
        "reward_missing",
        "question_prompt",
        "question_hash",  # issue 17: what clarify report checks before pairing questions
        "echoed_instructions",
    }  # issue 30: measured on every record (reasoning: no teacher_leak)
    assert "undiscounted_reward" not in rec.reward_components


@pytest.mark.parametrize("discount", [0, -0.5, 1.5, float("nan"), True])
def test_discount_must_be_in_unit_interval(discount):
    with pytest.raises(ValueError, match="discount"):
        rollout_tasks(
            None, None, [TASK], RolloutSpec(temperatures=[0.0], discount=discount), engine=ScriptedEngine(SCRIPT)
        )


def test_clarifying_teacher_answers_only_running_conversations():
    script = {
        0.0: ["Answer is A <thinking>light</thinking>", "x", "x", "x"],
        1.0: ["Which option uses light?", "Is it about (A)?", "<thinking>light</thinking> hmm", "Answer is A"],
    }
    teacher = CountingTeacher()
    spec = RolloutSpec(setting="clarifying", n_turns=4, temperatures=[0.0, 1.0], adaptive=True)
    records = rollout_tasks(None, None, [TASK, TASK2], spec, engine=ScriptedEngine(script), teacher=teacher)
    assert teacher.sizes == [2, 2]  # teacher turns 2 and 3 follow "ask" turns, for the 2 conversations still going
    assert [r.meta["turns_used"] for r in records] == [1, 4, 1, 4]
    assert [r.reward for r in records] == [1.0, 1.0, 0.0, 0.0]  # TASK2's gold is B; discount 1 = off
    assert "Answer is X" in records[1].messages[1]["content"]  # T1's ask instruction offers the answer


# ------------------------------------------------------------------------------------------------ commands
@pytest.fixture
def scripted_engine(monkeypatch):
    """Every GenerationEngine the commands build is a ScriptedEngine (the tiny model never answers early)."""
    script = {t: ["The answer is A.", "Is it (B)?", "The answer is A."] for t in (0.0, 0.3, 0.7, 1.0)}
    script[0.7] = ["Is option B right?", "Hmm.", "The answer is A."]

    def make(*args, **kwargs):
        engine = ScriptedEngine(script)
        engine.stats = type("S", (), {"new_tokens": 0})()
        return engine

    import clarify_lit.simulate.rollout as rollout_mod

    monkeypatch.setattr(rollout_mod, "GenerationEngine", make)  # what build_engine makes, for every command


def test_simulate_and_evaluate_commands(tmp_path, clarify_cache, scripted_engine, capsys):
    from clarify_lit.evaluate.command import main as evaluate_main
    from clarify_lit.evaluate.report import run_report
    from clarify_lit.simulate.command import main as simulate_main

    out = tmp_path / "sim"
    simulate_main(
        [
            "--config",
            str(REPO / "configs/simulate/tiny-reasoning.yaml"),
            "--data.path",
            str(REPO / "configs/simulate/tiny-tasks.jsonl"),
            "--data.limit",
            "2",
            "--output",
            str(out),
            "--progress",
            "false",
            "--rollout.temperatures",
            "[0.3, 0.7]",
            "--rollout.adaptive",
            "true",
            "--rollout.discount",
            "0.9",
        ]
    )
    records, _ = load_records(out / "conversations.jsonl")
    assert [r.meta["turns_used"] for r in records] == [1, 3, 1, 3]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ended_early"] == 2 and summary["mean_turns_used"] == 2.0
    fingerprint = json.loads((out / "run_config.json").read_text())["config"]
    assert fingerprint["adaptive"] is True and fingerprint["discount"] == 0.9

    ev = tmp_path / "eval"
    evaluate_main(
        [
            "--model",
            "tiny-random",
            "--out_dir",
            str(ev),
            "--rollout.adaptive",
            "true",
            "--rollout.discount",
            "0.9",
            "--data.dataset",
            "local",
            "--data.path",
            str(REPO / "configs/simulate/tiny-tasks.jsonl"),
            "--data.columns",
            '{"question": "question", "choices": "choices", "answer": "answer", "id": "id"}',
            "--data.n_train",
            "4",
            "--data.n_test",
            "2",
            "--rollout.max_new_tokens",
            "3",
            "--progress",
            "false",
        ]
    )
    saved = json.loads((ev / "metrics.json").read_text())
    assert saved["meta"]["adaptive"] is True and saved["meta"]["discount"] == 0.9
    m = saved["metrics"]
    assert m["clarifying_turns"] == 0.0 and m["ended_early_rate"] == 1.0 and m["n_adaptive"] == 2
    golds = [r.gold for r in load_records(ev / "rollouts.jsonl")[0]]
    assert m["reward"] == pytest.approx(0.9 * sum(g == "A" for g in golds) / 2)
    text = run_report([str(ev)], out=tmp_path / "report.md")
    assert "Clarifying turns" in text and "Ended early" in text
    assert "| 0.00 ± 0.00 |" in text


def test_evaluate_rejects_a_bad_discount_before_loading(tmp_path):
    from clarify_lit.evaluate.command import EvaluateConfig, run
    from clarify_lit.simulate.options import RolloutOptions

    with pytest.raises(ValueError, match="discount"):
        run(EvaluateConfig(model="tiny-random", out_dir=str(tmp_path), rollout=RolloutOptions(discount=2.0)))


# ------------------------------------------------------------------------------------------------ training views
def _record(task: int, run: int, n_turns: int, reward: float) -> ConversationRecord:
    msgs = [{"role": "system", "content": "You are an expert."}]
    for k in range(n_turns):
        msgs.append({"role": "user", "content": f"Question {task}: which option?" if k == 0 else "Go on."})
        last = k == n_turns - 1
        msgs.append(
            {
                "role": "assistant",
                "content": f"The answer is {'ABCD'[run]}." if last else f"Is it about energy {run}{' and plants' * k}?",
            }
        )
    return ConversationRecord(
        id=f"t{task}#run{run}",
        task_id=f"t{task}",
        messages=msgs,
        reward=reward,
        gold="A",
        run=run,
        meta={
            "adaptive": True,
            "n_turns": 3,
            "turns_used": n_turns,
            "ended_early": n_turns < 3,
            "question_prompt": f"Question {task}: which option?",
        },
    )


def test_views_and_tokenization_on_mixed_length_groups(tokenizer, tmp_path, clarify_cache, tiny_model_dir):
    from clarify_lit.data.datamodule import ConversationDataModule
    from clarify_lit.data.tokenization import IGNORE_INDEX, tokenize_conversation
    from clarify_lit.data.views import PairExample
    from clarify_lit.train.objectives import DPO, SFT, Refit, Swift

    # one question, three runs of 1, 2 and 3 assistant turns (γ = 0.9 already applied), and a second question
    records = [
        _record(0, 0, 1, 0.9),
        _record(0, 1, 2, 0.0),
        _record(0, 2, 3, 0.729),
        _record(1, 0, 3, 0.0),
        _record(1, 1, 1, 0.9),
        _record(1, 2, 2, 0.81),
    ]
    turns = {r.id: r.meta["turns_used"] for r in records}

    def spans(labels: list[int]) -> int:  # trained assistant turns = runs of non-ignored labels
        return sum(1 for a, b in zip([IGNORE_INDEX, *labels], labels) if a == IGNORE_INDEX and b != IGNORE_INDEX)

    for objective in (Refit(), Swift(), SFT(), DPO(pairs="conversation"), DPO(pairs="final_answer")):
        examples, stats = objective.build_view(records)
        assert examples, type(objective).__name__
        for e in examples:
            if isinstance(e, PairExample):
                for side in (e.chosen, e.rejected):
                    sample = tokenize_conversation(tokenizer, side, only_last_assistant=e.only_last_assistant)
                    want = 1 if e.only_last_assistant else sum(m["role"] == "assistant" for m in side)
                    assert spans(sample.labels) == want
            else:
                sample = tokenize_conversation(tokenizer, e.messages)
                assert spans(sample.labels) == turns[e.id]
    swift, _ = Swift().build_view(records)
    by_id = {e.id: e.weight for e in swift}
    assert by_id["t0#run0"] > by_id["t0#run2"] > by_id["t0#run1"]  # standardized over the mixed-length group
    dpo, _ = DPO(pairs="conversation").build_view(records)
    assert [(len(p.chosen), len(p.rejected)) for p in dpo] == [(3, 5), (3, 7)]  # chosen: the early answers

    # the DataModule pads the mixed lengths into one batch
    path = write_records(tmp_path / "mixed.jsonl", records)
    dm = ConversationDataModule(
        train_files=[str(path)],
        tokenizer_name_or_path=str(tiny_model_dir),
        objective=Refit(),
        batch_size=6,
        val_fraction=0,
        cache_tokenized=False,
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 6 and batch["labels"].shape == batch["input_ids"].shape
    assert sorted(batch["weights"].tolist()) == pytest.approx(sorted(r.reward for r in records))
