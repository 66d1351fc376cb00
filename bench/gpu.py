"""Benchmark: the engine on one GPU against the card's own limits and against plain scripts.

    python bench/gpu.py [--tokenizer DIR] [--budget-s 480] [--parts hw,gen,sft,dpo,flagship]
    python bench/gpu.py --smoke          # the same code paths at toy sizes, on whatever is here (CPU)

On a GPU machine without our dependencies or the hub: `bash bench/gpu_prepare.sh` here puts the
missing wheels in .whl/ and SmolLM2's tokenizer in .gpu/tokenizer (its header gives the command to run
there).

Weights cannot be downloaded on the GPU machines, so the model is built there: a random-init Llama
with SmolLM2-1.7B's shapes (24 layers, hidden 2048, MLP 8192, 32 heads, vocabulary 49,152: 1.71 B
parameters) in bfloat16, with a real tokenizer (`--tokenizer`: a directory with tokenizer.json and
its chat template; default: builtin:smollm2-135m's, which has SmolLM2's tokenizer). Random weights
do not change the speed of a forward pass; 256 new tokens are forced (min_new_tokens) everywhere.

What it measures, each figure with its baseline (run in this same process) and its hardware bound:
- hw: device copy bandwidth (read + write bytes / s) and the bf16 matmul rate (8192^3).
- gen: generation tokens/s of each backend installed (hf with a dynamic KV cache: the baseline, what
  the hf backend did before; hf with a static cache and compiled decode; vllm when importable) for
  one prompt and batches of 16, 64 and 256 prompts. Bound: a decode step reads every weight once and
  every row's KV cache so far (about prompt + new / 2 tokens of it), so tokens/s <= batch x bandwidth
  / (weight bytes + batch x KV bytes per step), and <= matmul rate / (2 x parameters).
- sft / dpo: the engine's stage against a plain TRL script on the same job (bench/bench_sft.py's
  job for sft; the same pairs, steps and batch for dpo): wall-time ratio, training tokens/s and
  model-FLOPs utilisation: (6 x parameters, + 2 when gradient checkpointing recomputes the forward,
  + 2 for DPO's reference forward) x tokens/s over the measured matmul rate.
- flagship: per-stage wall time of `recipe run recipes/caI_multiturn.toml` on builtin:tiny-chat
  here against the same run pinned to 2 CPU cores with no GPU (taskset, CUDA_VISIBLE_DEVICES=""),
  then on the 1.7B-shaped model with whatever time is left (stages not reached are reported so).

Order: the headline numbers come first, so a run stopped early still has them: hw, then hf dynamic
vs static generation at the largest batch (256 x 256 tokens at 1.7B bf16), then sft vs plain TRL,
then the other batches and vllm, dpo, the flagship. Every part checks `--budget-s` before each
timed piece, and a piece not reached is reported as skipped (no value, so no ratio).
`--out`/gpu.json is rewritten after every figure: a run stopped at the limit keeps what it measured.
The output is one table (figure, value, baseline, x baseline, bound, x bound), then one JSON line.

At start the bench checks the modules it needs beyond torch, transformers, peft and accelerate
(`NEEDS`; bench/gpu_prepare.sh carries their wheels) and says what is missing; the parts that need
a missing module are skipped with the reason, instead of crashing midway.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

SHAPES = {  # SmolLM2-1.7B-Instruct's config, and a toy for --smoke
    "1.7b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=24,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=8192,
        rope_theta=130000.0,
        tie_word_embeddings=True,
    ),
    "smoke": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    ),
}
# ChatML (SmolLM2's format) with {% generation %} around what the assistant emits, so that the plain TRL
# script can train assistant-only like the stage does (TRL cannot patch SmolLM2's own template)
CHATML = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- generation -%}{{- message['content'] + '<|im_end|>' -}}{%- endgeneration -%}{{- '\\n' -}}"
    "{%- else -%}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
TOPICS = [
    "tides",
    "photosynthesis",
    "a job interview",
    "rain",
    "boiling an egg",
    "Romeo and Juliet",
    "compilers",
    "sourdough",
    "the French revolution",
    "binary search",
    "volcanoes",
    "jazz",
]


# What the bench imports beyond torch, transformers, peft and accelerate (import name -> the parts that
# need it); bench/gpu_prepare.sh downloads a wheel for each (and for their own dependencies).
NEEDS: dict[str, tuple[str, ...]] = {
    "trl": ("sft", "dpo", "flagship"),
    "datasets": ("sft", "dpo", "flagship"),
    "pydantic": ("sft", "dpo", "flagship"),
    "pydantic_core": ("sft", "dpo", "flagship"),
    "annotated_types": ("sft", "dpo", "flagship"),
    "typing_inspection": ("sft", "dpo", "flagship"),
    "dill": ("sft", "dpo", "flagship"),
    "multiprocess": ("sft", "dpo", "flagship"),
    "pandas": ("sft", "dpo", "flagship"),
    "xxhash": ("sft", "dpo", "flagship"),
    "click": ("flagship",),
    "rich": ("sft", "dpo", "flagship"),
    "matplotlib": ("sft", "dpo", "flagship"),
    "jinja2": ("gen", "sft", "dpo", "flagship"),
    "filelock": ("sft", "dpo", "flagship"),
    "pyarrow": ("sft", "dpo", "flagship"),
}


def missing_modules() -> dict[str, list[str]]:
    """Part -> the modules it needs that are not importable here."""
    import importlib.util

    out: dict[str, list[str]] = {}
    for module, parts in NEEDS.items():
        if importlib.util.find_spec(module) is None:
            for part in parts:
                out.setdefault(part, []).append(module)
    return out


class Table:
    def __init__(self, path: Path | None = None) -> None:
        self.rows: list[dict] = []
        self.path = path  # gpu.json, rewritten after every figure
        self.extra: dict = {}  # the parts' raw results, saved with the rows

    def add(
        self,
        figure: str,
        value: float | None,
        unit: str,
        baseline: float | None = None,
        bound: float | None = None,
        note: str = "",
    ) -> None:
        self.rows.append(
            {
                "figure": figure,
                "value": value,
                "unit": unit,
                "baseline": baseline,
                "bound": bound,
                "x_baseline": value / baseline if value and baseline else None,
                "x_bound": value / bound if value and bound else None,
                "note": note,
            }
        )
        print(f"  {figure}: {_num(value)} {unit}" + (f"  ({note})" if note else ""), flush=True)
        self.save()

    def save(self) -> None:
        """gpu.json as it stands: whatever stops the run later, what was measured is kept."""
        if self.path is not None:
            payload = {"table": self.rows, **self.extra}
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(payload, indent=1, default=str))
            os.replace(tmp, self.path)

    def print(self) -> None:
        head = f"{'figure':44} {'value':>12} {'unit':10} {'baseline':>10} {'x base':>7} {'bound':>10} {'x bound':>7}"
        print("\n" + head + "\n" + "-" * len(head))
        for r in self.rows:
            print(
                f"{r['figure'][:44]:44} {_num(r['value']):>12} {r['unit'][:10]:10} {_num(r['baseline']):>10} "
                f"{_ratio(r['x_baseline']):>7} {_num(r['bound']):>10} {_ratio(r['x_bound']):>7}"
                + (f"  {r['note']}" if r["note"] else "")
            )


def _num(x) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _ratio(x) -> str:
    return "-" if x is None else f"{x:.2f}x"


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


# --------------------------------------------------------------------------- hardware


def hardware(device: str, smoke: bool) -> dict:
    import torch

    n = (16 << 20) if smoke else (2 << 30)  # bytes per buffer
    bufs = [torch.empty(n, dtype=torch.uint8, device=device) for _ in range(2)]
    bufs[1].copy_(bufs[0])
    reps = 3 if smoke else 20
    t = timed(lambda: [bufs[1].copy_(bufs[0]) for _ in range(reps)], device)
    bandwidth = 2 * n * reps / t  # each copy reads and writes n bytes
    bufs.clear()
    size = 256 if smoke else 8192
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    reps = 3 if smoke else 30
    t = timed(lambda: [a @ b for _ in range(reps)], device)
    flops = 2 * size**3 * reps / t
    return {"bandwidth": bandwidth, "flops": flops}


# --------------------------------------------------------------------------- the model


def build_model(shape: str, tokenizer_dir: Path, out: Path, device: str):
    """A random-init model of `shape` on `device` in bf16 (float32 on a CPU), saved with the
    tokenizer to `out` (the engine and the TRL scripts load it from there)."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if "<|im_start|>" in tok.get_vocab():
        tok.chat_template = CHATML
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    config = LlamaConfig(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **SHAPES[shape],
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, do_sample=False
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return model.eval(), tok


def prompts(n: int) -> list[list[dict]]:
    return [
        [
            {
                "role": "user",
                "content": f"Question {i}: explain {TOPICS[i % len(TOPICS)]} to a curious "
                f"{'child' if i % 2 else 'engineer'}" + ", briefly" * (i % 4) + ".",
            }
        ]
        for i in range(n)
    ]


# --------------------------------------------------------------------------- generation


def model_sizes(model) -> dict:
    """What the bounds need of a model: parameters, weight bytes, KV-cache bytes per token."""
    cfg = model.config
    elem = next(model.parameters()).element_size()
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "kv_per_token": 2 * cfg.num_hidden_layers * heads * (cfg.hidden_size // cfg.num_attention_heads) * elem,
    }


def decode_bound(sizes: dict, hw: dict, batch: int, context: float) -> float | None:
    """tokens/s a decode step cannot beat: it reads every weight once and each row's KV cache so far
    (`context` tokens on average), and does 2 x parameters FLOPs per token."""
    if not hw.get("bandwidth") or not hw.get("flops"):
        return None
    step_bytes = sizes["weight_bytes"] + batch * context * sizes["kv_per_token"]
    return min(batch * hw["bandwidth"] / step_bytes, hw["flops"] / (2 * sizes["params"]))


def generation(
    model,
    tok,
    hw: dict,
    table: Table,
    batches: list[int],
    new: int,
    device: str,
    deadline: float,
    kinds: tuple[str, ...] = ("dynamic", "static"),
) -> dict:
    """hf generation tokens/s per (kind, batch): every row forced to `new` tokens (min_new_tokens)."""
    from engine.models.backends import SamplingParams
    from engine.models.backends.hf import HFBackend

    sampling = SamplingParams(temperature=1.0, max_new_tokens=new, min_new_tokens=new)
    results = table.extra.setdefault("gen", {})
    for b in batches:
        for kind in kinds:
            if time.time() > deadline:
                table.add(f"generate hf-{kind} batch {b}", None, "tokens/s", note="skipped (budget)")
                continue
            backend = HFBackend(model, tok, batch_size=b, kv_cache=kind)
            ps = prompts(b)
            context = sum(len(ids) for ids in backend._encode(ps)) / b + new / 2
            first = timed(lambda: backend.generate(ps, sampling, 0), device)  # compiles, for static on CUDA
            t = timed(lambda: backend.generate(ps, sampling, 1), device)
            rate = b * new / t
            results[f"{kind}/{b}"] = rate
            table.add(
                f"generate hf-{kind} batch {b}",
                rate,
                "tokens/s",
                baseline=results.get(f"dynamic/{b}"),
                bound=decode_bound(model_sizes(model), hw, b, context),
                note=f"first call {first:.1f} s",
            )
    return results


def generation_vllm(
    sizes: dict, model_dir: Path, hw: dict, table: Table, batches: list[int], new: int, device, deadline
):
    results = table.extra.setdefault("gen", {})
    try:
        import vllm  # noqa: F401
    except ImportError:
        table.add("generate vllm", None, "tokens/s", note="vllm not importable here")
        return
    if time.time() > deadline:
        table.add("generate vllm", None, "tokens/s", note="skipped (budget)")
        return
    from engine.models.backends.vllm import VLLMBackend

    backend = VLLMBackend({"model": str(model_dir), "dtype": "auto"})
    for b in batches:
        if time.time() > deadline:
            table.add(f"generate vllm batch {b}", None, "tokens/s", note="skipped (budget)")
            continue
        ps = prompts(b)
        sps = [
            backend._vllm.SamplingParams(temperature=1.0, max_tokens=new, min_tokens=new, ignore_eos=True, seed=i)
            for i in range(b)
        ]
        backend.llm.chat(ps, sampling_params=sps, use_tqdm=False)
        t = timed(lambda: backend.llm.chat(ps, sampling_params=sps, use_tqdm=False), device)
        rate = b * new / t
        results[f"vllm/{b}"] = rate
        table.add(
            f"generate vllm batch {b}",
            rate,
            "tokens/s",
            baseline=results.get(f"dynamic/{b}"),
            bound=decode_bound(sizes, hw, b, 40 + new / 2),
        )
    backend.close()


# --------------------------------------------------------------------------- training


DPO_RECIPE = """
[recipe]
name = "bench-dpo"
seed = 1

[models.policy]
path = "{model}"

[datasets.pairs]
path = "data/pairs.jsonl"
type = "preferences"

[stages.train]
kind = "dpo"
input = "pairs"
model = "policy"
lr = 1e-6
max_steps = {steps}
batch_size = {batch}
per_device_batch_size = {batch}
max_length = 512
save_steps = 1000
"""


def pairs(n: int) -> list[dict]:
    out = []
    for i in range(n):
        q = f"Question {i}: how does part {i % 7} relate to part {i % 5}?"
        out.append(
            {
                "id": f"p{i}",
                "prompt": [{"role": "user", "content": q}],
                "chosen": [{"role": "assistant", "content": f"Part {i % 7} feeds part {i % 5}. " * (2 + i % 6)}],
                "rejected": [{"role": "assistant", "content": "I cannot say. " * (1 + i % 4)}],
            }
        )
    return out


def dpo_engine(root: Path, runs: Path, model: str, steps: int, batch: int) -> tuple[float, dict]:
    from engine.load.loader import load_recipe
    from engine.run.executor import run

    (root / "recipe.toml").write_text(textwrap.dedent(DPO_RECIPE).format(model=model, steps=steps, batch=batch))
    t = time.perf_counter()
    record = run(load_recipe(root / "recipe.toml"), runs, force=["train"])
    wall = time.perf_counter() - t
    out = record.dir / "stages" / "train"
    report = json.loads((out / "report.json").read_text())
    report["train_seconds"] = json.loads((out / "metrics.json").read_text()).get("train_seconds")
    return wall, report


def dpo_script(rows: list[dict], model_dir: str, out: Path, steps: int, batch: int) -> float:
    """The plain script: DPOTrainer with a reference copy, the same pairs, steps and batch."""
    t = time.perf_counter()
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ref = AutoModelForCausalLM.from_pretrained(model_dir)
    cuda = torch.cuda.is_available()
    args = DPOConfig(
        output_dir=str(out / "ckpt"),
        per_device_train_batch_size=batch,
        learning_rate=1e-6,
        max_steps=steps,
        max_length=512,
        save_steps=1000,
        logging_steps=1,
        report_to=[],
        seed=1,
        use_cpu=not cuda,
        bf16=cuda and torch.cuda.is_bf16_supported(),
        disable_tqdm=True,
    )
    data = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=data, processing_class=tok)
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    trainer.save_model(str(out / "model"))
    return time.perf_counter() - t


