"""Roll a policy out: many conversations advanced turn by turn in batches, scored, returned as records.

:func:`rollout_tasks` is the one way to roll a policy out — ``clarify simulate`` (logging data), the evaluation
callback and ``clarify evaluate`` (greedy: ``temperatures=[0.0]``) all call it.

Adaptive length (``adaptive=True``, the paper's third use case): the prompts tell the agent it may answer early, and
a conversation ends after the first assistant turn that commits to a final answer (``parsing.early_answer``: an
explicit answer phrase outside the thinking tags, not in a question); the others go on to the last turn. The reward
is then discounted, ``r = γ^n · r_base`` with ``n`` the number of assistant turns the conversation used (1 … n_turns)
and γ = ``discount`` (1.0 = off).
"""

from __future__ import annotations

import logging
import random
import string
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from clarify_lit.data.records import ConversationRecord
from clarify_lit.data.tasks import LETTERS, QATask
from clarify_lit.simulate import prompts
from clarify_lit.simulate.engine import GenerationEngine, TurnCache, derive_seed
from clarify_lit.simulate.leaks import record_flags
from clarify_lit.simulate.options import RolloutOptions, check_discount
from clarify_lit.simulate.parsing import early_answer
from clarify_lit.simulate.prompts import Mode, Setting
from clarify_lit.simulate.rewards import CorrectReward, Reward, final_answer_of
from clarify_lit.simulate.teachers import OpenTeacher, RetrievalTeacher, ScriptedTeacher, Teacher

log = logging.getLogger(__name__)

# Stands in for an assistant turn that decoded to nothing (the schema forbids empty assistant turns); every use is
# counted in the record's meta ``empty_turns`` and in the run summary.
EMPTY_TURN_PLACEHOLDER = "..."


@dataclass
class RolloutSpec(RolloutOptions):
    """Everything :func:`rollout_tasks` needs besides the model, the tasks, the teacher and the reward: the rollout
    options (:class:`~clarify_lit.simulate.options.RolloutOptions`, which also say how to generate:
    :func:`build_engine`) and ``clarify simulate``'s seeded exploration. ``clarify evaluate`` and the evaluation
    callback record one in their ``metrics.json`` under ``meta`` (:meth:`describe`)."""

    explore_runs: list[int] = field(default_factory=list)
    """Seeded exploration: the runs (indices into ``temperatures``) whose replies start with ``explore_prefixes``
    (none: off). Only fresh conversations are seeded, never continued ones (StepDPO branches) or evaluations."""
    explore_prefixes: dict[int, str] = field(default_factory=dict)
    """Assistant turn → the text a seeded run's reply is forced to begin with; ``{letter}`` is an option letter drawn
    per conversation (e.g. ``{1: "What does option {letter}", 2: "<thinking>"}``). Part of the logged reply."""

    @classmethod
    def of(cls, options: RolloutOptions, **changes: Any) -> RolloutSpec:
        """The spec of a command's rollout options, with ``changes`` (a chunk's seed, the exploration)."""
        values = {f.name: getattr(options, f.name) for f in fields(RolloutOptions)}
        values["temperatures"] = list(values["temperatures"])
        return cls(**{**values, **changes})

    def describe(self) -> dict[str, Any]:
        """The spec as ``metrics.json`` records it: every field, except the engine settings still at the value
        evaluation always generated with (:data:`UNRECORDED_DEFAULTS`)."""
        return {k: v for k, v in asdict(self).items() if not (k in UNRECORDED_DEFAULTS and v == UNRECORDED_DEFAULTS[k])}


#: engine settings a ``metrics.json`` names only when they differ from these values, the ones every evaluation used
#: before they were rollout options (so evaluations of the same policy stay comparable file to file)
UNRECORDED_DEFAULTS: dict[str, Any] = {"top_p": 1.0, "mix_temperatures": True, "sort_by_length": True}


def build_engine(model: Any, tokenizer: Any, spec: RolloutOptions) -> GenerationEngine:
    """The generation engine of ``spec``: the one place a :class:`GenerationEngine` is made from rollout options."""
    return GenerationEngine(
        model,
        tokenizer,
        batch_size=spec.batch_size,
        max_new_tokens=spec.max_new_tokens,
        sort_by_length=spec.sort_by_length,
        top_p=spec.top_p,
        mix_temperatures=spec.mix_temperatures,
        reuse_kv_cache=spec.reuse_kv_cache,
        share_prefix=spec.share_prefix,
        attention=spec.attention,
    )


