"""Scoring, shared by every stage that scores rows (judge, rejection_sample, preferences, eval):
scorer specs and their validation, the scorer classes behind `make_scorer`, and the parsers of a
judge's answers. Stages import this module; no stage imports another.

The scorers (llm, pairwise, reward_model, rules, function) are described for users in the judge
stage's docstring (stages/judge.py, which the recipe reference is generated from).

A scorer is called with a Shard of rows and returns one {name: value, ...} dict per row; its
random streams come from `ctx.seeds` by row id. torch and transformers are imported inside the
reward-model scorer only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.core import text
from engine.core.errors import Problem
from engine.lib import verifiers
from engine.lib.rewards import RewardRules, expected_of, reply_of, reward
from engine.models.backends import SamplingParams
from engine.store.shards import Shard

SCORER_GROUP = verifiers.GROUP
DEFAULT_PRINCIPLE = "Which response is more helpful, honest and harmless?"
SCORE_LINE = re.compile(r"^\s*\**score\**\s*[:=]\s*\**\s*(\d+(?:\.\d+)?)", re.IGNORECASE | re.MULTILINE)
VERDICT_LINE = re.compile(r"^\s*\**verdict\**\s*[:=]\s*\**\s*([AB])\b", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True)
class ScorerSpec:
    """What `make_scorer` needs; the judge stage's Config has the same fields and serves as one."""

    scorer: str  # llm | pairwise | reward_model | rules | rule_reward | function
    name: str = "score"
    template: str | None = None
    rubric: str | None = None
    principle: str = DEFAULT_PRINCIPLE
    function: str | None = None
    max_retries: int = 2
    max_new_tokens: int = 256
    temperature: float = 0.0
    batch_size: int = 64
    rewards: RewardRules | None = None


def template_name(config: ScorerSpec) -> str | None:
    return config.template or TEMPLATE_VARS[config.scorer][0] if config.scorer in TEMPLATE_VARS else None


def scorer_problems(
    name: str, spec: ScorerSpec, recipe, *, model: str | None, model_key: str = "model", input: str | None = None
) -> list[Problem]:
    """Validation of a scorer for any stage's `check()`: a model where one is needed (`model`,
    the value of the stage's key `model_key`), a known function, a template that uses only the
    variables passed. The stage's keys `scorer`, `function` and `template` are located."""
    where = lambda field: recipe.where(f"stages.{name}.{field}")  # noqa: E731
    problems = []
    if SCORERS[spec.scorer].needs_model and not model:
        problems.append(
            Problem(
                f"scorer '{spec.scorer}' needs a model.",
                hint=f'Set {model_key} = "<a [models] name>".',
                **where("scorer"),
            )
        )
    if SCORERS[spec.scorer].check is not None:
        problems += SCORERS[spec.scorer].check(spec, recipe, input, where)  # type: ignore[misc]
    if spec.scorer in TEMPLATE_VARS:
        from engine.lib.prompts import Templates

        t = Templates.for_recipe(recipe)
        problems += t.check(template_name(spec), TEMPLATE_VARS[spec.scorer][1], stage=name, **where("template"))  # type: ignore[arg-type]
    return problems


def parse_score(answer: str) -> float | None:
    """The last `Score: N` line with 1 <= N <= 10, else None."""
    found = SCORE_LINE.findall(answer)
    if not found:
        return None
    value = float(found[-1])
    return value if 1 <= value <= 10 else None


def parse_verdict(answer: str) -> str | None:
    found = VERDICT_LINE.findall(answer)
    return found[-1].upper() if found else None


def rule_scores(messages: list[dict]) -> dict[str, float]:
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    earlier: list[str] = []
    filler = 0.0
    for m in messages:
        if m["role"] == "assistant" and text.is_filler(m["content"], earlier):
            filler = 1.0
        earlier.append(m["content"])
    return {
        "refusal": float(any(text.is_refusal(r) for r in replies)),
        "sycophancy": text.sycophancy_ratio(messages),
        "filler": filler,
        "words": sum(text.word_count(r) for r in replies) / max(1, len(replies)),
    }


