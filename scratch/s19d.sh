#!/usr/bin/env bash
# Stop 19, third GPU call: tests of the gradient reuse, its A/B in the training step, memory snapshot after it.
set -u
export PYTHONUNBUFFERED=1
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1; export PYTHONPATH=/tmp/site
echo "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)" | tee $OUT/run.log
t0=$(date +%s)
python3 -m pip install --no-build-isolation --no-deps -e . > $OUT/build.log 2>&1 || { echo BUILD FAILED; tail -30 $OUT/build.log; exit 1; }
echo "build $(( $(date +%s) - t0 )) s" | tee -a $OUT/run.log
timeout 150 python3 -m pytest tests/test_dense_lean.py tests/test_graphed.py tests/test_lean_blocks_triton.py -m cuda -q -p no:cacheprovider > $OUT/tests.txt 2>&1
echo "cuda tests: $(tail -1 $OUT/tests.txt) [$(( $(date +%s) - t0 )) s]" | tee -a $OUT/run.log; grep -E "^(FAILED|ERROR)|Error" $OUT/tests.txt | head -10
timeout 240 python3 scratch/ab_reuse.py 2>&1 | grep -v -i warn | tee -a $OUT/run.log
timeout 90 python3 scratch/mem_snapshot.py lean > $OUT/mem_lean.txt 2>&1; grep -v -i warn $OUT/mem_lean.txt | head -16 | tee -a $OUT/run.log
echo "done $(( $(date +%s) - t0 )) s" | tee -a $OUT/run.log
