#!/usr/bin/env bash
# The test suite: unit, trainer (tiny models, GGUF read back by transformers and llama.cpp),
# operator (the real Kopf operator against a Kubernetes API emulator), deployment (real helm).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh --llama
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest "$@"
