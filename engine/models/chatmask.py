"""Assistant-only loss for any chat template: which characters of a rendered conversation the
model must learn to emit, and the token that ends its turn.

Three ways to get the assistant mask, tried in this order (`masking`):

1. `markers`: the template already wraps assistant text in `{% generation %}...{% endgeneration %}`;
   TRL's `assistant_only_loss` uses it as is.
2. `trl`: TRL ships a training version of this exact template (Llama-3, Qwen2.5, Gemma, Phi-3, ...);
   the sft stage swaps it in. Found by comparing against TRL's template files, without importing trl.
3. `derived`: any other template. The conversation is rendered one message at a time: for each
   assistant turn k, rendering the messages before it with the generation prompt gives the text
   the model is prompted with, and rendering through turn k gives the text after it; the
   difference is what the model emits (its content and end-of-turn marker; trailing whitespace
   is left out). The full rendering is then tokenized with offsets and a token is supervised
   when it overlaps such a span.

A template can be masked by rendering only when it is prefix-stable: each partial rendering is a
prefix of the whole conversation's rendering (a template that moves the system prompt into the
last user turn, or drops earlier turns' reasoning, is not), and the assistant's content appears
in its span. Otherwise `assistant_spans` raises `TemplateProblem` naming the turn and what
differs, and `recipe validate` reports it with the model's name. The sft stage's saved mask
check (decoding the supervised tokens of a real batch) stays the judge on every run.

Rendering at validate time uses jinja2 the way transformers does (sandboxed, trim_blocks,
lstrip_blocks, loopcontrols, raise_exception, tojson), so no ML library is imported.

The saved mask check (`mask_check`, run by the sft stage before step 1): one real collated batch
from the trainer's own pipeline, its supervised tokens decoded to `mask_check.txt`; they must be
exactly the assistant turns plus their end-of-turn token, or the stage fails with FIX_TEMPLATE.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import re
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path

from engine.core.errors import first_line

Messages = list[dict]
Render = Callable[[Messages, bool], str]  # (messages, add_generation_prompt) -> text

_MARKERS = re.compile(r"\{%-?\s*generation\s*-?%\}")

# Probe conversations: distinct contents that no template text contains.
PROBE_SYSTEM = [
    {"role": "system", "content": "Probe system text, alpha."},
    {"role": "user", "content": "Probe user text, bravo?"},
    {"role": "assistant", "content": "Probe reply text, charlie."},
    {"role": "user", "content": "Probe user text, delta?"},
    {"role": "assistant", "content": "Probe reply text, echo."},
]
PROBE_PLAIN = PROBE_SYSTEM[1:]


class TemplateProblem(ValueError):
    """A chat template whose assistant turns cannot be located by rendering; the message says why."""


def has_generation_markers(template: str | None) -> bool:
    return bool(template) and bool(_MARKERS.search(template))  # type: ignore[arg-type]


@lru_cache(maxsize=1)
def _trl_templates() -> dict[str, str]:
    """TRL's chat templates that have a training version: template text -> training template text.
    Read from TRL's package folder without importing trl (validate stays light)."""
    try:
        spec = importlib.util.find_spec("trl")
    except (ImportError, ValueError):
        return {}
    if spec is None or not spec.submodule_search_locations:
        return {}
    folder = Path(next(iter(spec.submodule_search_locations))) / "chat_templates"
    out = {}
    for training in folder.glob("*_training.jinja"):
        plain = training.with_name(training.name.replace("_training.jinja", ".jinja"))
        if plain.is_file():
            out[plain.read_text(encoding="utf-8")] = training.read_text(encoding="utf-8")
    return out


def trl_training_template(template: str | None) -> str | None:
    """TRL's training version of `template` when TRL ships one for exactly this template."""
    return _trl_templates().get(template) if template else None


