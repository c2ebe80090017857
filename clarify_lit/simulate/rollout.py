"""Roll a policy out: many conversations advanced turn by turn in batches, scored, returned as records.

:func:`rollout_tasks` is the one way to roll a policy out — ``clarify simulate`` (logging data), the evaluation
callback and ``clarify evaluate`` (greedy: ``temperatures=[0.0]``) all call it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from clarify_lit.data.records import ConversationRecord
from clarify_lit.data.tasks import LETTERS, QATask
from clarify_lit.simulate import prompts
from clarify_lit.simulate.engine import GenerationEngine, derive_seed
from clarify_lit.simulate.parsing import parse_answer_letter
from clarify_lit.simulate.prompts import Mode, Setting
from clarify_lit.simulate.rewards import CorrectReward, Reward
from clarify_lit.simulate.teachers import RetrievalTeacher, ScriptedTeacher, Teacher

log = logging.getLogger(__name__)

DEFAULT_TEMPERATURES = (0.3, 0.7, 1.0)
# Stands in for an assistant turn that decoded to nothing (the schema forbids empty assistant turns); every use is
# counted in the record's meta ``empty_turns`` and in the run summary.
EMPTY_TURN_PLACEHOLDER = "..."


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


def default_teacher(setting: Setting) -> Teacher:
    """The reasoning setting is scripted; the clarifying setting defaults to the offline retrieval teacher."""
    return ScriptedTeacher() if setting == "reasoning" else RetrievalTeacher()


def rollout_tasks(
    model,
    tokenizer,
    tasks: Sequence[QATask],
    *,
    setting: Setting = "reasoning",
    mode: Mode = "thinking",
    n_turns: int = 3,
    temperatures: Sequence[float] = DEFAULT_TEMPERATURES,
    teacher: Teacher | None = None,
    reward: Reward | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = False,
    model_name: str = "",
    sort_by_length: bool = True,
    engine: GenerationEngine | None = None,
) -> list[ConversationRecord]:
    """Simulate ``len(temperatures)`` conversations per task and score each one.

    Records come back task-major (task 0 runs 0..m−1, task 1 …) with ``id = f"{task_id}#run{run}"``. Output depends
    only on the inputs and ``seed`` (not on what ran before), so a chunked run equals an unchunked one chunk-wise.
    ``engine`` (optional) reuses a :class:`GenerationEngine` (its ``stats`` then accumulate across calls); without
    it one is built from ``batch_size``/``max_new_tokens``/``sort_by_length``.
    """
    prompts.check_setting(setting, mode, n_turns)
    check_tasks(tasks)
    if not temperatures:
        raise ValueError("temperatures must name at least one run per task")
    teacher = teacher or default_teacher(setting)
    if setting == "reasoning" and teacher.kind != "scripted":
        raise ValueError(f"the reasoning setting's teacher is scripted (as in the paper); teacher={teacher.kind!r} "
                         "would never speak — use the scripted teacher or setting='clarifying'")
    reward = reward or CorrectReward()
    engine = engine or GenerationEngine(model, tokenizer, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                        sort_by_length=sort_by_length)

    rows = [(task, run, float(temp)) for task in tasks for run, temp in enumerate(temperatures)]
    if not rows:
        return []
    row_tasks = [r[0] for r in rows]
    row_temps = [r[2] for r in rows]
    system = prompts.system_prompt(setting, mode)
    convs: list[list[dict[str, str]]] = [[{"role": "system", "content": system}] for _ in rows]
    empty = [0] * len(rows)
    truncated = [0] * len(rows)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_turns * len(rows), unit="turn", desc=f"rollout {setting}/{mode}", dynamic_ncols=True)
    try:
        for turn in range(1, n_turns + 1):
            replies: list[str | None] = [None] * len(rows)
            if prompts.needs_teacher_reply(setting, n_turns, turn):
                replies = list(teacher.reply(row_tasks, convs, seed=derive_seed(seed, "teacher", turn)))
            for i, (task, _, _) in enumerate(rows):
                convs[i].append({"role": "user", "content": prompts.teacher_message(
                    task, setting, mode, n_turns, turn, reply=replies[i])})
            gens = engine.generate(convs, row_temps, seed=derive_seed(seed, "turn", turn),
                                   max_new_tokens=max_new_tokens)
            for i, g in enumerate(gens):
                text = g.text
                if not text:
                    empty[i] += 1
                    text = EMPTY_TURN_PLACEHOLDER
                truncated[i] += g.truncated
                convs[i].append({"role": "assistant", "content": text})
            if bar is not None:
                bar.update(len(rows))
    finally:
        if bar is not None:
            bar.close()

    results = reward.score(row_tasks, convs, seed=derive_seed(seed, "reward"))
    records = []
    for i, (task, run, temp) in enumerate(rows):
        res = results[i]
        value = 0.0 if res.value is None else float(res.value)
        if value < 0:
            raise ValueError(f"reward {reward.describe()} gave {value} < 0 for {task.task_id}; Refit needs r >= 0")
        final = convs[i][-1]["content"]
        records.append(ConversationRecord(
            id=f"{task.task_id}#run{run}",
            task_id=task.task_id,
            messages=convs[i],
            reward=value,
            dataset=task.dataset,
            run=run,
            temperature=temp,
            reward_components=dict(res.components),
            gold=task.gold,
            prediction=parse_answer_letter(final, choices=task.choices),
            meta={
                "setting": setting, "mode": mode, "n_turns": n_turns, "model": model_name,
                "teacher": teacher.describe(), "reward": reward.describe(), "seed": seed,
                "max_new_tokens": max_new_tokens, "empty_turns": empty[i], "truncated_turns": truncated[i],
                "reward_missing": res.value is None,
            },
        ))
    n_missing = sum(r.meta["reward_missing"] for r in records)
    if n_missing:
        log.warning("%d of %d conversations have no reward (flagged meta.reward_missing)", n_missing, len(records))
    if sum(empty):
        log.info("%d empty assistant turns replaced by %r (meta.empty_turns)", sum(empty), EMPTY_TURN_PLACEHOLDER)
    return records
