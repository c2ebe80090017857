"""The options every rollout command shares, and the builders that turn them into objects.

``clarify simulate``, ``clarify evaluate``, ``clarify iterate`` and the evaluation callback take the same option
blocks — how conversations are played and generated (:class:`RolloutOptions`, ``--rollout.*``), which questions
(:class:`DataOptions`), who answers the student (:class:`TeacherOptions`), how a conversation is scored
(:class:`RewardOptions`), an endpoint (:class:`EndpointOptions`) — and build the same objects from them with
:func:`build_teacher`, :func:`build_reward` and :func:`load_data_tasks`. The builders take the option blocks (never a
whole command config), so every command builds its teacher and judge the same way.

A new generation option is one field of :class:`RolloutOptions`: every command accepts it as ``--rollout.<name>``
(tests/test_rollout_options.py checks), :class:`~clarify_lit.simulate.rollout.RolloutSpec` carries it to
:func:`~clarify_lit.simulate.rollout.build_engine`, and ``clarify simulate``'s ``run_fingerprint`` records it (add
its "off" value to ``OFF_VALUES`` there so runs made without it still resume).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any, Literal

from clarify_lit.data.tasks import OnBadRow, Part, QATask, load_tasks
from clarify_lit.models import DTypeChoice, FrozenModels, policy_base
from clarify_lit.simulate.engine import Attention
from clarify_lit.simulate.prompts import Mode, Setting, check_setting
from clarify_lit.simulate.rewards import CorrectReward, GoldProbReward, Reward, RewardKind, make_reward
from clarify_lit.simulate.rubric import DEFAULT_MIN_WORDS, RubricReward
from clarify_lit.simulate.teachers import (
    ChatBackend,
    EndpointChatBackend,
    HFChatBackend,
    Teacher,
    TeacherKind,
    make_teacher,
)

Backend = Literal["hf", "endpoint"]

DEFAULT_TEMPERATURES = (0.3, 0.7, 1.0)


@dataclass
class RolloutOptions:
    """How conversations are played and generated (``--rollout.*`` of simulate, evaluate, iterate and the rollout
    callback)."""

    setting: Setting = "reasoning"
    """reasoning (scripted teacher) or clarifying (the student may ask the teacher)."""
    mode: Mode = "thinking"
    """thinking (reasoning inside <thinking> tags), standard, or open (the question without its options, the answer
    in words; clarifying only)."""
    n_turns: int = 3
    """Assistant turns per conversation (the most, with adaptive)."""
    temperatures: list[float] = field(default_factory=lambda: list(DEFAULT_TEMPERATURES))
    """One run per temperature per question (0 = greedy). Evaluation and the callback default to [0.0]."""
    max_new_tokens: int = 64
    """Token budget of each assistant turn."""
    batch_size: int = 8
    """Conversations per generate call (also the teacher's and judge's batch)."""
    seed: int = 0
    """Rollout seed (sampling, teacher, reward)."""
    adaptive: bool = False
    """The agent may end a conversation before turn n_turns by giving its final answer (docs/simulate.md)."""
    discount: float = 1.0
    """γ in (0, 1]: every reward is multiplied by γ^n, n = assistant turns used (1 = off; meant for adaptive)."""
    reuse_kv_cache: bool = True
    """Carry each batch's KV cache from one turn to the next (only the teacher's message is encoded anew); false =
    re-encode whole conversations every turn."""
    share_prefix: bool = False
    """Prefill each fresh batch's common prompt prefix (the system prompt) once and share its keys/values across the
    rows: less prefill, but greedy text may differ in bfloat16 (docs/simulate.md, Throughput)."""
    attention: Attention = "model"
    """Attention kernel while generating: model (as loaded: SDPA), sdpa, eager, or gqa (SDPA for prompts, two
    matmuls over the key/value heads for each decode step). eager and gqa decode faster on CPU at long contexts, but
    greedy text may differ from SDPA's where two tokens nearly tie (docs/simulate.md, Throughput)."""
    top_p: float = 1.0
    """Nucleus sampling: sample from the smallest set of tokens whose probability reaches top_p (1 = off)."""
    mix_temperatures: bool = True
    """Let runs of different temperatures share a generate batch (per-row temperature; greedy rows stay exact);
    false = one temperature per batch."""
    sort_by_length: bool = True
    """Order rows by prompt length before batching (less padding)."""

    def check(self) -> None:
        """Refuse options no rollout can run with, naming the option (before any model loads)."""
        if not self.temperatures:
            raise ValueError(
                "--rollout.temperatures []: names no run; give at least one temperature (one run per question each)"
            )
        bad = [t for t in self.temperatures if not (t >= 0 and math.isfinite(t))]
        if bad:
            raise ValueError(f"--rollout.temperatures: each must be a finite number >= 0, got {bad}")
        check_discount(self.discount)
        check_setting(self.setting, self.mode, self.n_turns)
        for name in ("max_new_tokens", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--rollout.{name} must be an integer >= 1, got {value!r}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"--rollout.top_p must be in (0, 1] (1 = off), got {self.top_p}")


