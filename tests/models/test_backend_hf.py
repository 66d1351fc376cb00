"""The hf backend on the builtin model: batching, n samples, seeding, stop strings, order."""

from __future__ import annotations

import pytest

from engine.models.backends import SamplingParams
from engine.models.backends.hf import HFBackend
from engine.models.weights import load_model

PROMPTS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "user", "content": "a much longer question about the tides and the moon"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "why?"}],
]


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    model, tok = load_model("builtin:tiny-chat", cache_root=tmp_path_factory.mktemp("cache"))
    return HFBackend(model, tok, batch_size=2)


def test_batched_greedy_equals_one_at_a_time(backend):
    params = SamplingParams(temperature=0.0, max_new_tokens=12)
    batched = backend.generate(PROMPTS, params, seed=0)
    single = [backend.generate([p], params, seed=0)[0] for p in PROMPTS]
    assert [c[0].text for c in batched] == [c[0].text for c in single]
    for prompt, comps in zip(PROMPTS, batched):
        assert comps[0].prompt_tokens == len(backend._encode([prompt])[0])
        assert 0 < comps[0].completion_tokens <= 12 or comps[0].finish_reason == "stop"


def test_n_samples_are_seeded(backend):
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=10)
    a = backend.generate(PROMPTS, params, seed=5)
    b = backend.generate(PROMPTS, params, seed=5)
    c = backend.generate(PROMPTS, params, seed=6)
    assert all(len(x) == 3 for x in a)
    assert [[s.text for s in x] for x in a] == [[s.text for s in x] for x in b]
    assert [[s.text for s in x] for x in a] != [[s.text for s in x] for x in c]


def test_stop_strings_cut_the_text(backend):
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=24)
    texts = [s.text for s in backend.generate(PROMPTS[:1], params, seed=1)[0]]
    letter = next(ch for t in texts for ch in t if ch.isalpha())
    cut = backend.generate(
        PROMPTS[:1], SamplingParams(n=4, temperature=1.0, max_new_tokens=24, stop=(letter,)), seed=1
    )[0]
    for full, short in zip(texts, cut):
        if letter in full:
            assert short.text == full[: full.index(letter)].strip() and short.finish_reason == "stop"


def test_batch_is_halved_on_out_of_memory(backend, monkeypatch):
    import torch

    sizes = []
    real = backend._batch

    def flaky(batch, params, seed):
        sizes.append(len(batch))
        if len(batch) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(batch, params, seed)

    monkeypatch.setattr(backend, "_batch", flaky)
    out = backend.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=4), seed=0)
    assert len(out) == 3 and sizes[:2] == [2, 1] and all(s == 1 for s in sizes[1:])


@pytest.mark.slow
def test_a_lora_adapter_dir_is_applied(tmp_path):
    import textwrap

    from peft import LoraConfig, get_peft_model

    from engine.data.rows import read_rows
    from engine.load.loader import load_recipe
    from engine.run.executor import run

    from conftest import write_jsonl

    model, _ = load_model("builtin:tiny-chat", cache_root=tmp_path / "c")
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft.save_pretrained(tmp_path / "proj" / "adapter")
    write_jsonl(tmp_path / "proj" / "p.jsonl", [{"prompt": f"question {i}"} for i in range(4)])
    (tmp_path / "proj" / "r.toml").write_text(
        textwrap.dedent("""
        [recipe]
        name = "ad"
        [models.base]
        path = "builtin:tiny-chat"
        [models.tuned]
        path = "builtin:tiny-chat"
        adapter = "adapter"
        [datasets.p]
        path = "p.jsonl"
        type = "prompts"
        [stages.a]
        kind = "generate"
        input = "p"
        model = "base"
        temperature = 0.0
        max_new_tokens = 12
        [stages.b]
        kind = "generate"
        input = "p"
        model = "tuned"
        temperature = 0.0
        max_new_tokens = 12
    """)
    )
    rec = run(load_recipe(tmp_path / "proj" / "r.toml"), tmp_path / "runs")
    a = [r["messages"][-1]["content"] for r in read_rows(rec.dir / "stages" / "a" / "rows.parquet")]
    b = [r["messages"][-1]["content"] for r in read_rows(rec.dir / "stages" / "b" / "rows.parquet")]
    assert a != b
    assert rec.data["stages"]["a"]["fingerprint"] != rec.data["stages"]["b"]["fingerprint"]


MANY = [[{"role": "user", "content": f"question {i}: " + "why " * (i % 4)}] for i in range(6)]


def test_sampled_rows_do_not_depend_on_batch_size(tmp_path_factory):
    """Each (prompt, sample) row draws from its own stream: batch size 1, 2 or 6, and OOM halving,
    give the same samples at temperature 1."""
    model, tok = load_model("builtin:tiny-chat", cache_root=tmp_path_factory.mktemp("c"))
    params = SamplingParams(n=2, temperature=1.0, top_p=0.95, max_new_tokens=16)
    texts = {}
    for size in (1, 2, 6):
        out = HFBackend(model, tok, batch_size=size).generate(MANY, params, seed=11)
        texts[size] = [[c.text for c in comps] for comps in out]
    assert texts[1] == texts[2] == texts[6]
    assert len({t for row in texts[6] for t in row}) > 6  # really sampled: rows differ


