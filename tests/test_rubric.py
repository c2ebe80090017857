"""The offline rubric reward (clarifying setting): hand-computed scores, and the trivial policies that must earn 0."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clarify_lit.data.tasks import QATask
from clarify_lit.simulate import prompts
from clarify_lit.simulate.rubric import RubricReward, asks_one_question, rubric_components

TASK = QATask(
    "t/1",
    "sciq",
    "Which gas do plants take in?",
    ["oxygen", "carbon dioxide", "helium", "neon"],
    "B",
    knowledge="Plants take in carbon dioxide and release oxygen.",
)


def conversation(turns: list[str]) -> list[dict[str, str]]:
    """The clarifying protocol's three teacher turns (as the simulator writes them) around ``turns``."""
    msgs = [{"role": "system", "content": prompts.system_prompt("clarifying", "thinking")}]
    for t, text in enumerate(turns, start=1):
        reply = "Plants take in ____ and release oxygen." if t >= 2 else None
        msgs.append(
            {"role": "user", "content": prompts.teacher_message(TASK, "clarifying", "thinking", 3, t, reply=reply)}
        )
        msgs.append({"role": "assistant", "content": text})
    return msgs


GOOD = [
    "Does option B, carbon dioxide, get used by plants?",
    "<thinking>Plants take in a gas to make sugar; the teacher says it is taken in.</thinking>",
    "Answer is B <thinking>carbon dioxide is taken in</thinking>",
]


def score(turns: list[str], **kw) -> float:
    return RubricReward(**kw).score([TASK], [conversation(turns)])[0].value


def test_worked_example_from_the_docstring():
    # one question about B; tags in 1 of the 2 turns that asked for them; 3 of 3 turns short; gold letter
    turns = [GOOD[0], "Carbon dioxide seems right because plants breathe it.", GOOD[2]]
    comps = rubric_components(TASK, conversation(turns))
    assert comps == {"committed": 1.0, "hedged": 0.0, "correct": 1.0, "asks_one": 1.0, "thinking": 0.5, "concise": 1.0}
    assert score(turns) == pytest.approx((0.4 + 0.2 + 0.1 + 0.2) / 1.0)  # 0.9
    wrong = [*turns[:2], "Answer is A <thinking>oxygen is the gas that plants take in</thinking>"]
    assert score(wrong) == pytest.approx(0.5)
    assert score([*turns[:2], "The answer is B or C."]) == 0.0
    assert score(GOOD) == pytest.approx(1.0)


def test_components_are_logged():
    res = RubricReward().score([TASK], [conversation(GOOD)])[0]
    assert {"committed", "hedged", "correct", "asks_one", "thinking", "concise", "parsed", "rubric"} <= set(
        res.components
    )
    assert res.components["rubric"] == res.value


@pytest.mark.parametrize(
    "final",
    [
        "The answer is A, B, C, D.",  # every option
        "A) oxygen\nB) carbon dioxide\nC) helium\nD) neon",  # the options echoed
        "...",  # nothing (the simulator's empty-turn placeholder)
        "What does option B mean?",  # a question instead of an answer
    ],
)
def test_trivial_final_turns_earn_nothing(final):
    """The process terms are gated on a committed answer: good asking and thinking cannot buy reward alone."""
    assert score([GOOD[0], GOOD[1], final]) == 0.0


def test_question_only_policy_earns_nothing_and_constant_letter_earns_only_its_accuracy():
    ask = "What does option A mean?"
    assert score([ask, ask, ask]) == 0.0
    constant = "The answer is A."
    # commits, but a bare answer line has no substance: not concise; no question, no tags -> only the accuracy term
    assert score([constant] * 3) == 0.0  # wrong letter (gold B)
    assert score(["The answer is B."] * 3) == pytest.approx(0.4)  # right letter: 0.4 * 1 / 1.0, nothing more


