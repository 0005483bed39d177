"""Real models' chat templates (tests/chat_templates, see its README for where each comes from), attached to a
tokenizer built offline with the model's special tokens: which tokens carry loss, token by token, against an
independent render (apply_chat_template, with the trained text written out by hand); multi-turn Phi-3 and Qwen3;
reasoning a template drops; roles a template refuses; and render-once agreeing with the exact path (seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ft_cli.data.formats import Example, Origin, make_converter
from ft_cli.data.pipeline import build_datasets
from ft_cli.data.render import ChatRenderer
from ft_cli.errors import UserError

IGNORE = -100
TEMPLATES = Path(__file__).resolve().parent / "chat_templates"
LLAMA3 = ("<|begin_of_text|>", "<|eot_id|>", ["<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
                                               "<|python_tag|>"])
PHI3 = ("<s>", "<|endoftext|>", ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"])
QWEN = (None, "<|im_end|>", ["<|im_start|>", "<|endoftext|>"])
DEEPSEEK = ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", ["<｜User｜>", "<｜Assistant｜>"])
# template file -> (bos_token or None when the tokenizer adds none, eos_token, other special tokens)
MODELS = {
    "llama3_1": LLAMA3, "llama3_2": LLAMA3, "qwen2_5": QWEN, "qwen3": QWEN, "qwen3_training": QWEN,
    "mistral_v0_3": ("<s>", "</s>", ["[INST]", "[/INST]"]),
    "gemma": ("<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"]),
    "phi3": PHI3, "phi3_5": PHI3,
    "deepseek_r1_distill": DEEPSEEK, "deepseek_r1_distill_2025_01": DEEPSEEK, "deepseek_r1_distill_training": DEEPSEEK,
}


def model_tokenizer(tiny_llama_dir: Path, name: str):
    """The built-in BPE tokenizer with model `name`'s special tokens, bos/eos and chat template; like the real
    tokenizers, it puts bos in front when encoding with special tokens (all but Qwen)."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    bos, eos, specials = MODELS[name]
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tok.add_special_tokens({"additional_special_tokens": [*specials, eos, *([bos] if bos else [])]},
                           replace_extra_special_tokens=False)
    tok.eos_token = eos
    if bos is not None:
        tok.bos_token = bos
        tok.backend_tokenizer.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.convert_tokens_to_ids(bos))]),
        ])
    tok.chat_template = (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")
    return tok


@pytest.fixture
def tokenizer_for(tiny_llama_dir):
    return lambda name: model_tokenizer(tiny_llama_dir, name)


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


def rows(bundle) -> list[tuple[list[int], list[int]]]:
    return [(r["input_ids"], r["labels"]) for r in bundle.train]


def expected_labels(tok, messages: list[dict], trained: list[str]) -> tuple[list[int], list[int]]:
    """Independent of ft: the text apply_chat_template renders, tokenized, and every token whose first character
    lies in one of the hand-written `trained` strings (found in order) labelled; bos in front if the tokenizer adds
    it and the template did not render it."""
    text = tok.apply_chat_template(messages, tokenize=False)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    spans, pos = [], 0
    for piece in trained:
        start = text.index(piece, pos)
        spans.append((start, start + len(piece)))
        pos = start + len(piece)
    ids = list(enc["input_ids"])
    labels = [i if any(a <= s < b for a, b in spans) else IGNORE for i, (s, _) in zip(ids, enc["offset_mapping"],
                                                                                      strict=True)]
    if tok.bos_token is not None and MODELS_ADD_BOS(tok) and not text.startswith(tok.bos_token):
        ids, labels = [tok.bos_token_id, *ids], [IGNORE, *labels]
    labels[0] = IGNORE
    return ids, labels


def MODELS_ADD_BOS(tok) -> bool:  # noqa: N802 - reads like the constant it stands for
    return tok("x").input_ids[:1] == [tok.bos_token_id]


def trained_runs(tok, ids: list[int], labels: list[int]) -> list[str]:
    runs, current = [], []
    for i, label in zip(ids, labels, strict=True):
        if label != IGNORE:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tok.decode(r, skip_special_tokens=False) for r in runs]


