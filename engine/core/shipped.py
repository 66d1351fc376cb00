"""Where the files the project ships live: the built-in templates (`templates/`) and the example
recipes with their data, eval suites and constitutions (`recipes/`). In a checkout (or an editable
install) they are the repository's own folders; an installed wheel carries copies inside the
package, as `engine/_shipped/<folder>` (setup.py's build step puts them there), and the
repository's layout stays as it is."""

from __future__ import annotations

from pathlib import Path

FOLDERS = ("templates", "recipes")
_REPO = Path(__file__).resolve().parents[2]
_PACKAGED = Path(__file__).resolve().parents[1] / "_shipped"


def shipped(folder: str) -> Path:
    """The directory of a shipped folder ("templates" or "recipes")."""
    assert folder in FOLDERS, folder
    repo = _REPO / folder
    return repo if (_REPO / "pyproject.toml").is_file() and repo.is_dir() else _PACKAGED / folder
