"""Objectives' data views: Refit/Swift/SFT weights and DPO pairs on hand-picked rewards."""

from __future__ import annotations

import math

import pytest
from conftest import make_record

from clarify_lit.data.records import ConversationRecord
from clarify_lit.data.views import ObjectiveDataError, PairExample, WeightedExample, check_finite_weights
from clarify_lit.train.objectives import DPO, SFT, Refit, Swift

S2 = math.sqrt(2)


def recs(rewards: dict[int, list[float]]) -> list[ConversationRecord]:
    out = []
    for t, rs in rewards.items():
        for r, reward in enumerate(rs):
            rec = ConversationRecord(**make_record(t, r, reward))
            rec.source = f"recs.jsonl:line {len(out) + 1}"
            out.append(rec)
    return out


def by_id(examples) -> dict[str, float]:
    return {e.id: e.weight for e in examples}


# ------------------------------------------------------------------------------------------------ Refit
def test_refit_weight_is_the_reward():
    records = recs({0: [1.0, 0.0, 0.5], 1: [0.25, 2.0, 0.0]})
    examples, stats = Refit().build_view(records)
    assert all(isinstance(e, WeightedExample) for e in examples)
    assert by_id(examples) == {r.id: r.reward for r in records}
    assert [e.messages for e in examples] == [r.messages for r in records]
    assert examples[0].where == "recs.jsonl:line 1 (id='t0-r0')"
    assert (stats.records, stats.examples, stats.tasks) == (6, 6, 2)


def test_refit_refuses_negative_rewards_naming_the_record():
    records = recs({0: [1.0, 0.0], 1: [0.5, -0.5]})
    with pytest.raises(ObjectiveDataError) as e:
        Refit().build_view(records)
    msg = str(e.value)
    assert "'t1-r1'" in msg and "'t1'" in msg and "'reward'" in msg and "-0.5" in msg and "Swift" in msg


# ------------------------------------------------------------------------------------------------ Swift
def test_swift_weights_hand_computed():
    records = recs({0: [1.0, 0.0, 0.0], 1: [0.0, 2.0, 2.0], 2: [3.0, 1.0]})
    examples, stats = Swift().build_view(records)
    w = by_id(examples)
    assert [w["t0-r0"], w["t0-r1"], w["t0-r2"]] == pytest.approx([S2, -1 / S2, -1 / S2], rel=1e-12)
    assert [w["t1-r0"], w["t1-r1"], w["t1-r2"]] == pytest.approx([-S2, 1 / S2, 1 / S2], rel=1e-12)
    assert [w["t2-r0"], w["t2-r1"]] == pytest.approx([1.0, -1.0], rel=1e-12)  # mean 2, population std 1
    # shifting or scaling all of a task's rewards leaves its weights unchanged
    shifted = by_id(Swift().build_view(recs({0: [11.0, 10.0, 10.0], 1: [5.0, 15.0, 15.0], 2: [3.0, 1.0]}))[0])
    assert [shifted[k] for k in sorted(w)] == pytest.approx([w[k] for k in sorted(w)], rel=1e-9)
    assert (stats.examples, stats.tasks, stats.excluded["zero_std_groups"]) == (8, 3, 0)


def test_swift_zero_spread_drop():
    records = recs({0: [1.0, 0.0, 0.0], 1: [1.0, 1.0, 1.0], 2: [0.0, 0.0, 0.0]})
    examples, stats = Swift(zero_std="drop").build_view(records)
    assert {e.task_id for e in examples} == {"t0"} and len(examples) == 3
    assert stats.excluded["zero_std_groups"] == 2 and stats.examples == 3 and stats.records == 9
    assert "zero_std_groups: 2" in stats.line("Swift")


def test_swift_zero_spread_epsilon_keeps_weight_zero():
    records = recs({0: [1.0, 0.0, 0.0], 1: [1.0, 1.0, 1.0]})
    examples, stats = Swift(zero_std="epsilon", epsilon=1e-3).build_view(records)
    w = by_id(examples)
    assert len(examples) == 6 and stats.excluded["zero_std_groups"] == 1
    assert [w["t1-r0"], w["t1-r1"], w["t1-r2"]] == [0.0, 0.0, 0.0]
    std = math.sqrt(2 / 9)
    assert w["t0-r0"] == pytest.approx((2 / 3) / (std + 1e-3), rel=1e-12)  # every group divides by std + ε
    assert w["t0-r1"] == pytest.approx((-1 / 3) / (std + 1e-3), rel=1e-12)


