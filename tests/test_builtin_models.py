"""Built-in offline models: they load with the Auto classes, build deterministically and atomically, cache,
and carry a tokenizer and chat template that the data pipeline can rely on."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from ft_cli import builtin_models as bm  # noqa: E402
from ft_cli import builtin_tokenizers as bt  # noqa: E402
from ft_cli.errors import UserError  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ft-cache")


@pytest.fixture(scope="module")
def tiny_dir(cache) -> Path:
    return bm.resolve_builtin("builtin:tiny-llama", cache_dir=cache)


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir)


# Names and errors --------------------------------------------------------------------------------------------


def test_is_builtin_and_names():
    assert bm.is_builtin("builtin:tiny-llama")
    assert not bm.is_builtin("meta-llama/Llama-3.1-8B")
    assert not bm.is_builtin("./builtin/tiny-llama")
    assert {"builtin:tiny-llama", "builtin:tiny-qwen2", "builtin:tiny-mistral", "builtin:tiny-gpt2",
            "builtin:small-llama"} <= set(bm.builtin_names())


def test_unknown_name_suggests_the_closest_and_lists_all(tmp_path):
    with pytest.raises(UserError) as info:
        bm.resolve_builtin("builtin:tiny-lama", cache_dir=tmp_path)
    message = info.value.message
    assert "unknown built-in model 'builtin:tiny-lama' (did you mean builtin:tiny-llama?)" in message
    assert "available: builtin:tiny-llama, " in message and "builtin:small-llama" in message
    assert info.value.exit_code == 2
    with pytest.raises(UserError, match="available:") as info:
        bm.resolve_builtin("builtin:zzzz", cache_dir=tmp_path)
    assert "did you mean" not in info.value.message
    assert not (tmp_path / "builtin").exists(), "an unknown name must not create anything"
    with pytest.raises(UserError, match="did you mean builtin:small-llama"):
        bm.builtin_spec("builtin:small-lama")
    assert bm.builtin_spec("builtin:tiny-qwen2").model_type == "qwen2"


def test_unknown_model_type_lists_supported(tmp_path):
    with pytest.raises(UserError, match=r"model_type 'falcon'.*supported: .*gpt2, .*llama, .*qwen2"):
        bm.tiny_model_dir_for("falcon", cache_dir=tmp_path)


def test_importing_the_module_does_not_import_torch():
    code = ("import sys, ft_cli.builtin_models as bm; bm.is_builtin('builtin:x'); "
            "print(sorted(m for m in ('torch', 'transformers', 'tokenizers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# The model ---------------------------------------------------------------------------------------------------


def test_tiny_llama_loads_offline_and_runs_forward(tiny_dir, tok):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    cfg = model.config
    assert (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers) == ("llama", 64, 2)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size) == (4, 2, 176)
    assert cfg.tie_word_embeddings is False
    assert cfg.vocab_size % 64 == 0 and len(tok) <= cfg.vocab_size < len(tok) + 64
    assert model.dtype == torch.float32
    assert (tiny_dir / "model.safetensors").is_file()
    ids = tok(["The cat sat on the mat.", "Hello"], padding=True, return_tensors="pt")
    logits = model(**ids).logits
    assert logits.shape == (2, ids["input_ids"].shape[1], cfg.vocab_size)
    assert torch.isfinite(logits).all()


def test_tiny_llama_is_fast(tiny_dir):
    """The default test model: a training step on a 4 x 128 batch costs tens of milliseconds (~30 ms on one idle
    core). One thread and a loose bound, because CI machines are shared and threads contend for cores."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    x = torch.randint(0, model.config.vocab_size, (4, 128))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            model(input_ids=x, labels=x).loss.backward()
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    assert best < 0.5, f"forward+backward took {best * 1000:.0f} ms"


