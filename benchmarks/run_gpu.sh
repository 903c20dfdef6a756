#!/usr/bin/env bash
# One call on a GPU machine: build the extension (C++ + CUDA), run the GPU tests (marked `cuda`), then every
# benchmarks/gpu_<name>.py script (or only the names given), each writing <name>_<card>.json into OUTDIR.
#
#   bash benchmarks/run_gpu.sh OUTDIR [name ...]      e.g.  bash benchmarks/run_gpu.sh /tmp/out loss targets
#
# TESTS_TIMEOUT (default 540 s) bounds the test phase. PHASES (default "build tests bench") picks what runs, e.g.
# PHASES=bench with CUDA_VISIBLE_DEVICES=1 runs benchmarks on a second GPU while another call uses the first.
#
# The records name their git commit (benchmarks/record.py); the GPU machine's copy has no .git, so put
# HMEDN_GIT_COMMIT=$(git rev-parse HEAD) - expanded here, not there - in front of the command you send.
#
# Packages missing on the GPU machine (nibabel, monai) travel as wheels in .whl/ (git-ignored), fetched here with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl nibabel==5.4.2 monai==1.6.1
set -uo pipefail
OUTDIR=${1:?usage: run_gpu.sh OUTDIR [name ...]}
shift || true
mkdir -p "$OUTDIR"
LOG="$OUTDIR/gpu_run.log"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
say() { echo "$@" | tee -a "$LOG"; }

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
say "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$LOG"

PHASES=${PHASES:-build tests bench}
has() { [[ " $PHASES " == *" $1 "* ]]; }
t0=$(date +%s)
if has build && ! python3 -m pip install --no-build-isolation --no-deps -e . >"$OUTDIR/build.log" 2>&1; then
  say "BUILD FAILED"; tail -40 "$OUTDIR/build.log" | tee -a "$LOG"
fi
say "build: $(( $(date +%s) - t0 )) s; $(python3 -c 'import hmedn_fast.ops._ext as e; print("extension:", e.extension() is not None, "cuda:", e.has_cuda(), e.missing_reason())')"

if has tests; then
  t0=$(date +%s)
  # the suite takes 260-360 s (H100 / H200); one line per test, so a timeout shows where it stopped
  timeout "${TESTS_TIMEOUT:-540}" python3 -m pytest tests -m cuda -v -p no:cacheprovider --durations=10 \
    >"$OUTDIR/gpu_tests.log" 2>&1
  rc=$?; [ $rc -eq 124 ] && say "gpu tests TIMED OUT after ${TESTS_TIMEOUT:-540} s; last: $(grep -E ' (PASSED|FAILED|SKIPPED|ERROR)' "$OUTDIR/gpu_tests.log" | tail -1)"
  say "gpu tests (rc=$rc): $(tail -1 "$OUTDIR/gpu_tests.log") [$(( $(date +%s) - t0 )) s]"
  grep -E "^(FAILED|ERROR)" "$OUTDIR/gpu_tests.log" | head -20 | tee -a "$LOG"
fi
has bench || exit 0

names=("$@")
if [ ${#names[@]} -eq 0 ]; then
  for f in benchmarks/gpu_*.py; do n=$(basename "$f" .py); names+=("${n#gpu_}"); done
fi
for n in "${names[@]}"; do
  t0=$(date +%s)
  say "== gpu_$n"
  timeout "${BENCH_TIMEOUT:-300}" python3 "benchmarks/gpu_$n.py" --out "$OUTDIR" >>"$LOG" 2>&1
  rc=$?
  say "== gpu_$n rc=$rc [$(( $(date +%s) - t0 )) s]"
done
ls -la "$OUTDIR" | tee -a "$LOG"