def test_swift_nothing_to_learn_and_single_run():
    with pytest.raises(ObjectiveDataError, match="zero reward spread"):
        Swift().build_view(recs({0: [1.0, 1.0], 1: [0.0, 0.0]}))
    with pytest.raises(ObjectiveDataError) as e:
        Swift().build_view(recs({0: [1.0, 0.0], 1: [0.5]}))
    assert "'t1'" in str(e.value) and "'t1-r0'" in str(e.value) and "single run" in str(e.value)


def test_swift_min_weight_clamp():
    examples, _ = Swift(min_weight=-0.5).build_view(recs({0: [1.0, 0.0, 0.0]}))
    assert [e.weight for e in examples] == pytest.approx([S2, -0.5, -0.5])
    examples, _ = Swift(min_weight=0.0).build_view(recs({0: [0.0, 1.0, 1.0]}))
    assert [e.weight for e in examples] == pytest.approx([0.0, 1 / S2, 1 / S2])


def test_swift_min_std_threshold():
    # a spread below min_std counts as zero spread
    records = recs({0: [1.0, 0.0], 1: [0.5, 0.5 + 1e-9]})
    examples, stats = Swift(min_std=1e-6).build_view(records)
    assert {e.task_id for e in examples} == {"t0"} and stats.excluded["zero_std_groups"] == 1


# ------------------------------------------------------------------------------------------------ SFT
def test_sft_top_k_weight_one():
    records = recs({0: [0.0, 1.0, 0.5], 1: [0.25, 0.25, 0.75]})
    examples, stats = SFT(top_k=1).build_view(records)
    assert [e.id for e in examples] == ["t0-r1", "t1-r2"] and all(e.weight == 1.0 for e in examples)
    assert stats.excluded == {"below_min_reward": 0, "not_top_k": 4}
    examples, _ = SFT(top_k=2).build_view(records)
    assert [e.id for e in examples] == ["t0-r1", "t0-r2", "t1-r2", "t1-r0"]  # ties broken by run order
    examples, _ = SFT(top_k=5).build_view(records)
    assert len(examples) == 6
    with pytest.raises(ValueError, match="top_k"):
        SFT(top_k=0)


def test_sft_min_reward():
    records = recs({0: [0.0, 1.0, 1.0], 1: [0.25, 0.5, 0.75], 2: [1.0, 0.0]})
    examples, stats = SFT(top_k=2, min_reward=1.0).build_view(records)
    assert [e.id for e in examples] == ["t0-r1", "t0-r2", "t2-r0"]
    assert stats.excluded["below_min_reward"] == 3  # t1's two best and t2's second best
    assert stats.excluded["not_top_k"] == 2
    with pytest.raises(ObjectiveDataError, match="min_reward"):
        SFT(min_reward=2.0).build_view(records)


# ------------------------------------------------------------------------------------------------ DPO
def test_dpo_chosen_best_rejected_worst():
    records = recs({0: [0.5, 1.0, 0.0], 1: [0.25, 0.75, 0.5]})
    examples, stats = DPO().build_view(records)
    assert all(isinstance(e, PairExample) for e in examples) and len(examples) == 2
    idx = {r.id: r for r in records}
    p0, p1 = examples
    assert (p0.id, p0.task_id) == ("t0#dpo", "t0")
    assert p0.chosen == idx["t0-r1"].messages and p0.rejected == idx["t0-r2"].messages
    assert p1.chosen == idx["t1-r1"].messages and p1.rejected == idx["t1-r0"].messages
    assert not p0.only_last_assistant and "t0-r1" in p0.where
    assert stats.excluded["gap_below_min"] == 0 and DPO.kind == "pairwise"


