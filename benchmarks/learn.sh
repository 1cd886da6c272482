#!/usr/bin/env bash
# Learning checks on the GPU host: for each run, held-out metrics with random weights (before),
# `qscore train` from random init under a wall-clock budget, then held-out metrics of the best
# checkpoint (after). The trainings run side by side on the one GPU.
#
#   bash benchmarks/learn.sh DATA_DIR OUT_DIR BUDGET_S [NAME=]MODEL[:EPOCHS[:BATCH[:TRAIN_ARGS]]]...
#
# TRAIN_ARGS (space-separated) go to `qscore train`; its `--set KEY=VALUE` pairs also go to the
# "before" evaluation (the "after" one takes the config from the checkpoint's card). NAME tells
# two runs of one model apart (default: the model). DATA_DIR holds train.csv, val.csv and
# test.csv (from `qscore synth`; BIQ2021 has train/val only: val.csv is then the test set).
# Writes OUT_DIR/runs/NAME/ (run folder, NAME.log), OUT_DIR/learning.json (before/after metrics
# per run, epochs done, seconds) and OUT_DIR/learning.log (every command's output).
set -u
DATA=$1 OUT=$2 BUDGET=$3
shift 3
RUNS=$OUT/runs
mkdir -p "$RUNS"
TEST=$DATA/test.csv
[ -f "$TEST" ] || TEST=$DATA/val.csv

check() {  # name model epochs batch train-args...
  local name=$1 model=$2 epochs=$3 batch=$4
  shift 4
  local run=$RUNS/$name t0 sets=() args=("$@")
  for ((i = 0; i < ${#args[@]}; i++)); do
    [ "${args[i]}" = --set ] && sets+=(--set "${args[i + 1]}")
  done
  t0=$(date +%s)
  python3 -m qscore eval "$model" --preset tiny --weights random --labels "$TEST" --out "$run/before" -q -j 4 "${sets[@]}"
  timeout "$BUDGET" python3 -m qscore train "$model" --preset tiny --init random --labels "$DATA/train.csv" \
    --val "$DATA/val.csv" --out "$run" --epochs "$epochs" --batch-size "$batch" -j 4 "$@"
  echo "train exit $? after $(( $(date +%s) - t0 )) s"
  python3 -m qscore eval "$model" --weights "$run/best.safetensors" --labels "$TEST" --out "$run/after" -q -j 4
  echo $(( $(date +%s) - t0 )) > "$run/seconds"
}

for spec in "$@"; do
  head=${spec%%:*} name=$head
  [[ $head == *=* ]] && { name=${head%%=*}; spec=${spec#*=}; }
  IFS=: read -r model epochs batch extra <<<"$spec"
  mkdir -p "$RUNS/$name"
  # shellcheck disable=SC2086
  check "$name" "$model" "${epochs:-10}" "${batch:-16}" $extra > "$RUNS/$name.log" 2>&1 &
done
wait
cat "$RUNS"/*.log > "$OUT/learning.log"
python3 - "$RUNS" "$OUT/learning.json" <<'PY'
import json, sys, pathlib
runs, out = pathlib.Path(sys.argv[1]), sys.argv[2]
result = {}
for run in sorted(p for p in runs.iterdir() if p.is_dir()):
    def metrics(which):
        f = run / which / "metrics.json"
        return json.loads(f.read_text()) if f.exists() else None
    hist = run / "history.jsonl"
    result[run.name] = {
        "before": metrics("before"),
        "after": metrics("after"),
        "epochs_done": len(hist.read_text().splitlines()) if hist.exists() else 0,
        "history": [json.loads(l) for l in hist.read_text().splitlines()] if hist.exists() else [],
        "seconds": (run / "seconds").read_text().strip() if (run / "seconds").exists() else None,
    }
pathlib.Path(out).write_text(json.dumps(result, indent=2))
print(json.dumps({k: {"before": (v["before"] or {}).get("metrics", v["before"]), "after": (v["after"] or {}).get("metrics", v["after"]), "epochs": v["epochs_done"]} for k, v in result.items()}, indent=1)[:6000])
PY