#: the options of :class:`RolloutOptions` that were flat options of simulate/evaluate/iterate (``--max_new_tokens``)
#: before the block; :func:`moved_rollout_flags` still takes them, with a deprecation line
FLAT_ROLLOUT_FLAGS = (
    "setting",
    "mode",
    "n_turns",
    "temperatures",
    "max_new_tokens",
    "batch_size",
    "seed",
    "adaptive",
    "discount",
    "reuse_kv_cache",
    "share_prefix",
    "attention",
    "top_p",
    "mix_temperatures",
    "sort_by_length",
)


#: the flat options' new names: a ``--config`` file's flat key is moved there (``arguments.moved_config_keys``)
ROLLOUT_MOVES = {name: f"--rollout.{name}" for name in FLAT_ROLLOUT_FLAGS}


def moved_rollout_flags(argv: list[str] | None, prog: str, prefix: str = "--") -> list[str]:
    """``argv`` with the deprecated flat rollout options (``--max_new_tokens 16``, ``--seed=1``) spelled as their
    ``--rollout.*`` options, each use reported on stderr in one line. ``prefix`` is where the options sit
    (``--trainer.callbacks.init_args.`` for the callback)."""
    out = []
    for a in list(sys.argv[1:] if argv is None else argv):
        name, eq, value = a.partition("=")
        if name.startswith(prefix) and name[len(prefix) :] in FLAT_ROLLOUT_FLAGS:
            new = f"{prefix}rollout.{name[len(prefix) :]}"
            print(f"{prog}: {name} is deprecated, use {new}", file=sys.stderr)
            a = new + eq + value
        out.append(a)
    return out


def check_discount(discount: float) -> None:
    """γ must be in (0, 1]: γ = 1 is no discount, γ > 1 would reward longer conversations and γ ≤ 0 breaks r ≥ 0."""
    if (
        isinstance(discount, bool)
        or not isinstance(discount, int | float)
        or not math.isfinite(discount)
        or not 0 < discount <= 1
    ):
        raise ValueError(f"discount must be a number in (0, 1] (1 = no discount), got {discount!r}")


@dataclass
class DataOptions:
    """Which questions (passed to ``clarify_lit.data.tasks.load_tasks``)."""

    dataset: str = "openbookqa"
    """openbookqa, arc_easy, arc_challenge, sciq, mmlu, hub or local."""
    part: Part = "train"
    """Our deterministic train/test division (400/100 by default)."""
    split: str | None = None
    """Source split (hub datasets; built-ins ship one)."""
    seed: int = 0
    """Seed of the train/test division."""
    n_train: int = 400
    n_test: int = 100
    path: str | None = None
    """File (local), hub id (hub) or an override folder (built-ins)."""
    name: str | None = None
    """Hub config name."""
    columns: dict[str, Any] | None = None
    """Column mapping for hub/local sources (ColumnMap fields)."""
    label: str | None = None
    on_bad_row: OnBadRow | None = None
    limit: int | None = None
    """Use only the first N tasks of the part (small runs)."""


