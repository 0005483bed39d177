"""Generation shared by `ft generate`, `ft eval --generate`, `ft merge` and `ft serve`: prompt rendering through the
tokenizer's chat template, the stop tokens, greedy or sampled decoding, and the cut at the first stop token.

One copy, so that a reply from the server is the reply `ft generate` prints for the same prompt and settings.
No torch or transformers at import time (the CLI imports this lazily anyway).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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


def render_prompt(tokenizer: Any, prompt: str, system: str | None = None) -> list[int]:
    """One user message (and an optional system message) rendered for generation; without a chat template the
    prompt is tokenized as plain text."""
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
    with torch.no_grad():
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
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    replies: list[str] = []
    model.eval()
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        new = max_new_tokens if max_total is None else max(1, min(max_new_tokens, max_total - width))
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, **sampling_kwargs(0, 1),
                                 eos_token_id=stops, pad_token_id=pad)
        for row in out[:, width:].tolist():
            replies.append(tokenizer.decode(cut_at_stop(row, stops)[0], skip_special_tokens=True).strip())
        if on_batch is not None:
            on_batch(len(replies))
    return replies
