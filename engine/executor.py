"""Runs a plan: topological order, cache hits skipped, shards resumed, run records written.

    runs/<recipe>/<run-id>/recipe.toml        the resolved recipe
    runs/<recipe>/<run-id>/record.json        each stage: fingerprint, cached/run, time, rows
    runs/<recipe>/<run-id>/logs/<stage>.log   the stage's log (tracebacks land here)
    runs/<recipe>/<run-id>/stages/<stage>     link to the cache entry
    runs/<recipe>/latest                      link to the newest run
    runs/<recipe>/.last/<stage>.json          components last built, for `plan` reasons
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from . import __version__
from .cache import Entry, Store
from .io import atomic_write_json, atomic_write_text
from .errors import RecipeError, StageFailed
from .fingerprint import HashMemo, fingerprints, reasons
from .graph import artifact_type, edges, order, upstream
from .recipe import Recipe, dump_toml
from .rounds import diversity_for, round_of
from .rows import count_rows, read_rows, write_rows
from .seeds import Seeds
from .shards import ShardRunner


def runs_dir_default() -> str:
    return os.environ.get("RECIPE_RUNS_DIR", "runs")


def memo_for(runs_dir: str | os.PathLike) -> HashMemo:
    return HashMemo(Path(runs_dir) / "cache" / "hashes.json")


# --------------------------------------------------------------------------- plan


@dataclass
class PlanItem:
    name: str
    kind: str
    fingerprint: str
    status: str  # cached | partial | run
    reasons: list[str]
    components: dict = field(repr=False, default_factory=dict)

    def as_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "fingerprint": self.fingerprint,
                "status": self.status, "reasons": self.reasons}


def last_components(runs_dir: Path, recipe: str, stage: str) -> dict | None:
    try:
        return json.loads((runs_dir / recipe / ".last" / f"{stage}.json").read_text())["components"]
    except (OSError, ValueError, KeyError):
        return None


def make_plan(recipe: Recipe, runs_dir: str | os.PathLike, memo: HashMemo | None = None) -> list[PlanItem]:
    runs_dir = Path(runs_dir)
    memo = memo or memo_for(runs_dir)
    store = Store(runs_dir)
    items = []
    for name, (fp, comps) in fingerprints(recipe, memo).items():
        if store.peek(fp):
            status, why = "cached", []
        else:
            status = "partial" if store.has_partial(fp) else "run"
            why = reasons(last_components(runs_dir, recipe.name, name), comps)
        items.append(PlanItem(name, recipe.stages[name].kind, fp, status, why, comps))
    memo.save()
    return items


# --------------------------------------------------------------------------- inputs


@dataclass
class Artifact:
    """What a stage receives for a reference: rows (datasets, row stages), or a model."""

    name: str
    type: str
    source: str  # stages | datasets | models
    path: Path | None = None  # cache entry dir for stages
    spec: Any = None  # DatasetSpec / ModelSpec
    recipe: Recipe | None = field(default=None, repr=False)
    _rows: list[dict] | None = field(default=None, repr=False)
    load_report: dict | None = None

    def rows(self) -> list[dict]:
        if self._rows is None:
            if self.source == "stages":
                self._rows = read_rows(self.path / "rows.parquet")
            elif self.source == "datasets":
                self._rows = self._load_dataset()
            else:
                raise TypeError(f"'{self.name}' is a model, not rows")
        return self._rows

    def _load_dataset(self) -> list[dict]:
        from .data import load_rows

        spec = self.spec
        where = self.recipe.where(f"datasets.{self.name}.path") if self.recipe else {}
        result = load_rows(
            spec.path, name=self.name, type=spec.type, format=spec.format, split=spec.split,
            columns=spec.columns, limit=spec.limit, shuffle_seed=spec.shuffle_seed,
            revision=spec.revision, key=where.get("key"), file=where.get("file"),
        )
        self.load_report = {"total": result.total, "kept": len(result.rows), "dropped": result.dropped,
                            "examples": result.examples}
        return result.rows

    def __len__(self) -> int:
        if self._rows is None and self.source == "stages" and (self.path / "rows.parquet").exists():
            return count_rows(self.path / "rows.parquet")
        return len(self.rows())


# --------------------------------------------------------------------------- context


class _Task:
    def __init__(self, progress, task_id) -> None:
        self.progress, self.task_id = progress, task_id

    def advance(self, n: int = 1) -> None:
        if self.progress is not None:
            self.progress.advance(self.task_id, n)


@dataclass
class Context:
    """What a stage's `run` gets besides its config and inputs. Stages never touch the cache."""

    stage: str
    fingerprint: str
    seed: int
    out_dir: Path
    partial_dir: Path
    log: logging.Logger
    recipe: Recipe
    console: Any = None
    _progress: Any = None
    cache_root: Path | None = None
    rows_out: int | None = None
    shards: ShardRunner = field(init=False)

    def __post_init__(self) -> None:
        self.shards = ShardRunner(self.partial_dir, self.fingerprint, self.seed, self.progress, self.log)

    @property
    def seeds(self) -> Seeds:
        """This stage's random streams, by row id (engine.seeds): never by shard or batch."""
        return Seeds(self.seed, self.fingerprint)

    def progress(self, total: int | None, desc: str = "rows") -> _Task:
        if self._progress is None:
            return _Task(None, None)
        return _Task(self._progress, self._progress.add_task(f"{self.stage}: {desc}", total=total))

    def warn(self, message: str) -> None:
        self.log.warning(message)
        if self.console is not None:
            self.console.print(f"[yellow]warning[/]: {self.stage}: {message}")

    def templates(self):
        """Templates for this recipe: its own templates/ folder shadows the built-ins."""
        from .templates import Templates

        return Templates([self.recipe.dir / "templates"])

    @property
    def is_main(self) -> bool:
        """False in the non-zero ranks of a multi-process stage: only the main process writes files."""
        return int(os.environ.get("RANK", "0")) == 0

    def describe_model(self, model: "Artifact") -> dict:
        """How to load `model` again later: its [models] spec, or the stage-made directory. Training
        stages write this as `model/base.json` next to an unmerged adapter (its recorded base)."""
        if model.spec is not None:
            return {"name": model.name, "spec": model.spec.model_dump(mode="json")}
        # by fingerprint (the entry's folder name), never by path: the runs dir can move
        return {"name": model.name, "stage": Path(model.path).name}

    def load_model(self, model: "Artifact", *, merge_adapter: bool = False):
        """(model, tokenizer) for a model reference: a [models] spec (its adapter applied, or
        merged into the base with `merge_adapter`; its chat_template set) or a stage's model
        (full weights, or a PEFT adapter loaded on the base recorded in its base.json)."""
        if model.spec is None:  # a model made by an upstream stage
            m, tok = self._load_dir(Path(model.path) / "model", merge_adapter)
        else:
            m, tok = self._load_spec(model.name, model.spec, merge_adapter)
        if tok.chat_template is None:
            raise RecipeError.single(f"model '{model.name}' has no chat template.",
                                     hint="Set chat_template in its [models] table (inline Jinja or a file).",
                                     **self.recipe.where(f"models.{model.name}"))
        return m, tok

    def _load_dir(self, path: Path, merge_adapter: bool):
        from .models import load_model

        if not (path / "adapter_config.json").is_file():
            return load_model(str(path), cache_root=self.cache_root)
        base_file = path / "base.json"
        if not base_file.is_file():
            raise RuntimeError(f"{path} is a LoRA adapter without base.json (its recorded base); rebuild the stage "
                               "that made it (recipe run --force STAGE).")
        base = json.loads(base_file.read_text())
        if "spec" in base:
            from .recipe import ModelSpec

            m, _ = self._load_spec(base["name"], ModelSpec.model_validate(base["spec"], strict=False), True)
        elif "stage" in base:
            m, _ = self._load_dir(Path(self.cache_root) / base["stage"] / "model", True)
        else:  # entries written before base.json named the stage's fingerprint
            m, _ = self._load_dir(Path(base["dir"]), True)
        from peft import PeftModel
        from transformers import AutoTokenizer

        m = PeftModel.from_pretrained(m, str(path)).eval()
        if merge_adapter:
            m = m.merge_and_unload()
        self.log.info("%s the adapter %s on its base '%s'", "merged" if merge_adapter else "applied", path, base["name"])
        return m, AutoTokenizer.from_pretrained(str(path))

    def _load_spec(self, name: str, spec, merge_adapter: bool):
        from .fingerprint import is_file
        from .models import load_model

        m, tok = load_model(spec.path, dtype=spec.dtype, device=spec.device, revision=spec.revision,
                            trust_remote_code=spec.trust_remote_code, cache_root=self.cache_root)
        if spec.adapter:
            if not Path(spec.adapter).is_dir():
                raise RecipeError.single(
                    f"adapter '{spec.adapter}' of model '{name}' is not a directory.",
                    hint="Point it at a saved PEFT adapter, or use the training stage's name as the model.",
                    **self.recipe.where(f"models.{name}.adapter"))
            from peft import PeftModel

            m = PeftModel.from_pretrained(m, spec.adapter).eval()
            if merge_adapter:
                m = m.merge_and_unload()
            self.log.info("%s adapter %s", "merged" if merge_adapter else "applied", spec.adapter)
        if spec.chat_template:
            template = spec.chat_template
            tok.chat_template = Path(template).read_text() if is_file(template) else template
        return m, tok

    def backend(self, model: "Artifact", batch_size: int = 16):
        """A generation backend for a model reference; call `.close()` when done."""
        spec = model.spec
        kind = spec.backend if spec else "hf"
        self.log.info("loading model '%s' (%s, backend %s)", model.name, spec.path if spec else model.path, kind)
        if kind == "openai":
            from .backends.openai import OpenAIBackend

            if not spec.base_url:
                raise RecipeError.single(f"model '{model.name}' uses the openai backend but has no base_url.",
                                         **self.recipe.where(f"models.{model.name}.base_url"))
            return OpenAIBackend(spec.base_url, spec.model_name or spec.path, api_key_env=spec.api_key_env,
                                 max_concurrency=spec.max_concurrency, timeout_s=spec.timeout_s,
                                 cache_dir=self.partial_dir / "requests")
        from .backends.hf import HFBackend

        m, tok = self.load_model(model)
        return HFBackend(m, tok, batch_size=batch_size)

    def save_rows(self, rows: list[dict], name: str = "rows.parquet") -> int:
        n = write_rows(self.out_dir / name, rows)
        if name == "rows.parquet":
            self.rows_out = n
        return n

    def save_json(self, name: str, obj: Any) -> None:
        atomic_write_json(self.out_dir / name, obj)


