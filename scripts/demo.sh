#!/usr/bin/env bash
# The whole pipeline locally on the bundled example data; prints the result JSON.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
# No hub here: the `gpt` preset falls back to a GPT-2-shaped model built from a config, with a
# tokenizer trained on the data (the output says so).
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/chatbot-training run \
  --training_data examples/data/support.jsonl \
  --model_type gpt \
  --training_steps "${DEMO_STEPS:-300}" \
  --batch_size 8 \
  --learning_rate "${DEMO_LR:-0.002}" \
  --name support-bot \
  --output output/demo "$@"
