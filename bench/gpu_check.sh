#!/bin/bash
# The GPU check, in one call on a machine with a CUDA GPU and its own python3 with torch (no Ray needed):
# the GPU tests, then the demo spec end to end in one process (--serial), its slopes and stage times.
#
#   bash bench/gpu_check.sh            # from the repository root; results also under $OUT when it is set
#
# Packages that machine lacks can travel as cp312 wheels in ./.whl (git-ignored), installed first:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     duckdb==2.0.1 pydantic==2.14.4 pydantic-core==2.50.5 sqlalchemy==2.1.9 sqlmodel==0.0.50 duckdb-engine==0.17.0 \
#     typing-extensions typing-inspection annotated-types
set -o pipefail
OUT=${OUT:-$(mktemp -d)}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" || exit 1
echo "== GPU tests"
timeout 300 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_batched_heads.py tests/test_vision.py \
  tests/test_flow.py tests/test_pipeline.py 2>&1 | tee "$OUT/tests.log" | tail -8
echo "== demo spec, one process, GPU"
db=$(mktemp -d)/g.duckdb
timeout 400 python3 -m engine.cli run specs/colored_mnist.toml --serial --quiet --db "$db" 2>&1 | tee "$OUT/run.log" | tail -3
python3 -m engine.cli sql --db "$db" "SELECT attribute, grp, round(slope,4) slope, round(ci_low,4) lo, round(ci_high,4) hi
  FROM slopes WHERE metric = 'loss' ORDER BY 1, 2" 2>&1 | tee "$OUT/slopes.log"
python3 -m engine.cli sql --db "$db" "SELECT kind, count(*) n, round(sum(duration_s),1) s FROM stages GROUP BY 1 ORDER BY 1" \
  2>&1 | tee -a "$OUT/slopes.log"
echo "(bench/bench_demo.py specs/colored_mnist.toml --serial --sample 8 adds the GPU-vs-CPU tables)"
