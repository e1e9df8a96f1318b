#!/usr/bin/env bash
# The one GPU command of onepass: build, accuracy, smoke tests, headline benchmark, profile, AOT table.
#
#   bash benchmarks/gpu_check.sh          # from the repo root, on an offline H100/H200 box
#
# Made for the device machine of this project (Python 3.12, torch 2.11, triton 3.6, nvcc 13, no
# registry): allow it 8 minutes (BUDGET_S=450 by default; each step is capped so that the later ones
# still run).  Steps and their caps:
#   0. versions and device                                               ~5 s
#   1. offline in-place build (pip --no-build-isolation --no-deps --no-index -e ., sm_90)   cap 150 s
#   2. headline case (benchmarks/gpu_headline.py): accuracy vs float64 on 256 rows, fwd and fwd+bwd
#      time against the cuBLAS 4-GEMM floor, extra memory, the dW strategies, a CUDA profile
#                                                                        cap 110 s
#   3. smoke tests: tests/test_gpu_smoke.py (every Triton vocab-stats variant once), the CUDA
#      backend at V=1000 in every dtype x kind, the GPU advantages tests; pytest-xdist when there
#                                                                        cap 100 s
#      then the Triton fused-linear backward vs float64 (tests/test_linear_backward_triton.py)  cap 40 s
#   4. benchmark linear_logprobs at N=16384, D=4096, bf16: onepass, naive, Liger FLCE, Cut
#      Cross-Entropy, then torch.compile(naive)                          cap 140 s (rest of budget)
#   5. ahead-of-time compile table on this Triton (registers, spills, shared memory)  what is left
# Peers: Liger-Kernel and Cut Cross-Entropy are pure-Python wheels; where the box lacks them, put them
# in the repo-ignored .whl/ folder first (here, with a registry) and carry it:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d .whl liger-kernel==0.8.5 cut-cross-entropy==25.1.1
# Without a GPU every GPU step is skipped with a message and the script exits 0 after the build step
# (which needs nvcc; NO_BUILD=1 skips it).
#
# Output: $OUT (default ./gpu_out) gets at most 8 files: summary.txt build.log headline.log
# headline.json pytest.log bench.log bench.json aot.log; they are also copied to
# benchmarks/results/gpu_check/ for committing.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
RESULTS=benchmarks/results/gpu_check
T0=$(date +%s)
DEADLINE=$((T0 + ${BUDGET_S:-450}))
PY=${PY:-python3}
say() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/summary.txt"; }
# cap WANT RESERVE: seconds for a step, at most WANT, leaving RESERVE for the steps after it (>= 10)
cap() { local w=$1 l=$(( DEADLINE - $(date +%s) - $2 )); [ "$l" -lt "$w" ] && w=$l; [ "$w" -lt 10 ] && w=10; echo "$w"; }