SINGLE = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "Four."}]
MULTI = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
         {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "  Goodbye.\n"}]
WITH_SYSTEM = [{"role": "system", "content": "Be brief."}, *MULTI]

# What each model's template trains in MULTI: every assistant turn and what ends it, nothing else.
TRAINED = {
    "llama3_1": ["Hello!<|eot_id|>", "Goodbye.<|eot_id|>"],  # `| trim` on contents
    "llama3_2": ["Hello!<|eot_id|>", "Goodbye.<|eot_id|>"],
    "qwen2_5": ["Hello!<|im_end|>\n", "  Goodbye.\n<|im_end|>\n"],
    "mistral_v0_3": [" Hello!</s>", " Goodbye.</s>"],
    "gemma": ["Hello!<end_of_turn>\n", "Goodbye.<end_of_turn>\n"],
    # Phi-3 appends eos only after the last message: it trains there, and nowhere mid-conversation.
    "phi3": ["Hello!<|end|>\n", "  Goodbye.\n<|end|>\n<|endoftext|>"],
    "phi3_5": ["Hello!<|end|>\n", "  Goodbye.\n<|end|>\n<|endoftext|>"],
    "deepseek_r1_distill_2025_01": ["Hello!<｜end▁of▁sentence｜>", "  Goodbye.\n<｜end▁of▁sentence｜>"],
}


def build(tmp_path, data_recipe, tok, records: list[dict], **data):
    path = write_jsonl(tmp_path / "c.jsonl", records)
    return build_datasets(data_recipe(path, format="chat", **data), tok)


@pytest.mark.parametrize("name", sorted(TRAINED))
def test_real_templates_train_every_assistant_turn_token_by_token(tmp_path, data_recipe, tokenizer_for, name):
    tok = tokenizer_for(name)
    conversations = [MULTI, [*WITH_SYSTEM]] if name not in ("gemma", "mistral_v0_3") else [MULTI]
    bundle = build(tmp_path, data_recipe, tok, [{"messages": m} for m in conversations])
    assert len(bundle.train) == len(conversations) and bundle.train_stats.split_rows == 0
    for (ids, labels), messages in zip(rows(bundle), conversations, strict=True):
        assert (ids, labels) == expected_labels(tok, messages, TRAINED[name])
        assert trained_runs(tok, ids, labels) == TRAINED[name]
    single_ids, single_labels = rows(build(tmp_path, data_recipe, tok, [{"messages": SINGLE}]))[0]
    assert len(trained_runs(tok, single_ids, single_labels)) == 1
    assert "What is 2+2?" not in tok.decode([i for i, lab in zip(single_ids, single_labels, strict=True)
                                             if lab != IGNORE])


def test_phi3_multi_turn_has_no_eos_mid_conversation(tmp_path, data_recipe, tokenizer_for):
    tok = tokenizer_for("phi3")
    (ids, labels), = rows(build(tmp_path, data_recipe, tok, [{"messages": MULTI}]))
    eos = tok.eos_token_id
    assert ids.count(eos) == 1 and ids[-1] == eos and labels[-1] == eos  # the closing eos, trained
    assert ids[0] == tok.bos_token_id  # the tokenizer's bos: the template renders none
    assert tok.decode(ids[1:]) == tok.apply_chat_template(MULTI, tokenize=False)


# Qwen3: earlier turns lose their <think> block --------------------------------------------------------------------

QWEN3_REASONING = {"messages": [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!", "reasoning_content": "A greeting."},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Goodbye.", "reasoning_content": "They leave."},
]}


