#!/usr/bin/env bash
# Many seeds of `python -m bench learning` at once on the lent GPU machine (bench/RESULTS.md, `learning`: 72 seeds).
#
#   here:   bash bench/device_learning_seeds.sh prepare   # bench/device_site.sh prepare: the wheels the GPU machine
#                                                         # lacks, into var/devwheels (plus ../shared/gpu/prepare.sh)
#   device: run with carry [.mlxc/device_env.sh, .mlxc/<the two wheels>, .mlxc/mlxs90.tar.xz,
#           var/models/smoke-perception, var/devwheels] and the command
#           `FIRST=40 P=12 PER=4 LIMIT=540 bash bench/device_learning_seeds.sh run`
#           (P processes, PER seeds each from FIRST; what finished comes back as $OUT/seeds.tar: one file, as the
#           device returns only a few files). Then, here: tar -xf seeds.tar, and
#           `python -m bench learning --base perception --ns 25 --seeds <those> --reuse --out <the folder>`.
set -u
case "${1:-}" in
prepare)
  bash bench/device_site.sh prepare ;;
run)
  source bench/device_site.sh enter || exit 1
  export OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=2
  FIRST=${FIRST:-40}; P=${P:-12}; PER=${PER:-4}; LIMIT=${LIMIT:-540}
  T0=$(date +%s)
  if [ ! -f /tmp/warm.ok ]; then  # builds the plain model once and compiles the kernels (NVRTC) before the crowd
    python3 -m bench learning --base perception --ns 3 --test 3 --steps 2 --variants 0 --out /tmp/warm \
      > /tmp/warm.log 2>&1 && touch /tmp/warm.ok || { tail -30 /tmp/warm.log; exit 1; }
    echo "warm-up $(( $(date +%s) - T0 )) s"
  fi
  mkdir -p /tmp/gs /tmp/gslog
  for p in $(seq 0 $((P - 1))); do
    seeds=$(seq -s, $((FIRST + p * PER)) $((FIRST + p * PER + PER - 1)))
    timeout $((LIMIT - ($(date +%s) - T0))) python3 -m bench learning --base perception --ns 25 --seeds "$seeds" \
      --reuse --out /tmp/gs > /tmp/gslog/p$p.out 2> /tmp/gslog/p$p.err &
  done
  wait
  echo "done at $(( $(date +%s) - T0 )) s"
  grep -h "^# learning n=25" /tmp/gslog/*.err
  (cd /tmp && tar -cf "$OUT/seeds.tar" --exclude=work gs) ;;
*)
  echo "usage: bash bench/device_learning_seeds.sh prepare|run (see the comment at the top)" >&2; exit 2 ;;
esac
