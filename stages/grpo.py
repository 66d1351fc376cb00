"""grpo: online RL on the recipe's own rewards, with TRL's GRPOTrainer (or RLOOTrainer).

Takes prompts (`input`: a prompts dataset or stage, or conversations, whose reply after the last
user turn is the one written; one reference, or a list mixed by `weights`) and a model (model);
gives a `model` in `model/` (full weights, the merged LoRA weights, or an adapter plus `base.json`).

- Each optimizer step samples `num_generations` completions of `batch_size / num_generations`
  prompts with the model being trained (TRL's own generation under the model's chat template),
  scores every completion with each entry of `rewards`, and takes a policy-gradient step on the
  group-relative advantages. `algorithm = "rloo"` uses TRL's RLOOTrainer (leave-one-out baseline)
  on the same data and rewards; `loss_type` and `scale_rewards` are GRPO's.
- Rewards are the scorers of judge and rejection_sample, made by the same code
  (`engine.lib.scoring.make_scorer`): `{ scorer = "function", function = "math_answer" }`,
  `{ scorer = "rule_reward", rules = { expected = "expected", min_words = 8 } }`,
  `{ scorer = "rules", rule = "words" }`, `{ scorer = "llm", rubric = "..." }` or
  `{ scorer = "reward_model" }` (both with the stage's `judge_model`). A scorer sees each
  completion as a conversation (the prompt's messages plus the reply) with the prompt row's columns
  in its meta, so `answer` and `expected` reach math_answer and rule_reward. The rewards are summed
  with their `weight`s (TRL's reward_weights); a reward that cannot score a reply (None) is left
  out of that reply's sum. Each reward's mean per step is logged (`rewards/NAME/mean`).
- Reference model for the KL term (`beta` > 0): with `lora`, the start model with the adapter
  disabled; otherwise a frozen copy of the start model. `beta = 0` trains without one.
- `backend = "vllm"` generates with TRL's colocated vLLM engine on a CUDA machine with vllm
  installed (unverified on this project's machines); "hf" is TRL's transformers generation.
- `metrics.json`: per step the loss, each reward's mean, the total reward and its spread, KL,
  completion length and the share of completions cut at `max_completion_length`, seconds spent
  generating and optimizing; `rewards.png` and `training.png` plot them. `report.json` holds
  greedy completions of the first `examples` prompts before and after training. Checkpoints in the
  partial area; a killed stage resumes from the last one, and ends with the same weights as an
  uninterrupted run on the same machine (the sampler's random state is checkpointed).

torch, transformers, trl, peft and datasets are imported inside functions only.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from engine.core.errors import Problem
from engine.lib.knobs import knob_problems
from engine.lib.pairs import prompt_messages
from engine.lib.rewards import RewardRules
from engine.lib.scoring import CONVERSATION_SCORERS, ScorerSpec, make_scorer, scorer_code, scorer_problems
from engine.lib.tracking import tracking_callbacks
from engine.lib.trainer import (
    checkpoint_dir,
    last_checkpoint,
    plot_loss,
    save_model,
    settle,
    step_callback,
    step_metrics,
    trainer_args,
    weights_kind,
)
from engine.lib.training import (
    TrainingConfig,
    batch_problems,
    check_lora_targets,
    load_weights,
    lora_config,
    mixture_line,
    mixture_problems,
    training_rows,
)
from engine.spec.config import ExecOnly, Ref, Table
from engine.store.shards import Shard

VERSION = 1
GIVES = "model"
TRAINS = True

# TRL 1.16's GRPOConfig.loss_type values (trl/trainer/grpo_config.py)
LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo")
STEP_KEYS = (
    "reward",
    "reward_std",
    "kl",
    "entropy",
    "completions/mean_length",
    "completions/clipped_ratio",
    "clip_ratio/region_mean",
    "frac_reward_zero_std",
)


class Reward(Table):
    """One entry of `rewards`: a scorer, as judge and rejection_sample take it, and its weight."""

    scorer: Literal[CONVERSATION_SCORERS] = Field(description="What scores each completion.")  # type: ignore[valid-type]
    weight: float = Field(1.0, description="Weight in the summed reward (TRL's reward_weights).")
    name: str | None = Field(
        None, description="Name in the logs and the report (default: the function's name, or the scorer's)."
    )
    function: str | None = Field(
        None,
        description="function: `path/to/file.py:function`, `package.module:function` or a builtin (math_answer, "
        "reply_quality); its source is in the fingerprint.",
    )
    rules: RewardRules | None = Field(None, description="rule_reward: the rules (default: the row's expected alone).")
    rule: Literal["words", "refusal", "sycophancy", "filler"] = Field("words", description="rules: the number used.")
    template: str | None = Field(None, description="llm: the pointwise judge template (judge_pointwise.j2).")
    rubric: str | None = Field(None, description="llm: what to reward, passed to the template.")
    judge_max_new_tokens: int = Field(256, ge=1, description="llm: tokens per judge answer.")
    max_retries: int = Field(2, ge=0, description="llm: new attempts when no score can be parsed.")


class Config(TrainingConfig):
    kind: Literal["grpo"]
    algorithm: Literal["grpo", "rloo"] = Field(
        "grpo", description="grpo: TRL's GRPOTrainer (group-normalized advantages); rloo: TRL's RLOOTrainer."
    )
    input: str | list[str] = Ref(
        "prompts",
        "conversations",
        description="Prompts, or conversations (the reply after their last user turn is sampled); one name, or a "
        "list mixed by `weights`.",
    )
    model: str = Ref("model", description="The policy to train (its start).")
    judge_model: str | None = Ref("model", default=None, description="The model of an `llm` or `reward_model` reward.")
    rewards: list[Reward] = Field(min_length=1, description="The rewards, summed with their weights.")
    beta: float = Field(
        0.04, ge=0.0, description="KL coefficient against the reference model (0: no reference model is loaded)."
    )
    num_generations: int = Field(4, ge=2, description="Completions per prompt (the group).")
    max_completion_length: int = Field(128, ge=1, description="Tokens per completion.")
    temperature: float = Field(1.0, gt=0.0, description="Sampling temperature of the completions.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    epsilon: float = Field(0.2, gt=0.0, description="Clipping of the probability ratio (lower bound 1 - epsilon).")
    epsilon_high: float | None = Field(
        None, gt=0.0, description="Upper clipping bound (default: epsilon; DAPO uses 0.28)."
    )
    loss_type: Literal[LOSS_TYPES] = Field(  # type: ignore[valid-type]
        "dapo",
        description="grpo: how token losses are aggregated (TRL's loss_type): grpo, dr_grpo, dapo (TRL's default), "
        "bnpo, cispo, sapo.",
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="grpo: divide advantages by the reward spread of the group, the batch, or not at all."
    )
    mask_truncated_completions: bool = Field(
        False, description="Leave completions cut at max_completion_length out of the loss (DAPO)."
    )
    lr: float = Field(1e-6, gt=0.0, description="Peak learning rate (1e-6 full fine-tune; ~1e-5 with LoRA).")
    batch_size: int = Field(
        16, ge=1, description="Completions per optimizer step (prompts x num_generations), over all processes."
    )
    per_device_batch_size: int = ExecOnly(
        16, ge=1, description="Completions per forward pass; accumulation makes up the rest."
    )
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="Share of steps for linear warmup.")
    backend: Literal["hf", "vllm"] = Field(
        "hf", description="Generation in the loop: TRL's transformers generation, or colocated vLLM (CUDA)."
    )
    examples: int = Field(4, ge=0, le=64, description="Prompts whose greedy completions the report shows before/after.")


# --------------------------------------------------------------------------- validation


def scorer_spec(reward: Reward, name: str) -> ScorerSpec:
    return ScorerSpec(
        scorer=reward.scorer,
        name=name,
        template=reward.template,
        rubric=reward.rubric,
        function=reward.function,
        max_retries=reward.max_retries,
        max_new_tokens=reward.judge_max_new_tokens,
        rewards=reward.rules,
    )


def reward_names(config: Config) -> list[str]:
    """A distinct name per reward: its `name`, else its function's or scorer's name (numbered when repeated)."""
    names: list[str] = []
    for r in config.rewards:
        base = r.name or (r.function.rsplit(":", 1)[-1] if r.scorer == "function" and r.function else r.scorer)
        name, k = base, 2
        while name in names:
            name, k = f"{base}_{k}", k + 1
        names.append(name)
    return names


def check(name: str, config: Config, recipe) -> list[Problem]:
    problems = batch_problems(name, config, recipe) + mixture_problems(name, config, recipe)
    problems += knob_problems(name, config, recipe, config.algorithm)
    where = lambda key: recipe.where(f"stages.{name}.{key}")  # noqa: E731
    if config.batch_size % config.num_generations:
        problems.append(
            Problem(
                f"stage '{name}': num_generations = {config.num_generations} does not divide batch_size = "
                f"{config.batch_size} (a step trains whole groups of completions).",
                hint=f"Use a batch_size that is a multiple of {config.num_generations}.",
                **where("num_generations"),
            )
        )
    if config.epsilon_high is not None and config.epsilon_high < config.epsilon:
        problems.append(
            Problem("epsilon_high is below epsilon.", hint="Raise epsilon_high, or remove it.", **where("epsilon_high"))
        )
    inputs = config.input if isinstance(config.input, list) else [config.input]
    for i, (reward, rname) in enumerate(zip(config.rewards, reward_names(config))):
        spec = scorer_spec(reward, rname)
        found = [
            p
            for source in inputs
            for p in scorer_problems(
                f"{name}.rewards", spec, recipe, model=config.judge_model, model_key="judge_model", input=source
            )
        ]
        problems += [p for i, p in enumerate(found) if p not in found[:i]]  # a template problem once, not per input
        unused = sorted(reward.model_fields_set - _reward_uses(reward))
        problems += [
            Problem(
                f"rewards[{i}]: {key} is not used by scorer '{reward.scorer}'.",
                hint=f"Remove {key}.",
                **where("rewards"),
            )
            for key in unused
        ]
    if config.judge_model and not any(r.scorer in ("llm", "reward_model") for r in config.rewards):
        problems.append(
            Problem(
                "judge_model is set but no reward uses a model.",
                hint='Remove judge_model, or add a { scorer = "llm" } reward.',
                **where("judge_model"),
            )
        )
    if config.backend == "vllm":
        from engine.spec.backends import BACKENDS

        info = BACKENDS["vllm"]
        if not info.available():
            problems.append(
                Problem(
                    f'backend = "vllm" generates with vLLM, and {info.requires} is not installed here.',
                    hint=f'Install it on a CUDA machine (`{info.install}`), or use backend = "hf".',
                    **where("backend"),
                )
            )
    return problems


def _reward_uses(reward: Reward) -> set[str]:
    return {"scorer", "weight", "name"} | {
        "llm": {"template", "rubric", "judge_max_new_tokens", "max_retries"},
        "reward_model": set(),
        "rules": {"rule"},
        "rule_reward": {"rules"},
        "function": {"function"},
    }[reward.scorer]


def uses(config: Config) -> tuple[set[str], str]:
    # no eval loss during RL: eval_fraction, eval_steps and early stopping are the other training stages'
    used = set(Config.model_fields) - {
        "loss_type",
        "scale_rewards",
        "eval_fraction",
        "eval_steps",
        "early_stopping_patience",
    }
    if config.algorithm == "grpo":
        used |= {"loss_type", "scale_rewards"}
    return used, f"algorithm '{config.algorithm}'"


def code(config: Config, recipe) -> dict:
    """Every function reward's source (and distribution) enters the fingerprint."""
    found: dict = {}
    for reward, name in zip(config.rewards, reward_names(config)):
        found |= scorer_code(scorer_spec(reward, name), recipe)
    return found


