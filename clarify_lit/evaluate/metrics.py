"""Evaluation metrics over rolled-out conversations, with standard errors (docs/evaluation.md).

All metrics are computed in two steps so that single-process and distributed evaluation share one arithmetic:

1. :func:`accumulate_stats` turns records into *sufficient statistics* — counts, sums and sums of squares — which
   simply add up across shards (ranks, files, batches);
2. :func:`metrics_from_stats` turns the summed statistics into means and standard errors.

:func:`compute_metrics` chains the two for a list of records; :class:`RolloutMetrics` is the ``torchmetrics``
version whose state is the same statistics vector, reduced with ``dist_reduce_fx="sum"`` so that under DDP every
rank computes the metrics of the union of all shards.

Also here: the per-question paired comparison of two methods evaluated on the same questions
(:func:`paired_comparison`) with an exact two-sided sign test (:func:`sign_test_p`), used by ``clarify report``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torchmetrics import Metric

from clarify_lit.data.records import ConversationRecord, RecordError
from clarify_lit.simulate import parsing
from clarify_lit.simulate.open_answer import grade_open_answer, holds_one_question
from clarify_lit.simulate.prompts import JUDGE_METRIC_NAMES, judge_key
from clarify_lit.simulate.rubric import asks_one_question

# The six scores of the paper's LLM judge by metric name (Table columns), overall first; the vocabulary (keys,
# metric names, other spellings) is defined once, with the judge's prompt (simulate/prompts.py).
JUDGE_SCORES = ("overall", *(name for name in JUDGE_METRIC_NAMES.values() if name != "overall"))
_JUDGE_PREFIX = re.compile(r"^(?:llm_)?judge[_/.:-]")

# Order of the statistics vector (the single state of RolloutMetrics). Everything is a plain sum over records.
BASE_STATS = (
    "n",  # conversations
    "parsed",  # final answer parseable
    "hedged",  # final answer names several letters as the answer (earns none)
    "conflicted",  # final answer pairs a letter with another option's text, or asserts and rejects it
    "correct",  # parsed final answer == gold
    "reward_n",  # conversations with a reward (a failed judge leaves meta["reward_missing"] = true)
    "reward_missing",
    "reward_sum",
    "reward_sq",
    "turns",  # assistant turns
    "thinking_turns",  # assistant turns using <thinking> tags
    "truncated_turns",  # assistant turns cut by max_new_tokens (rollout meta["truncated_turns"])
    "truncated_final",  # conversations whose final turn was cut (known positions only)
    "words",  # whitespace words over assistant turns
    "token_turns",
    "tokens",  # assistant turns whose tokens were counted, and their token total
    "first_turns",  # clarifying-setting conversations whose first turn was checked
    # ... of which the first turn asks exactly one question (about exactly one option; open mode: one question)
    "single_question",
    "asked_correct",  # ... of which the final answer is correct (accuracy when asking vs not)
    "open_n",  # open-mode conversations (meta["mode"] == "open": answers graded by the option text named)
    "names_none",  # ... whose final answer names no option (wrong, counted apart from hedges)
    "adaptive_n",  # conversations rolled out with adaptive length (meta["adaptive"])
    "clarifying_turns_sum",
    "clarifying_turns_sq",  # ... their assistant turns before the final answer
    "ended_early",  # ... that the agent ended before the last turn
    "leak_checked",  # conversations whose teacher turns were checked for a leak (meta["teacher_leak"] present)
    "teacher_leaks",  # ... in which the teacher named the gold option as the answer (simulate/leaks.py)
    "echo_checked",  # conversations checked for echoed instruction blocks (meta["echoed_instructions"] present)
    "echoed",  # ... with an assistant turn that repeats its instruction block (masked in training)
)
JUDGE_STATS = tuple(f"judge_{j}_{s}" for j in JUDGE_SCORES for s in ("n", "sum", "sq", "missing"))
STAT_KEYS = BASE_STATS + JUDGE_STATS

#: Metrics where a larger value is better (``clarify report`` bolds the best method only for these).
HIGHER_IS_BETTER = frozenset(
    {
        "accuracy",
        "accuracy_parsed",
        "format_rate",
        "reward",
        "single_question_rate",
        *(f"judge_{j}" for j in JUDGE_SCORES),
    }
)


# ---------------------------------------------------------------------------------------------------------------
# Standard errors
# ---------------------------------------------------------------------------------------------------------------
def proportion_se(successes: float, n: float) -> float:
    """Binomial standard error ``sqrt(p (1 - p) / n)`` of a proportion ``p = successes / n`` (NaN when n = 0)."""
    if n <= 0:
        return math.nan
    p = successes / n
    return math.sqrt(max(p * (1.0 - p), 0.0) / n)


def mean_se(total: float, total_sq: float, n: float) -> tuple[float, float]:
    """Mean and standard error ``s / sqrt(n)`` (``s`` the sample std, divisor n - 1) from sums.

    Returns ``(nan, nan)`` for n = 0 and ``(mean, nan)`` for n = 1 (one value says nothing about spread).
    """
    if n <= 0:
        return math.nan, math.nan
    mean = total / n
    if n < 2:
        return mean, math.nan
    # sum of squared deviations; clamp tiny negative values from floating-point cancellation
    ss = max(total_sq - total * total / n, 0.0)
    return mean, math.sqrt(ss / (n - 1) / n)


def nan_to_none(obj: Any) -> Any:
    """Replace NaN floats by ``None`` (recursively) so metric dicts serialise as strict JSON (``null``)."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [nan_to_none(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------------------------