def test_special_tokens_and_ids_agree_everywhere(tiny_dir, tok):
    assert tok.convert_tokens_to_ids(list(bt.SPECIAL_TOKENS)) == [0, 1, 2, 3, 4]
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|begin_of_text|>", "<|im_end|>", "<|pad|>")
    assert tok.unk_token is None
    assert tok.eos_token_id != tok.pad_token_id
    assert {"<|im_start|>", "<|end_of_text|>"} <= set(tok.all_special_tokens)
    assert tok.model_max_length == 4096 and tok.padding_side == "right"
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    for cfg in (model.config, model.generation_config):
        assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (0, 2, 4)
    # Like Qwen2, nothing is added on encode: text is exactly its own tokens.
    assert tok("hello")["input_ids"] == tok("hello", add_special_tokens=False)["input_ids"]
    # Special tokens are single tokens when they appear in (rendered) text.
    assert tok("<|im_start|>user\n", add_special_tokens=False)["input_ids"][0] == 1


@pytest.mark.parametrize("text", [
    "The quick brown fox jumps over the lazy dog. It cost $19.99 on 3 March 2024!",
    "机器学习很有趣，我们今天学习分词。",
    "Party time 🎉🦙 with emoji 👩‍👩‍👧 and flags 🇫🇷",
    "def f(x):\n\treturn {'a': [1, 2]}  # spaces  , tabs\r\n  and ü é ß",
])
def test_text_round_trips(tok, text):
    ids = tok(text)["input_ids"]
    assert max(ids) < len(tok)
    assert tok.decode(ids) == text


def test_vocabulary_is_a_real_bpe(tok):
    assert 2000 <= len(tok) <= 4096
    # Common words from the corpus are single tokens; rare ones are split but still encodable.
    assert len(tok("The", add_special_tokens=False)["input_ids"]) == 1
    assert len(tok(" weather", add_special_tokens=False)["input_ids"]) == 1
    assert len(tok(" antidisestablishmentarianism", add_special_tokens=False)["input_ids"]) > 3


# Building and caching ----------------------------------------------------------------------------------------


def test_builds_are_deterministic_and_leave_the_callers_rng_alone(tiny_dir, tmp_path):
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    other = bm.resolve_builtin("builtin:tiny-llama", cache_dir=tmp_path)
    assert torch.equal(torch.get_rng_state(), state)
    assert other != tiny_dir and other.name == tiny_dir.name
    for name in ("model.safetensors", "tokenizer.json", "config.json", "generation_config.json"):
        assert (other / name).read_bytes() == (tiny_dir / name).read_bytes(), name


def test_tokenizer_training_is_deterministic_across_processes():
    """Rust hash maps are seeded per process; the trained vocabulary and merges must not depend on that."""
    code = ("import hashlib, ft_cli.builtin_tokenizers as bt; "
            "print(hashlib.sha256(bt.train_bpe().to_str().encode()).hexdigest())")
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
            for _ in range(2)}
    runs.add(hashlib.sha256(bt.train_bpe().to_str().encode()).hexdigest())
    assert len(runs) == 1


