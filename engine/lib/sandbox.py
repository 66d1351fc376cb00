"""The Jinja sandbox prompt templates render in: attribute access as jinja2's sandbox allows, `**`
and `*` bounded so a template cannot build huge numbers or strings, and the placeholder values
of the trial render `validate` does.
"""

from __future__ import annotations

from jinja2.sandbox import SandboxedEnvironment

MAX_POWER = 10_000  # exponent bound for `**` in templates: 10**(10**7) would run for seconds, 10**(10**9) forever


MAX_ITEMS = 1_000_000  # longest string or list a template may make with `*`


TRIAL_SECONDS = 2.0  # validate's trial render of a template with placeholder values: time


TRIAL_OUTPUT = 10_000_000  # and output (characters): its memory


class _Sandbox(SandboxedEnvironment):
    """Jinja's sandbox, with `**` and `*` bounded: the sandbox itself lets `10**(10**9)` and
    `"a" * 10**9` run. Intercepting them also stops jinja from folding such constants while it
    compiles, which `recipe validate` does when it lists a template's variables."""

    intercepted_binops = frozenset({"**", "*"})

    def call_binop(self, context, operator, left, right):
        from jinja2.exceptions import SecurityError

        if operator == "**" and isinstance(right, (int, float)) and abs(right) > MAX_POWER:
            raise SecurityError(f"the exponent {right} is too large (at most {MAX_POWER})")
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_ITEMS:
                    raise SecurityError(f"`*` would make {len(seq) * n:,} items (at most {MAX_ITEMS:,})")
        return super().call_binop(context, operator, left, right)


class Placeholder:
    """A stand-in for any variable in validate's trial render: every attribute, item and call
    is another placeholder, it iterates once and prints as a word. It cannot make the render
    call into real objects, so what the trial meets is the template's own doing."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return Placeholder()

    def __getitem__(self, key):
        return Placeholder()

    def __call__(self, *args, **kwargs):
        return Placeholder()

    def __iter__(self):
        return iter([Placeholder()])

    def __len__(self) -> int:
        return 1

    def __str__(self) -> str:
        return "placeholder"

    def __bool__(self) -> bool:
        return True
