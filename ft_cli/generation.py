"""Generation shared by `ft generate`, `ft eval --generate`, `ft merge` and `ft serve`: prompt rendering through the
tokenizer's chat template, the stop tokens, greedy or sampled decoding, and the cut at the first stop token.

One copy, so that a reply from the server is the reply `ft generate` prints for the same prompt and settings.
No torch or transformers at import time (the CLI imports this lazily anyway).

Generation uses what training trained, whatever the method. transformers 5.24 hands the KV cache to
`prepare_inputs_for_generation` and the model as `cache` (it renamed `past_key_values`); peft 0.21.2's
prompt-learning methods look for `past_key_values` there. So during `generate()`, prefix tuning put its trained
key/value prefix under `past_key_values`, next to the empty `cache` generate made, and the model used `cache`
("Both `past_key_values` and `cache` are set ... ignoring"): it generated exactly as the base model; prompt
tuning, seeing no cache, prepended its virtual tokens again at every step. A forward pass (training, `ft eval`'s
loss) is unaffected. `prompt_learning_generation` hands peft the cache under the name it reads; tests/test_methods.py
checks greedy generation against a hand-written loop over the forward for every method, and that peft and
transformers still disagree (remove this when they no longer do).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from ft_cli.errors import UserError


def render_messages(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of a conversation through the chat template, ending with the assistant header the model continues
    from (add_generation_prompt). Raises UserError when there is no template or the template rejects the roles."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("this model's tokenizer has no chat template")
    try:
        encoded = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True,
                                                return_dict=True)
    except Exception as exc:  # jinja raises for e.g. templates without a system role
        hint = (" (if the template has no system role: put the system prompt in the user message, or train with "
                "data.system_message: merge_into_first_user, which ft generate --system then follows)"
                if any(m.get("role") == "system" for m in messages) else "")
        raise UserError(f"the chat template rejected the prompt: {exc}{hint}") from None
    return list(encoded["input_ids"])


def render_prompt(tokenizer: Any, prompt: str, system: str | None = None, raw: bool = False) -> list[int]:
    """One user message (and an optional system message) rendered for generation; with `raw` (ft generate --raw)
    or without a chat template the prompt is tokenized as plain text (and BOS where the tokenizer adds one), as
    format text trained on it."""
    if raw:
        if system:
            raise UserError("--system needs the chat template; --raw continues the prompt as plain text")
        return tokenizer(prompt)["input_ids"]
    if not getattr(tokenizer, "chat_template", None):
        if system:
            raise UserError("--system needs a chat template; this model's tokenizer has none")
        return tokenizer(prompt)["input_ids"]
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return render_messages(tokenizer, messages)


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """The tokenizer's eos (e.g. <|im_end|> for ChatML) plus whatever the model's generation config stops on."""
    ids: list[int] = []
    for value in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        for i in value if isinstance(value, list) else [value]:
            if i is not None and i not in ids:
                ids.append(int(i))
    return ids


def pad_token_id(tokenizer: Any, stops: Sequence[int]) -> int | None:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else None)


def sampling_kwargs(temperature: float, top_p: float) -> dict[str, Any]:
    """generate() arguments: temperature 0 is greedy decoding (the model's own sampling defaults switched off)."""
    if temperature > 0:
        return {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": None}
    return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}


def cut_at_stop(ids: Sequence[int], stops: Sequence[int]) -> tuple[list[int], bool]:
    """(ids before the first stop token, whether a stop token was reached)."""
    cut = next((i for i, t in enumerate(ids) if t in stops), None)
    return (list(ids), False) if cut is None else (list(ids[:cut]), True)


def generate_ids(model: Any, tokenizer: Any, ids: Sequence[int], *, max_new_tokens: int, temperature: float,
                 top_p: float, seed: int | None = None, device: Any = "cpu", streamer: Any = None,
                 stopping_criteria: Any = None) -> tuple[list[int], bool]:
    """Decode after the prompt `ids`: (new token ids before the first stop token, whether a stop token ended it).
    `seed` seeds torch's global generator right before decoding, as `ft generate --seed` does."""
    import torch

    stops = stop_token_ids(model, tokenizer)
    inputs = torch.tensor([list(ids)], device=device)
    if seed is not None:
        torch.manual_seed(seed)
    extra = {"stopping_criteria": stopping_criteria} if stopping_criteria is not None else {}
    model.eval()
    with torch.no_grad(), prompt_learning_generation(model):
        out = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=max_new_tokens,
                             eos_token_id=stops or None, pad_token_id=pad_token_id(tokenizer, stops),
                             streamer=streamer, **sampling_kwargs(temperature, top_p), **extra)
    return cut_at_stop(out[0, inputs.shape[1]:].tolist(), stops)


def greedy_generate(model: Any, tokenizer: Any, prompts: list[list[int]], *, max_new_tokens: int, device: Any,
                    batch_size: int = 8, max_total: int | None = None,
                    on_batch: Callable[[int], None] | None = None) -> list[str]:
    """Greedy replies to tokenized prompts, batched with left padding; decoded without special tokens."""
    import torch

    stops = stop_token_ids(model, tokenizer)
    pad = pad_token_id(tokenizer, stops)
    replies: list[str] = []
    model.eval()
    batch_size = generation_batch_size(model, batch_size)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        new = max_new_tokens if max_total is None else max(1, min(max_new_tokens, max_total - width))
        with torch.no_grad(), prompt_learning_generation(model):
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, **sampling_kwargs(0, 1),
                                 eos_token_id=stops, pad_token_id=pad)
        for row in out[:, width:].tolist():
            replies.append(tokenizer.decode(cut_at_stop(row, stops)[0], skip_special_tokens=True).strip())
        if on_batch is not None:
            on_batch(len(replies))
    return replies


# Prompt-learning methods (prefix tuning, prompt tuning) --------------------------------------------------------

def is_prompt_learning(model: Any) -> bool:
    """A peft model whose adapter is virtual tokens or a KV prefix (prompt tuning, prefix tuning, ...)."""
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


@contextmanager
def prompt_learning_generation(model: Any) -> Iterator[None]:
    """Within this block `model.generate()` passes peft the KV cache as `past_key_values` (no-op for other models)."""
    if not is_prompt_learning(model):
        yield
        return
    prepare = model.base_model_prepare_inputs_for_generation

    def prepare_with_peft_names(*args: Any, **kwargs: Any) -> dict[str, Any]:
        inputs = prepare(*args, **kwargs)
        if "cache" in inputs and "past_key_values" not in inputs:
            inputs["past_key_values"] = inputs.pop("cache")
        return inputs

    model.base_model_prepare_inputs_for_generation = prepare_with_peft_names
    try:
        yield
    finally:
        model.base_model_prepare_inputs_for_generation = prepare


def generation_batch_size(model: Any, batch_size: int) -> int:
    """Prompts per `generate()` call. Left padding is only safe where position ids follow the attention mask; peft
    drops the position ids of prompt tuning (its virtual tokens are inputs), so a padded prompt would sit at other
    positions than in training: those prompts go one at a time."""
    if is_prompt_learning(model):
        from peft import PeftType

        if model.active_peft_config.peft_type == PeftType.PROMPT_TUNING:
            return 1
    return batch_size
