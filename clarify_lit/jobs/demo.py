"""The main job: simulate → fit ×4 → evaluate ×5 (with Base) → report, driven through the ``clarify`` commands.

    python -m clarify_lit.demo --preset demo        # `make demo`: the open cell, small: 13.3 min on 2 cores (README)
    python -m clarify_lit.demo --preset demo-mc     # the multiple-choice demo (`make demo` until issue 26): 7.7 min
    python -m clarify_lit.demo --preset reproduce   # `make reproduce`: the paper's protocol scaled to ≤ 2 h on CPU
    python -m clarify_lit.demo --preset clarify     # `make clarify`: the clarifying cell, informative teacher, rubric
    python -m clarify_lit.demo --preset open        # open mode: ask, then answer in words (docs/simulate.md#open-mode)
    python -m clarify_lit.demo --preset paper --dry_run true   # the paper's full scale (GPU): print the commands
    python -m clarify_lit.demo --preset demo --iterate 2  # then `clarify iterate`, 2 rounds (~10 more min on CPU)
    python -m clarify_lit.demo --preset reproduce --jobs 2  # two independent stages at a time (`make reproduce`)

Every stage is an ordinary ``clarify`` command run in a subprocess (printed before it runs, so the demo doubles as a
recipe) and every stage skips work whose output already exists, so an interrupted demo resumes where it stopped.
Choices for the CPU presets (where the paper is silent or its scale does not fit) are explained in docs/demo.md.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

from clarify_lit.arguments import CommandLine, renamed_switches
from clarify_lit.io import atomic_write
from clarify_lit.jobs.stages import Stage, StageRunner
from clarify_lit.models import DTypeChoice

OBJECTIVES = {  # label → objective preset; the table's row names follow the paper
    "Refit": "configs/objective/refit.yaml",
    "Swift": "configs/objective/swift.yaml",
    "SFT": "configs/objective/sft.yaml",
    "STaR-GATE-D": "configs/objective/star-gate-d.yaml",  # teacher: the same cell's SFT export (fitted before it)
    "DPO": "configs/objective/dpo.yaml",
    "StepDPO": "configs/objective/step-dpo.yaml",  # needs the simulate step's branches (Preset.step_branches)
}
BASIC_OBJECTIVES = ["Refit", "Swift", "SFT", "DPO"]


@dataclass
class Cell:
    """One (dataset, setting) cell of the paper's protocol."""

    dataset: str
    setting: str  # reasoning | clarifying
    mode: str  # thinking | standard | open (the question without options, the answer in words)
    teacher: str  # scripted | retrieval | llm
    # the per-turn token cap of this cell's simulate and evaluate (None: the preset's); chosen from measured turn
    # lengths (docs/demo.md#token-caps)
    max_new_tokens: int | None = None
    # the cell's reward (None: the preset's) and extra teacher/reward flags passed to both its simulate and its
    # evaluate commands (e.g. ["--teacher.hide_mode", "drop"]); ``tag`` tells such a cell apart in folder names
    reward: str | None = None
    options: list[str] = field(default_factory=list)
    tag: str = ""
    # flags for the cell's simulate command only (how the logged data is made, e.g. seeded exploration); never
    # passed to evaluate, which always rolls the policy out unaided
    sim_options: list[str] = field(default_factory=list)
    # the cell's runs per question (None: the preset's temperatures)
    temperatures: list[float] | None = None
    # assistant turns per conversation (open clarifying: 2 = ask, then answer, as its value of asking was measured)
    n_turns: int = 3

    @property
    def name(self) -> str:
        return f"{self.dataset}-{self.setting}-{self.mode}" + (f"-{self.tag}" if self.tag else "")