def masking(template: str | None, render: Render, special: Sequence[str] = ()) -> str:
    """'markers', 'trl' or 'derived' (see the module docstring); TemplateProblem when none works."""
    if not template:
        raise TemplateProblem("the model has no chat template")
    if has_generation_markers(template):
        return "markers"
    if trl_training_template(template):
        return "trl"
    check_renders(render, special)
    return "derived"


def check_renders(render: Render, special: Sequence[str] = ()) -> None:
    """Derive the spans of the probe conversations (with a system message, and without one when the
    template refuses system messages); TemplateProblem when the template cannot be masked."""
    try:
        assistant_spans(render, PROBE_SYSTEM, closing_suffix(render, special))
        return
    except TemplateProblem:
        raise
    except Exception:
        pass  # a template without system messages is fine: the data then must not have any
    try:
        assistant_spans(render, PROBE_PLAIN, closing_suffix(render, special))
    except TemplateProblem:
        raise
    except Exception as exc:
        raise TemplateProblem(f"rendering a user/assistant conversation failed: {first_line(exc)}") from None


def closing_suffix(render: Render, special: Sequence[str] = ()) -> str:
    """What the template appends only at the very end of a conversation (Phi-3 closes it with its
    eos token): a special token at the end of a one-exchange rendering that a longer conversation
    does not have there. '' when there is none (or the template fails on the probe)."""
    try:
        one = render(PROBE_PLAIN[:2], False)
        two = render(PROBE_PLAIN, False)
    except Exception:
        return ""
    if two.startswith(one):
        return ""
    body = one.rstrip()
    for token in sorted((t for t in special if t), key=len, reverse=True):
        if body.endswith(token) and two.startswith(body[: -len(token)]):
            return one[len(body) - len(token) :]
    return ""


def assistant_spans(render: Render, messages: Messages, closing: str = "") -> tuple[str, list[tuple[int, int]]]:
    """(the whole conversation's rendering, [start, end) character spans the model must emit, one per
    assistant turn). `closing`: what the template appends at the end of a conversation (never a
    turn's own). TemplateProblem when the template is not prefix-stable or rewrites a reply."""
    full = render(messages, False)
    spans = []
    for k, i in enumerate(i for i, m in enumerate(messages) if m["role"] == "assistant"):
        before = render(messages[:i], True)
        through = render(messages[: i + 1], False)
        if closing and through.endswith(closing):
            through = through[: -len(closing)]
        if not through.startswith(before):
            raise TemplateProblem(
                f"not prefix-stable at assistant turn {k}: the prompt the model is given ({_tail(before)}) is not "
                f"the start of the rendering with its reply ({_tail(through)})"
            )
        if not full.startswith(through):
            raise TemplateProblem(
                f"not prefix-stable at assistant turn {k}: rendering the conversation through that turn is not the "
                "start of the whole conversation's rendering (the template changes earlier turns when later ones "
                "are added, e.g. moves the system prompt or drops earlier reasoning)"
            )
        body = through[len(before) :]
        content = messages[i]["content"].strip()
        at = body.find(content) if content else len(body) - len(body.lstrip())
        if at < 0:
            raise TemplateProblem(
                f"assistant turn {k}'s text does not appear in its rendering (the template "
                "rewrites or drops assistant content)"
            )
        # What the model emits after its generation prompt: leading whitespace included, a role header
        # that the generation prompt lacks excluded; trailing whitespace (a newline between turns) left out.
        start = 0 if not body[:at].strip() else at
        end = len(body.rstrip())
        if content and end <= at + len(content):
            raise TemplateProblem(
                f"assistant turn {k} has no end-of-turn marker after its text: the model could not learn when to stop"
            )
        spans.append((len(before) + start, len(before) + end))
    return full, spans


def end_of_turn(render: Render, special: Sequence[str] = ()) -> str | None:
    """The marker that ends an assistant turn (e.g. '<|im_end|>', '<|eot_id|>', '</s>'), or None."""
    try:
        text, spans = assistant_spans(render, PROBE_PLAIN, closing_suffix(render, special))
    except Exception:
        return None
    a, b = spans[0]
    reply = PROBE_PLAIN[1]["content"]
    tail = text[a:b]
    tail = tail[tail.find(reply) + len(reply) :].strip() if reply in tail else ""
    return tail or None


