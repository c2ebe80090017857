"""Metric arithmetic, standard errors, parser edge cases that move metrics, and DDP-correct aggregation."""

from __future__ import annotations

import math
import os
import tempfile
from datetime import timedelta

import pytest
import torch

from clarify_lit.data.records import ConversationRecord, RecordError
from clarify_lit.evaluate.metrics import (
    RolloutMetrics,
    compute_metrics,
    holm_adjust,
    judge_scores,
    mean_se,
    normalize_judge_key,
    paired_comparison,
    paired_diff,
    proportion_se,
    sign_test_p,
)

CHOICES = ["sun", "moon", "rock", "water"]


def rec(
    rid: str,
    turns: list[str],
    gold: str | None = "A",
    reward: float = 0.0,
    task: str | None = None,
    comps: dict | None = None,
    setting: str = "reasoning",
    **meta,
) -> ConversationRecord:
    """A conversation with a system prompt, teacher turns and the given assistant turns."""
    msgs = [{"role": "system", "content": "sys"}]
    for i, t in enumerate(turns):
        msgs += [{"role": "user", "content": f"teacher {i}"}, {"role": "assistant", "content": t}]
    return ConversationRecord(
        id=rid,
        task_id=task or rid,
        messages=msgs,
        reward=reward,
        gold=gold,
        reward_components=comps,
        meta={"setting": setting, "choices": CHOICES, **meta},
    )


def sample_records() -> list[ConversationRecord]:
    return [
        rec("r1", ["<thinking>hmm</thinking> first", "plain", "The answer is A <thinking>why</thinking>"], "A", 1.0),
        rec("r2", ["plain", "The answer is C"], "B", 0.0),
        rec("r3", ["<thinking>x</thinking>", "I am not sure."], "C", 0.5),
    ]


# --- standard errors on hand-computed numbers ------------------------------------------------------------------
def test_proportion_se_hand_computed():
    assert proportion_se(1, 3) == pytest.approx(math.sqrt((1 / 3) * (2 / 3) / 3))
    assert proportion_se(79.9, 100) == pytest.approx(0.0401, abs=1e-4)  # paper-scale: p=.799, n=100 -> .040
    assert proportion_se(0, 10) == 0.0
    assert math.isnan(proportion_se(0, 0))


def test_mean_se_hand_computed():
    vals = [1.0, 0.0, 0.5]
    m, se = mean_se(sum(vals), sum(v * v for v in vals), 3)
    assert m == pytest.approx(0.5)
    assert se == pytest.approx(0.5 / math.sqrt(3))  # sample sd 0.5 (divisor n-1)
    m1, se1 = mean_se(4.0, 16.0, 1)
    assert m1 == 4.0 and math.isnan(se1)
    assert all(math.isnan(x) for x in mean_se(0.0, 0.0, 0))
    # constant values: floating-point cancellation must not give a NaN from sqrt of a tiny negative
    assert mean_se(0.1 * 7, 0.01 * 7, 7)[1] == pytest.approx(0.0, abs=1e-9)


# --- metric arithmetic -------------------------------------------------------------------------------------------
def test_compute_metrics_hand_made():
    m = compute_metrics(sample_records())
    assert m["n"] == 3
    assert m["accuracy"] == pytest.approx(1 / 3)
    assert m["accuracy_se"] == pytest.approx(math.sqrt(2 / 27))
    assert m["format_rate"] == pytest.approx(2 / 3)
    assert m["accuracy_parsed"] == pytest.approx(1 / 2)
    assert m["reward"] == pytest.approx(0.5)
    assert m["reward_se"] == pytest.approx(0.5 / math.sqrt(3))
    # 7 assistant turns, 3 with a closed non-empty thinking block
    assert m["n_assistant_turns"] == 7
    assert m["thinking_pct"] == pytest.approx(100 * 3 / 7)
    assert m["thinking_pct_se"] == pytest.approx(100 * math.sqrt((3 / 7) * (4 / 7) / 7))
    assert "tokens_per_turn" not in m  # no tokenizer and no stored counts
    assert "single_question_rate" not in m and not any(k.startswith("judge_") for k in m)
    words = sum(
        len(t.split()) for r in sample_records() for t in [x["content"] for x in r.messages if x["role"] == "assistant"]
    )
    assert m["words_per_turn"] == pytest.approx(words / 7)


