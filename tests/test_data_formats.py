"""Data formats and loss masks: exactly which tokens are trained, per format and per chat template (seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ft_cli.data.pipeline import build_datasets, resolve_chat_template
from ft_cli.data.render import ChatRenderer
from ft_cli.errors import UserError

IGNORE = -100


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


def trained_runs(tok, ids: list[int], labels: list[int]) -> list[str]:
    """The decoded runs of consecutive trained tokens."""
    runs, current = [], []
    for i, label in zip(ids, labels, strict=True):
        if label != IGNORE:
            assert label == i, "a trained label must be the input token itself"
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tok.decode(r, skip_special_tokens=False) for r in runs]


def masked_text(tok, ids: list[int], labels: list[int]) -> str:
    return tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab == IGNORE], skip_special_tokens=False)


def rows(bundle) -> list[tuple[list[int], list[int]]]:
    return [(r["input_ids"], r["labels"]) for r in bundle.train]


CHAT = {"messages": [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "And three plus three?"},
    {"role": "assistant", "content": "Six, of course."},
]}


def test_alpaca_trains_only_the_output_and_its_end_of_turn(tmp_path, data_tokenizer, data_recipe):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Name a colour.", "input": "Not red.", "output": "Blue."}])
    (ids, labels), = rows(build_datasets(data_recipe(path), data_tokenizer))
    assert data_tokenizer.decode(ids) == ("<|im_start|>user\nName a colour.\nNot red.<|im_end|>\n"
                                          "<|im_start|>assistant\nBlue.<|im_end|>\n")
    assert trained_runs(data_tokenizer, ids, labels) == ["Blue.<|im_end|>\n"]
    assert "Name a colour." in masked_text(data_tokenizer, ids, labels)


def test_alpaca_system_and_history_train_every_answer(tmp_path, data_tokenizer, data_recipe):
    record = {"instruction": "And 3+3?", "input": "", "output": "6", "system": "Be brief.",
              "history": [["1+1?", "2"], ["2+2?", "4"]]}
    path = write_jsonl(tmp_path / "a.jsonl", [record])
    (ids, labels), = rows(build_datasets(data_recipe(path), data_tokenizer))
    assert trained_runs(data_tokenizer, ids, labels) == ["2<|im_end|>\n", "4<|im_end|>\n", "6<|im_end|>\n"]
    masked = masked_text(data_tokenizer, ids, labels)
    assert "Be brief." in masked and "1+1?" in masked and "And 3+3?" in masked


def test_chat_trains_every_assistant_turn_not_system_or_user(tmp_path, data_tokenizer, data_recipe):
    path = write_jsonl(tmp_path / "c.jsonl", [CHAT])
    (ids, labels), = rows(build_datasets(data_recipe(path, format="chat"), data_tokenizer))
    assert trained_runs(data_tokenizer, ids, labels) == ["Four.<|im_end|>\n", "Six, of course.<|im_end|>\n"]
    masked = masked_text(data_tokenizer, ids, labels)
    for text in ("You are terse.", "What is two plus two?", "And three plus three?", "<|im_start|>assistant\n"):
        assert text in masked


def test_train_on_inputs_trains_every_token_but_the_first(tmp_path, data_tokenizer, data_recipe):
    path = write_jsonl(tmp_path / "c.jsonl", [CHAT])
    (ids, labels), = rows(build_datasets(data_recipe(path, format="chat", train_on_inputs=True), data_tokenizer))
    assert labels[0] == IGNORE  # nothing predicts the first token
    assert labels[1:] == ids[1:]


def test_text_trains_every_token_and_ends_with_eos(shared_data, data_tokenizer, data_recipe):
    bundle = build_datasets(data_recipe(str(shared_data / "c4_demo.jsonl"), format="text", max_seq_len=100_000),
                            data_tokenizer)
    first = json.loads((shared_data / "c4_demo.jsonl").read_text().splitlines()[0])["text"]
    ids, labels = rows(bundle)[0]
    assert ids[-1] == data_tokenizer.eos_token_id
    assert labels[1:] == ids[1:]
    assert data_tokenizer.decode(ids) == first + "<|im_end|>"
    assert bundle.train_stats.rows == 300 and bundle.train_stats.truncated == 0


def test_text_needs_no_chat_template(tmp_path, data_tokenizer, data_recipe):
    data_tokenizer.chat_template = None
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "plain text"}])
    (ids, labels), = rows(build_datasets(data_recipe(path, format="text"), data_tokenizer))
    assert data_tokenizer.decode(ids) == "plain text<|im_end|>"


def test_glaive_toolcall_renders_tools_and_trains_the_call_not_the_observation(shared_data, data_tokenizer,
                                                                              data_recipe):
    bundle = build_datasets(data_recipe(str(shared_data / "glaive_toolcall_en_demo.json"), format="sharegpt",
                                        max_seq_len=4096), data_tokenizer)
    record = json.loads((shared_data / "glaive_toolcall_en_demo.json").read_text())[0]
    ids, labels = rows(bundle)[0]
    text = data_tokenizer.decode(ids)
    runs = trained_runs(data_tokenizer, ids, labels)
    masked = masked_text(data_tokenizer, ids, labels)
    # the tool schema is rendered (in the masked system turn), as {"type": "function", "function": {...}}
    assert '"name": "search_recipes"' in text and "<tools>" in masked and '"type": "function"' in masked
    # the function_call turn is trained as a tool call with its arguments
    call = json.loads(record["conversations"][3]["value"])
    assert runs[1] == ('<tool_call>\n{"name": "search_recipes", "arguments": '
                       + json.dumps(call["arguments"]) + '}\n</tool_call><|im_end|>\n')
    # the observation is a masked tool turn; the gpt answers are trained
    observation = record["conversations"][4]["value"]
    assert f"<|im_start|>tool\n{observation}<|im_end|>" in masked
    assert not any(observation in r for r in runs)
    answers = [t["value"] for t in record["conversations"] if t["from"] == "gpt"]
    assert [r for r in runs if "<tool_call>" not in r] == [a + "<|im_end|>\n" for a in answers]
    stats = bundle.train_stats  # one conversation is 11.8k tokens with every answer past 4096: dropped, counted
    assert (stats.rows, stats.dropped_too_long, stats.truncated) == (299, 1, 0)


def test_sharegpt_system_column_and_roles(tmp_path, data_tokenizer, data_recipe):
    record = {"system": "Sys.", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    path = write_jsonl(tmp_path / "s.jsonl", [record])
    (ids, labels), = rows(build_datasets(data_recipe(path, format="sharegpt"), data_tokenizer))
    assert data_tokenizer.decode(ids).startswith("<|im_start|>system\nSys.<|im_end|>\n<|im_start|>user\nHi")
    assert trained_runs(data_tokenizer, ids, labels) == ["Hello<|im_end|>\n"]


def test_chat_tool_calls_and_tool_role(tmp_path, data_tokenizer, data_recipe):
    record = {"messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {
            "name": "weather", "arguments": '{"city": "Paris"}'}}]},  # OpenAI style: arguments as a JSON string
        {"role": "tool", "content": "18C"},
        {"role": "assistant", "content": "It is 18C."},
    ], "tools": [{"name": "weather", "parameters": {"type": "object"}}]}
    path = write_jsonl(tmp_path / "c.jsonl", [record])
    (ids, labels), = rows(build_datasets(data_recipe(path, format="chat"), data_tokenizer))
    assert trained_runs(data_tokenizer, ids, labels) == [
        '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n',
        "It is 18C.<|im_end|>\n"]
    assert "<|im_start|>tool\n18C<|im_end|>" in masked_text(data_tokenizer, ids, labels)


def test_columns_map_field_names_globally_and_per_source(tmp_path, data_tokenizer, data_recipe):
    a = write_jsonl(tmp_path / "a.jsonl", [{"question": "Q1", "answer": "A1"}])
    c = write_jsonl(tmp_path / "c.jsonl", [{"conversation": [{"role": "user", "content": "Q2"},
                                                             {"role": "assistant", "content": "A2"}]}])
    recipe = data_recipe([{"path": a}, {"path": c, "format": "chat", "columns": {"messages": "conversation"}}],
                         columns={"instruction": "question", "output": "answer"})
    runs = [trained_runs(data_tokenizer, i, lab) for i, lab in rows(build_datasets(recipe, data_tokenizer))]
    assert runs == [["A1<|im_end|>\n"], ["A2<|im_end|>\n"]]


def test_chinese_text_masks_align_with_characters(shared_data, data_tokenizer, data_recipe):
    bundle = build_datasets(data_recipe(str(shared_data / "alpaca_zh_demo.json"), max_seq_len=100_000), data_tokenizer)
    records = json.loads((shared_data / "alpaca_zh_demo.json").read_text())
    for (ids, labels), record in zip(rows(bundle)[:50], records[:50], strict=True):
        assert trained_runs(data_tokenizer, ids, labels) == [record["output"] + "<|im_end|>\n"]


# Template-agnostic masks ----------------------------------------------------------------------------------------

LLAMA3_JINJA = (  # Meta's Llama-3-Instruct template, as a jinja string
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
ZEPHYR_JINJA = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")


@pytest.mark.parametrize(("template", "expected"), [
    ("llama3", ["Four.<|eot_id|>", "Six, of course.<|eot_id|>"]),
    (LLAMA3_JINJA, ["Four.<|eot_id|>", "Six, of course.<|eot_id|>"]),
    ("zephyr", ["Four.<|im_end|>\n", "Six, of course.<|im_end|>\n"]),
    (ZEPHYR_JINJA, ["Four.<|im_end|>\n", "Six, of course.<|im_end|>\n"]),
    ("mistral", [" Four.<|im_end|>", " Six, of course.<|im_end|>"]),
    ("chatml", ["Four.<|im_end|>\n", "Six, of course.<|im_end|>\n"]),
])
def test_masks_follow_any_template(tmp_path, data_tokenizer, data_recipe, template, expected):
    path = write_jsonl(tmp_path / "c.jsonl", [CHAT])
    resolve_chat_template(data_tokenizer, template)
    (ids, labels), = rows(build_datasets(data_recipe(path, format="chat", chat_template=template), data_tokenizer))
    assert trained_runs(data_tokenizer, ids, labels) == expected
    masked = masked_text(data_tokenizer, ids, labels)
    assert "What is two plus two?" in masked and "And three plus three?" in masked
    assert data_tokenizer.decode(ids) == data_tokenizer.apply_chat_template(CHAT["messages"], tokenize=False)


@pytest.mark.parametrize("template", ["chatml", "llama3", "mistral", "zephyr"])
def test_builtin_templates_render_tools_and_stay_prefix_consistent(data_tokenizer, template):
    from ft_cli.data.formats import Example, Origin

    resolve_chat_template(data_tokenizer, template)
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}]},
                {"role": "tool", "content": "R"}, {"role": "assistant", "content": "A"}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    renderer = ChatRenderer(data_tokenizer)
    text, spans = renderer.render_with_spans(Example(messages, tools, None, Origin("x", 0)))
    assert text == data_tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
    assert '"name": "f"' in text[spans[0][0]:spans[0][1]]  # the call is inside the trained span
    assert text[spans[1][0]:spans[1][1]].lstrip().startswith("A")


def test_llama3_template_on_a_model_whose_eos_differs_warns(tmp_path, data_tokenizer, data_recipe):
    path = write_jsonl(tmp_path / "c.jsonl", [CHAT])
    resolve_chat_template(data_tokenizer, "llama3")
    bundle = build_datasets(data_recipe(path, format="chat"), data_tokenizer)
    assert any("<|eot_id|>" in w and "eos_token" in w for w in bundle.warnings)


def test_bos_is_added_once(tmp_path, bos_tokenizer, data_recipe):
    path = write_jsonl(tmp_path / "c.jsonl", [CHAT])
    bos = bos_tokenizer.bos_token_id
    (ids, labels), = rows(build_datasets(data_recipe(path, format="chat"), bos_tokenizer))  # chatml: no bos text
    assert ids[0] == bos and ids.count(bos) == 1
    assert trained_runs(bos_tokenizer, ids, labels) == ["Four.<|im_end|>\n", "Six, of course.<|im_end|>\n"]
    resolve_chat_template(bos_tokenizer, "llama3")  # renders bos_token itself: no second one
    (ids, labels), = rows(build_datasets(data_recipe(path, format="chat"), bos_tokenizer))
    assert ids[0] == bos and ids.count(bos) == 1
    assert trained_runs(bos_tokenizer, ids, labels) == ["Four.<|eot_id|>", "Six, of course.<|eot_id|>"]


def test_renderer_matches_apply_chat_template_on_glaive(shared_data, data_tokenizer):
    from ft_cli.data.formats import Origin, make_converter

    convert = make_converter("sharegpt", None)
    renderer = ChatRenderer(data_tokenizer)
    for i, record in enumerate(json.loads((shared_data / "glaive_toolcall_en_demo.json").read_text())[:40]):
        ex = convert(record, Origin("g", i))
        for gen, msgs in ((False, ex.messages), (True, ex.messages[:1])):
            assert renderer.render(msgs, ex.tools, gen) == data_tokenizer.apply_chat_template(
                msgs, tools=ex.tools, add_generation_prompt=gen, tokenize=False)


# Template problems ------------------------------------------------------------------------------------------------

NOT_PREFIX_CONSISTENT = (  # renders the final assistant turn differently from earlier ones (like thinking-strippers)
    "{% for m in messages %}{% if loop.last and m['role'] == 'assistant' %}<final>{{ m['content'] }}</s>"
    "{% else %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}")


def test_template_that_is_not_prefix_consistent_is_rejected(tmp_path, data_tokenizer, data_recipe):
    path = write_jsonl(tmp_path / "c.jsonl", [CHAT])
    resolve_chat_template(data_tokenizer, NOT_PREFIX_CONSISTENT)
    with pytest.raises(UserError) as err:
        build_datasets(data_recipe(path, format="chat", chat_template=NOT_PREFIX_CONSISTENT), data_tokenizer)
    msg = str(err.value)
    assert "not prefix-consistent" in msg and "c.jsonl:record 0" in msg and "<assistant>" in msg and "<final>" in msg


def test_missing_template_says_to_set_chat_template(tmp_path, data_tokenizer, data_recipe):
    data_tokenizer.chat_template = None
    with pytest.raises(UserError, match="set data.chat_template"):
        resolve_chat_template(data_tokenizer, None)
    path = write_jsonl(tmp_path / "c.jsonl", [CHAT])
    with pytest.raises(UserError, match="set data.chat_template"):
        build_datasets(data_recipe(path, format="chat"), data_tokenizer)


def test_template_overrides(tmp_path, data_tokenizer):
    assert "<|eot_id|>" in resolve_chat_template(data_tokenizer, "llama3")
    assert data_tokenizer.chat_template.startswith("{#- Llama 3")
    f = tmp_path / "mine.jinja"
    f.write_text(ZEPHYR_JINJA)
    assert resolve_chat_template(data_tokenizer, str(f)) == ZEPHYR_JINJA == data_tokenizer.chat_template
    with pytest.raises(UserError, match=r"unknown built-in template 'chatmll'.*chatml, llama3, mistral, zephyr"):
        resolve_chat_template(data_tokenizer, "chatmll")
    with pytest.raises(UserError, match="invalid jinja template, line 1"):
        resolve_chat_template(data_tokenizer, "{% for m in messages %}{{ m }}")


def test_template_error_names_the_record(tmp_path, data_tokenizer, data_recipe):
    strict = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}" \
             "{% endif %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}A:{% endif %}"
    resolve_chat_template(data_tokenizer, strict)
    path = write_jsonl(tmp_path / "c.jsonl", [CHAT])
    with pytest.raises(UserError, match=r"c.jsonl:record 0 \(line 1\): the chat template refuses this conversation: no system role"):
        build_datasets(data_recipe(path, format="chat"), data_tokenizer)


def test_masks_without_offsets_match(tmp_path, data_tokenizer, data_recipe, monkeypatch):
    """Tokenizers without offsets (slow ones) count the tokens of each prefix instead: same labels here."""
    from ft_cli.data import batch_tokenizer

    path = write_jsonl(tmp_path / "c.jsonl", [CHAT, {"messages": CHAT["messages"][1:3]}])
    fast = rows(build_datasets(data_recipe(path, format="chat"), data_tokenizer))

    def no_offsets(self, texts):
        return [self.tokenizer(t, add_special_tokens=False).input_ids for t in texts], None

    monkeypatch.setattr(batch_tokenizer.BatchEncoder, "__call__", no_offsets)
    assert rows(build_datasets(data_recipe(path, format="chat"), data_tokenizer)) == fast
