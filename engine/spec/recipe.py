"""TOML recipe -> validated pydantic models, with every error located (file, line, dotted key).

Loading order: read the file (and what it `extends`, recursively; tables merge, later keys
win), apply `--set` overrides, resolve relative paths against the directory of the file that
set them, then validate every table. All problems are gathered and raised together as one
`RecipeError`. The graph checks (references, cycles, artifact types) live in `graph.py`.

`[loops.NAME]` tables (iterative rounds, engine/spec/rounds.py) unroll after the stages are parsed
and before the graph checks: `recipe.stages` holds `dpo@1` .. `dpo@N`, while `recipe.raw` keeps
the user's loop table. Problems in an unrolled stage point at the user's own key and line, with
the round (`stages.dpo.model (round 2)`).
"""

from __future__ import annotations

import copy
import json
import difflib
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from pydantic import Field, ValidationError

from engine.spec import registry
from engine.spec.config import PATH, StageConfig, Table, marker, ref_fields
from engine.core.errors import Problem, RecipeError
from engine.spec.stage import hook
from engine.spec.rounds import LoopSpec, Rounds, loop_problems, merge_round_problems

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SET_SOURCE = "--set"
NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$"


class RecipeMeta(Table):
    name: str = Field(pattern=NAME_PATTERN, description="Names the run folder: runs/<name>/.")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seeds every stage; part of every fingerprint "
                                                          "(0 to 2^32 - 1, what torch and numpy accept).")
    description: str = ""
    extends: str | list[str] | None = Field(
        None, description="Base recipe(s), relative to this file; tables merge, later keys win."
    )