@dataclass
class Preset:
    name: str
    model: str
    experiments: list[Cell]  # the preset's cells (`--experiments` picks some by name or tag)
    n_train: int
    n_test: int
    seeds: list[int]
    temperatures: list[float] = field(default_factory=lambda: [0.3, 0.7, 1.0])
    reward: str = "correct"
    max_new_tokens: int = 64
    eval_max_new_tokens: int = 64
    sim_batch_size: int = 16
    # tasks per resumable simulate shard; also the most tasks one generate call can batch, so reproduce sets it to
    # its batch size (the demo keeps 8, the value its README table was measured with)
    sim_chunk_size: int = 8
    eval_batch_size: int = 16
    model_config: str = "configs/model/smollm2-135m.yaml"
    # precision auto: bf16-mixed on a CPU with native bf16, else 32-true (docs/environment.md)
    trainer_config: str = "configs/trainer/cpu-auto.yaml"
    epochs: int = 1
    fit_overrides: list[str] = field(default_factory=list)
    # generation dtype of simulate/evaluate/the rollout callback: auto = bfloat16 where the CPU has native bf16
    # (avx512_bf16/amx_bf16: ~1.7x faster than fp32 there; the README's tables), else float32 (bf16 is emulated and
    # ~2x slower on such a CPU: issue 24); docs/environment.md
    gen_dtype: DTypeChoice = "auto"
    # question split: None = each seed draws its own train/test questions; an int fixes one split for all seeds, so
    # seeds vary only sampling, LoRA init and data order, every method is paired on the same test questions, and
    # the deterministic (greedy) Base evaluation runs once instead of once per seed
    split_seed: int | None = None
    # which rows to train (OBJECTIVES labels, in order); StepDPO makes the simulate step branch (about 2x its
    # generation), STaR-GATE-D needs SFT before it (its teacher)
    objectives: list[str] = field(default_factory=lambda: list(BASIC_OBJECTIVES))
    label_overrides: dict[str, list[str]] = field(default_factory=dict)  # extra `clarify fit` args per label
    # names shown in the report where they differ from the run labels: the paper calls the SFT-on-best-runs row
    # STaR-GATE; the demo keeps "SFT" (its issue asks for those five row names), run folders keep the labels
    display_names: dict[str, str] = field(default_factory=dict)
    # the rollout block's mix_temperatures (runs of different temperatures in one generate batch) and
    # reuse_kv_cache (continue each batch's KV cache from turn to turn); False reproduces rollouts made before the
    # options existed (and lets a resume continue such a simulation)
    mix_temperatures: bool = True
    reuse_kv_cache: bool = True
    # rollout curves in TensorBoard during every fit (configs/callbacks/rollout-eval.yaml; docs/demo.md#rollout-curves):
    # greedy rollouts of the policy being trained on the first `rollout_questions` TEST questions of the cell's split
    # (never a training question), before the first step, `rollout_evals_per_epoch` times per epoch (the fits have no
    # validation split, so the callback runs on training progress) and at the end; 0 questions = no callback. Each
    # evaluation costs about as much as a whole `clarify evaluate` of the cell (its decode steps, not its questions,
    # set the time on CPU), so the demo keeps two per fit
    rollout_questions: int = 0
    rollout_evals_per_epoch: int = 0

    def __post_init__(self) -> None:
        unknown = [o for o in self.objectives if o not in OBJECTIVES]
        if unknown:
            raise ValueError(f"preset {self.name!r}: unknown objectives {unknown}; choose from {list(OBJECTIVES)}")
        if "STaR-GATE-D" in self.objectives and "SFT" not in self.objectives[: self.objectives.index("STaR-GATE-D")]:
            raise ValueError(f"preset {self.name!r}: STaR-GATE-D distils the SFT run, so SFT must come before it")
        if not 0 <= self.rollout_questions <= self.n_test:
            raise ValueError(
                f"preset {self.name!r}: rollout_questions={self.rollout_questions} must be in "
                f"[0, n_test={self.n_test}] (the callback rolls out test questions only)"
            )
        if self.rollout_evals_per_epoch < 0:
            raise ValueError(f"preset {self.name!r}: rollout_evals_per_epoch must be >= 0")

    @property
    def step_branches(self) -> bool:
        return "StepDPO" in self.objectives


# seeded exploration of the `clarify` preset's rubric-explore cell: runs 1 and 3 of [0.3, 0.7, 1.0, 0.7] are seeded
EXPLORE_TEMPERATURES = [0.3, 0.7, 1.0, 0.7]
# (turn 1 only: seeding turn 2 with "<thinking>" was probed on 8 questions and the 135M model closed the tag in 0 of
# 8 replies, writing filler that cost the seeded runs their `concise` credit, i.e. the reward of asking)
EXPLORE_OPTIONS = ["--explore_runs", "[1, 3]", "--explore_prefixes", json.dumps({1: "What does option {letter}"})]

# open mode's logging policy: the untrained 135M model asks in 5 % of greedy turn-1 replies (results/open/
# value-of-asking.md), so runs 1 and 3 of [0.3, 0.7, 1.0, 0.7] start turn 1 with "What" (probed on 48 training
# questions at T = 0.7/1.0: 39 % of seeded turns hold exactly one question, against 21 % unseeded; accuracy 0.19 when
# asked, 0.02 when not). The rest of the question is the policy's own, and evaluation never seeds.
OPEN_EXPLORE_OPTIONS = ["--explore_runs", "[1, 3]", "--explore_prefixes", json.dumps({1: "What"})]

