"""`recipe export`: a stage's output out of the store, with a card (engine/report/export.py)."""

from __future__ import annotations

from pathlib import Path

import click

from engine.cli.common import _runs_dir, _runs_dir_option, out


@click.command()
@click.argument("run_ref", metavar="RUN")
@click.argument("stage")
@click.option("--to", "to", required=True, type=click.Path(file_okay=False), help="The folder to write.")
@click.option("--merge", is_flag=True, help="A LoRA adapter: merge it into its base (standalone weights).")
@click.option("--push-to-hub", "repo", metavar="REPO", help="Then upload the folder to this hub repo (HF_TOKEN).")
@_runs_dir_option
def export(run_ref: str, stage: str, to: str, merge: bool, repo: str | None, runs_dir) -> None:
    """Write STAGE's output in RUN (a model folder, or data.parquet + data.jsonl) into --to with a
    card: the recipe, the fingerprints and lineage, the eval table."""
    from engine.report.export import export as write
    from engine.report.export import push
    from engine.store.record import find_run

    folder, what = write(find_run(_runs_dir(runs_dir), run_ref), stage, Path(to), merge, lambda m: out.print(m))
    out.print(f"wrote {what} to {folder}", markup=False)
    if repo:
        out.print(f"pushed: {push(folder, repo, what)}", markup=False)