class _LLM:
    """Scorers are called with a Shard (its rows and seed) and return one {name: value, ...}
    dict per row; `close()` releases what they loaded."""

    def __init__(self, config: ScorerSpec, model, ctx, backend=None) -> None:
        self.config, self.tpl, self.seeds = config, ctx.templates(), ctx.seeds
        self.owns_backend = backend is None  # a backend lent by the caller stays open
        self.backend = backend or ctx.backend(model, config.batch_size)

    def __call__(self, shard: Shard) -> list[dict]:
        cfg = self.config
        prompts = [
            self.tpl.render_chat(template_name(cfg), conversation=r["messages"], rubric=cfg.rubric or "")
            for r in shard.rows
        ]
        scores: dict[int, float] = {}
        answers: dict[int, str] = {}
        for attempt in range(cfg.max_retries + 1):
            todo = [i for i in range(len(prompts)) if i not in scores]
            if not todo:
                break
            temp = cfg.temperature if attempt == 0 else max(cfg.temperature, 0.7)
            params = SamplingParams(temperature=temp, max_new_tokens=cfg.max_new_tokens)
            seeds = [self.seeds.row(shard.rows[i]["id"], purpose="judge", attempt=attempt) for i in todo]
            for i, [c] in zip(todo, self.backend.generate([prompts[i] for i in todo], params, seeds)):
                answers[i] = c.text
                value = parse_score(c.text)
                if value is not None:
                    scores[i] = value
        return [{cfg.name: scores.get(i), f"{cfg.name}_answer": answers.get(i, "")[-500:]} for i in range(len(prompts))]

    def close(self) -> None:
        if self.owns_backend:
            self.backend.close()


class _RewardModel:
    def __init__(self, config: ScorerSpec, model, ctx) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from engine.models.builtins import builtin_dir

        spec = model.spec
        path = (
            builtin_dir(spec.path.split(":", 1)[1], ctx.cache_root) if spec.path.startswith("builtin:") else spec.path
        )
        self.tok = AutoTokenizer.from_pretrained(path, revision=spec.revision)
        torch.manual_seed(ctx.seed)  # a fresh head on a plain LM is random: seed it
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, revision=spec.revision, num_labels=1
        ).eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tok.pad_token_id
        self.name = config.name

    def __call__(self, shard: Shard) -> list[dict]:
        import torch

        out = []
        for r in shard.rows:
            ids = self.tok.apply_chat_template(r["messages"], return_tensors="pt", return_dict=True)
            with torch.no_grad():
                # 6 decimals: the CPU forward's last float bits vary run to run (allocation-dependent
                # kernels), and a re-run must store the same score
                out.append({self.name: round(float(self.model(**ids).logits[0, 0]), 6)})
        return out

    def close(self) -> None:
        from engine.models.weights import release

        release(self.model)


class _Pairwise(_LLM):
    """Both orders: (chosen, rejected) and (rejected, chosen). The label is the share of the two
    verdicts that prefer chosen; the order swap cancels position bias. Unparsed: None."""

    def __call__(self, shard: Shard) -> list[dict]:
        cfg = self.config
        prompts = []
        for r in shard.rows:
            chosen, rejected = r["chosen"][-1]["content"], r["rejected"][-1]["content"]
            for a, b in ((chosen, rejected), (rejected, chosen)):
                prompts.append(
                    self.tpl.render_chat(
                        template_name(cfg), context=r["prompt"], response_a=a, response_b=b, principle=cfg.principle
                    )
                )
        params = SamplingParams(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens)
        seeds = [self.seeds.row(r["id"], purpose="pairwise", sample=order) for r in shard.rows for order in (0, 1)]
        verdicts = [parse_verdict(c.text) for [c] in self.backend.generate(prompts, params, seeds)]
        out = []
        for i in range(len(shard.rows)):
            first, second = verdicts[2 * i], verdicts[2 * i + 1]
            if first is None or second is None:
                out.append({cfg.name: None})
                continue
            label = ((first == "A") + (second == "B")) / 2
            out.append({cfg.name: label, f"{cfg.name}_position_consistent": (first == "A") == (second == "B")})  # type: ignore[dict-item]
        return out


