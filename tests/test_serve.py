"""ft serve: one base, three adapters, behind an OpenAI-compatible API, checked with the real `openai` client and
with plain HTTP (urllib) against uvicorn running in-process on a free port.

The reference for every reply is `ft generate` on each run alone (greedy, and seeded sampling): the server must
return exactly that text, whichever other adapters are being requested at the same time.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from ft_cli.errors import UserError

KEY = "test-key-123"
PROMPTS = ["What color is the mouse?", "Name a fruit."]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def runs(lora_runs: dict[str, Path]) -> dict[str, Path]:
    return lora_runs


@pytest.fixture(scope="module")
def expected(runs: dict[str, Path]) -> dict[tuple[str, str], str]:
    """What `ft generate --temperature 0` answers for each run alone, and for the base model."""
    from ft_cli.builtin_models import resolve_builtin
    from ft_cli.generate import generate_cli

    targets = {**runs, "base": resolve_builtin("builtin:tiny-llama")}
    return {(name, p): generate_cli(target, p, temperature=0, max_new_tokens=NEW_TOKENS)
            for name, target in targets.items() for p in PROMPTS}


@pytest.fixture(scope="module")
def server(runs: dict[str, Path]):
    from ft_cli.serve import BackgroundServer, load_engine, plan_serve, roots
    from ft_cli.serve.api import build_app

    plan = plan_serve(str(runs["alpha"]), [f"beta={runs['beta']}", f"gamma={runs['gamma']}"])
    engine = load_engine(plan)
    with BackgroundServer(build_app(engine, api_key=KEY, roots=roots(plan))) as url:
        yield url, engine


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def http(url: str, method: str = "GET", body: object = None, key: str | None = KEY,
         raw: bytes | None = None) -> tuple[int, dict | str]:
    """Plain HTTP with urllib: (status, JSON body or text)."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    if key is not None:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            status, text = resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        status, text = err.code, err.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def chat(client, model: str, prompt: str, **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                          **{"max_tokens": NEW_TOKENS, **kw})


def streamed_chat(client, model: str, prompt: str, **kw) -> tuple[str, str]:
    text, finish = "", None
    for chunk in chat(client, model, prompt, stream=True, **kw):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    return text, finish


# The contract: exactly ft generate's replies, whatever runs concurrently ---------------------------------------------

def test_adapters_answer_differently(expected) -> None:
    """The premise of the mixing test: each adapter (and the base) has its own greedy reply."""
    for p in PROMPTS:
        replies = [expected[(name, p)] for name in ("alpha", "beta", "gamma", "base")]
        assert len(set(replies)) == 4, replies


def test_16_concurrent_requests_across_3_adapters_equal_ft_generate(server, client, expected) -> None:
    names = {"alpha": "alpha", "beta": "beta", "gamma": "gamma"}
    jobs = [(list(names)[i % 3], PROMPTS[i % 2], i % 4 == 3) for i in range(16)]  # a quarter of them streamed

    def one(job):
        name, prompt, stream = job
        if stream:
            return streamed_chat(client, name, prompt, temperature=0)[0]
        return chat(client, name, prompt, temperature=0).choices[0].message.content

    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(one, jobs))
    for (name, prompt, stream), reply in zip(jobs, replies, strict=True):
        assert reply == expected[(names[name], prompt)], (name, prompt, stream)
    # And the base, with every adapter loaded: the adapters are switched off, not merged in.
    assert chat(client, "base", PROMPTS[0], temperature=0).choices[0].message.content == expected[("base", PROMPTS[0])]


@pytest.fixture(scope="module")
def batched(server):
    """A second server on the same model and lock, with --max-batch 4."""
    from ft_cli.serve import BackgroundServer
    from ft_cli.serve.api import build_app
    from ft_cli.serve.engine import Engine

    engine = server[1]
    batching = Engine(model=engine.model, tokenizers=engine.tokenizers, device=engine.device, context=engine.context,
                      max_batch=4, lock=engine.lock)
    with BackgroundServer(build_app(batching)) as url:
        yield url, batching


