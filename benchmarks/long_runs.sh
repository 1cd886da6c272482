#!/usr/bin/env bash
# Issue 9's long runs on the GPU host: the runner over ~1,000 videos / ~2,000 images, long
# enough that worker start-up and the drain no longer hide the steady state.
#
#   bash benchmarks/long_runs.sh OUT_DIR [MODEL:INPUTS:BATCH ...]
#
# Inputs are made once: 64 distinct 10 s 720p clips, 32 distinct 1080p clips and 96 distinct
# 512² JPEGs (`qscore.bench.synthesize`), then hard-linked COPIES times under r01/, r02/, ...
# so a run reads many files without spending minutes on encoding. Decoding costs the same for a
# linked file as for a new one; RSFIQA's region cache, keyed by content, hits for every copy
# after the untimed warm-up pass over the first 96 files (the "warm cache" case of a cron run
# over files it has seen). Writes OUT_DIR/NAME.json per run (`qscore bench --json`).
set -u
OUT=$1
shift
COPIES=${COPIES:-16}
mkdir -p "$OUT"
python3 - <<'PY'
from pathlib import Path
from qscore.bench import synthesize
for kind, n, folder in (("video720", 64, "v720"), ("video1080", 32, "v1080"), ("image512", 96, "img")):
    if not (Path("/tmp/long") / folder / "r00").exists():
        synthesize(kind, n, Path("/tmp/long") / folder / "r00")
PY
for folder in v720 v1080 img; do
  for i in $(seq -w 1 $((COPIES - 1))); do
    mkdir -p "/tmp/long/$folder/r$i" && ln -f /tmp/long/$folder/r00/* "/tmp/long/$folder/r$i/"
  done
done
RUNS=("$@")
[ ${#RUNS[@]} -gt 0 ] || RUNS=(mvqa:v720:16 qclip:v720:16 qclip:v1080:16 clifvqa:v720:8 rsfiqa:img:8)
for spec in "${RUNS[@]}"; do
  IFS=: read -r model inputs batch <<<"$spec"
  warm=16
  [ "$inputs" = img ] && warm=96
  echo "== $model $inputs batch $batch ($(find /tmp/long/$inputs -type f | wc -l) files, warm-up $warm)"
  python3 -m qscore bench "$model" "/tmp/long/$inputs" -b "$batch" --warmup "$warm" --json "$OUT/$model-$inputs.json" \
    | tail -4
done