def test_second_resolve_reuses_the_cache(cache, tiny_dir, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("rebuilt a cached built-in")

    monkeypatch.setattr(bm, "_build_model_dir", refuse)
    assert bm.resolve_builtin("builtin:tiny-llama", cache_dir=cache) == tiny_dir
    assert bm.resolve_builtin("tiny-llama", cache_dir=cache) == tiny_dir
    monkeypatch.setenv("FT_CACHE_DIR", str(cache))
    assert bm.resolve_builtin("builtin:tiny-llama") == tiny_dir
    assert tiny_dir.parent == cache / "builtin"
    assert tiny_dir.name == f"tiny-llama-{bm.build_key(bm.BUILTIN_SPECS['tiny-llama'])}"


def test_losing_a_build_race_uses_the_winners_directory(tiny_dir, tmp_path, monkeypatch):
    """Two processes of one distributed run build at once: the second rename fails, and its build is dropped."""
    build = bm._build_model_dir
    target = tmp_path / "builtin" / tiny_dir.name

    def build_then_lose(spec, out, *chat):
        build(spec, out, *chat)
        shutil.copytree(tiny_dir, target)  # the other process finishes first
        (target / "winner").write_text("")

    monkeypatch.setattr(bm, "_build_model_dir", build_then_lose)
    assert bm.resolve_builtin("builtin:tiny-llama", cache_dir=tmp_path) == target
    assert (target / "winner").is_file()
    assert sorted(p.name for p in target.parent.iterdir()) == [tiny_dir.name], "temporary build left behind"


def test_a_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    def crash(spec, out, *chat):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(bm, "_build_model_dir", crash)
    with pytest.raises(KeyboardInterrupt):
        bm.resolve_builtin("builtin:tiny-llama", cache_dir=tmp_path)
    assert list((tmp_path / "builtin").iterdir()) == []


def test_build_key_follows_the_spec_but_not_its_description():
    spec = bm.BUILTIN_SPECS["tiny-llama"]
    assert bm.build_key(replace(spec, description="edited")) == bm.build_key(spec)
    assert bm.build_key(replace(spec, hidden_size=128)) != bm.build_key(spec)
    assert bm.build_key(replace(spec, seed=1)) != bm.build_key(spec)


# Other families ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", sorted(set(bm._TINY_BY_MODEL_TYPE) - set(bm.ENCODER_TYPES)))
def test_tiny_model_for_each_family(model_type, cache, tok):
    path = bm.tiny_model_dir_for(model_type, cache_dir=cache)
    model = AutoModelForCausalLM.from_pretrained(path)
    family_tok = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == model_type
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    text = "<|im_start|>user\nWhat's 2+2? 你好 🎉<|im_end|>\n"
    # Whatever tokenizer class transformers picks for this family, it encodes like the built-in one.
    assert family_tok(text)["input_ids"] == tok(text)["input_ids"]
    assert (family_tok.eos_token_id, family_tok.pad_token_id, len(family_tok)) == (2, 4, len(tok))
    assert family_tok.chat_template == tok.chat_template
    logits = model(input_ids=torch.tensor([tok(text)["input_ids"]])).logits
    assert logits.shape[-1] == model.config.vocab_size


def test_tiny_bert_is_an_encoder_with_a_wordpiece_tokenizer(cache):
    from transformers import AutoModelForSequenceClassification

    path = bm.resolve_builtin("builtin:tiny-bert", cache_dir=cache)
    tok = AutoTokenizer.from_pretrained(path)
    enc = tok("The hotel was GOOD", "酒店很好")
    tokens = tok.convert_ids_to_tokens(enc["input_ids"])
    assert tokens[0] == "[CLS]" and tokens.count("[SEP]") == 2 and "good" in tokens  # lower-cased
    assert tokens[-5:-1] == ["酒", "店", "很", "好"]  # one token per CJK character, none unknown
    assert enc["token_type_ids"][-1] == 1 and enc["token_type_ids"][0] == 0
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)
    assert model.config.model_type == "bert" and model.config.pad_token_id == tok.pad_token_id == 0
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    assert model.bert.pooler is not None  # saved with its pooler, as bert-base-uncased is


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
def test_every_build_of_a_builtin_is_the_same(tmp_path, name):
    """Two builds in separate caches give byte-identical tokenizers and weights: the token ids a test or a user's
    run sees never depend on which build they got. (tokenizers' WordPiece trainer is not deterministic, which is
    why tiny-bert's vocabulary is shipped, ft_cli/builtin_wordpiece.txt.)"""
    a = bm.resolve_builtin(f"builtin:{name}", cache_dir=tmp_path / "a")
    b = bm.resolve_builtin(f"builtin:{name}", cache_dir=tmp_path / "b")
    for file in ("tokenizer.json", "model.safetensors", "config.json"):
        assert (a / file).read_bytes() == (b / file).read_bytes(), file


