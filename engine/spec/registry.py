"""The one table from `kind = "..."` to the module that implements it.

What a stage module is, and its optional hooks, is written in engine/spec/stage.py (the contract,
checked here when a kind loads). Third-party kinds join through the entry point group
`recipe.stages` (`name = "package.module"`), so a plugin is a pip-installable package.
"""

from __future__ import annotations

import importlib
from functools import cache, lru_cache
from types import ModuleType

BUILTIN = {
    "filter": "stages.filter",
    "generate": "stages.generate",
    "judge": "stages.judge",
    "sft": "stages.sft",
    "critique_revise": "stages.critique_revise",
    "dpo": "stages.dpo",
    "kto": "stages.dpo",
    "orpo": "stages.dpo",
    "cpo": "stages.dpo",
    "eval": "stages.eval",
    "rejection_sample": "stages.rejection_sample",
    "preferences": "stages.preferences",
    "grpo": "stages.grpo",
}

ENTRY_POINT_GROUP = "recipe.stages"


@lru_cache(maxsize=1)
def kinds() -> dict[str, str]:
    """Every known kind -> module path: the built-ins, then plugins (which cannot shadow them)."""
    table = dict(BUILTIN)
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        table.setdefault(ep.name, ep.value)
    return table


@cache
def load(kind: str) -> ModuleType:
    """The module for a kind, checked against the stage contract (engine.spec.stage); KeyError if the
    kind is unknown, TypeError naming every broken part of the contract."""
    from engine.spec.stage import contract_problems

    module = importlib.import_module(kinds()[kind])
    problems = contract_problems(module)
    if problems:
        raise TypeError(
            f"stage module {module.__name__} (kind '{kind}') breaks the stage contract "
            f"(engine/spec/stage.py): {'; '.join(problems)}"
        )
    return module