def test_tokens_per_turn_from_tokenizer_and_stored_counts():
    class WordTok:  # one token per whitespace word: enough to check the averaging
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": text.split()}

    recs = [rec("a", ["one two", "three four five six"]), rec("b", ["x"])]
    assert compute_metrics(recs, WordTok())["tokens_per_turn"] == pytest.approx(7 / 3)
    stored = [rec("a", ["t1", "t2"], assistant_tokens=[10, 20]), rec("b", ["t"], assistant_tokens=[3, 4])]
    # record b's stored count does not line up with its one turn: ignored rather than skewing the mean
    assert compute_metrics(stored)["tokens_per_turn"] == pytest.approx(15.0)


def test_single_question_rate_clarifying_only():
    recs = [
        rec("q1", ["Is option B a planet?", "Answer is B"], "B", setting="clarifying"),
        rec("q2", ["Is B right? Or is C right?", "Answer is C"], "B", setting="clarifying"),
        rec("q3", ["B is right.", "Answer is A"], "A", setting="clarifying"),
        rec("q4", ["Is option B a planet?", "The answer is B"], "B", setting="reasoning"),
    ]
    m = compute_metrics(recs)
    assert m["n_first_turns"] == 3
    assert m["single_question_rate"] == pytest.approx(1 / 3)
    assert m["single_question_rate_se"] == pytest.approx(math.sqrt((1 / 3) * (2 / 3) / 3))
    # the explicit setting argument overrides meta
    assert compute_metrics(recs, setting="reasoning").get("single_question_rate") is None
    assert compute_metrics(recs, setting="clarifying")["n_first_turns"] == 4


def test_single_question_rate_counts_one_option_only():
    """Issue 25: the column is "one question about one option"; a question naming two options is not one."""
    recs = [
        rec("one", ["Is option B a planet?", "Answer is B"], "B", setting="clarifying"),
        rec("two", ["Is option B or option C a planet?", "Answer is B"], "B", setting="clarifying"),
        rec("text", [f"Is {CHOICES[0]} hotter than {CHOICES[1]}?", "Answer is B"], "B", setting="clarifying"),
        rec("none", ["Is it hot?", "Answer is B"], "B", setting="clarifying"),
    ]
    assert compute_metrics(recs)["single_question_rate"] == pytest.approx(1 / 4)


def test_conflict_rate():
    """A letter with another option's text earns nothing and is counted (issue 25)."""
    recs = [
        rec("c1", [f"The answer is A) {CHOICES[1]}."], "A"),  # option A's letter, option B's text
        rec("c2", [f"A) {CHOICES[2]}"], "A"),
        rec("ok", [f"The answer is A) {CHOICES[0]}."], "A"),
        rec("rej", ["The answer is not A."], "A"),  # a rejection: no credit, no conflict
    ]
    m = compute_metrics(recs)
    assert m["accuracy"] == pytest.approx(1 / 4)
    assert m["conflict_rate"] == pytest.approx(2 / 4)
    assert m["conflict_rate_se"] == pytest.approx(proportion_se(2, 4))
    assert m["hedge_rate"] == 0.0


def test_clarifying_without_choices_names_the_record():
    r = rec("nochoice", ["Is B right?", "Answer is B"], "B", setting="clarifying")
    r.meta.pop("choices")
    with pytest.raises(RecordError, match="nochoice.*meta.choices"):
        compute_metrics([r])
    assert compute_metrics([r], choices={"nochoice": CHOICES})["single_question_rate"] == 1.0


def test_choices_read_back_from_the_prompt_and_stored_prediction():
    r = rec("nochoice", ["Is option B a planet?", "The answer is moon"], "B", setting="reasoning")
    r.meta.pop("choices")
    assert compute_metrics([r])["accuracy"] == 0.0  # options unknown: "moon" cannot be mapped to a letter
    r.prediction = "B"  # ... unless the rollout stored its parse (made with the options)
    assert compute_metrics([r])["accuracy"] == 1.0
    r.prediction = None
    r.messages[1]["content"] = "Question: Which is it?\nA) sun\nB) moon\nC) rock\nD) water"
    r.meta["setting"] = "clarifying"
    m = compute_metrics([r])  # the options are read back from the question as the prompts laid it out
    assert m["accuracy"] == 1.0 and m["single_question_rate"] == 1.0