def test_qwen3_multi_turn_trains_each_turn_as_the_model_sees_it(tmp_path, data_recipe, tokenizer_for):
    tok = tokenizer_for("qwen3")
    bundle = build(tmp_path, data_recipe, tok, [QWEN3_REASONING, {"messages": MULTI[:2]}])
    s = bundle.train_stats
    assert (s.rows_in, s.rows, s.split_rows, s.extra_samples) == (2, 3, 1, 1)
    (full_ids, full_labels), (turn_ids, turn_labels), (single_ids, single_labels) = rows(bundle)
    # The whole conversation: the last turn trains with its reasoning; turn 1 is history, shown as inference
    # shows it (no <think> block), and masked.
    assert tok.decode(full_ids) == tok.apply_chat_template(QWEN3_REASONING["messages"], tokenize=False)
    assert "<|im_start|>assistant\nHello!<|im_end|>" in tok.decode(full_ids)
    assert trained_runs(tok, full_ids, full_labels) == ["<think>\nThey leave.\n</think>\n\nGoodbye.<|im_end|>\n"]
    # Turn 1 in a sample of its own, as the model writes it when it is the newest turn: reasoning included.
    assert tok.decode(turn_ids) == tok.apply_chat_template(QWEN3_REASONING["messages"][:2], tokenize=False)
    assert trained_runs(tok, turn_ids, turn_labels) == ["<think>\nA greeting.\n</think>\n\nHello!<|im_end|>\n"]
    # Data without reasoning: the empty think block Qwen3 writes in non-thinking mode trains with the answer.
    assert trained_runs(tok, single_ids, single_labels) == ["<think>\n\n</think>\n\nHello!<|im_end|>\n"]
    assert bundle.notes and "1 of 2 conversations" in bundle.notes[0] and "+1 samples" in bundle.notes[0]
    for ids, labels in rows(bundle):  # each sample's trained tokens follow exactly its own inference prompt
        first = next(i for i, lab in enumerate(labels) if lab != IGNORE)
        assert tok.decode(ids[:first]).endswith("<|im_start|>assistant\n")


def test_qwen3_tool_call_turns_train_at_their_own_position(tmp_path, data_recipe, tokenizer_for):
    tok = tokenizer_for("qwen3")
    call = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}
    record = {"messages": [{"role": "user", "content": "Weather in Oslo?"},
                           {"role": "assistant", "content": "", "tool_calls": [call]},
                           {"role": "tool", "content": "rain"},
                           {"role": "assistant", "content": "It rains."}]}
    (full_ids, full_labels), (call_ids, call_labels) = rows(build(tmp_path, data_recipe, tok, [record]))
    assert trained_runs(tok, full_ids, full_labels) == ["<think>\n\n</think>\n\nIt rains.<|im_end|>\n"]
    assert trained_runs(tok, call_ids, call_labels) == [
        '<think>\n\n</think>\n\n<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
        '<|im_end|>\n']


def test_trl_patched_qwen3_template_trains_one_sample_with_all_reasoning(tmp_path, data_recipe, tokenizer_for):
    """The alternative the docs name: TRL's qwen3_training.jinja keeps every turn's reasoning in history."""
    tok = tokenizer_for("qwen3_training")
    bundle = build(tmp_path, data_recipe, tok, [QWEN3_REASONING])
    (ids, labels), = rows(bundle)
    assert bundle.train_stats.split_rows == 0 and not bundle.notes
    assert trained_runs(tok, ids, labels) == ["<think>\nA greeting.\n</think>\n\nHello!<|im_end|>\n",
                                              "<think>\nThey leave.\n</think>\n\nGoodbye.<|im_end|>\n"]


def test_validate_show_states_what_qwen3_trains(tmp_path):
    from typer.testing import CliRunner

    from ft_cli.cli import app

    data = write_jsonl(tmp_path / "c.jsonl", [QWEN3_REASONING])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"model": {"name_or_path": "builtin:tiny-qwen3"}, "data": {
        "train": data, "format": "chat", "val_split": 0.0, "cache": False,
        "chat_template": str(TEMPLATES / "qwen3.jinja")}}))
    result = CliRunner().invoke(app, ["validate", str(recipe), "--show", "2"])
    assert result.exit_code == 0, result.output
    out = " ".join(result.stdout.split())
    assert "conversations split per assistant turn" in out and "1 (+1 samples)" in out
    assert "note: 1 of 1 conversations have assistant turns that the chat template renders differently" in out
    assert "example 0" in out and "example 1" in out and "They leave." in out and "A greeting." in out


