"""`recipe export RUN STAGE --to DIR [--merge] [--push-to-hub REPO]`: a stage's output taken out of
the store, with a card that says how it was made.

A model stage becomes a standalone model folder that `from_pretrained` loads with no engine: full
or merged weights are copied; a LoRA adapter is copied as it is (its card names its base), or with
`--merge` merged into its base and saved whole. A row stage becomes `data.parquet` and `data.jsonl`
(meta decoded). Either way `README.md` is a Hugging Face card (front matter, then the recipe, the
fingerprints of the stage and of everything upstream of it, the data lineage and the eval table of
the run's eval stages for that model) and `recipe.toml` is the run's resolved recipe.
`--push-to-hub` uploads the folder with huggingface_hub (HF_ENDPOINT and HF_TOKEN as usual)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from engine.core.errors import RecipeError

MODEL_FILES = ("config.json", "generation_config.json", "chat_template.jinja")


def lineage(run_dir: Path, stage: str) -> list[dict]:
    """The stage and everything upstream of it in the run, nearest first: name, source (stages,
    datasets, models), kind and identity (a stage's fingerprint, a dataset's content hash)."""
    out, seen, todo = [], set(), [(stage, "stages", None)]
    while todo:
        name, source, ident = todo.pop(0)
        if (name, source) in seen:
            continue
        seen.add((name, source))
        manifest = run_dir / "stages" / name / "manifest.json"
        if source == "stages" and manifest.is_file():
            m = json.loads(manifest.read_text())
            out.append({"name": name, "source": source, "kind": m["components"].get("kind"), "id": m["fingerprint"]})
            for items in m["components"].get("inputs", {}).values():
                todo += [(i["name"], i["source"], i["id"]) for i in items]
        else:
            out.append({"name": name, "source": source, "kind": None, "id": ident})
    return out


def _identity(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        found = value.get("dataset") or value.get("model") or value
        if isinstance(found, dict):
            return (
                found.get("content")
                or found.get("hub")
                or found.get("builtin")
                or json.dumps(found, sort_keys=True)[:80]
            )
    return json.dumps(value, sort_keys=True)[:80]


def _cell(h) -> str:
    if not isinstance(h, dict) or h.get("rate") is None:
        return "-"
    return f"{h['rate']:.3f}" + (f" [{h['ci'][0]:.2f}, {h['ci'][1]:.2f}]" if h.get("ci") else "")


def eval_table(run_dir: Path, stage: str) -> list[str]:
    """Markdown rows: each eval stage of the run that evaluated `stage`, its headline rates for it
    (and for the first model it was compared with)."""
    record = json.loads((run_dir / "record.json").read_text())
    lines = []
    for name, s in record.get("stages", {}).items():
        path = run_dir / "stages" / name / "metrics.json"
        if s.get("kind") != "eval" or not path.is_file():
            continue
        metrics = json.loads(path.read_text())
        models = metrics.get("models") or []
        if stage not in models:
            continue
        base = models[0] if models[0] != stage else None
        per = metrics.get("per_model", {})
        lines += [
            f"Eval stage `{name}` (95% intervals):",
            "",
            f"| metric | {stage} |" + (f" {base} |" if base else ""),
            "| --- | --- |" + (" --- |" if base else ""),
        ]
        for metric, h in (per.get(stage, {}).get("headline") or {}).items():
            other = per.get(base, {}).get("headline", {}).get(metric) if base else None
            lines.append(f"| {metric} | {_cell(h)} |" + (f" {_cell(other)} |" if base else ""))
        lines.append("")
    return lines


def card(run_dir: Path, stage: str, kind: str, what: str, note: str = "") -> str:
    record = json.loads((run_dir / "record.json").read_text())
    recipe_text = (run_dir / "recipe.toml").read_text()
    chain = lineage(run_dir, stage)
    tags = ["recipe-engine", kind]
    front = (
        "---\n"
        + ("library_name: transformers\n" if what == "model" else "")
        + "tags:\n"
        + "".join(f"- {t}\n" for t in tags)
        + "---\n"
    )
    body = [
        f"# {record['recipe']} / {stage}",
        "",
        f"The output of stage `{stage}` (kind `{kind}`) of recipe `{record['recipe']}`, run `{record['run']}`, "
        f"made with the recipe engine and exported with `recipe export`. {note}".strip(),
        "",
        "## Lineage",
        "",
        "Every stage and input it was made from, nearest first, with its identity (a stage's fingerprint: "
        "its definition and the content of its inputs; a dataset's content hash):",
        "",
        "| name | source | kind | identity |",
        "| --- | --- | --- | --- |",
        *[f"| {c['name']} | {c['source']} | {c['kind'] or '-'} | `{_identity(c['id'])}` |" for c in chain],
        "",
        *(["## Evaluation", "", *eval_table(run_dir, stage)] if what == "model" else []),
        "## Recipe",
        "",
        "```toml",
        recipe_text.rstrip(),
        "```",
        "",
    ]
    return front + "\n" + "\n".join(body)


def export(run_dir: Path, stage: str, to: Path, merge: bool = False, log=print) -> tuple[Path, str]:
    """Write the stage's output and card into `to`; (folder, "model" | "dataset")."""
    entry = run_dir / "stages" / stage
    record = json.loads((run_dir / "record.json").read_text())
    if stage not in record.get("stages", {}) or not entry.exists():
        raise RecipeError.single(
            f"run {run_dir.name} of '{record['recipe']}' has no stage '{stage}'.",
            hint=f"Its stages: {', '.join(record.get('stages', {}))}.",
        )
    kind = record["stages"][stage].get("kind", "?")
    to.mkdir(parents=True, exist_ok=True)
    model = entry / "model"
    if model.is_dir():
        note = _export_model(model, to, merge, run_dir, log)
        what = "model"
    elif (entry / "rows.parquet").is_file():
        from engine.data.rows import read_rows

        rows = read_rows(entry / "rows.parquet")
        shutil.copyfile(entry / "rows.parquet", to / "data.parquet")
        with open(to / "data.jsonl", "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        note, what = f"{len(rows)} rows.", "dataset"
    else:
        raise RecipeError.single(f"stage '{stage}' ({kind}) has no model and no rows to export.")
    (to / "README.md").write_text(card(run_dir, stage, kind, what, note), encoding="utf-8")
    shutil.copyfile(run_dir / "recipe.toml", to / "recipe.toml")
    return to, what


def _export_model(model: Path, to: Path, merge: bool, run_dir: Path, log) -> str:
    if not (model / "adapter_config.json").is_file():
        for f in model.iterdir():
            if f.is_file():
                shutil.copyfile(f, to / f.name)
        return "Full weights: load with `AutoModelForCausalLM.from_pretrained(folder)`."
    base = json.loads((model / "base.json").read_text()) if (model / "base.json").is_file() else {}
    base_name = (base.get("spec") or {}).get("path") or (f"stage {base['stage']}" if "stage" in base else "its base")
    if not merge:
        for f in model.iterdir():
            if f.is_file():
                shutil.copyfile(f, to / f.name)
        return (
            f"A LoRA adapter on `{base_name}`: load its base, then `PeftModel.from_pretrained`; "
            "or export with --merge for standalone weights."
        )
    import logging

    from engine.models.pool import load_model_dir

    m, tok = load_model_dir(model, run_dir.parent.parent / "cache", logging.getLogger("recipe.export"))
    m.save_pretrained(str(to))
    tok.save_pretrained(str(to))
    log(f"merged the adapter into its base ({base_name})")
    return f"The LoRA adapter merged into its base (`{base_name}`): standalone weights."


def push(folder: Path, repo: str, what: str) -> str:
    """Upload `folder` to the hub repo `repo` (created if missing); the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    repo_type = "model" if what == "model" else "dataset"
    api.create_repo(repo, repo_type=repo_type, exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type=repo_type, commit_message="recipe export")
    return str(getattr(info, "commit_url", info))
