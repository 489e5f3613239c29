#!/usr/bin/env bash
# Everything that needs a GPU, in one run sized for a short loan of a GPU machine (one H100/H200;
# about 6-8 minutes, most of it the build and the test suite):
#
#   1. build surgery._C with its CUDA kernels (FORCE_CUDA=1: a CUDA build failure fails the step)
#   2. `surgery backends`: what was built and what can run
#   3. the test suite, GPU tests included (CI runs it without a GPU, where they skip)
#   4. `surgery bench kernels` on the device: the fused ops against its peak bandwidth
#   5. `surgery bench e2e --quick` on the device: decoding with and without the adapter
#   6. `surgery profile` on the device: a trace and the top operators
#
# Usage:  bash benchmarks/device_checks.sh [OUT_DIR]        (default: $OUT, else out/device-checks)
#   DEVICE=cuda (default) or cuda:N; DEVICE=cpu rehearses the same steps on a CPU-only machine
#   (no CUDA build, --quick benchmarks). TORCH_CUDA_ARCH_LIST defaults to 9.0 (Hopper).
#   BUDGET=570 (seconds, the default) bounds the whole run, packaging included: a loaned machine
#   runs one command for at most 600 s, and what the script has written must still come back.
#
# Every step runs under its own time limit, cut to what is left of the budget, and the script goes
# on after a failure, so one broken step does not cost the others; a step with no time left is
# skipped and counts as failed. The exit status is 1 if any step failed. OUT_DIR receives at most
# eight files (what a device loan hands back): log.txt (every step's output and time),
# kernels.md / kernels.csv, e2e.md / e2e.csv, profile_top.txt, tests.txt (the failures, if any)
# and results.tar.gz (every file the benchmarks wrote, PNG plots and the trace included).
set -uo pipefail
cd "$(dirname "$0")/.."

out=${1:-${OUT:-out/device-checks}}
device=${DEVICE:-cuda}
python=${PYTHON:-python3}
work=$(mktemp -d)
mkdir -p "$out"
log="$out/log.txt"
: > "$log"
failed=()

deadline=$((SECONDS + ${BUDGET:-570} - 20))  # 20 s kept for packaging the results

step() {  # step NAME SECONDS COMMAND...: run, log, time; remember a failure and go on
  local name=$1 limit=$2
  shift 2
  if [ $((deadline - SECONDS)) -lt "$limit" ]; then limit=$((deadline - SECONDS)); fi
  if [ "$limit" -le 0 ]; then
    echo "== $name: skipped, no time left in the budget" | tee -a "$log"
    failed+=("$name")
    return
  fi
  echo "== $name ($limit s at most): $*" | tee -a "$log"
  local start=$SECONDS
  timeout "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$log"
  if [ "$rc" -ne 0 ]; then failed+=("$name"); fi
}

export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-$(nproc)}
if [ "$device" = cpu ]; then
  quick=(--quick)
else
  export FORCE_CUDA=1
  quick=()
fi
surgery=("$python" -m surgery)

{ echo "device checks: device=$device, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.memory --format=csv 2>/dev/null
  "$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } >> "$log" 2>&1

step build 240 "$python" -m pip install -q --no-build-isolation --no-deps -e .
step backends 30 "${surgery[@]}" backends
step tests 300 "$python" -m pytest -q -p no:cacheprovider -rfE tests --junit-xml="$work/tests.xml"
step kernels 180 "${surgery[@]}" bench kernels --device "$device" "${quick[@]}" --no-progress --out "$work/kernels"
step e2e 120 "${surgery[@]}" bench e2e --device "$device" --quick --no-progress --out "$work/e2e"
step profile 60 "${surgery[@]}" profile --device "$device" --out "$work/profile"

# what comes back: a few readable files, and everything in one archive
grep -E "^(FAILED|ERROR) " "$log" > "$out/tests.txt" || true
cp "$work/kernels/summary.md" "$out/kernels.md" 2>/dev/null
cp "$work/kernels/kernels.csv" "$out/kernels.csv" 2>/dev/null
cp "$work/e2e/summary.md" "$out/e2e.md" 2>/dev/null
cp "$work/e2e/e2e.csv" "$out/e2e.csv" 2>/dev/null
cp "$work/profile/top_ops.txt" "$out/profile_top.txt" 2>/dev/null
tar -czf "$out/results.tar.gz" -C "$work" . 2>> "$log"
rm -rf "$work"

if [ "${#failed[@]}" -gt 0 ]; then
  echo "device checks: failed steps: ${failed[*]} (see $log)" | tee -a "$log"
  exit 1
fi
echo "device checks: every step passed; results in $out" | tee -a "$log"
