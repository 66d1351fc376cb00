"""The wheel carries the shipped folders (templates/, recipes/: built-in templates, example
recipes, their data, eval suites and constitutions) inside the package as engine/_shipped/, where
engine.core.shipped finds them once installed. The repository keeps its layout."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


class BuildWithShipped(build_py):
    def run(self):
        super().run()
        for folder in ("templates", "recipes"):
            target = Path(self.build_lib) / "engine" / "_shipped" / folder
            shutil.copytree(HERE / folder, target, dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildWithShipped})
