#!/usr/bin/env bash
# The whole pipeline locally on the bundled example data; prints the result JSON.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
# No hub here: the `gpt` preset falls back to a GPT-2-shaped model built from a config, with a
# tokenizer trained on the data (the output says so).
# One thread: a ~1M-parameter model gains nothing from more, and two threads on two busy
# cores spend half their time spinning. 100 steps of 8 packed 256-token sequences are about
# four passes over the 442 training conversations: about a minute on 2 cores.
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/chatbot-training run \
  --training_data examples/data/support.jsonl \
  --model_type gpt \
  --training_steps "${DEMO_STEPS:-100}" \
  --batch_size 8 \
  --learning_rate "${DEMO_LR:-0.002}" \
  --set maxSeqLength=256 \
  --name support-bot \
  --output output/demo "$@"