# Per-record reading
# ---------------------------------------------------------------------------------------------------------------
def assistant_turns(record: ConversationRecord) -> list[str]:
    """The assistant messages of a record, in order."""
    return [m["content"] for m in record.messages if m["role"] == "assistant"]


_OPTION_LINE = re.compile(r"^([A-D])\) (.*\S)\s*$", re.MULTILINE)


def choices_from_messages(record: ConversationRecord) -> list[str] | None:
    """The options as the prompts lay them out (``A) text`` … ``D) text`` lines, ``prompts.format_choices``) in the
    first teacher message that has all four, or ``None``."""
    for m in record.messages:
        if m["role"] != "user":
            continue
        found = dict(_OPTION_LINE.findall(m["content"]))
        if all(letter in found for letter in "ABCD"):
            return [found[letter] for letter in "ABCD"]
    return None


def known_choices(record: ConversationRecord, choices: Mapping[str, Sequence[str]] | None = None) -> list[str] | None:
    """The answer options of the record's question if known: ``choices[task_id]``, else ``meta["choices"]``, else
    read back from the question as the prompts showed it (:func:`choices_from_messages`)."""
    if choices is not None and record.task_id in choices:
        return list(choices[record.task_id])
    meta_choices = record.meta.get("choices")
    if isinstance(meta_choices, list | tuple) and meta_choices:
        return [str(c) for c in meta_choices]
    return choices_from_messages(record)


def final_answer_parse(record: ConversationRecord, choices: Mapping[str, Sequence[str]] | None = None):
    """The :class:`~clarify_lit.simulate.parsing.AnswerParse` of the last assistant turn (letter or none, hedged).

    The text is re-parsed with the project's one parser (so metrics of old files follow the current parser), with
    the options when known, as the rewards do ("The answer is <option text>" then counts). Only when the options
    are unknown and the parse finds nothing (no letter, no hedge) is the rollout's stored ``record.prediction``
    used — and only if the current parser agrees that the text does not hedge.
    """
    turns = assistant_turns(record)
    if not turns:
        return parsing.AnswerParse(None)
    options = known_choices(record, choices)
    if is_open(record):  # graded by the option text it names; the options are in meta (never in the conversation)
        return grade_open_answer(turns[-1], record_choices(record, choices))
    got = parsing.analyze_answer(turns[-1], options)
    if got.letter is None and not got.hedged and options is None and record.prediction:
        # without the options the parser cannot map "The answer is <option text>" to a letter; the rollout parsed
        # with them and stored the letter, so use it (with options the two parses agree by construction)
        got = parsing.AnswerParse(record.prediction, how="stored")
    return got


