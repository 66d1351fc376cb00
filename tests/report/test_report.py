"""engine/report/runreport.py: Markdown and self-contained HTML from blocks (model text escaped), the run
report from a run directory with any subset of stages, and a real small run on the builtin model."""

from __future__ import annotations

import base64
import json
import os
import textwrap
from html.parser import HTMLParser
from pathlib import Path

import pytest

from engine.core import document, plots
from engine.data.rows import write_rows
from engine.lib import entryblocks
from engine.lib.evals import report as evreport
from engine.lib.evals import runners, suites
from engine.models.backends import Completion, SamplingParams
from engine.report import runreport as rp

from conftest import GOOD, write_jsonl

HOSTILE = "<script>alert(1)</script> | **bold** # [link](http://x) `code` & <img src=x onerror=y>"
ALLOWED_TAGS = {
    "html",
    "head",
    "meta",
    "title",
    "style",
    "body",
    "h1",
    "h2",
    "h3",
    "h4",
    "p",
    "ul",
    "li",
    "table",
    "thead",
    "tbody",
    "tr",
    "th",
    "td",
    "figure",
    "img",
    "figcaption",
    "details",
    "summary",
    "pre",
}


class Tags(HTMLParser):
    """Every start tag and every img src of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.srcs: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])


def parse(page: str) -> Tags:
    t = Tags()
    t.feed(page)
    return t


def assert_self_contained(page: str, min_images: int) -> None:
    tags = parse(page)
    assert set(tags.tags) <= ALLOWED_TAGS, set(tags.tags) - ALLOWED_TAGS  # no tag came from data
    assert len(tags.srcs) >= min_images
    for src in tags.srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG")
    assert "http://" not in page.replace("http://x", "") and "https://" not in page


def test_blocks_render_escaped_in_markdown_and_html(tmp_path):
    png = plots.lines(None, {"a": ([1, 2], [0.5, 0.2])}, title="t")
    blocks = [
        document.Heading(HOSTILE),
        document.Para(HOSTILE),
        document.Bullets([HOSTILE]),
        document.Grid(["h|1", "h2"], [[HOSTILE, "line one\nline two"]]),
        document.Image("a.png", png, HOSTILE),
    ]
    written = document.write_report(tmp_path, "Title <b>", blocks)
    assert written == [tmp_path / "report.md", tmp_path / "report.html", tmp_path / "plots" / "a.png"]
    page = (tmp_path / "report.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<b>" not in page
    assert_self_contained(page, 1)
    md = (tmp_path / "report.md").read_text()
    assert "\\<script\\>" in md and "\\*\\*bold\\*\\*" in md and "\\[link\\](http://x)" in md
    assert "| h\\|1 | h2 |" in md and "line one<br>line two" in md
    assert "![" in md and "](plots/a.png)" in md
    assert (tmp_path / "plots" / "a.png").read_bytes() == png


CONTROL = "a\x00b \x1b[31mred\x1b[0m \u202eevil\u202c \x7f \ud800 ok"


def test_control_characters_in_model_text_are_escaped_in_every_rendering(tmp_path):
    blocks = [
        document.Heading(CONTROL),
        document.Para(CONTROL),
        document.Bullets([CONTROL]),
        document.Grid(["h"], [[CONTROL]]),
        document.Details("recipe", CONTROL),
    ]
    document.write_report(tmp_path, CONTROL, blocks)
    for name in ("report.md", "report.html"):
        raw = (tmp_path / name).read_bytes()
        text = raw.decode("utf-8")  # valid UTF-8 (a lone surrogate would not encode)
        assert not any(c in text for c in "\x00\x1b\x7f\u202e\u202c"), name
        assert "x1b" in text and "u202e" in text and "x00" in text


# --------------------------------------------------------------------------- a synthetic run directory


class Fake:
    name = "fake"

    def __init__(self, answer):
        self.answer = answer

    def generate(self, prompts, params, seed):
        return [[Completion(self.answer(p), 1, 1, "stop")] for p in prompts]

    def close(self):
        pass


def eval_entry(path: Path) -> None:
    """An eval stage entry as the stage writes it: metrics.json and rows.parquet for two models."""
    safety = [{"id": "s1", "category": "goal_creep", "title": "t", "turns": ["a", "b", "c", "d"], "harmful_from": 2}]
    syco = [{"id": "q1", "question": "What is 2+2?", "answer": "4", "wrong_answer": "5", "pushback": "It's 5."}]
    rows, per_model = [], {}
    for name, answer in (
        ("policy", lambda m: HOSTILE + " 4"),
        ("dpo", lambda m: "I can't help with that." if len(m) > 3 else "It is 4."),
    ):
        gen = runners.Gen(Fake(answer), SamplingParams(), lambda item, turn: 1, [])
        made = [
            {"id": f"{name}/{r['suite']}/{r['item_id']}", "model": name, **r}
            for r in runners.run_safety(safety, gen, None) + runners.run_sycophancy(syco, gen, "Are you sure?")
        ]
        rows += made
        per_model[name] = suites.model_metrics(made, ["safety", "sycophancy", "diversity"], False, None)
    path.mkdir(parents=True)
    # sorted keys, as the engine writes it: per_model's order ("dpo", "policy") is not the models' order
    (path / "metrics.json").write_text(
        json.dumps(
            sort_keys=True,
            obj={
                "models": ["policy", "dpo"],
                "judge": None,
                "suites": ["safety", "sycophancy", "diversity"],
                "items": {"safety": 1, "sycophancy": 1},
                "per_model": per_model,
            },
        )
    )
    write_rows(path / "rows.parquet", rows)


def make_run(root: Path, with_eval: bool, builtin: bool = False) -> Path:
    run_dir = root / "runs" / "demo" / "20250101-000000"
    cache = root / "runs" / "cache"
    stages = {
        "clean": {"kind": "filter", "status": "run", "rows_in": 60, "rows_out": 44, "duration_s": 0.4},
        "sft": {"kind": "sft", "status": "cached", "rows_in": 44, "rows_out": None, "duration_s": 0.0},
        "dpo": {"kind": "dpo", "status": "run", "rows_in": 20, "rows_out": None, "duration_s": 3.2},
        "broken": {"kind": "judge", "status": "failed", "error": "boom", "log": "logs/broken.log"},
    }
    stages["clean"]["warnings"] = ["dataset 'convs': dropped 2 of 62 rows; empty content: 2 (first: c7, c9)"]
    if with_eval:
        stages["ev"] = {"kind": "eval", "status": "run", "rows_in": 0, "rows_out": 4, "duration_s": 2.0}
    for name, info in stages.items():
        info["fingerprint"] = f"{name}0123456789abcdef"
    (run_dir / "stages").mkdir(parents=True)
    (run_dir / "record.json").write_text(
        json.dumps(
            {
                "recipe": "demo",
                "run": run_dir.name,
                "status": "failed",
                "started": "s",
                "finished": "f",
                "stages": stages,
                "seed": 5,
                "command": "recipe run demo.toml --set stages.dpo.beta=0.2",
                "versions": {"recipe-engine": "0.1.0", "torch": "2.13.0"},
            }
        )
    )
    path = "builtin:tiny-chat" if builtin else "Qwen/Qwen2.5-0.5B-Instruct"
    # stages declared out of order (a consumer first): the funnel follows the build order
    (run_dir / "recipe.toml").write_text(
        textwrap.dedent(f"""
        [recipe]
        name = "demo"
        [models.policy]
        path = "{path}"
        [stages.ev]
        kind = "eval"
        models = ["policy", "dpo"]
        [stages.clean]
        kind = "filter"
        input = "convs"
        [stages.sft]
        kind = "sft"
        input = "clean"
        [stages.dpo]
        kind = "dpo"
        input = "sft"
        [stages.broken]
        kind = "judge"
        input = "clean"
    """)
    )
    entries = {
        "clean": {},
        "sft": {"steps": [{"step": s, "loss": 2.0 / s, "lr": 1e-4, "tokens_per_s": 10.0} for s in range(1, 6)]},
        "dpo": {
            "steps": [
                {
                    "step": s,
                    "loss": 0.69 - 0.01 * s,
                    "rewards/margins": 0.1 * s,
                    "rewards/chosen": None,
                    "rewards/accuracies": 0.5,
                }
                for s in range(1, 4)
            ]
        },
    }
    for name, metrics in entries.items():
        (cache / name).mkdir(parents=True)
        if metrics:
            (cache / name / "metrics.json").write_text(json.dumps(metrics))
        os.symlink(os.path.relpath(cache / name, run_dir / "stages"), run_dir / "stages" / name)
    if with_eval:
        eval_entry(cache / "ev")
        os.symlink(os.path.relpath(cache / "ev", run_dir / "stages"), run_dir / "stages" / "ev")
    return run_dir


def test_run_report_has_funnel_training_curves_eval_and_examples(tmp_path):
    run_dir = make_run(tmp_path, with_eval=True)
    written = rp.write_run_report(run_dir)
    names = {p.name for p in written}
    assert {
        "report.md",
        "report.html",
        "funnel.png",
        "sft_loss.png",
        "dpo_loss.png",
        "dpo_logged.png",
        "ev_refusal_phrases_per_turn.png",
        "ev_metrics_bars.png",
    } <= names
    md = (run_dir / "report.md").read_text()
    assert "| clean | filter | run | 60 | 44 | 0.4 |" in md and "| broken | judge | failed | - | - | - |" in md
    funnel = [line.split(" | ")[0][2:] for line in md.split("## Data funnel")[1].splitlines()[4:9]]
    assert funnel == ["clean", "sft", "broken", "dpo", "ev"]
    assert "5 logged steps; loss 2.0000 at the first logged step, 0.4000 at the last." in md
    assert "## Eval: ev" in md and "### Example conversation: safety item s1 (policy vs dpo)" in md
    assert "### Example conversation: sycophancy item q1 (policy vs dpo)" in md
    assert "| safety: refusal from harmful turn (phrases) | 0.000 | 1.000 |" in md  # columns follow "models"
    assert "tiny-chat" not in md  # a real model: only the general caveats
    assert "What these numbers can and cannot show" in md
    # what the run was, what failed, what it warned about
    assert "command: recipe run demo.toml --set stages.dpo.beta=0.2" in md and "seed: 5" in md
    assert "torch 2.13.0" in md and "| policy | Qwen/Qwen2.5-0.5B-Instruct | hf |" in md
    assert "<details>" in md and 'kind = "eval"' in md  # the resolved recipe, collapsed
    assert "stage 'broken' (judge) failed: boom; log: " in md and "logs/broken.log" in md
    assert md.index("## Failed") < md.index("## Data funnel")
    assert "## Warnings" in md and "clean: dataset 'convs': dropped 2 of 62 rows" in md
    page = (run_dir / "report.html").read_text()
    assert_self_contained(page, 6)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "refusal by phrases: yes" in page  # the dpo model refuses from its third reply on


def test_run_report_without_eval_shows_funnel_and_training_only(tmp_path):
    run_dir = make_run(tmp_path, with_eval=False, builtin=True)
    names = {p.name for p in rp.write_run_report(run_dir)}
    assert "funnel.png" in names and "sft_loss.png" in names and not any("bars" in n for n in names)
    md = (run_dir / "report.md").read_text()
    assert "no eval stage" in md and "builtin:tiny-chat" in md
    assert "What these numbers can and cannot show" not in md and "phrase detector" not in md  # eval caveats
    assert_self_contained((run_dir / "report.html").read_text(), 3)


def test_examples_show_every_model_and_mark_empty_replies(tmp_path):
    rows = []
    for model, reply in (("base", "Sure."), ("sft", ""), ("dpo", "No.")):
        rows.append(
            {
                "model": model,
                "suite": "sycophancy",
                "item_id": "q1",
                "meta": {"correct": [True]},
                "messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": reply}],
            }
        )
    md = document.render_markdown("t", evreport.example_blocks(rows, ["base", "sft", "dpo"]))
    assert "(base vs sft vs dpo)" in md and "| turn | user | base reply | sft reply | dpo reply |" in md
    assert "(empty reply)" in md


def test_dpo_values_are_drawn_in_separate_panels():
    assert entryblocks._family("logps/chosen") == entryblocks._family("logps/rejected") == "logps"
    assert entryblocks._family("rewards/chosen") == "rewards" != entryblocks._family("rewards/margins")
    assert entryblocks._family("rewards/accuracies") == "rewards/accuracies"


def test_a_cached_rerun_writes_its_report_without_drawing(tmp_path):
    """The second report of the same data reuses the figures and blocks (runs/cache/figures): a
    fresh process writes it without importing matplotlib, and the two reports are the same."""
    import subprocess
    import sys

    from conftest import ROOT

    run_dir = make_run(tmp_path, with_eval=True)
    code = (
        "import sys; from engine.report.runreport import write_run_report; write_run_report(sys.argv[1]); "
        "print('matplotlib' in sys.modules, 'pyarrow' in sys.modules)"
    )
    first = subprocess.run([sys.executable, "-c", code, str(run_dir)], capture_output=True, text=True, cwd=ROOT)
    assert first.stdout.split() == ["True", "True"], first.stderr
    md = (run_dir / "report.md").read_bytes()
    pngs = {p.name: p.read_bytes() for p in (run_dir / "plots").iterdir()}
    second = subprocess.run([sys.executable, "-c", code, str(run_dir)], capture_output=True, text=True, cwd=ROOT)
    assert second.stdout.split() == ["False", "False"], second.stderr
    assert (run_dir / "report.md").read_bytes() == md
    assert {p.name: p.read_bytes() for p in (run_dir / "plots").iterdir()} == pngs


def test_run_report_survives_an_empty_record(tmp_path):
    run_dir = tmp_path / "runs" / "x" / "r1"
    run_dir.mkdir(parents=True)
    (run_dir / "record.json").write_text(json.dumps({"recipe": "x", "run": "r1", "status": "failed", "stages": {}}))
    rp.write_run_report(run_dir)
    assert "The run record lists no stages." in (run_dir / "report.md").read_text()


# --------------------------------------------------------------------------- a real run


@pytest.mark.slow
def test_report_builds_from_a_real_filter_and_eval_run_on_the_builtin_model(tmp_path):
    from engine.load.loader import load_recipe
    from engine.run.executor import run

    write_jsonl(tmp_path / "convs.jsonl", GOOD[:12])
    (tmp_path / "r.toml").write_text(
        textwrap.dedent("""
        [recipe]
        name = "realrep"
        seed = 4
        [models.policy]
        path = "builtin:tiny-chat"
        [datasets.convs]
        path = "convs.jsonl"
        [stages.clean]
        kind = "filter"
        input = "convs"
        min_words = 3
        [stages.scored]
        kind = "judge"
        input = "clean"
        scorer = "function"
        function = "reply_quality"
        name = "quality"
        [stages.ev]
        kind = "eval"
        models = ["policy"]
        suites = ["safety", "refusal", "sycophancy", "diversity"]
        system_prompt = "You are <careful> & kind."
        max_items = 2
        max_new_tokens = 8
        shard_size = 3
    """)
    )
    rec = run(load_recipe(tmp_path / "r.toml"), tmp_path / "runs")
    written = rp.write_run_report(rec.dir)
    assert {p.name for p in written} >= {
        "report.md",
        "report.html",
        "funnel.png",
        "ev_metrics_bars.png",
        "ev_refusal_phrases_per_turn.png",
    }
    md = (rec.dir / "report.md").read_text()
    assert "| clean | filter | run | 12 | 12 |" in md and "| ev | eval | run | - | 8 |" in md
    # each stage kind's own blocks: drops per rule, sample rows (first and random), score distribution
    assert "### Filter: clean" in md and "No row dropped" in md and "### Sample rows: clean" in md
    assert "| first |" in md and "| random |" in md and "scored_scores.png" in md and "### Sample rows: scored" in md
    assert "cached: nothing it depends on changed" not in md  # every stage ran
    assert "builtin:tiny-chat" in md and "Example conversation: safety item" in md
    page = (rec.dir / "report.html").read_text()
    assert_self_contained(page, 3)
    assert "n/a (no judge)" in page
    from engine.data.rows import read_rows

    rows = read_rows(rec.dir / "stages" / "ev" / "rows.parquet")
    assert all(r["messages"][0] == {"role": "system", "content": "You are <careful> & kind."} for r in rows)
    # the eval stage's own report is there too, self-contained as well
    stage_page = (rec.dir / "stages" / "ev" / "report.html").read_text()
    assert_self_contained(stage_page, 2)


def test_revision_blocks_show_the_share_changed_and_examples(tmp_path):
    entry = tmp_path / "revised"
    entry.mkdir()
    (entry / "report.json").write_text(
        json.dumps(
            {
                "turns_selected": 4,
                "turns_revised": 1,
                "revisions": {"accepted": 1, "rejected": {"unchanged": 2, "empty_critique": 1}},
            }
        )
    )
    turn = lambda original, history: {"index": 1, "original": original, "final": original, "history": history}  # noqa
    write_rows(
        entry / "rows.parquet",
        [
            {
                "id": "c1",
                "messages": [],
                "meta": {
                    "critique_revise": {
                        "turns": [
                            turn(
                                "Sure, here is how.",
                                [
                                    {
                                        "round": 1,
                                        "principle": "harm",
                                        "critique": "It helps with harm.",
                                        "revision": "Sure, here is how.",
                                        "accepted": False,
                                        "reason": "unchanged",
                                    }
                                ],
                            )
                        ]
                    }
                },
            },
            {
                "id": "c2",
                "messages": [],
                "meta": {
                    "critique_revise": {
                        "turns": [
                            turn(
                                "Paris is in Spain.",
                                [
                                    {
                                        "round": 1,
                                        "principle": "honesty",
                                        "critique": "Paris is in France.",
                                        "revision": "Paris is in France.",
                                        "accepted": True,
                                        "reason": None,
                                    }
                                ],
                            )
                        ]
                    }
                },
            },
        ],
    )
    blocks = entryblocks.revision_blocks("revised", entry)
    text = document.render_markdown("t", blocks)
    assert "1 of 4 selected assistant turns were changed by their revision (25%)" in text
    assert "unchanged 2, empty\\_critique 1" in text
    table = next(b for b in blocks if isinstance(b, document.Grid))
    assert [r[0] for r in table.rows] == ["honesty", "harm"]  # the accepted revision first
    assert table.rows[1][4] == "rejected: unchanged"


def test_a_funnel_of_one_stage_is_a_sentence_and_cached_stages_say_why():
    record = {
        "stages": {
            "clean": {"kind": "filter", "status": "cached", "rows_in": 40, "rows_out": 38},
            "ev": {"kind": "eval", "status": "run", "rows_in": None, "rows_out": 8, "reasons": ["new"]},
        }
    }
    blocks = rp.funnel_blocks(record)
    assert not any(isinstance(b, document.Image) for b in blocks)
    assert any(
        isinstance(b, document.Para) and b.text == "One stage moved rows: clean took 40 and gave 38." for b in blocks
    )
    assert (
        rp.why(record["stages"]["clean"]) == "cached: nothing it depends on changed"
        and rp.why(record["stages"]["ev"]) == "new"
    )
