"""`recipe validate` rejects what `run` would fail on later, with exit 2, the file and key, and no
traceback: seeds outside what torch and numpy take, unreadable or empty data files, data the loader
rejects (checked for files small enough to load at validate)."""

from __future__ import annotations

import builtins


def flat(text: str) -> str:
    return " ".join(text.split())


def test_a_seed_torch_cannot_take_fails_validate(cli, project):
    path = project / "recipe.toml"
    path.write_text(path.read_text().replace("seed = 7", "seed = 100000000000000000000000000000"))
    result = cli("validate", path)
    assert result.exit_code == 2 and "recipe.seed" in result.output and "Traceback" not in result.output
    path.write_text(path.read_text().replace("seed = 100000000000000000000000000000", "seed = 4294967295"))
    assert cli("validate", path).exit_code == 0


def test_an_empty_data_file_fails_validate(cli, project):
    (project / "data" / "convs.jsonl").write_text("\n\n")
    result = cli("validate", project / "recipe.toml")
    assert result.exit_code == 2
    out = flat(result.output)
    assert "datasets.seed.path" in out and "is empty: it has no rows" in out


def test_a_file_whose_every_row_is_unusable_fails_validate(cli, project):
    (project / "data" / "convs.jsonl").write_text('{"messages": []}\n{"messages": []}\n')
    result = cli("validate", project / "recipe.toml")
    assert result.exit_code == 2 and "no usable row" in flat(result.output)


def test_bad_json_in_a_data_file_fails_validate_with_its_line(cli, project):
    (project / "data" / "convs.jsonl").write_text('{"messages": []}\n{not json\n')
    result = cli("validate", project / "recipe.toml")
    assert result.exit_code == 2 and "line 2 is not valid JSON" in flat(result.output)


def test_an_unreadable_data_file_fails_validate(cli, project, monkeypatch):
    """As root every file is readable, so the OS refusal is simulated at open()."""
    target = str(project / "data" / "convs.jsonl")
    real = builtins.open

    def refusing(file, *a, **kw):
        if str(file) == target:
            raise PermissionError(13, "Permission denied", target)
        return real(file, *a, **kw)

    monkeypatch.setattr(builtins, "open", refusing)
    result = cli("validate", project / "recipe.toml")
    assert result.exit_code == 2 and "Traceback" not in result.output
    out = flat(result.output)
    assert "cannot read" in out and "Permission denied" in out and "datasets.seed.path" in out
