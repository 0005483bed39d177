"""Every private or unstable name ft takes from another library, in one place: when an upgrade renames or removes
one, this module fails with the name and the ft code that needs it, instead of some command failing later.

Add a test here whenever ft starts relying on a name with a leading underscore, a module path outside the library's
documented API, an attribute it sets on another library's objects, or a class it recognises by name.
"""

from __future__ import annotations

import importlib
import inspect

import pytest


def _attr(module: str, name: str):
    return getattr(importlib.import_module(module), name)


def test_transformers_compile_jinja_template():  # ft_cli/data/templates.py: compile_template
    fn = _attr("transformers.utils.chat_template_utils", "_compile_jinja_template")
    template = fn("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert template.render(messages=[{"content": "a"}, {"content": "b"}]) == "ab"


def test_transformers_config_mapping_and_conv1d():  # ft_cli/model_path.py (_check_model_config), ft_cli/plan.py
    assert "llama" in _attr("transformers.models.auto.configuration_auto", "CONFIG_MAPPING")
    assert inspect.isclass(_attr("transformers.pytorch_utils", "Conv1D"))


def test_accelerate_shared_state():  # ft_cli/train.py: resets accelerate's process-wide state between runs
    state = _attr("accelerate.state", "AcceleratorState")
    assert isinstance(state._shared_state, dict)
    assert callable(state._reset_state)


def test_peft_ia3_default_module_mappings():  # ft_cli/methods/ia3.py
    targets = _attr("peft.utils.constants", "TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING")
    feedforward = _attr("peft.utils.constants", "TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING")
    assert targets["llama"] and set(feedforward["llama"]) <= set(targets["llama"])


def test_peft_prompt_learning_generation_hook():  # ft_cli/generation.py: prompt_learning_generation
    from peft import PeftType
    from peft.peft_model import PeftModelForCausalLM

    assert PeftType.PROMPT_TUNING and PeftType.PREFIX_TUNING
    assert "base_model_prepare_inputs_for_generation" in inspect.getsource(PeftModelForCausalLM)


def test_peft_modules_to_save_wrapper_name():  # ft_cli/methods/lora.py: check_modules_to_save finds it by name
    from peft.utils.other import ModulesToSaveWrapper

    assert ModulesToSaveWrapper.__name__ == "ModulesToSaveWrapper"


def test_bitsandbytes_cpu_path_switch_and_params4bit():  # ft_cli/model.py keep_bnb_cpu_path_trainable, count_parameters
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(64, 64, bias=False)
    assert hasattr(layer, "support_avx512bf16_for_cpu")
    assert type(layer.weight).__name__ == "Params4bit"


def test_torch_compile_probes():  # ft_cli/model.py: compile_problem
    assert callable(_attr("torch.utils._triton", "has_triton"))
    assert callable(_attr("torch._inductor.cpp_builder", "get_cpp_compiler"))


def test_torch_scheduler_last_lr():  # ft_cli/optim.py sets scheduler._last_lr after restoring a schedule
    import torch

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    assert scheduler._last_lr == [0.1]


def test_liger_apply_to_instance():  # ft_cli/model.py: apply_liger_kernel (train.liger_kernel, CUDA only)
    pytest.importorskip("liger_kernel", reason="liger-kernel is not installed (train.liger_kernel needs it)")
    assert callable(_attr("liger_kernel.transformers", "_apply_liger_kernel_to_instance"))