def check_tasks(tasks: Sequence[QATask]) -> None:
    """Reject tasks the prompts cannot lay out, naming the task (better here than mid-rollout)."""
    seen: set[str] = set()
    for t in tasks:
        if len(t.choices) != len(LETTERS):
            raise ValueError(f"task {t.task_id}: expected {len(LETTERS)} choices, got {len(t.choices)}")
        if t.gold not in LETTERS:
            raise ValueError(f"task {t.task_id}: gold must be one of {LETTERS}, got {t.gold!r}")
        if t.task_id in seen:
            raise ValueError(f"task id {t.task_id!r} appears twice; record ids would collide")
        seen.add(t.task_id)


def check_prefixes(
    prefixes: Sequence[Sequence[dict[str, str]]], tasks: Sequence[QATask], start_turn: int, n_turns: int
) -> None:
    """A prefix to continue at assistant turn ``start_turn``: system, ``start_turn − 1`` exchanges, a teacher turn."""
    if len(prefixes) != len(tasks):
        raise ValueError(f"{len(tasks)} tasks but {len(prefixes)} prefixes (one per task)")
    if not 1 <= start_turn <= n_turns:
        raise ValueError(f"start_turn must be in 1..n_turns={n_turns}, got {start_turn}")
    want = ["system"] + ["user", "assistant"] * (start_turn - 1) + ["user"]
    for task, prefix in zip(tasks, prefixes, strict=True):
        roles = [m["role"] for m in prefix]
        if roles != want:
            raise ValueError(
                f"task {task.task_id}: a prefix continued at turn {start_turn} must have roles {want}, got {roles}"
            )


def check_explore(spec: RolloutSpec) -> None:
    """Seeded exploration's options name existing runs and turns, and templates use only ``{letter}``."""
    if not spec.explore_runs:
        if spec.explore_prefixes:
            raise ValueError(
                "explore_prefixes without explore_runs seeds nothing; name the runs to seed (indices into temperatures)"
            )
        return
    bad = [r for r in spec.explore_runs if not 0 <= r < len(spec.temperatures)]
    if bad:
        raise ValueError(
            f"explore_runs {bad} are not runs: indices into temperatures go 0..{len(spec.temperatures) - 1}"
        )
    if not spec.explore_prefixes:
        raise ValueError("explore_runs needs explore_prefixes (assistant turn → forced start of the reply)")
    for turn, template in spec.explore_prefixes.items():
        if not 1 <= int(turn) <= spec.n_turns:
            raise ValueError(f"explore_prefixes turn {turn} is not an assistant turn (1..{spec.n_turns})")
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
        except ValueError as e:  # an unbalanced brace: "expected '}' before end of string", naming nothing
            raise ValueError(
                f"explore_prefixes[{turn}] = {template!r}: not a valid template ({e}); its only "
                "placeholder may be {letter}, and a literal brace is written {{ or }}"
            ) from None
        if fields - {"letter"} or not template.strip():
            raise ValueError(
                f"explore_prefixes[{turn}] = {template!r}: a non-empty text whose only placeholder is {{letter}}"
            )


def explore_letter(task: QATask, run: int, seed: int) -> str:
    """The option a seeded conversation asks about: drawn per (question, run, rollout seed), uniform over the
    question's letters, independent of the gold letter."""
    return random.Random(derive_seed(seed, "explore", task.task_id, run)).choice(LETTERS[: len(task.choices)])


