"""The one table of generation backends: `backend = "..."` in a [models.*] table -> what serves it.

Adding a backend is one module plus one line here. The module (under engine/models/backends/, or
a plugin's) implements the `Backend` protocol (engine.models.backends) and a function

    build(request: engine.models.backends.BuildRequest) -> Backend

which the model pool calls to serve a model reference. The entry says, for the rest of the
engine, what the backend can do: validation, fingerprints, model info and the eval stage read
these flags and never a backend's name.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass


@dataclass(frozen=True)
class BackendInfo:
    module: str  # the implementing module: defines build(request)
    description: str
    weights_here: bool  # loads the model's files in this process: its chat template, context length
    # and token log-probabilities (perplexity, option_logprobs) are known here
    server: bool = False  # a remote server decides the model: its identity is the model name asked for
    requires: str | None = None  # a Python package that must be importable to use it
    install: str | None = None  # how to install that package

    def available(self) -> bool:
        return self.requires is None or importlib.util.find_spec(self.requires) is not None


BACKENDS: dict[str, BackendInfo] = {
    "hf": BackendInfo("engine.models.backends.hf", "transformers in process", weights_here=True),
    "openai": BackendInfo("engine.models.backends.openai", "a server", weights_here=False, server=True),
    "vllm": BackendInfo(
        "engine.models.backends.vllm",
        "vLLM's engine in process (pip install recipe-engine[vllm], GPUs only)",
        weights_here=False,
        requires="vllm",
        install="pip install 'recipe-engine[vllm]'",
    ),
}


def backend_module(name: str):
    """The module implementing backend `name` (imported on first use: it may need torch or vllm)."""
    return importlib.import_module(BACKENDS[name].module)
