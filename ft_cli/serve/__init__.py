"""`ft serve`: one base model, many adapters, behind an OpenAI-compatible HTTP API.

    ft serve BASE_OR_RUN [--adapter NAME=RUN_DIR]... [--host 127.0.0.1] [--port 8000] [--api-key KEY]

BASE_OR_RUN is a run directory (its base is loaded, its adapter served under the run directory's name), a model
directory, a built-in (builtin:tiny-llama) or a hub id. Each --adapter is a run directory trained on that same
base; the request's `model` picks one, `base` the base without adapter. `--engine vllm` hands the same base and
adapters to vLLM's OpenAI server instead (for GPUs and many users).

engine.py decodes (a FIFO queue in front of the model: one request at a time, or with --max-batch N the queued
requests of one adapter together; see its docstring), api.py speaks HTTP, vllm.py builds vLLM's command line.
"""

from __future__ import annotations

import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ft_cli.adapters import BASE_NAME, RunAdapter, check_shared_base, parse_adapter_option, run_adapter
from ft_cli.errors import UserError
from ft_cli.recipe import Recipe

API_KEY_ENV = "FT_API_KEY"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServePlan:
    """What to load: the base (a path or hub id), how (the adapters' recipe, when there are adapters), and the
    adapters. `whole_run` is set when the base is a full/freeze run's model/ (loaded in its recipe's dtype when no
    adapter says otherwise)."""

    base: str
    adapters: list[RunAdapter]
    whole_run: Recipe | None = None

    @property
    def load_recipe(self) -> Recipe | None:
        return self.adapters[0].recipe if self.adapters else self.whole_run


def plan_serve(base_or_run: str, adapter_specs: list[str], which: str = "final") -> ServePlan:
    """Resolve the command line into a ServePlan; every problem is a UserError (exit 2) before anything loads."""
    from ft_cli.builtin_models import is_builtin, resolve_builtin
    from ft_cli.loading import resolve_target

    adapters = [parse_adapter_option(s, which) for s in adapter_specs]
    path = Path(base_or_run).expanduser()
    whole: Recipe | None = None
    if is_builtin(base_or_run):
        try:
            base = str(resolve_builtin(base_or_run))
        except (KeyError, ValueError) as exc:
            raise UserError(f"{base_or_run}: {exc}") from None
    elif path.exists():
        target = resolve_target(path, which)  # type: ignore[arg-type]
        if target.kind == "model":
            base = str(target.output)
        elif target.recipe is not None and target.recipe.spec.whole_model:
            base, whole = str(target.output), target.recipe
        else:
            first = run_adapter(path, which=which, what=base_or_run)
            adapters = [first] + [a for a in adapters if a.path != first.path]
            base = first.base_path
    elif base_or_run.startswith(("/", ".", "~")) or base_or_run.count("/") != 1:
        raise UserError(f"{base_or_run}: no such directory (and not a hub id such as org/name)")
    else:
        base = base_or_run  # a hub id: loading says whether it is reachable
    check_shared_base(adapters, base_path=base)  # adapters on a full run's model/ must have been trained on it
    return ServePlan(base=base, adapters=adapters, whole_run=whole)


def load_engine(plan: ServePlan, device: Any = None, max_batch: int = 1) -> Any:
    """Load the base once, put every adapter on it by name, and pair each served name with its tokenizer."""
    from ft_cli.adapters import load_adapters
    from ft_cli.loading import (
        default_device,
        load_base,
        load_model_dir,
        load_model_dir_tokenizer,
        load_run_tokenizer,
    )
    from ft_cli.serve.engine import Engine

    device = device or default_device()
    recipe = plan.load_recipe
    base_dir = Path(plan.base)
    if plan.whole_run is not None and not plan.adapters:  # a full/freeze run's model/, in its recipe's dtype
        recipe = plan.whole_run
        base_tok = load_run_tokenizer(recipe, base_dir)
        model = load_model_dir(base_dir, device=device, dtype=recipe.model.dtype,
                               trust_remote_code=recipe.model.trust_remote_code)
    elif recipe is not None:  # the adapters say how their base was loaded in training
        model = load_base(recipe, device=device, path=plan.base)
        if not recipe.quantized:
            model.to(device)
        base_tok = load_model_dir_tokenizer(base_dir) if base_dir.is_dir() else None
    else:
        model = load_model_dir(base_dir, device=device) if base_dir.is_dir() else _load_hub(plan.base, device)
        base_tok = load_model_dir_tokenizer(base_dir) if base_dir.is_dir() else _hub_tokenizer(plan.base)
    tokenizers = {a.name: load_run_tokenizer(a.recipe, a.path) for a in plan.adapters}
    if base_tok is None or not getattr(base_tok, "chat_template", None):
        if plan.adapters:
            # A base model without a chat template: `base` chats with the template its adapters trained with.
            first = plan.adapters[0]
            base_tok = load_run_tokenizer(first.recipe, first.path)
            print(f"base: the base model's tokenizer has no chat template; `{BASE_NAME}` uses {first.name!r}'s")
    if plan.adapters:
        model = load_adapters(model, plan.adapters)
    model.eval()
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return Engine(model=model, tokenizers={BASE_NAME: base_tok, **tokenizers}, device=device, context=context,
                  max_batch=max_batch)