def _tail(text: str, n: int = 60) -> str:
    return repr(text[-n:])


# --------------------------------------------------------------------------- rendering


def tokenizer_render(tok) -> Render:
    """Render with the tokenizer's own chat template (what training and generation see)."""

    def render(messages: Messages, add_generation_prompt: bool) -> str:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    return render


def jinja_render(template: str, special: dict[str, str] | None = None) -> Render:
    """Render `template` with jinja2 as transformers does, with no ML library imported."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):  # {% generation %}...{% endgeneration %}: rendered as is
        tags = {"generation"}  # noqa: RUF012 - jinja2 reads the class attribute

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        from datetime import datetime

        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    compiled = env.from_string(template)
    tokens = dict(special or {})

    def render(messages: Messages, add_generation_prompt: bool) -> str:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **tokens)

    return render


# --------------------------------------------------------------------------- tokens


def masked_ids(tok, messages: Messages) -> tuple[list[int], list[int]]:
    """(input_ids, assistant mask) of a conversation, by the `derived` method: the rendering is
    tokenized with offsets and a token is supervised when its characters overlap a span."""
    render = tokenizer_render(tok)
    special = tok.convert_ids_to_tokens(sorted(special_ids(tok)))
    text, spans = assistant_spans(render, messages, closing_suffix(render, special))
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, mask = list(enc["input_ids"]), []
    for s, e in enc["offset_mapping"]:
        mask.append(int(any(s < b and e > a for a, b in spans) if e > s else False))
    return ids, mask


def special_ids(tok) -> set[int]:
    """The tokenizer's special tokens: its named ones and every added token marked special (a
    template's <end_of_turn> or <|eot_id|> is often only the latter)."""
    ids = set(tok.all_special_ids)
    for i, added in (getattr(tok, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            ids.add(int(i))
    return ids


def stop_token_ids(tok, generation_eos=None) -> list[int]:
    """Token ids that end generation: the tokenizer's eos, the model's generation eos (one id or a
    list), and the template's end-of-turn marker when it is a single special token."""
    ids: list[int] = []
    for value in (tok.eos_token_id, generation_eos):
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    marker = None
    if getattr(tok, "chat_template", None):
        marker = end_of_turn(tokenizer_render(tok), tok.convert_ids_to_tokens(sorted(special_ids(tok))))
    if marker:
        enc = tok.encode(marker, add_special_tokens=False)
        if enc and enc[0] in special_ids(tok) and enc[0] not in ids:
            ids.append(enc[0])
    return ids


# --------------------------------------------------------------------------- model folders


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def folder_template(folder: Path) -> tuple[str | None, dict[str, str]]:
    """(chat template, special tokens) of a saved tokenizer folder, read as files: the template
    from chat_template.jinja or tokenizer_config.json, the tokens from tokenizer_config.json."""
    folder = Path(folder)
    config: dict = {}
    with contextlib.suppress(OSError, ValueError):
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    template = None
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    elif isinstance(config.get("chat_template"), str):
        template = config["chat_template"]
    elif isinstance(config.get("chat_template"), list):  # named variants: the default one
        named = {t.get("name"): t.get("template") for t in config["chat_template"] if isinstance(t, dict)}
        template = named.get("default")
    special = {
        k: t
        for k in ("bos_token", "eos_token", "unk_token", "pad_token")
        if (t := _token_text(config.get(k))) is not None
    }
    return template, special


FIX_TEMPLATE = (
    "Fix the chat template (set chat_template in the model's [models] table): wrap each assistant "
    "message's content AND its end-of-turn token in {% generation %}...{% endgeneration %}, e.g. "
    "\"<|assistant|>{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}\", "
    "and keep system and user turns outside it."
)


# --------------------------------------------------------------------------- the saved mask check (sft)
