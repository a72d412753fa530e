#!/bin/sh
# One timed `ctr run` for the benchmarks (run by xargs, many at once):
#
#   timed-ctr-run.sh MODE N SOCK RUNTIME REF PREFIX OUTDIR [ARGS...]
#
# MODE is `--rm` (run to completion) or `-d` (start detached). Appends "N RC T0_NS T1_NS" to
# OUTDIR/samples and a failure's output to OUTDIR/errors; always exits 0 so xargs goes on.
mode=$1 n=$2 sock=$3 rt=$4 ref=$5 prefix=$6 out=$7
shift 7
t0=$(date +%s%N)
if msg=$(timeout 300 ctr --address "$sock" run "$mode" --runtime "$rt" "$ref" "$prefix-$n" "$@" 2>&1); then
    rc=0
else
    rc=$?
fi
t1=$(date +%s%N)
printf '%s %s %s %s\n' "$n" "$rc" "$t0" "$t1" >>"$out/samples"
if [ "$rc" != 0 ]; then
    printf '%s-%s: exit %s: %s\n' "$prefix" "$n" "$rc" "$(printf '%s' "$msg" | tr '\n' ' ')" >>"$out/errors"
fi
exit 0
