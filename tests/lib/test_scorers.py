"""Builtin function scorers: reply_quality (math_answer is tested with rejection_sample)."""

from hypothesis import given
from hypothesis import strategies as st

from engine.lib.verifiers import names, reply_quality, resolve


def row(reply: str, question: str = "How do I boil an egg so it peels easily?") -> dict:
    return {"id": "r", "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]}


GOOD = "Put the egg in boiling water for eight minutes, then cool it in cold water so the shell comes off cleanly."


def test_reply_quality_orders_replies_as_its_checks_say():
    assert reply_quality(row(GOOD)) == 1.0
    assert reply_quality(row("")) == 0.0
    assert reply_quality(row("Great question! " + GOOD)) == 0.75  # flattery
    # short, and filler (only restates the question) costs a quarter more than a short answer
    assert reply_quality(row("Sure, boil an egg.")) == reply_quality(row("Boil it eight minutes.")) - 0.25
    looping = " ".join(["boil the egg"] * 30)
    assert reply_quality(row(looping)) < reply_quality(row(GOOD)) - 0.2
    assert reply_quality(row(" ".join(f"w{i}" for i in range(600)))) == 0.75  # far too long
    assert reply_quality({"id": "x", "messages": [{"role": "user", "content": "hi"}]}) is None


@given(st.text(max_size=400))
def test_reply_quality_is_a_deterministic_score_in_the_unit_interval(text):
    score = reply_quality(row(text))
    assert 0.0 <= score <= 1.0 and score == reply_quality(row(text))


def test_builtins_resolve_by_name():
    assert {"math_answer", "reply_quality"} <= set(names())
    assert resolve("reply_quality") is reply_quality
