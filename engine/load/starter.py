"""`recipe init`: a commented starter recipe and a small data file that it runs on, or one of the
shipped example recipes (`--example NAME`) with the data and constitutions it reads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from engine.core.errors import RecipeError
from engine.core.shipped import shipped

STARTER = """\
# A starter recipe. Run it with:
#   recipe run recipe.toml
# then look at what it did:
#   recipe status && recipe show starter filtered
# Edit a knob below and run `recipe plan recipe.toml` to see what would re-run and why.

[recipe]
name = "starter"       # names the run folder: runs/starter/
seed = 1234            # every stage's randomness derives from it; part of every fingerprint

[datasets.seed]
path = "data/conversations.jsonl"   # relative to this file; jsonl/json/parquet/csv or a hub id
type = "conversations"              # rows with messages: [{role, content}, ...]
# columns = { messages = "conversation" }   # map your column names
# limit = 1000                              # first N rows (after shuffle_seed, if set)

[stages.filtered]
kind = "filter"
input = "seed"          # a dataset or a stage that gives conversations
min_words = 3           # every assistant turn needs at least this many words
drop_filler = true      # short assistant turns that add nothing ("Sure, happy to help!")
max_sycophancy = 0.5    # drop if more than half the assistant turns flatter the user
refusals = "keep"       # "drop" removes refusals, "only" keeps nothing else
dedup = "near"          # "exact" or "near" (word 3-gram Jaccard >= near_threshold)
near_threshold = 0.8
keep_dropped = true     # save dropped rows with their reason, for inspection
"""

EXAMPLES = [
    [
        ("user", "How long should I boil an egg for a firm yolk?"),
        (
            "assistant",
            "About ten to eleven minutes from the moment the water boils, then cool it in cold water "
            "so the yolk stops cooking and the shell peels easily.",
        ),
    ],
    [("user", "Can you help me name a small bakery?"), ("assistant", "Sure, happy to help!")],
    [
        ("user", "What does a linter do?"),
        (
            "assistant",
            "A linter reads source code without running it and flags likely mistakes, such as unused "
            "variables, unreachable code or style that breaks the project's rules.",
        ),
        ("user", "Is it the same as a formatter?"),
        (
            "assistant",
            "No. A formatter rewrites layout (spacing, line breaks) so code looks uniform; a linter "
            "reports problems and usually leaves the code as it is.",
        ),
    ],
]


def write_starter(directory: Path, force: bool = False) -> list[Path]:
    recipe = directory / "recipe.toml"
    data = directory / "data" / "conversations.jsonl"
    existing = [p for p in (recipe, data) if p.exists()]
    if existing and not force:
        raise RecipeError.single(f"{existing[0]} already exists.", hint="Choose another directory or pass --force.")
    data.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text(STARTER, encoding="utf-8")
    with open(data, "w", encoding="utf-8") as fh:
        for i, turns in enumerate(EXAMPLES):
            row = {"id": f"example-{i}", "messages": [{"role": r, "content": c} for r, c in turns]}
            fh.write(json.dumps(row) + "\n")
    return [recipe, data]


def examples() -> list[str]:
    """The shipped example recipes, by name."""
    return sorted(p.stem for p in shipped("recipes").glob("*.toml"))


def write_example(directory: Path, name: str, force: bool = False) -> list[Path]:
    """Copy the example recipe `name` into `directory` with the folders it reads (data/,
    constitutions/), so it validates and runs there as in the repository."""
    source = shipped("recipes")
    if name not in examples():
        raise RecipeError.single(f"no shipped example recipe '{name}'.", hint=f"One of: {', '.join(examples())}.")
    recipe = directory / f"{name}.toml"
    targets = [recipe, *(directory / d for d in ("data", "constitutions"))]
    existing = [p for p in targets if p.exists()]
    if existing and not force:
        raise RecipeError.single(f"{existing[0]} already exists.", hint="Choose another directory or pass --force.")
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source / f"{name}.toml", recipe)
    for folder in ("data", "constitutions"):
        shutil.copytree(source / folder, directory / folder, dirs_exist_ok=True)
    return targets