def train_flops_per_token(params_n: int, part: str) -> float:
    """Model FLOPs per trained token: 6 x parameters (forward and backward), + 2 x parameters when
    gradient checkpointing recomputes the forward (TRL's configs turn it on by default), + 2 x
    parameters for DPO's reference forward (this bench's DPO is a full fine-tune with a frozen copy)."""
    from trl import DPOConfig, SFTConfig

    config = SFTConfig if part == "sft" else DPOConfig
    field = config.__dataclass_fields__.get("gradient_checkpointing")
    recompute = bool(field is not None and field.default)
    return params_n * (6 + (2 if recompute else 0) + (2 if part == "dpo" else 0))


def training(
    model_dir: Path,
    params_n: int,
    hw: dict,
    table: Table,
    work: Path,
    steps: int,
    smoke: bool,
    which: list[str],
    deadline: float,
) -> None:
    import bench_sft

    rows = bench_sft.conversations(32 if smoke else 64)
    proj = work / "sft-proj"
    (proj / "data").mkdir(parents=True, exist_ok=True)
    (proj / "data" / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    dproj = work / "dpo-proj"
    (dproj / "data").mkdir(parents=True, exist_ok=True)
    prs = pairs(32 if smoke else 64)
    (dproj / "data" / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prs))
    for part in which:
        run_engine = (
            (lambda n: bench_sft.engine_run(proj, work / "runs", str(model_dir), n))
            if part == "sft"
            else (lambda n: dpo_engine(dproj, work / "runs", str(model_dir), n, 4))
        )
        if time.time() > deadline:
            table.add(f"{part}: engine stage wall ({steps} steps)", None, "s", note="skipped (budget)")
            continue
        run_engine(2)  # warm-up: imports, allocator
        if time.time() > deadline:
            table.add(f"{part}: engine stage wall ({steps} steps)", None, "s", note="skipped (budget, after warm-up)")
            continue
        wall, report = run_engine(steps)
        table.add(f"{part}: engine stage wall alone ({steps} steps)", wall, "s")
        if time.time() > deadline:
            table.add(f"{part}: engine stage wall ({steps} steps)", None, "s", note="script skipped (budget)")
            continue
        if part == "sft":
            script = bench_sft.trl_run(rows, str(model_dir), work / "trl-sft", steps)
        else:
            script = dpo_script(prs, str(model_dir), work / "trl-dpo", steps, 4)
        table.add(
            f"{part}: engine stage wall ({steps} steps)",
            wall,
            "s",
            baseline=script,
            note=f"plain TRL script {script:.1f} s; target <= 1.1x"
            if part == "sft"
            else f"plain TRL script {script:.1f} s",
        )
        seen, secs = report.get("tokens_seen"), report.get("train_seconds")
        if seen and secs:
            rate = seen / secs
            per_token = train_flops_per_token(params_n, part)
            table.add(
                f"{part}: training tokens/s",
                rate,
                "tokens/s",
                bound=hw["flops"] / per_token,
                note=f"MFU {per_token * rate / hw['flops']:.1%} (x bound; {per_token / params_n:.0f} x params FLOPs/token)",
            )


