#!/usr/bin/env bash
# Run the course's stored-output checks (nbval) under every CPU kernel set torch can use here
# and with 1 and 2 threads. The stored outputs must hold on any machine: a new CPU picks
# another kernel set (ATEN_CPU_CAPABILITY), another core count another reduction order.
#
#   bash scripts/nbval_matrix.sh                 # default, avx2 and this CPU's best x 1 and 2 threads
#   CAPABILITIES="default avx512" THREADS=1 bash scripts/nbval_matrix.sh
#
# "best" leaves ATEN_CPU_CAPABILITY unset: torch then picks the best kernel set the CPU has.
#
# nbval starts one kernel per notebook; the kernels inherit these variables, and torch reads
# them at import (tests/test_nbval_sanitizer.py checks that it does).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
CAPABILITIES=${CAPABILITIES:-default avx2 best}
THREADS=${THREADS:-1 2}
status=0
summary=""
for cap in $CAPABILITIES; do
  for threads in $THREADS; do
    if [ "$cap" = best ]; then unset ATEN_CPU_CAPABILITY; else export ATEN_CPU_CAPABILITY=$cap; fi
    actual=$(OMP_NUM_THREADS=$threads $PYTHON -c \
      "import torch; print(torch.backends.cpu.get_cpu_capability(), torch.get_num_threads())" 2>/dev/null)
    log=$(mktemp)
    OMP_NUM_THREADS=$threads HF_HUB_OFFLINE=1 $PYTHON -m pytest --nbval solutions tutorials \
      -q -p no:cacheprovider --nbval-sanitize-with tests/nbval_sanitize.cfg >"$log" 2>&1
    rc=$?
    line="$cap x $threads thread(s) [torch: $actual]: $(tail -n 1 "$log")"
    echo "$line"
    summary+="$line"$'\n'
    if [ $rc -ne 0 ]; then status=1; grep -E "^FAILED" "$log"; fi
    rm -f "$log"
  done
done
echo
echo "$summary"
exit $status
