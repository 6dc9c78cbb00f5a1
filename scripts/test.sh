#!/usr/bin/env bash
# Install what the tests need (Open MPI and Docker from Debian when missing) and run every test.
source "$(dirname "$0")/_venv.sh"
if ! command -v mpirun >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openmpi-bin libopenmpi-dev >/dev/null
  else
    echo "scripts/test.sh: mpirun is missing; install Open MPI (openmpi-bin) first" >&2
    exit 1
  fi
fi
# The container tests build and run the CPU image: Docker's daemon (debootstrap for the image's base).
if ! docker info >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap >/dev/null
    fi
    nohup dockerd >/var/log/llm-runtime-dockerd.log 2>&1 &
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  fi
  docker info >/dev/null 2>&1 || { echo "scripts/test.sh: Docker is not running (install docker.io, start dockerd)" >&2; exit 1; }
fi
install_package "[test]"
# Every test dependency must import: a silently failed install would turn tests into skips.
# (find_spec, not import: importing sagemaker_training creates /opt/ml directories.)
python -c "
import importlib.util, sys
missing = [m for m in ('pytest', 'deepspeed', 'webdataset', 'boto3', 'moto', 'sagemaker_training', 'tokenizers',
                          'matplotlib', 'tensorboard', 'tqdm', 'transformers', 'mlflow', 'wandb')
           if importlib.util.find_spec(m) is None]
sys.exit(f'missing: {missing}' if missing else 0)" || {
  echo "scripts/test.sh: a test dependency failed to install (pip install -e '.[test]')" >&2; exit 1; }
cd "$ROOT"
exec python -m pytest -q --durations=15 "${@:-tests}"