# --------------------------------------------------------------------------- the flagship


def flagship(
    table: Table, work: Path, label: str, env_extra: dict, prefix: list[str], sets: list[str], timeout: float
) -> dict:
    runs = work / f"runs-{label}"
    env = dict(os.environ, **env_extra)
    cmd = prefix + [sys.executable, "-m", "engine.cli", "run", "recipes/caI_multiturn.toml", "--runs-dir", str(runs)]
    for s in sets:
        cmd += ["--set", s]
    t = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(1.0, timeout))
        status = "ok" if done.returncode == 0 else f"exit {done.returncode}: {done.stderr.strip()[-300:]}"
    except subprocess.TimeoutExpired:
        status = "stopped at the time budget"
    wall = time.perf_counter() - t
    stages = {}
    for record in sorted(runs.glob("*/*/record.json")):
        for name, st in json.loads(record.read_text()).get("stages", {}).items():
            stages[name] = st.get("duration_s") if st.get("status") == "run" else st.get("status")
    return {"wall": wall, "status": status, "stages": stages}


def flagships(table: Table, work: Path, model_dir: Path | None, deadline: float, smoke: bool) -> dict:
    out = {}
    tiny = ["models.policy.path=builtin:tiny-chat"]
    here = flagship(table, work, "here", {}, [], tiny, deadline - time.time())
    cpu_env = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "2"}
    pin = ["taskset", "-c", "0,1"] if shutil.which("taskset") else []
    cpu = flagship(table, work, "cpu2", cpu_env, pin, tiny, deadline - time.time())
    out["tiny"] = {"here": here, "cpu_2_cores": cpu}
    for name in sorted(set(here["stages"]) | set(cpu["stages"])):
        a, b = here["stages"].get(name), cpu["stages"].get(name)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            table.add(f"flagship tiny: {name}", a, "s", baseline=b, note="baseline: 2 CPU cores, no GPU")
    table.add(
        "flagship tiny: whole run",
        here["wall"],
        "s",
        baseline=cpu["wall"],
        note=f"{here['status']}; target <= 1.0x of 2 CPU cores",
    )
    if model_dir is not None and time.time() < deadline - 30:
        sets = [f"models.policy.path={model_dir}"]  # random weights: speed only
        big = flagship(table, work, "big", {}, [], sets, deadline - time.time())
        out["big"] = big
        for name, v in big["stages"].items():
            table.add(
                f"flagship 1.7B: {name}",
                v if isinstance(v, (int, float)) else None,
                "s",
                note="" if isinstance(v, (int, float)) else str(v),
            )
        table.add("flagship 1.7B: whole run", big["wall"], "s", note=big["status"])
    else:
        table.add("flagship 1.7B", None, "s", note="skipped (budget)")
    return out