# Reasoning a template leaves out -----------------------------------------------------------------------------------

R1 = [{"messages": [{"role": "user", "content": f"Q{i}"},
                    {"role": "assistant", "content": f"<think>\nStep {i}.\n</think>\n\nA{i}."}]} for i in range(2)]


def test_deepseek_r1_reasoning_left_out_is_a_loud_warning_with_the_count(tmp_path, data_recipe, tokenizer_for):
    tok = tokenizer_for("deepseek_r1_distill_2025_01")
    plain = {"messages": SINGLE}
    bundle = build(tmp_path, data_recipe, tok, [*R1, plain])
    (ids, labels), *_ = rows(bundle)
    assert trained_runs(tok, ids, labels) == ["\n\nA0.<｜end▁of▁sentence｜>"]  # the template's own text
    assert "Step 0" not in tok.decode(ids)
    assert bundle.train_stats.lost_rows == 2
    warning, = [w for w in bundle.warnings if "leaves part of the assistant text out" in w]
    assert "in 2 of 3 conversations" in warning and "c.jsonl:record 0" in warning and "</think>" in warning


def test_a_reasoning_field_the_template_never_renders_is_reported(tmp_path, data_recipe, tokenizer_for):
    tok = tokenizer_for("llama3_1")
    bundle = build(tmp_path, data_recipe, tok, [QWEN3_REASONING, {"messages": MULTI}])
    assert bundle.train_stats.lost_rows == 1
    assert any("1 of 2 conversations" in w and "reasoning_content" in w for w in bundle.warnings)


def test_train_prints_the_warning_too(tmp_path):
    from typer.testing import CliRunner

    from ft_cli.cli import app

    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({
        "model": {"name_or_path": "builtin:tiny-llama", "dtype": "float32"}, "method": "lora",
        "data": {"train": write_jsonl(tmp_path / "c.jsonl", R1), "format": "chat", "val_split": 0.0,
                 "cache": False, "chat_template": str(TEMPLATES / "deepseek_r1_distill_2025_01.jinja")},
        "train": {"max_steps": 1, "micro_batch_size": 2, "grad_accum": 1, "eval_every": None, "save_every": None},
        "output_dir": str(tmp_path / "run")}))
    result = CliRunner().invoke(app, ["train", str(recipe)])
    assert result.exit_code == 0, result.output
    assert "warning: the chat template leaves part of the assistant text out of the training text in 2 of 2" \
        in " ".join(result.stderr.split())


def test_current_deepseek_r1_template_is_refused_with_its_reason(tmp_path, data_recipe, tokenizer_for):
    tok = tokenizer_for("deepseek_r1_distill")
    with pytest.raises(UserError) as err:
        build(tmp_path, data_recipe, tok, R1)
    msg = str(err.value)
    assert "not prefix-consistent" in msg and "c.jsonl:record 0" in msg
    assert "The generation prompt ends with '<think>\\n'" in msg and "strips the reasoning" in msg


def test_trl_deepseek_r1_training_template_trains_the_reasoning(tmp_path, data_recipe, tokenizer_for):
    """The fix both messages above name: a template that keeps the reasoning after the '<think>\n' prompt."""
    tok = tokenizer_for("deepseek_r1_distill_training")
    bundle = build(tmp_path, data_recipe, tok, R1)
    (ids, labels), _ = rows(bundle)
    assert trained_runs(tok, ids, labels) == ["Step 0.\n</think>\n\nA0.<｜end▁of▁sentence｜>"]
    first_trained = next(i for i, lab in enumerate(labels) if lab != IGNORE)
    assert tok.decode(ids[:first_trained]).endswith("<｜Assistant｜><think>\n")  # the prompt inference uses
    assert bundle.train_stats.lost_rows == 0 and not any("leaves part" in w for w in bundle.warnings)


# Roles a template refuses ---------------------------------------------------------------------------------------

