#!/usr/bin/env bash
# Issue 17's measurements on the GPU host, in one call (docs/benchmarks.md, "Video decoding"):
#   bash CARRY/benchmarks/nvdec_host.sh CARRY OUTDIR [SECONDS]
# CARRY holds src/ (this checkout's, weights.toml copied in), base/src/ (the source measured
# against), tests/, benchmarks/ and site.tar.xz (PyAV, PyNvVideoCodec, open_clip + ftfy +
# wcwidth, unpacked into /tmp/site). Steps run in order of need and are skipped once SECONDS
# (default 330) have passed: what NVDEC finds on the host, the GPU tests, `qscore bench` rows
# (CPU and GPU decoder, 720p and 1080p, a keyframe every 2 s and one per clip) for each video
# model, then the CPU decoder against base/ on the host's cores.
set -u
CARRY=$(cd "$1" && pwd); OUT=$2; BUDGET=${3:-330}; T0=$(date +%s)
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
time_left() { [ $(( $(date +%s) - T0 )) -lt "$BUDGET" ] || { echo "== out of time, skipping: $1"; return 1; }; }
step() { echo; echo "== $1 ($(( $(date +%s) - T0 )) s)"; }

step "host"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
nproc; echo "NVIDIA_DRIVER_CAPABILITIES=${NVIDIA_DRIVER_CAPABILITIES:-unset}"
ldconfig -p | grep -i -E "nvcuvid|nvidia-encode" || echo "ldconfig: no libnvcuvid / libnvidia-encode"
find / -xdev \( -name 'libnvcuvid.so*' -o -name 'libnvidia-encode.so*' \) 2>/dev/null | head
python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"

step "install"
mkdir -p /tmp/site && tar -C /tmp/site -xJf "$CARRY/site.tar.xz"
export PYTHONPATH=/tmp/site:$CARRY/src:$CARRY PYTHONUNBUFFERED=1 QSCORE_OFFLINE=1
DECODERS=gpu,cpu
python3 - <<'EOF' || DECODERS=cpu
import PyNvVideoCodec as nvc, av, numpy as np
print("PyNvVideoCodec", nvc.__version__, "CUDA", getattr(nvc, "__cuda_version__", "?"), "PyAV", av.__version__)
with av.open("/tmp/nv_smoke.mp4", "w") as c:
    s = c.add_stream("libx264", rate=25); s.width, s.height, s.pix_fmt = 1280, 720, "yuv420p"
    for i in range(30):
        for p in s.encode(av.VideoFrame.from_ndarray(np.full((720, 1280, 3), 8 * i, np.uint8), format="rgb24")): c.mux(p)
    for p in s.encode(): c.mux(p)
d = nvc.SimpleDecoder("/tmp/nv_smoke.mp4", gpu_id=0, use_device_memory=True, output_color_type=nvc.OutputColorType.NATIVE)
f = d.get_batch_frames_by_index([0, 17])
import torch
t = torch.from_dlpack(f[1])
print("frames", len(d), "pts", [x.getPTS() for x in f], "surface", tuple(t.shape), t.dtype, t.device, "stride", t.stride())
EOF
echo "decoders: $DECODERS"

step "clips"
python3 - <<'EOF'
import os
from pathlib import Path
from qscore.bench import synthesize
for height, gop, n, copies in ((720, 50, 32, 2), (720, 250, 32, 2), (1080, 50, 16, 4)):
    folder = Path(f"/tmp/q17/v{height}-g{gop}")
    for p in synthesize(f"video{height}", n, folder / "r0", gop=gop):
        for k in range(1, copies):  # 64 files a set; decoding a link costs what a new file costs
            (folder / f"r{k}").mkdir(exist_ok=True)
            os.link(p, folder / f"r{k}" / Path(p).name)
print("clips made")
EOF

step "GPU tests"
time_left tests && (cd "$CARRY" && timeout 100 python3 -m pytest -q -s -p no:cacheprovider tests/test_nvdec_gpu.py 2>&1 | grep -v "^$")

for spec in "qclip default 16" "clifvqa default 8" "mvqa tiny 16"; do
  set -- $spec
  step "bench $1"
  time_left "bench $1" || continue
  preset=(); [ "$2" = default ] || preset=(--preset "$2")
  timeout 110 python3 -m qscore bench "$1" "${preset[@]}" /tmp/q17/v720-g50 /tmp/q17/v720-g250 /tmp/q17/v1080-g50 \
    --decoder "$DECODERS" -b "$3" --warmup 16 --json "$OUT/$1.json" | sed -n '/^| model/,$p' | tee -a "$OUT/tables.md"
done

step "CPU decoder vs base on the host's cores"
mkdir -p /tmp/q17/cpu && ln -sfn /tmp/q17/v720-g50/r0 /tmp/q17/cpu/720p-g50 && ln -sfn /tmp/q17/v720-g250/r0 /tmp/q17/cpu/720p-g250
time_left "cpu decode" && timeout 90 python3 "$CARRY/benchmarks/decode_cpu.py" /tmp/q17/cpu --rounds 1 --only qclip \
  --baseline "$CARRY/base/src" --json "$OUT/cpu_decode.json" < /dev/null
step "done"
