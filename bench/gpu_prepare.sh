#!/usr/bin/env bash
# Prepare a run of bench/gpu.py on a GPU machine that has torch, transformers, peft and accelerate
# but not the rest of our dependencies, and cannot download weights or packages:
#   .whl/           Python 3.12 manylinux wheels of what is missing there (about 5 MB)
#   .gpu/tokenizer  SmolLM2's tokenizer (from builtin:smollm2-135m), for the random-init 1.7B model
# Both are git-ignored. Then, on the machine (the device tool: carry .whl and .gpu):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#       .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && python3 bench/gpu.py --tokenizer .gpu/tokenizer --out $OUT
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
rm -rf .whl && mkdir -p .whl .gpu
for pkg in trl==1.16.0 datasets==5.2.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
           typing-inspection==0.4.5 dill==0.4.1 multiprocess==0.70.19; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "$pkg"
done
"$PY" - <<'PY'
from pathlib import Path
from transformers import AutoTokenizer
from engine.models.builtins import builtin_dir
AutoTokenizer.from_pretrained(str(builtin_dir("smollm2-135m", Path(".cache")))).save_pretrained(".gpu/tokenizer")
PY
du -sh .whl .gpu