def test_gemma_system_role_names_the_rule_and_the_fix(tmp_path, data_recipe, tokenizer_for):
    tok = tokenizer_for("gemma")
    with pytest.raises(UserError) as err:
        build(tmp_path, data_recipe, tok, [{"messages": WITH_SYSTEM}])
    msg = str(err.value)
    assert "c.jsonl:record 0" in msg and "System role not supported" in msg
    assert "data.system_message: merge_into_first_user" in msg
    (ids, labels), = rows(build(tmp_path, data_recipe, tok, [{"messages": WITH_SYSTEM}],
                                system_message="merge_into_first_user"))
    merged = [{"role": "user", "content": "Be brief.\n\nHi"}, *MULTI[1:]]
    assert (ids, labels) == expected_labels(tok, merged, TRAINED["gemma"])


def test_gemma_alternation_rule_is_named_with_the_roles(tmp_path, data_recipe, tokenizer_for):
    tok = tokenizer_for("gemma")
    record = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                           {"role": "assistant", "content": "c"}]}
    with pytest.raises(UserError, match=r"Conversation roles must alternate user/assistant.*roles in this record: "
                                        r"user, user, assistant"):
        build(tmp_path, data_recipe, tok, [record])


def test_mistral_system_placement_names_the_rule_and_the_fix(tmp_path, data_recipe, tokenizer_for):
    tok = tokenizer_for("mistral_v0_3")
    single = [{"role": "system", "content": "Be brief."}, *SINGLE]
    with pytest.raises(UserError) as err:
        build(tmp_path, data_recipe, tok, [{"messages": single}])
    msg = str(err.value)
    assert "[INST] Be brief.\\n\\nWhat is 2+2?[/INST]" in msg and "The system message is what moves" in msg
    assert "data.system_message: merge_into_first_user" in msg
    bundle = build(tmp_path, data_recipe, tok, [{"messages": single}, {"messages": WITH_SYSTEM}],
                   system_message="merge_into_first_user")
    (ids, labels), (multi_ids, multi_labels) = rows(bundle)
    assert tok.decode(ids) == "<s>[INST] Be brief.\n\nWhat is 2+2?[/INST] Four.</s>"  # as inference renders it
    assert trained_runs(tok, ids, labels) == [" Four.</s>"]
    assert trained_runs(tok, multi_ids, multi_labels) == TRAINED["mistral_v0_3"]


def test_merge_into_first_user_needs_a_user_message(tmp_path, data_recipe, tokenizer_for):
    tok = tokenizer_for("gemma")
    record = {"messages": [{"role": "system", "content": "S"}, {"role": "assistant", "content": "A"}]}
    with pytest.raises(UserError, match=r"record 0 \(line 1\): data.system_message: merge_into_first_user: .* no user message"):
        build(tmp_path, data_recipe, tok, [record], system_message="merge_into_first_user")


# Render once ------------------------------------------------------------------------------------------------------

def _examples(records: list[dict]) -> list[Example]:
    convert = make_converter("chat", None)
    return [convert(r, Origin("x", i)) for i, r in enumerate(records)]


VARIED = [{"messages": m} for m in (
    SINGLE, MULTI, WITH_SYSTEM,
    [{"role": "user", "content": "  padded  \n"}, {"role": "assistant", "content": "\n\nlines\n\n"}],
    [{"role": "user", "content": "Say {x} and 100% {{y}}"}, {"role": "assistant", "content": "<b>{x}</b> \\n"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}, {"role": "user", "content": "b"},
     {"role": "assistant", "content": "c"}],
    [{"role": "user", "content": "ünïcödé 中文"}, {"role": "assistant", "content": "ок 👍"}],
)]


@pytest.mark.parametrize("name", ["chatml", "llama3_1", "llama3_2", "qwen2_5", "gemma", "mistral_v0_3", "phi3",
                                  "phi3_5"])