def is_open(record: ConversationRecord) -> bool:
    """Whether the record was rolled out in open mode (the question without options, the answer in words)."""
    return record.meta.get("mode") == "open"


def final_answer(record: ConversationRecord, choices: Mapping[str, Sequence[str]] | None = None) -> str | None:
    """The answer letter parsed from the last assistant turn (``None`` when it commits to none or to several)."""
    return final_answer_parse(record, choices).letter


def is_correct(
    record: ConversationRecord, source: str = "<records>", choices: Mapping[str, Sequence[str]] | None = None
) -> bool:
    """Whether the parsed final answer equals ``record.gold``; a record without gold raises :class:`RecordError`."""
    if record.gold is None:
        raise RecordError(source, "record", record.id, "gold", "missing: accuracy needs the correct letter")
    pred = final_answer(record, choices)
    return pred is not None and pred.strip().upper() == record.gold.strip().upper()


def normalize_judge_key(key: str) -> str | None:
    """Map a ``reward_components`` key to a canonical judge score name, or ``None`` if it is not one.

    ``"judge_overall"``, ``"Judge/Overall"``, ``"pedagogical value"`` and ``"confidence_calibration"`` all map; the
    prefix ``judge_``/``judge/``/``llm_judge_`` is optional.
    """
    k = key.strip().lower()
    k = _JUDGE_PREFIX.sub("", k)
    key = judge_key(re.sub(r"[\s\-/.]+", "_", k))
    return None if key is None else JUDGE_METRIC_NAMES[key]


def judge_scores(record: ConversationRecord) -> dict[str, float | None] | None:
    """The six judge scores of a record (``None`` values where the judge gave none), or ``None`` without a judge.

    A record counts as judged when its ``reward_components`` hold an *overall* score key (possibly ``None`` when the
    judge call failed) or any key with an explicit ``judge`` prefix — a plain ``"accuracy"`` component from a
    correctness reward alone is not mistaken for a judge score.
    """
    comps = record.reward_components
    if not comps:
        return None
    found: dict[str, float | None] = {}
    explicit = False
    for key, value in comps.items():
        name = normalize_judge_key(key)
        if name is None:
            continue
        explicit = explicit or bool(_JUDGE_PREFIX.match(key.strip().lower()))
        if name not in found or found[name] is None:
            found[name] = None if value is None else float(value)
    if not ("overall" in found or explicit):
        return None
    return {j: found.get(j) for j in JUDGE_SCORES}


def record_setting(record: ConversationRecord, setting: str | None) -> str | None:
    """The conversation setting: the explicit argument, else ``record.meta["setting"]``."""
    return setting if setting is not None else record.meta.get("setting")


def record_choices(
    record: ConversationRecord, choices: Mapping[str, Sequence[str]] | None, source: str = "<records>"
) -> list[str]:
    """The answer options of the record's question, required: :func:`known_choices` or :class:`RecordError`."""
    found = known_choices(record, choices)
    if found is not None:
        return found
    raise RecordError(
        source,
        "record",
        record.id,
        "meta.choices",
        "missing: the single-question check of the clarifying setting needs the question's options "
        "(pass choices={task_id: [...]}, store them in meta, or keep the 'A) …' lines in the prompt)",
    )


TokenCounter = Callable[[str], int]


def token_counter(tokenizer: Any | None) -> TokenCounter | None:
    """A function counting a text's tokens with ``tokenizer`` (no special tokens), or ``None`` without one."""
    if tokenizer is None:
        return None

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return count


