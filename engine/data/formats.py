"""The shapes of a conversation or a preference pair the loader accepts, made one shape:
`[{role, content}]` with roles system / user / assistant. ShareGPT `{from, value}` entries and the
role names of other formats (human, gpt, bot, model) are mapped; HH-style preference pairs (two
whole conversations, or two "Human: ... Assistant: ..." transcripts, sharing a prefix) are split
into the shared prompt and the two replies. docs/data-formats.md shows each shape.
"""

from __future__ import annotations

import re

ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}  # ShareGPT, Gemini
HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]*")  # Anthropic HH transcripts


def check_messages(messages, *, require_assistant: bool = True) -> str | None:
    """None if `messages` is a usable conversation, else a short reason (a report key)."""
    if not isinstance(messages, list) or not messages:
        return "not a list of messages"
    roles = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            return "not a list of messages"
        role, content = m["role"].strip().lower(), m.get("content")
        if role not in ROLES:
            return f"unknown role '{m['role']}'"
        if content is not None and not isinstance(content, str):
            return "not a list of messages"
        if not (content or "").strip():
            return "empty content"
        roles.append(role)
    if "system" in roles[1:]:
        return "system message not first"
    turns = roles[1:] if roles[0] == "system" else roles
    if not turns or turns[0] != "user":
        return "does not start with a user turn"
    if any(r != ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(turns)):
        return "roles do not alternate"
    if require_assistant and "assistant" not in turns:
        return "no assistant turn"
    return None


def normalize_messages(messages, *, require_assistant: bool = True) -> list[dict]:
    """[{role, content}] with lowercase roles and stripped content; ValueError(reason) if unusable."""
    reason = check_messages(messages, require_assistant=require_assistant)
    if reason:
        raise ValueError(reason)
    return [{"role": m["role"].strip().lower(), "content": m["content"].strip()} for m in messages]


def canonical_messages(conv):
    """ShareGPT `{from, value}` entries as `{role, content}`, and the role names of other formats
    (human, gpt, bot, model) as user / assistant; anything else is left for check_messages."""
    if not isinstance(conv, list):
        return conv
    out = []
    for m in conv:
        if isinstance(m, dict):
            if "from" in m and "role" not in m:
                m = {"role": m["from"], "content": m.get("value")}
            role = m.get("role")
            if isinstance(role, str) and role.strip().lower() in ROLE_ALIASES:
                m = {**m, "role": ROLE_ALIASES[role.strip().lower()]}
        out.append(m)
    return out


def hh_transcript(text: str) -> list[dict] | None:
    """An HH-style transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") as messages; None if it has no
    such turns."""
    parts = HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        return None
    return [
        {"role": "user" if who == "Human" else "assistant", "content": content}
        for who, content in zip(parts[1::2], parts[2::2])
    ]


def split_shared_prefix(chosen, rejected):
    """Preferences given as two whole conversations (HH-style, or TRL's implicit prompt): (prompt,
    chosen tail, rejected tail), the prompt being the shared prefix up to its last user turn; or
    a drop reason."""
    as_conv = lambda v: hh_transcript(v) if isinstance(v, str) else canonical_messages(v)  # noqa: E731
    c, r = as_conv(chosen), as_conv(rejected)
    if not isinstance(c, list) or not isinstance(r, list):
        return "no prompt column, and chosen/rejected are not conversations"
    n = 0
    while n < min(len(c), len(r)) and c[n] == r[n]:
        n += 1
    while n > 0 and not (isinstance(c[n - 1], dict) and str(c[n - 1].get("role", "")).strip().lower() == "user"):
        n -= 1
    if n == 0:
        return "chosen and rejected share no prompt"
    return c[:n], c[n:], r[n:]
