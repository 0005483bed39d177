"""Several processes on the CPU (gloo): `ft train` under torchrun and `accelerate launch`, end to end.

The strong check: 2 processes with micro_batch_size m compute exactly what 1 process with 2m computes (same global
batch and row order by construction of MicroBatches; gradients normalised by the global trained-token count), so
losses and adapter weights must agree, even though the 2-process run is killed with SIGKILL and resumed on the way.
Then an FSDP2 checkpoint round trip.
Each child gets OMP_NUM_THREADS=1 (two processes share the CI machine's cores) and a free rendezvous port.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.test_train import metrics, write_recipe

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
TRAIN = {"max_steps": 8, "micro_batch_size": 2, "grad_accum": 2, "lr": 1e-2, "save_every": 2, "eval_every": 4,
         "log_every": 1, "keep_last": 2, "gradient_checkpointing": False}
# The 2-process run goes through this wrapper (torchrun runs it as a script). It records which ranks tokenized the
# data, and makes every rank kill itself with SIGKILL right after the checkpoint of step FT_TEST_KILL_AT is whole
# (a kill from outside races with steps that take milliseconds on the tiny model).
WRAPPER = """
import os, signal, sys
import ft_cli.checkpoint as checkpoint
import ft_cli.data.pipeline as pipeline
from ft_cli.cli import main

_build, _save = pipeline._build, checkpoint.save_checkpoint

def build(*args, **kwargs):
    with open(os.environ["FT_TEST_BUILD_LOG"], "a") as f:
        f.write(os.environ.get("RANK", "?") + "\\n")
    return _build(*args, **kwargs)

def save(run, step, **kwargs):
    path = _save(run, step, **kwargs)
    if step == int(os.environ["FT_TEST_KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return path

pipeline._build, checkpoint.save_checkpoint = build, save
sys.exit(main())
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), *args]


def run(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, env=env or child_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    return out


def adapter(run_dir: Path) -> dict:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory, alpaca_file: Path, tiny_llama_dir: Path) -> Path:
    # dropout 0: dropout masks come from each rank's own RNG stream, the one thing the runs could not share
    return write_recipe(tmp_path_factory.mktemp("dist"), alpaca_file, train=TRAIN,
                        lora={"rank": 8, "alpha": 16, "dropout": 0.0}, data={"val_split": 0.1})


@pytest.fixture(scope="module")
def two_proc(recipe: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, Path]:
    """2 processes, micro_batch_size 2, fresh data cache (built-in models shared): started with torchrun, every
    rank killed with SIGKILL right after the step-4 checkpoint, then resumed with `accelerate launch --config_file
    recipes/accelerate/ddp.yaml -m ft_cli.cli train RECIPE --resume` (accelerate runs torchrun's launcher), each
    rank then reading its batches through a DataLoader worker (train.dataloader_workers: 1)."""
    tmp = tmp_path_factory.mktemp("two")
    cache = tmp / "cache"
    cache.mkdir()
    (cache / "builtin").symlink_to(Path(os.environ["FT_CACHE_DIR"]) / "builtin")
    wrapper = tmp / "ft_killed.py"
    wrapper.write_text(WRAPPER)
    log = tmp / "builds.log"
    env = child_env(FT_CACHE_DIR=str(cache), FT_TEST_BUILD_LOG=str(log), FT_TEST_KILL_AT="4")
    out_dir = tmp / "run"
    killed = subprocess.run(torchrun(str(wrapper), "train", str(recipe), "--output-dir", str(out_dir)), env=env,
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert killed.returncode != 0 and (out_dir / "checkpoints" / "step-4" / "state.json").is_file(), killed.stderr
    assert not (out_dir / "adapter").exists() and not (out_dir / "checkpoints" / "step-6").exists()
    out = run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "recipes" / "accelerate" / "ddp.yaml"), "--num_processes", "2", "--main_process_port",
               str(free_port()), "-m", "ft_cli.cli", "train", str(recipe), "--output-dir", str(out_dir), "--resume",
               "--set", "train.dataloader_workers=1"],
              env)
    return out_dir, out.stdout + out.stderr, log