def templates(config: Config, recipe) -> dict[str, str]:
    from engine.lib.prompts import template_files
    from engine.lib.scoring import template_name

    names = [template_name(scorer_spec(r, "score")) for r in config.rewards]
    return template_files(recipe.dir, [n for n in names if n])


# --------------------------------------------------------------------------- rewards


def reward_functions(config: Config, scorers: list, names: list[str], seed: int) -> list:
    """TRL reward functions over the recipe's scorers: each completion becomes a conversation row
    (prompt messages + the reply, the prompt row's meta), ids unique per step and sample so judge
    seeds never repeat; a reward's None stays None (TRL leaves it out of the sum)."""

    def make(scorer, name: str, key: str):
        def reward(prompts, completions, row_id, meta, trainer_state=None, **_):
            step = trainer_state.global_step if trainer_state is not None else 0
            rows = [
                {
                    "id": f"{rid}@{step}#{k}",
                    "messages": [*p, {"role": "assistant", "content": c[-1]["content"] if isinstance(c, list) else c}],
                    "meta": json.loads(m),
                }
                for k, (p, c, rid, m) in enumerate(zip(prompts, completions, row_id, meta))
            ]
            scored = scorer(Shard(step, 0, rows, seed))
            return [None if d.get(key) is None else float(d[key]) for d in scored]

        reward.__name__ = name
        return reward

    return [
        make(s, n, f"{n}.{r.rule}" if r.scorer == "rules" else n) for s, n, r in zip(scorers, names, config.rewards)
    ]