def test_the_wordpiece_vocabulary_is_whole():
    vocab = bt.wordpiece_vocab()
    assert len(set(vocab)) == len(vocab) == 2169 + 21296  # ft's learned tokens + every CJK character
    assert tuple(vocab[:5]) == bt.WORDPIECE_SPECIAL and "##s" in vocab and "the" in vocab


def test_family_specific_modules(cache):
    qwen2 = AutoModelForCausalLM.from_pretrained(bm.tiny_model_dir_for("qwen2", cache_dir=cache))
    assert qwen2.model.layers[0].self_attn.q_proj.bias is not None
    gpt2 = AutoModelForCausalLM.from_pretrained(bm.resolve_builtin("builtin:tiny-gpt2", cache_dir=cache))
    assert {"c_attn", "c_proj", "c_fc"} <= {name.rsplit(".", 1)[-1] for name, _ in gpt2.named_modules()}


def test_small_llama_size(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(bm.resolve_builtin("builtin:small-llama", cache_dir=tmp_path))
    assert model.config.hidden_size == 512 and model.config.num_hidden_layers == 6
    assert 20_000_000 <= sum(p.numel() for p in model.parameters()) <= 30_000_000


# The chat template -------------------------------------------------------------------------------------------

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What's the weather in Paris?"},
    {"role": "assistant", "content": "",
     "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": '{"temp_c": 18, "sky": "clear"}'},
    {"role": "assistant", "content": "18 °C and clear. 晴 ☀️"},
    {"role": "user", "content": "And tomorrow?"},
    {"role": "assistant", "content": "I can only see today's weather."},
]


def render(tok, messages, **kwargs) -> str:
    return tok.apply_chat_template(messages, tokenize=False, **kwargs)


def test_tokenizer_carries_the_packaged_template(tok):
    assert tok.chat_template == bt.chat_template()


def test_chat_template_golden(tok):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert render(tok, messages) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    prompt = render(tok, messages[:1], add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_chat_template_tools_and_tool_calls(tok):
    text = render(tok, CONVERSATION, tools=TOOLS)
    assert text.startswith("<|im_start|>system\nYou are a terse assistant.\n\n# Tools\n")
    assert '\n<tools>\n{"type": "function", "function": {"name": "get_weather"' in text
    assert text.count("<|im_start|>system") == 1
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            '</tool_call><|im_end|>\n<|im_start|>tool\n{"temp_c": 18, "sky": "clear"}<|im_end|>\n') in text
    # Tools without a system prompt get a system turn of their own, and nothing else is invented.
    no_system = render(tok, CONVERSATION[1:], tools=TOOLS)
    assert no_system.startswith("<|im_start|>system\n# Tools\n")
    assert render(tok, CONVERSATION[1:2]) == "<|im_start|>user\nWhat's the weather in Paris?<|im_end|>\n"


@pytest.mark.parametrize("tools", [None, TOOLS], ids=["no-tools", "tools"])
@pytest.mark.parametrize("start", [0, 1], ids=["with-system", "without-system"])
def test_chat_template_prefix_properties(tok, tools, start):
    """Loss masking renders growing prefixes of a conversation and takes the differences as each turn's tokens."""
    messages = CONVERSATION[start:]
    for k in range(1, len(messages)):
        shorter, longer = render(tok, messages[:k], tools=tools), render(tok, messages[:k + 1], tools=tools)
        assert longer.startswith(shorter), k
        shorter_ids = tok(shorter, add_special_tokens=False)["input_ids"]
        assert tok(longer, add_special_tokens=False)["input_ids"][:len(shorter_ids)] == shorter_ids, k
        if messages[k]["role"] == "assistant":
            prompt = render(tok, messages[:k], tools=tools, add_generation_prompt=True)
            assert longer.startswith(prompt) and prompt.endswith("<|im_start|>assistant\n"), k