class _Rules:
    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, shard: Shard) -> list[dict]:
        return [{f"{self.name}.{k}": v for k, v in rule_scores(r["messages"]).items()} for r in shard.rows]

    def close(self) -> None:
        pass


class _RuleReward(_Rules):
    """Rule-based rewards (engine/lib/rewards.py) over each row's last assistant reply."""

    def __init__(self, name: str, rules: RewardRules) -> None:
        self.name, self.rules = name, rules

    def __call__(self, shard: Shard) -> list[dict]:
        out = []
        for r in shard.rows:
            turn = sum(m["role"] == "assistant" for m in r["messages"]) - 1  # the reply's place among them
            found = reward(reply_of(r), expected_of(r, self.rules, turn), self.rules)
            out.append({self.name: found.pop("score"), **{f"{self.name}.{k}": v for k, v in found.items()}})
        return out


class _Function(_Rules):
    def __init__(self, name: str, function: str, base=None) -> None:
        self.name, self.fn = name, verifiers.resolve(function, base)

    def __call__(self, shard: Shard) -> list[dict]:
        return [{self.name: (None if (v := self.fn(r)) is None else float(v))} for r in shard.rows]


def _function_problems(spec: ScorerSpec, recipe, input: str | None, where) -> list[Problem]:
    """scorer 'function': a function that loads, and the column it compares with in the data."""
    return verifiers.function_problems(spec.function, recipe, input, where)


def _rule_reward_problems(spec: ScorerSpec, recipe, input: str | None, where) -> list[Problem]:
    """scorer 'rule_reward': the column saying what each reply should do, when the rules read it."""
    problems: list[Problem] = []
    rules = spec.rewards or RewardRules()
    rows = recipe.dataset_rows(input) if input else None
    if rules.behaviour > 0 and rows and not any(expected_of(r, rules) for r in rows):
        problems.append(
            Problem(
                f"scorer 'rule_reward' reads what each reply should do from the column '{rules.expected}' "
                f'("refuse" or "comply"), and no row of dataset \'{input}\' has one.',
                hint="Add the column to the data, set rewards.expected to the column that has it, or set "
                "rewards.behaviour = 0 to score by the other rules alone.",
                **where("scorer"),
            )
        )
    return problems


def scorer_code(spec: ScorerSpec, recipe) -> dict:
    """User code a scorer runs, for the fingerprint (engine.store.fingerprint, a stage's `code`
    hook): {"scorer function NAME": identity} for a function scorer that is not a builtin."""
    if spec.scorer != "function" or not spec.function:
        return {}
    found = verifiers.identity(spec.function, recipe.dir)
    return {} if found is None else {f"scorer function {spec.function}": found}


def make_scorer(spec: ScorerSpec, model, ctx, *, backend=None):
    """A scorer for `spec` (the judge's Config or a ScorerSpec): call it with a Shard of rows
    (conversations; preferences for pairwise), get one dict of scores per row; close() it when
    done. `model` is the model artifact (llm, pairwise, reward_model); `backend` lends an open
    generation backend for that model instead of loading it again (the caller closes it)."""
    return SCORERS[spec.scorer].make(spec, model, ctx, backend)


@dataclass(frozen=True)
class ScorerKind:
    """One scorer kind: how to make it, what rows it scores, whether it needs a model, its default
    template and the variables the template gets, and its own validation."""

    make: Callable[..., Any]  # (spec, model, ctx, backend) -> a scorer: call it with a Shard, close() it
    takes: str = "conversations"  # or "preferences"
    needs_model: bool = False
    template: tuple[str, set[str]] | None = None
    check: Callable[..., list[Problem]] | None = None  # (spec, recipe, input, where) -> problems


