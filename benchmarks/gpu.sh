#!/usr/bin/env bash
# The GPU run, at most 8 minutes, installing nothing: healthcheck, the NCCL path and verify-efa,
# MFU of ~1B-parameter models (bundled and Hugging Face Llama) in bf16, step overhead against a
# plain FSDP2 loop, checkpoint blocked time to local disk. Appends a section to RESULTS.md.
#   benchmarks/gpu.sh             on a machine with a CUDA GPU
#   benchmarks/gpu.sh --dry-run   on CPU with a tiny model (the suite runs this)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-$(command -v python || command -v python3)}"
exec timeout --kill-after=10 480 "$PY" benchmarks/gpu.py "$@"