def test_dpo_min_gap_filter_and_no_pairs():
    records = recs({0: [1.0, 0.0], 1: [0.5, 0.3], 2: [0.4, 0.4]})
    examples, stats = DPO(min_gap=0.5).build_view(records)
    assert [e.task_id for e in examples] == ["t0"] and stats.excluded["gap_below_min"] == 2
    examples, stats = DPO().build_view(records)  # the default gap only drops ties
    assert [e.task_id for e in examples] == ["t0", "t1"] and stats.excluded["gap_below_min"] == 1
    with pytest.raises(ObjectiveDataError, match="no task has a reward gap"):
        DPO(min_gap=2.0).build_view(records)
    with pytest.raises(ValueError, match="min_gap"):
        DPO(min_gap=0.0)


def test_dpo_final_answer_pairs():
    records = recs({0: [0.0, 1.0, 0.5]})
    (pair,), _ = DPO(pairs="final_answer").build_view(records)
    best, worst = records[1], records[0]
    assert pair.only_last_assistant
    question = {"role": "user", "content": best.meta["question_prompt"]}
    assert pair.chosen == [best.messages[0], question, best.messages[-1]]
    assert pair.rejected == [worst.messages[0], question, worst.messages[-1]]
    assert [m["role"] for m in pair.chosen] == ["system", "user", "assistant"]
    assert pair.chosen[-1]["content"] != pair.rejected[-1]["content"]
    # without meta.question_prompt the first teacher turn's question block is the question — never the whole turn
    for r in records:
        r.meta = {}
    with pytest.raises(ObjectiveDataError, match=r"t0-r1.*meta.question_prompt"):
        DPO(pairs="final_answer").build_view(records)  # make_messages' teacher turns hold no lettered question


CLARIFY_T1 = (
    "Question: Which gas do plants take in?\nA) oxygen\nB) carbon dioxide\nC) helium\nD) neon\n\nAsk me "
    "ONE specific question about one option. Do not answer yet.\n\n[Instructions for your reply: one "
    "question]"
)


def test_dpo_final_answer_prompt_is_the_question_alone():
    """The pair's prompt is exactly the question and options: no turn instruction (issue "Honest numbers")."""
    records = recs({0: [0.0, 1.0]})
    for r in records:
        r.messages[1] = {"role": "user", "content": CLARIFY_T1}
    # as the simulator writes it now
    for r in records:
        r.meta = {
            "question_prompt": "Question: Which gas do plants take in?\nA) oxygen\nB) carbon dioxide\n"
            "C) helium\nD) neon"
        }
    (pair,), _ = DPO(pairs="final_answer").build_view(records)
    assert pair.chosen[1]["content"] == records[1].meta["question_prompt"]
    # old records: rebuilt from meta.question/choices ...
    for r in records:
        r.meta = {"question": "Which gas do plants take in?", "choices": ["oxygen", "carbon dioxide", "helium", "neon"]}
    (pair2,), _ = DPO(pairs="final_answer").build_view(records)
    assert pair2.chosen[1]["content"] == pair.chosen[1]["content"]
    # ... or cut out of the first teacher turn, without its instruction
    for r in records:
        r.meta = {}
    (pair3,), _ = DPO(pairs="final_answer").build_view(records)
    assert pair3.chosen[1]["content"] == pair.chosen[1]["content"]
    assert "Ask me" not in pair3.chosen[1]["content"] and "Instructions" not in pair3.rejected[1]["content"]


def test_views_carry_the_cut_turns():
    records = recs({0: [0.0, 1.0]})
    records[0].meta["truncated_turns"] = [1, 3]  # make_messages has 3 assistant turns
    records[1].meta["truncated_turns"] = 2  # an old record: a count only, positions unknown
    ex, _ = Refit().build_view(records)
    assert [e.cut_turns for e in ex] == [(1, 3), ()]
    (pair,), _ = DPO().build_view(records)
    assert pair.chosen_cut_turns == () and pair.rejected_cut_turns == (1, 3)
    (fpair,), _ = DPO(pairs="final_answer").build_view(records)
    assert fpair.rejected_cut_turns == (1,)  # the rejected run's final turn (3) was cut; it is turn 1 of the pair


def test_check_finite_weights():
    check_finite_weights([WeightedExample("a", "t", [], 1.0)])
    with pytest.raises(ObjectiveDataError, match="'b'"):
        check_finite_weights([WeightedExample("a", "t", [], 1.0), WeightedExample("b", "t", [], float("nan"))])
