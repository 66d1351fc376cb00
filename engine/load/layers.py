"""Layering a recipe: a file merged over what it `extends` (recursively; tables merge, later
keys win; the keys its `[recipe] unset` list names are removed from the bases first), then
`--unset KEY` and `--set KEY=VALUE` overrides in that order, each key keeping where it was set.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

from engine.core.errors import RecipeError
from engine.core.toml import tomllib
from engine.spec.locations import SET_SOURCE, _display, _split_key, locate, read_toml
from engine.spec.paths import path_problem


def deep_merge(base: dict, over: dict) -> dict:
    """Tables merge recursively; any other value in `over` replaces the one in `base`."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_layers(path: Path, _stack: tuple[Path, ...] = ()) -> tuple[dict, dict[str, tuple[str, int]]]:
    """The file merged over what it extends (recursively), with each key's location."""
    path = path.resolve()
    if path in _stack:
        cycle = " -> ".join(_display(p) for p in (*_stack, path))
        raise RecipeError.single(
            f"extends cycle: {cycle}.",
            file=_display(_stack[-1]),
            key="recipe.extends",
            hint="Remove one of the extends entries.",
        )
    data, locations = read_toml(path)
    bases = (data.get("recipe") or {}).get("extends") if isinstance(data.get("recipe"), dict) else None
    if bases is None:
        return data, locations
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise RecipeError.single(
            "expected a file name or a list of file names.", **locate(locations, "recipe.extends", path)
        )
    merged: dict = {}
    merged_locs: dict[str, tuple[str, int]] = {}
    for base in bases:
        if (why := path_problem(base)) is not None:
            raise RecipeError.single(
                f"extends {base[:60]!r}, which {why}.", **locate(locations, "recipe.extends", path)
            )
        base_path = path.parent / base
        if not base_path.is_file():
            raise RecipeError.single(
                f"extends '{base}', which does not exist ({_display(base_path)}).",
                **locate(locations, "recipe.extends", path),
                hint="Paths are relative to the recipe file.",
            )
        b_data, b_locs = load_layers(base_path, (*_stack, path))
        merged = deep_merge(merged, b_data)
        merged_locs.update(b_locs)
    unset = (data.get("recipe") or {}).get("unset", [])
    if not isinstance(unset, list) or not all(isinstance(k, str) for k in unset):
        raise RecipeError.single(
            'expected a list of dotted keys, e.g. unset = ["stages.judge.function"].',
            **locate(locations, "recipe.unset", path),
        )
    for key in unset:
        remove_key(merged, merged_locs, key, where=locate(locations, "recipe.unset", path), bases=True)
    merged = deep_merge(merged, data)
    merged_locs.update(locations)
    merged.setdefault("recipe", {}).pop("extends", None)
    merged["recipe"].pop("unset", None)
    return merged, merged_locs


def remove_key(data: dict, locations: dict, key: str, where: dict, bases: bool = False) -> None:
    """Remove the dotted `key` (a value or a whole table) and the locations under it; a key that is
    not there is an error naming the nearest keys that are."""
    import difflib

    parts = _split_key(key.strip())
    node: Any = data
    for i, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            here = ".".join(parts[:i])
            near = difflib.get_close_matches(part, list(node) if isinstance(node, dict) else [], n=3)
            raise RecipeError.single(
                f"unset '{key}': {'the recipes it extends have' if bases else 'the recipe has'} no key "
                f"'{part}'{f' in {here}' if here else ''}.",
                hint=f"Did you mean {', '.join(repr('.'.join([*parts[:i], n])) for n in near)}?"
                if near
                else "Check the key with `recipe plan --resolved`.",
                **where,
            )
        if i == len(parts) - 1:
            del node[part]
        else:
            node = node[part]
    dotted = ".".join(parts)
    for k in [k for k in locations if k == dotted or k.startswith(dotted + ".")]:
        del locations[k]


def apply_unsets(data: dict, locations: dict, keys: list[str]) -> None:
    for key in keys:
        remove_key(data, locations, key, where={"file": "--unset"})


def parse_set(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a","b","c"], value parsed as TOML, or the raw text if it is not TOML)."""
    if "=" not in item:
        raise RecipeError.single(
            f"'{item}' is not KEY=VALUE.", file=SET_SOURCE, hint="Example: --set stages.sft.lr=1e-4"
        )
    key, raw = item.split("=", 1)
    parts = _split_key(key.strip())
    if not parts or ".".join(parts) != re.sub(r"\s+", "", key.strip()).replace('"', "").replace("'", ""):
        raise RecipeError.single(f"'{key}' is not a dotted key.", file=SET_SOURCE)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare words such as Qwen/Qwen2.5-0.5B are meant as strings
    return parts, value


def apply_sets(data: dict, locations: dict, sets: list[str]) -> None:
    for item in sets:
        parts, value = parse_set(item)
        node = data
        for i, part in enumerate(parts[:-1]):
            if part not in node:  # a table this --set creates: problems inside it point at --set
                locations.setdefault(".".join(parts[: i + 1]), (SET_SOURCE, 0))
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise RecipeError.single(
                    f"'{'.'.join(parts[: i + 1])}' is not a table, so it has no key '{parts[i + 1]}'.",
                    file=SET_SOURCE,
                    key=".".join(parts),
                )
            node = nxt
        node[parts[-1]] = value
        locations[".".join(parts)] = (SET_SOURCE, 0)