@pytest.fixture(scope="module")
def one_proc(recipe: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1 process, micro_batch_size 4, uninterrupted: the same global batches as two_proc."""
    out_dir = tmp_path_factory.mktemp("one") / "run"
    run([sys.executable, "-m", "ft_cli.cli", "train", str(recipe), "--set", "train.micro_batch_size=4",
         "--output-dir", str(out_dir)])
    return out_dir


def test_two_processes_write_once(two_proc: tuple[Path, str, Path]) -> None:
    run_dir, output, build_log = two_proc
    assert build_log.read_text().split() == ["0"], "data must be tokenized once, by rank 0; the others reuse it"
    train_lines, eval_lines = metrics(run_dir)
    assert [ln["step"] for ln in train_lines] == list(range(1, 9))  # each step once, across the kill
    assert [ln["step"] for ln in eval_lines] == [4, 8]
    manifest = json.loads((run_dir / "run.json").read_text())
    assert manifest["num_processes"] == 2 and manifest["status"] == "completed"
    assert manifest["resumed_from_step"] == 4
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-6", "step-8"]
    assert sorted(p.name for p in (run_dir / "checkpoints" / "step-8").glob("rng-*.pt")) == ["rng-0.pt", "rng-1.pt"]
    assert output.count("done: 8 steps") == 1  # only rank 0 reports
    assert "warning:" not in output


def test_adapter_loads_in_peft(two_proc: tuple[Path, str, Path], tiny_llama_dir: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model = PeftModel.from_pretrained(base, two_proc[0] / "adapter")
    trained = adapter(two_proc[0])
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(trained) > 0
    assert model(input_ids=torch.tensor([[5, 6, 7]])).logits.isfinite().all()


def test_two_processes_equal_one_with_twice_the_micro_batch(two_proc: tuple[Path, str, Path],
                                                            one_proc: Path) -> None:
    """Also shows that the kill and resume changed nothing: the reference ran uninterrupted."""
    (train2, eval2), (train1, eval1) = metrics(two_proc[0]), metrics(one_proc)
    assert [x["loss"] for x in train2] == pytest.approx([x["loss"] for x in train1], rel=1e-4)
    assert [x["grad_norm"] for x in train2] == pytest.approx([x["grad_norm"] for x in train1], rel=1e-3)
    assert [x["eval_loss"] for x in eval2] == pytest.approx([x["eval_loss"] for x in eval1], rel=1e-4)
    assert [x["epoch"] for x in train2] == [x["epoch"] for x in train1]
    # the throughput fields count every process: the same tokens and trained targets as the one process
    assert [(x["tokens"], x["targets"]) for x in train2] == [(x["tokens"], x["targets"]) for x in train1]
    a, b = adapter(two_proc[0]), adapter(one_proc)
    assert a.keys() == b.keys()
    scale = max(v.abs().max().item() for v in b.values())
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4 * scale


@pytest.mark.parametrize("eval_rows", [7, 8])
def test_classification_two_processes_equal_one(tmp_path: Path, eval_rows: int) -> None:
    """task classification: 2 processes with micro_batch_size 2 train and evaluate exactly as 1 process with 4 —
    losses, accuracy / F1 / confusion matrix of every evaluation, final adapter and head — and each evaluation counts
    every eval row once, also when the eval set does not split evenly across the processes (7 rows)."""
    import shutil

    import yaml

    from ft_cli.builtin_models import resolve_builtin
    from tests.test_classification import labelled_rows, recipe_dict, write_json

    # tiny-bert without dropout: each process draws its own dropout masks, the one thing the runs could not share
    bert = tmp_path / "bert"
    shutil.copytree(resolve_builtin("tiny-bert"), bert)
    config = json.loads((bert / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (bert / "config.json").write_text(json.dumps(config))
    rows = labelled_rows(48 + eval_rows)
    train_file, eval_file = write_json(tmp_path / "train.json", rows[:48]), write_json(tmp_path / "eval.json",
                                                                                        rows[48:])
    raw = recipe_dict(train_file, model={"name_or_path": str(bert)}, method="lora",
                      lora={"rank": 8, "alpha": 16, "dropout": 0.0},
                      data={"eval": str(eval_file)},
                      train={"max_steps": 6, "micro_batch_size": 2, "grad_accum": 2, "lr": 1e-2, "eval_every": 3,
                             "best_metric": "f1_macro"})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    two, one = tmp_path / "two", tmp_path / "one"
    run(torchrun("-m", "ft_cli.cli", "train", str(recipe), "--output-dir", str(two)))
    run([sys.executable, "-m", "ft_cli.cli", "train", str(recipe), "--set", "train.micro_batch_size=4",
         "--output-dir", str(one)])
    (train2, eval2), (train1, eval1) = metrics(two), metrics(one)
    assert json.loads((two / "run.json").read_text())["num_processes"] == 2
    assert [x["loss"] for x in train2] == pytest.approx([x["loss"] for x in train1], rel=1e-4)
    assert [x["step"] for x in eval2] == [x["step"] for x in eval1] == [3, 6]
    for e2, e1 in zip(eval2, eval1, strict=True):
        assert e2["eval_examples"] == e1["eval_examples"] == eval_rows
        assert sum(map(sum, e2["eval_confusion_matrix"])) == eval_rows
        assert e2["eval_confusion_matrix"] == e1["eval_confusion_matrix"]
        for key in ("eval_accuracy", "eval_f1_macro", "eval_f1_micro", "eval_f1_weighted", "eval_loss"):
            assert e2[key] == pytest.approx(e1[key], rel=1e-4), key
    a, b = adapter(two), adapter(one)
    assert a.keys() == b.keys() and any("classifier" in k for k in a)
    # Adam divides each element's update by its own gradient scale, so summation-order noise in near-zero gradients
    # shows in the weights (as in test_preference's 2-process test): 1.9e-4 of the largest weight was seen with
    # another tokenizer vocabulary, while losses and every evaluation still agreed to 1e-4
    scale = max(v.abs().max().item() for v in b.values())
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-3 * scale


# accelerate applies FSDP only on GPUs, so this drives ft_cli.checkpoint on a model sharded by hand with FSDP2's
# fully_shard (as accelerate's fsdp_version 2 does), with a stand-in for the Accelerator. Saved weights must be
# whole tensors, and a resumed run must continue exactly as the original did.
FSDP_WORKER = '''import json, sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from accelerate.utils import DistributedType
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM

from ft_cli.checkpoint import load_checkpoint, save_checkpoint
from ft_cli.run_dir import RunDir

model_dir, out = sys.argv[1], Path(sys.argv[2])
dist.init_process_group("gloo")
rank = dist.get_rank()
acc = SimpleNamespace(distributed_type=DistributedType.FSDP, process_index=rank, is_main_process=rank == 0,
                      scaler=None, wait_for_everyone=dist.barrier, unwrap_model=lambda m: m)


def build():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    optimizer = SimpleNamespace(optimizer=inner, state_dict=inner.state_dict, load_state_dict=inner.load_state_dict)
    scheduler = torch.optim.lr_scheduler.LambdaLR(inner, lambda step: 1.0)
    return model, optimizer, scheduler


def step(model, optimizer, i):
    g = torch.Generator().manual_seed(100 * i + rank)
    x = torch.randint(5, 300, (2, 24), generator=g)
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    optimizer.optimizer.step()
    optimizer.optimizer.zero_grad()
    return loss.item()


def full_trainable(model):
    return {n: p.detach().full_tensor() for n, p in model.named_parameters() if p.requires_grad}


run = RunDir(out)
model, optimizer, scheduler = build()
for i in range(2):
    step(model, optimizer, i)
save_checkpoint(run, 2, model=model, optimizer=optimizer, scheduler=scheduler, state={}, accelerator=acc, keep_last=None)
at_save = full_trainable(model)
losses = [step(model, optimizer, i) for i in (2, 3)]
final = full_trainable(model)

model, optimizer, scheduler = build()
load_checkpoint(run.checkpoint(2), model=model, optimizer=optimizer, scheduler=scheduler, accelerator=acc)
loaded = full_trainable(model)
resumed = [step(model, optimizer, i) for i in (2, 3)]
after = full_trainable(model)
if rank == 0:
    saved = load_file(str(run.checkpoint(2) / "trainable.safetensors"))
    result = {
        "saved_keys_match": sorted(saved) == sorted(at_save),
        "saved_max_diff": max((saved[k] - at_save[k]).abs().max().item() for k in at_save),
        "loaded_max_diff": max((loaded[k] - at_save[k]).abs().max().item() for k in at_save),
        "losses": losses, "resumed": resumed,
        "final_max_diff": max((after[k] - final[k]).abs().max().item() for k in final),
        "sharded": type(next(p for p in model.parameters() if p.requires_grad)).__name__,
    }
    (out / "result.json").write_text(json.dumps(result))
dist.destroy_process_group()
'''


def test_fsdp2_checkpoint_round_trip(tmp_path: Path, tiny_llama_dir: Path) -> None:
    worker = tmp_path / "fsdp_worker.py"
    worker.write_text(FSDP_WORKER)
    run(torchrun(str(worker), str(tiny_llama_dir), str(tmp_path / "run")))
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["sharded"] == "DTensor"
    assert result["saved_keys_match"] and result["saved_max_diff"] == 0.0 and result["loaded_max_diff"] == 0.0
    assert result["resumed"] == pytest.approx(result["losses"], rel=1e-6)
    assert result["final_max_diff"] < 1e-6


# Launch checks (milliseconds) ----------------------------------------------------------------------------------------

def _fake_accelerator(kind: str, num_processes: int = 2):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    plugin = SimpleNamespace(deepspeed_config={"train_micro_batch_size_per_gpu": "auto"})
    return SimpleNamespace(distributed_type=DistributedType(kind), num_processes=num_processes,
                           state=SimpleNamespace(deepspeed_plugin=plugin))


def test_cpu_processes_need_accelerates_cpu_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torchrun without a GPU, accelerate must be told cpu=True or every process trains alone."""
    from ft_cli.preflight import cpu_processes as _cpu_processes

    for var in ("WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert not _cpu_processes()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    import torch

    assert _cpu_processes() == (not torch.accelerator.is_available())


def test_launches_accelerate_changes_are_warned(monkeypatch: pytest.MonkeyPatch) -> None:
    from ft_cli.preflight import launch_warnings as _launch_warnings

    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    warnings = _launch_warnings(_fake_accelerator("NO", num_processes=1))
    assert len(warnings) == 2 and "torchrun" in warnings[0] and "FSDP needs GPUs" in warnings[1]
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "INDUCTOR")  # accelerate launch --dynamo_backend inductor
    (warning,) = _launch_warnings(_fake_accelerator("MULTI_CPU"))
    assert "--dynamo_backend INDUCTOR is ignored" in warning and "train.compile: true" in warning
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")  # what accelerate launch sets by default
    assert _launch_warnings(_fake_accelerator("MULTI_CPU")) == []


def test_deepspeed_limits_are_user_errors(alpaca_file: Path, tmp_path: Path) -> None:
    from ft_cli.errors import UserError
    from ft_cli.preflight import check_deepspeed as _check_deepspeed
    from ft_cli.recipe import load_recipe

    recipe = load_recipe(write_recipe(tmp_path, alpaca_file, train={"grad_accum": 2}))
    with pytest.raises(UserError, match="train.grad_accum: must be 1 under DeepSpeed"):
        _check_deepspeed(recipe, _fake_accelerator("DEEPSPEED"), resume=False)
    recipe = load_recipe(write_recipe(tmp_path, alpaca_file, train={"grad_accum": 1}))
    with pytest.raises(UserError, match="train.save_every: resumable checkpoints"):
        _check_deepspeed(recipe, _fake_accelerator("DEEPSPEED"), resume=False)
    recipe = load_recipe(write_recipe(tmp_path, alpaca_file, train={"grad_accum": 1, "save_every": None}))
    acc = _fake_accelerator("DEEPSPEED")
    _check_deepspeed(recipe, acc, resume=False)
    assert acc.state.deepspeed_plugin.deepspeed_config == {
        "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0}
    _check_deepspeed(load_recipe(write_recipe(tmp_path, alpaca_file)), _fake_accelerator("MULTI_GPU"), resume=True)