# --------------------------------------------------------------------------- the trainer


def _trainer_class(algorithm: str, timings: dict):
    """TRL's trainer for `algorithm`, timing each generate-and-score (seconds per optimizer step)."""
    if algorithm == "rloo":
        from trl import RLOOTrainer as Base
    else:
        from trl import GRPOTrainer as Base

    class Timed(Base):
        def _generate_and_score_completions(self, *args, **kw):
            t0 = time.perf_counter()
            out = super()._generate_and_score_completions(*args, **kw)
            step = self.state.global_step + 1
            timings[step] = timings.get(step, 0.0) + time.perf_counter() - t0
            return out

    return Timed


@contextlib.contextmanager
def _frozen_copy_as_reference(algorithm: str, model):
    """TRL builds a full fine-tune's reference by loading the model's path again, which is wrong for
    a model made in memory (a merged adapter, a builtin): hand it a frozen copy of the start model."""
    import trl.trainer.grpo_trainer as g
    import trl.trainer.rloo_trainer as r

    module = r if algorithm == "rloo" else g
    original = module.create_model_from_path
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    module.create_model_from_path = lambda *a, **k: ref
    try:
        yield
    finally:
        module.create_model_from_path = original


def _args(config: Config, base: dict):
    common = dict(
        num_generations=config.num_generations,
        max_completion_length=config.max_completion_length,
        temperature=config.temperature,
        top_p=config.top_p,
        beta=config.beta,
        epsilon=config.epsilon,
        epsilon_high=config.epsilon_high,
        mask_truncated_completions=config.mask_truncated_completions,
        reward_weights=[r.weight for r in config.rewards],
        use_vllm=config.backend == "vllm",
        vllm_mode="colocate",
        remove_unused_columns=False,
        shuffle_dataset=True,
        **base,
    )
    if config.algorithm == "rloo":
        from trl import RLOOConfig

        return RLOOConfig(**common)
    from trl import GRPOConfig

    return GRPOConfig(loss_type=config.loss_type, scale_rewards=config.scale_rewards, **common)


