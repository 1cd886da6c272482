#!/usr/bin/env bash
# UGD-IML variants trained side by side on one GPU host, on the starter's data and recipe
# (benchmarks/starters.sh), each packed and evaluated on the held-out JPEG'd edits as a starter is:
#
#   bash benchmarks/ugdiml_variants.sh DATA WORK BUDGET_S NAME=[KEY=VALUE] ...
#   bash benchmarks/ugdiml_variants.sh /tmp/data /tmp/work 1230 plain=cond_blocks=0 blocks=
#
# First the GPU side of a training is timed (benchmarks/train_speed.py on a small set: the loader
# and one resident batch's steps; WORK/speed_NAME.json), and the epochs are chosen so that every
# variant's whole schedule (warm-up, cosine to 0, validation) ends inside BUDGET_S, counted from
# the start, data making included; EPOCHS=N fixes them instead. Each variant's training, packing
# and evaluation then run as `MODELS=ugdiml FINAL=1 bash benchmarks/starters.sh DATA WORK/NAME`,
# on forgery sets made once and shared (same seeds as the starter). WORK/summary.json gathers
# every variant's validation history and held-out metrics. For a smoke run on a CPU make the
# speed check small too: SPEED_N (its set, 400), SPEED_STEPS (20), SPEED_BATCH (32); and the
# rest as starters.sh says (N_FORGERY, N_VAL_UGDIML, BATCH_UGDIML, EPOCHS).
set -u
DATA=$1 WORK=$2 BUDGET=$3
shift 3
START=$(date +%s)
CORES=$(python3 -c "import os; print(len(os.sched_getaffinity(0)))")  # nproc obeys OMP_NUM_THREADS
N_FORGERY=${N_FORGERY:-8000} N_FORGERY_TEST=${N_FORGERY_TEST:-1000} J=${J:-$(( CORES / $# ))}
export N_FORGERY N_FORGERY_TEST N_VAL_UGDIML=${N_VAL_UGDIML:-96} OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
DEVICE=$(python3 -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
Q="python3 -m qscore"
mkdir -p "$WORK/shared"
log() { echo "$(date +%T) $*" | tee -a "$WORK/steps.log"; }

log "speed ($DEVICE)"
[ -f "$WORK/speed/labels.csv" ] || $Q synth forgery --out "$WORK/speed" --n "${SPEED_N:-400}" --seed 21 --jpeg 1 --pristine "$DATA/pristine" -j "$CORES" > "$WORK/synth_speed.log" 2>&1
for v in "$@"; do
  name=${v%%=*} set=${v#*=}
  [ -f "$WORK/speed_$name.json" ] || python3 benchmarks/train_speed.py "$WORK/speed/train.csv" --device "$DEVICE" --workers "$CORES" \
    --only loader,step ${set:+--set "$set"} --steps "${SPEED_STEPS:-20}" --batch-size "${SPEED_BATCH:-32}" --json "$WORK/speed_$name.json" >> "$WORK/speed.log" 2>&1
done
log "data"
[ -f "$WORK/shared/forgery/labels.csv" ] || $Q synth forgery --n "$N_FORGERY" --seed 11 --out "$WORK/shared/forgery" --pristine "$DATA/pristine" -j "$CORES" > "$WORK/synth_forgery.log" 2>&1
[ -f "$WORK/shared/forgery_jpeg/labels.csv" ] || $Q synth forgery --n "$N_FORGERY_TEST" --seed 11 --jpeg 1 --out "$WORK/shared/forgery_jpeg" --pristine "$DATA/pristine" -j "$CORES" > "$WORK/synth_forgery_jpeg.log" 2>&1
LEFT=$(( START + BUDGET - $(date +%s) ))
# epochs (the script's `train` pass over so small a set is mostly its workers' start, so not
# timed): the variants share the GPU, so an epoch of all of them costs at least the sum of their
# epochs alone (samples / step samples/s; validation: N_VAL_UGDIML edits x 2 modes x 8 steps x 4
# samples forwards, ~1/3 of a training sample each), and each has 1/Nth of the cores' loader;
# 15 % kept for packing and evaluation
EPOCHS=${EPOCHS:-$(python3 - "$WORK" "$LEFT" "$@" <<'EOF'
import csv, json, os, sys
work, left, variants = sys.argv[1], float(sys.argv[2]), [v.split("=", 1)[0] for v in sys.argv[3:]]
n = sum(1 for _ in csv.DictReader(open(f"{work}/shared/forgery/train.csv")))
val = 2 * 8 * 4 * int(os.environ["N_VAL_UGDIML"]) / 3
speeds = [json.load(open(f"{work}/speed_{v}.json")) for v in variants]
gpu = sum((n + val) / s["step"]["samples_per_s"] for s in speeds)
loader = min(s["loader"]["files_per_s_after_first"] or s["loader"]["files_per_s"] for s in speeds) / len(variants)
print(max(2, min(60, int(0.85 * left / max(gpu, n / loader)))))
EOF
)}
log "$LEFT s left: $EPOCHS epochs each"
for v in "$@"; do
  name=${v%%=*} set=${v#*=}
  mkdir -p "$WORK/$name"
  for d in forgery forgery_jpeg; do ln -sfn "$WORK/shared/$d" "$WORK/$name/$d"; done
  EPOCHS_UGDIML=$EPOCHS MODELS=ugdiml FINAL=1 J=$J SET_UGDIML=$set \
    bash benchmarks/starters.sh "$DATA" "$WORK/$name" "$(( START + BUDGET - $(date +%s) ))" > "$WORK/$name.log" 2>&1 &
done
wait
python3 - "$WORK" "$@" > "$WORK/summary.json" <<'EOF'
import glob, json, sys
work, out = sys.argv[1], {}
for v in sys.argv[2:]:
    name, sets = v.split("=", 1)
    d = f"{work}/{name}"
    history = [json.loads(line) for f in glob.glob(f"{d}/runs/ugdiml/history.jsonl") for line in open(f)]
    evals = {m: json.load(open(f)) for m in ("iml", "ciml") for f in glob.glob(f"{d}/eval/ugdiml_{m}/metrics.json")}
    out[name] = {"set": sets, "speed": json.load(open(f"{work}/speed_{name}.json")), "history": history, "held_out": evals}
print(json.dumps(out, indent=1))
EOF
log "done"