# ---------------------------------------------------------------------------------------------------------------
# Sufficient statistics and metrics
# ---------------------------------------------------------------------------------------------------------------
def empty_stats() -> dict[str, float]:
    return dict.fromkeys(STAT_KEYS, 0.0)


def accumulate_stats(
    records: Iterable[ConversationRecord],
    *,
    tokenizer: Any | None = None,
    setting: str | None = None,
    choices: Mapping[str, Sequence[str]] | None = None,
    source: str = "<records>",
    stats: dict[str, float] | None = None,
) -> dict[str, float]:
    """Add the sufficient statistics of ``records`` to ``stats`` (a fresh zero dict by default) and return it.

    Args:
        records: rolled-out conversations (``gold`` must be set).
        tokenizer: if given, assistant turns are tokenized to report tokens per turn; otherwise a per-turn token
            count stored by the rollout in ``meta["assistant_tokens"]`` (list of ints) is used when present.
        setting: ``"clarifying"`` enables the single-question check of the first assistant turn; ``None`` reads
            ``meta["setting"]`` per record.
        choices: ``task_id -> options`` for that check (else ``meta["choices"]``).
        source: a file name for error messages.
    """
    st = stats if stats is not None else empty_stats()
    count_tokens = token_counter(tokenizer)
    for rec in records:
        turns = assistant_turns(rec)
        st["n"] += 1
        if rec.gold is None:
            raise RecordError(source, "record", rec.id, "gold", "missing: accuracy needs the correct letter")
        parsed = final_answer_parse(rec, choices)
        pred = parsed.letter
        st["hedged"] += float(parsed.hedged)
        correct = pred is not None and pred.strip().upper() == rec.gold.strip().upper()
        st["conflicted"] += float(parsed.conflict)
        if pred is not None:
            st["parsed"] += 1
            st["correct"] += float(correct)
        if is_open(rec):
            st["open_n"] += 1
            st["names_none"] += float(pred is None and not parsed.hedged)
        if "teacher_leak" in rec.meta:
            st["leak_checked"] += 1
            st["teacher_leaks"] += float(bool(rec.meta["teacher_leak"]))
        if "echoed_instructions" in rec.meta:
            st["echo_checked"] += 1
            st["echoed"] += float(bool(rec.meta["echoed_instructions"]))
        if rec.meta.get("reward_missing"):
            # the stored 0 is a placeholder, not a score: averaging it in would bias the mean reward down
            st["reward_missing"] += 1
        else:
            st["reward_n"] += 1
            st["reward_sum"] += rec.reward
            st["reward_sq"] += rec.reward * rec.reward
        st["turns"] += len(turns)
        st["thinking_turns"] += sum(bool(parsing.uses_thinking_tags(t)) for t in turns)
        n_cut, cut_at = rec.truncated_turns()
        st["truncated_turns"] += n_cut
        st["truncated_final"] += float(bool(cut_at) and len(turns) in cut_at)
        st["words"] += sum(len(t.split()) for t in turns)
        _add_tokens(st, rec, turns, count_tokens)
        if rec.meta.get("adaptive") and turns:
            _add_length(st, rec, turns)
        if record_setting(rec, setting) == "clarifying" and turns:
            st["first_turns"] += 1
            if is_open(rec):  # no options to ask about: exactly one question
                asked = holds_one_question(turns[0])
            else:  # exactly one option, as the name and the rubric's asks_one say: "Is it A or B?" names two
                asked = asks_one_question(turns[0], record_choices(rec, choices, source))
            st["single_question"] += float(asked)
            st["asked_correct"] += float(asked and correct)
        scores = judge_scores(rec)
        if scores is not None:
            for j, v in scores.items():
                if v is None:
                    st[f"judge_{j}_missing"] += 1
                else:
                    st[f"judge_{j}_n"] += 1
                    st[f"judge_{j}_sum"] += v
                    st[f"judge_{j}_sq"] += v * v
    return st