# --------------------------------------------------------------------------- main


def default_tokenizer() -> Path:
    from engine.models.builtins import builtin_dir

    return builtin_dir("smollm2-135m", ROOT / ".cache")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="toy sizes, to rehearse every code path on a CPU")
    ap.add_argument("--tokenizer", type=Path, default=None)
    ap.add_argument("--budget-s", type=float, default=480.0)
    ap.add_argument("--parts", default="hw,gen,sft,dpo,flagship")
    ap.add_argument("--batches", default=None, help="generation batch sizes (default 1,16,64,256; smoke 1,4)")
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="training steps per timed run")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    start = time.time()
    deadline = start + args.budget_s
    parts = args.parts.split(",")

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = "smoke" if args.smoke else "1.7b"
    batches = [int(b) for b in (args.batches or ("1,4" if args.smoke else "1,16,64,256")).split(",")]
    new = args.new_tokens or (16 if args.smoke else 256)
    steps = args.steps or (3 if args.smoke else 10)
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    out_dir = args.out or work
    out_dir.mkdir(parents=True, exist_ok=True)
    table = Table(out_dir / "gpu.json")
    print(
        f"device: {torch.cuda.get_device_name(0) if device == 'cuda' else 'cpu'}; torch {torch.__version__}; "
        f"model shape {shape}; work dir {work}",
        flush=True,
    )
    missing = missing_modules()
    table.extra["missing"] = {p: m for p, m in missing.items() if p in parts}
    for part in parts:
        if missing.get(part):
            print(
                f"part {part} is skipped: {', '.join(missing[part])} not importable (bench/gpu_prepare.sh)", flush=True
            )
    ready = [p for p in parts if not missing.get(p)]
    for part in parts:
        if part not in ready:
            table.add(f"{part}", None, "-", note=f"skipped: missing {', '.join(missing[part])}")

    hw = hardware(device, args.smoke) if "hw" in ready else {"bandwidth": None, "flops": None}
    table.extra["hw"] = hw
    if "hw" in ready:
        table.add("copy bandwidth (read + write)", hw["bandwidth"] / 1e9, "GB/s")
        table.add(
            "matmul rate (bf16 8192^3)" if device == "cuda" else "matmul rate (fp32)", hw["flops"] / 1e12, "TFLOP/s"
        )
    model_dir = work / f"model-{shape}"
    t = time.perf_counter()
    model, tok = build_model(shape, args.tokenizer or default_tokenizer(), model_dir, device)
    params_n = sum(p.numel() for p in model.parameters())
    table.extra["params"] = params_n
    table.add(f"model built ({shape})", params_n / 1e9, "B params", note=f"{time.perf_counter() - t:.1f} s")
    gen_on = "gen" in ready and hw["bandwidth"]
    headline, rest = [max(batches)], [b for b in batches if b != max(batches)]
    if gen_on:  # the headline first: hf dynamic vs static at the largest batch
        generation(model, tok, hw, table, headline, new, device, deadline)
    train_parts = [p for p in ("sft", "dpo") if p in ready] if hw["flops"] else []
    if "sft" in train_parts:
        _free(device)
        training(model_dir, params_n, hw, table, work, steps, args.smoke, ["sft"], deadline)
    if gen_on:
        generation(model, tok, hw, table, rest, new, device, deadline)
        gen = table.extra.get("gen", {})
        table.add(
            f"best hf generation ({max(batches)} prompts x {new} tokens)",
            max((v for k, v in gen.items() if k.endswith(f"/{max(batches)}")), default=None),
            "tokens/s",
            note="target >= 10,000 on one H200",
        )
    sizes = model_sizes(model)
    del model
    _free(device)
    if gen_on:
        generation_vllm(sizes, model_dir, hw, table, batches, new, device, deadline)
    if "dpo" in train_parts:
        training(model_dir, params_n, hw, table, work, steps, args.smoke, ["dpo"], deadline)
    if "flagship" in ready:
        table.extra["flagship"] = flagships(table, work, model_dir, deadline, args.smoke)
    table.extra["elapsed_s"] = time.time() - start
    table.print()
    table.save()
    payload = {"table": table.rows, **table.extra}
    print(json.dumps(payload, default=str))
    return payload


def _free(device: str) -> None:
    import gc

    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
