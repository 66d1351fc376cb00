"""Fingerprints: what goes into a stage's cache key, and why a stage must re-run.

key(stage) = sha256 of the canonical JSON (sorted keys, no whitespace) of its *components*:
kind and VERSION, the config after defaults without execution-only fields and without
reference names, the identity of every input, the content of files it reads (templates, path
fields), user code it runs (a scorer's source: the `code` hook), and the recipe seed. An upstream stage's identity is the *content* of its output (the
committed checksums of its rows, or of its model's files: `content_id`), not its configuration:
when a changed stage commits byte-identical output, everything after it stays cached (early
cutoff). A stage's key is therefore known only once its upstream stages are built or found in
the store (engine.run.plan resolves what it can; the executor the rest, as it goes).

`fingerprints(recipe)` is the static variant, each stage input identified by the upstream's own
static fingerprint: what `recipe diff` compares (no store needed). `definition(...)` is a stage's
own definition without the rows it maps over: what its random streams and row memos derive from.
Paths never enter, only contents, so a recipe folder copied elsewhere plans to the same keys.

File hashes (engine.core.hashing) are memoized by (device, inode, size, mtime) in `runs/cache/hashes.json`, so a
large dataset is read once, not on every `plan`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.core.hashing import HashMemo, digest, hub_cache_commit, is_file
from engine.spec.backends import BACKENDS
from engine.spec.config import EXEC_ONLY, PATH, REF, defining, marker
from engine.spec.graph import Source, edges, order
from engine.spec.stage import hook

if TYPE_CHECKING:
    from engine.spec.recipe import ModelSpec, Recipe

FP_LEN = 24  # hex chars shown and used as the store key (96 bits)
DATA_VERSION = 2  # bump when dataset loading/normalization changes its output (2: role aliases, HH-style pairs)
KEYS = 2  # the scheme of cache keys: 2 = stage inputs by output content, random streams by row


# --------------------------------------------------------------------------- identities


def dataset_identity(recipe: Recipe, name: str, memo: HashMemo) -> dict:
    spec = recipe.datasets[name]
    opts = spec.model_dump(mode="json", exclude={"path", "revision", "max_dropped"})  # max_dropped: fail or not
    if Path(spec.path).is_absolute():
        source = {"content": memo.content(spec.path)} if Path(spec.path).exists() else {"missing": True}
    else:
        commit = hub_cache_commit(spec.path, spec.revision, "datasets")
        source = {"hub": spec.path, "revision": commit or spec.revision or "main"}
    return {"dataset": source, "options": opts, "loader": DATA_VERSION}


def model_identity(spec: ModelSpec, memo: HashMemo, stage_fps: dict[str, str | None]) -> dict:
    if spec.path.startswith("builtin:"):
        from engine.models.builtins import builtin_identity

        source: dict = builtin_identity(spec.path.split(":", 1)[1], memo)
    elif Path(spec.path).is_absolute():
        source = {"content": memo.content(spec.path)} if Path(spec.path).exists() else {"missing": True}
    else:
        source = {"hub": spec.path, "revision": hub_cache_commit(spec.path, spec.revision) or spec.revision or "main"}
    adapter = None
    if spec.adapter:
        if spec.adapter in stage_fps:
            adapter = {"stage": stage_fps[spec.adapter]}
        elif Path(spec.adapter).exists():
            adapter = {"content": memo.content(spec.adapter)}
        else:
            adapter = {"hub": spec.adapter}
    template = spec.chat_template
    if template and is_file(template):
        template = {"content": memo.file(template)}  # type: ignore[assignment]
    if BACKENDS[spec.backend].server:  # the server decides; name what we ask it for (never the key)
        source = {"server_model": spec.model_name or spec.path}
    return {
        "model": source,
        "dtype": spec.dtype,
        "adapter": adapter,
        "chat_template": template,
        "trust_remote_code": spec.trust_remote_code,
        "backend": spec.backend,
    }


def constitution_identity(recipe: Recipe, name: str, memo: HashMemo) -> dict:
    """An input like a dataset: its file's content, never its path."""
    path = recipe.constitutions[name].path
    return {"constitution": memo.file(path) if Path(path).is_file() else {"missing": True}}