def clarifying_turns(record: ConversationRecord) -> int:
    """Assistant turns before the one that gave the final answer (the last one): the clarifying questions and
    reasoning turns the agent spent. A fixed-length conversation of n turns has n − 1."""
    return max(len(assistant_turns(record)) - 1, 0)


def ended_early(record: ConversationRecord) -> bool:
    """Whether an adaptive conversation ended before its last allowed turn: ``meta["ended_early"]`` as the rollout
    stored it, else (records written without the flag) fewer assistant turns than ``meta["n_turns"]``."""
    flag = record.meta.get("ended_early")
    if isinstance(flag, bool):
        return flag
    n_max = record.meta.get("n_turns")
    return isinstance(n_max, int) and not isinstance(n_max, bool) and len(assistant_turns(record)) < n_max


def _add_length(st: dict[str, float], rec: ConversationRecord, turns: list[str]) -> None:
    k = float(len(turns) - 1)
    st["adaptive_n"] += 1
    st["clarifying_turns_sum"] += k
    st["clarifying_turns_sq"] += k * k
    st["ended_early"] += float(ended_early(rec))


def _add_tokens(
    st: dict[str, float], rec: ConversationRecord, turns: list[str], count_tokens: TokenCounter | None
) -> None:
    if count_tokens is not None:
        st["token_turns"] += len(turns)
        st["tokens"] += sum(count_tokens(t) for t in turns)
        return
    stored = rec.meta.get("assistant_tokens")
    # only trust a stored count that lines up with the turns (a truncated or edited record would skew the mean)
    if isinstance(stored, list) and len(stored) == len(turns) and all(isinstance(x, int) for x in stored):
        st["token_turns"] += len(turns)
        st["tokens"] += sum(stored)