# The one table of scorer kinds: `scorer = "..."` in judge and rejection_sample. Adding a kind is a
# class above and one line here.
SCORERS: dict[str, ScorerKind] = {
    "llm": ScorerKind(
        lambda spec, model, ctx, backend: _LLM(spec, model, ctx, backend),
        needs_model=True,
        template=("judge_pointwise.j2", {"conversation", "rubric"}),
    ),
    "pairwise": ScorerKind(
        lambda spec, model, ctx, backend: _Pairwise(spec, model, ctx, backend),
        takes="preferences",
        needs_model=True,
        template=("judge_pairwise.j2", {"context", "response_a", "response_b", "principle"}),
    ),
    "reward_model": ScorerKind(lambda spec, model, ctx, backend: _RewardModel(spec, model, ctx), needs_model=True),
    "rules": ScorerKind(lambda spec, model, ctx, backend: _Rules(spec.name)),
    "rule_reward": ScorerKind(
        lambda spec, model, ctx, backend: _RuleReward(spec.name, spec.rewards or RewardRules()),
        check=_rule_reward_problems,
    ),
    "function": ScorerKind(
        lambda spec, model, ctx, backend: _Function(spec.name, spec.function, ctx.recipe.dir), check=_function_problems
    ),
}
TEMPLATE_VARS = {name: kind.template for name, kind in SCORERS.items() if kind.template is not None}
CONVERSATION_SCORERS = tuple(name for name, kind in SCORERS.items() if kind.takes == "conversations")


# --------------------------------------------------------------------------- pairwise verdicts

COT_CLAMP = (0.4, 0.6)  # chain-of-thought verdicts are overconfident: their labels are clamped


def pairwise_label(a_first: list[str | None], b_first: list[str | None]) -> float | None:
    """P(reply a is better): the share of parsed verdicts preferring a, over both orders
    (a shown as A, then b shown as A). None unless each order has a parsed verdict: one order
    alone would carry the judge's position bias."""
    a_votes = [v == "A" for v in a_first if v]
    b_votes = [v == "B" for v in b_first if v]
    if not a_votes or not b_votes:
        return None
    return (sum(a_votes) + sum(b_votes)) / (len(a_votes) + len(b_votes))


def soft_label(p: float, chain_of_thought: bool) -> float:
    """The label recorded for training: clamped to [0.4, 0.6] for chain-of-thought verdicts."""
    return min(max(p, COT_CLAMP[0]), COT_CLAMP[1]) if chain_of_thought else p


def parse_choice(answer: str) -> str | None:
    """ "A"/"B" from a judge answer: the last "Verdict: X" line, or an answer that is only
    "A", "(B)", "Response A" and the like."""
    found = parse_verdict(answer)
    if found:
        return found
    m = re.fullmatch(r"\W*(?:(?:response|reply|option|answer)\s+)?\(?([AB])\)?\W*", answer.strip(), re.IGNORECASE)
    return m.group(1).upper() if m else None


def logprob_judgments(tasks: list[dict], logprobs: list[list[float]]) -> list[dict]:
    """Soft labels from the judge's probabilities of "A" and "B" (two prompts per task: a shown
    first, then b shown first): label_a = the mean, over both orders, of the normalized
    probability that a is the better reply. The letter it favours in each order is its verdict."""
    out = []
    for j, t in enumerate(tasks):
        (a1, b1), (a2, b2) = logprobs[2 * j], logprobs[2 * j + 1]
        p_first = 1 / (1 + math.exp(b1 - a1))  # P(A) with a shown as A
        p_second = 1 / (1 + math.exp(a2 - b2))  # P(B) with a shown as B
        out.append(
            dict(
                t,
                a_first=["A" if p_first >= 0.5 else "B"],
                b_first=["A" if 1 - p_second >= 0.5 else "B"],
                label_a=round((p_first + p_second) / 2, 6),
                answers=[f"P(A)={p_first:.3f}", f"P(A)={1 - p_second:.3f}"],
            )
        )
    return out
