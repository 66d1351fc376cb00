"""What a data path must be before it is read: a regular file of a data format, or a folder that
holds a saved dataset or data files (never a device, a FIFO or `/`)."""

from __future__ import annotations

import os
from pathlib import Path

from engine.core.errors import first_line

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".arrow", ".tsv", ".txt")


MAX_DIR_ENTRIES = 100_000


def not_a_dataset(path: Path) -> str | None:
    """Why `path` cannot be read as a dataset, or None: a device, FIFO or socket (reading
    /dev/zero never ends), or a directory that is not one (no save_to_disk marker and no data
    file in it or its subfolders, or more entries than any dataset folder has: `/`)."""
    try:
        if not path.exists() or path.is_file():
            return None
        if not path.is_dir():
            return f"{path} is not a regular file (a device, pipe or socket); point path at a data file"
        if any((path / m).exists() for m in SAVE_TO_DISK_MARKERS):
            return None
        seen, found = 0, False
        for dirpath, dirnames, filenames in os.walk(path):
            seen += len(dirnames) + len(filenames)
            if seen > MAX_DIR_ENTRIES:
                return (
                    f"{path} holds more than {MAX_DIR_ENTRIES:,} files and folders: it is not a dataset "
                    "folder; point path at the data file or the dataset's own folder"
                )
            depth = len(Path(dirpath).relative_to(path).parts)
            found = found or (depth <= 2 and any(f.lower().endswith(DATA_SUFFIXES) for f in filenames))
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    except OSError as e:
        return f"cannot read {path}: {first_line(e)}"
    if not found:
        return (
            f"{path} is a directory with no data file ({', '.join(DATA_SUFFIXES)}) in it or its subfolders, "
            "and it is not a saved dataset (save_to_disk)"
        )
    return None


SAVE_TO_DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
