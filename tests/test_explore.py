"""Seeded exploration (``explore_runs``/``explore_prefixes``): forced reply starts in chosen runs of the logged data,
never in other runs, continued conversations (StepDPO branches) or evaluations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from clarify_lit.data.records import load_records
from clarify_lit.data.tasks import QATask
from clarify_lit.simulate.branches import branch_rollouts
from clarify_lit.simulate.command import main, run_fingerprint
from clarify_lit.simulate.endpoint_policy import EndpointPolicyEngine
from clarify_lit.simulate.engine import GenerationEngine
from clarify_lit.simulate.rollout import RolloutSpec, check_explore, explore_letter, rollout_tasks

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "configs" / "simulate" / "tiny-tasks.jsonl"
TASKS = [
    QATask(
        f"sciq/{k}",
        "sciq",
        f"Question {k}: what do plants need?",
        ["sunlight", "sand", "salt", "smoke"],
        "ABCD"[k % 4],
        knowledge="Plants make food from sunlight. Sand is small rocks.",
    )
    for k in range(4)
]
ASK = "What does option {letter}"


def spec(**kw) -> RolloutSpec:
    base = dict(
        setting="clarifying",
        mode="thinking",
        n_turns=3,
        temperatures=[0.0, 0.0],
        max_new_tokens=5,
        batch_size=4,
        seed=0,
    )
    return RolloutSpec(**{**base, **kw})


def test_seeded_runs_start_with_the_prefix_and_other_runs_are_untouched(tiny):
    model, tok = tiny
    plain = rollout_tasks(model, tok, TASKS, spec())
    seeded = rollout_tasks(model, tok, TASKS, spec(explore_runs=[1], explore_prefixes={1: ASK, 2: "<thinking>"}))
    for p, s in zip(plain, seeded, strict=True):
        if s.run == 0:  # greedy rows do not depend on their batch-mates: identical to the run without exploration
            assert s.messages == p.messages and "explore_prefixes" not in s.meta
            continue
        letter = explore_letter(TASKS[int(s.task_id.split("/")[1])], 1, 0)
        forced = {1: f"What does option {letter}", 2: "<thinking>"}
        assert s.meta["explore_prefixes"] == forced
        replies = [m["content"] for m in s.messages if m["role"] == "assistant"]
        assert replies[0].startswith(forced[1]) and replies[1].startswith("<thinking>")
    # the same call twice gives the same conversations (the letter is drawn from the rollout seed)
    again = rollout_tasks(model, tok, TASKS, spec(explore_runs=[1], explore_prefixes={1: ASK, 2: "<thinking>"}))
    assert [r.messages for r in again] == [r.messages for r in seeded]


def test_seeded_reply_is_the_prefix_plus_the_models_continuation(tiny):
    """The forced start is encoded after the assistant header and the model continues it: the reply is exactly the
    prefix followed by the greedy continuation of that prompt (the token budget counts generated tokens only)."""
    model, tok = tiny
    engine = GenerationEngine(model, tok, batch_size=2, max_new_tokens=5)
    conv = [{"role": "system", "content": "You are a student."}, {"role": "user", "content": "Ask one question."}]
    (forced,) = engine.generate([conv], [0.0], seed=0, assistant_prefixes=["What does option B"])
    prompt = engine.encode(conv, assistant_prefix="What does option B")
    assert prompt[: len(engine.encode(conv))] == engine.encode(conv)  # the header, then the forced start
    ids = torch.tensor([prompt])
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=5,
        min_new_tokens=min(engine.min_new_tokens, 5),
        eos_token_id=engine.end_ids,
        pad_token_id=engine.pad_id,
    )[0, len(prompt) :].tolist()
    end = next((k for k, t in enumerate(out) if t in engine.end_ids), len(out))
    assert forced.text == ("What does option B" + tok.decode(out[:end], skip_special_tokens=True)).strip()
    assert forced.n_tokens == min(end + 1, len(out))
    with pytest.raises(ValueError, match="1 assistant prefixes for 2"):
        engine.generate([conv, conv], [0.0, 0.0], seed=0, assistant_prefixes=["x"])


def test_seeded_rollout_same_with_and_without_kv_reuse(tiny):
    model, tok = tiny
    s = spec(explore_runs=[0, 1], explore_prefixes={1: ASK, 2: "<thinking>"})
    runs = [
        rollout_tasks(
            model,
            tok,
            TASKS,
            s,
            engine=GenerationEngine(model, tok, batch_size=4, max_new_tokens=5, reuse_kv_cache=reuse),
        )
        for reuse in (True, False)
    ]
    assert [r.messages for r in runs[0]] == [r.messages for r in runs[1]]


def test_explore_letter_is_uniform_and_ignores_the_gold():
    tasks = [QATask(f"t/{k}", "sciq", "q?", ["a", "b", "c", "d"], "A") for k in range(400)]
    counts = {x: 0 for x in "ABCD"}
    for t in tasks:
        counts[explore_letter(t, 1, 0)] += 1
    assert all(70 <= c <= 130 for c in counts.values()), counts  # 100 each expected; gold is always A
    three = QATask("t/x", "sciq", "q?", ["a", "b", "c"], "A")
    assert {explore_letter(three, r, s) for r in range(5) for s in range(20)} == {"A", "B", "C"}


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(explore_runs=[2], explore_prefixes={1: ASK}), "not runs"),
        (dict(explore_runs=[0], explore_prefixes={4: ASK}), "not an assistant turn"),
        (dict(explore_runs=[0], explore_prefixes={1: "option {gold}"}), "only placeholder"),
        (dict(explore_runs=[0], explore_prefixes={1: "  "}), "non-empty"),
        (dict(explore_runs=[0]), "needs explore_prefixes"),
        (dict(explore_prefixes={1: ASK}), "seeds nothing"),
    ],
)
def test_bad_explore_options_are_named(kw, message):
    with pytest.raises(ValueError, match=message):
        check_explore(spec(**kw))


def test_branches_are_never_seeded(tiny):
    model, tok = tiny
    s = spec(explore_runs=[1], explore_prefixes={1: ASK})
    parents = rollout_tasks(model, tok, TASKS, s)
    branches = branch_rollouts(model, tok, TASKS, parents, s, runs=[1])
    assert len(branches) == 4 * 3 and not any("explore_prefixes" in b.meta for b in branches)
    step1 = [b for b in branches if b.meta["branch_step"] == 1]
    plain = {r.task_id: r for r in rollout_tasks(model, tok, TASKS, spec(temperatures=[0.0]))}
    # a branch at the seeded turn is the model's own greedy reply: the unseeded run's turn 1
    assert all(b.messages[2] == plain[b.task_id].messages[2] for b in step1)


def test_endpoint_policy_refuses_forced_starts():
    engine = EndpointPolicyEngine.__new__(EndpointPolicyEngine)
    with pytest.raises(NotImplementedError, match="local policy"):
        engine.generate([[{"role": "user", "content": "hi"}]], [0.0], seed=0, assistant_prefixes=["What"])


def args(out: Path, *extra: str) -> list[str]:
    return [
        "--config",
        str(ROOT / "configs" / "simulate" / "tiny-clarifying.yaml"),
        "--data.path",
        str(FIXTURE),
        "--output",
        str(out),
        "--progress",
        "false",
        "--data.limit",
        "2",
        "--chunk_size",
        "1",
        "--rollout.max_new_tokens",
        "5",
        *extra,
    ]


@pytest.mark.slow
def test_simulate_command_seeds_counts_and_fingerprints(tmp_path, clarify_cache):
    out = tmp_path / "run"
    explore = ["--explore_runs", "[2]", "--explore_prefixes", json.dumps({1: ASK})]
    main(args(out, *explore))
    records, _ = load_records(out / "conversations.jsonl")
    seeded = [r for r in records if "explore_prefixes" in r.meta]
    assert {r.run for r in seeded} == {2} and len(seeded) == 2
    assert all(r.messages[2]["content"].startswith(r.meta["explore_prefixes"]["1"]) for r in seeded)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["explore_seeded"] == 2
    # a resume with other exploration options is refused (its records would differ)
    with pytest.raises(ValueError, match="explore"):
        main(args(out, "--resume", "true", "--explore_runs", "[1]", "--explore_prefixes", json.dumps({1: ASK})))
    main(args(out, "--resume", "true", *explore))  # the same options resume
    with pytest.raises(ValueError, match="not runs"):
        main(args(tmp_path / "bad", "--explore_runs", "[5]", "--explore_prefixes", json.dumps({1: ASK})))
    # nothing left that would refuse the corrected command
    main(args(tmp_path / "bad", "--explore_runs", "[1]", "--explore_prefixes", json.dumps({1: ASK})))


def test_fingerprint_without_exploration_is_unchanged():
    from clarify_lit.simulate.command import parse_config

    cfg = parse_config(["--config", str(ROOT / "configs" / "simulate" / "tiny-clarifying.yaml")])
    conf = run_fingerprint(cfg, ["a"])["config"]
    assert "explore_runs" not in conf and "explore_prefixes" not in conf


def test_clarify_preset_seeds_only_the_explore_cells_simulation(tmp_path):
    from clarify_lit.jobs.demo import PRESETS, evaluate_args, iterate_args, rollout_eval_args, simulate_args
    from clarify_lit.simulate.command import parse_config

    p = PRESETS["clarify"]
    cells = {e.tag: e for e in p.experiments}
    explore, plain = cells["rubric-explore"], cells["rubric"]
    sim = parse_config(simulate_args(p, explore, 0, "train", tmp_path)[1:])
    assert sim.explore_runs == [1, 3] and sim.rollout.temperatures == [0.3, 0.7, 1.0, 0.7]
    assert {int(k): v for k, v in sim.explore_prefixes.items()} == {1: "What does option {letter}"}
    assert parse_config(simulate_args(p, plain, 0, "train", tmp_path)[1:]).explore_runs is None
    # the trained policy is evaluated unaided: no exploration flag reaches evaluation or the rollout callback
    for args in (
        evaluate_args(p, explore, 0, "Refit", tmp_path, tmp_path / "export"),
        rollout_eval_args(p, explore, 0),
    ):
        assert not any("explore" in a for a in args)
    # clarify iterate logs each round's data the same way (its simulate args carry the seeding)
    it = iterate_args(p, explore, 0, 2, tmp_path)
    assert "--explore_runs" in json.loads(it[it.index("--simulate_args") + 1])