PRESETS: dict[str, Preset] = {
    # `make demo`: a small version of the open cell below (issue 26): the question without its options, the teacher
    # that answers questions only, n = 2, the `correct` reward; 48 training questions x 4 runs (two seeded with "What"),
    # 48 held-out questions (enough for the paired test to mean something), Refit, Swift, STaR-GATE (SFT) and DPO
    "demo": Preset(
        name="demo",
        model="embedded:smollm2-135m-instruct",
        experiments=[
            Cell(
                "sciq",
                "clarifying",
                "open",
                "open",
                max_new_tokens=48,
                n_turns=2,
                sim_options=OPEN_EXPLORE_OPTIONS,
                temperatures=EXPLORE_TEMPERATURES,
            )
        ],
        n_train=48,
        n_test=48,
        seeds=[0],
        split_seed=0,
        max_new_tokens=48,
        eval_max_new_tokens=48,
        epochs=2,
        sim_batch_size=32,
        sim_chunk_size=32,
        eval_batch_size=48,
        rollout_questions=4,  # 2 points per fit: step 0 and the end (docs/demo.md#rollout-curves: the cost)
    ),
    # the main job until issue 26 (multiple choice, reasoning setting): results/demo/sciq-reasoning-standard.*
    "demo-mc": Preset(
        name="demo-mc",
        model="embedded:smollm2-135m-instruct",
        experiments=[Cell("sciq", "reasoning", "standard", "scripted")],
        n_train=16,
        n_test=16,
        seeds=[0],
        max_new_tokens=40,
        eval_max_new_tokens=40,
        epochs=2,
        rollout_questions=4,  # 2 points per fit: step 0 and the end (docs/demo.md#rollout-curves: the cost)
    ),
    "reproduce": Preset(
        name="reproduce",
        model="embedded:smollm2-135m-instruct",
        # token caps from measured base-policy turn lengths (docs/demo.md#token-caps): clarifying turns finish under
        # 64 tokens 75-94 % of the time; reasoning turns 1-2 ramble past 160 tokens whatever the cap, so the cheap 40
        # stays (the cut turns' end-of-turn tokens are masked in training; the final answer's letter comes first)
        # the clarifying cell keeps the dropping teacher (hide_mode drop, with the BM25 ranking of 2026-11-30; the
        # first seed-0 cell used an older ranking and was re-run): the paper-faithful `correct` baseline; the
        # `clarify` preset holds the cells with the informative (blanking) teacher and the rubric
        experiments=[
            Cell("sciq", "reasoning", "standard", "scripted"),
            Cell(
                "sciq",
                "clarifying",
                "thinking",
                "retrieval",
                max_new_tokens=64,
                options=["--teacher.hide_mode", "drop"],
            ),
        ],
        n_train=32,
        n_test=100,
        seeds=[0, 1],
        split_seed=0,
        max_new_tokens=40,
        eval_max_new_tokens=40,
        epochs=1,
        sim_batch_size=32,
        sim_chunk_size=32,
        eval_batch_size=50,
        objectives=list(OBJECTIVES),
        # the paper's lr 3e-6 barely moves a fresh LoRA on 135M in 2 epochs of ~32 conversations (STaR-GATE-D would
        # equal Base): use the lr every other row uses on this model (configs/model/smollm2-135m.yaml)
        label_overrides={"STaR-GATE-D": ["--model.learning_rate", "2.0e-4"]},
        display_names={"SFT": "STaR-GATE"},
        rollout_questions=8,
        rollout_evals_per_epoch=2,  # one epoch: points at step 0, mid-epoch and the end
    ),
    # issue "Learning to clarify": the clarifying cell with the three levers — the teacher that blanks the gold text
    # (worth asking), and the reward: 0/1 correctness, the offline rubric, and the rubric with the dense gold-answer
    # probability in place of correctness (so Swift has variance on most questions). Same split and rows as
    # `reproduce`; about 3x its clarifying cell's time on this CPU. The fourth cell, rubric-explore, adds seeded
    # exploration to the rubric cell's logging policy (docs/simulate.md#seeded-exploration): a fourth run per
    # question, and runs 1 and 3 start turn 1 with "What does option X", because the 135M model alone asks one
    # question in 2 % of turn-1 replies (nothing to reweight).
    "clarify": Preset(
        name="clarify",
        model="embedded:smollm2-135m-instruct",
        experiments=[
            Cell(
                "sciq",
                "clarifying",
                "thinking",
                "retrieval",
                max_new_tokens=64,
                reward=r,
                options=["--teacher.hide_mode", "blank", *o],
                tag=tag,
                sim_options=so,
                temperatures=EXPLORE_TEMPERATURES if so else None,
            )
            for r, o, tag, so in (
                ("correct", [], "correct", []),
                ("rubric", [], "rubric", []),
                ("rubric", ["--reward.rubric_accuracy", "gold_prob"], "rubric-dense", []),
                ("rubric", [], "rubric-explore", EXPLORE_OPTIONS),
            )
        ],
        n_train=32,
        n_test=100,
        seeds=[0, 1],
        split_seed=0,
        max_new_tokens=64,
        eval_max_new_tokens=64,
        epochs=1,
        sim_batch_size=32,
        sim_chunk_size=32,
        eval_batch_size=50,
        objectives=list(OBJECTIVES),
        label_overrides={"STaR-GATE-D": ["--model.learning_rate", "2.0e-4"]},
        display_names={"SFT": "STaR-GATE"},
        rollout_questions=8,
        rollout_evals_per_epoch=2,  # one epoch: points at step 0, mid-epoch and the end
    ),
    # issue "Learning to clarify where the embedded model can": open mode (docs/simulate.md#open-mode), the clarifying
    # setting with the teacher that answers questions only, n = 2 (ask, then answer in words), the `correct` reward
    # alone. Same test questions as reproduce (split seed 0, the first 100 of the test part); 64 training questions
    # x 4 runs (seeded exploration on 2), two epochs (the logged data hold few correct conversations)
    "open": Preset(
        name="open",
        model="embedded:smollm2-135m-instruct",
        experiments=[
            Cell(
                "sciq",
                "clarifying",
                "open",
                "open",
                max_new_tokens=48,
                n_turns=2,
                sim_options=OPEN_EXPLORE_OPTIONS,
                temperatures=EXPLORE_TEMPERATURES,
            )
        ],
        n_train=64,
        n_test=100,
        seeds=[0, 1],
        split_seed=0,
        max_new_tokens=48,
        eval_max_new_tokens=48,
        epochs=2,
        sim_batch_size=32,
        sim_chunk_size=32,
        eval_batch_size=50,
        objectives=list(OBJECTIVES),
        label_overrides={"STaR-GATE-D": ["--model.learning_rate", "2.0e-4"]},
        display_names={"SFT": "STaR-GATE"},
    ),
    "paper": Preset(
        name="paper",
        model="meta-llama/Llama-3.1-8B-Instruct",
        experiments=[
            Cell(d, "reasoning", "thinking", "scripted")
            for d in ("openbookqa", "arc_easy", "arc_challenge", "sciq", "mmlu")
        ]
        + [Cell(d, "clarifying", "thinking", "llm") for d in ("openbookqa", "sciq")],
        n_train=400,
        n_test=100,
        seeds=[0, 1, 2],
        reward="llm_judge",
        max_new_tokens=256,
        eval_max_new_tokens=256,
        sim_batch_size=32,
        eval_batch_size=32,
        model_config="configs/model/llama-3.1-8b.yaml",
        trainer_config="configs/trainer/gpu-2x-deepspeed.yaml",
        epochs=1,
        objectives=list(OBJECTIVES),
        label_overrides={"STaR-GATE-D": ["--trainer.max_epochs", "2"]},  # the paper's 2 epochs for this baseline
        display_names={"SFT": "STaR-GATE"},
    ),
}


