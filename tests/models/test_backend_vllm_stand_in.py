"""The vllm backend against a stand-in `vllm` module (vLLM needs a GPU): what it asks vLLM for.

The stand-in records the engine's arguments and answers each request with its seed, so these
tests see exactly what a real engine would be sent: one seeded request per sample, memory sized
from what is free after the pool gave its idle models back, a LoRA rank vLLM accepts, and a
max_model_len from the recipe's lengths.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field
from typing import ClassVar

import pytest

from engine.core.errors import RecipeError
from engine.core.seeds import sample_seed
from engine.models.backends import SamplingParams
from engine.models.backends import vllm as vllm_backend


@dataclass
class _Choice:
    text: str
    token_ids: list[int]
    finish_reason: str = "stop"


@dataclass
class _Output:
    prompt_token_ids: list[int]
    outputs: list[_Choice] = field(default_factory=list)


class _SamplingParams:
    def __init__(self, **kw) -> None:
        self.__dict__.update(kw)


class _LLM:
    made: ClassVar[list[dict]] = []
    events: ClassVar[list[str]] = []

    def __init__(self, **kw) -> None:
        _LLM.made.append(kw)
        _LLM.events.append("llm")

    def get_tokenizer(self):
        return _TOKENIZER[0]

    def chat(self, messages, sampling_params, **kw):
        assert len(messages) == len(sampling_params)
        return [_Output([1] * len(m), [_Choice(f"seed {sp.seed}", [7, 8])]) for m, sp in zip(messages, sampling_params)]


_TOKENIZER: list = []


@pytest.fixture
def stand_in(monkeypatch, tmp_path_factory):
    from transformers import AutoTokenizer

    from engine.models.builtins import builtin_dir

    if not _TOKENIZER:
        _TOKENIZER.append(AutoTokenizer.from_pretrained(builtin_dir("tiny-chat", tmp_path_factory.mktemp("m"))))
    module = types.ModuleType("vllm")
    module.LLM = _LLM  # type: ignore[attr-defined]
    module.SamplingParams = _SamplingParams  # type: ignore[attr-defined]
    module.__version__ = "stand-in"  # type: ignore[attr-defined]
    lora = types.ModuleType("vllm.lora.request")

    @dataclass
    class LoRARequest:
        name: str
        id: int
        path: str

    lora.LoRARequest = LoRARequest  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setitem(sys.modules, "vllm.lora", types.ModuleType("vllm.lora"))
    monkeypatch.setitem(sys.modules, "vllm.lora.request", lora)
    _LLM.made.clear()
    _LLM.events.clear()
    return module


def test_each_sample_is_its_own_request_seeded_by_the_engine(stand_in):
    b = vllm_backend.VLLMBackend({"model": "m"})
    prompts = [[{"role": "user", "content": f"question {i}"}] for i in range(3)]
    out = b.generate(prompts, SamplingParams(n=3, temperature=1.0, max_new_tokens=4), [10, 11, 12])
    seeds = [[int(c.text.split()[1]) for c in comps] for comps in out]
    assert seeds == [[sample_seed(s, k) for k in range(3)] for s in (10, 11, 12)]
    # consecutive prompt seeds never share a stream (vLLM's own seed+k for n samples would)
    assert len({s for row in seeds for s in row}) == 9
    assert all(c.completion_tokens == 2 for comps in out for c in comps)


def test_memory_is_sized_from_what_is_free_after_the_pool_gives_back(stand_in, monkeypatch):
    free = [10 * 2**30]

    def release():
        _LLM.events.append("release")
        free[0] = 60 * 2**30  # the pool's idle models are gone

    monkeypatch.setattr(vllm_backend, "_free_memory", lambda: (free[0], 80 * 2**30))
    monkeypatch.setattr("torch.cuda.empty_cache", lambda: None)
    vllm_backend.VLLMBackend({"model": "m"}, release=release, max_model_len=1024)
    assert _LLM.events == ["release", "llm"]
    kw = _LLM.made[0]
    assert kw["gpu_memory_utilization"] == pytest.approx(0.9 * 60 / 80, abs=1e-3)
    assert kw["max_model_len"] == 1024


def test_a_lora_rank_is_served_at_the_next_rank_vllm_accepts(stand_in, tmp_path):
    import json

    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 12}))
    vllm_backend.VLLMBackend({"model": "m", "adapter": str(tmp_path)})
    assert _LLM.made[0]["max_lora_rank"] == 16
    assert [vllm_backend.lora_slot(r) for r in (1, 2, 8, 33, 300, 512)] == [1, 8, 8, 64, 320, 512]
    with pytest.raises(RecipeError, match="rank 600"):
        vllm_backend.lora_slot(600)


def test_max_model_len_comes_from_the_recipe_lengths(tmp_path):
    import json

    stages = {
        "a": types.SimpleNamespace(config=types.SimpleNamespace(max_length=700)),
        "b": types.SimpleNamespace(config=types.SimpleNamespace(max_new_tokens=200)),
    }
    recipe = types.SimpleNamespace(stages=stages)
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 8192}))
    assert vllm_backend.model_len(recipe, {"model": str(tmp_path)}) == 1024  # 900 rounded up to 256
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 768}))
    assert vllm_backend.model_len(recipe, {"model": str(tmp_path)}) == 768  # never past the model's context
    assert vllm_backend.model_len(types.SimpleNamespace(stages={}), {"model": str(tmp_path)}) is None