# What identifies an input of each kind (graph.Source): the id its consumers' keys hold. `ids`
# maps a stage to the identity of its output (None: not known yet, the stage has to run first).
IDENTITY: dict[Source, Callable[[Recipe, str, dict[str, str | None], HashMemo], str | None]] = {
    Source.STAGES: lambda recipe, name, fps, memo: fps.get(name),
    Source.DATASETS: lambda recipe, name, fps, memo: digest(dataset_identity(recipe, name, memo)),
    Source.MODELS: lambda recipe, name, fps, memo: digest(model_identity(recipe.models[name], memo, fps)),
    Source.CONSTITUTIONS: lambda recipe, name, fps, memo: digest(constitution_identity(recipe, name, memo)),
}
assert set(IDENTITY) == set(Source), "every input kind needs an identity"


# --------------------------------------------------------------------------- stages


def content_id(checksums: dict[str, dict]) -> str:
    """The identity of a stage's output, from its entry's committed checksums: the files a later
    stage reads (a model's `model/` folder; else `rows.parquet`; else every file), so a report or
    a plot beside them never defeats early cutoff."""
    model = {k: v["sha256"] for k, v in checksums.items() if k.startswith("model/")}
    chosen = model or (
        {"rows.parquet": checksums["rows.parquet"]["sha256"]}
        if "rows.parquet" in checksums
        else {k: v["sha256"] for k, v in checksums.items()}
    )
    return digest(chosen)[:FP_LEN]


def waiting_on(components: dict) -> list[str]:
    """The upstream stages whose output this stage's key still needs (not built or found yet)."""
    return [i["name"] for items in components["inputs"].values() for i in items if i["id"] is None]


def stage_components(recipe: Recipe, name: str, stage_fps: dict[str, str | None], memo: HashMemo) -> dict:
    """Everything that can change a stage's output, in a form that can be diffed for reasons.
    `stage_fps`: each upstream stage's output identity (`content_id`), None where not known yet."""
    stage = recipe.stages[name]
    cls = type(stage.config)
    config, files = {}, {}
    for fname, value in defining(stage.config).items():
        if fname == "kind" or marker(cls, fname, EXEC_ONLY) or marker(cls, fname, REF):
            continue
        if marker(cls, fname, PATH) and isinstance(value, str) and Path(value).exists():
            files[fname] = memo.content(value)
        else:
            config[fname] = value
    inputs: dict[str, list[dict]] = {}
    for edge in edges(recipe, name):
        ident = IDENTITY[edge.source](recipe, edge.name, stage_fps, memo)
        inputs.setdefault(edge.field, []).append({"name": edge.name, "source": edge.source.value, "id": ident})
    templates = {}
    if hook(stage.module, "templates"):
        for tname, tpath in hook(stage.module, "templates")(stage.config, recipe).items():  # type: ignore[misc]
            templates[tname] = memo.file(tpath)
    code_hook = hook(stage.module, "code")
    code = code_hook(stage.config, recipe) if code_hook is not None else {}
    return {
        "kind": stage.kind,
        "version": stage.module.VERSION,
        "config": config,
        "files": files,
        "inputs": inputs,
        "templates": templates,
        "code": code,
        "seed": recipe.meta.seed,
        "keys": KEYS,
        **(
            {"round": stage.round} if stage.round and stage.round > 1 else {}
        ),  # iterative rounds: engine/spec/rounds.py
    }


def fingerprint(components: dict) -> str:
    """The hash of the components, with reference names dropped (only identities count)."""
    keyed = dict(components)
    keyed["inputs"] = {f: [(i["source"], i["id"]) for i in items] for f, items in components["inputs"].items()}
    return digest(keyed)[:FP_LEN]


