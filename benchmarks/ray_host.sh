#!/usr/bin/env bash
# Issue 18's measurement on one GPU host (docs/benchmarks.md, "--engine ray"), run from the
# repository root:  bash benchmarks/ray_host.sh CARRY OUTDIR "MODELS"
# CARRY as for benchmarks/nvdec_host.sh, which installs /tmp/site (Ray, diffusers, PyAV,
# open_clip) once per host. MODELS from: ugdiml (768 synthetic 512²
# JPEGs, IML), clifvqa (1,024 720p clips, a keyframe every 2 s), qclip (the same clips, batch 16);
# random weights, CPU decoder. The same inputs are scored by `--engine local` and `--engine ray`,
# one run each; each command's wall clock (process start to exit, imports and Ray's start and stop
# included) is timed here. Writes each run's summary and a comparison (files/s on the wall clock
# and on the summary's scoring clock, ratios, rows equal) to OUTDIR/ray.json. For a smoke run on a
# CPU: IMAGES=8 CLIPS=2 EXTRA="--preset tiny" (inputs x copies; flags for every command).
set -u
IMAGES=${IMAGES:-96} CLIPS=${CLIPS:-32}; export IMAGES CLIPS; read -r -a EXTRA <<< "${EXTRA:-}"
CARRY=$1 OUT=$2 MODELS=$3; W=/tmp/r18
mkdir -p "$OUT"
bash benchmarks/nvdec_host.sh "$CARRY" "$OUT/setup" 0 ""
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 QSCORE_OFFLINE=1
python3 - <<'PY'
import os
from pathlib import Path
images, copies = int(os.environ["IMAGES"]), int(os.environ["CLIPS"])
from qscore.bench import synthesize
w = Path("/tmp/r18")
if not (w / "img").is_dir():
    for p in synthesize("image512", images, w / "img" / "r0"):
        for k in range(1, 8):
            (w / "img" / f"r{k}").mkdir(exist_ok=True)
            os.link(p, w / "img" / f"r{k}" / Path(p).name)
if not (w / "v720").is_dir():
    clips = [Path(p) for p in synthesize("video720", 32, w / "clips", gop=50)]  # a keyframe every 2 s
    for k in range(copies):  # the 32 distinct clips, CLIPS times each (hard links: discovery follows no linked folder)
        (w / "v720" / f"r{k:02d}").mkdir(parents=True, exist_ok=True)
        for p in clips:
            os.link(p, w / "v720" / f"r{k:02d}" / p.name)
print("inputs made")
PY
for model in $MODELS; do
  case $model in
  ugdiml) cmd=(forgery $W/img --mode iml);;
  clifvqa) cmd=(video $W/v720 --model clifvqa --decoder cpu);;
  qclip) cmd=(video $W/v720 --model qclip --decoder cpu -b 16);;
  esac
  for engine in local ray; do
    echo "== $model --engine $engine"
    rm -rf "$W/$model-$engine"
    t0=$(date +%s%N)
    timeout 250 python3 -m qscore "${cmd[@]}" --weights random "${EXTRA[@]}" --engine $engine --out "$W/$model-$engine"
    echo $(( ($(date +%s%N) - t0) / 1000000 )) > "$W/$model-$engine/wall_ms"
    echo "wall $(cat "$W/$model-$engine/wall_ms") ms"
  done
done
python3 - "$OUT/ray.json" $MODELS <<'PY'
import json, sys
from pathlib import Path
import pandas as pd
w, result = Path("/tmp/r18"), {}
for model in sys.argv[2:]:
    runs = {}
    for engine in ("local", "ray"):
        out = w / f"{model}-{engine}"
        summary = json.loads(next(out.glob("*.summary.json")).read_text())
        table = pd.read_parquet(next(out.glob("*.parquet"))).sort_values("rel_path").reset_index(drop=True)
        runs[engine] = (summary, table, int((out / "wall_ms").read_text()) / 1e3)
    (sl, tl, wl), (sr, tr, wr) = runs["local"], runs["ray"]
    score = [c for c in tl.columns if c in ("score", "forgery_score", "manipulated_fraction")]
    files = int(sl["scored"])
    result[model] = {
        "files": files, "wall_s": [round(wl, 2), round(wr, 2)],
        "wall_files_per_s": [round(files / wl, 3), round(int(sr["scored"]) / wr, 3)], "wall_ratio": round(wl / wr, 3),
        "summary_files_per_s": [sl["files_per_s"], sr["files_per_s"]],
        "summary_ratio": round(sr["files_per_s"] / sl["files_per_s"], 3),
        "elapsed_s": [sl["elapsed_s"], sr["elapsed_s"]], "startup_s": [sl["startup_s"], sr["startup_s"]],
        "ok": [int(sl["ok"]), int(sr["ok"])], "same_columns": list(tl.columns) == list(tr.columns),
        "equal": {c: bool((tl[c] == tr[c]).all()) for c in score},
        "max_abs_diff": {c: float((tl[c] - tr[c]).abs().max()) for c in score},
        "ray": sr.get("ray"), "ray_workers": sr.get("workers"), "local": sl, "ray_summary": sr,
    }
    print(model, {k: v for k, v in result[model].items() if k not in ("local", "ray_summary")})
Path(sys.argv[1]).write_text(json.dumps(result, indent=1, default=str))
PY
