"""The transformers engine of `ft serve`: one base model in memory, each adapter a named PEFT adapter on it.

Concurrency policy: requests are served one at a time, in arrival order, by a single worker thread (a FIFO queue in
front of the model). Before each request the worker activates that request's adapter (`set_adapter`, or
`disable_adapter()` for the base), so requests for different adapters never mix. Batching requests of one adapter
together would raise throughput on a GPU, but left-padded batches change the floating-point sums, so greedy replies
would no longer equal `ft generate`'s token for token; scripts/bench.py serve measures what the queue costs and what
batching would gain (docs/benchmarks.md). Scale-out serving is vLLM's job: `ft serve --engine vllm`.

Decoding is ft_cli.generation's, the same code as `ft generate`: chat template, stop tokens, greedy or seeded
sampling, cut at the first stop token.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ft_cli.adapters import BASE_NAME


@dataclass(frozen=True)
class Params:
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Reply:
    text: str
    finish_reason: str  # "stop" (stop token or stop string), "length" (max tokens), "cancelled" (client gone)
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Engine:
    """`model`: a PeftModel holding every adapter by name (or a plain model when there are none); `tokenizers`:
    one per served name, `base` included (each run's own tokenizer carries the chat template it trained with)."""

    model: Any
    tokenizers: dict[str, Any]
    device: Any = "cpu"
    context: int | None = None  # the model's maximum sequence length, when its config states one
    executor: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="ft-serve"))
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def names(self) -> list[str]:
        return list(self.tokenizers)

    def render_chat(self, name: str, messages: Sequence[dict[str, str]]) -> list[int]:
        from ft_cli.generation import render_messages

        return render_messages(self.tokenizers[name], messages)

    def render_text(self, name: str, prompt: str) -> list[int]:
        return list(self.tokenizers[name](prompt)["input_ids"])

    def generate(self, name: str, ids: Sequence[int], params: Params, *,
                 on_delta: Callable[[str], None] | None = None, cancelled: threading.Event | None = None) -> Reply:
        """Decode after `ids` with adapter `name`. `on_delta` receives the reply's text piece by piece as it is
        produced (the pieces concatenate to Reply.text); `cancelled` stops decoding at the next token."""
        from ft_cli.generation import generate_ids

        tokenizer = self.tokenizers[name]
        if cancelled is not None and cancelled.is_set():
            return Reply("", "cancelled", len(ids), 0)
        stops = self._stops(tokenizer)
        stream = Detokenizer(tokenizer, stops, params.stop, on_delta) if on_delta is not None else None
        criteria = _criteria(tokenizer, len(ids), stops, params.stop, cancelled)
        with self.lock, self.selected(name):
            new, stopped = generate_ids(self.model, tokenizer, ids, max_new_tokens=params.max_new_tokens,
                                        temperature=params.temperature, top_p=params.top_p, seed=params.seed,
                                        device=self.device, streamer=stream, stopping_criteria=criteria)
        text = tokenizer.decode(new, skip_special_tokens=True)
        cut = first_stop(text, params.stop)
        if cut is not None:
            text, stopped = text[:cut], True
        if stream is not None:
            stream.finish(text)
        finish = "stop" if stopped else "length"
        if cancelled is not None and cancelled.is_set() and not stopped and len(new) < params.max_new_tokens:
            finish = "cancelled"  # the client went away (nobody receives this reply; for the log and tests)
        return Reply(text, finish, len(ids), len(new))

    async def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run `fn` on the worker thread (the FIFO queue), from the event loop."""
        import asyncio
        import functools

        return await asyncio.get_running_loop().run_in_executor(self.executor, functools.partial(fn, *args, **kwargs))

    @contextmanager
    def selected(self, name: str) -> Iterator[None]:
        from peft import PeftModel

        if name == BASE_NAME:
            if isinstance(self.model, PeftModel):
                with self.model.disable_adapter():
                    yield
                return
            yield
            return
        self.model.set_adapter(name)
        yield

    def _stops(self, tokenizer: Any) -> list[int]:
        from ft_cli.generation import stop_token_ids

        return stop_token_ids(self.model, tokenizer)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest stop string starts in `text`, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _criteria(tokenizer: Any, prompt_len: int, stop_ids: Sequence[int], stop: Sequence[str],
              cancelled: threading.Event | None) -> Any:
    """A StoppingCriteriaList ending decoding when the text holds a stop string or the client went away."""
    if not stop and cancelled is None:
        return None
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            done = cancelled is not None and cancelled.is_set()
            if stop and not done:
                new = [t for t in input_ids[0, prompt_len:].tolist() if t not in stop_ids]
                done = first_stop(tokenizer.decode(new, skip_special_tokens=True), stop) is not None
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([_Stop()])


class Detokenizer:
    """A generate() streamer that turns new tokens into text pieces for `on_delta`.

    It decodes the whole reply so far at each token and sends what was added, so the pieces concatenate to exactly
    the text a non-streamed reply decodes to. It holds back an incomplete UTF-8 character (decoded as U+FFFD) and,
    when there are stop strings, the last len(longest stop) - 1 characters, which could be the start of one."""

    def __init__(self, tokenizer: Any, stop_ids: Sequence[int], stop: Sequence[str],
                 on_delta: Callable[[str], None]):
        self.tokenizer, self.stop_ids, self.stop, self.on_delta = tokenizer, set(stop_ids), list(stop), on_delta
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.prompt_seen = False
        self.done = False
        self.sent = ""

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        if self.done:
            return
        for t in value.reshape(-1).tolist():
            if t in self.stop_ids:
                self.done = True
                break
            self.ids.append(t)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = first_stop(text, self.stop)
        if cut is not None:
            self.done = True
            text = text[:cut]
        if not self.done:
            text = text[:len(text) - self.holdback].rstrip("\ufffd")
        self._send(text)

    def end(self) -> None:
        pass

    def finish(self, text: str) -> None:
        """Send whatever of the final reply is still held back."""
        self._send(text)

    def _send(self, text: str) -> None:
        if len(text) > len(self.sent) and text.startswith(self.sent):
            self.on_delta(text[len(self.sent):])
            self.sent = text