def definition(components: dict, module: Any = None) -> str:
    """The digest of a stage's own definition: its components without the rows it maps over
    (its `input`), or what the stage module's `definition(components)` hook keeps. A row's random
    streams and memo derive from it plus the row itself (engine.core.seeds), so an unrelated
    change upstream, or another row, never moves them."""
    shaped = hook(module, "definition") if module is not None else None
    if shaped is not None:
        kept = shaped(components)
    else:
        kept = dict(components, inputs={f: v for f, v in components["inputs"].items() if f != "input"})
    kept["inputs"] = {f: [(i["source"], i["id"]) for i in items] for f, items in kept["inputs"].items()}
    return digest(kept)[:FP_LEN]


def fingerprints(recipe: Recipe, memo: HashMemo) -> dict[str, tuple[str, dict]]:
    """Stage name -> (static fingerprint, components) in topological order, each stage input
    identified by the upstream's static fingerprint (for `diff`; cache keys come from the plan)."""
    out: dict[str, tuple[str, dict]] = {}
    fps: dict[str, str | None] = {}
    for name in order(recipe):
        comps = stage_components(recipe, name, fps, memo)
        fp = fingerprint(comps)
        fps[name] = fp
        out[name] = (fp, comps)
    return out


# --------------------------------------------------------------------------- reasons


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def _show(value: Any) -> str:
    return (
        "unset"
        if value is None
        else json.dumps(value, ensure_ascii=False)
        if not isinstance(value, (int, float)) or isinstance(value, bool)
        else str(value)
    )


def reasons(old: dict | None, new: dict) -> list[str]:
    """Why `new` differs from `old`, in words: `config: min_words 3 -> 5`, `input changed: draft`."""
    if old is None:
        return ["new"]
    out: list[str] = []
    if old.get("keys") != new.get("keys"):
        return ["this engine version keys the cache by output content (a one-time re-run)"]
    if old.get("kind") != new["kind"]:
        out.append(f"kind: {old.get('kind')} -> {new['kind']}")
    elif old.get("version") != new["version"]:
        out.append(f"stage version: {old.get('version')} -> {new['version']}")
    a, b = _flatten(old.get("config", {})), _flatten(new["config"])
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            out.append(f"config: {key} {_show(a.get(key))} -> {_show(b.get(key))}")
    for key in sorted(set(old.get("files", {})) | set(new["files"])):
        if old.get("files", {}).get(key) != new["files"].get(key):
            out.append(f"file changed: {key}")
    for fname in sorted(set(old.get("inputs", {})) | set(new["inputs"])):
        before = {i["name"]: i["id"] for i in old.get("inputs", {}).get(fname, [])}
        before_ids = set(before.values())
        for item in new["inputs"].get(fname, []):
            if item["id"] not in before_ids:
                label = Source(item["source"]).label
                out.append(f"{label} changed: {item['name']}")
        if len(before) > len(new["inputs"].get(fname, [])):
            out.append(f"inputs removed: {fname}")
    for tname in sorted(set(old.get("templates", {})) | set(new["templates"])):
        if old.get("templates", {}).get(tname) != new["templates"].get(tname):
            out.append(f"template changed: {tname}")
    for cname in sorted(set(old.get("code", {})) | set(new.get("code", {}))):
        if old.get("code", {}).get(cname) != new.get("code", {}).get(cname):
            out.append(f"code changed: {cname}")
    if old.get("seed") != new["seed"]:
        out.append(f"seed: {old.get('seed')} -> {new['seed']}")
    return out or ["not in cache"]


def differences(fa: dict[str, tuple[str, dict]], fb: dict[str, tuple[str, dict]]) -> list[dict]:
    """Stages whose fingerprints differ between two recipes' `fingerprints`, with the reasons."""
    rows = []
    for name in list(dict.fromkeys([*fa, *fb])):
        if name not in fb:
            rows.append({"stage": name, "a": fa[name][0], "b": None, "reasons": ["only in A"]})
        elif name not in fa:
            rows.append({"stage": name, "a": None, "b": fb[name][0], "reasons": ["only in B"]})
        elif fa[name][0] != fb[name][0]:
            rows.append(
                {"stage": name, "a": fa[name][0], "b": fb[name][0], "reasons": reasons(fa[name][1], fb[name][1])}
            )
    return rows
