"""Load a recipe's dataset (local file or dir, or a hub id) into normalized rows.

Every output row is `{"id": str, <typed fields>, "meta": {...}}`. Rows that cannot be used are
dropped with a short reason that is counted in `LoadResult.dropped`, never silently. Data that
cannot be read at all (bad file, missing column, hub unreachable) raises `DataError`.

Local jsonl/json/csv/parquet files are read with the stdlib and pyarrow only: HF `datasets` is
imported lazily, for hub ids and directories (`save_to_disk` output or folders of data files).
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from engine.core.errors import DataError, first_line
from engine.data.files import SAVE_TO_DISK_MARKERS, not_a_dataset
from engine.data.formats import canonical_messages, normalize_messages, split_shared_prefix

REQUIRED = {"conversations": ("messages",), "prompts": ("prompt",), "preferences": ("prompt", "chosen", "rejected")}
FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class LoadResult:
    rows: list[dict]  # normalized rows
    total: int  # rows considered (after `limit`), before dropping: total == len(rows) + dropped
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> up to 3 row ids
    first_keys: list[str] = field(default_factory=list)  # the first row's keys as read (before `columns`)

    def too_many_dropped(self, name: str, max_dropped: float, columns: dict[str, str] | None = None) -> str | None:
        """The error when more than `max_dropped` (a share of the rows) were unusable, else None."""
        n = sum(self.dropped.values())
        if not n or n <= max_dropped * self.total:
            return None
        reasons = "; ".join(
            f"{reason}: {count} (first: {', '.join(self.examples.get(reason, []))})"
            for reason, count in sorted(self.dropped.items(), key=lambda kv: -kv[1])
        )
        text = (
            f"dataset '{name}': no usable row: all {n} are unusable ({reasons})."
            if n == self.total
            else f"dataset '{name}': {n} of {self.total} rows are unusable, more than max_dropped = {max_dropped:g} "
            f"of them ({reasons})."
        )
        if columns:
            mapped = ", ".join(f'{t} = "{s}"' for t, s in columns.items())
            text += (
                f" The recipe maps columns = {{ {mapped} }}; the first row has the keys {', '.join(self.first_keys)}."
            )
        elif any(r in SHAPE_REASONS for r in self.dropped):
            text += f" The first row has the keys {', '.join(self.first_keys)}."
        return text


SHAPE_REASONS = {"not a list of messages", "no prompt column, and chosen/rejected are not conversations"}
DROPPED_HINT = (
    "Fix those rows, or the dataset's `columns` mapping (every accepted shape, with an example: "
    "docs/data-formats.md); or raise the dataset's max_dropped (a share, 0 to 1) to go on with the rows left."
)


def _looks_like_hub_id(source: str) -> bool:
    return bool(HUB_ID.match(source)) and Path(source).suffix.lower() not in FORMATS


# ---------------------------------------------------------------- reading


def _read_file(path: Path, fmt: str, where: dict) -> list[dict]:
    if fmt not in FORMATS.values():
        raise DataError.single(
            f"unknown data format '{fmt}' for {path}.",
            hint='Set format = "jsonl", "json", "csv" or "parquet".',
            **where,
        )
    try:
        if fmt == "parquet":
            from engine.data.rows import read_rows

            return read_rows(path)
        if fmt == "csv":  # newline="" keeps line breaks inside quoted cells
            with open(path, encoding="utf-8-sig", newline="") as fh:
                reader, rows = csv.DictReader(fh), []
                for r in reader:
                    if None in r:  # more cells than the header has columns
                        raise DataError.single(
                            f"{path} line {reader.line_num} has {len(reader.fieldnames or []) + len(r[None])} cells "
                            f"but the header has {len(reader.fieldnames or [])} columns.",
                            hint="Quote cells that hold commas, or fix the row.",
                            **where,
                        )
                    rows.append(dict(r))
                return rows
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError, ValueError, csv.Error) as e:  # pyarrow errors: ValueError
        raise DataError.single(f"could not read {path}: {first_line(e)}", **where) from None
    if fmt == "jsonl":
        rows = []
        for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 may be in a string
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError.single(
                    f"{path} line {n} is not valid JSON ({e.msg}, column {e.colno})", **where
                ) from None
            if not isinstance(rows[-1], dict):
                raise DataError.single(f"{path} line {n} is not a JSON object", **where)
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError.single(f"{path} is not valid JSON: {e.msg} at line {e.lineno}", **where) from None
    if isinstance(data, dict):
        data = next((data[k] for k in ("data", "rows", "train") if isinstance(data.get(k), list)), data)
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError.single(f'{path} must hold a list of objects (or {{"data": [...]}})', **where)
    return data


def _decode_csv_cells(row: dict) -> dict:
    """CSV cells are text: decode JSON message lists (and a JSON `meta` object) held in them."""
    for col in ("messages", "conversations", "prompt", "chosen", "rejected", "meta"):
        v = row.get(col)
        if isinstance(v, str) and v.lstrip()[:1] in ("[", "{"):
            try:
                decoded = json.loads(v)
            except json.JSONDecodeError:
                continue  # a prompt that merely starts with "[" stays text
            if (col == "meta" and isinstance(decoded, dict)) or (
                isinstance(decoded, list) and all(isinstance(m, dict) for m in decoded)
            ):
                row[col] = decoded
    return row


def _read_hf_dir(path: Path, split: str, where: dict) -> list[dict]:
    try:
        import datasets

        if any((path / m).exists() for m in SAVE_TO_DISK_MARKERS):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError.single(
                        f"{path} has no split '{split}' (splits: {', '.join(ds)}).",
                        hint="Set `split` in the recipe.",
                        **where,
                    )
                ds = ds[split]
        elif any(p.is_file() for p in path.rglob("*")):
            ds = datasets.load_dataset(str(path), split=split)
        else:
            raise DataError.single(f"directory {path} holds no data files", **where)
        return ds.to_list()
    except DataError:
        raise
    except Exception as e:
        raise DataError.single(f"could not load dataset directory {path}: {first_line(e)}", **where) from None


def _read_hub(source: str, split: str, revision: str | None, where: dict) -> list[dict]:
    try:
        import datasets

        return datasets.load_dataset(source, split=split, revision=revision).to_list()
    except Exception as e:
        raise DataError.single(
            f"dataset '{source}' could not be loaded from the hub: {first_line(e).rstrip('.')}; "
            f"no local path {os.path.abspath(source)} exists either.",
            hint="Download it and point `path` at the local copy, or check the id and the network.",
            **where,
        ) from None


def _read(source, fmt, split, revision, where) -> list[dict]:
    path = Path(source).expanduser()
    if (why := not_a_dataset(path)) is not None:
        raise DataError.single(why + ".", **where)
    if path.is_dir():
        return _read_hf_dir(path, split, where)
    if path.is_file():
        fmt = (fmt or FORMATS.get(path.suffix.lower(), path.suffix.lstrip(".") or "none")).lower()
        rows = _read_file(path, fmt, where)
        return [_decode_csv_cells(r) for r in rows] if fmt == "csv" else rows
    if _looks_like_hub_id(source):
        return _read_hub(source, split, revision, where)
    raise DataError.single(f"file not found: {path.resolve()}", **where)


# ---------------------------------------------------------------- normalizing


def _blank(v) -> bool:
    return v is None or (isinstance(v, str) and not v.strip()) or (isinstance(v, list) and not v)


def _columns_found(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(k for r in rows for k in r))


def _normalize_row(row: dict, type: str):
    """(typed fields, consumed column names) or a drop reason string."""
    as_msgs = lambda v, role: [{"role": role, "content": v}] if isinstance(v, str) else canonical_messages(v)  # noqa: E731
    if type == "conversations":
        messages = row.get("messages")
        consumed: tuple[str, ...] = ("messages",)
        if "messages" not in row and "completion" in row:  # TRL's prompt-completion rows
            if _blank(row.get("prompt")) or _blank(row.get("completion")):
                return "empty prompt" if _blank(row.get("prompt")) else "empty completion"
            messages = as_msgs(row["prompt"], "user") + as_msgs(row["completion"], "assistant")
            consumed = ("prompt", "completion")
        try:
            return {"messages": normalize_messages(canonical_messages(messages))}, consumed
        except (ValueError, TypeError) as e:
            return str(e) if isinstance(e, ValueError) else "not a list of messages"
    if type == "preferences" and "prompt" not in row:  # whole conversations sharing a prefix (HH-style)
        if _blank(row.get("chosen")) or _blank(row.get("rejected")):
            return "empty chosen" if _blank(row.get("chosen")) else "empty rejected"
        split = split_shared_prefix(row.get("chosen"), row.get("rejected"))
        if isinstance(split, str):
            return split
        row = {**row, "prompt": split[0], "chosen": split[1], "rejected": split[2]}
    prompt = row.get("prompt")
    if _blank(prompt):
        return "empty prompt"
    if type == "prompts":
        if isinstance(prompt, str):
            return {"prompt": prompt.strip()}, ("prompt",)
        try:
            return {"prompt": normalize_messages(canonical_messages(prompt), require_assistant=False)}, ("prompt",)
        except ValueError as e:
            return str(e)
    p = as_msgs(prompt, "user")
    out = {"prompt": p}
    for col in ("chosen", "rejected"):
        v = row.get(col)
        if _blank(v):
            return f"empty {col}"
        c = as_msgs(v, "assistant")
        if not isinstance(p, list) or not isinstance(c, list):
            return "not a list of messages"
        try:
            conv = normalize_messages(p + c)  # the prompt plus the answer must be a valid chat
        except ValueError as e:
            return str(e)
        out["prompt"], out[col] = conv[: len(p)], conv[len(p) :]
    if out["chosen"] == out["rejected"]:
        return "chosen equals rejected"
    return out, ("prompt", "chosen", "rejected")


def load_rows(
    source: str,
    *,
    name: str,
    type: str = "conversations",
    format: str | None = None,
    split: str = "train",
    columns: dict[str, str] | None = None,
    limit: int | None = None,
    shuffle_seed: int | None = None,
    revision: str | None = None,
    key: str | None = None,
    file: str | None = None,
) -> LoadResult:
    where = {"file": file, "key": key}
    if type not in REQUIRED:
        raise DataError.single(f"unknown dataset type '{type}' (expected one of: {', '.join(REQUIRED)})", **where)
    raw = _read(source, format, split, revision, where)
    first_keys = list(raw[0]) if raw else []
    found = _columns_found(raw)
    if columns and raw:
        missing = [src for src in columns.values() if src not in found]
        if missing:
            raise DataError.single(
                f"dataset '{name}' has no column {', '.join(repr(m) for m in missing)} "
                f"(available columns: {', '.join(found) or 'none'})",
                **where,
            )
        sources = set(columns.values())
        raw = [
            {**{k: v for k, v in r.items() if k not in sources}, **{t: r.get(s) for t, s in columns.items()}}
            for r in raw
        ]
        found = _columns_found(raw)
    if type == "conversations" and "messages" not in found and "conversations" in found:
        raw = [{"messages": r.pop("conversations", None), **r} for r in raw]  # ShareGPT's column name
        found = _columns_found(raw)
    required = list(REQUIRED[type])
    if type == "conversations" and "messages" not in found and {"prompt", "completion"} <= set(found):
        required = ["prompt", "completion"]
    if type == "preferences" and "prompt" not in found and {"chosen", "rejected"} <= set(found):
        required = ["chosen", "rejected"]  # HH-style: the shared prefix is the prompt
    missing = [c for c in required if c not in found]
    if raw and missing:
        raise DataError.single(
            f"dataset '{name}' ({type}) needs a '{missing[0]}' column; columns found: {', '.join(found)}.",
            hint=f'Map one in the recipe, e.g. columns = {{ {missing[0]} = "..." }} (the accepted shapes: '
            "docs/data-formats.md).",
            **where,
        )

    indexed = list(enumerate(raw))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(indexed)
    if limit is not None:
        indexed = indexed[: max(limit, 0)]

    result = LoadResult(rows=[], total=len(indexed), first_keys=first_keys)
    for index, row in indexed:
        rid = row.get("id")
        rid = f"{name}:{index}" if rid is None or rid == "" else str(rid)
        got = _normalize_row(row, type)
        if isinstance(got, str):
            result.dropped[got] = result.dropped.get(got, 0) + 1
            ex = result.examples.setdefault(got, [])
            if len(ex) < 3:
                ex.append(rid)
            continue
        fields, consumed = got
        meta = dict(row["meta"]) if isinstance(row.get("meta"), dict) else {}
        skip = {"id", "meta", *consumed}
        meta.update({k: v for k, v in row.items() if k not in skip})
        if "meta" in row and not isinstance(row["meta"], dict) and row["meta"] is not None:
            meta["meta"] = row["meta"]
        result.rows.append({"id": rid, **fields, "meta": meta})
    return result


# ---------------------------------------------------------------- validate-time checks
