"""`ft serve RUN` for a classification run (recipe `task: classification`): POST /v1/classify.

    POST /v1/classify   {"input": "text" | ["text", ...], "text_pair": "text" | [...] (optional), "model": any}
    ->  {"object": "list", "model": RUN_NAME, "data": [{"index", "label", "score", "probabilities"}],
         "usage": {"prompt_tokens": N}}
    GET /v1/models, GET /health

Errors, the API key and the 404/405 shapes are the chat API's (ft_cli.serve.api). Requests are classified one at
a time (a lock around the model) in a worker thread, each request's texts in batches sorted by length, exactly as
`ft predict` does, so served labels and probabilities equal ft predict's.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from ft_cli.serve.api import ApiError, ApiKey, _endpoint, _error_response, _json

MAX_INPUTS = 2048  # texts per request


class Classifier:
    def __init__(self, model: Any, tokenizer: Any, labels: list[str], name: str, *, max_seq_len: int,
                 device: Any = "cpu", batch_size: int = 32):
        self.model, self.tokenizer, self.labels, self.name = model, tokenizer, labels, name
        self.max_seq_len, self.device, self.batch_size = max_seq_len, device, batch_size
        self.lock = threading.Lock()
        self.created = int(time.time())

    def classify(self, texts: list[str], pairs: list[str] | None) -> dict[str, Any]:
        import datasets

        from ft_cli.tasks.classify_loss import make_collator, predict_batches, probabilities

        enc = self.tokenizer(texts, pairs, truncation=True, max_length=self.max_seq_len)
        columns = {"input_ids": enc["input_ids"], "label": [0] * len(texts)}
        if pairs is not None and "token_type_ids" in enc:
            columns["token_type_ids"] = enc["token_type_ids"]
        with self.lock:
            logits, _ = predict_batches(self.model, datasets.Dataset.from_dict(columns),
                                        make_collator(self.tokenizer), self.batch_size, self.device)
        probs = probabilities(logits)
        data = [{"index": i, "label": self.labels[int(p.argmax())], "score": float(p.max()),
                 "probabilities": {n: float(x) for n, x in zip(self.labels, p, strict=True)}}
                for i, p in enumerate(probs)]
        return {"object": "list", "model": self.name, "data": data,
                "usage": {"prompt_tokens": sum(len(x) for x in enc["input_ids"])}}


def _texts(value: Any, field: str) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(x, str) for x in items):
        raise ApiError(400, f"`{field}` must be a string or a non-empty list of strings", param=field)
    if len(items) > MAX_INPUTS:
        raise ApiError(400, f"`{field}`: at most {MAX_INPUTS} texts per request, got {len(items)}", param=field)
    return items


def build_classify_app(classifier: Classifier, *, api_key: str | None = None) -> Any:
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.routing import Route

    card = {"id": classifier.name, "object": "model", "created": classifier.created, "owned_by": "ft",
            "task": "classification", "labels": classifier.labels}

    async def classify(request: Any) -> Any:
        body = await _json(request)
        if not isinstance(body, dict) or "input" not in body:
            raise ApiError(400, "the request needs `input`: a text or a list of texts", param="input")
        texts = _texts(body["input"], "input")
        pairs = _texts(body["text_pair"], "text_pair") if body.get("text_pair") is not None else None
        if pairs is not None and len(pairs) != len(texts):
            raise ApiError(400, f"`text_pair` has {len(pairs)} texts for {len(texts)} inputs", param="text_pair")
        return await run_in_threadpool(classifier.classify, texts, pairs)

    async def models(request: Any) -> Any:
        return {"object": "list", "data": [card]}

    async def health(request: Any) -> Any:
        return {"status": "ok"}

    async def http_error(request: Any, exc: Exception) -> Any:
        assert isinstance(exc, HTTPException)
        message = {404: f"no route {request.method} {request.url.path}", 405:
                   f"method {request.method} not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return _error_response(ApiError(exc.status_code, message))

    routes = [Route("/v1/classify", _endpoint(classify), methods=["POST"]),
              Route("/v1/models", _endpoint(models), methods=["GET"]),
              Route("/health", _endpoint(health), methods=["GET"])]
    middleware = [Middleware(ApiKey, key=api_key)] if api_key else []
    return Starlette(routes=routes, middleware=middleware, exception_handlers={HTTPException: http_error})


def load_classifier_app(target: Any, *, api_key: str | None = None) -> tuple[Any, Classifier]:
    from ft_cli.loading import default_device
    from ft_cli.tasks.classify_run import load_classifier

    device = default_device()
    model, tokenizer, labels = load_classifier(target, device=device)
    classifier = Classifier(model, tokenizer, labels, target.path.name, max_seq_len=target.recipe.data.max_seq_len,
                            device=device)
    return build_classify_app(classifier, api_key=api_key), classifier
