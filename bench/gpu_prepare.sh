#!/usr/bin/env bash
# Prepare a run of bench/gpu.py on a GPU machine that has torch, transformers, peft, accelerate and
# pyarrow but not the rest of our dependencies, and cannot download weights or packages:
#   .whl/           Python 3.12 manylinux wheels of what is missing there (WHEELS below)
#   .gpu/tokenizer  SmolLM2's tokenizer (from builtin:smollm2-135m), for the random-init 1.7B model
# Both are git-ignored. The script checks that every module bench/gpu.py needs (its NEEDS table) is in
# a wheel here or on that machine already (ON_MACHINE). Then, on the machine (the device tool: carry
# .whl and .gpu):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#       .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && python3 bench/gpu.py --tokenizer .gpu/tokenizer --out $OUT
# bench/gpu.py says at start which modules are still missing and skips the parts that need them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WHEELS=(
  trl==1.16.0 datasets==5.2.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
  typing-inspection==0.4.5 dill==0.4.1 multiprocess==0.70.19 xxhash pandas python-dateutil six pytz tzdata
  click rich markdown-it-py mdurl pygments
  matplotlib contourpy cycler fonttools kiwisolver pyparsing pillow
)
ON_MACHINE="jinja2 filelock pyarrow"  # torch brings jinja2 and filelock; pyarrow is installed there
rm -rf .whl && mkdir -p .whl .gpu
for pkg in "${WHEELS[@]}"; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "$pkg"
done
ON_MACHINE="$ON_MACHINE" "$PY" - <<'PY'
import ast, os, zipfile
from pathlib import Path
tops = set()
for wheel in Path(".whl").glob("*.whl"):
    for name in zipfile.ZipFile(wheel).namelist():
        top = name.split("/")[0]
        if not top.endswith((".dist-info", ".data")):
            tops.add(top.removesuffix(".py").split(".")[0])
source = Path("bench/gpu.py").read_text()
tree = ast.parse(source)
needs = next(
    ast.literal_eval(node.value) for node in ast.walk(tree)
    if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "NEEDS"
)
missing = sorted(set(needs) - tops - set(os.environ["ON_MACHINE"].split()))
if missing:
    raise SystemExit(f"no wheel here for: {', '.join(missing)} (add them to WHEELS)")
print(f"wheels cover every module bench/gpu.py needs: {', '.join(sorted(needs))}")
PY
"$PY" - <<'PY'
from pathlib import Path
from transformers import AutoTokenizer
from engine.models.builtins import builtin_dir
AutoTokenizer.from_pretrained(str(builtin_dir("smollm2-135m", Path(".cache")))).save_pretrained(".gpu/tokenizer")
PY
du -sh .whl .gpu