def split_seed(p: Preset, seed: int) -> int:
    return seed if p.split_seed is None else p.split_seed


def rollout_block(
    p: Preset, e: Cell, seed: int, *, temperatures: list[float] | None = None, max_new_tokens: int, batch_size: int
) -> dict[str, Any]:
    """The cell's ``--rollout`` options (one block for its simulate, evaluate and rollout-callback commands);
    ``temperatures`` None: the command's default (evaluation: one greedy run)."""
    return {
        "setting": e.setting,
        "mode": e.mode,
        "n_turns": e.n_turns,
        **({"temperatures": temperatures} if temperatures is not None else {}),
        "max_new_tokens": e.max_new_tokens or max_new_tokens,
        "batch_size": batch_size,
        "seed": seed,
        "mix_temperatures": p.mix_temperatures,
        "reuse_kv_cache": p.reuse_kv_cache,
    }


def simulate_args(p: Preset, e: Cell, seed: int, part: str, out: Path) -> list[str]:
    rollout = rollout_block(
        p,
        e,
        seed,
        temperatures=e.temperatures or p.temperatures,
        max_new_tokens=p.max_new_tokens,
        batch_size=p.sim_batch_size,
    )
    return [
        "simulate",
        "--model",
        p.model,
        "--data.dataset",
        e.dataset,
        "--data.part",
        part,
        "--data.n_train",
        str(p.n_train),
        "--data.n_test",
        str(p.n_test),
        "--data.seed",
        str(split_seed(p, seed)),
        "--rollout",
        json.dumps(rollout),
        "--teacher.kind",
        e.teacher,
        "--reward.kind",
        e.reward or p.reward,
        *e.options,
        "--chunk_size",
        str(p.sim_chunk_size),
        "--dtype",
        p.gen_dtype,
        "--output",
        str(out),
        "--resume",
        "true",
        *(["--step_branches", "true"] if p.step_branches and part == "train" else []),
        *e.sim_options,
    ]