# the trivial policies of the project's standards, each played in every turn; the best any may earn is its
# accuracy term (0.4 when its letter happens to be the gold)
TRIVIAL = {
    "constant answer": "The answer is B.",
    "constant option line": "B) carbon dioxide",
    "every option": "The answer is A, B, C, D.",
    "echo of the options": "A) oxygen B) carbon dioxide C) helium D) neon",
    "echo, one per line": "A) oxygen\nB) carbon dioxide\nC) helium\nD) neon",
    "empty reply": "...",
    "a question": "What does option B mean?",
    "padded answer": "The answer is B. The answer is B. The answer is B. The answer is B.",
}


@pytest.mark.parametrize("name", sorted(TRIVIAL))
def test_trivial_policies_earn_at_most_their_accuracy(name):
    reply = TRIVIAL[name]
    comps = rubric_components(TASK, conversation([reply] * 3))
    assert comps["thinking"] == 0.0 and comps["concise"] <= 1 / 3  # at most its first turn (the question) counts
    assert score([reply] * 3) == pytest.approx(0.4 * comps["correct"] * comps["committed"])
    # and each earns far less than the worked example's honest conversation
    assert score([reply] * 3) < score(GOOD) - 0.5


def test_a_constant_template_is_credited_once():
    """A template with thinking tags, repeated every turn: its first use counts, the copies do not."""
    template = "<thinking>I will think about every option carefully here.</thinking> The answer is B, the best option."
    comps = rubric_components(TASK, conversation([template] * 3))
    assert comps["concise"] == pytest.approx(1 / 3)  # turn 1 has substance; turns 2-3 repeat it
    assert comps["thinking"] == 0.0  # asked in turns 2 and 3, which only repeat turn 1's thoughts
    fresh = rubric_components(TASK, conversation([GOOD[0], template, template]))
    assert fresh["thinking"] == pytest.approx(1 / 2)  # turn 2's thoughts are new, turn 3 copies them
    assert score([template] * 3) < score(GOOD)


def test_substance_and_word_limit():
    from clarify_lit.simulate.rubric import echoes_options, has_substance

    assert has_substance("Is option B a gas?", [], TASK.choices)  # a short question about one option counts
    assert not has_substance("The answer is B.", [], TASK.choices)
    assert has_substance("Carbon dioxide seems right because plants breathe it in.", [], TASK.choices)
    assert not has_substance(
        "Carbon dioxide seems right because plants breathe it in.",
        ["carbon dioxide seems right, because plants breathe it in"],
        TASK.choices,
    )
    assert echoes_options("(A) oxygen (B) carbon dioxide (C) helium")
    assert not echoes_options("A) oxygen is wrong, B) is right")
    long = " ".join(f"word{i}" for i in range(61))
    assert rubric_components(TASK, conversation([long, GOOD[1], GOOD[2]]))["concise"] == pytest.approx(2 / 3)
    assert rubric_components(TASK, conversation([long, GOOD[1], GOOD[2]]), word_limit=61)["concise"] == 1.0


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
    with pytest.raises(ValueError, match="min_words"):
        RubricReward(min_words=0)


def test_simulate_options_build_the_rubric():
    from clarify_lit.models import FrozenModels
    from clarify_lit.simulate.options import RewardOptions, build_reward

    reward = build_reward(
        RewardOptions(kind="rubric", rubric_weights={"correct": 1.0, "asks_one": 1.0}),
        policy="tiny-random",
        models=FrozenModels("cpu"),
    )
    assert isinstance(reward, RubricReward) and reward.weights == {"correct": 1.0, "asks_one": 1.0}
    assert reward.score([TASK], [conversation(GOOD)])[0].value == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------------------------
# The rubric is gameable (issue 25): these tests document the exploits; they do not claim a fix. A word-counting
# rubric cannot tell a template question from a real one or filler from reasoning (docs/simulate.md#the-rubric-is-a-
# diagnostic-not-a-judge), so it is reported as a diagnostic, and the paper's LLM judge (--reward.kind judge) is the
# real reward. If a change makes any of these fail, the rubric got harder to game: update the numbers and the docs.
# ---------------------------------------------------------------------------------------------------------------
_ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("rubric_exploits", _ROOT / "experiments" / "rubric_exploits.py")
exploits = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(exploits)