def metrics_from_stats(st: Mapping[str, float]) -> dict[str, float]:
    """Means and standard errors from summed statistics (see docs/evaluation.md for each formula).

    Optional groups appear only when they were measured: ``tokens_per_turn`` (a tokenizer or stored counts),
    ``single_question_rate`` (clarifying setting), ``clarifying_turns`` and ``ended_early_rate`` (adaptive-length
    conversations), ``judge_*`` (an LLM judge reward).
    """
    n = st["n"]
    out: dict[str, float] = {"n": n}
    out["accuracy"] = st["correct"] / n if n else math.nan
    out["accuracy_se"] = proportion_se(st["correct"], n)
    out["accuracy_parsed"] = st["correct"] / st["parsed"] if st["parsed"] else math.nan
    out["format_rate"] = st["parsed"] / n if n else math.nan
    out["format_rate_se"] = proportion_se(st["parsed"], n)
    # final answers that name several letters ("The answer is A, B, C, D."): they earn nothing, and a rising rate
    # means a policy is learning to hedge rather than to answer
    out["hedge_rate"] = st["hedged"] / n if n else math.nan
    out["hedge_rate_se"] = proportion_se(st["hedged"], n)
    # "The answer is A) Isaac Newton" with Isaac Newton option B: two answers, none credited (docs/evaluation.md)
    out["conflict_rate"] = st["conflicted"] / n if n else math.nan
    out["conflict_rate_se"] = proportion_se(st["conflicted"], n)
    out["reward"], out["reward_se"] = mean_se(st["reward_sum"], st["reward_sq"], st["reward_n"])
    if st["reward_missing"]:
        out["reward_missing"] = st["reward_missing"]
    turns = st["turns"]
    out["thinking_pct"] = 100.0 * st["thinking_turns"] / turns if turns else math.nan
    out["thinking_pct_se"] = 100.0 * proportion_se(st["thinking_turns"], turns)
    out["n_assistant_turns"] = turns
    # a high rate means max_new_tokens cuts answers off: format and accuracy then measure the budget, not the policy
    out["truncated_rate"] = st["truncated_turns"] / turns if turns else math.nan
    out["truncated_rate_se"] = proportion_se(st["truncated_turns"], turns)
    out["truncated_final_rate"] = st["truncated_final"] / n if n else math.nan
    out["words_per_turn"] = st["words"] / turns if turns else math.nan
    if st["token_turns"]:
        out["tokens_per_turn"] = st["tokens"] / st["token_turns"]
    if st["first_turns"]:
        out["single_question_rate"] = st["single_question"] / st["first_turns"]
        out["single_question_rate_se"] = proportion_se(st["single_question"], st["first_turns"])
        out["n_first_turns"] = st["first_turns"]
        # is asking worth it? accuracy of the conversations whose first turn asked one question, and of the others
        asked, not_asked = st["single_question"], st["first_turns"] - st["single_question"]
        out["accuracy_when_asked"] = st["asked_correct"] / asked if asked else math.nan
        out["accuracy_when_not_asked"] = (st["correct"] - st["asked_correct"]) / not_asked if not_asked else math.nan
    for name, hits, checked in (
        ("teacher_leak_rate", "teacher_leaks", "leak_checked"),
        ("echoed_instructions_rate", "echoed", "echo_checked"),
    ):
        if st[checked]:  # records made before the flags existed carry neither: no rate, rather than a false 0
            out[name] = st[hits] / st[checked]
            out[f"{name}_se"] = proportion_se(st[hits], st[checked])
    if st["open_n"]:
        out["names_none_rate"] = st["names_none"] / st["open_n"]
        out["names_none_rate_se"] = proportion_se(st["names_none"], st["open_n"])
    if st["adaptive_n"]:
        # adaptive length: how many turns the agent spent before answering, and how often it stopped early
        out["clarifying_turns"], out["clarifying_turns_se"] = mean_se(
            st["clarifying_turns_sum"], st["clarifying_turns_sq"], st["adaptive_n"]
        )
        out["ended_early_rate"] = st["ended_early"] / st["adaptive_n"]
        out["ended_early_rate_se"] = proportion_se(st["ended_early"], st["adaptive_n"])
        out["n_adaptive"] = st["adaptive_n"]
    for j in JUDGE_SCORES:
        jn, missing = st[f"judge_{j}_n"], st[f"judge_{j}_missing"]
        if jn == 0 and missing == 0:
            continue
        out[f"judge_{j}"], out[f"judge_{j}_se"] = mean_se(st[f"judge_{j}_sum"], st[f"judge_{j}_sq"], jn)
        out[f"judge_{j}_n"] = jn
        out[f"judge_{j}_missing"] = missing
    return out


def compute_metrics(
    records: Iterable[ConversationRecord],
    tokenizer: Any | None = None,
    *,
    setting: str | None = None,
    choices: Mapping[str, Sequence[str]] | None = None,
    source: str = "<records>",
) -> dict[str, float]:
    """All evaluation metrics of ``records`` as ``{name: float}`` (keys in docs/evaluation.md)."""
    return metrics_from_stats(
        accumulate_stats(records, tokenizer=tokenizer, setting=setting, choices=choices, source=source)
    )