def test_missing_gold_is_a_clear_error():
    with pytest.raises(RecordError, match="'nogold'.*field 'gold'"):
        compute_metrics([rec("nogold", ["The answer is A"], gold=None)])


def test_judge_scores_mean_se_and_missing():
    full = {
        "judge_overall": 8.0,
        "judge_accuracy": 10.0,
        "judge_reasoning": 6.0,
        "judge_comprehensiveness": 5.0,
        "judge_pedagogical_value": 4.0,
        "judge_confidence": 9.0,
    }
    recs = [
        rec("j1", ["The answer is A"], "A", 0.8, comps=full),
        rec("j2", ["The answer is B"], "A", 0.6, comps={**full, "judge_overall": 6.0, "judge_confidence": None}),
        rec("j3", ["The answer is A"], "A", 0.0, comps={"judge_overall": None}),  # failed judge call
        rec("j4", ["The answer is A"], "A", 1.0, comps={"correct": 1.0, "accuracy": 1.0}),  # not a judge
    ]
    m = compute_metrics(recs)
    assert m["judge_overall"] == pytest.approx(7.0)
    assert m["judge_overall_se"] == pytest.approx(math.sqrt(2.0) / math.sqrt(2))  # sd of (8, 6) = sqrt 2
    assert m["judge_overall_n"] == 2 and m["judge_overall_missing"] == 1
    assert m["judge_confidence"] == 9.0 and math.isnan(m["judge_confidence_se"])
    assert m["judge_confidence_n"] == 1 and m["judge_confidence_missing"] == 2
    assert m["judge_accuracy"] == 10.0 and m["judge_accuracy_missing"] == 1


def test_judge_components_as_llm_judge_reward_writes_them():
    """``LLMJudgeReward`` stores unprefixed keys plus ``llm_judge``/``correct``/``parsed``; a failed judge stores
    ``None`` everywhere and flags ``meta.reward_missing`` with a placeholder reward 0."""
    ok = {
        "accuracy": 10.0,
        "reasoning": 7.0,
        "comprehensiveness": 6.0,
        "pedagogical_value": 5.0,
        "confidence_calibration": 8.0,
        "overall": 7.0,
        "llm_judge": 0.7,
        "correct": 1.0,
        "parsed": 1.0,
    }
    failed = {**dict.fromkeys(ok, None), "correct": 0.0, "parsed": 1.0}
    recs = [
        rec("ok", ["The answer is A"], "A", 0.7, comps=ok),
        rec("bad", ["The answer is B"], "A", 0.0, comps=failed, reward_missing=True),
    ]
    m = compute_metrics(recs)
    assert m["judge_overall"] == 7.0 and m["judge_confidence"] == 8.0 and m["judge_accuracy"] == 10.0
    assert m["judge_overall_missing"] == 1 and m["judge_pedagogical_value_n"] == 1
    assert m["reward"] == pytest.approx(0.7)  # the placeholder 0 is not averaged in
    assert m["reward_missing"] == 1
    assert m["accuracy"] == 0.5  # but the conversation still counts for accuracy


@pytest.mark.parametrize(
    "key,expected",
    [
        ("judge_overall", "overall"),
        ("Overall", "overall"),
        ("judge/Pedagogical value", "pedagogical_value"),
        ("confidence_calibration", "confidence"),
        ("reasoning_ability", "reasoning"),
        ("correct", None),
        ("judge_accuracy", "accuracy"),
    ],
)
def test_normalize_judge_key(key, expected):
    assert normalize_judge_key(key) == expected


def test_plain_accuracy_component_is_not_a_judge():
    assert judge_scores(rec("x", ["a"], comps={"accuracy": 1.0})) is None
    assert judge_scores(rec("x", ["a"], comps={"judge_accuracy": 7.0}))["accuracy"] == 7.0


