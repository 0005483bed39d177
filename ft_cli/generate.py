"""`ft generate`: answer one prompt with a run's model (base + adapter) or a merged model directory.

The prompt goes through the tokenizer's chat template with the assistant header appended
(add_generation_prompt), tokens stream to stdout as they are produced, and generation stops at the end-of-turn
token. temperature 0 is greedy decoding (deterministic); otherwise sampling with temperature and top_p, seeded
by --seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ft_cli.errors import UserError


def generate_cli(target: str | Path, prompt: str, *, system: str | None = None, max_new_tokens: int = 256,
                 temperature: float = 0.7, top_p: float = 0.9, seed: int | None = None,
                 which: str = "final") -> str:
    from ft_cli.loading import PEFT_MERGEABLE, default_device, load_target, resolve_target

    if temperature < 0 or not 0 < top_p <= 1 or max_new_tokens < 1:
        raise UserError("--temperature must be >= 0, --top-p in (0, 1], --max-new-tokens >= 1")
    resolved = resolve_target(target, which)  # type: ignore[arg-type]
    device = default_device()
    # An unquantized LoRA/DoRA/IA3 adapter is folded into the base in memory: same outputs, faster decoding.
    recipe = resolved.recipe
    merged = recipe is not None and recipe.method in PEFT_MERGEABLE and not recipe.quantized
    model, tokenizer, _ = load_target(resolved, device=device, merged=merged)
    return generate_reply(model, tokenizer, prompt, system=system, max_new_tokens=max_new_tokens,
                          temperature=temperature, top_p=top_p, seed=seed, device=device, stream=True)


def render_prompt(tokenizer: Any, prompt: str, system: str | None = None) -> list[int]:
    """Token ids of the conversation so far, ending with the assistant header the model continues from."""
    if not getattr(tokenizer, "chat_template", None):
        if system:
            raise UserError("--system needs a chat template; this model's tokenizer has none")
        return tokenizer(prompt)["input_ids"]
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    try:
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    except Exception as exc:  # jinja raises for e.g. templates without a system role
        raise UserError(f"the chat template rejected the prompt: {exc}") from None
    return list(encoded["input_ids"])


def generate_reply(model: Any, tokenizer: Any, prompt: str, *, system: str | None = None,
                   max_new_tokens: int = 256, temperature: float = 0.7, top_p: float = 0.9,
                   seed: int | None = None, device: Any = "cpu", stream: bool = False) -> str:
    """The reply (special tokens skipped); printed token by token to stdout when `stream`."""
    import torch
    from transformers import TextStreamer

    from ft_cli.evaluate import stop_token_ids

    ids = torch.tensor([render_prompt(tokenizer, prompt, system)], device=device)
    stops = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else None)
    sampling: dict[str, Any] = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    if temperature > 0:
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": None}
    if seed is not None:
        torch.manual_seed(seed)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    model.eval()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             eos_token_id=stops or None, pad_token_id=pad, streamer=streamer, **sampling)
    new = out[0, ids.shape[1]:].tolist()
    cut = next((i for i, t in enumerate(new) if t in stops), len(new))
    reply = tokenizer.decode(new[:cut], skip_special_tokens=True)
    if stream:
        print(flush=True)  # TextStreamer leaves the cursor after the last token
    return reply
