# Sourced by the device-tool scripts (workflows_gpu.sh, scaleout_gpu.sh).
# step NAME TIMEOUT_S COMMAND...: run COMMAND under a timeout, its output to $STEP_LOG_DIR/NAME.log, its wall time
# and exit code to $STEP_LOG_DIR/timings.txt, then call after_step if the script defines it.
step() {
  local name=$1 limit=$2; shift 2
  local t0; t0=$(date +%s%N)
  timeout "$limit" "$@" > "$STEP_LOG_DIR/$name.log" 2>&1
  local rc=$?
  local ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  printf '%s\trc=%s\twall_s=%d.%03d\t%s\n' "$name" "$rc" $((ms / 1000)) $((ms % 1000)) "$*" \
    >> "$STEP_LOG_DIR/timings.txt"
  if declare -F after_step > /dev/null; then after_step; fi
}
