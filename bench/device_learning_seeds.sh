#!/usr/bin/env bash
# Many seeds of `python -m bench learning` at once on the lent GPU machine (bench/RESULTS.md, `learning`: 72 seeds).
#
#   here:   bash bench/device_learning_seeds.sh prepare   # wheels the daemon's code imports that the GPU machine
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
  mkdir -p var/devwheels/pkg
  .venv/bin/python -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp --no-deps \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 -d var/devwheels datasets peewee watchdog "apscheduler<4" tzlocal jsonschema \
    jsonschema-specifications referencing rpds-py attrs rawpy pillow-heif platformdirs multiprocess dill || exit 1
  # llguidance: the version the tests ran with (abi3, so this venv's copy runs on the device's Python 3.12)
  site=$(.venv/bin/python -c "import llguidance, os; print(os.path.dirname(os.path.dirname(llguidance.__file__)))")
  cp -r "$site"/llguidance "$site"/llguidance-*.dist-info var/devwheels/pkg/ && rm -rf var/devwheels/pkg/llguidance/__pycache__
  du -sh var/devwheels ;;
run)
  source .mlxc/device_env.sh || exit 1
  if [ ! -f /tmp/site2/.ok ]; then
    mkdir -p /tmp/site2 && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site2 \
      var/devwheels/*.whl && cp -r var/devwheels/pkg/* /tmp/site2/ && touch /tmp/site2/.ok || exit 1
  fi
  export PYTHONPATH=$PWD:/tmp/site2:$PYTHONPATH OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=2 HF_HUB_OFFLINE=1
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
