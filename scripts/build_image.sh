#!/usr/bin/env bash
# Build an llm-runtime image from docker/Dockerfile:   scripts/build_image.sh cpu|gpu [TAG]
#
#   cpu: TAG defaults to llm-runtime:cpu;  gpu: llm-runtime:gpu.
#
# 1. wheelhouse: torch (TORCH_VERSION, default 2.13.0; the CPU or CUDA wheel from this host's pip
#    configuration or TORCH_INDEX) and llm-runtime with its extras, built on this host into
#    .wheelhouse/, so pip inside the build needs no index (nor TLS through a proxy);
# 2. base: CPU_BASE (default debian:bookworm-slim). Where no registry answers, a bookworm base is
#    bootstrapped from Debian packages (debootstrap, then docker import) as llm-runtime-base:bookworm;
# 3. docker build (BuildKit, host network for apt) of the flavour's stages.
# The GPU flavour needs the CUDA base and the EFA installer; where neither can be fetched, it builds
# the stages it shares with the CPU image on the bootstrapped base and says what it skipped.
# Each stage prints its time. Environment: TORCH_VERSION, TORCH_INDEX, CPU_BASE, CUDA_BASE,
# EXTRAS, DEBIAN_MIRROR, LLM_RUNTIME_PYTHON (the python that builds the wheelhouse),
# LLM_RUNTIME_NO_REGISTRY=1 (no pull is tried: the bootstrapped base; the test suite sets it).
set -euo pipefail
FLAVOUR="${1:-}"
case "$FLAVOUR" in
  cpu|gpu) ;;
  *) echo "usage: scripts/build_image.sh cpu|gpu [TAG]" >&2; exit 2 ;;
esac
TAG="${2:-llm-runtime:$FLAVOUR}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
CPU_BASE="${CPU_BASE:-debian:bookworm-slim}"
CUDA_BASE="${CUDA_BASE:-nvidia/cuda:12.8.1-cudnn-devel-ubuntu22.04}"
if [ "$FLAVOUR" = gpu ]; then
  EXTRAS="${EXTRAS:-s3,data,sagemaker,tokenizers,tensorboard,hf,deepspeed}"
else
  EXTRAS="${EXTRAS:-s3,data,sagemaker,tokenizers,tensorboard,hf}"
fi
PY="${LLM_RUNTIME_PYTHON:-$(command -v python3)}"
export DOCKER_BUILDKIT=1

# A client that builds with BuildKit: one with the buildx plugin, or Debian's docker.io 20.10 client,
# which drives the daemon's own BuildKit without it.
if docker buildx version >/dev/null 2>&1; then
  BUILDER=docker
elif [ -x /usr/bin/docker ] && /usr/bin/docker version --format '{{.Client.Version}}' 2>/dev/null | grep -q '^20\.'; then
  BUILDER=/usr/bin/docker
else
  echo "build_image: no docker client here builds with BuildKit: install the buildx plugin" >&2
  exit 1
fi

stage() {  # stage NAME COMMAND...: run it, print its time
  local name="$1" start=$SECONDS; shift
  echo "build_image: $name ..."
  "$@"
  echo "build_image: $name done in $((SECONDS - start)) s"
}

wheelhouse() {
  rm -rf "$ROOT/.wheelhouse" && mkdir -p "$ROOT/.wheelhouse"
  local index=()
  [ -n "${TORCH_INDEX:-}" ] && index=(--extra-index-url "$TORCH_INDEX")
  "$PY" -m pip wheel -q -w "$ROOT/.wheelhouse" "${index[@]}" "torch==$TORCH_VERSION" "$ROOT[$EXTRAS]" \
    2>&1 | grep -v "^WARNING: Location" || true
  ls "$ROOT"/.wheelhouse/llm_runtime-*.whl "$ROOT"/.wheelhouse/torch-"$TORCH_VERSION"*.whl >/dev/null
  # deps/ (a build layer cached while they stay the same) and app/ (llm-runtime alone)
  mkdir -p "$ROOT/.wheelhouse/deps" "$ROOT/.wheelhouse/app"
  mv "$ROOT"/.wheelhouse/llm_runtime-*.whl "$ROOT/.wheelhouse/app/"
  mv "$ROOT"/.wheelhouse/*.whl "$ROOT/.wheelhouse/deps/"
  echo "build_image: wheelhouse $(du -sh "$ROOT/.wheelhouse" | cut -f1), $(ls "$ROOT/.wheelhouse/deps" | wc -l) dependency wheels"
}

registry_reachable() {  # can the daemon pull the base? (an image already here counts)
  docker image inspect "$1" >/dev/null 2>&1 && return 0
  [ "${LLM_RUNTIME_NO_REGISTRY:-0}" = 1 ] && return 1  # known offline: do not even try
  timeout 60 docker pull -q "$1" >/dev/null 2>&1
}

bootstrap_base() {
  local mirror="${DEBIAN_MIRROR:-}"
  if [ -z "$mirror" ]; then
    mirror="$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)"
  fi
  mirror="${mirror:-http://deb.debian.org/debian}"
  command -v debootstrap >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }
  local dir; dir="$(mktemp -d)"
  debootstrap --variant=minbase bookworm "$dir" "$mirror" >"$dir.log" 2>&1 || { tail -5 "$dir.log" >&2; exit 1; }
  tar -C "$dir" -c . | docker import - llm-runtime-base:bookworm >/dev/null
  rm -rf "$dir" "$dir.log"
}

cd "$ROOT"
stage "wheelhouse (torch $TORCH_VERSION, llm-runtime[$EXTRAS])" wheelhouse
if ! registry_reachable "$CPU_BASE"; then
  if docker image inspect llm-runtime-base:bookworm >/dev/null 2>&1; then
    echo "build_image: $CPU_BASE cannot be pulled; using the bootstrapped llm-runtime-base:bookworm"
  else
    stage "base: $CPU_BASE cannot be pulled; bootstrapping bookworm with debootstrap" bootstrap_base
  fi
  CPU_BASE=llm-runtime-base:bookworm
fi
ARGS=(--network host -f docker/Dockerfile --build-arg "CPU_BASE=$CPU_BASE" --build-arg "CUDA_BASE=$CUDA_BASE"
      -t "$TAG")
if [ "$FLAVOUR" = gpu ] && ! registry_reachable "$CUDA_BASE"; then
  echo "build_image: $CUDA_BASE cannot be pulled here: skipping the system-gpu stage (CUDA base, EFA installer);"
  echo "build_image: building the stages the GPU image shares with the CPU one, on $CPU_BASE"
  ARGS+=(--build-arg FLAVOUR=cpu)
else
  ARGS+=(--build-arg "FLAVOUR=$FLAVOUR")
fi
build() { "$BUILDER" build -q "${ARGS[@]}" . >/dev/null; }
stage "docker build $TAG" build
echo "build_image: $TAG ($(docker image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%.2f GB", $1 / 1e9}'))"
