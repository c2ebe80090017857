#!/usr/bin/env bash
# Tables of the open cell (issue 26) from finished runs: the demo command again (every stage is done, so only its
# report and rollout archive run), the per-seed paired tables against Base, STaR-GATE and DPO (Holm over the six),
# and the iterate report with its rollouts. Usage: bash scripts/open_results.sh RUNS ROWS   (e.g. runs/open Refit,Swift,SFT,DPO)
set -euo pipefail
RUNS=${1:-runs/open}
ROWS=${2:-Refit,Swift,SFT,DPO}
PY=${PY:-python}
OUT=results/open
C="$RUNS/sciq-clarifying-open"
# the report and rollout archive the demo's last stage writes (demo.report_args, demo.archive_rollouts), over the rows run
order=(Base)
for row in ${ROWS//,/ }; do order+=("$([ "$row" = SFT ] && echo STaR-GATE || echo "$row")"); done
$PY -m clarify_lit.cli report "$C" --out "$OUT/sciq-clarifying-open.md" --plot "$OUT/sciq-clarifying-open.png" \
  --html "$OUT/sciq-clarifying-open.html" --baseline Base --order "${order[@]}" --rename SFT=STaR-GATE
$PY -c "import sys; from pathlib import Path; from clarify_lit.jobs.demo import archive_rollouts; \
archive_rollouts(Path(sys.argv[1]), Path(sys.argv[2]))" "$C" "$OUT/sciq-clarifying-open-rollouts"
for s in 0 1; do
  inputs=("Base=$C/seed0/eval/Base")
  pairs=()
  for row in ${ROWS//,/ }; do
    [ -f "$C/seed$s/eval/$row/metrics.json" ] || continue
    inputs+=("$row=$C/seed$s/eval/$row")
  done
  for a in Refit Swift; do for b in Base SFT DPO; do
    [ -f "$C/seed$s/eval/$a/metrics.json" ] && { [ "$b" = Base ] || [ -f "$C/seed$s/eval/$b/metrics.json" ]; } \
      && pairs+=("$a:${b/SFT/STaR-GATE}")
  done; done
  $PY -m clarify_lit.cli report "${inputs[@]}" --out "$OUT/sciq-clarifying-open-seed$s.md" --pairs "${pairs[@]}" \
    --rename SFT=STaR-GATE
done
IT="$RUNS/iterate/sciq-clarifying-open"
# the iterate run again with its own options: every stage is done, so only its report is rewritten (current code)
$PY -m clarify_lit.cli iterate --config "$IT/iterate_config.json" --rounds "$(ls -d "$IT"/round_* | wc -l)" --output "$IT"
mkdir -p "$OUT/iterate"
cp "$IT/report.md" "$IT/report.json" "$IT/report.png" "$OUT/iterate/"
gzip -nc "$IT/base/eval/rollouts.jsonl" > "$OUT/iterate/base-eval.jsonl.gz"
for r in "$IT"/round_*; do
  n=$(basename "$r")
  gzip -nc "$r/eval/rollouts.jsonl" > "$OUT/iterate/$n-eval.jsonl.gz"
  gzip -nc "$r/simulate/conversations.jsonl" > "$OUT/iterate/$n-logged.jsonl.gz"
done
[ -f "$RUNS/stage-times.tsv" ] && cp "$RUNS/stage-times.tsv" "$OUT/stage-times.tsv"
echo "tables in $OUT"
