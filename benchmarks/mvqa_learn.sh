#!/usr/bin/env bash
# MVQA's learning check on the GPU host, from a bare host to trained checkpoints, in the
# background (start it with setsid; it outlives the device call while the host stays warm).
#
#   CARRY=.carry/c1 bash benchmarks/mvqa_learn.sh OUT_DIR BUDGET_S RUN...
#
# CARRY holds whl/ (PyAV and decord wheels), whl/sdist/ (mamba-ssm's source package),
# tools/build-mamba-sm90.sh and pristine/bsds500/images. Steps: copy the sources to /tmp/qsrc
# (so later device calls cannot change them mid-run), build mamba-ssm's kernels while
# `qscore synth video` makes the clips, then `benchmarks/learn.sh` with the RUNs given
# (learn.sh's NAME=MODEL:EPOCHS:BATCH:ARGS). Progress: OUT_DIR/chain.log.
set -u
OUT=$1 BUDGET=$2
shift 2
CARRY=${CARRY:-.carry/c1}
N=${N:-3000} SIZE=${SIZE:-320x240}
mkdir -p "$OUT"
exec >>"$OUT/chain.log" 2>&1
echo "start $(date +%T)"
rm -rf /tmp/qsrc && cp -rL src /tmp/qsrc && cp benchmarks/learn.sh /tmp/learn.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$CARRY"/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:/tmp/msite:/tmp/qsrc PYTHONUNBUFFERED=1 QSCORE_OFFLINE=1
SDIST=$(ls "$PWD/$CARRY"/whl/sdist/mamba_ssm-*.tar.gz) bash "$CARRY/tools/build-mamba-sm90.sh" >"$OUT/build.log" 2>&1 &
t0=$(date +%s)
python3 -m qscore synth video --out /tmp/sv --n "$N" --seed 7 -j 12 --size "$SIZE" --frames 32 --pristine "$CARRY/pristine" >"$OUT/synth.log" 2>&1
echo "synth $(( $(date +%s) - t0 )) s: $(wc -l < /tmp/sv/train.csv) train rows"
wait
echo "build: $(tail -1 "$OUT/build.log")"
python3 -c "from qscore.models.mamba import scan_path; print('scan:', scan_path('cuda'))"
bash /tmp/learn.sh /tmp/sv "$OUT/learn" "$BUDGET" "$@"
echo "done $(date +%T)"
