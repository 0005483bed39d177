"""The transformers engine of `ft serve`: one base model in memory, each adapter a named PEFT adapter on it.

Concurrency policy: one worker thread owns the model and takes requests from a FIFO queue. Before each decode it
activates that request's adapter (`set_adapter`, or `disable_adapter()` for the base), so requests for different
adapters never share a decode and never mix.
- `max_batch` 1 (the default): one request at a time. Greedy replies equal `ft generate`'s token for token.
- `max_batch` N > 1: the request at the head of the queue is decoded together with up to N - 1 queued requests for
  the same adapter and the same sampling settings (greedy; or the same temperature and top_p, without a seed), as
  one left-padded batch. The head of the queue always goes next, so nothing starves. Whether it is faster depends
  on the hardware (scripts/bench.py serve; docs/benchmarks.md), and padding changes the floating-point sums, so a
  batched reply may differ from the unbatched one in the last bits and, rarely, in a greedy token.
Scale-out serving (continuous batching, paged attention) is vLLM's job: `ft serve --engine vllm`.

Decoding is ft_cli.generation's, the same code as `ft generate`: chat template, stop tokens, greedy or seeded
sampling, cut at the first stop token.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ft_cli.adapters import BASE_NAME

log = logging.getLogger("ft.serve")


@dataclass(frozen=True)
class Params:
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def batch_key(self) -> tuple[float, float] | None:
        """Requests with equal keys may share a batch: greedy ones, or sampled ones with the same temperature and
        top_p and no seed (a seed promises `ft generate --seed`'s reply, which needs the generator to itself)."""
        if self.temperature == 0:
            return (0.0, 0.0)
        return None if self.seed is not None else (self.temperature, self.top_p)


@dataclass(frozen=True)
class Reply:
    text: str
    finish_reason: str  # "stop" (stop token or stop string), "length" (max tokens), "cancelled" (client gone)
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Job:
    name: str
    ids: list[int]
    params: Params
    on_delta: Callable[[str], None] | None = None
    cancelled: threading.Event | None = None
    future: Future = field(default_factory=Future)


@dataclass
class Engine:
    """`model`: a PeftModel holding every adapter by name (or a plain model when there are none); `tokenizers`:
    one per served name, `base` included (each run's own tokenizer carries the chat template it trained with)."""

    model: Any
    tokenizers: dict[str, Any]
    device: Any = "cpu"
    context: int | None = None  # the model's maximum sequence length, when its config states one
    max_batch: int = 1
    lock: threading.Lock = field(default_factory=threading.Lock)
    decodes: list[tuple[str, int]] = field(default_factory=list)  # (adapter, batch size) per decode, for tests
    _jobs: deque = field(default_factory=deque)
    _wake: threading.Condition = field(default_factory=threading.Condition)
    _worker: threading.Thread | None = None
    _closed: bool = False

    def submit(self, name: str, ids: Sequence[int], params: Params, *,
               on_delta: Callable[[str], None] | None = None, cancelled: threading.Event | None = None) -> Future:
        """Queue a request; the future resolves to its Reply (see generate for `on_delta` and `cancelled`)."""
        job = Job(name, list(ids), params, on_delta, cancelled)
        with self._wake:
            if self._closed:
                raise RuntimeError("the engine is shut down")
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="ft-serve-decode", daemon=True)
                self._worker.start()
            self._jobs.append(job)
            self._wake.notify()
        return job.future

    def _next_batch(self) -> list[Job] | None:
        from ft_cli.generation import generation_batch_size

        with self._wake:
            while not self._jobs and not self._closed:
                self._wake.wait()
            if self._closed:
                return None
            head = self._jobs.popleft()
            batch, key = [head], head.params.batch_key
            width, new = len(head.ids), head.params.max_new_tokens
            limit = generation_batch_size(self.model, self.max_batch)  # prompt tuning: one at a time
            if limit > 1 and key is not None:
                for job in list(self._jobs):
                    if len(batch) == limit:
                        break
                    if job.name != head.name or job.params.batch_key != key:
                        continue
                    # Left padding puts every row at the longest prompt, and rows run to the longest max_tokens.
                    w, n = max(width, len(job.ids)), max(new, job.params.max_new_tokens)
                    if self.context is not None and w + n > self.context:
                        continue
                    batch.append(job)
                    self._jobs.remove(job)
                    width, new = w, n
            return batch

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            batch = [j for j in batch if j.future.set_running_or_notify_cancel()]
            for j in [j for j in batch if j.cancelled is not None and j.cancelled.is_set()]:
                j.future.set_result(Reply("", "cancelled", len(j.ids), 0))  # its client left while it waited
                batch.remove(j)
            if not batch:
                continue
            try:
                if len(batch) == 1:
                    j = batch[0]
                    replies = [self.generate(j.name, j.ids, j.params, on_delta=j.on_delta, cancelled=j.cancelled)]
                else:
                    replies = self.generate_batch(batch)
            except Exception as exc:  # each request gets the error; the worker carries on
                log.exception("generation failed")
                for j in batch:
                    j.future.set_exception(exc)
                continue
            for j, reply in zip(batch, replies, strict=True):
                j.future.set_result(reply)

    async def run(self, name: str, ids: Sequence[int], params: Params) -> Reply:
        """Queue a request from the event loop and await its Reply."""
        import asyncio

        return await asyncio.wrap_future(self.submit(name, ids, params))

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
            self.decodes.append((name, 1))
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

    def generate_batch(self, jobs: list[Job]) -> list[Reply]:
        """Decode several requests for one adapter, with equal Params.batch_key, as one left-padded batch. Each
        row keeps its own max_new_tokens, stop strings, streaming and cancellation."""
        import torch

        from ft_cli.generation import cut_at_stop, pad_token_id, prompt_learning_generation, sampling_kwargs

        name, params = jobs[0].name, jobs[0].params
        tokenizer = self.tokenizers[name]
        stops = self._stops(tokenizer)
        pad = pad_token_id(tokenizer, stops)
        width = max(len(j.ids) for j in jobs)
        ids = torch.tensor([[pad] * (width - len(j.ids)) + j.ids for j in jobs], device=self.device)
        mask = torch.tensor([[0] * (width - len(j.ids)) + [1] * len(j.ids) for j in jobs], device=self.device)
        streams = [Detokenizer(tokenizer, stops, j.params.stop, j.on_delta, prompt_seen=True)
                   if j.on_delta is not None else None for j in jobs]
        rows = _RowStop(tokenizer, width, stops, jobs)
        with self.lock, self.selected(name):
            self.decodes.append((name, len(jobs)))
            self.model.eval()
            with torch.no_grad(), prompt_learning_generation(self.model):
                out = self.model.generate(input_ids=ids, attention_mask=mask,
                                          max_new_tokens=max(j.params.max_new_tokens for j in jobs),
                                          eos_token_id=stops or None, pad_token_id=pad,
                                          streamer=_RowStreams(streams, rows), stopping_criteria=rows.criteria(),
                                          **sampling_kwargs(params.temperature, params.top_p))
        replies = []
        for j, row, ended, stream in zip(jobs, out[:, width:].tolist(), rows.ended, streams, strict=True):
            new, stopped = cut_at_stop(row[:ended], stops)  # ended None: the whole row (it stopped by itself)
            text = tokenizer.decode(new, skip_special_tokens=True)
            cut = first_stop(text, j.params.stop)
            if cut is not None:
                text, stopped = text[:cut], True
            if stream is not None:
                stream.finish(text)
            finish = "stop" if stopped else "length"
            if j.cancelled is not None and j.cancelled.is_set() and not stopped \
                    and len(new) < j.params.max_new_tokens:
                finish = "cancelled"
            replies.append(Reply(text, finish, len(j.ids), len(new)))
        return replies

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
        """Stop the worker after the decode in progress; queued requests are cancelled."""
        with self._wake:
            self._closed = True
            for job in self._jobs:
                job.future.cancel()
            self._jobs.clear()
            self._wake.notify_all()


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest stop string starts in `text`, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def hits_stop_string(tokenizer: Any, ids: Sequence[int], stop_ids: Any, stop: Sequence[str]) -> bool:
    """Whether the text of the new tokens `ids` (stop tokens left out, as the reply is cut at them) holds a stop
    string. The one check both stopping criteria use."""
    new = [t for t in ids if t not in stop_ids]
    return first_stop(tokenizer.decode(new, skip_special_tokens=True), stop) is not None


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
                done = hits_stop_string(tokenizer, input_ids[0, prompt_len:].tolist(), stop_ids, stop)
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([_Stop()])


