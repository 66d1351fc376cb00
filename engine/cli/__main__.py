"""`python -m engine.cli`: the `recipe` command."""

from engine.cli import main

main()
