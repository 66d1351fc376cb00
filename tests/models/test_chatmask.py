"""engine.models.chatmask: assistant-only loss for chat templates without generation markers.

Each template family below is written here, in its own token format (ChatML with a default
system prompt as SmolLM2/Qwen2.5 have, Llama-3, Mistral [INST], Gemma, Phi-3, Zephyr), and
tokenized by a byte-level tokenizer that knows its special tokens. For each, a multi-turn
conversation with a system message is masked by rendering, and the sft stage's own mask check
(`mask_problems`, the judge on every run) must find nothing wrong."""

from __future__ import annotations

import pytest

from engine.lib.trainer import mask_problems
from engine.models import chatmask as cm

CHATML = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
MISTRAL = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set system = none %}{%- set loop_messages = messages %}"
    "{%- endif %}{{ bos_token }}{%- for message in loop_messages %}{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system %}{{ '[INST] ' + system + '\n\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- else %}{{ ' ' + message['content'] + eos_token }}{%- endif %}{%- endfor %}"
)
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] + '\n\n' %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set sys = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (sys if loop.first else '') + message['content'] | trim + "
    "'<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
PHI3 = (  # closes the whole conversation with eos when no generation prompt follows
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
ZEPHYR = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n'  + message['content'] + eos_token }}{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}{% endfor %}"
)

FAMILIES = {  # template, special tokens (bos, eos, extra), the end-of-turn token generation must stop at
    "chatml": (CHATML, ("<|im_start|>", "<|im_end|>", []), "<|im_end|>"),
    "llama3": (
        LLAMA3,
        ("<|begin_of_text|>", "<|end_of_text|>", ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
        "<|eot_id|>",
    ),
    "mistral": (MISTRAL, ("<s>", "</s>", []), "</s>"),
    "gemma": (GEMMA, ("<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"]), "<end_of_turn>"),
    "phi3": (PHI3, ("<s>", "<|endoftext|>", ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]), "<|end|>"),
    "zephyr": (ZEPHYR, ("<s>", "</s>", []), "</s>"),
}

CONVERSATION = [
    {"role": "system", "content": "You answer briefly and kindly."},
    {"role": "user", "content": "What is the boiling point of water at sea level?"},
    {"role": "assistant", "content": "It boils at 100 degrees Celsius at sea level."},
    {"role": "user", "content": "And on a high mountain?"},
    {"role": "assistant", "content": "Lower: the air pressure is lower, so it boils below 100."},
    {"role": "user", "content": "Thanks, that helps."},
    {"role": "assistant", "content": "Glad it helped!"},
]