class _RowStop:
    """Per-row stopping for a batch: a row is done at its own max_new_tokens, at one of its stop strings, or when
    its client went away. `ended[i]` is how many new tokens row i had when it ended (None: not by this check)."""

    def __init__(self, tokenizer: Any, width: int, stop_ids: Sequence[int], jobs: list[Job]):
        self.tokenizer, self.width, self.stop_ids, self.jobs = tokenizer, width, set(stop_ids), jobs
        self.ended: list[int | None] = [None] * len(jobs)

    def criteria(self) -> Any:
        from transformers import StoppingCriteria, StoppingCriteriaList

        outer = self

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return outer(input_ids)

        return StoppingCriteriaList([_Stop()])

    def __call__(self, input_ids: Any) -> Any:
        import torch

        for i, (j, row) in enumerate(zip(self.jobs, input_ids[:, self.width:].tolist(), strict=True)):
            if self.ended[i] is not None:
                continue
            done = len(row) >= j.params.max_new_tokens or (j.cancelled is not None and j.cancelled.is_set())
            if j.params.stop and not done:
                done = hits_stop_string(self.tokenizer, row, self.stop_ids, j.params.stop)
            if done:
                self.ended[i] = len(row)
        return torch.tensor([e is not None for e in self.ended], dtype=torch.bool, device=input_ids.device)


class _RowStreams:
    """A generate() streamer for a batch: each row's tokens go to that row's Detokenizer (or nowhere), up to the
    step where the row ended (after it, generate() fills the row with padding)."""

    def __init__(self, streams: list[Any], stop: _RowStop):
        self.streams, self.stop, self.step, self.prompt_seen = streams, stop, 0, False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.step += 1
        for stream, token, ended in zip(self.streams, value.reshape(-1), self.stop.ended, strict=True):
            if stream is not None and (ended is None or self.step <= ended):
                stream.put(token)

    def end(self) -> None:
        pass


class Detokenizer:
    """A generate() streamer that turns new tokens into text pieces for `on_delta`.

    It decodes the whole reply so far at each token and sends what was added, so the pieces concatenate to exactly
    the text a non-streamed reply decodes to. It holds back an incomplete UTF-8 character (decoded as U+FFFD) and,
    when there are stop strings, the last len(longest stop) - 1 characters, which could be the start of one."""

    def __init__(self, tokenizer: Any, stop_ids: Sequence[int], stop: Sequence[str],
                 on_delta: Callable[[str], None], prompt_seen: bool = False):
        self.tokenizer, self.stop_ids, self.stop, self.on_delta = tokenizer, set(stop_ids), list(stop), on_delta
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.prompt_seen = prompt_seen
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
