#!/usr/bin/env bash
# The main job on its embedded default: the bundled Llama-style model on the bundled text,
# 2 CPU worker processes through the same launcher a SageMaker host uses.
source "$(dirname "$0")/_venv.sh"
install_package ""
cd "$ROOT"
exec llm-runtime train "$@"