def greedy(model, tok, prompts: list[list[dict]], max_new_tokens: int) -> list[str]:
    """Greedy completions, one prompt at a time (no padding: what a user would see)."""
    import torch

    out = []
    device = next(model.parameters()).device
    with torch.no_grad():
        for msgs in prompts:
            ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
            ids = {k: v.to(device) for k, v in ids.items()}
            gen = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            out.append(tok.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    return out


def run(config: Config, inputs: dict, ctx) -> None:
    from datasets import Dataset

    from engine.models.weights import release

    rows, mix, batch = training_rows(config, inputs, ctx, "prompts")
    model, tok = load_weights(
        ctx, inputs["model"], "model", full=config.lora is None, quantize=config.quantization == "4bit"
    )
    check_lora_targets(model, config.lora, ctx)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    _check_end_of_turn(tok, ctx)
    prompts = [[{"role": m["role"], "content": m["content"]} for m in prompt_messages(r)] for r in rows]
    dataset = Dataset.from_list(
        [
            {"prompt": p, "row_id": str(r["id"]), "meta": json.dumps(r.get("meta") or {}, sort_keys=True)}
            for p, r in zip(prompts, rows)
        ]
    )
    names = reward_names(config)
    scorers = [make_scorer(scorer_spec(r, n), inputs.get("judge_model"), ctx) for r, n in zip(config.rewards, names)]
    before = greedy(model, tok, prompts[: config.examples], config.max_completion_length) if ctx.is_main else []

    ckpt_dir = checkpoint_dir(ctx)
    timing: dict[int, float] = {}
    gen_seconds: dict[int, float] = {}
    step_seconds: dict[int, float] = {}
    base = trainer_args(config, ctx, batch, ckpt_dir, model)
    base["steps_per_generation"] = batch.accumulation  # one generation batch per optimizer step
    base["include_num_input_tokens_seen"] = "no"  # TRL's batches carry prompt_ids/completion_ids, no input_ids
    reference = (
        "none (beta = 0)"
        if config.beta == 0
        else f"the start model '{inputs['model'].name}' with the LoRA adapter disabled"
        if config.lora is not None
        else f"a frozen copy of the start model '{inputs['model'].name}'"
    )
    ctx.log.info(
        "%s on %d prompts: %d completions per prompt, %d per step; rewards %s; reference: %s",
        config.algorithm,
        len(rows),
        config.num_generations,
        config.batch_size,
        ", ".join(f"{n} (x{r.weight:g})" for n, r in zip(names, config.rewards)),
        reference,
    )
    model.train()
    freeze = (
        _frozen_copy_as_reference(config.algorithm, model)
        if config.beta > 0 and config.lora is None
        else contextlib.nullcontext()
    )
    try:
        with freeze:
            trainer = _trainer_class(config.algorithm, gen_seconds)(
                model=model,
                reward_funcs=reward_functions(config, scorers, names, ctx.seed),
                args=_args(config, base),
                train_dataset=dataset,
                processing_class=tok,
                peft_config=lora_config(config.lora),
                callbacks=[step_callback(ctx, timing), _step_clock(step_seconds), *tracking_callbacks(ctx)],
            )
        settle(trainer, ctx.log)
        last = last_checkpoint(ckpt_dir, ctx)
        started = time.perf_counter()
        trainer.train(resume_from_checkpoint=last)
        elapsed = time.perf_counter() - started
    finally:
        for s in scorers:
            s.close()

    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)  # before a merge
    save_model(trainer, tok, ctx, inputs["model"], config.lora, config.merge)
    keys = STEP_KEYS + tuple(f"rewards/{n}/mean" for n in names)
    steps = step_metrics(trainer.state.log_history, keys, timing)
    for s in steps:
        s["generate_s"] = round(gen_seconds.get(s["step"], 0.0), 3) if s["step"] in gen_seconds else None
        total = step_seconds.get(s["step"])
        s["optimize_s"] = None if total is None or s["generate_s"] is None else round(total - s["generate_s"], 3)
    if ctx.is_main:
        after = greedy(trainer.model, tok, prompts[: config.examples], config.max_completion_length)
        ctx.save_json("metrics.json", {"steps": steps, "train_seconds": round(elapsed, 2)})
        plots = _plots(Path(ctx.out_dir), steps, names, f"{config.algorithm} '{ctx.stage}'")
        first, final = (steps[0], steps[-1]) if steps else ({}, {})
        ctx.save_json(
            "report.json",
            {
                "algorithm": config.algorithm,
                "loss_type": config.loss_type if config.algorithm == "grpo" else None,
                "beta": config.beta,
                "reference": reference,
                "rows_in": len(rows),
                "mixture": mix,
                "rewards": [{"name": n, **r.model_dump(exclude_none=True)} for n, r in zip(names, config.rewards)],
                "num_generations": config.num_generations,
                "max_completion_length": config.max_completion_length,
                "steps": trainer.state.global_step,
                "first": {k: first.get(k) for k in keys},
                "final": {k: final.get(k) for k in keys},
                "trainable_params": trainable,
                "lora": config.lora.model_dump() if config.lora else None,
                "merged": bool(config.lora and config.merge),
                "resumed_from": Path(last).name if last else None,
                "batch": batch.as_json(config.batch_size),
                "completions": [
                    {"prompt": p, "before": b, "after": a} for p, b, a in zip(prompts[: config.examples], before, after)
                ],
                "plots": plots,
            },
        )
    del trainer
    release(model)