def test_max_batch_batches_per_adapter_and_still_equals_ft_generate(batched, expected) -> None:
    """Measured on this model (float32): batched greedy replies equal the unbatched ones, hence ft generate's."""
    from openai import OpenAI

    url, engine = batched
    client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    jobs = [(("alpha", "beta", "gamma")[i % 3], PROMPTS[i % 2], i % 4 == 3) for i in range(16)]

    def one(job):
        name, prompt, stream = job
        if stream:
            return streamed_chat(client, name, prompt, temperature=0)[0]
        return chat(client, name, prompt, temperature=0).choices[0].message.content

    engine.decodes.clear()
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(one, jobs))
    for (name, prompt, _), reply in zip(jobs, replies, strict=True):
        assert reply == expected[(name, prompt)], (name, prompt)
    assert sum(n for _, n in engine.decodes) == 16 and max(n for _, n in engine.decodes) > 1, engine.decodes


def test_a_batch_holds_one_adapter_and_rows_keep_their_own_settings(batched, expected) -> None:
    from ft_cli.generation import render_prompt
    from ft_cli.serve.engine import Params

    _, engine = batched
    full = expected[("gamma", PROMPTS[0])]
    stop = full.strip()[2:5]
    ids = {(n, p): render_prompt(engine.tokenizers[n], p) for n in ("alpha", "gamma") for p in PROMPTS}
    greedy = Params(max_new_tokens=NEW_TOKENS, temperature=0, top_p=1)
    work = [("gamma", PROMPTS[0], greedy), ("alpha", PROMPTS[0], greedy),
            ("gamma", PROMPTS[1], Params(max_new_tokens=5, temperature=0, top_p=1)),
            ("alpha", PROMPTS[1], greedy), ("gamma", PROMPTS[0], Params(NEW_TOKENS, 0, 1, stop=(stop,)))]
    serial = [engine.generate(n, ids[(n, p)], params) for n, p, params in work]
    pieces: list[str] = []
    engine.decodes.clear()
    with engine.lock:  # hold the worker: the first job waits alone, the rest queue up behind it
        first = engine.submit(*work[0][:1], ids[work[0][:2]], work[0][2])
        while engine._jobs:
            time.sleep(0.01)
        rest = [engine.submit(n, ids[(n, p)], params, on_delta=pieces.append if i == 4 else None)
                for i, (n, p, params) in enumerate(work) if i]
    replies = [f.result(timeout=120) for f in [first, *rest]]
    assert engine.decodes == [("gamma", 1), ("alpha", 2), ("gamma", 2)]  # by adapter, head of the queue first
    assert replies == serial
    assert replies[2].completion_tokens == 5 and replies[2].finish_reason == "length"
    assert replies[4].text == full[:full.index(stop)] and replies[4].finish_reason == "stop"
    assert "".join(pieces) == replies[4].text


def test_only_compatible_sampling_shares_a_batch() -> None:
    from ft_cli.serve.engine import Engine, Job, Params

    engine = Engine(model=None, tokenizers={}, context=40, max_batch=3)
    greedy, sampled = Params(8, 0, 1), Params(8, 0.7, 0.9)
    jobs = [Job("a", [1] * 10, greedy), Job("b", [1] * 10, greedy), Job("a", [1] * 10, sampled),
            Job("a", [1] * 30, greedy),  # 30 + 8 fits the context of 40 alone...
            Job("a", [1] * 5, Params(12, 0, 1)),  # ...but not with max_tokens 12 beside it
            Job("a", [1] * 5, greedy), Job("a", [1] * 5, greedy)]
    engine._jobs.extend(jobs)
    assert engine._next_batch() == [jobs[0], jobs[3], jobs[5]]  # head first, same adapter and key, max 3
    assert engine._next_batch() == [jobs[1]]
    assert engine._next_batch() == [jobs[2]]
    assert engine._next_batch() == [jobs[4], jobs[6]]

    assert Params(8, 0, 0.9).batch_key == Params(16, 0, 1.0, stop=("x",)).batch_key  # greedy: any top_p, stop
    assert Params(8, 0.7, 0.9).batch_key == Params(8, 0.7, 0.9).batch_key != Params(8, 0.8, 0.9).batch_key
    assert Params(8, 0.7, 0.9, seed=1).batch_key is None  # a seed promises ft generate --seed's reply


