# Sourced by scripts/{results,scaleout,workflows}_gpu.sh (the `make *-gpu` targets).
# Environment: OUT (output folder, required), DATA (GSM8K/MATH-500 JSONL folder), PYTHON.
# Every step's output goes to $OUT/NAME.log (and the terminal); its exit code, wall time and command to
# $OUT/timings.txt; the machine, versions and commit to $OUT/machine.txt. A failed step is recorded and the
# script goes on with the next one; the script exits 1 at the end if any step failed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
DATA=${DATA:-../shared/data}
: "${OUT:?set OUT to the output folder}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
FAILED=()
# `accelerate launch` of this Python
LAUNCH=("$PYTHON" -m accelerate.commands.launch)

# gpu_count: the number of CUDA GPUs torch sees (0 without CUDA).
gpu_count() {
  "$PYTHON" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
}

# start NAME MIN_GPUS: check the GPUs, then write $OUT/machine.txt and start a fresh $OUT/timings.txt.
start() {
  local n
  n=$(gpu_count) || exit 1
  if [ "$n" -lt "$2" ]; then
    echo "$1 needs at least $2 CUDA GPU(s); torch sees $n" >&2
    exit 1
  fi
  "$PYTHON" scripts/machine_info.py "$1 (OUT=$OUT DATA=$DATA)" | tee "$OUT/machine.txt"
  : > "$OUT/timings.txt"
  GPUS=$n
}

# step NAME COMMAND...: run COMMAND, log and time it.
step() {
  local name=$1; shift
  echo "== $name: $*"
  local t0 rc ms
  t0=$(date +%s%N)
  "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  printf '%s\trc=%s\twall_s=%d.%03d\t%s\n' "$name" "$rc" $((ms / 1000)) $((ms % 1000)) "$*" >> "$OUT/timings.txt"
  [ "$rc" -eq 0 ] || FAILED+=("$name")
  return 0
}

# skip NAME REASON: record a step that this machine cannot run.
skip() {
  printf '%s\tskipped\t%s\n' "$1" "$2" | tee -a "$OUT/timings.txt"
}

# finish: close machine.txt and exit 1 if a step failed.
finish() {
  echo "finished: $(date -u '+%Y-%m-%d %H:%M:%S UTC')" >> "$OUT/machine.txt"
  cat "$OUT/timings.txt"
  if [ ${#FAILED[@]} -gt 0 ]; then
    echo "failed steps: ${FAILED[*]} (logs in $OUT)" >&2
    exit 1
  fi
  echo "outputs in $OUT"
}