def fit_args(
    p: Preset, records: Path | list[Path], objective: str, seed: int, root: Path, extra: list[str] | None = None
) -> list[str]:
    files = ",".join(str(r) for r in (records if isinstance(records, list) else [records]))
    return [
        "fit",
        "--config",
        p.model_config,
        "--config",
        p.trainer_config,
        "--config",
        objective,
        "--model.model_name_or_path",
        p.model,
        f"--data.train_files=[{files}]",
        "--data.val_fraction",
        "0",
        "--data.seed",
        str(seed),
        "--seed_everything",
        str(seed),
        "--trainer.max_epochs",
        str(p.epochs),
        "--trainer.default_root_dir",
        str(root),
        "--ckpt_path",
        "last_or_none",  # an interrupted fit resumes
        *p.fit_overrides,
        *(extra or []),
    ]


ROLLOUT_EVAL = "configs/callbacks/rollout-eval.yaml"
CALLBACK = "--trainer.callbacks.init_args."  # flags of the (only) callback the rollout-eval config adds


def rollout_eval_args(p: Preset, e: Cell, seed: int) -> list[str]:
    """``clarify fit`` args adding the rollout callback on the cell's held-out questions (none when the preset's
    ``rollout_questions`` is 0): the same data options as the cell's simulate and evaluate commands (so the same
    split: the callback always takes the *test* part, the first ``rollout_questions`` of the questions ``clarify
    evaluate`` scores), setting, mode, teacher, reward and token cap. The cell's extra teacher/reward flags
    (``Cell.options``) are passed to the callback's own ``teacher``/``reward`` options."""
    if not p.rollout_questions:
        return []
    options = [CALLBACK + o[2:] if o.startswith("--") else o for o in e.options]
    rollout = rollout_block(
        p,
        e,
        seed,
        temperatures=[0.0],
        max_new_tokens=p.eval_max_new_tokens,
        batch_size=min(p.rollout_questions, p.eval_batch_size),
    )
    return [
        "--config",
        ROLLOUT_EVAL,
        f"{CALLBACK}data.dataset={e.dataset}",
        f"{CALLBACK}data.part=test",
        f"{CALLBACK}data.n_train={p.n_train}",
        f"{CALLBACK}data.n_test={p.n_test}",
        f"{CALLBACK}data.seed={split_seed(p, seed)}",
        f"{CALLBACK}n_questions={p.rollout_questions}",
        f"{CALLBACK}rollout={json.dumps(rollout)}",
        f"{CALLBACK}teacher.kind={e.teacher}",
        f"{CALLBACK}reward.kind={e.reward or p.reward}",
        *options,
        f"{CALLBACK}dtype={p.gen_dtype}",  # a merged copy in the evaluation's dtype (auto: as evaluate resolves it)
        f"{CALLBACK}evals_per_epoch={p.rollout_evals_per_epoch}",
        f"{CALLBACK}at_fit_start=true",
    ]


def label_fit_inputs(p: Preset, label: str, cell: Path) -> tuple[list[Path], list[str]]:
    """Training files and extra ``clarify fit`` args of one row: StepDPO adds the branches, STaR-GATE-D names the
    cell's SFT export as its teacher."""
    sim = cell / "simulate"
    files = [sim / "conversations.jsonl"] + ([sim / "branches.jsonl"] if label == "StepDPO" else [])
    extra = ["--model.objective.teacher", str(cell / "fit" / "SFT" / "export")] if label == "STaR-GATE-D" else []
    return files, extra + p.label_overrides.get(label, [])


