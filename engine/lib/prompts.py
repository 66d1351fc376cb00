"""Prompt templates: Jinja2 files found by name, rendered in a sandbox, checked before compute.

Templates are looked up by name in the recipe's own template directories first, then in the
built-in `templates/` folder at the repository top, so a recipe can shadow a built-in by
shipping a file of the same name. Rendering is sandboxed (recipes come from other people) and
strict (`StrictUndefined`: a misspelt variable is an error, never an empty string). Before any
compute, `check` compares the variables a template uses with those its stage passes, so a
typo fails `recipe validate`, not hour three of a run.

Optional variables: a variable the template tests with `is defined` / `is undefined`, or
filters with `default`, counts as optional and is not required by `check`.

Chat convention (`render_chat`): a line that is exactly `### system`, `### user` or
`### assistant` (at the start of the line, case as shown, nothing after it but spaces) starts
a message with that role; the message runs to the next marker line. Contents are stripped and
must not be empty. Non-blank text before the first marker is an error. A text with no marker
at all is one user message. Data put into a chat template should go through the
`escape_markers` filter, which turns a marker line inside the data into `\\### user`, so a
conversation quoted in a prompt can never open a message of its own.
"""

from __future__ import annotations

import difflib
import re
import traceback
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import meta, nodes

from engine.core.errors import Problem, RecipeError
from engine.core.shipped import shipped
from engine.lib.sandbox import TRIAL_OUTPUT, TRIAL_SECONDS, Placeholder, _Sandbox

BUILTIN_DIR = shipped("templates")
ROLES = ("system", "user", "assistant")
MARKER = re.compile(rf"^### ({'|'.join(ROLES)})[ \t\r]*$", re.MULTILINE)
_REFS = (nodes.Extends, nodes.Include, nodes.Import, nodes.FromImport)


class TemplateRenderError(Exception):
    """A template failed while rendering: which template (the innermost, for includes), the
    template line when known, and the cause. Raised per row, so stages can report it."""

    def __init__(self, template: str, line: int | None, message: str) -> None:
        self.template, self.line, self.message = template, line, message
        super().__init__(f"template {template}" + (f" line {line}" if line else "") + f": {message}")


def escape_markers(value: Any) -> str:
    """Filter: make marker lines inside data inert (`### user` -> `\\### user`)."""
    return MARKER.sub(lambda m: "\\" + m.group(0), str(value))


