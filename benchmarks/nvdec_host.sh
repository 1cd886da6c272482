#!/usr/bin/env bash
# Issue 17's measurements on the GPU host (docs/benchmarks.md, "Video decoding"), run from the
# repository root:  bash benchmarks/nvdec_host.sh CARRY OUTDIR SECONDS "STEPS"
# CARRY holds site*.tar.xz (PyAV, PyNvVideoCodec, open_clip + ftfy + wcwidth; for the Ray
# benchmark also Ray, diffusers and their missing needs), wheels (decord, which base/ decodes
# with), base/src (the source measured against), sdist/mamba_ssm-*.tar.gz and
# build-mamba-sm90.sh. STEPS, in order, from: tests (what NVDEC finds, the GPU tests), probe
# (benchmarks/nvdec_probe.py on the 720p 2 s-GOP set),
# qclip, clifvqa, mvqa (`qscore bench` rows: GPU and CPU decoder, 720p and 1080p, a keyframe
# every 2 s and one per clip), cpu (the CPU decoder against base/ on the host's cores). Install
# and clips (not for empty STEPS: the install alone) happen once per host, and the mamba-ssm build (in the background) once, in the first
# call whose STEPS hold mvqa, so the steps can be split over calls to a warm host (only the
# install and the build read CARRY). A step is skipped once SECONDS have passed; a bench step
# is stopped after BENCH_TIMEOUT seconds (default 240).
set -u
CARRY=$(cd "$1" && pwd); OUT=$2; BUDGET=$3; STEPS=$4; T0=$(date +%s); ROOT=$PWD
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
time_left() { [ $(( $(date +%s) - T0 )) -lt "$BUDGET" ] || { echo "== out of time, skipping: $1"; return 1; }; }
step() { echo; echo "== $1 ($(( $(date +%s) - T0 )) s)"; }
export PYTHONPATH=/tmp/site:$ROOT/src PYTHONUNBUFFERED=1 QSCORE_OFFLINE=1

if [ ! -e /tmp/site/.done ]; then
  step "host"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  nproc; echo "NVIDIA_DRIVER_CAPABILITIES=${NVIDIA_DRIVER_CAPABILITIES:-unset}"
  python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
  step "install"
  mkdir -p /tmp/site && for t in "$CARRY"/site*.tar.xz; do tar -C /tmp/site -xJf "$t"; done
  for w in "$CARRY"/*.whl; do [ -e "$w" ] && python3 -m zipfile -e "$w" /tmp/site; done
  [ -d "$CARRY/base" ] && cp -r "$CARRY/base" /tmp/q17base
  # bytecode, as a pip install leaves it: the host sets PYTHONDONTWRITEBYTECODE, and without it every
  # process (each Ray worker too) compiles these packages again on import
  python3 -m compileall -q -j 0 /tmp/site "$ROOT/src" > /dev/null
  touch /tmp/site/.done
fi
# mamba-ssm for MVQA, built beside the clips and tests (they time nothing); the benches wait for it
if [[ " $STEPS " == *" mvqa "* ]] && [ ! -d /tmp/msite/mamba_ssm ] && ! pgrep -f "[b]uild-mamba-sm90" > /dev/null; then
  (cd "$CARRY" && SDIST=$(ls "$CARRY"/sdist/mamba_ssm-*.tar.gz) \
    setsid nohup bash "$CARRY/build-mamba-sm90.sh" > /tmp/mamba.log 2>&1 < /dev/null &)
fi

if [ -n "$STEPS" ] && [ ! -e /tmp/q17/.done ]; then  # every step reads them; none (only the install) makes none
  step "clips"
  python3 - <<'PY'
import os
from pathlib import Path
from qscore.bench import synthesize
# 256 files a set: distinct clips, hard-linked (decoding a link costs what a new file costs)
for height, gop, n, copies in ((720, 50, 32, 8), (720, 250, 32, 8), (1080, 50, 16, 16)):
    folder = Path(f"/tmp/q17/v{height}-g{gop}")
    for p in synthesize(f"video{height}", n, folder / "r0", gop=gop):
        for k in range(1, copies):
            (folder / f"r{k}").mkdir(exist_ok=True)
            os.link(p, folder / f"r{k}" / Path(p).name)
print("clips made")
PY
  touch /tmp/q17/.done
fi

for s in $STEPS; do
  case $s in
  tests)
    step "NVDEC on the host"
    ldconfig -p | grep -i -E "nvcuvid" || echo "ldconfig: no libnvcuvid"
    python3 -c "import PyNvVideoCodec as nvc, av; print('PyNvVideoCodec', nvc.__version__, 'PyAV', av.__version__)"
    step "GPU tests"
    time_left tests && timeout 150 python3 -m pytest -q -s -p no:cacheprovider tests/test_nvdec_gpu.py 2>&1 | grep -v "^$" ;;
  probe)
    step "NVDEC probe: threads against processes"
    time_left probe && timeout 150 python3 benchmarks/nvdec_probe.py /tmp/q17/v720-g50 --threads 8,16 --procs 16 \
      --json "$OUT/probe.json" < /dev/null ;;
  qclip|clifvqa|mvqa)
    step "bench $s"
    # no timing beside the compiler
    while [ ! -d /tmp/msite/mamba_ssm ] && pgrep -f "[b]uild-mamba-sm90" > /dev/null; do sleep 5; done
    [ $s = mvqa ] && { tail -2 /tmp/mamba.log; export PYTHONPATH=/tmp/msite:$PYTHONPATH; }
    time_left "bench $s" || continue
    case $s in qclip) args=(-b 16);; clifvqa) args=(-b 8);; mvqa) args=(--preset tiny -b 16);; esac
    timeout "${BENCH_TIMEOUT:-240}" python3 -m qscore bench $s "${args[@]}" /tmp/q17/v720-g50 /tmp/q17/v720-g250 /tmp/q17/v1080-g50 \
      --decoder gpu,cpu --warmup 16 --json "$OUT/$s.json" | sed -n '/^| model/,$p' | tee -a "$OUT/tables.md" ;;
  cpu)
    step "CPU decoder vs base on the host's cores"
    mkdir -p /tmp/q17/cpu && ln -sfn /tmp/q17/v720-g50/r0 /tmp/q17/cpu/720p-g50 && ln -sfn /tmp/q17/v720-g250/r0 /tmp/q17/cpu/720p-g250
    time_left "cpu decode" && timeout 120 python3 benchmarks/decode_cpu.py /tmp/q17/cpu --rounds 1 --only qclip \
      --baseline /tmp/q17base/src --json "$OUT/cpu_decode.json" < /dev/null ;;
  esac
done
step "done"