def evaluate_args(p: Preset, e: Cell, seed: int, label: str, out: Path, export: Path | None) -> list[str]:
    # the Base row evaluates the untrained model; the others their exported adapter (which names its base model)
    source = ["--export_dir", str(export)] if export is not None else ["--model", p.model]
    rollout = rollout_block(p, e, seed, max_new_tokens=p.eval_max_new_tokens, batch_size=p.eval_batch_size)
    return [
        "evaluate",
        *source,
        "--method",
        label,
        "--data.dataset",
        e.dataset,
        "--data.n_train",
        str(p.n_train),
        "--data.n_test",
        str(p.n_test),
        "--data.seed",
        str(split_seed(p, seed)),
        "--n_questions",
        str(p.n_test),
        "--rollout",
        json.dumps(rollout),
        "--teacher.kind",
        e.teacher,
        "--reward.kind",
        e.reward or p.reward,
        *e.options,
        "--dtype",
        p.gen_dtype,
        "--out_dir",
        str(out),
    ]


ITERATE_OBJECTIVE = (
    "configs/objective/refit.yaml"  # iterated Refit: each round maximises a bound tight at its data's policy
)


def iterate_args(p: Preset, e: Cell, seed: int, rounds: int, out: Path) -> list[str]:
    """``clarify iterate`` with the preset's settings for one experiment and seed (docs/iterate.md)."""
    return [
        "iterate",
        "--rounds",
        str(rounds),
        "--output",
        str(out),
        "--model",
        p.model,
        "--model_config",
        p.model_config,
        "--trainer_config",
        p.trainer_config,
        "--objective_config",
        ITERATE_OBJECTIVE,
        "--fit_args",
        json.dumps([f"--trainer.max_epochs={p.epochs}", *p.fit_overrides]),
        "--data.dataset",
        e.dataset,
        "--data.n_train",
        str(p.n_train),
        "--data.n_test",
        str(p.n_test),
        "--data.seed",
        str(seed),
        "--rollout",
        json.dumps(
            rollout_block(
                p,
                e,
                seed,
                temperatures=e.temperatures or p.temperatures,
                max_new_tokens=p.max_new_tokens,
                batch_size=p.sim_batch_size,
            )
        ),
        "--teacher.kind",
        e.teacher,
        "--reward.kind",
        e.reward or p.reward,
        *e.options,
        "--simulate_args",
        json.dumps(["--chunk_size", str(p.sim_chunk_size), *e.sim_options]),
        "--dtype",
        p.gen_dtype,
    ]


def run_iterate(p: Preset, out: Path, rounds: int, dry_run: bool = False) -> None:
    """``clarify iterate`` on the preset's first experiment and seed, under ``<out>/iterate/<experiment>``. No done
    marker: the command skips its own finished stages, and a larger ``rounds`` extends an earlier run."""
    e, seed = p.experiments[0], p.seeds[0]
    StageRunner(out, tag="demo", dry_run=dry_run, stage_times=True).run(
        iterate_args(p, e, seed, rounds, out / "iterate" / e.name)
    )


def report_args(p: Preset, runs: Path, table_dir: Path) -> list[str]:
    """``clarify report`` over one experiment's runs: rows in the paper's order (Base, then the preset's objectives),
    the preset's display names."""
    show = [p.display_names.get(label, label) for label in ["Base", *p.objectives]]
    renames = [f"{old}={new}" for old, new in p.display_names.items() if old in p.objectives]
    return [
        "report",
        str(runs),
        "--out",
        str(table_dir / f"{runs.name}.md"),
        "--plot",
        str(table_dir / f"{runs.name}.png"),
        "--html",
        str(table_dir / f"{runs.name}.html"),
        "--baseline",
        "Base",
        "--order",
        *show,
        *(["--rename", *renames] if renames else []),
    ]


