"""A simulation whose judge could not score it fails loudly.

An LLM judge whose replies cannot be parsed leaves a conversation's reward *missing* (``meta.reward_missing``,
reward 0, dropped by training). A few are noise; many mean the run has no reward to learn from — a served judge
that ignores the JSON format, a wrong ``reward.endpoint.model`` — and a run that exits 0 with ``"mean_reward": null``
hides it (``clarify evaluate`` with a judge likewise: its mean reward would be over the few it could read).
:func:`check_missing_rewards` ends such a run: when more than ``max_share`` of its conversations have no
reward, one raw unparseable reply is saved in the run folder (:data:`UNPARSEABLE_FILE`) and
:class:`MissingRewardsError` says, in one line, which judge, what share, and that reply. ``summary.json`` (written
first) holds ``reward_missing_share`` either way.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from clarify_lit.data.records import ConversationRecord
from clarify_lit.io import atomic_write_text
from clarify_lit.simulate.rewards import LLMJudgeReward, Reward, WeightedReward

UNPARSEABLE_FILE = "judge-unparseable-reply.json"
#: default of ``clarify simulate --max_missing_rewards``: a judge that fails on more than 1 in 10 conversations is
#: broken, not noisy (a served 135M judge failed on 4 of 4; a working judge's retries leave ~0)
DEFAULT_MAX_MISSING_SHARE = 0.1


class MissingRewardsError(RuntimeError):
    """More of a run's rewards are missing than allowed; the message is one line (judge, share, a raw reply)."""


def missing_share(records: Sequence[ConversationRecord]) -> float | None:
    """The share of ``records`` flagged ``meta.reward_missing`` (None for no records)."""
    if not records:
        return None
    return sum(bool(r.meta.get("reward_missing")) for r in records) / len(records)


def judges_of(reward: Reward | None) -> list[LLMJudgeReward]:
    """The LLM judges inside ``reward`` (itself, or the parts of a weighted reward)."""
    if isinstance(reward, LLMJudgeReward):
        return [reward]
    if isinstance(reward, WeightedReward):
        return [j for part in reward.parts.values() for j in judges_of(part)]
    return []


def check_missing_rewards(
    records: Sequence[ConversationRecord],
    reward: Reward | None,
    out: Path,
    max_share: float,
    prog: str = "clarify simulate",
) -> None:
    """Raise :class:`MissingRewardsError` when more than ``max_share`` of ``records`` have no reward, after saving
    one raw unparseable judge reply to ``out``/:data:`UNPARSEABLE_FILE` (see the module docstring)."""
    check_max_share(max_share)
    share = missing_share(records)
    if share is None or share <= max_share:
        return
    n_missing = sum(bool(r.meta.get("reward_missing")) for r in records)
    named = sorted({str(r.meta.get("reward", "?")) for r in records if r.meta.get("reward_missing")})
    judge = ", ".join(named) or (reward.describe() if reward is not None else "?")
    kept = [(j.describe(), task_id, text) for j in judges_of(reward) for task_id, text in j.unparseable]
    if kept:
        who, task_id, text = kept[0]
        atomic_write_text(
            out / UNPARSEABLE_FILE,
            json.dumps(
                {"judge": who, "task_id": task_id, "reply": text, "unparseable_in_this_invocation": len(kept)},
                indent=1,
                ensure_ascii=False,
            )
            + "\n",
        )
        shown = " ".join(text.split())
        shown = (shown[:160] + " …") if len(shown) > 160 else shown
        reply = f"one raw reply (task {task_id}, saved in {out / UNPARSEABLE_FILE}): {json.dumps(shown)}"
    else:  # every missing reward came from shards made before this invocation (--resume)
        reply = "no raw reply kept (the missing rewards were logged before this --resume)"
    raise MissingRewardsError(
        f"{prog}: {n_missing} of {len(records)} rewards missing ({share:.0%}, more than "
        f"--max_missing_rewards {max_share:g}): judge {judge} gave replies that could not be parsed; {reply}"
    )


def check_max_share(max_share: float) -> None:
    if not (0.0 <= max_share <= 1.0):
        raise ValueError(f"max_missing_rewards must be a share in [0, 1], got {max_share}")