class RolloutMetrics(Metric):
    """``torchmetrics`` version of :func:`compute_metrics`, correct under DDP.

    The state is one float64 vector of the sufficient statistics :data:`STAT_KEYS` (counts, sums, sums of
    squares) with ``dist_reduce_fx="sum"``: each rank ``update``\\ s with its own shard of conversations and
    ``compute`` returns the metrics of all shards together — identical to :func:`compute_metrics` on the union.

    Example::

        metric = RolloutMetrics(tokenizer=tok, setting="reasoning")
        metric.update(my_shard_of_records)
        values = metric.compute()      # {"accuracy": ..., "accuracy_se": ..., ...}, synced across ranks
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    stats: torch.Tensor

    def __init__(
        self,
        tokenizer: Any | None = None,
        setting: str | None = None,
        choices: Mapping[str, Sequence[str]] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        # plain attributes, not states: they configure how records are read and are never synced
        self._tokenizer = tokenizer
        self._setting = setting
        self._choices = choices
        # float64: sums of squares of judge scores and rewards over many conversations stay exact enough
        self.add_state("stats", default=torch.zeros(len(STAT_KEYS), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, records: Sequence[ConversationRecord]) -> None:  # type: ignore[override]
        st = accumulate_stats(records, tokenizer=self._tokenizer, setting=self._setting, choices=self._choices)
        self.stats += torch.tensor([st[k] for k in STAT_KEYS], dtype=torch.float64, device=self.stats.device)

    def compute(self) -> dict[str, float]:  # type: ignore[override]
        return metrics_from_stats(dict(zip(STAT_KEYS, self.stats.double().cpu().tolist(), strict=True)))


# ---------------------------------------------------------------------------------------------------------------
# Paired comparison of two methods on the same questions
# ---------------------------------------------------------------------------------------------------------------
def sign_test_p(n_pos: int, n_neg: int) -> float:
    """Exact two-sided sign test p-value: ties already dropped, H0 P(+) = 1/2.

    ``p = min(1, 2 * sum_{k <= min(n+, n-)} C(n, k) / 2^n)`` with ``n = n+ + n-``; computed with integers, so exact
    up to the final division. ``1.0`` when there are no untied pairs.
    """
    if n_pos < 0 or n_neg < 0:
        raise ValueError(f"counts must be >= 0, got n_pos={n_pos}, n_neg={n_neg}")
    n = n_pos + n_neg
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(n_pos, n_neg) + 1))
    return min(1.0, 2 * tail / 2**n)


def holm_adjust(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order (family-wise error control over the comparisons).

    Sort ascending, ``p_(1) <= … <= p_(m)``; the adjusted ``p~_(i) = max_{j <= i} min(1, (m − j + 1) · p_(j))``, so
    adjusted values keep the raw order and never fall below the raw ones. A table of m comparisons against one
    baseline reports these beside the raw sign-test p: a raw 0.013 among six comparisons is not "significant" alone.

    Worked example (hand-computed in tests/test_evaluate_metrics.py)::

        holm_adjust([0.0129, 0.388, 0.508, 0.375, 0.375, 0.754])
        # sorted: 0.0129·6 = 0.0774; 0.375·5 = 1.875 → 1; the rest 1
        # → [0.0774, 1.0, 1.0, 1.0, 1.0, 1.0]
        holm_adjust([0.01, 0.04, 0.03])  # 0.01·3 = 0.03; 0.03·2 = 0.06; max(0.06, 0.04·1) = 0.06
        # → [0.03, 0.06, 0.06]
    """
    ps = [float(p) for p in pvalues]
    if any(not 0.0 <= p <= 1.0 for p in ps):  # also catches NaN
        raise ValueError(f"p-values must be in [0, 1], got {ps}")
    m = len(ps)
    out = [0.0] * m
    running = 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda k: ps[k])):
        running = max(running, min(1.0, (m - rank) * ps[i]))
        out[i] = running
    return out


class QuestionMismatchError(ValueError):
    """Two evaluations hold different questions under the same ``task_id`` (``meta.question_hash`` differs)."""


def check_same_questions(
    records_a: Sequence[ConversationRecord], records_b: Sequence[ConversationRecord], task_ids: set[str]
) -> None:
    """Refuse to pair two sets of rollouts whose questions differ under the same ``task_id``: every record written
    by a rollout stores ``meta.question_hash`` (question text, options, gold); records without one (written before
    it existed) are not checked."""

    def hashes(records):
        out: dict[str, set[str]] = {}
        for r in records:
            h = r.meta.get("question_hash")
            if r.task_id in task_ids and isinstance(h, str):
                out.setdefault(r.task_id, set()).add(h)
        return out

    ha, hb = hashes(records_a), hashes(records_b)
    differ = sorted(t for t in ha.keys() & hb.keys() if ha[t] != hb[t])
    if differ:
        first = next(r for r in records_a if r.task_id == differ[0])
        other = next(r for r in records_b if r.task_id == differ[0])
        raise QuestionMismatchError(
            f"{len(differ)} of {len(task_ids)} shared task ids hold different questions (text, options or gold) in "
            f"the two evaluations, e.g. {differ[0]!r} ({first.where()} vs {other.where()}); they cannot be paired — "
            "were they evaluated on different data (--data.path, --data.seed, a changed file)?"
        )