def context_length(model: Any) -> int | None:
    """The number of positions ``model`` can attend to (``max_position_embeddings`` or ``n_positions`` of its
    config), or None when its config does not say."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_context_budget(model: Any, n_turns: int, max_new_tokens: int, model_name: str) -> None:
    """Refuse a conversation whose generation budget alone (``n_turns`` replies of up to ``max_new_tokens``) exceeds
    the model's context: it would run past what the model can attend to (``--n_turns 1e9`` ran until killed; 150
    turns on a 2,048-token model ran minutes past its context with only a transformers warning)."""
    context = context_length(model)
    if context is None:
        return
    budget = n_turns * max_new_tokens
    if budget > context:
        raise ValueError(
            f"n_turns {n_turns} x max_new_tokens {max_new_tokens} = {budget} generated tokens per "
            f"conversation, more than the {context} tokens of {model_name}'s context (before the system "
            "prompt, the question and the teacher's turns); lower n_turns or max_new_tokens"
        )


def discounted_reward(reward: float, discount: float, turns_used: int) -> float:
    """``γ^n · r``: the reward of a conversation that used ``turns_used`` = n assistant turns."""
    return reward * discount**turns_used


def default_teacher(setting: Setting, mode: Mode = "thinking") -> Teacher:
    """The reasoning setting is scripted; the clarifying setting defaults to the offline retrieval teacher, or in open
    mode to the teacher that answers questions only."""
    if setting == "reasoning":
        return ScriptedTeacher()
    return OpenTeacher() if mode == "open" else RetrievalTeacher()


def rollout_tasks(
    model,
    tokenizer,
    tasks: Sequence[QATask],
    spec: RolloutSpec | None = None,
    *,
    teacher: Teacher | None = None,
    reward: Reward | None = None,
    engine: GenerationEngine | None = None,
    prefixes: Sequence[Sequence[dict[str, str]]] | None = None,
    start_turn: int = 1,
    progress: bool = False,
    model_name: str = "",
) -> list[ConversationRecord]:
    """Simulate ``len(spec.temperatures)`` conversations per task as ``spec`` says (default :class:`RolloutSpec`)
    and score each one.

    Records come back task-major (task 0 runs 0..m−1, task 1 …) with ``id = f"{task_id}#run{run}"``. Output depends
    only on the inputs and ``spec.seed`` (not on what ran before), so a chunked run equals an unchunked one
    chunk-wise. ``engine`` (optional) reuses a :class:`GenerationEngine` (its ``stats`` then accumulate across calls);
    without it one is built from the spec (:func:`build_engine`).

    ``prefixes`` (one per task) continue given conversations instead of starting new ones (StepDPO's branches,
    ``simulate/branches.py``): each prefix is the system prompt, ``start_turn − 1`` teacher/assistant exchanges and
    teacher turn ``start_turn``; generation starts at assistant turn ``start_turn`` and the teacher speaks the
    remaining turns as usual. The returned messages include the prefix.

    ``adaptive``: the agent may end a conversation before turn ``n_turns`` by giving its final answer (see the
    module docstring); ``discount`` γ ∈ (0, 1] multiplies each reward by γ^n, n = assistant turns used. Records of
    such runs carry ``meta.adaptive``, ``meta.turns_used``, ``meta.ended_early`` and ``meta.discount``, and (γ < 1)
    the undiscounted reward as ``reward_components["undiscounted_reward"]``.
    """
    spec = spec or RolloutSpec()
    teacher, reward = checked_players(spec, tasks, teacher, reward)
    engine = engine or build_engine(model, tokenizer, spec)
    play = start_conversations(spec, tasks, prefixes, start_turn)
    if not play.rows:
        return []
    play_turns(play, spec, teacher, engine, prefixes is not None, start_turn, progress)
    return score_and_record(play, spec, teacher, reward, model_name)


@dataclass
class Conversations:
    """The conversations of one :func:`rollout_tasks` call while they are played: one row per (task, run), and per
    row its messages and what the turns did to it."""

    rows: list[tuple[QATask, int, float]]
    """(task, run, temperature), task-major."""
    convs: list[list[dict[str, str]]]
    """Each row's messages so far."""
    seeded: dict[int, dict[int, str]]
    """Seeded exploration: row → assistant turn → the forced start of its reply."""
    empty: list[int] = field(default_factory=list)
    """Per row: assistant turns that decoded to nothing (replaced by :data:`EMPTY_TURN_PLACEHOLDER`)."""
    truncated: list[list[int]] = field(default_factory=list)
    """Per row: the assistant-turn numbers cut by the token limit."""
    ended_early: list[bool] = field(default_factory=list)
    """Per row: the agent gave its final answer before the last turn (adaptive)."""

    def __post_init__(self) -> None:
        self.empty = self.empty or [0] * len(self.rows)
        self.truncated = self.truncated or [[] for _ in self.rows]
        self.ended_early = self.ended_early or [False] * len(self.rows)