def _check_end_of_turn(tok, ctx) -> None:
    """TRL ends a completion (and its loss mask) at the tokenizer's eos token: a chat template whose
    assistant turns end with another token would have every completion run on past its turn."""
    from engine.models.chatmask import stop_token_ids

    others = [i for i in stop_token_ids(tok) if i != tok.eos_token_id]
    if others:
        marker = tok.convert_ids_to_tokens(others[0])
        ctx.warn(
            f"the chat template ends assistant turns with {marker!r} but the tokenizer's eos token is "
            f"{tok.eos_token!r}: TRL stops completions at eos only, so they may run past the end of the turn "
            f"(give the model's tokenizer eos_token = {marker!r})"
        )


def _step_clock(seconds: dict[int, float]):
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        t0 = None

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if self.t0 is not None:
                seconds[state.global_step] = time.perf_counter() - self.t0

    return Clock()


def _plots(out: Path, steps: list[dict], names: list[str], title: str) -> list[str]:
    from engine.core.plots import lines, panels

    xs = [s["step"] for s in steps]
    series = lambda key: (xs, [s.get(key) for s in steps])  # noqa: E731
    plot_loss(out / "loss.png", steps, f"{title}: training loss")
    lines(
        out / "rewards.png",
        {"total": series("reward"), **{n: series(f"rewards/{n}/mean") for n in names}},
        title=f"{title}: mean reward per step",
        ylabel="reward",
    )
    panels(
        out / "training.png",
        [
            ("KL to the reference", {"kl": series("kl")}),
            ("completion length (tokens)", {"mean": series("completions/mean_length")}),
            ("share cut at max_completion_length", {"clipped": series("completions/clipped_ratio")}),
        ],
        title=title,
    )
    return ["loss.png", "rewards.png", "training.png"]