def make_tokenizer(template: str, bos: str, eos: str, extra: list[str]):
    """A byte-level tokenizer (one token per byte) with the family's special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from engine.models.builtins import _byte_symbols

    core = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(_byte_symbols())}, merges=[], fuse_unk=False))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([bos, eos, *extra])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=bos, eos_token=eos, pad_token=eos, clean_up_tokenization_spaces=False
    )
    tok.chat_template = template
    return tok


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_is_masked_exactly_on_assistant_turns(family):
    template, (bos, eos, extra), stop = FAMILIES[family]
    tok = make_tokenizer(template, bos, eos, extra)
    special = {"bos_token": bos, "eos_token": eos}
    assert cm.masking(template, cm.jinja_render(template, special), [bos, eos, *extra]) == "derived"
    ids, mask = cm.masked_ids(tok, CONVERSATION)
    assert ids == list(tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"])
    labels = [i if m else -100 for i, m in zip(ids, mask)]
    shown, problems = mask_problems(tok, CONVERSATION, ids, labels)
    assert problems == [], shown
    supervised = tok.decode([i for i, m in zip(ids, mask) if m])
    for m in CONVERSATION:
        assert (m["content"] in supervised) == (m["role"] == "assistant"), (m, supervised)
    assert supervised.count(stop) >= 3  # every turn's end-of-turn token is learned
    assert tok.convert_ids_to_tokens(cm.stop_token_ids(tok)).count(stop) == 1


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_jinja_rendering_matches_transformers(family):
    """validate renders without transformers: it must render exactly what the tokenizer renders."""
    template, (bos, eos, extra), _ = FAMILIES[family]
    tok = make_tokenizer(template, bos, eos, extra)
    render = cm.jinja_render(template, {"bos_token": bos, "eos_token": eos})
    for gen in (False, True):
        assert render(CONVERSATION[:-1], gen) == tok.apply_chat_template(
            CONVERSATION[:-1], tokenize=False, add_generation_prompt=gen
        )


def test_default_system_prompt_is_not_supervised():
    tok = make_tokenizer(CHATML, "<|im_start|>", "<|im_end|>", [])
    ids, mask = cm.masked_ids(tok, CONVERSATION[1:])
    supervised = tok.decode([i for i, m in zip(ids, mask) if m])
    assert "helpful assistant" not in supervised and "100 degrees" in supervised


def test_llama3_stops_at_eot_not_only_eos():
    template, (bos, eos, extra), _ = FAMILIES["llama3"]
    tok = make_tokenizer(template, bos, eos, extra)
    names = tok.convert_ids_to_tokens(cm.stop_token_ids(tok))
    assert names == ["<|end_of_text|>", "<|eot_id|>"]


SYSTEM_IN_LAST_USER = (  # as some Mistral templates do: the system prompt moves to the latest user turn
    "{%- set sys = messages[0]['content'] if messages[0]['role'] == 'system' else '' %}"
    "{%- set ns = namespace(last=-1) %}{%- for m in messages %}{%- if m['role'] == 'user' %}"
    "{%- set ns.last = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}{%- if m['role'] == 'user' %}[INST] {{ (sys + '\n\n') if loop.index0 == ns.last else '' }}"
    "{{ m['content'] }} [/INST]{%- elif m['role'] == 'assistant' %} {{ m['content'] }}</s>{%- endif %}{%- endfor %}"
)
DROPS_EARLIER_REPLIES = (  # keeps only the last reply in full (as reasoning-dropping templates do to thoughts)
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and not loop.last %}{{ m['content'][:5] }}{% else %}{{ m['content'] }}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
NO_END_MARKER = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


@pytest.mark.parametrize(
    "template, why",
    [
        (SYSTEM_IN_LAST_USER, "not prefix-stable"),
        (DROPS_EARLIER_REPLIES, "not prefix-stable"),
        (NO_END_MARKER, "no end-of-turn marker"),
    ],
)
def test_templates_that_cannot_be_masked_say_why(template, why):
    with pytest.raises(cm.TemplateProblem, match=why):
        cm.masking(template, cm.jinja_render(template, {"eos_token": "</s>"}), ["</s>"])


def test_markers_and_trl_templates_are_recognised():
    from engine.models.builtins import CHAT_TEMPLATE

    assert cm.masking(CHAT_TEMPLATE, cm.jinja_render(CHAT_TEMPLATE)) == "markers"
    trl = cm._trl_templates()
    assert trl, "TRL's chat_templates folder was not found"
    llama3 = next(t for t in trl if "<|start_header_id|>" in t)
    assert cm.masking(llama3, cm.jinja_render(llama3)) == "trl"
    assert cm.has_generation_markers(cm.trl_training_template(llama3))


def test_smollm2_tokenizer_is_masked(smollm2_dir):
    """The real SmolLM2 tokenizer (49,152-token BPE, ChatML with a default system prompt)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    template, special = cm.folder_template(smollm2_dir)
    assert template == tok.chat_template and special["eos_token"] == "<|im_end|>"
    assert cm.masking(template, cm.jinja_render(template, special), list(special.values())) == "derived"
    for conv in (CONVERSATION, CONVERSATION[1:]):
        ids, mask = cm.masked_ids(tok, conv)
        labels = [i if m else -100 for i, m in zip(ids, mask)]
        shown, problems = mask_problems(tok, conv, ids, labels)
        assert problems == [], shown
        assert "SmolLM" not in tok.decode([i for i, m in zip(ids, mask) if m])
    assert tok.convert_ids_to_tokens(cm.stop_token_ids(tok)) == ["<|im_end|>"]
    assert tok.pad_token == "<|endoftext|>"  # never the end-of-turn token the model must learn
