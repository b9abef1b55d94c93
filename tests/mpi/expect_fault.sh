#!/usr/bin/env bash
# Runs an MPI job that must fail, and checks how it ends: a non-zero exit status, every
# --expect regular expression (grep -E) found in its output (stdout and stderr), and the
# whole job ended within --bound seconds. A job still running after 2 x bound + 10 s is
# killed (SIGKILL) and fails the check: a hang never blocks CI.
#
# Usage: expect_fault.sh --bound SECONDS [--any-status] [--expect REGEX]... -- COMMAND [ARGS]...
#   --any-status  accept exit status 0 too: `mpiexec --enable-recovery` (Open MPI 4.1)
#                 exits 0 even after a rank called MPI_Abort; the message still counts
#
# Prints the job's output and one summary line: exit status, seconds until the job
# ended, and, when the job printed "injects <fault> at unix time T", the seconds from
# the fault to the end.
set -u
bound='' patterns=() any_status=0
while [[ $# -gt 0 && $1 != -- ]]; do
  case $1 in
    --bound) bound=$2; shift 2 ;;
    --expect) patterns+=("$2"); shift 2 ;;
    --any-status) any_status=1; shift ;;
    *) echo "expect_fault.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
done
[[ $# -gt 1 && -n $bound ]] || { echo "usage: expect_fault.sh --bound SECONDS [--expect REGEX]... -- COMMAND..." >&2; exit 2; }
shift

hard=$(awk -v b="$bound" 'BEGIN { printf "%d", 2 * b + 10 }')
start=$(date +%s.%N)
output=$(timeout -s KILL "$hard" "$@" 2>&1)
status=$?
end=$(date +%s.%N)
printf '%s\n' "$output"

elapsed=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.2f", b - a }')
summary="expect_fault: exit status $status, job ended after $elapsed s (bound $bound s)"
fault_time=$(printf '%s\n' "$output" | sed -n 's/.* at unix time \([0-9.]*\).*/\1/p' | head -n 1)
if [[ -n $fault_time ]]; then
  summary+=", $(awk -v a="$fault_time" -v b="$end" 'BEGIN { printf "%.2f", b - a }') s after the fault"
fi
echo "$summary"

failed=0
if [[ $status == 0 && $any_status == 0 ]]; then
  echo "expect_fault: FAILED: the job exited with status 0; a failure was expected"
  failed=1
elif awk -v e="$elapsed" -v h="$hard" 'BEGIN { exit !(e >= h) }'; then
  echo "expect_fault: FAILED: the job hung and was killed after $hard s"
  failed=1
fi
for p in "${patterns[@]}"; do
  if ! printf '%s\n' "$output" | grep -Eq -- "$p"; then
    echo "expect_fault: FAILED: the output does not match /$p/"
    failed=1
  fi
done
if ! awk -v e="$elapsed" -v b="$bound" 'BEGIN { exit !(e <= b) }'; then
  echo "expect_fault: FAILED: the job took $elapsed s, more than the bound of $bound s"
  failed=1
fi
exit $failed