# --------------------------------------------------------------------------- show


def report(name: str, entry: Path) -> list:
    """The run report's section: the reward and training curves, and greedy completions of the
    first prompts before and after training."""
    from engine.core.document import Grid, Heading, Image, Para

    try:
        data = json.loads((entry / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    blocks: list = [Heading(f"Online RL: {name}", 3)]
    for png, caption in (("rewards.png", "mean reward per step"), ("training.png", "KL, length, share cut")):
        if (entry / png).is_file():
            blocks.append(Image(f"{name}_{png}", (entry / png).read_bytes(), f"{name}: {caption}"))
    rows = [
        [e["prompt"][-1]["content"] if e.get("prompt") else "", e.get("before", ""), e.get("after", "")]
        for e in data.get("completions") or []
    ]
    if rows:
        blocks += [
            Para(f"Greedy completions of the first {len(rows)} prompts, before and after training."),
            Grid(["last user turn", "before", "after"], rows),
        ]
    return blocks


def summary(report: dict) -> list[tuple[str, str]]:
    fl = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    first, final = report.get("first") or {}, report.get("final") or {}
    algo = report["algorithm"] + (f" ({report['loss_type']})" if report.get("loss_type") else "")
    out = [
        ("objective", f"{algo}, beta {report['beta']:g}, {report['num_generations']} completions per prompt"),
        ("reference", report["reference"]),
        ("prompts", str(report["rows_in"])),
        *mixture_line(report),
        ("steps", str(report["steps"])),
        ("reward first -> final", f"{fl(first.get('reward'))} -> {fl(final.get('reward'))}"),
    ]
    out += [
        (f"  {r['name']} (x{r['weight']:g})", f"{fl(first.get(k))} -> {fl(final.get(k))}")
        for r in report.get("rewards", [])
        for k in [f"rewards/{r['name']}/mean"]
    ]
    out += [
        ("KL (last step)", fl(final.get("kl"))),
        (
            "completion length first -> final",
            f"{fl(first.get('completions/mean_length'))} -> {fl(final.get('completions/mean_length'))}",
        ),
        ("cut at max_completion_length (last step)", fl(final.get("completions/clipped_ratio"))),
        ("weights", f"{weights_kind(report)}, {report['trainable_params']} trainable params"),
    ]
    return out


def summary_notes(report: dict) -> list[str]:
    return [
        f"example {i + 1}: {json.dumps(e['prompt'][-1]['content'])[:80]}\n  before: {e['before'][:160]!r}\n"
        f"  after:  {e['after'][:160]!r}"
        for i, e in enumerate(report.get("completions") or [])
    ]
