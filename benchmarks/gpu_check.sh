#!/usr/bin/env bash
# GPU check (issue 16 §5): one run of at most ~9.5 minutes on one NVIDIA GPU.
#   1. tests/test_gpu.py (marker `gpu`): the tiny model with accelerator=gpu: a fit for each objective (Refit, Swift,
#      SFT, DPO, DPO with a precomputed reference, StepDPO, STaR-GATE-D), rollouts, `clarify simulate`, `clarify
#      evaluate` and `clarify export` on the GPU;
#   2. benchmarks/gpu_bench.py: a Refit step, a DPO step and a greedy rollout batch on random-weight SmolLM2-135M and
#      Llama-3.1-8B (bf16, LoRA), and TRL's weighted SFTTrainer / DPOTrainer on the same shapes
#      -> benchmarks/results/gpu.json (date, GPU, versions, tokens/s, step ms, peak GPU memory).
# Without a CUDA GPU it prints one line and exits 0 (tests/test_gpu_check.py checks that).
#
# Prepare once, on the development machine (its .venv and the package index), before the GPU run:
#     bash benchmarks/gpu_check.sh prepare
#   -> .whl/ (git-ignored, ~22 MB): wheels the GPU image lacks or has in other versions (trl, datasets, dill,
#      multiprocess, jsonargparse + its signature extras, and transformers/peft/regex pinned to the .venv's versions,
#      so the GPU runs the library versions the CPU numbers were measured with) and the embedded SmolLM2 tokenizer
#      (realistic sequence lengths; without it the tiny test tokenizer is used).
# Then, with the device tool, one call (expected ~6-8 min; with the machine's start it takes most of the 15 device
# minutes, so any rerun must be a short one, see the knobs; call give_back after the last call):
#     run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600)
# The wheels are installed into /tmp/site (PYTHONPATH) there; gpu.json and both logs are written to $OUT (they come
# back under the reply's files_at: copy gpu.json to benchmarks/results/gpu.json here, and quote it in the README).
# Knobs: PYTHON (default python3), GPU_CHECK_BUDGET_S (default 560: the bench starts nothing that cannot end by then),
# GPU_TESTS_TIMEOUT_S (default 200), GPU_CHECK_TESTS=0 (measurements only); arguments go to gpu_bench.py, e.g. a
# shorter rerun: GPU_CHECK_TESTS=0 bash benchmarks/gpu_check.sh --archs llama-3.1-8b --variants trl_sft_weighted
set -u
cd "$(dirname "$0")/.." || exit 1
START=$(date +%s)

if [ "${1:-}" = "prepare" ]; then
    PY=${PYTHON:-.venv/bin/python}
    version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || echo "$2"; }
    specs=""
    for pkg in transformers:5.24.0 peft:0.21.2 datasets:5.2.0 dill:0.4.1 multiprocess:0.70.19 jsonargparse:4.53.0 \
               docstring-parser:0.18.0 typeshed-client:2.15.0 regex:2026.11.19 trl:1.16.0; do
        name=${pkg%%:*}
        specs="$specs $name==$(version "$name" "${pkg#*:}")"
        rm -f .whl/"$(echo "$name" | tr - _)"-*.whl  # one version of each, or the install there stops
    done
    mkdir -p .whl
    echo "gpu_check prepare: pip download$specs"
    # shellcheck disable=SC2086
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl $specs || exit 1
    "$PY" -c "import sys; sys.path.insert(0, '.'); from clarify_lit.models import load_tokenizer; \
load_tokenizer('embedded:smollm2-135m-instruct').save_pretrained('.whl/smollm2-tokenizer')" || exit 1
    ls .whl
    du -sh .whl
    exit 0
fi

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
    echo "gpu_check: skipped: no CUDA GPU here (torch.cuda.is_available() is false, or torch is missing)"
    exit 0
fi

LOGDIR=${OUT:-$(mktemp -d)}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "gpu_check: installing the carried wheels (.whl) failed"; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # clarify_lit from this tree (not installed there)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
"$PY" -c "
import importlib
for m in ('torch', 'transformers', 'peft', 'lightning', 'trl', 'datasets', 'jsonargparse', 'accelerate'):
    try:
        print(m, importlib.import_module(m).__version__, end='; ')
    except Exception as e:
        print(m, 'NOT IMPORTABLE', repr(e)[:200], end='; ')
print()"

if [ "${GPU_CHECK_TESTS:-1}" = 0 ]; then
    echo "== 1. GPU tests skipped (GPU_CHECK_TESTS=0)" | tee "$LOGDIR/gpu_tests.log"
    TESTS_RC=0
else
    echo "== 1. GPU tests (tests/test_gpu.py, marker gpu)"
    timeout -k 10 "${GPU_TESTS_TIMEOUT_S:-200}" "$PY" -m pytest -q -m gpu -p no:cacheprovider --durations=10 \
        tests/test_gpu.py 2>&1 | tee "$LOGDIR/gpu_tests.log"
    TESTS_RC=${PIPESTATUS[0]}
fi

echo "== 2. measurements (benchmarks/gpu_bench.py), $(( $(date +%s) - START )) s in"
# written to $LOGDIR after every measurement (a run stopped at the tool's limit still returns what it measured),
# copied into the tree at the end
"$PY" benchmarks/gpu_bench.py --deadline $(( START + ${GPU_CHECK_BUDGET_S:-560} )) --out "$LOGDIR/gpu.json" \
    --pytest_log "$LOGDIR/gpu_tests.log" --pytest_exit "$TESTS_RC" "$@" 2>&1 | tee "$LOGDIR/gpu_bench.log"
BENCH_RC=${PIPESTATUS[0]}
cp "$LOGDIR/gpu.json" benchmarks/results/gpu.json 2>/dev/null
echo "gpu_check: tests exit $TESTS_RC, bench exit $BENCH_RC, $(( $(date +%s) - START )) s;" \
     "benchmarks/results/gpu.json, logs in $LOGDIR"
[ "$TESTS_RC" = 0 ] && [ "$BENCH_RC" = 0 ]
