# Source on the GPU host (repository root): installs the carried wheels (.whl/, see
# docs/benchmarks.md) into /tmp/site and puts them, a mamba-ssm build in /tmp/msite (if any)
# and qscore's sources on PYTHONPATH. Run qscore there as `python3 -m qscore ...`.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
fi
export PYTHONPATH=/tmp/site:/tmp/msite:$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 QSCORE_OFFLINE=1