def test_render_once_gives_what_the_exact_path_gives(tiny_llama_dir, name):
    tok = model_tokenizer(tiny_llama_dir, "qwen2_5") if name == "chatml" else model_tokenizer(tiny_llama_dir, name)
    if name == "chatml":
        from ft_cli.data.templates import builtin_template

        tok.chat_template = builtin_template("chatml")
    records = [r for r in VARIED if name not in ("gemma", "mistral_v0_3") or r["messages"][0]["role"] != "system"]
    examples = [ex for ex in _examples(records) if ex is not None]
    once, exact = ChatRenderer(tok), ChatRenderer(tok, fast=False)
    for ex in examples:
        fast, slow = once.conversation(ex), exact.conversation(ex)
        assert [(s.text, s.spans) for s in fast.samples] == [(s.text, s.spans) for s in slow.samples]
        assert fast.samples[0].text == tok.apply_chat_template(ex.messages, tokenize=False)
    assert once.shapes.plans and all(p is not None for p in once.shapes.plans.values()), once.shapes.reasons


@pytest.mark.parametrize("name", ["qwen3", "deepseek_r1_distill_2025_01"])
def test_templates_that_read_contents_take_the_exact_path(tiny_llama_dir, name):
    tok = model_tokenizer(tiny_llama_dir, name)
    once = ChatRenderer(tok)
    for ex in _examples([{"messages": MULTI}]):
        assert [s.text for s in once.conversation(ex).samples] == \
            [s.text for s in ChatRenderer(tok, fast=False).conversation(ex).samples]
    reason, = once.shapes.reasons.values()
    assert "inspects message contents" in reason


@pytest.mark.parametrize("use", [
    "{% if 'x' in m.content %}!{% endif %}", "{{ m.content | length }}", "{{ m.content | upper }}",
    "{% if m.content == 'q' %}!{% endif %}", "{{ m.content[0] }}", "{{ (m.content ~ ' ') | trim }}",
    "{{ m.content.split(' ')[0] }}", "{{ m.content.format(1) }}", "{% if m.content is lower %}!{% endif %}",
    "{{ m.content | tojson }}", "{{ m | tojson }}", "{% for c in m.content %}{% endfor %}",
])
def test_any_use_of_a_content_sends_the_shape_to_the_exact_path(data_tokenizer, use):
    data_tokenizer.chat_template = (
        "{% for m in messages %}<{{ m.role }}>" + use + "{{ m.content }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}")
    once = ChatRenderer(data_tokenizer)
    ex, = _examples([{"messages": SINGLE}])
    assert once.conversation(ex).samples[0].text == data_tokenizer.apply_chat_template(SINGLE, tokenize=False)
    assert list(once.shapes.plans.values()) == [None]
    assert "inspects message contents" in next(iter(once.shapes.reasons.values()))


def test_a_content_given_to_another_strings_method_takes_the_exact_path(data_tokenizer):
    """'yes no'.startswith(content) reads the content where no placeholder can see it; the sandbox's call sees it,
    and the shape takes the exact path, which renders 'yes' differently."""
    data_tokenizer.chat_template = (
        "{% for m in messages %}{% if 'yes no'.startswith(m.content) %}<{{ m.role }}*>{% else %}<{{ m.role }}>"
        "{% endif %}{{ m.content }}</s>{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    once = ChatRenderer(data_tokenizer)
    examples = _examples([{"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": "ok"}]}
                          for u in ("hello", "yes")])
    texts = [once.conversation(ex).samples[0] for ex in examples]
    assert [t.text for t in texts] == ["<user>hello</s><assistant>ok</s>", "<user*>yes</s><assistant>ok</s>"]
    assert [t.text[a:b] for t in texts for a, b in t.spans] == ["ok</s>", "ok</s>"]
    assert list(once.shapes.plans.values()) == [None]
    assert "str.startswith given a message content" in next(iter(once.shapes.reasons.values()))


def _chat(n: int) -> list[Example]:
    return _examples([{"messages": [{"role": "user", "content": f"question {i}"},
                                    {"role": "assistant", "content": f"answer {i}"}]} for i in range(n)])


