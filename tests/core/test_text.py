"""Tests for engine.core.text: the filter stage's refusal / sycophancy / filler / duplicate rules."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core.dedup import MinHasher, exact_key, jaccard, near_duplicates, shingles
from engine.core.text import (
    FILLER_PHRASES,
    REFUSAL_PHRASES,
    STOPWORDS,
    SYCOPHANCY_PHRASES,
    contains_phrase,
    is_filler,
    is_refusal,
    normalize,
    sycophancy_ratio,
    word_count,
    words,
)

REPO = Path(__file__).resolve().parents[2]
QUESTION = "What is the capital of France?"


def paragraph(seed: int, n: int = 120) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice('bcdfghklmnprst')}{rng.choice('aeiou')}{rng.randrange(10**6)}" for _ in range(n)]


# --- normalize / words -------------------------------------------------------------------


def test_normalize_apostrophes_case_whitespace():
    assert normalize("  I CAN\u2019T\n\t  Help ") == "i can't help"
    assert normalize("\u201cQuoted\u201d \u2018x\u2019") == "\"quoted\" 'x'"
    assert normalize("") == ""


def test_words_and_word_count():
    assert words("Don\u2019t stop: 42 times, caf\u00e9 NA\u00cfVE!") == [
        "don't",
        "stop",
        "42",
        "times",
        "café",
        "naïve",
    ]
    assert words("snake_case 'quoted'") == ["snake", "case", "quoted"]
    assert word_count("one two  three\nfour") == 4
    assert word_count("   ...  ") == 0


def test_phrase_lists_are_normalized_lowercase_tuples():
    for phrases in (REFUSAL_PHRASES, SYCOPHANCY_PHRASES, FILLER_PHRASES):
        assert isinstance(phrases, tuple)
        assert 15 <= len(phrases) <= 60
        assert len(set(phrases)) == len(phrases)
        assert all(p == normalize(p) and p for p in phrases)
    assert "not" not in STOPWORDS and "the" in STOPWORDS


# --- phrases -----------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["Let me measure it.", "Ensure it works", "Surely not", "unsure"])
def test_phrase_word_boundaries_reject_substrings(text):
    assert contains_phrase(text, ("sure",)) is None


@pytest.mark.parametrize("text", ["Sure!", "sure", "OK, SURE.", "'sure' he said", "well\nsure"])
def test_phrase_word_boundaries_accept_whole_words(text):
    assert contains_phrase(text, ("sure",)) == "sure"


def test_contains_phrase_curly_apostrophe_case_whitespace():
    assert contains_phrase("Sorry, I CAN\u2019T   help\nwith that.", REFUSAL_PHRASES) == "sorry, i can't"
    assert contains_phrase("Well, I CAN\u2019T   help\nwith that.", REFUSAL_PHRASES) == "i can't help"
    # the phrase list itself may use curly apostrophes too
    assert contains_phrase("you're absolutely right", ("you\u2019re absolutely right",)) is not None
    assert contains_phrase("nothing here", REFUSAL_PHRASES) is None
    assert contains_phrase("anything", ()) is None
    assert contains_phrase("anything", ("",)) is None


def test_contains_phrase_leftmost_then_longest():
    assert contains_phrase("Of course. Sure.", FILLER_PHRASES) == "of course"
    assert contains_phrase("Sure thing, of course", FILLER_PHRASES) == "sure thing"
    assert contains_phrase("b then a", ["a", "b"]) == "b"


def test_is_refusal():
    assert is_refusal("As an AI, I cannot assist with that request.")
    assert is_refusal("I\u2019m unable to share that.")
    assert not is_refusal("Here is how to bake bread: mix flour and water.")
    assert not is_refusal("The pizza was as an aid to morale.")
    assert not is_refusal("As an AI, I think the capital of France is Paris.")  # a disclaimer, not a refusal
    assert not is_refusal("Bread: " + "mix, knead and wait. " * 20 + "If I'm unable to find yeast, I use starter.")
    assert is_refusal("I'm sorry, but I can't help with making a weapon. I can tell you about safety instead.")
    assert is_refusal("nope nope", phrases=("nope",))
    assert not is_refusal("I can't help with that", phrases=("nope",))


def test_sycophancy_ratio():
    convo = [
        {"role": "system", "content": "Great question! (system text is not counted)"},
        {"role": "user", "content": "You're absolutely right, great question."},
        {"role": "assistant", "content": "Great question! The answer is 4."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "It is 6."},
        {"role": "assistant", "content": "You\u2019re ABSOLUTELY right."},
        {"role": "assistant", "content": "Done."},
    ]
    assert sycophancy_ratio(convo) == pytest.approx(0.5)
    assert sycophancy_ratio(convo[:3]) == 1.0
    assert sycophancy_ratio(convo[3:5]) == 0.0
    assert sycophancy_ratio([{"role": "user", "content": "great question"}]) == 0.0
    assert sycophancy_ratio([]) == 0.0
    assert sycophancy_ratio(convo, phrases=("done",)) == pytest.approx(0.25)


# --- filler ------------------------------------------------------------------------------


def test_filler_examples_from_spec():
    assert is_filler("Sure, happy to help! Let me know.", [])
    assert is_filler("Sure, happy to help! Let me know.", [QUESTION])
    assert not is_filler("Paris.", [QUESTION])
    assert is_filler("Yes, the capital of France.", [QUESTION])


def test_filler_numbers_negation_length():
    assert not is_filler("It is 7.", [QUESTION])  # a single digit is information
    assert is_filler("Yes, 7.", ["Is the answer 7?"])  # ... unless already said
    assert not is_filler("That is not the capital of France.", [QUESTION])
    assert not is_filler("Paris", [])
    assert is_filler("", [QUESTION])
    echo = "the capital of France " * 4  # only old words, but 16 words: not short
    assert word_count(echo) == 16
    assert not is_filler(echo, [QUESTION])
    assert is_filler(echo, [QUESTION], max_words=17)


def test_filler_custom_phrases_and_curly_apostrophes():
    assert is_filler("Gotcha, I\u2019d be happy to.", [], phrases=("gotcha", "i'd be happy to"))
    assert not is_filler("Gotcha.", [])  # "gotcha" is not a built-in filler phrase
    assert is_filler("Gotcha.", ["gotcha"])  # but it is an echo of an earlier turn


# --- shingles / jaccard ------------------------------------------------------------------


def test_shingles():
    assert shingles("A b c d") == {"a b c", "b c d"}
    assert shingles("Hello, world!") == {"hello world"}
    assert shingles("Hello world", n=2) == {"hello world"}
    assert shingles("") == {""} == shingles("   \n")
    assert shingles("!!!") == {"!!!"}
    assert shingles("one two three four", n=1) == {"one", "two", "three", "four"}


def test_jaccard_values():
    assert jaccard({"a", "b"}, {"b", "c"}) == pytest.approx(1 / 3)
    assert jaccard(set(), set()) == 1.0
    assert jaccard({"a"}, set()) == 0.0


sets = st.sets(st.text(max_size=5), max_size=20)


@settings(max_examples=200, deadline=None)
@given(sets, sets)
def test_jaccard_properties(a, b):
    j = jaccard(a, b)
    assert 0.0 <= j <= 1.0
    assert j == jaccard(b, a)
    assert jaccard(a, a) == 1.0
    assert (j == 1.0) == (a == b)


# --- MinHash -----------------------------------------------------------------------------


def test_minhasher_deterministic_and_seeded():
    s = shingles(" ".join(paragraph(1)))
    sig = MinHasher(64, seed=0).signature(s)
    assert len(sig) == 64 and all(isinstance(v, int) and 0 <= v < 2**61 - 1 for v in sig)
    assert sig == MinHasher(64, seed=0).signature(set(s))
    assert sig != MinHasher(64, seed=1).signature(s)
    assert MinHasher(8).signature(set()) == MinHasher(8).signature([])
    with pytest.raises(ValueError):
        MinHasher(0)


def test_minhash_agreement_estimates_jaccard():
    base = [f"s{i}" for i in range(300)]
    a, b = set(base[:200]), set(base[100:])  # true Jaccard 100/300
    hasher = MinHasher(512, seed=3)
    sa, sb = hasher.signature(a), hasher.signature(b)
    estimate = sum(x == y for x, y in zip(sa, sb)) / 512
    assert estimate == pytest.approx(jaccard(a, b), abs=0.08)


# --- near duplicates ---------------------------------------------------------------------


def test_near_duplicates_one_word_change_keeps_first():
    text = paragraph(7)
    copy = list(text)
    copy[60] = "changed"
    unrelated = [" ".join(paragraph(s)) for s in (8, 9)]
    texts = [unrelated[0], " ".join(text), unrelated[1], " ".join(copy).upper()]
    assert jaccard(shingles(texts[1]), shingles(texts[3])) >= 0.9
    assert near_duplicates(texts) == {3: 1}
    assert near_duplicates(texts[::-1]) == {2: 0}  # order decides which one is kept
    assert near_duplicates(unrelated) == {}


def test_near_duplicates_match_only_kept_rows():
    a = paragraph(11, 100)
    b = list(a)
    for i in (10, 30, 50, 70):
        b[i] = f"b{i}"
    c = list(b)
    for i in (20, 40, 60, 80):
        c[i] = f"c{i}"
    sa, sb, sc = (shingles(" ".join(x)) for x in (a, b, c))
    assert jaccard(sa, sb) >= 0.7 and jaccard(sb, sc) >= 0.7 and jaccard(sa, sc) < 0.7
    # c is close to b, but b was dropped as a copy of a, and c is not close to a: keep c.
    texts = [" ".join(x) for x in (a, b, c)]
    assert near_duplicates(texts, threshold=0.7) == {1: 0}
    assert near_duplicates(texts, threshold=0.95) == {}
    # b is close to both a and c, which are both kept: it points at the earlier one
    texts = [" ".join(x) for x in (a, c, b)]
    assert near_duplicates(texts, threshold=0.7) == {2: 0}


def test_near_duplicates_exact_copies_and_empty_texts():
    para = " ".join(paragraph(3))
    texts = ["", para, "  \n", "short one", para, "Short, one!", "x", ""]
    assert near_duplicates(texts) == {2: 0, 4: 1, 5: 3, 7: 0}
    assert near_duplicates([]) == {}


def test_near_duplicates_rejects_bad_parameters():
    with pytest.raises(ValueError):
        near_duplicates(["a"], num_perm=64, bands=10)
    with pytest.raises(ValueError):
        near_duplicates(["a"], threshold=0.0)


def test_near_duplicates_many_rows_finds_planted_copies():
    rng = random.Random(5)
    texts = [" ".join(paragraph(1000 + i, 40)) for i in range(2000)]
    planted = {}
    for _k in range(50):
        src = rng.randrange(len(texts))
        while src in planted:  # copy only originals, so the expected source is exact
            src = rng.randrange(len(texts))
        ws = texts[src].split()
        ws[rng.randrange(len(ws))] = "edited"
        planted[len(texts)] = src
        texts.append(" ".join(ws))
    assert near_duplicates(texts, threshold=0.8) == planted


DETERMINISM_SCRIPT = """
import json, sys
from engine.core.dedup import near_duplicates
texts = json.loads(sys.stdin.read())
print(json.dumps(sorted(near_duplicates(texts, threshold=0.6).items())))
"""


def test_near_duplicates_deterministic_across_hash_seeds():
    rng = random.Random(2)
    texts = []
    for i in range(60):
        ws = paragraph(i % 20, 30)
        for _ in range(rng.randrange(6)):
            ws[rng.randrange(30)] = f"e{rng.randrange(99)}"
        texts.append(" ".join(ws))
    here = sorted(near_duplicates(texts, threshold=0.6).items())
    assert here and here == sorted(near_duplicates(texts, threshold=0.6).items())
    for hashseed in ("1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": hashseed, "PYTHONPATH": str(REPO)}
        out = subprocess.run(
            [sys.executable, "-c", DETERMINISM_SCRIPT],
            input=json.dumps(texts),
            capture_output=True,
            text=True,
            cwd=REPO,
            env=env,
            check=True,
        )
        assert [tuple(p) for p in json.loads(out.stdout)] == here


# --- exact key ---------------------------------------------------------------------------


def test_exact_key():
    convo = [
        {"role": "user", "content": "What is  the capital\nof France?"},
        {"role": "assistant", "content": "Paris, I\u2019d say."},
    ]
    reformatted = [
        {"role": "User", "content": "  what is the CAPITAL of france? "},
        {"role": "assistant", "content": "paris,   i'd say.\n"},
    ]
    key = exact_key(convo)
    assert len(key) == 64 and int(key, 16) >= 0
    assert key == exact_key(reformatted)
    swapped = [{"role": "assistant", "content": convo[0]["content"]}, convo[1]]
    assert key != exact_key(swapped)
    assert key != exact_key([convo[0], {"role": "assistant", "content": "Lyon, I'd say."}])
    assert key != exact_key(convo[:1])
    # turn boundaries matter: two turns are not one turn with the text joined
    joined = [{"role": "user", "content": "a b"}]
    split = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    assert exact_key(joined) != exact_key(split)