def preset_stages(
    p: Preset, out: Path, results: Path | None = None, only_seeds: list[int] | None = None, dry_run: bool = False
) -> list[Stage]:
    """Every stage of the preset in the order they run one after another, each with the stages it reads: a fit
    reads its cell's simulation (STaR-GATE-D also the SFT export), an evaluation its fit, a cell's report and rollout
    archive every stage of that cell. ``only_seeds`` keeps a subset of the preset's seeds (e.g. seed 0 of every
    experiment first); the Base row is still evaluated in the preset's first seed's cell only, so running seeds
    separately never evaluates (and counts) Base twice."""
    unknown = sorted(set(only_seeds or []) - set(p.seeds))
    if unknown:
        raise ValueError(f"preset {p.name!r}: seeds {unknown} are not among its seeds {p.seeds}")
    stages: list[Stage] = []

    def add(args: list[str], done: bool = False, needs: tuple[int, ...] = (), then=None) -> int:
        stages.append(Stage(args, done, needs, then))
        return len(stages) - 1

    for e in p.experiments:
        first = len(stages)
        for seed in [s for s in p.seeds if only_seeds is None or s in only_seeds]:
            cell = out / e.name / f"seed{seed}"
            sim = cell / "simulate"
            simulated = add(
                simulate_args(p, e, seed, "train", sim),
                (sim / ("branches.jsonl" if p.step_branches else "conversations.jsonl")).exists(),
            )
            # greedy evaluation of the untrained model depends only on the questions: once per split
            if p.split_seed is None or seed == p.seeds[0]:
                add(
                    evaluate_args(p, e, seed, "Base", cell / "eval" / "Base", None),
                    (cell / "eval" / "Base" / "metrics.json").exists(),
                )
            fitted: dict[str, int] = {}
            for label in p.objectives:
                root = cell / "fit" / label
                files, extra = label_fit_inputs(p, label, cell)
                teacher = (fitted["SFT"],) if label == "STaR-GATE-D" else ()  # its teacher is the SFT export
                fitted[label] = add(
                    fit_args(p, files, OBJECTIVES[label], seed, root, [*rollout_eval_args(p, e, seed), *extra]),
                    (root / "export" / "adapter_config.json").exists(),
                    (simulated, *teacher),
                )
                add(
                    evaluate_args(p, e, seed, label, cell / "eval" / label, root / "export"),
                    (cell / "eval" / label / "metrics.json").exists(),
                    (fitted[label],),
                )
        table_dir = results or out
        archive = None if dry_run else partial(archive_rollouts, out / e.name, table_dir / f"{e.name}-rollouts")
        add(report_args(p, out / e.name, table_dir), needs=tuple(range(first, len(stages))), then=archive)
    return stages


def run_preset(
    p: Preset,
    out: Path,
    dry_run: bool = False,
    results: Path | None = None,
    only_seeds: list[int] | None = None,
    jobs: int = 1,
) -> None:
    """Every stage of the preset (finished ones skipped), up to ``jobs`` at once (see :func:`preset_stages`)."""
    stages = preset_stages(p, out, results, only_seeds, dry_run)
    t0 = time.time()
    StageRunner(out, tag="demo", dry_run=dry_run, stage_times=True).run_all(stages, jobs)
    print(f"\n[demo] preset {p.name!r} finished in {(time.time() - t0) / 60:.1f} min; outputs in {out}")


def archive_rollouts(runs: Path, dest: Path) -> list[Path]:
    """Gzip every evaluation's rollouts and every simulation's logged conversations of one experiment into ``dest``
    (``<seed>-<label>.jsonl.gz``, ``<seed>-logged.jsonl.gz``), so a committed table comes with what the policies said.
    Written with a fixed gzip mtime: rerunning on the same rollouts gives the same bytes."""
    dest.mkdir(parents=True, exist_ok=True)
    made = []
    for cell in sorted(runs.glob("seed*")):
        sources = [(f"{cell.name}-{e.name}", e / "rollouts.jsonl") for e in sorted((cell / "eval").glob("*"))]
        sources.append((f"{cell.name}-logged", cell / "simulate" / "conversations.jsonl"))
        for name, src in sources:
            if src.is_file():
                target = dest / f"{name}.jsonl.gz"
                # the header names the target, not the temp file: the same rollouts give the same bytes
                with (
                    src.open("rb") as f,
                    atomic_write(target, "wb") as out,
                    gzip.GzipFile(str(target), "wb", fileobj=out, mtime=0) as g,
                ):
                    shutil.copyfileobj(f, g)
                made.append(target)
    return made


PresetName = Literal[
    "demo", "demo-mc", "reproduce", "clarify", "open", "paper"
]  # the keys of PRESETS (tests/test_iterate.py checks)


