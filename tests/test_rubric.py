"""The offline rubric reward (clarifying setting): hand-computed scores, and the trivial policies that must earn 0."""

from __future__ import annotations

import pytest

from clarify_lit.data.tasks import QATask
from clarify_lit.simulate import prompts
from clarify_lit.simulate.rubric import RubricReward, asks_one_question, rubric_components

TASK = QATask("t/1", "sciq", "Which gas do plants take in?", ["oxygen", "carbon dioxide", "helium", "neon"], "B",
              knowledge="Plants take in carbon dioxide and release oxygen.")


def conversation(turns: list[str]) -> list[dict[str, str]]:
    """The clarifying protocol's three teacher turns (as the simulator writes them) around ``turns``."""
    msgs = [{"role": "system", "content": prompts.system_prompt("clarifying", "thinking")}]
    for t, text in enumerate(turns, start=1):
        reply = "Plants take in ____ and release oxygen." if t >= 2 else None
        msgs.append({"role": "user", "content": prompts.teacher_message(TASK, "clarifying", "thinking", 3, t,
                                                                      reply=reply)})
        msgs.append({"role": "assistant", "content": text})
    return msgs


GOOD = ["Does option B, carbon dioxide, get used by plants?",
        "<thinking>Plants take in a gas to make sugar; the teacher says it is taken in.</thinking>",
        "Answer is B <thinking>carbon dioxide is taken in</thinking>"]


def score(turns: list[str], **kw) -> float:
    return RubricReward(**kw).score([TASK], [conversation(turns)])[0].value


def test_worked_example_from_the_docstring():
    # one question about B; tags in 1 of the 2 turns that asked for them; 3 of 3 turns short; gold letter
    turns = [GOOD[0], "Carbon dioxide seems right because plants breathe it.", GOOD[2]]
    comps = rubric_components(TASK, conversation(turns))
    assert comps == {"committed": 1.0, "hedged": 0.0, "correct": 1.0, "asks_one": 1.0, "thinking": 0.5,
                     "concise": 1.0}
    assert score(turns) == pytest.approx((0.4 + 0.2 + 0.1 + 0.2) / 1.0)  # 0.9
    wrong = [*turns[:2], "Answer is A <thinking>oxygen</thinking>"]
    assert score(wrong) == pytest.approx(0.5)
    assert score([*turns[:2], "The answer is B or C."]) == 0.0
    assert score(GOOD) == pytest.approx(1.0)


def test_components_are_logged():
    res = RubricReward().score([TASK], [conversation(GOOD)])[0]
    assert {"committed", "hedged", "correct", "asks_one", "thinking", "concise", "parsed", "rubric"} <= set(
        res.components)
    assert res.components["rubric"] == res.value


@pytest.mark.parametrize("final", [
    "The answer is A, B, C, D.",                                   # every option
    "A) oxygen\nB) carbon dioxide\nC) helium\nD) neon",            # the options echoed
    "...",                                                         # nothing (the simulator's empty-turn placeholder)
    "What does option B mean?",                                    # a question instead of an answer
])
def test_trivial_final_turns_earn_nothing(final):
    """The process terms are gated on a committed answer: good asking and thinking cannot buy reward alone."""
    assert score([GOOD[0], GOOD[1], final]) == 0.0


def test_question_only_policy_earns_nothing_and_constant_letter_earns_its_accuracy():
    ask = "What does option A mean?"
    assert score([ask, ask, ask]) == 0.0
    constant = "The answer is A."
    # commits (wrong here), no question, no tags: only the concise term, weighted 0.2 of 1.0
    assert score([constant] * 3) == pytest.approx(0.2)


def test_asks_one_question():
    assert asks_one_question("Is option B a gas?", TASK.choices)
    assert asks_one_question("Does carbon dioxide come from leaves?", TASK.choices)
    assert not asks_one_question("Is B or C a gas?", TASK.choices)  # two options
    assert not asks_one_question("Is it a gas? Or a liquid?", TASK.choices)
    assert not asks_one_question("Tell me about option B.", TASK.choices)


def test_dense_accuracy_uses_the_gold_probability():
    class FixedGoldProb:
        def score(self, tasks, conversations, *, seed=0):
            from clarify_lit.simulate.rewards import RewardResult

            return [RewardResult(0.25) for _ in tasks]

    value = score(GOOD, accuracy="gold_prob", gold_prob=FixedGoldProb())
    assert value == pytest.approx(0.4 * 0.25 + 0.6)
    assert score([GOOD[0], GOOD[1], "The answer is A or B"], accuracy="gold_prob", gold_prob=FixedGoldProb()) == 0


def test_bad_configuration_is_refused():
    with pytest.raises(ValueError, match="unknown components"):
        RubricReward({"style": 1.0})
    with pytest.raises(ValueError, match="not all 0"):
        RubricReward({"correct": 0.0})
    with pytest.raises(ValueError, match="GoldProbReward"):
        RubricReward(accuracy="gold_prob")


def test_simulate_options_build_the_rubric():
    from clarify_lit.models import FrozenModels
    from clarify_lit.simulate.options import RewardOptions, build_reward

    reward = build_reward(RewardOptions(kind="rubric", rubric_weights={"correct": 1.0, "asks_one": 1.0}),
                          policy="tiny-random", models=FrozenModels("cpu"))
    assert isinstance(reward, RubricReward) and reward.weights == {"correct": 1.0, "asks_one": 1.0}
    assert reward.score([TASK], [conversation(GOOD)])[0].value == pytest.approx(1.0)