def test_seeded_sampling_equals_ft_generate(client, runs) -> None:
    from ft_cli.generate import generate_cli

    want = generate_cli(runs["beta"], PROMPTS[1], temperature=1.0, top_p=0.9, seed=7, max_new_tokens=NEW_TOKENS)
    got = chat(client, "beta", PROMPTS[1], temperature=1.0, top_p=0.9, seed=7)
    assert got.choices[0].message.content == want
    assert streamed_chat(client, "beta", PROMPTS[1], temperature=1.0, top_p=0.9, seed=7)[0] == want


def test_streaming_yields_the_non_streamed_text(client) -> None:
    for model in ("alpha", "gamma", "base"):
        for kw in ({"temperature": 0}, {"temperature": 0.8, "seed": 3}):
            whole = chat(client, model, PROMPTS[0], **kw)
            text, finish = streamed_chat(client, model, PROMPTS[0], **kw)
            assert (text, finish) == (whole.choices[0].message.content, whole.choices[0].finish_reason)
    # /v1/completions (no chat template: the prompt as it is)
    whole = client.completions.create(model="beta", prompt="The mouse is", max_tokens=NEW_TOKENS, temperature=0)
    pieces = [c.choices[0].text for c in client.completions.create(
        model="beta", prompt="The mouse is", max_tokens=NEW_TOKENS, temperature=0, stream=True) if c.choices]
    assert whole.choices[0].text and "".join(pieces) == whole.choices[0].text
    assert whole.usage.completion_tokens <= NEW_TOKENS


def test_stop_strings_cut_the_reply_in_both_modes(client, expected) -> None:
    full = expected[("gamma", PROMPTS[0])]
    stop = full.strip()[2:5]  # a piece from the middle of the greedy reply
    whole = chat(client, "gamma", PROMPTS[0], temperature=0, stop=[stop])
    assert whole.choices[0].message.content == full[:full.index(stop)]
    assert whole.choices[0].finish_reason == "stop"
    assert streamed_chat(client, "gamma", PROMPTS[0], temperature=0, stop=[stop]) == \
        (whole.choices[0].message.content, "stop")


