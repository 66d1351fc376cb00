"""Models kept between stages, replicas over several devices, loading in the target dtype, and
the vllm backend's mapping onto vLLM's API.

A model kept from an earlier stage must give exactly the rows a fresh load gives; a generation
stage on two devices exactly the rows of one (device is execution-only: same fingerprint).
"""

from __future__ import annotations

import logging
import sys
import textwrap
import types
from pathlib import Path

import pytest

from engine.data.rows import read_rows
from engine.load.loader import load_recipe
from engine.models.pool import ModelPool, devices
from engine.run.executor import run

from conftest import write_jsonl

RECIPE = """
[recipe]
name = "pool"
seed = 5

[models.policy]
path = "builtin:tiny-chat"
device = "{device}"

[datasets.p]
path = "p.jsonl"
type = "prompts"

[stages.first]
kind = "generate"
input = "p"
model = "policy"
max_new_tokens = 12
temperature = 1.0
shard_size = 3

[stages.second]
kind = "generate"
input = "p"
model = "policy"
n = 2
max_new_tokens = 10
temperature = 0.8
shard_size = 4
"""


def project(root: Path, device: str = "cpu") -> Path:
    write_jsonl(root / "p.jsonl", [{"id": f"q{i}", "prompt": f"question {i}: " + "why " * (i % 3)} for i in range(7)])
    (root / "r.toml").write_text(textwrap.dedent(RECIPE.format(device=device)))
    return root / "r.toml"


def rows(rec, stage: str) -> list[dict]:
    return read_rows(rec.dir / "stages" / stage / "rows.parquet")


def test_a_model_kept_for_the_next_stage_gives_the_rows_of_a_fresh_load(tmp_path):
    path = project(tmp_path / "proj")
    rec = run(load_recipe(path), tmp_path / "runs")
    log = (rec.dir / "logs" / "second.log").read_text()
    assert "already loaded (kept from an earlier stage)" in log
    assert "already loaded" not in (rec.dir / "logs" / "first.log").read_text()
    fresh = run(load_recipe(path), tmp_path / "runs", force=["second"])  # `first` cached: second loads anew
    assert "already loaded" not in (fresh.dir / "logs" / "second.log").read_text()
    assert rows(fresh, "second") == rows(rec, "second")


def test_two_devices_give_the_rows_of_one(tmp_path):
    one = run(load_recipe(project(tmp_path / "a", "cpu")), tmp_path / "runs-a")
    two = run(load_recipe(project(tmp_path / "b", "cpu,cpu")), tmp_path / "runs-b")
    assert "generating on 2 devices" in (two.dir / "logs" / "first.log").read_text()
    for stage in ("first", "second"):
        assert one.data["stages"][stage]["fingerprint"] == two.data["stages"][stage]["fingerprint"]
        assert rows(one, stage) == rows(two, stage)


class _Tiny:
    """Stands in for a model in pool bookkeeping: parameters() with a byte size."""

    def __init__(self, nbytes: int) -> None:
        import torch

        self.p = torch.zeros(nbytes, dtype=torch.uint8)

    def parameters(self):
        return [self.p]


def test_pool_keeps_what_later_stages_need_and_never_drops_a_model_in_use(monkeypatch):
    log = logging.getLogger("test-pool")
    pool = ModelPool()
    loads = []

    def loader(tag):
        def load():
            loads.append(tag)
            return _Tiny(1000), f"tok-{tag}"

        return load

    m1, tok1, back1 = pool.borrow(("models", "policy", "cpu"), loader("policy"), log)
    _m2, _, back2 = pool.borrow(("stages", "sft", "cpu"), loader("sft"), log)
    again, tok_again, back3 = pool.borrow(("models", "policy", "cpu"), loader("policy"), log)
    assert again is m1 and tok_again == tok1 and loads == ["policy", "sft"]
    back1(), back3()
    pool.keep({("stages", "sft")})  # sft is borrowed and wanted; policy is idle and not wanted
    assert set(pool.entries) == {("stages", "sft", "cpu")}
    pool.keep(set())  # still borrowed: kept
    assert set(pool.entries) == {("stages", "sft", "cpu")}
    back2()
    monkeypatch.setattr("engine.models.pool.free_memory", lambda device: 1200.0)  # < 1.5 x 1000 bytes
    pool.make_room("cpu", ModelPool.HEADROOM)
    assert pool.entries == {}


