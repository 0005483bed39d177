"""`ft generate`: answer one prompt with a run's model (base + adapter), a model directory or a hub model.

The prompt goes through the tokenizer's chat template with the assistant header appended
(add_generation_prompt) — or, with --raw (the default for runs trained on format text), is continued as plain
text — tokens stream to stdout as they are produced, and generation stops at the end-of-turn (or eos) token.
temperature 0 is greedy decoding (deterministic); otherwise sampling with temperature and top_p, seeded by --seed.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from ft_cli.errors import UserError


def generate_cli(target: str | Path, prompt: str, *, system: str | None = None, max_new_tokens: int = 256,
                 temperature: float = 0.7, top_p: float = 0.9, seed: int | None = None,
                 which: str = "final", raw: bool | None = None) -> str:
    from ft_cli.loading import default_device, load_target, resolve_target
    from ft_cli.methods.registry import method_spec

    if temperature < 0 or not 0 < top_p <= 1 or max_new_tokens < 1:
        raise UserError("--temperature must be >= 0, --top-p in (0, 1], --max-new-tokens >= 1")
    resolved = resolve_target(target, which)  # type: ignore[arg-type]
    recipe = resolved.recipe
    if raw is None and recipe is not None and recipe.data.format == "text":
        raw = True  # the run learned to continue plain text: a chat-templated prompt is not what it saw
        print("raw completion: the run trained on format text, so the prompt is continued as plain text "
              "(--chat to use the chat template)", file=sys.stderr, flush=True)
    if raw and system:
        raise UserError("--system needs the chat template; --raw continues the prompt as plain text")
    device = default_device()
    # An unquantized LoRA/DoRA/IA3 adapter is folded into the base in memory: same outputs, faster decoding.
    merged = recipe is not None and method_spec(recipe.method).merges and not recipe.quantized
    model, tokenizer, _ = load_target(resolved, device=device, merged=merged)
    if system and recipe is not None and recipe.data.system_message == "merge_into_first_user":
        from ft_cli.data.render import merge_system_prompt

        prompt, system = merge_system_prompt(system, prompt), None  # as the run's data was rendered
    return generate_reply(model, tokenizer, prompt, system=system, max_new_tokens=max_new_tokens,
                          temperature=temperature, top_p=top_p, seed=seed, device=device, stream=True,
                          raw=bool(raw))


def generate_reply(model: Any, tokenizer: Any, prompt: str, *, system: str | None = None,
                   max_new_tokens: int = 256, temperature: float = 0.7, top_p: float = 0.9,
                   seed: int | None = None, device: Any = "cpu", stream: bool = False, raw: bool = False) -> str:
    """The reply (special tokens skipped); printed token by token to stdout when `stream`."""
    from transformers import TextStreamer

    from ft_cli.generation import generate_ids, render_prompt

    ids = render_prompt(tokenizer, prompt, system, raw=raw)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    new, _ = generate_ids(model, tokenizer, ids, max_new_tokens=max_new_tokens, temperature=temperature,
                          top_p=top_p, seed=seed, device=device, streamer=streamer)
    reply = tokenizer.decode(new, skip_special_tokens=True)
    if stream:
        print(flush=True)  # TextStreamer leaves the cursor after the last token
    return reply
