"""The hf backend on the builtin model: batching, n samples, seeding, stop strings, order."""

from __future__ import annotations

import pytest

from engine.backends import SamplingParams
from engine.backends.hf import HFBackend
from engine.models import load_model

PROMPTS = [[{"role": "user", "content": "hi"}],
           [{"role": "user", "content": "a much longer question about the tides and the moon"}],
           [{"role": "system", "content": "be brief"}, {"role": "user", "content": "why?"}]]


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
    cut = backend.generate(PROMPTS[:1], SamplingParams(n=4, temperature=1.0, max_new_tokens=24, stop=(letter,)), seed=1)[0]
    for full, short in zip(texts, cut):
        if letter in full:
            assert short.text == full[: full.index(letter)].strip() and short.finish_reason == "stop"