def per_task_scores(records: Iterable[ConversationRecord], source: str = "<records>") -> dict[str, tuple[float, float]]:
    """``task_id -> (accuracy, reward)`` averaged over all records of the task (runs, temperatures, seeds).

    Records flagged ``meta["reward_missing"]`` count for accuracy but not for reward (NaN if a task has no reward).
    """
    sums: dict[str, list[float]] = {}
    for rec in records:
        s = sums.setdefault(rec.task_id, [0.0, 0.0, 0.0, 0.0])
        s[0] += float(is_correct(rec, source))
        s[1] += 1
        if not rec.meta.get("reward_missing"):
            s[2] += rec.reward
            s[3] += 1
    return {t: (a / k, r / kr if kr else math.nan) for t, (a, k, r, kr) in sums.items()}


@dataclass
class PairedDiff:
    """Paired difference ``a - b`` of one per-question score over the shared questions."""

    n: int  # shared questions
    mean_a: float
    mean_b: float
    diff: float  # mean of per-question differences (= mean_a - mean_b)
    se: float  # sample std of the differences / sqrt(n)
    wins: int  # questions where a > b
    losses: int  # questions where a < b
    ties: int
    p_sign: float  # exact two-sided sign test, ties dropped

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.__dict__.items()}


def paired_diff(a: Sequence[float], b: Sequence[float]) -> PairedDiff:
    """Paired statistics of two equal-length score lists (one entry per shared question)."""
    if len(a) != len(b):
        raise ValueError(f"paired lists differ in length: {len(a)} vs {len(b)}")
    d = [x - y for x, y in zip(a, b, strict=True)]
    n = len(d)
    diff, se = mean_se(sum(d), sum(x * x for x in d), n)
    wins = sum(x > 0 for x in d)
    losses = sum(x < 0 for x in d)
    return PairedDiff(
        n=n,
        mean_a=sum(a) / n if n else math.nan,
        mean_b=sum(b) / n if n else math.nan,
        diff=diff,
        se=se,
        wins=wins,
        losses=losses,
        ties=n - wins - losses,
        p_sign=sign_test_p(wins, losses),
    )


def paired_comparison(
    records_a: Iterable[ConversationRecord], records_b: Iterable[ConversationRecord]
) -> dict[str, PairedDiff]:
    """Compare two methods on the questions both answered (joined by ``task_id``).

    Per question, each method's accuracy and reward are first averaged over its records of that question (several
    runs or seeds); the paired differences over shared questions then give ``{"accuracy": ..., "reward": ...}``.
    Raises ``ValueError`` when the two share no question.
    """
    records_a, records_b = list(records_a), list(records_b)
    sa, sb = per_task_scores(records_a), per_task_scores(records_b)
    shared = sorted(sa.keys() & sb.keys())
    if not shared:
        raise ValueError("the two methods share no task_id: a paired comparison needs the same questions")
    check_same_questions(records_a, records_b, set(shared))
    rewarded = [t for t in shared if not (math.isnan(sa[t][1]) or math.isnan(sb[t][1]))]
    return {
        "accuracy": paired_diff([sa[t][0] for t in shared], [sb[t][0] for t in shared]),
        "reward": paired_diff([sa[t][1] for t in rewarded], [sb[t][1] for t in rewarded]),
    }