# --- parser edge cases that move the metrics ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "final,gold,correct,parsed",
    [
        ("The answer is B", "B", True, True),
        ("Answer is b.", "B", True, True),  # clarifying format, lowercase letter
        ("<thinking>The answer is A</thinking> The answer is B", "B", True, True),  # outside beats inside
        ("<thinking>so the answer is C</thinking>", "C", True, True),  # only inside: still parsed
        ("The answer is a bit unclear", "A", False, False),  # English article, not an answer
        ("I cannot decide.", "A", False, False),
        ("The answer is moon", "B", True, True),  # option text maps to its letter (choices known)
    ],
)
def test_accuracy_and_format_follow_the_parser(final, gold, correct, parsed):
    m = compute_metrics([rec("p", [final], gold)])
    assert m["accuracy"] == float(correct)
    assert m["format_rate"] == float(parsed)


@pytest.mark.parametrize(
    "turn,thinking",
    [
        ("<thinking>reason</thinking> The answer is A", True),
        ("<THINKING>reason</THINKING>", True),
        ("<thinking></thinking> The answer is A", False),  # empty block
        ("<thinking>cut off by the token limit", False),  # never closed
        ("no tags", False),
    ],
)
def test_thinking_pct_edge_cases(turn, thinking):
    assert compute_metrics([rec("t", [turn])])["thinking_pct"] == (100.0 if thinking else 0.0)


# --- torchmetrics: same arithmetic, split updates ----------------------------------------------------------------
def many_records(n: int = 23) -> list[ConversationRecord]:
    out = []
    for i in range(n):
        letter = "ABCD"[i % 4]
        final = f"The answer is {'ABCD'[(i * 7) % 4]}" if i % 5 else "no idea"
        think = "<thinking>t</thinking> " if i % 3 == 0 else ""
        comps = {"judge_overall": float(i % 11), "judge_confidence": None if i % 4 == 0 else 5.0} if i % 2 else None
        out.append(
            rec(
                f"m{i}",
                [think + "Is option B right?", final],
                letter,
                reward=(i % 7) / 6,
                comps=comps,
                setting="clarifying" if i % 2 else "reasoning",
            )
        )
    return out


def _assert_same(a: dict[str, float], b: dict[str, float]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if math.isnan(a[k]):
            assert math.isnan(b[k]), k
        else:
            assert a[k] == pytest.approx(b[k], rel=1e-12, abs=1e-12), k


def test_rollout_metrics_equals_compute_metrics_across_updates():
    recs = many_records()
    metric = RolloutMetrics()
    for i in range(0, len(recs), 5):
        metric.update(recs[i : i + 5])
    _assert_same(metric.compute(), compute_metrics(recs))
    metric.reset()
    metric.update(recs[:3])
    _assert_same(metric.compute(), compute_metrics(recs[:3]))


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )  # a collective bug fails, not hangs
    try:
        recs = many_records()
        metric = RolloutMetrics()
        metric.update(recs[rank::world])  # uneven shards on purpose (23 records, 2 ranks)
        result = metric.compute()
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_aggregation_matches_single_process():
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        # fork where available: children reuse the imported modules (spawn re-imports torch: ~10 s on 2 cores)
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        mp.start_processes(_ddp_worker, args=(2, init_file, tmp), nprocs=2, join=True, start_method=method)
        expected = compute_metrics(many_records())
        for rank in range(2):
            _assert_same(torch.load(os.path.join(tmp, f"rank{rank}.pt")), expected)


# --- paired comparison --------------------------------------------------------------------------------------------
def test_sign_test_exact_values():
    assert sign_test_p(0, 0) == 1.0
    assert sign_test_p(5, 0) == pytest.approx(2 / 32)  # 2 * (1/2)^5
    assert sign_test_p(8, 2) == pytest.approx(2 * (1 + 10 + 45) / 1024)  # = 0.109375
    assert sign_test_p(2, 8) == sign_test_p(8, 2)
    assert sign_test_p(3, 3) == 1.0  # capped at 1
    with pytest.raises(ValueError):
        sign_test_p(-1, 2)


def test_paired_diff_hand_computed():
    d = paired_diff([1, 1, 0, 1], [0, 1, 1, 0])  # differences 1, 0, -1, 1
    assert (d.n, d.wins, d.losses, d.ties) == (4, 2, 1, 1)
    assert d.diff == pytest.approx(0.25)
    sd = math.sqrt(((0.75**2) * 2 + 0.25**2 + 1.25**2) / 3)
    assert d.se == pytest.approx(sd / 2)
    assert d.p_sign == pytest.approx(1.0)  # 2 * (1 + 3) / 8 capped