class ModelSpec(Table):
    path: str = Field(description="A hub id, a local directory, builtin:smollm2-135m or builtin:tiny-chat.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    device: str = Field("auto", description="auto = every visible GPU (generation runs a replica on each; training "
                                            "uses the first), else cpu. Or one device, or a list: \"cuda:0,cuda:1\".")
    adapter: str | None = Field(None, description="A PEFT adapter dir or a stage giving one.")
    chat_template: str | None = Field(None, description="Inline Jinja or a template file.")
    trust_remote_code: bool = False
    backend: Literal["hf", "openai", "vllm"] = Field(
        "hf", description="hf = transformers in process; openai = a server; vllm = vLLM's engine in process "
                          "(pip install recipe-engine[vllm], GPUs only).")
    kv_cache: Literal["auto", "static", "dynamic"] = Field(
        "auto", description="hf backend: static = fixed-size KV cache with the decode step compiled (CUDA "
                            "graphs); dynamic = grows per step. auto = static on CUDA, dynamic on the CPU. "
                            "Execution-only (same text).")
    base_url: str | None = Field(None, description="openai backend: the server, e.g. http://127.0.0.1:8000/v1.")
    model_name: str | None = Field(None, description="openai backend: the model name the server knows (default: path).")
    api_key_env: str | None = Field(None, description="openai backend: the environment variable holding the key.")
    max_concurrency: int = Field(4, ge=1, description="openai backend: requests in flight at once.")
    timeout_s: float = Field(120.0, gt=0, description="openai backend: per-request timeout.")


class DatasetSpec(Table):
    path: str = Field(description="A jsonl/json/parquet/csv file, a local HF dataset dir, or a hub id.")
    type: Literal["conversations", "prompts", "preferences"] = Field(
        "conversations", description="What the rows are; checked against the stages that read them."
    )
    format: Literal["jsonl", "json", "parquet", "csv"] | None = Field(
        None, description="Overrides the file extension."
    )
    split: str = "train"
    columns: dict[str, str] = Field(
        default_factory=dict, description='Target -> source column, e.g. { messages = "conv" }.'
    )
    limit: int | None = Field(None, ge=1, description="Keep the first N rows (after shuffling).")
    shuffle_seed: int | None = Field(None, description="Shuffle rows with this seed before limit.")
    revision: str | None = Field(None, description="Hub revision for hub ids.")


class ConstitutionSpec(Table):
    path: str = Field(description="A constitution TOML file.")


SECTIONS: dict[str, type[Table] | None] = {
    "recipe": RecipeMeta,
    "models": ModelSpec,
    "datasets": DatasetSpec,
    "constitutions": ConstitutionSpec,
    "stages": None,  # validated per kind
    "loops": None,  # LoopSpec, checked against the stages
}
EXTRA_SECTIONS: dict[str, type[Table]] = {"loops": LoopSpec}  # more [name.NAME] tables, for the reference


@dataclass
class Stage:
    name: str
    kind: str
    config: StageConfig
    module: ModuleType
    round: int | None = None  # in a loop: the round (the name is then `base@round`)
    loop: str | None = None  # in a loop: its [loops.*] name

    @property
    def base(self) -> str:
        """The name the user gave the stage (`dpo` for `dpo@2`)."""
        return self.name.rsplit("@", 1)[0] if self.round is not None else self.name


@dataclass
class Recipe:
    """A loaded, validated recipe. `raw` is the merged, resolved dict (what `plan` shows)."""

    path: Path
    meta: RecipeMeta
    models: dict[str, ModelSpec]
    datasets: dict[str, DatasetSpec]
    constitutions: dict[str, ConstitutionSpec]
    stages: dict[str, Stage]
    raw: dict[str, Any]
    locations: dict[str, tuple[str, int]] = field(default_factory=dict)
    loops: dict[str, LoopSpec] = field(default_factory=dict)
    previews: dict[str, list[dict] | None] = field(default_factory=dict, repr=False)

    def dataset_rows(self, name: str) -> list[dict] | None:
        """The rows of dataset `name` as validate loaded them (small local files), else None."""
        return self.previews.get(name)

    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def dir(self) -> Path:
        return self.path.parent

    def where(self, key: str) -> dict[str, Any]:
        """file/line/key keywords for a Problem about `key` (nearest located parent key). A key of
        an unrolled stage (`stages.dpo@2.beta`) is located at the user's key, round named:
        `stages.dpo.beta (round 2)`."""
        m = _ROUND_STAGE_KEY.match(key)  # user names never hold '@' (load_recipe rejects them)
        if m:
            user_key = f"stages.{m.group(1)}{m.group(3)}"
            return {**locate(self.locations, user_key, self.path), "key": f"{user_key} (round {m.group(2)})"}
        return locate(self.locations, key, self.path)

    def stage_names(self, names: list[str] | tuple[str, ...]) -> list[str]:
        """Stage names as a user gives them (`--only`, `--force`) -> names in `stages`: a loop
        stage's own name means its last round, `name@*` every round, `name@2` one round. Unknown
        names are kept, for the caller to report."""
        return Rounds(self.loops).names(list(names), list(self.stages))


# --------------------------------------------------------------------------- locating keys

_ROUND_STAGE_KEY = re.compile(r"^stages\.(.+?)@([1-9][0-9]*)((?:\..*)?)$")
_SEG = r'(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|\'[^\']*\')'
_KEY = rf"{_SEG}(?:\s*\.\s*{_SEG})*"
_HEADER = re.compile(rf"^\s*(\[\[?)\s*({_KEY})\s*\]\]?\s*(#.*)?$")
_ASSIGN = re.compile(rf"^\s*({_KEY})\s*=\s*(.*)$")
_INLINE_KEY = re.compile(rf"(?:^|[{{,])\s*({_KEY})\s*=")


def _split_key(key: str) -> list[str]:
    parts = re.findall(_SEG, key)
    return [p[1:-1] if p[:1] in "\"'" else p for p in parts]


def locate_keys(text: str) -> dict[str, int]:
    """Dotted key -> 1-based line where it is set or its table opens. Best effort, no parsing:
    tomllib has validated the syntax already; this only needs to find where keys are."""
    found: dict[str, int] = {}
    prefix: list[str] = []
    arrays: dict[str, int] = {}
    pending = ""  # an open multi-line value: its closing token
    for lineno, line in enumerate(text.splitlines(), 1):
        if pending:
            if pending in ('"""', "'''"):
                if line.count(pending) % 2 == 1:
                    pending = ""
            elif line.count("[") - line.count("]") < 0 or line.strip().endswith("]"):
                pending = ""
            continue
        m = _HEADER.match(line)
        if m:
            prefix = _split_key(m.group(2))
            if m.group(1) == "[[":
                dotted = ".".join(prefix)
                arrays[dotted] = arrays.get(dotted, -1) + 1
                prefix = prefix + [str(arrays[dotted])]
            for i in range(1, len(prefix) + 1):
                found.setdefault(".".join(prefix[:i]), lineno)
            continue
        m = _ASSIGN.match(line)
        if not m:
            continue
        full = prefix + _split_key(m.group(1))
        for i in range(1, len(full) + 1):
            found.setdefault(".".join(full[:i]), lineno)
        value = m.group(2).split("#", 1)[0].strip() if '"' not in m.group(2) else m.group(2).strip()
        if value.startswith("{"):
            for sub in _INLINE_KEY.findall(value):
                found.setdefault(".".join(full + _split_key(sub)), lineno)
        for quote in ('"""', "'''"):
            if value.startswith(quote) and value.count(quote) == 1:
                pending = quote
        if value.startswith("[") and value.count("[") > value.count("]"):
            pending = "]"
    return found


def locate(locations: dict[str, tuple[str, int]], key: str, default_file: Path | str | None) -> dict:
    parts = key.split(".")
    for i in range(len(parts), 0, -1):
        hit = locations.get(".".join(parts[:i]))
        if hit:
            return {"file": hit[0], "line": hit[1], "key": key}
    return {"file": str(default_file) if default_file else None, "key": key}


def _syntax_line(exc: Exception) -> int | None:
    m = re.search(r"line (\d+)", str(exc))
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------- reading files


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def read_toml(path: Path) -> tuple[dict, dict[str, tuple[str, int]]]:
    """Parse one file; a syntax error is a RecipeError naming the file and line."""
    shown = _display(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError.single("file not found.", file=shown, hint="Check the path.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError.single(f"cannot read the file: {exc}", file=shown) from None
    try:
        data = tomllib.loads(text)
    except RecursionError:
        raise RecipeError.single("arrays or inline tables are nested too deeply to read.", file=shown,
                                 hint=f"Recipes never need more than {MAX_DEPTH} levels; flatten the value.") from None
    except tomllib.TOMLDecodeError as exc:
        msg = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(exc))
        raise RecipeError.single(
            f"TOML syntax error: {msg}.",
            file=shown,
            line=_syntax_line(exc),
            hint="Fix the syntax (strings need quotes; tables are [name]).",
        ) from None
    locations = {k: (shown, line) for k, line in locate_keys(text).items()}
    return data, locations


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
            f"extends cycle: {cycle}.", file=_display(_stack[-1]), key="recipe.extends",
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
            raise RecipeError.single(f"extends {base[:60]!r}, which {why}.", **locate(locations, "recipe.extends", path))
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
    merged = deep_merge(merged, data)
    merged_locs.update(locations)
    merged.setdefault("recipe", {}).pop("extends", None)
    return merged, merged_locs


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
                    file=SET_SOURCE, key=".".join(parts),
                )
            node = nxt
        node[parts[-1]] = value
        locations[".".join(parts)] = (SET_SOURCE, 0)


# --------------------------------------------------------------------------- paths


def is_hub_id(value: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", value)) and not re.search(
        r"\.(jsonl|json|parquet|csv|toml|j2|jinja|txt)$", value
    )


MAX_PATH = 4096  # bytes in a path (Linux PATH_MAX)
MAX_NAME = 255  # bytes in one path component (NAME_MAX)


def path_problem(value: str) -> str | None:
    """What makes `value` unusable as a file path on this system, or None."""
    if "\x00" in value:
        return "holds a NUL byte, which no file name can contain"
    if len(value.encode("utf-8", "surrogatepass")) > MAX_PATH:
        return f"is {len(value):,} characters long; paths have at most {MAX_PATH} bytes"
    long = next((part for part in value.split("/") if len(part.encode("utf-8", "surrogatepass")) > MAX_NAME), None)
    if long is not None:
        return f"has a component of {len(long)} characters ('{long[:20]}...'); names have at most {MAX_NAME} bytes"
    return None


def resolve_path(value: str, key: str, locations: dict, top: Path) -> str:
    """Absolute path for a local file value, relative to the file that set it. Hub ids and
    builtin names are returned unchanged. An impossible path (NUL, too long) is a RecipeError."""
    if (why := path_problem(value)) is not None:
        raise RecipeError.single(f"the path {value[:60]!r}{'...' if len(value) > 60 else ''} {why}.",
                                 hint="Give the path of an existing file, relative to the recipe file.",
                                 **locate(locations, key, top))
    if value.startswith("builtin:") or Path(value).is_absolute():
        return value
    source = locations.get(key, (str(top), 0))[0]
    base = top.parent if source == SET_SOURCE else Path(source).resolve().parent
    candidate = (base / value).resolve()
    if candidate.exists() or not is_hub_id(value) or value.startswith("."):
        return str(candidate)
    return value


def _resolve_paths(data: dict, locations: dict, top: Path) -> None:
    for section, spec_keys in (("models", ("path", "adapter")), ("datasets", ("path",)), ("constitutions", ("path",))):
        for name, table in (data.get(section) or {}).items():
            if not isinstance(table, dict):
                continue
            for k in (*spec_keys, "chat_template") if section == "models" else spec_keys:
                if k == "chat_template" and ("{" in str(table.get(k)) or "\n" in str(table.get(k))):
                    continue  # inline Jinja, not a file name
                if isinstance(table.get(k), str):
                    table[k] = resolve_path(table[k], f"{section}.{name}.{k}", locations, top)


def _resolve_stage_paths(name: str, table: dict, config_cls: type[StageConfig], locations: dict, top: Path) -> None:
    for fname in config_cls.model_fields:
        if marker(config_cls, fname, PATH) and isinstance(table.get(fname), str):
            table[fname] = resolve_path(table[fname], f"stages.{name}.{fname}", locations, top)


# --------------------------------------------------------------------------- validation

_TOML_TYPE = {str: "string", int: "integer", float: "float", bool: "boolean", list: "array", dict: "table"}


def describe(value: Any) -> str:
    kind = _TOML_TYPE.get(type(value), type(value).__name__)
    shown = repr(value)
    return f"{kind} {shown if len(shown) <= 40 else shown[:37] + '...'}"


def _did_you_mean(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    if close:
        return f"Did you mean '{close[0]}'?"
    return f"Known keys: {', '.join(sorted(options))}." if options else ""


def _fields_at(model: type[Table], loc: tuple) -> list[str]:
    """Field names of the (nested) model that holds loc[-1], for did-you-mean."""
    current: Any = model
    for part in loc[:-1]:
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        ann = fields[part].annotation
        current = next((a for a in getattr(ann, "__args__", (ann,)) if hasattr(a, "model_fields")), ann)
    return list(getattr(current, "model_fields", {}))


def pydantic_problems(exc: ValidationError, prefix: str, model: type[Table], locations: dict, top: Path) -> list[Problem]:
    problems = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        key = ".".join((prefix, *loc)) if loc else prefix
        where = locate(locations, key, top)
        kind = err["type"]
        if kind == "extra_forbidden":
            msg = f"unknown key '{loc[-1]}'."
            hint = _did_you_mean(loc[-1], _fields_at(model, loc))
        elif kind == "missing":
            msg, hint = f"missing required key '{loc[-1]}'.", "Add it to the table."
        else:
            expected = err["msg"].replace("Input should be", "expected").replace("Value error, ", "")
            msg = f"{expected}, found {describe(err['input'])}."
            hint = None
        problems.append(Problem(msg, hint=hint, **where))
    return problems


def _alias_round_locations(locations: dict[str, tuple[str, int]], stages: dict[str, Stage]) -> None:
    """`stages.dpo@2.*` keys located where the user wrote `stages.dpo.*`, so that paths read late
    (resources.accelerate_config) resolve against the file that set them."""
    for name, stage in stages.items():
        if stage.round is None:
            continue
        prefix = f"stages.{stage.base}"
        for key, where in list(locations.items()):
            if key == prefix or key.startswith(prefix + "."):
                locations.setdefault(f"stages.{name}{key[len(prefix):]}", where)


MAX_DEPTH = 32  # tables and arrays nested deeper than any recipe needs


def shape_problems(data: dict, locations: dict, top: Path) -> list[Problem]:
    """The shape every later check relies on: each section a table of tables, a stage's kind a
    string, nothing nested absurdly deep. Checked first, so that no check meets a scalar where it
    expects a table (`datasets = true`, `stages = 1`, also through --set)."""
    problems = []
    stack = [(data, (), 0)]
    while stack:
        node, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            problems.append(Problem(f"nested more than {MAX_DEPTH} levels deep.", hint="Flatten the value.",
                                    **locate(locations, ".".join(path[:3]), top)))
            break
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        stack += [(v, (*path, str(k)), depth + 1) for k, v in items if isinstance(v, (dict, list))]
    if problems:
        return problems
    if "recipe" in data and not isinstance(data["recipe"], dict):
        problems.append(Problem(f"expected the [recipe] table, found {describe(data['recipe'])}.",
                                **locate(locations, "recipe", top)))
    for section in ("models", "datasets", "constitutions", "stages", "loops"):
        tables = data.get(section)
        if tables is None:
            continue
        if not isinstance(tables, dict):
            problems.append(Problem(f"expected tables [{section}.NAME], found {describe(tables)}.",
                                    hint=f"Write each entry as its own table: [{section}.NAME].",
                                    **locate(locations, section, top)))
            continue
        for name, table in tables.items():
            if not isinstance(table, dict):
                problems.append(Problem(f"expected a table [{section}.{name}], found {describe(table)}.",
                                        **locate(locations, f"{section}.{name}", top)))
            elif section == "stages" and "kind" in table and not isinstance(table["kind"], str):
                problems.append(Problem(f"expected a string (the stage kind), found {describe(table['kind'])}.",
                                        hint=f"Known kinds: {', '.join(sorted(registry.kinds()))}.",
                                        **locate(locations, f"stages.{name}.kind", top)))
    return problems


def load_recipe(path: str | Path, sets: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, merge, override, resolve and validate a recipe. Raises RecipeError with every problem."""
    top = Path(path)
    data, locations = load_layers(top)
    apply_sets(data, locations, list(sets))
    if shape := shape_problems(data, locations, top):
        raise RecipeError(shape)
    _resolve_paths(data, locations, top)
    problems: list[Problem] = []

    def check(key: str, model: type[Table], value: Any) -> Any:
        if not isinstance(value, dict):
            problems.append(Problem(f"expected a table, found {describe(value)}.", **locate(locations, key, top)))
            return None
        try:
            return model.model_validate(value)
        except ValidationError as exc:
            problems.extend(pydantic_problems(exc, key, model, locations, top))
            return None

    for section in data:
        if section not in SECTIONS:
            problems.append(Problem(f"unknown table '{section}'.", hint=_did_you_mean(section, list(SECTIONS)),
                                    **locate(locations, section, top)))
    if "recipe" not in data:
        problems.append(Problem("missing the [recipe] table.", file=_display(top),
                                hint='Add [recipe] with at least name = "...".'))
    meta = check("recipe", RecipeMeta, data.get("recipe", {})) if "recipe" in data else None

    parsed: dict[str, dict] = {}
    previews: dict[str, list[dict] | None] = {}  # rows of small local dataset files, for stage checks
    for section in ("models", "datasets", "constitutions"):
        parsed[section] = {}
        tables = data.get(section) or {}
        if not isinstance(tables, dict):
            problems.append(Problem(f"expected tables [{section}.NAME].", **locate(locations, section, top)))
            continue
        for name, table in tables.items():
            if not re.match(NAME_PATTERN, name):
                problems.append(Problem(f"'{name}' is not a valid name (letters, digits, _ . -).",
                                        **locate(locations, f"{section}.{name}", top)))
            spec = check(f"{section}.{name}", SECTIONS[section], table)
            if spec is None:
                continue
            parsed[section][name] = spec
            path_value = getattr(spec, "path", "")
            if Path(path_value).is_absolute() and not Path(path_value).exists():
                problems.append(Problem(f"file not found: {path_value}.", hint="Paths are relative to the recipe file.",
                                        **locate(locations, f"{section}.{name}.path", top)))
            elif section == "datasets":
                from engine.data.datasets import preview

                where = locate(locations, f"datasets.{name}.path", top)
                rows, why = preview(spec, name, where)
                if why:
                    problems.append(Problem(why, **where))
                previews[name] = rows
            if section == "models" and path_value.startswith("builtin:"):
                from engine.models.builtins import builtin_problem

                if (why := builtin_problem(path_value)) is not None:
                    problems.append(Problem(why.message, hint=why.hint, **locate(locations, f"models.{name}.path", top)))
            if section == "models" and spec.backend == "vllm":
                from engine.models.backends.vllm import INSTALL, available

                if not available():
                    problems.append(Problem(
                        f"model '{name}' uses the vllm backend, but vllm is not installed here.",
                        hint=f"Install it on a GPU machine (`{INSTALL}`), or use backend = \"hf\".",
                        **locate(locations, f"models.{name}.backend", top)))

    stages: dict[str, Stage] = {}
    known = registry.kinds()
    for name, table in (data.get("stages") or {}).items():
        key = f"stages.{name}"
        if not isinstance(table, dict):
            problems.append(Problem(f"expected a table, found {describe(table)}.", **locate(locations, key, top)))
            continue
        if "@" in name:
            problems.append(Problem(f"'{name}' is not a valid stage name: '@' is reserved for the rounds of a loop.",
                                    hint="Name the stage without '@'; [loops.*] makes NAME@1, NAME@2, ...",
                                    **locate(locations, key, top)))
        elif not re.match(NAME_PATTERN, name):
            problems.append(Problem(f"'{name}' is not a valid stage name (letters, digits, _ . -).",
                                    **locate(locations, key, top)))
        kind = table.get("kind")
        if not isinstance(kind, str):
            problems.append(Problem("missing required key 'kind'." if kind is None else
                                    f"expected a string, found {describe(kind)}.",
                                    hint=f"Known kinds: {', '.join(sorted(known))}.",
                                    **locate(locations, f"{key}.kind", top)))
            continue
        if kind not in known:
            close = difflib.get_close_matches(kind, list(known), n=1)
            hint = (f"Did you mean '{close[0]}'? " if close else "") + f"Known kinds: {', '.join(sorted(known))}."
            problems.append(Problem(f"unknown stage kind '{kind}'.", hint=hint, **locate(locations, f"{key}.kind", top)))
            continue
        module = registry.load(kind)
        _resolve_stage_paths(name, table, module.Config, locations, top)
        config = check(key, module.Config, table)
        if config is not None:
            stages[name] = Stage(name, kind, config, module)

    names: dict[str, str] = {}
    for section, items in (("models", parsed["models"]), ("datasets", parsed["datasets"]),
                           ("constitutions", parsed["constitutions"]), ("stages", stages)):
        for name in items:
            if name in names:
                problems.append(Problem(
                    f"the name '{name}' is used by both [{names[name]}.{name}] and [{section}.{name}].",
                    hint="References are by name: rename one of them.",
                    **locate(locations, f"{section}.{name}", top)))
            names[name] = section

    from engine.spec.graph import graph_problems, refs_of

    # Every stage's references: parsed, or raw for stages that failed their own validation.
    user_stages = [n for n, t in (data.get("stages") or {}).items() if isinstance(t, dict)]
    refs: dict[str, list[tuple[str, str]]] = {n: list(refs_of(s.config)) for n, s in stages.items()}
    for name in user_stages:
        if name not in stages:
            table = data["stages"][name]
            kind = table.get("kind")
            fields = ref_fields(registry.load(kind).Config) if kind in known else {}
            raw = [(f, v) for f in fields for v in (table.get(f) if isinstance(table.get(f), list) else [table.get(f)])]
            refs[name] = [(f, v) for f, v in raw if isinstance(v, str)]

    loops: dict[str, LoopSpec] = {}
    tables = data.get("loops") or {}
    if not isinstance(tables, dict):
        problems.append(Problem("expected tables [loops.NAME].", **locate(locations, "loops", top)))
        tables = {}
    for name, table in tables.items():
        if not re.match(NAME_PATTERN, name):
            problems.append(Problem(f"'{name}' is not a valid loop name (letters, digits, _ . -).",
                                    **locate(locations, f"loops.{name}", top)))
        spec = check(f"loops.{name}", LoopSpec, table)
        if spec is not None:
            loops[name] = spec
    found, broken = loop_problems(loops, user_stages, refs, lambda key: locate(locations, key, top))
    problems.extend(found)
    rounds = Rounds({n: spec for n, spec in loops.items() if n not in broken}, set(user_stages))

    recipe = Recipe(top, meta or RecipeMeta(name="invalid"), parsed["models"], parsed["datasets"],
                    parsed["constitutions"], rounds.unroll(stages), data, locations, rounds.loops, previews)
    _alias_round_locations(locations, recipe.stages)
    # Stages that failed their own validation still exist as names (references to them are
    # not reported again), and their own references are still checked.
    invalid: dict[str, list[tuple[str, str]]] = {}
    for name in user_stages:
        if name not in stages:
            invalid.update(rounds.refs(name, refs[name]))
    found = graph_problems(recipe, invalid)
    for name, stage in recipe.stages.items():
        if hook(stage.module, "check"):  # stage-specific checks, e.g. template variables
            found.extend(hook(stage.module, "check")(name, stage.config, recipe))
    from engine.models.info import problems as model_problems
    from engine.spec.stage import uses_problems

    found.extend(uses_problems(recipe))
    found.extend(model_problems(recipe))
    problems.extend(merge_round_problems(found, set(rounds.member)))
    if problems:
        raise RecipeError(problems)
    return recipe


# --------------------------------------------------------------------------- writing TOML


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        # a JSON string is a TOML basic string, once DEL (which JSON leaves raw) is escaped
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def dump_toml(data: dict, _prefix: tuple[str, ...] = ()) -> str:
    """A minimal TOML writer for resolved recipes: tables, scalars, arrays, inline tables."""
    scalars = [(k, v) for k, v in data.items() if not isinstance(v, dict)]
    tables = [(k, v) for k, v in data.items() if isinstance(v, dict)]
    head = []
    if _prefix and (scalars or not tables):
        head.append("[" + ".".join(_toml_key(p) for p in _prefix) + "]")
    head += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in scalars]
    chunks = ["\n".join(head)] + [dump_toml(v, (*_prefix, k)) for k, v in tables]
    text = "\n\n".join(c for c in chunks if c)
    return text + "\n" if not _prefix else text