def checked_players(
    spec: RolloutSpec, tasks: Sequence[QATask], teacher: Teacher | None, reward: Reward | None
) -> tuple[Teacher, Reward]:
    """Check the spec and the tasks; the teacher and reward (defaults: the setting's, and correctness), refused when
    they cannot play this spec."""
    setting, mode = spec.setting, spec.mode
    prompts.check_setting(setting, mode, spec.n_turns)
    check_discount(spec.discount)
    check_explore(spec)
    check_tasks(tasks)
    if not spec.temperatures:
        raise ValueError("temperatures must name at least one run per task")
    teacher = teacher or default_teacher(setting, mode)
    if setting == "reasoning" and teacher.kind != "scripted":
        raise ValueError(
            f"the reasoning setting's teacher is scripted (as in the paper); teacher={teacher.kind!r} "
            "would never speak — use the scripted teacher or setting='clarifying'"
        )
    reward = reward or CorrectReward(open_answers=mode == "open")
    if getattr(reward, "open_answers", False) != (mode == "open"):
        raise ValueError(
            f"mode={mode!r} but the reward grades {'open' if mode != 'open' else 'lettered'} answers: "
            "build the reward for the rollout's mode (simulate.options.build_reward(..., mode=...))"
        )
    return teacher, reward


def start_conversations(
    spec: RolloutSpec, tasks: Sequence[QATask], prefixes: Sequence[Sequence[dict[str, str]]] | None, start_turn: int
) -> Conversations:
    """One row per (task, run): a fresh conversation (the system prompt), or a copy of the task's prefix; and the
    seeded runs' forced reply starts (fresh conversations only)."""
    rows = [(task, run, float(temp)) for task in tasks for run, temp in enumerate(spec.temperatures)]
    if not rows:
        return Conversations([], [], {})
    system = prompts.system_prompt(spec.setting, spec.mode, spec.adaptive)
    convs: list[list[dict[str, str]]] = [[{"role": "system", "content": system}] for _ in rows]
    if prefixes is not None:
        check_prefixes(prefixes, tasks, start_turn, spec.n_turns)
        convs = [[dict(m) for m in prefixes[i // len(spec.temperatures)]] for i in range(len(rows))]
    elif start_turn != 1:
        raise ValueError(f"start_turn={start_turn} needs prefixes (the conversations to continue)")
    explore_runs = set(spec.explore_runs) if prefixes is None else set()
    seeded = {
        i: {int(t): tpl.format(letter=explore_letter(task, run, spec.seed)) for t, tpl in spec.explore_prefixes.items()}
        for i, (task, run, _) in enumerate(rows)
        if run in explore_runs
    }
    return Conversations(rows, convs, seeded)


def play_turns(
    play: Conversations,
    spec: RolloutSpec,
    teacher: Teacher,
    engine: GenerationEngine,
    continued: bool,
    start_turn: int,
    progress: bool,
) -> None:
    """Advance every conversation turn by turn (teacher message, then the policy's reply) from ``start_turn`` to the
    last turn, or until it ends early (adaptive). ``continued``: the conversations are prefixes that end with the
    teacher's turn ``start_turn``."""
    setting, mode, n_turns, seed, adaptive = spec.setting, spec.mode, spec.n_turns, spec.seed, spec.adaptive
    rows, convs = play.rows, play.convs
    row_tasks = [r[0] for r in rows]
    row_temps = [r[2] for r in rows]
    active = list(range(len(rows)))  # conversations still going (all of them unless adaptive)
    # the policy's KV caches carried from turn to turn (only the teacher's message and the new header are encoded)
    session = TurnCache() if getattr(engine, "reuse_kv_cache", False) else None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=(n_turns - start_turn + 1) * len(rows),
            unit="turn",
            desc=f"rollout {setting}/{mode}",
            dynamic_ncols=True,
        )
    try:
        for turn in range(start_turn, n_turns + 1):
            if not active:
                break
            replies: dict[int, str | None] = {}
            teacher_speaks = not continued or turn > start_turn  # a prefix ends with teacher turn start_turn
            if teacher_speaks and prompts.needs_teacher_reply(setting, n_turns, turn, mode):
                got = teacher.reply(
                    [row_tasks[i] for i in active], [convs[i] for i in active], seed=derive_seed(seed, "teacher", turn)
                )
                replies = dict(zip(active, got, strict=True))
            for i in active:
                if teacher_speaks:
                    convs[i].append(
                        {
                            "role": "user",
                            "content": prompts.teacher_message(
                                rows[i][0], setting, mode, n_turns, turn, reply=replies.get(i), adaptive=adaptive
                            ),
                        }
                    )
            forced = [play.seeded.get(i, {}).get(turn, "") for i in active]
            gens = engine.generate(
                [convs[i] for i in active],
                [row_temps[i] for i in active],
                seed=derive_seed(seed, "turn", turn),
                max_new_tokens=spec.max_new_tokens,
                **({"session": session, "keys": active} if session is not None else {}),
                **({"assistant_prefixes": forced} if any(forced) else {}),
            )
            going = []
            for i, g in zip(active, gens, strict=True):
                text = g.text
                if not text:
                    play.empty[i] += 1
                    text = EMPTY_TURN_PLACEHOLDER
                if g.truncated:
                    play.truncated[i].append(1 + sum(m["role"] == "assistant" for m in convs[i]))
                convs[i].append({"role": "assistant", "content": text})
                if adaptive and turn < n_turns and early_answer(text) is not None:
                    play.ended_early[i] = True  # the agent gave its final answer: this conversation is over
                else:
                    going.append(i)
            if bar is not None:
                bar.update(len(active) + (len(active) - len(going)) * (n_turns - turn))
            active = going
    finally:
        if bar is not None:
            bar.close()
        session = None  # free the caches before scoring


def score_and_record(
    play: Conversations, spec: RolloutSpec, teacher: Teacher, reward: Reward, model_name: str
) -> list[ConversationRecord]:
    """Score the finished conversations (discounted by the turns used when γ < 1) and make their records."""
    setting, mode, n_turns, seed, adaptive, discount = (
        spec.setting,
        spec.mode,
        spec.n_turns,
        spec.seed,
        spec.adaptive,
        spec.discount,
    )
    rows, convs = play.rows, play.convs
    results = reward.score([r[0] for r in rows], convs, seed=derive_seed(seed, "reward"))
    length_meta = adaptive or discount != 1.0
    records = []
    for i, (task, run, temp) in enumerate(rows):
        res = results[i]
        value = 0.0 if res.value is None else float(res.value)
        if value < 0:
            raise ValueError(f"reward {reward.describe()} gave {value} < 0 for {task.task_id}; Refit needs r >= 0")
        components = dict(res.components)
        turns_used = sum(m["role"] == "assistant" for m in convs[i])
        if discount != 1.0 and res.value is not None:
            components["undiscounted_reward"] = value
            value = discounted_reward(value, discount, turns_used)
        final = convs[i][-1]["content"]
        records.append(
            ConversationRecord(
                id=f"{task.task_id}#run{run}",
                task_id=task.task_id,
                messages=convs[i],
                reward=value,
                dataset=task.dataset,
                run=run,
                temperature=temp,
                reward_components=components,
                gold=task.gold,
                prediction=final_answer_of(final, task.choices, open_answers=mode == "open").letter,
                meta={
                    "setting": setting,
                    "mode": mode,
                    "n_turns": n_turns,
                    "model": model_name,
                    "teacher": teacher.describe(),
                    "reward": reward.describe(),
                    "seed": seed,
                    # the final-answer DPO prompt (the question as the student saw it: with its options, or alone)
                    "question_prompt": prompts.format_question(task, mode),
                    "question_hash": task.content_hash,  # what clarify report checks before pairing two evaluations
                    "max_new_tokens": spec.max_new_tokens,
                    "empty_turns": play.empty[i],
                    "truncated_turns": play.truncated[i],
                    "reward_missing": res.value is None,
                    **(
                        {
                            "adaptive": adaptive,
                            "turns_used": turns_used,
                            "ended_early": play.ended_early[i],
                            "discount": discount,
                        }
                        if length_meta
                        else {}
                    ),
                    **({"explore_prefixes": play.seeded[i]} if i in play.seeded else {}),
                    # open mode: the options never appear in the conversation; kept here for grading (metrics, rescore)
                    **({"choices": list(task.choices)} if mode == "open" else {}),
                    **record_flags(task, convs[i], setting),  # teacher_leak, echoed_instructions (simulate/leaks.py)
                },
            )
        )
    n_missing = sum(r.meta["reward_missing"] for r in records)
    if n_missing:
        log.warning("%d of %d conversations have no reward (flagged meta.reward_missing)", n_missing, len(records))
    if sum(play.empty):
        log.info("%d empty assistant turns replaced by %r (meta.empty_turns)", sum(play.empty), EMPTY_TURN_PLACEHOLDER)
    return records