@dataclass
class EndpointOptions:
    """An OpenAI-compatible chat-completions endpoint."""

    base_url: str | None = None
    """e.g. http://127.0.0.1:8000/v1"""
    model: str | None = None
    """Model name sent to the endpoint."""
    api_key_env: str | None = None
    """Name of the environment variable holding the API key (none: no auth header)."""
    timeout: float = 60.0
    max_retries: int = 3
    backoff: float = 1.0
    concurrency: int = 4


@dataclass
class TeacherOptions:
    """Who answers the student's clarifying questions (the reasoning setting is always scripted)."""

    kind: TeacherKind | None = None
    """None: scripted (reasoning) / retrieval (clarifying) / open (clarifying in open mode: answers questions only,
    from the notes, never seeing the options)."""
    backend: Backend = "hf"
    """For kind=llm: a local HF model or an endpoint."""
    model: str | None = None
    """HF backend: model name/path (None: the policy's model)."""
    dtype: DTypeChoice = "float32"
    """HF backend: weights dtype; float32 by default (not auto) so a teacher says the same on every machine."""
    endpoint: EndpointOptions = field(default_factory=EndpointOptions)
    temperature: float = 0.0
    max_new_tokens: int = 96
    show_gold: bool = True
    """LLM teacher is told the answer (and told never to reveal it)."""
    show_knowledge: bool = True
    top_k: int = 2
    """Retrieval and open: sentences per reply."""
    hide_gold_text: bool = True
    """Retrieval: keep the gold option's text out of every reply (see hide_mode)."""
    hide_mode: Literal["blank", "drop"] = "blank"
    """Retrieval: blank = replace the gold text (any inflection) by ____ in the chosen sentences; drop = leave out
    every sentence quoting it (the older teacher, informative on few questions)."""


@dataclass
class RewardOptions:
    """How a whole conversation is scored (reward >= 0)."""

    kind: RewardKind = "correct"
    judge_model: str | None = None
    """gold_prob / llm_judge with backend=hf: judge model (None: the policy's base model)."""
    judge_dtype: DTypeChoice = "float32"
    """Judge weights dtype; float32 by default (not auto): a reward is a measurement, kept comparable across CPUs."""
    backend: Backend = "hf"
    """llm_judge: local HF model or endpoint."""
    endpoint: EndpointOptions = field(default_factory=EndpointOptions)
    weights: dict[str, float] | None = None
    """weighted: e.g. {correct: 0.5, gold_prob: 0.5}."""
    max_attempts: int = 3
    """llm_judge: tries before a reward is recorded as missing."""
    rubric_weights: dict[str, float] | None = None
    """rubric: weights of its components correct, asks_one, thinking, concise (None: 0.4/0.2/0.2/0.2)."""
    rubric_accuracy: Literal["correct", "gold_prob"] = "correct"
    """rubric: the accuracy term, 0/1 correctness or the judge's gold-answer probability (dense)."""
    word_limit: int = 60
    """rubric: an assistant turn over this many words is not concise."""
    min_words: int = DEFAULT_MIN_WORDS
    """rubric: fewest words (half of them distinct) for a turn to have substance and count as concise; a single
    question about one option counts at any length (simulate/rubric.py)."""


def endpoint_backend(opts: EndpointOptions, what: str) -> EndpointChatBackend:
    """The chat backend of an endpoint block; ``what`` names the option in the error when it is incomplete."""
    if not opts.base_url or not opts.model:
        raise ValueError(f"{what} with backend=endpoint needs endpoint.base_url and endpoint.model")
    return EndpointChatBackend(
        opts.base_url,
        opts.model,
        api_key_env=opts.api_key_env,
        timeout=opts.timeout,
        max_retries=opts.max_retries,
        backoff=opts.backoff,
        concurrency=opts.concurrency,
    )


def teacher_kind(options: TeacherOptions, setting: Setting, mode: Mode = "thinking") -> str:
    """The teacher that acts: ``options.kind``, or by default scripted (reasoning) / retrieval (clarifying) / open
    (clarifying in open mode)."""
    if options.kind:
        return options.kind
    if setting == "reasoning":
        return "scripted"
    return "open" if mode == "open" else "retrieval"