def _load_hub(name: str, device: Any) -> Any:
    from ft_cli.loading import load_model_dir

    return load_model_dir(Path(name), device=device)


def _hub_tokenizer(name: str) -> Any:
    from ft_cli.loading import load_model_dir_tokenizer

    return load_model_dir_tokenizer(Path(name))


def roots(plan: ServePlan) -> dict[str, str]:
    return {BASE_NAME: plan.base, **{a.name: str(a.path) for a in plan.adapters}}


def serve_cli(base_or_run: str, adapter_specs: list[str], *, host: str = "127.0.0.1", port: int = 8000,
              api_key: str | None = None, engine: str = "transformers", which: str = "final",
              print_command: bool = False, max_batch: int = 1) -> None:
    if engine not in ("transformers", "vllm"):
        raise UserError(f"--engine: must be transformers or vllm, got {engine!r}")
    if not 0 <= port <= 65535:
        raise UserError(f"--port: must be 0-65535, got {port}")
    if max_batch < 1:
        raise UserError(f"--max-batch: must be at least 1, got {max_batch}")
    if max_batch > 1 and engine == "vllm":
        raise UserError("--max-batch applies to the transformers engine; vLLM batches continuously on its own")
    if api_key is not None and not api_key.strip():
        raise UserError(f"--api-key / {API_KEY_ENV}: empty")
    from ft_cli.tasks.classify_run import classification_target

    if (classifier := classification_target(base_or_run, which)) is not None:  # POST /v1/classify
        _serve_classifier(classifier, adapter_specs, host=host, port=port, api_key=api_key, engine=engine,
                          print_command=print_command)
        return
    plan = plan_serve(base_or_run, adapter_specs, which)
    if engine == "vllm":
        from ft_cli.serve.vllm import exec_vllm, vllm_command

        command = vllm_command(plan, host=host, port=port)
        if print_command:
            print(" ".join(command))
            return
        exec_vllm(command, api_key)
        return
    if print_command:
        raise UserError("--print-command shows the command of --engine vllm; the transformers engine runs in ft")
    import uvicorn

    if host not in LOOPBACK and not api_key:
        print(f"warning: serving on {host} without --api-key ({API_KEY_ENV}): anyone who can reach port {port} "
              "can use the model", file=sys.stderr)
    served = load_engine(plan, max_batch=max_batch)
    from ft_cli.serve.api import build_app

    app = build_app(served, api_key=api_key, roots=roots(plan))
    _banner(plan, host, port, api_key is not None, max_batch)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)


def _serve_classifier(target: Any, adapter_specs: list[str], *, host: str, port: int, api_key: str | None,
                      engine: str, print_command: bool) -> None:
    """A classification run: one model behind POST /v1/classify (ft_cli.serve.classify)."""
    if adapter_specs or engine != "transformers" or print_command:
        raise UserError(f"{target.path}: a classification run is served alone by the transformers engine (no "
                        "--adapter, --engine vllm or --print-command)")
    import uvicorn

    from ft_cli.serve.classify import load_classifier_app

    if host not in LOOPBACK and not api_key:
        print(f"warning: serving on {host} without --api-key ({API_KEY_ENV}): anyone who can reach port {port} "
              "can use the model", file=sys.stderr)
    app, classifier = load_classifier_app(target, api_key=api_key)
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/v1/classify"
    print(f"classifier `{classifier.name}` ({target.recipe.method}; labels {', '.join(classifier.labels)}) at "
          f"POST {url}{' (API key required)' if api_key else ''}", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)


def _banner(plan: ServePlan, host: str, port: int, keyed: bool, max_batch: int = 1) -> None:
    print(f"base: {plan.base} (model `{BASE_NAME}`)")
    for a in plan.adapters:
        rank = f", rank {a.rank}" if a.rank else ""
        print(f"adapter `{a.name}`: {a.path} ({a.recipe.method}{rank})")
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/v1"
    policy = ("requests are decoded one at a time in arrival order" if max_batch == 1 else
              f"queued requests for one adapter are decoded in batches of up to {max_batch}")
    print(f"OpenAI-compatible API at {url}{' (API key required)' if keyed else ''}; {policy}", flush=True)


class BackgroundServer:
    """uvicorn serving `app` on a thread, for tests and benchmarks: `with BackgroundServer(app) as url: ...`.
    It binds the socket itself (port 0 = a free port) so the port is known before uvicorn starts."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        import time

        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