# the outside audit's table (issue 25), reproduced on Base's committed rubric-v2 rollouts (100 test questions, gold A
# on 20 of them, B on 29): policy -> (rubric reward, accuracy term 0.4 · accuracy)
ISSUE_TABLE = {
    'constant "The answer is A."': (0.080, 0.080),
    'copy the teacher\'s message in turns 1 and 2, then "The answer is A."': (0.130, 0.080),
    '"What does option A refer to?", then "The answer is A." twice': (0.347, 0.080),
    '"The answer is A." plus 10 random filler words, different each turn': (0.280, 0.080),
    '"The answer is A." with 10 filler words inside <thinking> tags': (0.480, 0.080),
    'the option-A question, then "The answer is A." with <thinking> filler': (0.680, 0.080),
    'the option-B question, then "The answer is B." with <thinking> filler': (0.716, 0.116),
}
BEST_TRAINED = 0.119  # rubric-explore StepDPO as the audit read it (0.106 under the third-pass parser; README)


@pytest.fixture(scope="module")
def exploit_table():
    records, _ = exploits.load_records(_ROOT / exploits.ROLLOUTS)
    assert len(records) == 100
    return exploits.score_policies(records)


@pytest.mark.parametrize("name", list(ISSUE_TABLE))
def test_the_audits_trivial_policies_earn_what_the_issue_says(exploit_table, name):
    reward, acc_term = ISSUE_TABLE[name]
    got = exploit_table[name]
    assert got["rubric"] == pytest.approx(reward, abs=1e-3)
    assert got["accuracy_term"] == pytest.approx(acc_term, abs=1e-3)
    if name.startswith("constant"):
        assert got["rubric"] == pytest.approx(got["accuracy_term"])  # the one row the v2 fix holds for
    else:
        # every other row earns more than its accuracy term: the documented exploit
        assert got["rubric"] > got["accuracy_term"] + 0.04
    if got["asks_one"] == 1.0 and got["thinking"] == 1.0:
        assert got["rubric"] > 5 * BEST_TRAINED  # a template beats every trained row by far


_WORDS = st.sampled_from(exploits.FILLER)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(_WORDS, min_size=10, max_size=10), min_size=3, max_size=3), st.booleans())
def test_any_filler_earns_the_process_terms(fillers, inside):
    """Random filler of 10 words (at least half distinct) after a committed wrong letter: inside the tags it earns
    ``thinking`` and ``concise``, outside ``concise``, though it says nothing."""
    if any(len(set(f)) * 2 < len(f) for f in fillers) or len({tuple(f) for f in fillers}) < 3:
        return  # repeats are (rightly) not credited; the exploit needs only fresh draws, which are easy
    turns = [
        f"The answer is A. <thinking>{' '.join(f)}</thinking>" if inside else f"The answer is A. {' '.join(f)}"
        for f in fillers
    ]
    comps = rubric_components(TASK, conversation(turns))
    assert comps["correct"] == 0.0 and comps["concise"] == 1.0
    assert comps["thinking"] == (1.0 if inside else 0.0)
    assert score(turns) == pytest.approx(0.2 + (0.2 if inside else 0.0))  # all of it unearned


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from(
        [
            "What does option {x} refer to?",
            "Is option {x} correct?",
            "Can you explain option {x}?",
            "What is meant by ({x})?",
            "Tell me more about option {x}?",
        ]
    ),
    st.sampled_from("ABCD"),
)
def test_any_fixed_question_template_earns_asks_one(template, letter):
    """Any fixed one-option question earns the full ``asks_one`` term: the rubric cannot tell a template from a
    question that clarifies anything."""
    turns = [template.format(x=letter), "The answer is A.", "The answer is A."]
    comps = rubric_components(TASK, conversation(turns))
    assert comps["asks_one"] == 1.0
    assert score(turns) == pytest.approx(0.2 + 0.2 / 3)  # wrong letter: asks_one + one concise turn of three
