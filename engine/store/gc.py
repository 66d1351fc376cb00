"""`recipe gc`: which cache entries to keep, and removing the rest.

Kept: the entries of each recipe's last N runs, and those that every recipe file next to a
recipe that ran here (and beside the runs dir) needs as it is written now, so experiments with
--set never push out the recipe itself; and the row memos (engine.store.memo) the kept entries
list in their manifests, and the base entry a kept LoRA adapter names in its base.json. Which fingerprints a recipe file needs comes from the
caller (loading and fingerprinting recipes sits above the store).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from engine.core.display import plural
from engine.store.cache import Store
from engine.store.memo import ROOT as MEMO_ROOT
from engine.store.record import read_record, run_dirs


def collect(
    root: Path,
    keep_runs: int,
    yes: bool,
    as_written: Callable[[list[Path]], dict[Path, set[str]]],
    say: Callable[[str], None],
) -> None:
    """Say what would go (or, with `yes`, remove it): entries no kept run or recipe file uses,
    and partial work of stages that are not kept."""
    store = Store(root)
    keep: set[str] = set()
    by_recipe: dict[str, list[Path]] = {}
    for d in run_dirs(root):
        by_recipe.setdefault(d.parent.name, []).append(d)
    files: set[Path] = set()
    for dirs in by_recipe.values():
        for d in sorted(dirs, key=lambda d: read_record(d).get("started", ""))[-keep_runs:]:
            keep.update(s.get("fingerprint") for s in read_record(d)["stages"].values())
        for d in dirs:
            recipe_file = Path(read_record(d).get("recipe_file") or "")
            if recipe_file.name and recipe_file.parent.is_dir():
                files.update(_recipe_files(recipe_file.parent))
    files.update(_recipe_files(root.resolve().parent))
    written = as_written(sorted(files))
    if written:
        say(
            "keeping the entries that the recipe files need as written "
            f"({', '.join(p.name for p in sorted(written)[:5])}{', ...' if len(written) > 5 else ''})"
        )
    for fps in written.values():
        keep.update(fps)
    if yes:  # half-built entries of crashed runs: their builder is gone
        swept = store.sweep_tmp()
        if swept:
            say(f"removed {len(swept)} half-built entries left by crashed runs")
    keep |= adapter_bases(store, keep)
    doomed = [store.entry_path(fp) for fp in store.entries() if fp not in keep]
    if store.partial_root.exists():
        doomed += [p for p in store.partial_root.iterdir() if p.name not in keep]
    memos = store.root / MEMO_ROOT
    if memos.is_dir():
        kept_memos = {ns for fp in store.entries() if fp in keep for ns in store.manifest(fp).get("memos", [])}
        doomed += [p for p in memos.iterdir() if p.name not in kept_memos]
    total = sum(_size(p) for p in doomed)
    for p in doomed:
        say(f"{'removing' if yes else 'would remove'} {p} ({_human(_size(p))})")
    if yes:
        for p in doomed:
            store.remove(p.name) if p.parent != memos else store.discard(p)
        say(f"removed {plural(len(doomed), 'entry', 'entries')}, {_human(total)}")
    else:
        say(f"{plural(len(doomed), 'entry', 'entries')}, {_human(total)}; run with --yes to delete")


def adapter_bases(store: Store, keep: set[str]) -> set[str]:
    """The entries whose model is the base of a kept LoRA adapter (its `model/base.json` names the
    base's entry): an adapter kept by early cutoff may sit on the entry of an earlier key."""
    import json

    found: set[str] = set()
    todo = [fp for fp in keep if fp]
    while todo:
        try:
            base = json.loads((store.entry_path(todo.pop()) / "model" / "base.json").read_text()).get("stage")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(base, str) and base not in found and base not in keep:
            found.add(base)
            todo.append(base)
    return found


def _recipe_files(folder: Path) -> list[Path]:
    """The recipe files directly in `folder`: *.toml with a [recipe] table."""
    out = []
    for path in sorted(folder.glob("*.toml")):
        try:
            if path.is_file() and "[recipe]" in path.read_text(encoding="utf-8", errors="replace")[:200_000]:
                out.append(path.resolve())
        except OSError:
            continue
    return out


def _size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"