def test_generation_stops_at_the_end_of_turn_token_not_only_eos(tmp_path_factory):
    """Completions are cut at the template's end-of-turn token (test_chatmask checks that a Llama-3
    style template adds <|eot_id|> to its eos <|end_of_text|>)."""
    model, tok = load_model("builtin:tiny-chat", cache_root=tmp_path_factory.mktemp("c"))
    backend = HFBackend(model, tok)
    assert backend.stop_ids == [tok.convert_tokens_to_ids("<|end|>")]
    end = backend.stop_ids[0]
    comp = backend._completion([ord("h"), ord("i"), end, ord("x")], 3, SamplingParams())
    assert comp.text == "hi" and comp.finish_reason == "stop" and comp.completion_tokens == 2


def test_a_prompt_longer_than_the_context_is_a_clear_error(backend):
    from engine.core.errors import RecipeError

    long = [[{"role": "user", "content": "tide " * 900}]]  # 4500 byte tokens; the context is 4096
    with pytest.raises(RecipeError, match=r"a prompt of \d+ tokens .* exceeds the model's context of 4096 tokens"):
        backend.generate(long, SamplingParams(max_new_tokens=8), seed=0)


def test_a_models_shipped_generation_config_does_not_reach_generation(tmp_path_factory):
    # a model may ship repetition_penalty, top_k, temperature (Qwen2.5-Instruct ships 1.05): transformers
    # would fill them into every call; the recipe's settings alone decide, as with vllm and openai
    model, tok = load_model("builtin:tiny-chat", cache_root=tmp_path_factory.mktemp("cache"))
    b = HFBackend(model, tok, batch_size=4)
    greedy, sampled = SamplingParams(temperature=0.0, max_new_tokens=16), SamplingParams(n=2, max_new_tokens=12)
    plain = [b.generate(PROMPTS, p, seed=3) for p in (greedy, sampled)]
    shipped = model.generation_config
    shipped.update(repetition_penalty=3.0, no_repeat_ngram_size=1, top_k=2, temperature=0.3, do_sample=True)
    again = [b.generate(PROMPTS, p, seed=3) for p in (greedy, sampled)]
    assert [[[c.text for c in x] for x in out] for out in again] == [
        [[c.text for c in x] for x in out] for out in plain
    ]
    assert model.generation_config is shipped and shipped.repetition_penalty == 3.0  # given back as it was


def test_a_short_static_batch_after_a_long_one_uses_the_short_bucket(tmp_path_factory):
    model, tok = load_model("builtin:tiny-chat", cache_root=tmp_path_factory.mktemp("cache"))
    b = HFBackend(model, tok, batch_size=4, kv_cache="static")
    params = SamplingParams(temperature=0.0, max_new_tokens=8)
    long = [[{"role": "user", "content": " ".join(["tide"] * 60)}]]
    b.generate(long, params, seed=0)
    size = -(-(len(b._encode(long)[0]) + 8) // 256) * 256
    assert size > 256 and list(b._caches)[-1] == (1, size)
    short = b.generate(PROMPTS[:1], params, seed=0)
    key = list(b._caches)[-1]
    assert key[1] == 256  # transformers alone would keep the 512-slot cache for every later call
    cache = b._caches[key]
    assert b.generate(PROMPTS[:1], params, seed=0) == short and b._caches[key] is cache  # reset and reused
    assert cache.get_seq_length() > 0  # generate filled the cache passed in (not one of its own)
    dynamic = HFBackend(model, tok, batch_size=4, kv_cache="dynamic")
    assert dynamic.generate(PROMPTS[:1], params, seed=0) == short


def test_each_replica_keeps_its_own_thread(tmp_path_factory):
    import threading

    from engine.models.backends.replicas import Replicas

    cache = tmp_path_factory.mktemp("cache")
    reps = [HFBackend(*load_model("builtin:tiny-chat", cache_root=cache), batch_size=2) for _ in range(2)]
    seen: dict[int, set[str]] = {0: set(), 1: set()}
    for i, rep in enumerate(reps):
        real = rep.generate

        def spy(*args, _i=i, _real=real, **kw):
            seen[_i].add(threading.current_thread().name)
            return _real(*args, **kw)

        rep.generate = spy  # type: ignore[method-assign]
    both = Replicas(reps)
    for _ in range(3):
        both.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=4), seed=0)
    both.close()
    assert all(len(names) == 1 for names in seen.values()) and seen[0] != seen[1]


def test_option_logprobs_match_a_full_log_softmax(backend):
    import torch

    options = ["A", "B"]
    got = backend.option_logprobs(PROMPTS, "Verdict: ", options)
    tok = backend.tokenizer
    pre = tok.encode("Verdict: ", add_special_tokens=False)
    for prompt, row in zip(PROMPTS, got):
        head = backend._encode([prompt])[0] + pre
        for option, value in zip(options, row):
            tail = tok.encode("Verdict: " + option, add_special_tokens=False)[len(pre) :]
            with torch.inference_mode():
                logps = torch.log_softmax(backend.model(torch.tensor([head + tail])).logits.float(), -1)[0]
            expected = float(sum(logps[len(head) + j - 1, t] for j, t in enumerate(tail)))
            assert value == pytest.approx(expected, abs=1e-4)