def test_paired_comparison_joins_by_task_and_averages_runs():
    a = [
        rec("a1", ["The answer is A"], "A", 1.0, task="t1"),
        rec("a2", ["The answer is B"], "A", 0.0, task="t1"),
        rec("a3", ["The answer is B"], "B", 1.0, task="t2"),
        rec("a4", ["The answer is C"], "C", 1.0, task="only_a"),
    ]
    b = [rec("b1", ["The answer is C"], "A", 0.0, task="t1"), rec("b2", ["The answer is B"], "B", 0.5, task="t2")]
    res = paired_comparison(a, b)
    acc, rew = res["accuracy"], res["reward"]
    assert acc.n == 2  # t1, t2 shared; only_a dropped
    assert acc.mean_a == pytest.approx((0.5 + 1.0) / 2) and acc.mean_b == pytest.approx(0.5)
    assert acc.diff == pytest.approx(0.25) and (acc.wins, acc.ties) == (1, 1)
    assert rew.diff == pytest.approx(((0.5 - 0.0) + (1.0 - 0.5)) / 2)
    with pytest.raises(ValueError, match="share no task_id"):
        paired_comparison(a[:1], b[1:])


# --- trivial policies earn nothing; hedges and cut turns are counted -----------------------------------------------
@pytest.mark.parametrize(
    "reply",
    [
        "The answer is A, B, C, D.",  # naming every option
        "A) sun\nB) moon\nC) rock\nD) water",  # an echo of the options
        "A) sun B) moon C) rock D) water",
        "The answer is A) sun B) moon C) rock D) water",
        "",  # empty
        "Which option is the moon?",  # a question
    ],
)
def test_trivial_policies_score_zero_accuracy(reply):
    records = [rec(f"q{i}", ["hmm", reply or "x"], gold) for i, gold in enumerate("ABCD")]
    if not reply:
        for r in records:
            r.messages[-1]["content"] = ""
    m = compute_metrics(records)
    assert m["accuracy"] == 0.0 and m["format_rate"] == 0.0


def test_constant_letter_scores_its_base_rate():
    """A constant single letter is an honest commitment: it scores exactly the share of questions it is right on."""
    records = [rec(f"q{i}", ["The answer is A."], gold) for i, gold in enumerate("AABCDD")]
    assert compute_metrics(records)["accuracy"] == pytest.approx(2 / 6)


def test_hedge_rate_and_truncated_rate():
    records = [
        rec("h1", ["The answer is A, B, C, and D."], "A"),
        rec("h2", ["The answer is A or B."], "A"),
        rec("ok", ["The answer is A."], "A", truncated_turns=[1]),
        rec("old", ["plain", "The answer is B"], "A", truncated_turns=1),  # count only (older records)
    ]
    m = compute_metrics(records)
    assert m["hedge_rate"] == pytest.approx(0.5)
    assert m["hedge_rate_se"] == pytest.approx(proportion_se(2, 4))
    assert m["accuracy"] == pytest.approx(0.25)  # the hedges earn nothing although they name the gold letter
    assert m["truncated_rate"] == pytest.approx(2 / 5)  # 2 cut turns of 5 assistant turns
    assert m["truncated_final_rate"] == pytest.approx(1 / 4)  # only known positions: "ok" was cut in its final turn
    metric = RolloutMetrics()
    metric.update(records[:2])
    metric.update(records[2:])
    assert metric.compute()["hedge_rate"] == pytest.approx(0.5)


def test_holm_adjust_hand_computed():
    # the reproduce clarifying table's six accuracy comparisons against Base (raw sign p, issue 25):
    # sorted 0.0129 · 6 = 0.0774; then 0.375 · 5 = 1.875 → 1; every later one 1
    assert holm_adjust([0.754, 0.388, 0.508, 0.375, 0.375, 0.0129]) == pytest.approx([1, 1, 1, 1, 1, 0.0774])
    # 0.01 · 3 = 0.03; 0.03 · 2 = 0.06; max(0.06, 0.04 · 1) = 0.06 (the step-down keeps the order)
    assert holm_adjust([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm_adjust([0.2]) == [0.2] and holm_adjust([]) == []
    with pytest.raises(ValueError, match="p-values"):
        holm_adjust([0.5, float("nan")])