def test_the_sampled_check_starts_again_when_renders_stop_matching(data_tokenizer, monkeypatch):
    """ft's tokenizing pass compares the first CHECK_FIRST conversations of a shape and every CHECK_EVERY-th after
    with a real render. A template whose output changes part-way (as a date would at midnight) fails a sampled
    check; the pass starts again with every conversation of that shape checked, so each text is the real render."""
    from ft_cli.data import encode, shapes

    examples = _chat(3 * encode.CHECK_EVERY + shapes.CHECK_FIRST)
    real = ChatRenderer.render
    changed = shapes.CHECK_FIRST + 3  # from this conversation on, the template renders differently

    def render(self, messages, tools=None, add_generation_prompt=False):
        text = real(self, messages, tools, add_generation_prompt)
        n = int(messages[0]["content"].split()[-1]) if messages else -1
        return text.replace("<|im_start|>user", "<|im_start|>user ") if n >= changed else text

    monkeypatch.setattr(ChatRenderer, "render", render)
    starts = []
    monkeypatch.setattr(encode, "_encode_pass", lambda *a, _real=encode._encode_pass: (starts.append(1), _real(*a))[1])
    settings = encode.EncodeSettings(512, "truncate", False)
    got = encode.encode_examples(examples, data_tokenizer, settings)
    assert len(starts) == 2  # the first pass found the change at a sampled check and started again
    renderer = ChatRenderer(data_tokenizer, fast=False)
    want = [data_tokenizer(renderer.conversation(ex).samples[0].text, add_special_tokens=False).input_ids
            for ex in examples]
    ends = np.cumsum(got.lengths)
    assert [got.ids[e - n:e].tolist() for e, n in zip(ends, got.lengths, strict=True)] == want

    monkeypatch.setattr(ChatRenderer, "render", real)  # an unchanging template: one pass, ~1 in CHECK_EVERY rendered
    calls = []
    monkeypatch.setattr(ChatRenderer, "render", lambda self, *a, **k: (calls.append(1), real(self, *a, **k))[1])
    starts.clear()
    encode.encode_examples(examples, data_tokenizer, settings)
    assert len(starts) == 1 and len(calls) < shapes.CHECK_FIRST + len(examples) // encode.CHECK_EVERY + 10


@pytest.mark.parametrize(("name", "volatile"), [("llama3_2", True), ("llama3_1", False), ("qwen2_5", False)])
def test_a_template_that_reads_the_clock_is_checked_conversation_by_conversation(tiny_llama_dir, name, volatile):
    """Llama 3.2's template calls strftime_now for the date: its plans are volatile, so every conversation is
    rendered for real even in the sampled pass; templates without such a call are sampled."""
    once = ChatRenderer(model_tokenizer(tiny_llama_dir, name))
    ex, = _examples([{"messages": SINGLE}])
    once.conversation(ex)
    plan, = once.shapes.plans.values()
    assert plan is not None and plan.volatile is volatile


def test_generate_merges_the_system_prompt_as_the_run_was_trained(tmp_path, data_tokenizer):
    from typer.testing import CliRunner

    from ft_cli.cli import app
    from ft_cli.generation import render_prompt

    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({
        "model": {"name_or_path": "builtin:tiny-llama", "dtype": "float32"}, "method": "lora",
        "data": {"train": write_jsonl(tmp_path / "c.jsonl", [{"messages": WITH_SYSTEM}] * 2), "format": "chat",
                 "val_split": 0.0, "cache": False, "chat_template": str(TEMPLATES / "gemma.jinja"),
                 "system_message": "merge_into_first_user"},
        "train": {"max_steps": 1, "micro_batch_size": 2, "grad_accum": 1, "eval_every": None, "save_every": None},
        "output_dir": str(tmp_path / "run")}))
    runner = CliRunner()
    assert runner.invoke(app, ["train", str(recipe)]).exit_code == 0
    result = runner.invoke(app, ["generate", str(tmp_path / "run"), "--system", "Be brief.", "-p", "Hi",
                                 "--temperature", "0", "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output
    data_tokenizer.chat_template = (TEMPLATES / "gemma.jinja").read_text()
    with pytest.raises(UserError, match="System role not supported .*merge_into_first_user"):
        render_prompt(data_tokenizer, "Hi", "Be brief.")
    assert data_tokenizer.decode(render_prompt(data_tokenizer, "Be brief.\n\nHi")).endswith(
        "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n")
