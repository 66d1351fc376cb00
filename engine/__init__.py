"""recipe: a declarative engine for LLM alignment pipelines.

Nothing here imports torch, transformers, trl, peft or datasets at module level:
`recipe validate`, `plan` and `--help` must stay fast.
"""

__version__ = "0.1.0"