def build_teacher(
    options: TeacherOptions | None,
    *,
    setting: Setting,
    policy: str,
    models: FrozenModels,
    batch_size: int = 8,
    mode: Mode = "thinking",
) -> Teacher:
    """The teacher of ``options`` (default: scripted in the reasoning setting, retrieval in the clarifying one).

    An HF ``llm`` teacher defaults to the *base* of ``policy`` (:func:`~clarify_lit.models.policy_base`), so a trained
    policy meets the same teacher as its base model did."""
    t = options or TeacherOptions()
    kind = teacher_kind(t, setting, mode)
    if kind == "scripted":
        return make_teacher("scripted")
    if kind == "open":
        return make_teacher("open", top_k=t.top_k)
    if kind == "retrieval":
        return make_teacher("retrieval", top_k=t.top_k, hide_gold_text=t.hide_gold_text, hide_mode=t.hide_mode)
    backend: ChatBackend
    if t.backend == "endpoint":
        backend = endpoint_backend(t.endpoint, "teacher")
    else:
        name = t.model or policy_base(policy)
        model, tok = models.get(name, t.dtype)
        backend = HFChatBackend(model, tok, batch_size=batch_size, name=f"hf:{name}")
    return make_teacher(
        "llm",
        backend=backend,
        temperature=t.temperature,
        max_new_tokens=t.max_new_tokens,
        show_gold=t.show_gold,
        show_knowledge=t.show_knowledge,
    )


def build_reward(
    options: RewardOptions | None, *, policy: str, models: FrozenModels, batch_size: int = 8, mode: Mode = "thinking"
) -> Reward:
    """The reward of ``options``; judges (``gold_prob``, HF ``llm_judge``) default to the base of ``policy``, so a
    trained policy is never its own judge. In open mode only ``correct`` is defined (graded by the option text the
    answer names)."""
    r = options or RewardOptions()
    if mode == "open":
        if r.kind != "correct":
            raise NotImplementedError(
                f"reward {r.kind!r} is not implemented in open mode: its judges and rubric "
                "read answer letters; use --reward.kind correct"
            )
        return CorrectReward(open_answers=True)
    if r.kind == "rubric":
        gold_prob = None
        if r.rubric_accuracy == "gold_prob":
            model, tok = models.get(r.judge_model or policy_base(policy), r.judge_dtype)
            gold_prob = GoldProbReward(model, tok, batch_size=batch_size)
        return RubricReward(
            r.rubric_weights,
            accuracy=r.rubric_accuracy,
            gold_prob=gold_prob,
            word_limit=r.word_limit,
            min_words=r.min_words,
        )
    kinds = set(r.weights or {}) if r.kind == "weighted" else {r.kind}
    judge_model = judge_tok = judge_backend = None
    judge_name = r.judge_model or policy_base(policy)
    if "gold_prob" in kinds:
        judge_model, judge_tok = models.get(judge_name, r.judge_dtype)
    if "llm_judge" in kinds:
        if r.backend == "endpoint":
            judge_backend = endpoint_backend(r.endpoint, "reward llm_judge")
        else:
            m, tok = models.get(judge_name, r.judge_dtype)
            judge_backend = HFChatBackend(m, tok, batch_size=batch_size, name=f"hf:{judge_name}")
    return make_reward(
        r.kind,
        judge_model=judge_model,
        judge_tokenizer=judge_tok,
        judge_backend=judge_backend,
        weights=r.weights,
        batch_size=batch_size,
        max_attempts=r.max_attempts,
    )


def load_data_tasks(data: DataOptions) -> list[QATask]:
    """The questions of ``data`` (its ``part``, the first ``limit`` of them when set); none at all is an error."""
    d = data
    tasks = load_tasks(
        d.dataset,
        d.split,
        seed=d.seed,
        n_train=d.n_train,
        n_test=d.n_test,
        part=d.part,
        path=d.path,
        name=d.name,
        columns=d.columns,
        label=d.label,
        on_bad_row=d.on_bad_row,
    )
    if d.limit is not None:
        if d.limit < 1:
            raise ValueError(f"data.limit must be >= 1, got {d.limit}")
        tasks = tasks[: d.limit]
    if not tasks:
        raise ValueError(f"dataset {d.dataset!r} part {d.part!r} gave no tasks")
    return tasks
