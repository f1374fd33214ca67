#!/usr/bin/env bash
# Real-shape speed benchmarks on the lent GPU machine (bench/RESULTS.md: the H200 rows of decode_step, bound,
# baseline, rag, batch).
#
#   here:   bash ../shared/gpu/prepare.sh && bash bench/device_speed.sh prepare
#           (the MLX CUDA kit; the wheels the daemon, the benchmarks and the real Qwen2 vocabulary import)
#   device: run with carry [.mlxc/device_env.sh, .mlxc/<the two wheels>, .mlxc/mlxs90.tar.xz, var/devwheels]
#           and the command `RUNS="decode_step:float32 bound:4bit" bash bench/device_speed.sh run`
#           (each NAME:PRECISION is `python -m bench NAME --size real --precision PRECISION` at the defaults; what
#           each printed and wrote comes back as $OUT/speed.tar: one file, as the device returns only a few).
set -u
case "${1:-}" in
prepare)
  bash bench/device_site.sh prepare ;;
run)
  source bench/device_site.sh enter || exit 1
  mkdir -p /tmp/speed
  T0=$(date +%s)
  for run in ${RUNS:-decode_step:float32}; do
    name=${run%%:*}; precision=${run#*:}
    echo "== $name $precision (at $(( $(date +%s) - T0 )) s)"
    python3 -m bench "$name" --size real --precision "$precision" --json "/tmp/speed/$name-$precision.json" \
      > "/tmp/speed/$name-$precision.out" 2> "/tmp/speed/$name-$precision.err"
    echo "exit $?"; grep -h "^real\.\|^[a-z_]*=" "/tmp/speed/$name-$precision.out" | grep -v "^smoke" | head -40
    tail -3 "/tmp/speed/$name-$precision.err"
    (cd /tmp && tar -cf "$OUT/speed.tar" speed)  # after each: a run cut off at the time limit keeps the rest
  done
  echo "done at $(( $(date +%s) - T0 )) s" ;;
*)
  echo "usage: bash bench/device_speed.sh prepare|run (see the comment at the top)" >&2; exit 2 ;;
esac
