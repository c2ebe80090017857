#!/usr/bin/env bash
# Iterated Swift on the open cell's seed 0 (issue 26; docs/iterate.md#iterated-swift-in-open-mode-issue-26), as run
# for results/open/iterate: round 0 is the cell's seed-0 simulation, Swift fit and evaluations (the same commands
# `clarify iterate` would run, so they are copied, not recomputed), then `clarify iterate` runs the later rounds.
# Usage: bash scripts/open_iterate.sh RUNS ROUNDS   (after python -m clarify_lit.demo --preset open --out RUNS --seeds 0)
set -euo pipefail
RUNS=${1:-runs/open}
ROUNDS=${2:-3}
PY=${PY:-python}
C="$RUNS/sciq-clarifying-open/seed0"
IT="$RUNS/iterate/sciq-clarifying-open"
mkdir -p "$IT/base" "$IT/round_000"
[ -d "$IT/base/eval" ] || cp -r "$C/eval/Base" "$IT/base/eval"
[ -d "$IT/round_000/simulate" ] || cp -r "$C/simulate" "$IT/round_000/simulate"
[ -d "$IT/round_000/fit" ] || cp -r "$C/fit/Swift" "$IT/round_000/fit"
[ -d "$IT/round_000/eval" ] || cp -r "$C/eval/Swift" "$IT/round_000/eval"
$PY -m clarify_lit.cli iterate --rounds "$ROUNDS" --output "$IT" --model embedded:smollm2-135m-instruct \
  --model_config configs/model/smollm2-135m.yaml --trainer_config configs/trainer/cpu-auto.yaml \
  --objective_config configs/objective/swift.yaml --fit_args '["--trainer.max_epochs=2"]' \
  --data.dataset sciq --data.n_train 64 --data.n_test 100 --data.seed 0 \
  --rollout '{setting: clarifying, mode: open, n_turns: 2, temperatures: [0.3, 0.7, 1.0, 0.7], max_new_tokens: 48, batch_size: 32, seed: 0}' \
  --teacher.kind open --reward.kind correct \
  --simulate_args '["--chunk_size", "32", "--explore_runs", "[1, 3]", "--explore_prefixes", "{\"1\": \"What\"}"]' \
  --evaluate_args '["--rollout.batch_size", "50"]' --dtype auto
