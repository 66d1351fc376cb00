"""The built wheel works without the repository: installed (not editable) in a fresh virtual
environment, `recipe init --example caI_multiturn` writes the flagship with its data, and it
validates and runs (at reduced size, on builtin:tiny-chat) from a folder outside the checkout:
the built-in templates, the shipped eval suites, the constitutions and the example recipes are
package data."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import REDUCED_FLAGSHIP, ROOT, SHARED_BUILTIN, set_args


@pytest.mark.slow
def test_the_installed_wheel_runs_the_flagship_outside_the_checkout(tmp_path):
    source, wheels = tmp_path / "source", tmp_path / "wheels"  # built from a copy: no stale build/ of the checkout
    files = subprocess.check_output(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, text=True).split()
    for name in files:
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", wheels, source],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    [wheel] = wheels.glob("recipe_engine-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", wheel],
        check=True,
        capture_output=True,
    )
    # the dependencies (torch, transformers, ...) come from this environment's site-packages, on
    # the path after the venv's own: a path line in a .pth file, so this environment's editable
    # install of the project (its own .pth files) is not active there
    purelib = Path(subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())  # fmt: skip
    (purelib / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")} | {
        "RECIPE_BUILTIN_DIR": str(SHARED_BUILTIN),
        "PATH": f"{venv / 'bin'}:{os.environ['PATH']}",
    }
    work = tmp_path / "elsewhere"
    work.mkdir()

    def recipe(*args, timeout=600):
        return subprocess.run(
            [venv / "bin" / "recipe", *map(str, args)],
            capture_output=True,
            text=True,
            cwd=work,
            env=env,
            timeout=timeout,
        )

    where = subprocess.run(
        [python, "-c", "import engine; print(engine.__file__)"], capture_output=True, text=True, cwd=work, env=env
    )
    assert where.stdout.startswith(str(venv)), where  # the installed copy, not the checkout
    init = recipe("init", "proj", "--example", "caI_multiturn")
    assert init.returncode == 0, init.stderr
    flagship = work / "proj" / "caI_multiturn.toml"
    assert (work / "proj" / "constitutions" / "hhh.toml").is_file()
    check = recipe("validate", flagship)
    assert check.returncode == 0, check.stdout + check.stderr
    run = recipe("run", flagship, *set_args(REDUCED_FLAGSHIP), "--runs-dir", work / "runs", timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (work / "runs" / "cai-multiturn" / "latest" / "stages" / "eval" / "metrics.json").is_file()
    starter = recipe("init", "starter")
    assert starter.returncode == 0 and recipe("run", work / "starter" / "recipe.toml").returncode == 0
