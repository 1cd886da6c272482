#!/usr/bin/env bash
# Issue 18's measurement on one GPU host (docs/benchmarks.md, "--engine ray"), run from the
# repository root after benchmarks/nvdec_host.sh has installed /tmp/site (Ray, diffusers, PyAV,
# open_clip) and made /tmp/q17's clips:  bash benchmarks/ray_host.sh OUTDIR
# The same inputs scored by `--engine local` and `--engine ray`, one run each, for UGD-IML (768
# synthetic 512² JPEGs) and Q-CLIP (1,024 720p clips, CPU decoder); random weights. Writes each
# run's summary and a comparison (files/s, ratio, scores equal) to OUTDIR/ray.json.
set -u
OUT=$1; mkdir -p "$OUT"; W=/tmp/r18
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 QSCORE_OFFLINE=1
python3 - <<'PY'
import os
from pathlib import Path
from qscore.bench import synthesize
w = Path("/tmp/r18")
for p in synthesize("image512", 96, w / "img" / "r0"):
    for k in range(1, 8):
        (w / "img" / f"r{k}").mkdir(exist_ok=True)
        os.link(p, w / "img" / f"r{k}" / Path(p).name)
clips = sorted(Path("/tmp/q17/v720-g50/r0").glob("*.mp4"))
for k in range(32):  # 32 distinct clips, 32 times (hard links: discovery follows no linked folder)
    (w / "v720" / f"r{k:02d}").mkdir(parents=True, exist_ok=True)
    for p in clips:
        os.link(p, w / "v720" / f"r{k:02d}" / p.name)
print("inputs made")
PY
for engine in local ray; do
  echo "== ugdiml --engine $engine"
  timeout 170 python3 -m qscore forgery $W/img --mode iml --weights random --engine $engine --out $W/ugd-$engine
  echo "== qclip --engine $engine"
  timeout 90 python3 -m qscore video $W/v720 --model qclip --weights random --decoder cpu -b 16 --engine $engine --out $W/qclip-$engine
done
python3 - "$OUT/ray.json" <<'PY'
import json, sys
from pathlib import Path
import pandas as pd
w, result = Path("/tmp/r18"), {}
for name, model in (("ugd", "ugdiml"), ("qclip", "qclip")):
    runs = {}
    for engine in ("local", "ray"):
        out = w / f"{name}-{engine}"
        summary = json.loads(next(out.glob("*.summary.json")).read_text())
        table = pd.read_parquet(next(out.glob("*.parquet"))).sort_values("rel_path").reset_index(drop=True)
        runs[engine] = (summary, table)
    (sl, tl), (sr, tr) = runs["local"], runs["ray"]
    score = [c for c in tl.columns if c in ("score", "forgery_score", "manipulated_fraction")]
    result[model] = {
        "files": int(sl["scored"]), "local_files_per_s": sl["files_per_s"], "ray_files_per_s": sr["files_per_s"],
        "ratio": round(sr["files_per_s"] / sl["files_per_s"], 3),
        "local_startup_s": sl["startup_s"], "ray_startup_s": sr["startup_s"],
        "ok": [int(sl["ok"]), int(sr["ok"])], "same_columns": list(tl.columns) == list(tr.columns),
        "equal": {c: bool((tl[c] == tr[c]).all()) for c in score},
        "ray_workers": sr.get("workers"), "local": sl, "ray": sr,
    }
    print(model, {k: v for k, v in result[model].items() if k not in ("local", "ray")})
Path(sys.argv[1]).write_text(json.dumps(result, indent=1, default=str))
PY