def test_devices():
    assert devices("cpu") == ["cpu"]
    assert devices("cuda:0, cuda:1") == ["cuda:0", "cuda:1"]
    import torch

    assert devices("auto") == (
        [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else ["cpu"]
    )


def test_a_model_loads_in_the_dtype_asked_for(tmp_path):
    import torch

    from engine.models.weights import load_model

    model, _ = load_model("builtin:tiny-chat", cache_root=tmp_path, dtype="bfloat16", device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


# --------------------------------------------------------------------------- vllm, mapped


class _FakeVLLM:
    """Records what the vllm backend asks of vLLM's documented API (LLM, LLM.chat, SamplingParams,
    LoRARequest) and answers like it: the real engine is tested by test_backend_contract where
    vllm is importable."""

    def __init__(self) -> None:
        self.llm_kwargs = None
        self.chat_calls = []
        fake = self

        class SamplingParams:
            def __init__(self, **kw):
                self.kw = kw

        class LLM:
            def __init__(self, **kw):
                fake.llm_kwargs = kw

            def get_tokenizer(self):
                from engine.models.builtins import _tiny_tokenizer

                return _tiny_tokenizer()

            def chat(self, prompts, **kw):
                fake.chat_calls.append((prompts, kw))
                outs = []
                for prompt, sp in zip(prompts, kw["sampling_params"]):
                    choices = [
                        types.SimpleNamespace(
                            text=f" seed {sp.kw['seed']} sample {k} ", token_ids=[1, 2, 3, 257], finish_reason="stop"
                        )
                        for k in range(sp.kw["n"])
                    ]
                    outs.append(types.SimpleNamespace(prompt_token_ids=list(range(len(prompt) + 4)), outputs=choices))
                return outs

        class LoRARequest:
            def __init__(self, name, int_id, path):
                self.args = (name, int_id, path)

        self.module = types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams, __version__="fake")
        self.lora = types.SimpleNamespace(request=types.SimpleNamespace(LoRARequest=LoRARequest))


def test_vllm_backend_maps_the_contract_onto_vllm(monkeypatch, tmp_path):
    from engine.models.backends import SamplingParams
    from engine.models.backends.vllm import VLLMBackend

    fake = _FakeVLLM()
    monkeypatch.setitem(sys.modules, "vllm", fake.module)
    monkeypatch.setitem(sys.modules, "vllm.lora", fake.lora)
    monkeypatch.setitem(sys.modules, "vllm.lora.request", fake.lora.request)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 32}')
    b = VLLMBackend({"model": "/m", "dtype": "auto", "adapter": str(adapter), "chat_template": "{{ x }}"}, gpus=2)
    assert fake.llm_kwargs == {
        "model": "/m",
        "dtype": "bfloat16",
        "seed": 0,
        "tensor_parallel_size": 2,
        "trust_remote_code": False,
        "enable_lora": True,
        "max_lora_rank": 32,
        "max_loras": 1,
    }
    prompts = [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]]
    out = b.generate(prompts, SamplingParams(n=2, temperature=0.5, top_k=0, max_new_tokens=9, stop=("x",)), seed=7)
    ((sent, kw),) = fake.chat_calls
    # one request per sample, each seeded by the engine (vLLM's seed+k would overlap prompt b's streams)
    assert sent == [prompts[0], prompts[0], prompts[1], prompts[1]]
    assert kw["chat_template"] == "{{ x }}" and kw["lora_request"].args[2] == str(adapter)
    from engine.core.seeds import sample_seed

    seeds = [sample_seed(s, k) for s in (7, 8) for k in range(2)]
    assert [sp.kw["seed"] for sp in kw["sampling_params"]] == seeds
    assert kw["sampling_params"][0].kw | {"seed": None} == {
        "n": 1,
        "temperature": 0.5,
        "top_p": 1.0,
        "top_k": -1,
        "max_tokens": 9,
        "min_tokens": 0,
        "stop": ["x"],
        "stop_token_ids": [257],
        "seed": None,
        "skip_special_tokens": True,
    }
    assert [[c.text for c in x] for x in out] == [
        [f"seed {seeds[0]} sample 0", f"seed {seeds[1]} sample 0"],
        [f"seed {seeds[2]} sample 0", f"seed {seeds[3]} sample 0"],
    ]
    assert out[0][0].completion_tokens == 3 and out[0][0].prompt_tokens == 5 and out[0][0].finish_reason == "stop"


def test_vllm_backend_is_refused_at_validate_when_vllm_is_missing(tmp_path, monkeypatch):
    from engine.core.errors import RecipeError

    monkeypatch.setattr("engine.spec.backends.BackendInfo.available", lambda self: self.requires is None)
    path = project(tmp_path)
    path.write_text(path.read_text().replace('device = "cpu"', 'backend = "vllm"'))
    with pytest.raises(RecipeError, match="uses the vllm backend, but vllm is not installed"):
        load_recipe(path)


def test_small_models_are_placed_on_the_cpu_by_auto(tmp_path):
    import json

    from engine.models.weights import is_small

    def config(hidden, layers, vocab):
        d = tmp_path / f"m{hidden}"
        d.mkdir()
        (d / "config.json").write_text(
            json.dumps(
                {
                    "hidden_size": hidden,
                    "num_hidden_layers": layers,
                    "vocab_size": vocab,
                    "intermediate_size": 4 * hidden,
                }
            )
        )
        return str(d)

    assert is_small("builtin:tiny-chat", tmp_path)
    assert is_small(config(256, 4, 1000), tmp_path)
    assert not is_small(config(2048, 24, 49152), tmp_path)  # SmolLM2-1.7B's shape
    assert not is_small("Qwen/Qwen2.5-0.5B-Instruct", tmp_path)  # unknown here: the GPU when there is one
    assert devices("auto", small=True) == ["cpu"]


def test_vllm_serves_a_stage_made_adapter_on_its_base_and_refuses_an_adapter_on_an_adapter(tmp_path):
    import json

    from engine.core.errors import RecipeError
    from engine.models.backends.vllm import resolve
    from engine.spec.artifact import Artifact

    def entry(fp: str, base: str | None):
        model = tmp_path / fp / "model"
        model.mkdir(parents=True)
        if base is None:
            (model / "config.json").write_text("{}")
        else:
            (model / "adapter_config.json").write_text('{"r": 8}')
            (model / "base.json").write_text(json.dumps({"name": base, "stage": base}))
        return Artifact(fp, "model", "stages", path=tmp_path / fp)

    full, lora = entry("fpfull", None), entry("fplora", "fpfull")
    assert resolve(full, tmp_path)["model"] == str(tmp_path / "fpfull" / "model")
    assert resolve(full, tmp_path)["adapter"] is None
    got = resolve(lora, tmp_path)
    assert got["model"] == str(tmp_path / "fpfull" / "model") and got["adapter"] == str(tmp_path / "fplora" / "model")
    with pytest.raises(RecipeError, match="itself a model with an adapter"):
        resolve(entry("fplora2", "fplora"), tmp_path)