# --------------------------------------------------------------------------- run records


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "recipe-engine": __version__}
    for dist in ("torch", "transformers", "trl", "peft", "datasets", "pyarrow"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


class RunRecord:
    def __init__(self, runs_dir: Path, recipe: Recipe) -> None:
        base = runs_dir / recipe.name
        base.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for i in range(1000):
            run_id = stamp if i == 0 else f"{stamp}-{i}"
            try:
                (base / run_id).mkdir()
                break
            except FileExistsError:
                continue
        self.base, self.run_id, self.dir = base, run_id, base / run_id
        (self.dir / "logs").mkdir()
        (self.dir / "stages").mkdir()
        atomic_write_text(self.dir / "recipe.toml", dump_toml(recipe.raw))
        self.data = {"recipe": recipe.name, "run": run_id, "recipe_file": str(recipe.path),
                     "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "status": "running", "stages": {}}
        self.save()
        link = base / f".latest.{os.getpid()}"
        if link.is_symlink():
            link.unlink()
        os.symlink(run_id, link)
        os.replace(link, base / "latest")

    def stage(self, name: str, **info) -> None:
        self.data["stages"].setdefault(name, {}).update(info)
        self.save()

    def link(self, name: str, entry: Path) -> None:
        target = os.path.relpath(entry, self.dir / "stages")
        dst = self.dir / "stages" / name
        if dst.is_symlink():
            dst.unlink()
        os.symlink(target, dst)

    def finish(self, status: str) -> None:
        self.data["status"] = status
        self.data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.save()

    def save(self) -> None:
        """record.json keeps the stages in the order they were planned (DAG order), so readers
        (the report, `status`) never re-sort them: not sorted-key JSON."""
        self.data["order"] = list(self.data["stages"])
        atomic_write_text(self.dir / "record.json", json.dumps(self.data, indent=2, ensure_ascii=False) + "\n")


def stage_logger(name: str, path: Path) -> logging.Logger:
    log = logging.getLogger(f"recipe.stage.{name}.{id(path)}")
    log.setLevel(logging.INFO)
    log.propagate = False
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    return log


def close_logger(log: logging.Logger) -> None:
    for h in list(log.handlers):
        h.close()
        log.removeHandler(h)


# --------------------------------------------------------------------------- run


def select(recipe: Recipe, only: list[str], force: list[str]) -> set[str]:
    only, force = recipe.stage_names(only), recipe.stage_names(force)  # `dpo` in a loop: its last round
    unknown = [n for n in [*only, *force] if n not in recipe.stages]
    if unknown:
        raise RecipeError.single(
            f"no stage named {', '.join(repr(u) for u in unknown)}.",
            file=str(recipe.path), hint=f"Stages: {', '.join(recipe.stages)}.")
    return upstream(recipe, only) if only else set(recipe.stages)


def run(recipe: Recipe, runs_dir: str | os.PathLike, *, only: list[str] = (), force: list[str] = (),
        console=None, progress=None) -> RunRecord:
    """Run every selected stage not in the cache. Raises StageFailed (exit 1) or RecipeError
    (exit 2); committed shards and upstream entries are kept either way."""
    runs_dir = Path(runs_dir)
    force = recipe.stage_names(list(force))
    chosen = select(recipe, list(only), force)
    memo = memo_for(runs_dir)
    store = Store(runs_dir)
    store.sweep_tmp()
    plan = {p.name: p for p in make_plan(recipe, runs_dir, memo)}
    record = RunRecord(runs_dir, recipe)
    entries: dict[str, Entry] = {}
    status = "failed"
    try:
        for name in order(recipe):
            if name not in chosen:
                continue
            item = plan[name]
            record.stage(name, kind=item.kind, fingerprint=item.fingerprint, status="pending")
            started = time.time()

            def waiting(name=name):
                if console is not None:
                    console.print(f"{name}: another run is building this stage; waiting for it")

            with store.lock(item.fingerprint, on_wait=waiting):
                entry = None if name in force else store.get(item.fingerprint)
                for w in store.warnings:
                    if console is not None:
                        console.print(f"[yellow]warning[/]: {name}: {w}")
                store.warnings.clear()
                if entry is not None:
                    rows = entry.manifest.get("rows", {})
                    record.stage(name, status="cached", duration_s=0.0, rows_in=rows.get("in"),
                                 rows_out=rows.get("out"), reasons=[])
                else:
                    why = ["forced"] if name in force else item.reasons
                    entry = _build(recipe, name, item, entries, store, record, console, progress, why)
                    record.stage(name, status="run", duration_s=round(time.time() - started, 3),
                                 rows_in=entry.manifest["rows"]["in"], rows_out=entry.manifest["rows"]["out"],
                                 reasons=why)
            if round_of(name):  # iterative rounds: each round's output diversity, so mode collapse shows
                record.stage(name, diversity=diversity_for(artifact_type(recipe, name), entry.path))
            entries[name] = entry
            record.link(name, entry.path)
            atomic_write_json(runs_dir / recipe.name / ".last" / f"{name}.json",
                              {"fingerprint": item.fingerprint, "components": item.components})
        status = "ok"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        record.finish(status)
    return record


def _inputs(recipe: Recipe, name: str, entries: dict[str, Entry]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    stage = recipe.stages[name]
    for edge in edges(recipe, name):
        if edge.source == "stages":
            art = Artifact(edge.name, artifact_type(recipe, edge.name), "stages", path=entries[edge.name].path)
        elif edge.source == "datasets":
            spec = recipe.datasets[edge.name]
            art = Artifact(edge.name, spec.type, "datasets", spec=spec, recipe=recipe)
        else:
            art = Artifact(edge.name, "model", "models", spec=recipe.models[edge.name], recipe=recipe)
        if isinstance(getattr(stage.config, edge.field), list):
            out.setdefault(edge.field, []).append(art)
        else:
            out[edge.field] = art
    return out


def _build(recipe, name, item, entries, store, record, console, progress, why) -> Entry:
    stage = recipe.stages[name]
    log_path = record.dir / "logs" / f"{name}.log"
    log = stage_logger(name, log_path)
    log.info("stage %s (%s) fingerprint %s; runs because: %s", name, stage.kind, item.fingerprint, "; ".join(why))
    record.stage(name, status="running", log=str(log_path.relative_to(record.dir)))
    manifest = {"stage": name, "recipe": recipe.name, "components": item.components, "versions": versions()}
    try:
        inputs = _inputs(recipe, name, entries)
        with store.build(item.fingerprint, manifest) as out_dir:
            ctx = Context(name, item.fingerprint, recipe.meta.seed, out_dir, store.partial(item.fingerprint),
                          log, recipe, console, progress, store.root)
            if stage.config.resources.processes > 1 and "RANK" not in os.environ:
                from .launch import launch_stage

                launch_stage(stage, inputs, ctx, log_path)
            else:
                stage.module.run(stage.config, inputs, ctx)
            rows_in = 0
            for arts in inputs.values():
                for art in arts if isinstance(arts, list) else [arts]:
                    if art.type != "model":
                        rows_in += len(art)
                        if art.load_report and art.load_report["dropped"]:
                            dropped = ", ".join(f"{r} ({n})" for r, n in art.load_report["dropped"].items())
                            ctx.warn(f"dataset '{art.name}': dropped {sum(art.load_report['dropped'].values())} "
                                     f"of {art.load_report['total']} rows: {dropped}")
            manifest["rows"] = {"in": rows_in, "out": ctx.rows_out}
        log.info("done: %s rows in, %s rows out", rows_in, ctx.rows_out)
        store.clear_partial(item.fingerprint)
    except RecipeError as exc:
        log.error("%s", exc.format())
        record.stage(name, status="failed", error=exc.format())
        raise
    except KeyboardInterrupt:
        log.warning("interrupted; committed shards are kept under %s", store.partial(item.fingerprint))
        record.stage(name, status="interrupted")
        raise
    except Exception as exc:
        log.error("stage failed:\n%s", traceback.format_exc())
        cause = f"{type(exc).__name__}: {exc}".splitlines()[0]
        record.stage(name, status="failed", error=cause)
        raise StageFailed(name, cause, str(log_path)) from exc
    finally:
        close_logger(log)
    entry = store.peek(item.fingerprint)  # just checksummed while building: no need to hash again
    assert entry is not None, "an entry just committed must be readable"
    return entry