@dataclass
class DemoConfig:
    """Run a preset: simulate → fit ×N → evaluate → report, as ordinary clarify commands (see docs/demo.md)."""

    preset: PresetName = "demo"
    """demo (`make demo`: the open-mode clarifying cell, small), demo-mc (the earlier multiple-choice demo), reproduce
    (`make reproduce`), clarify, open (the open-mode cell, issue 26) or paper (the paper's scale, GPU)."""
    out: str | None = None
    """Output folder (default runs/<preset>)."""
    results: str | None = None
    """Where tables, plots and archived rollouts go (default: the output folder)."""
    dry_run: bool = False
    """Print the commands without running them."""
    iterate: int = 0
    """After the preset, run `clarify iterate` for this many rounds on its first experiment and seed (0 = off; demo
    preset: about 4-5 min per round on a 2-core CPU)."""
    iterate_only: bool = False
    """With --iterate: skip the preset's own stages."""
    seeds: str | None = None
    """Comma-separated: run only these of the preset's seeds, e.g. 0,1 (the report covers whatever has been run)."""
    experiments: str | None = None
    """Comma-separated: run only these of the preset's cells, by folder name or tag (e.g. rubric,rubric-dense for
    `clarify`); --iterate then runs on the first of them."""
    objectives: str | None = None
    """Comma-separated: train only these rows, in this order (default: the preset's), e.g. Refit,Swift; from
    Refit, Swift, SFT, STaR-GATE-D, DPO, StepDPO."""
    jobs: int = 1
    """Run up to this many independent stages at once (a stage waits for the ones it reads; each one's output goes to
    <out>/logs/; same text as one at a time). 1: one after another, on the console. 2 on 2 cores: 1.39x the
    evaluations per hour (docs/demo.md#parallel-stages)."""
    rollout_questions: int | None = None
    """Held-out test questions the rollout callback plays during each fit, for rollout/accuracy, reward, format
    and hedge curves and sample conversations in TensorBoard (default: the preset's; demo 4, reproduce and clarify
    8, paper 0); 0 turns the callback off."""


COMMAND_LINE = CommandLine(
    DemoConfig,
    "python -m clarify_lit.demo",
    __doc__.split("\n\n")[0],
    "CLARIFY_DEMO",
    rewrite=partial(
        renamed_switches,
        renames={"--dry-run": "--dry_run", "--iterate-only": "--iterate_only"},
        prog="python -m clarify_lit.demo",
    ),
)
build_parser, parse_config = COMMAND_LINE.parser, COMMAND_LINE.parse


def preset_of(cfg: DemoConfig) -> Preset:
    """The preset ``cfg`` names, narrowed to its objectives, rollout questions and cells (a bad choice: ValueError)."""
    p = PRESETS[cfg.preset]
    if cfg.objectives:  # replace() re-runs the preset's checks (known labels, SFT before STaR-GATE-D)
        p = dataclasses.replace(p, objectives=[o.strip() for o in cfg.objectives.split(",") if o.strip()])
    if cfg.rollout_questions is not None:
        p = dataclasses.replace(p, rollout_questions=cfg.rollout_questions)
    if cfg.experiments:
        wanted = [x.strip() for x in cfg.experiments.split(",") if x.strip()]
        by_key = {k: e for e in p.experiments for k in (e.name, e.tag) if k}
        unknown = [w for w in wanted if w not in by_key]
        if unknown:
            raise ValueError(f"preset {p.name!r} has no experiments {unknown}; choose from {sorted(by_key)}")
        p = dataclasses.replace(p, experiments=[by_key[w] for w in dict.fromkeys(wanted)])
    if cfg.iterate_only and not cfg.iterate:
        raise ValueError("--iterate_only needs --iterate K")
    if cfg.jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {cfg.jobs}")
    return p


def run(cfg: DemoConfig) -> None:
    """Run the preset of ``cfg`` (finished stages skipped), then ``clarify iterate`` when asked."""
    p = preset_of(cfg)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(cfg.out or f"runs/{p.name}")
    if not cfg.iterate_only:
        seeds = [int(x) for x in cfg.seeds.split(",") if x.strip()] if cfg.seeds else None
        run_preset(p, out, cfg.dry_run, Path(cfg.results) if cfg.results else None, only_seeds=seeds, jobs=cfg.jobs)
    if cfg.iterate:
        run_iterate(p, out, cfg.iterate, cfg.dry_run)


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m clarify_lit.demo`` (the Makefile's demo and reproduce targets); a bad choice of
    preset options is one line on stderr (exit 2)."""
    cfg = parse_config(argv)
    try:
        run(cfg)
    except ValueError as err:
        build_parser().error(str(err))


if __name__ == "__main__":
    main()