def test_usage_and_finish_reason(client) -> None:
    reply = chat(client, "alpha", PROMPTS[0], temperature=0, max_tokens=3)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 3
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 3
    chunks = list(chat(client, "alpha", PROMPTS[0], temperature=0, stream=True,
                       stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == reply.usage.prompt_tokens


def test_models_lists_base_and_adapters(client, server, runs) -> None:
    assert [m.id for m in client.models.list().data] == ["base", "alpha", "beta", "gamma"]
    status, body = http(server[0] + "/v1/models/beta")
    assert status == 200 and body["id"] == "beta" and body["root"] == str(runs["beta"] / "adapter")


# Errors: OpenAI's shape, never a traceback ---------------------------------------------------------------------------

def test_wrong_or_missing_key_is_401_on_every_route(server) -> None:
    import openai

    url = server[0]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
                         ("GET", "/health"), ("GET", "/no/such/route")):
        for key in ("wrong", None):
            status, body = http(url + path, method, body={} if method == "POST" else None, key=key)
            assert status == 401 and body["error"]["code"] == "invalid_api_key", (path, key, body)


def test_unknown_model_is_404(client, server) -> None:
    import openai

    with pytest.raises(openai.NotFoundError) as err:
        chat(client, "delta", "hi")
    assert "delta" in str(err.value) and "alpha" in str(err.value)
    status, body = http(server[0] + "/v1/completions", "POST", {"model": "nope", "prompt": "x"})
    assert status == 404 and body["error"]["code"] == "model_not_found" and body["error"]["param"] == "model"


@pytest.mark.parametrize(("path", "body", "status", "param"), [
    ("/v1/chat/completions", b"{not json", 400, None),
    ("/v1/chat/completions", [1, 2], 400, None),
    ("/v1/chat/completions", {"model": "alpha"}, 400, "messages"),
    ("/v1/chat/completions", {"model": "alpha", "messages": [{"role": "robot", "content": "x"}]}, 400,
     "messages.0.role"),
    ("/v1/chat/completions", {"model": "alpha", "messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n"),
    ("/v1/chat/completions", {"model": "alpha", "messages": [{"role": "user", "content": "x"}],
                              "temperature": 5}, 400, "temperature"),
    ("/v1/chat/completions", {"model": "alpha", "messages": [{"role": "user", "content": "x"}],
                              "logprobs": True}, 400, "logprobs"),
    ("/v1/chat/completions", {"model": "alpha", "messages": [{"role": "user", "content": "x"}],
                              "max_tokens": 10 ** 6}, 400, "max_tokens"),
    ("/v1/completions", {"model": "alpha", "prompt": ["a", "b"]}, 400, "prompt"),
    ("/v1/completions", {"model": "alpha", "prompt": "x", "stop": ["", "y"]}, 400, "stop"),
])
def test_bad_requests_are_400_in_openai_shape(server, path, body, status, param) -> None:
    raw = body if isinstance(body, bytes) else None
    got, answer = http(server[0] + path, "POST", None if raw else body, raw=raw)
    assert got == status, answer
    assert set(answer["error"]) == {"message", "type", "param", "code"} and answer["error"]["param"] == param
    assert "Traceback" not in json.dumps(answer)


def test_route_and_method_errors(server) -> None:
    status, body = http(server[0] + "/v2/whatever")
    assert status == 404 and body["error"]["code"] == "not_found"
    status, body = http(server[0] + "/v1/chat/completions", "GET")
    assert status == 405 and "not allowed" in body["error"]["message"]


def test_an_internal_failure_is_a_500_without_traceback(server, monkeypatch) -> None:
    url, engine = server

    def boom(*a, **k):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(engine, "generate", boom)
    status, body = http(url + "/v1/chat/completions", "POST",
                        {"model": "alpha", "messages": [{"role": "user", "content": "x"}]})
    assert status == 500 and body["error"]["type"] == "server_error"
    assert "secret internals" not in json.dumps(body) and "Traceback" not in json.dumps(body)


def test_sse_stream_over_plain_http(server) -> None:
    status, text = http(server[0] + "/v1/chat/completions", "POST",
                        {"model": "alpha", "messages": [{"role": "user", "content": PROMPTS[0]}], "stream": True,
                         "temperature": 0, "max_tokens": 4})
    assert status == 200 and isinstance(text, str)
    events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "alpha" for c in chunks)


def test_a_client_leaving_mid_stream_stops_its_decoding(server, monkeypatch) -> None:
    url, engine = server
    finished = []
    generate = engine.generate

    def recording(*args, **kwargs):
        finished.append(generate(*args, **kwargs))
        return finished[-1]

    monkeypatch.setattr(engine, "generate", recording)
    # Greedy on the random base loops on one word and never reaches its end-of-turn token.
    body = {"model": "base", "messages": [{"role": "user", "content": PROMPTS[0]}], "stream": True,
            "temperature": 0, "max_tokens": 3000}
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    resp = urllib.request.urlopen(req, timeout=120)
    assert resp.readline().startswith(b"data: ")  # the stream has begun
    resp.close()  # the client goes away
    deadline = time.monotonic() + 120
    while not finished and time.monotonic() < deadline:
        time.sleep(0.1)
    assert finished and finished[0].finish_reason == "cancelled" and finished[0].completion_tokens < 3000


# Planning: what may share a base (exit 2 otherwise) -------------------------------------------------------------------

def _copy_run(run: Path, dest: Path, **recipe_model: str) -> Path:
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("checkpoints"))
    if recipe_model:
        recipe = yaml.safe_load((dest / "recipe.yaml").read_text())
        recipe["model"].update(recipe_model)
        (dest / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return dest


def test_plan_refuses_adapters_that_cannot_share_the_base(runs, tmp_path) -> None:
    from ft_cli.serve import plan_serve

    plan = plan_serve("builtin:tiny-llama", [f"a={runs['alpha']}", str(runs["beta"])])
    assert [a.name for a in plan.adapters] == ["a", "beta"]
    bf16 = _copy_run(runs["gamma"], tmp_path / "bf16", dtype="bfloat16")
    cases = {
        "need different bases: model.dtype": [f"a={runs['alpha']}", f"b={bf16}"],
        "given twice": [f"x={runs['alpha']}", f"x={runs['beta']}"],
        "reserved for the base": [f"base={runs['alpha']}"],
        "must be 1-64 letters": [f"a b={runs['alpha']}"],
        "expected NAME=RUN_DIR": ["a="],
        "no such directory": [f"a={tmp_path / 'missing'}"],
    }
    for message, specs in cases.items():
        with pytest.raises(UserError, match=message):
            plan_serve("builtin:tiny-llama", specs)
    with pytest.raises(UserError, match="not on the base"):
        plan_serve("builtin:tiny-gpt2", [f"a={runs['alpha']}"])
    with pytest.raises(UserError, match="no such directory"):
        plan_serve("./nowhere", [])


def test_cli_exit_2_for_bad_serve_input(runs, tmp_path) -> None:
    from typer.testing import CliRunner

    from ft_cli.cli import app

    result = CliRunner().invoke(app, ["serve", str(runs["alpha"]), "--adapter", f"alpha={runs['beta']}"])
    assert result.exit_code == 2 and "given twice" in result.output
    result = CliRunner().invoke(app, ["serve", "builtin:tiny-llama", "--engine", "tgi"])
    assert result.exit_code == 2 and "--engine" in result.output


# QLoRA: the adapters share one 4-bit base ---------------------------------------------------------------------------

def test_qlora_adapters_share_one_4bit_base(tmp_path, alpaca_file, lora_runs) -> None:
    from ft_cli.generate import generate_cli
    from ft_cli.generation import render_prompt
    from ft_cli.serve import load_engine, plan_serve
    from ft_cli.serve.engine import Params
    from tests.conftest import train_tiny_lora

    rows = json.loads(alpaca_file.read_text())
    runs = {name: train_tiny_lora(tmp_path, name, rows[i * 40:(i + 1) * 40], seed=i, method="qlora",
                                  model={"dtype": "bfloat16"}, quantization={"bits": 4, "compute_dtype": "bfloat16"})
            for i, name in enumerate(["q1", "q2"])}
    engine = load_engine(plan_serve(str(runs["q1"]), [str(runs["q2"])]))
    assert any(type(m).__name__ == "Linear4bit" for m in engine.model.modules())
    replies = {}
    for name, run in runs.items():
        ids = render_prompt(engine.tokenizers[name], PROMPTS[0])
        replies[name] = engine.generate(name, ids, Params(max_new_tokens=NEW_TOKENS, temperature=0, top_p=1)).text
        assert replies[name] == generate_cli(run, PROMPTS[0], temperature=0, max_new_tokens=NEW_TOKENS)
    assert replies["q1"] != replies["q2"]
    with pytest.raises(UserError, match="need different bases"):
        plan_serve(str(runs["q1"]), [f"a={lora_runs['alpha']}"])


def test_a_full_run_is_served_as_the_base(tmp_path, alpaca_file, lora_runs) -> None:
    from ft_cli.generate import generate_cli
    from ft_cli.generation import render_prompt
    from ft_cli.serve import load_engine, plan_serve
    from ft_cli.serve.engine import Params
    from tests.conftest import train_tiny_lora

    rows = json.loads(alpaca_file.read_text())[:40]
    run = train_tiny_lora(tmp_path, "full", rows, seed=0, method="full", lora=None,
                          train={"lr": 1e-3, "max_steps": 3})
    plan = plan_serve(str(run), [])
    assert plan.whole_run is not None and plan.adapters == [] and plan.base == str(run / "model")
    engine = load_engine(plan)
    ids = render_prompt(engine.tokenizers["base"], PROMPTS[0])
    reply = engine.generate("base", ids, Params(max_new_tokens=NEW_TOKENS, temperature=0, top_p=1)).text
    assert reply == generate_cli(run, PROMPTS[0], temperature=0, max_new_tokens=NEW_TOKENS)
    with pytest.raises(UserError, match="not on the base .*full/model"):
        plan_serve(str(run), [f"a={lora_runs['alpha']}"])


# --engine vllm: the command it builds ----------------------------------------------------------------------------

def test_vllm_command_carries_the_base_and_every_adapter(runs, tmp_path) -> None:
    from typer.testing import CliRunner

    from ft_cli.builtin_models import resolve_builtin
    from ft_cli.cli import app

    result = CliRunner().invoke(app, ["serve", str(runs["alpha"]), "--adapter", f"b={runs['beta']}", "--adapter",
                                      f"g={runs['gamma']}", "--engine", "vllm", "--print-command", "--port", "9001"])
    assert result.exit_code == 0, result.output
    cmd = result.stdout.split()
    assert cmd[:3] == ["vllm", "serve", str(resolve_builtin("builtin:tiny-llama"))]
    i = cmd.index("--lora-modules")
    assert cmd[i + 1:i + 4] == [f"alpha={runs['alpha'] / 'adapter'}", f"b={runs['beta'] / 'adapter'}",
                                f"g={runs['gamma'] / 'adapter'}"]
    flags = dict(zip(cmd[3::2], cmd[4::2], strict=False))
    assert "--enable-lora" in cmd and cmd[cmd.index("--max-lora-rank") + 1] == "8"  # rank 8 adapters
    assert cmd[cmd.index("--max-loras") + 1] == "3" and flags["--served-model-name"] == "base"
    assert flags["--host"] == "127.0.0.1" and flags["--port"] == "9001" and flags["--dtype"] == "float32"
    assert "--quantization" not in cmd


def test_vllm_rank_rounding_and_refusals(runs, tmp_path, monkeypatch) -> None:
    import dataclasses

    from ft_cli.serve import plan_serve
    from ft_cli.serve.vllm import exec_vllm, vllm_command

    plan = plan_serve(str(runs["alpha"]), [])
    plan.adapters[0] = dataclasses.replace(plan.adapters[0], rank=20)
    cmd = vllm_command(plan, host="0.0.0.0", port=1)
    assert cmd[cmd.index("--max-lora-rank") + 1] == "32"
    plan.adapters[0] = dataclasses.replace(plan.adapters[0], rank=1024)
    with pytest.raises(UserError, match="exceeds"):
        vllm_command(plan, host="h", port=1)
    plan.adapters[0] = dataclasses.replace(plan.adapters[0], rank=8, use_dora=True)
    with pytest.raises(UserError, match="LoRA adapters only"):
        vllm_command(plan, host="h", port=1)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(UserError, match="vllm is not installed"):
        exec_vllm(["vllm", "serve", "x"], api_key="k")


def test_help_does_not_import_the_server_stack() -> None:
    code = ("import sys; from ft_cli.cli import app; bad = [m for m in ('starlette', 'uvicorn', 'torch', 'peft') "
            "if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
    out = subprocess.run([sys.executable, "-m", "ft_cli.cli", "serve", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "--adapter" in out and "FT_API_KEY" in out


# The command itself, as a user starts it ---------------------------------------------------------------------------

def test_ft_serve_starts_answers_and_stops_on_ctrl_c(runs, tmp_path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "FT_API_KEY": "env-key", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ft_cli.cli", "serve", str(runs["alpha"]), "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, status = time.monotonic() + 120, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                status, body = http(f"http://127.0.0.1:{port}/v1/models", key="env-key")
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.3)
        assert status == 200 and [m["id"] for m in body["data"]] == ["base", "alpha"]
        assert http(f"http://127.0.0.1:{port}/v1/models", key="other")[0] == 401
    finally:
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, out
    assert "adapter `alpha`" in out and f"http://127.0.0.1:{port}/v1 (API key required)" in out
    assert "Traceback" not in out