class Templates:
    """Named templates over `search` (recipe-local dirs, earliest wins) then the built-ins, then
    `base` (the recipe's folder): `template = "prompts/ask.j2"` is a path relative to the recipe.
    Jinja's loader refuses `..` and absolute names, so nothing outside these folders is read."""

    def __init__(self, search: list[Path], base: Path | None = None) -> None:
        self.search = [Path(p) for p in search] + [BUILTIN_DIR]
        self.base = Path(base) if base is not None else None
        loaders = [jinja2.FileSystemLoader([str(p) for p in self.search])]
        if self.base is not None:
            loaders.append(jinja2.FileSystemLoader([str(self.base)]))
        self.env = _Sandbox(
            loader=jinja2.ChoiceLoader(loaders),
            undefined=jinja2.StrictUndefined,
            autoescape=False,
            keep_trailing_newline=True,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters["escape_markers"] = escape_markers

    # ------------------------------------------------------------------ lookup

    @classmethod
    def for_recipe(cls, recipe) -> Templates:
        """The templates a recipe sees: its templates/ folder, the built-ins, paths relative to it."""
        return cls([recipe.dir / "templates"], base=recipe.dir)

    def names(self) -> list[str]:
        """Every template name available in the template folders (not every file of the recipe's)."""
        return sorted(set(self.env.loader.loaders[0].list_templates()))  # type: ignore[union-attr]

    def path(self, name: str) -> Path:
        """The file `name` resolves to: the first search dir holding it, else the recipe's folder."""
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise RecipeError.single(
                f"template '{name}' is outside the recipe: templates are named relative to the recipe's "
                "templates/ folder or to the recipe file, never by an absolute path or with '..'.",
                hint="Copy the template next to the recipe (or into its templates/ folder) and name it from there.",
            )
        try:
            return Path(self.env.loader.get_source(self.env, name)[1])  # type: ignore[arg-type, union-attr]
        except jinja2.TemplateNotFound:
            names = self.names()
            close = difflib.get_close_matches(name, names, n=1)
            dirs = ", ".join(str(p) for p in self.search)
            relative = f"; and relative to the recipe, {self.base / name}" if self.base is not None else ""
            raise RecipeError.single(
                f"template '{name}' not found (searched, in order: {dirs}{relative}).",
                hint=(f"Did you mean '{close[0]}'? " if close else "") + f"Available: {', '.join(names) or 'none'}.",
            ) from None
        except OSError as exc:
            raise RecipeError.single(
                f"template '{name}' is unreadable: {exc.strerror or exc}"
                + (f" ({exc.filename})" if getattr(exc, "filename", None) else "")
                + ".",
                hint="Check the file's permissions (it must be readable by this user) and that it is a file.",
            ) from None

    def source(self, name: str) -> str:
        return self.path(name).read_text(encoding="utf-8")

    def source_bytes(self, name: str) -> bytes:
        """The file's exact bytes, for fingerprints. Pair with `closure` to hash includes too."""
        return self.path(name).read_bytes()

    def _name_of(self, filename: str) -> str:
        """Template name for a file jinja reports, so errors say `a.j2`, not a long path."""
        for d in self.search:
            try:
                return Path(filename).resolve().relative_to(d.resolve()).as_posix()
            except ValueError:
                continue
        return filename

    # ------------------------------------------------------------------ rendering

    def render(self, name: str, /, **variables: Any) -> str:
        """Render `name`. Any failure inside a template is a `TemplateRenderError` naming the
        template and line; only a missing top-level template is a `RecipeError` (a config fault)."""
        return self._render(name, None, variables)

    def _render(self, name: str, limit: int | None, variables: dict) -> str:
        """The rendered text; with `limit`, a trial: the output is counted (at most `limit`), not kept."""
        try:
            if limit is None:
                return self.env.get_template(name).render(**variables)
            size = 0  # a trial render: the output is only counted, never kept
            for part in self.env.get_template(name).generate(**variables):
                size += len(part)
                if size > limit:
                    raise MemoryError(f"the output passed {limit:,} characters")
            return ""
        except jinja2.TemplateSyntaxError as exc:  # this template or one it includes
            raise TemplateRenderError(exc.name or name, exc.lineno, exc.message or str(exc)) from exc
        except Exception as exc:  # undefined, security, TypeError in an expression, missing include
            if isinstance(exc, jinja2.TemplateNotFound) and exc.name == name:
                self.path(name)  # the top-level template is missing: the user's RecipeError, with a listing
            frames = [f for f in traceback.walk_tb(exc.__traceback__) if "__jinja_exception__" in f[0].f_globals]
            where, line = (self._name_of(frames[-1][0].f_code.co_filename), frames[-1][1]) if frames else (name, None)
            raise TemplateRenderError(where, line, f"{type(exc).__name__}: {exc}") from exc

    def render_chat(self, name: str, /, **variables: Any) -> list[dict[str, str]]:
        """Render, then split into `{role, content}` messages by the marker convention above."""
        text = self.render(name, **variables)
        marks = list(MARKER.finditer(text))
        if not marks:
            if not text.strip():
                raise TemplateRenderError(name, None, "rendered to empty text; no message.")
            return [{"role": "user", "content": text.strip()}]
        head = text[: marks[0].start()].strip()
        if head:
            raise TemplateRenderError(
                name,
                None,
                f"text before the first '### <role>' marker line: "
                f"{head[:60]!r}. Start the template with '### system' or '### user'.",
            )
        messages = []
        for i, m in enumerate(marks):
            end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
            content = text[m.end() : end].strip()
            if not content:
                raise TemplateRenderError(name, None, f"message {i + 1} ('### {m.group(1)}') is empty.")
            messages.append({"role": m.group(1), "content": content})
        return messages

    # ------------------------------------------------------------------ static checks

    def _parse(self, name: str) -> nodes.Template:
        return self.env.parse(self.source(name), name, str(self.path(name)))

    def _exists(self, name: str) -> bool:
        try:
            self.env.loader.get_source(self.env, name)  # type: ignore[union-attr]
            return True
        except jinja2.TemplateNotFound:
            return False

    def _pulled(self, ast: nodes.Template) -> list[tuple[int, str]]:
        """(line, name) of each template `ast` pulls in by a constant name: a string, a list
        (the first that exists, as jinja picks), or both branches of `a if c else b`. Like
        `meta.find_referenced_templates`, plus line numbers and conditional names."""
        out: list[tuple[int, str]] = []
        for ref in ast.find_all(_REFS):
            expr = ref.template  # type: ignore[attr-defined]
            for opt in [expr.expr1, expr.expr2] if isinstance(expr, nodes.CondExpr) else [expr]:
                items = opt.items if isinstance(opt, (nodes.Tuple, nodes.List)) else [opt]
                names = [i.value for i in items if isinstance(i, nodes.Const) and isinstance(i.value, str)]
                if not names or len(names) != len(items):
                    continue  # a dynamic name: the variables in it are free variables already
                found = [n for n in names if self._exists(n)]
                if found or not getattr(ref, "ignore_missing", False):
                    out.append((ref.lineno, (found or names)[0]))  # missing: path() reports it
        return out

    def _uses(self, name: str, seen: frozenset[str] = frozenset()) -> dict[str, tuple[int, str | None]]:
        """Variable -> (first line in `name`, 'inner.j2 line N' when it comes from a pulled-in
        template, else None). A pulled-in template's variables count at the line of the
        include/extends/import, minus names `name` binds itself (a loop variable an include uses)."""
        ast = self._parse(name)
        free = meta.find_undeclared_variables(ast)
        out: dict[str, tuple[int, str | None]] = {}
        for node in ast.find_all(nodes.Name):
            if node.ctx == "load" and node.name in free and node.lineno < out.get(node.name, (1 << 30,))[0]:
                out[node.name] = (node.lineno, None)
        bound = {n.name for n in ast.find_all(nodes.Name) if n.ctx in ("store", "param")}
        for at, inner in self._pulled(ast):
            if inner in seen or inner == name:
                continue
            for var, (line, via) in self._uses(inner, seen | {name}).items():
                if var not in bound and at < out.get(var, (1 << 30,))[0]:
                    out[var] = (at, via or f"{inner} line {line}")
        return out

    def free_variables(self, name: str) -> dict[str, int]:
        """Each variable the template (and what it includes/extends/imports) needs from the
        caller -> the first line of `name` where it is needed."""
        return {var: line for var, (line, _) in sorted(self._uses(name).items())}

    def optional_variables(self, name: str) -> set[str]:
        """Variables guarded with `is defined`/`is undefined` or given a `default`, here or in
        a pulled-in template: `check` does not require them."""
        return {
            n.node.name
            for cur in self.closure(name)
            for n in self._parse(cur).find_all((nodes.Test, nodes.Filter))
            if n.name in (("defined", "undefined") if isinstance(n, nodes.Test) else ("default", "d"))
            and isinstance(n.node, nodes.Name)
        }

    def closure(self, name: str) -> list[str]:
        """`name` and every template it pulls in, in discovery order (hash them all in a
        fingerprint: editing an included file must invalidate the stage)."""
        order, todo = [], [name]
        while todo:
            cur = todo.pop(0)
            if cur not in order:
                order.append(cur)
                todo += [inner for _, inner in self._pulled(self._parse(cur))]
        return order

    def check(
        self,
        name: str,
        available: set[str],
        *,
        stage: str,
        key: str | None = None,
        file: str | None = None,
        line: int | None = None,
    ) -> list[Problem]:
        """Problems if the template is missing, does not parse, or needs a variable the stage
        does not pass. `file`/`line`/`key` locate the recipe setting that chose the template."""
        try:
            uses, optional = self._uses(name), self.optional_variables(name)
        except RecipeError as exc:
            return [Problem(p.message, file=file, line=line, key=key, hint=p.hint) for p in exc.problems]
        except jinja2.TemplateSyntaxError as exc:
            return [
                Problem(
                    f"template {exc.name or name} line {exc.lineno}: syntax error: {exc.message}",
                    file=exc.filename,
                    line=exc.lineno,
                    key=key,
                )
            ]
        listing = ", ".join(sorted(available)) or "none"
        problems = [
            Problem(
                f"template {name} line {at} uses '{var}'"
                + (f" (in {via})" if via else "")
                + f", which stage '{stage}' does not pass. Available: {listing}.",
                file=file,
                line=line,
                key=key,
            )
            for var, (at, via) in sorted(uses.items(), key=lambda kv: (kv[1][0], kv[0]))
            if var not in available and var not in optional
        ]
        if not problems and (why := self.trial(name, available)) is not None:
            problems.append(
                Problem(
                    why,
                    file=file,
                    line=line,
                    key=key,
                    hint="Templates run in a sandbox: no attributes starting with '_', no huge "
                    "numbers or strings, nothing that runs for long.",
                )
            )
        return problems

    def trial(self, name: str, available: set[str]) -> str | None:
        """Render `name` once in the sandbox with a placeholder for every variable, within
        TRIAL_SECONDS: what the sandbox blocks (`__class__`, `10**10**9`, `"a" * 10**9`) or a
        render that does not end is reported now, with the template line, not at run time.
        Other errors depend on real data (a placeholder is not a number) and are left to the run."""
        import signal
        import threading

        from jinja2.exceptions import SecurityError

        def too_long(signum, frame):
            raise TimeoutError(f"rendering took more than {TRIAL_SECONDS:g} s")

        import time

        timed = threading.current_thread() is threading.main_thread()
        if timed:  # an outer timer (pytest-timeout, the caller's) is put back afterwards
            previous = signal.signal(signal.SIGALRM, too_long)
            outer, _ = signal.setitimer(signal.ITIMER_REAL, TRIAL_SECONDS)
            started = time.monotonic()
        try:
            self._render(name, TRIAL_OUTPUT, {v: Placeholder() for v in available})
        except TemplateRenderError as exc:
            cause = exc.__cause__
            if isinstance(cause, (SecurityError, TimeoutError, MemoryError, OverflowError, RecursionError)):
                return (
                    f"template {exc.template}"
                    + (f" line {exc.line}" if exc.line else "")
                    + f": {'blocked by the sandbox' if isinstance(cause, SecurityError) else 'cannot render'}: "
                    + f"{cause or type(cause).__name__}."
                )
        except (TimeoutError, RecipeError):
            return f"template {name}: rendering took more than {TRIAL_SECONDS:g} s with placeholder values."
        finally:
            if timed:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)
                if outer > 0:
                    signal.setitimer(signal.ITIMER_REAL, max(0.001, outer - (time.monotonic() - started)))
        return None


def template_files(recipe_dir: Path, names: list[str]) -> dict[str, str]:
    """Template name -> file for `names` and everything they pull in, for a stage's
    fingerprint. A missing or broken template is left out here; the stage's `check` reports it."""
    t = Templates([Path(recipe_dir) / "templates"], base=Path(recipe_dir))
    try:
        return {n: str(t.path(n)) for name in names for n in t.closure(name)}
    except (RecipeError, jinja2.TemplateError):
        return {}