# 0. versions, device; peers from .whl/ when present
if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/onepass_site \
    .whl/*.whl > /dev/null 2>&1 && export PYTHONPATH=/tmp/onepass_site${PYTHONPATH:+:$PYTHONPATH}
fi
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv 2>&1; nproc
  nvcc --version 2>&1 | tail -1; git log -1 --format='commit %H %s' 2>/dev/null
  $PY -c "
import sys, torch
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())
for m in ('triton', 'pybind11', 'xdist', 'pytest_timeout', 'liger_kernel', 'cut_cross_entropy'):
    try: print(m, getattr(__import__(m), '__version__', 'present'))
    except Exception: print(m, 'MISSING')"; } >> "$OUT/summary.txt" 2>&1
HAVE_GPU=$($PY -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)

# 1. build in place: sm_90 only, CUDA mandatory, no index, no dependency resolution
RC_BUILD=skipped
if [ "${NO_BUILD:-0}" != 1 ]; then
  export ONEPASS_CUDA=1 ONEPASS_CUDA_ARCHS=90 PIP_DISABLE_PIP_VERSION_CHECK=1
  export PATH="$(dirname "$(command -v $PY)"):$PATH:/usr/local/cuda/bin"
  export CUDACXX="${CUDACXX:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
  timeout -k 5 "$(cap 150 300)" $PY -m pip install -v --no-build-isolation --no-deps --no-index -e . \
    > "$OUT/build.log" 2>&1
  RC_BUILD=$?
fi
$PY -c "import onepass, onepass._C as C; print('with_cuda', C.with_cuda, onepass.available_backends('cuda'))" \
  >> "$OUT/build.log" 2>&1
RC_IMPORT=$?
say "build rc=$RC_BUILD import rc=$RC_IMPORT"
tail -n 3 "$OUT/build.log" >> "$OUT/summary.txt"
if [ "$HAVE_GPU" != 1 ]; then
  say "no CUDA device: GPU steps 2-4 skipped; the AOT table (step 5) runs on the CPU: python -m onepass.triton_kernels.aot_check"
  exit 0
fi

# 2. headline case
PYTHONUNBUFFERED=1 timeout -k 5 "$(cap 110 250)" $PY benchmarks/gpu_headline.py --json "$OUT/headline.json" \
  > "$OUT/headline.log" 2>&1
RC_HEAD=$?
say "headline rc=$RC_HEAD"
grep -E "backend|rel err|onepass|floor|dW|first|cuBLAS" "$OUT/headline.log" >> "$OUT/summary.txt"

# 3. smoke tests (every Triton kernel variant once; CUDA backend in every dtype x kind at V=1000)
XD=""; $PY -c "import xdist" 2>/dev/null && XD="-n 12"
TO=""; $PY -c "import pytest_timeout" 2>/dev/null && TO="--timeout=120"
timeout -s INT -k 15 "$(cap 100 150)" $PY -m pytest -m gpu -q -rfE -p no:cacheprovider --durations=10 $XD $TO \
  tests/test_gpu_smoke.py tests/test_advantages.py \
  "tests/test_vocab_stats_cuda.py::test_matches_reference" -k "smoke or advantages or 1000" \
  > "$OUT/pytest.log" 2>&1
RC_TEST=$?
timeout -k 5 "$(cap 40 150)" $PY -m pytest -q -rfE -p no:cacheprovider tests/test_linear_backward_triton.py \
  >> "$OUT/pytest.log" 2>&1 || RC_TEST="$RC_TEST+bwd$?"
say "pytest rc=$RC_TEST (124/130: cut by the time budget)"
tail -n 15 "$OUT/pytest.log" >> "$OUT/summary.txt"

# 4. headline benchmark family against the peers; torch.compile(naive) separately (its compile is slow)
timeout -k 10 "$(cap 100 60)" $PY -m onepass.bench --device cuda --families linear_logprobs \
  --providers onepass,naive,liger,cce --repeat 5 --out "$OUT/b" > "$OUT/bench.log" 2>&1
RC_BENCH=$?
timeout -k 10 "$(cap 80 30)" $PY -m onepass.bench --device cuda --families linear_logprobs \
  --providers "onepass,torch.compile(naive)" --repeat 5 --out "$OUT/c" >> "$OUT/bench.log" 2>&1
RC_COMPILE=$?
$PY - "$OUT" > "$OUT/bench.json" 2>> "$OUT/bench.log" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
runs = {d: json.loads((out / d / "results.json").read_text()) for d in ("b", "c") if (out / d / "results.json").exists()}
print(json.dumps(runs, indent=1))
EOF
rm -rf "$OUT/b" "$OUT/c"
say "bench rc=$RC_BENCH torch.compile rc=$RC_COMPILE"
grep -E "^\|" "$OUT/bench.log" | tail -n 20 >> "$OUT/summary.txt"

# 5. ahead-of-time compile table on this machine's Triton (CPU only; what time is left)
timeout -k 5 "$(cap 60 0)" $PY -m onepass.triton_kernels.aot_check --jobs 12 > "$OUT/aot.log" 2>&1
RC_AOT=$?
say "aot rc=$RC_AOT"
tail -n 8 "$OUT/aot.log" >> "$OUT/summary.txt"

say "done: build=$RC_BUILD import=$RC_IMPORT headline=$RC_HEAD pytest=$RC_TEST bench=$RC_BENCH compile=$RC_COMPILE aot=$RC_AOT"
mkdir -p "$RESULTS" && cp "$OUT"/* "$RESULTS"/ 2>/dev/null
exit 0
