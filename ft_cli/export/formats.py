"""The export formats: one registry entry each says what the format is, which library writes and loads it, and how
big it comes out (for the estimate `ft export` prints before it starts). No torch here: `ft --help` reads it.

Why these libraries (checked with torch 2.13, transformers 5.24, torchao 0.18, bitsandbytes 0.50.2, CPU build):
- int8 / int8-dynamic / int8-dynamic-int4: torchao through transformers' TorchAoConfig. The saved directory carries the config, so
  `AutoModelForCausalLM.from_pretrained(DIR)` rebuilds the torchao tensors by itself (torchao must be installed).
- int4: bitsandbytes NF4. torchao 0.18's int4 weight-only tensors cannot be made on a CPU (`Int4Tensor` needs the
  CUDA-only mslk kernels; `Int4OpaqueTensor`, the CPU one, has no safetensors serialization), so a model ft
  exports on any machine would not load as is. bitsandbytes 4-bit is saved and reloaded by transformers on CPU and
  CUDA alike, and is already one of ft's dependencies. int8-dynamic-int4 is the scheme of `train.qat`
  (ft_cli.qat): torchao 0.18 serializes those int4 values one per byte, so it is int8-sized on disk.
- gguf-*: llama.cpp's own converter (convert_hf_to_gguf.py and its gguf-py), which knows every architecture's
  tensor names and the tokenizer; q4_k_m is llama.cpp's k-quant mix, written by llama.cpp itself
  (llama_model_quantize through llama-cpp-python), since the converter only writes f16/bf16/q8_0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ft_cli.errors import UserError

Kind = Literal["transformers", "gguf"]


@dataclass(frozen=True)
class ExportFormat:
    name: str
    kind: Kind
    summary: str
    # Bytes per weight of a quantized linear layer (scales included) and of every other tensor; for the estimate.
    linear_bytes: float
    other_bytes: float
    load_hint: str  # how a user loads it; {path} is the exported file or directory
    needs: tuple[str, ...] = ()  # python modules that must be importable to write (and check) it

    @property
    def is_gguf(self) -> bool:
        return self.kind == "gguf"


# GGUF block sizes (ggml-common.h): q8_0 = 32 int8 + an fp16 scale = 34 bytes per 32 weights; q4_K = 144 bytes
# per 256 weights, q6_K = 210 per 256. q4_k_m keeps attn_v and half of ffn_down (and the output head) in q6_K,
# which averages ~4.85 bits per weight over a Llama's linear layers.
FORMATS: dict[str, ExportFormat] = {f.name: f for f in (
    ExportFormat("int8", "transformers", "int8 weights (per output channel), 16-bit activations; torchao",
                 linear_bytes=1.0, other_bytes=2.0, needs=("torchao",),
                 load_hint="AutoModelForCausalLM.from_pretrained({path!r})  # needs torchao installed"),
    ExportFormat("int8-dynamic", "transformers",
                 "int8 weights and dynamically quantized int8 activations (per token, at run time); torchao",
                 linear_bytes=1.0, other_bytes=2.0, needs=("torchao",),
                 load_hint="AutoModelForCausalLM.from_pretrained({path!r})  # needs torchao installed"),
    ExportFormat("int8-dynamic-int4", "transformers",
                 "int4 weights (groups of 32) with dynamically quantized int8 activations, the scheme train.qat "
                 "trains for; torchao (stored one int4 value per byte)",
                 linear_bytes=1.0 + 2 / 32, other_bytes=2.0, needs=("torchao",),
                 load_hint="AutoModelForCausalLM.from_pretrained({path!r})  # needs torchao installed"),
    ExportFormat("int4", "transformers", "4-bit NF4 weights (blocks of 64, double-quantized scales); bitsandbytes",
                 linear_bytes=0.5 + 1 / 64 + 4 / (64 * 256), other_bytes=2.0, needs=("bitsandbytes",),
                 load_hint="AutoModelForCausalLM.from_pretrained({path!r})  # needs bitsandbytes installed"),
    ExportFormat("gguf-f16", "gguf", "GGUF, float16 weights; for llama.cpp, Ollama, LM Studio",
                 linear_bytes=2.0, other_bytes=2.0, needs=("gguf",),
                 load_hint="llama_cpp.Llama(model_path={path!r})  # or: llama-cli -m {path}"),
    ExportFormat("gguf-q8_0", "gguf", "GGUF, q8_0 weights (blocks of 32 int8 + a scale); for llama.cpp",
                 linear_bytes=34 / 32, other_bytes=34 / 32, needs=("gguf",),
                 load_hint="llama_cpp.Llama(model_path={path!r})  # or: llama-cli -m {path}"),
    ExportFormat("gguf-q4_k_m", "gguf", "GGUF, llama.cpp's q4_K_M mix (4-bit k-quants, some 6-bit); for llama.cpp",
                 linear_bytes=4.85 / 8, other_bytes=4.5 / 8, needs=("gguf", "llama_cpp"),
                 load_hint="llama_cpp.Llama(model_path={path!r})  # or: llama-cli -m {path}"),
)}

# What each module is installed by, for messages.
INSTALL_HINT = {
    "torchao": "pip install 'ft-cli[export]' (torchao)",
    "bitsandbytes": "pip install bitsandbytes",
    "gguf": "pip install 'ft-cli[export]' (gguf)",
    "llama_cpp": "pip install 'ft-cli[llama-cpp]' (llama-cpp-python; it compiles llama.cpp, a few minutes)",
}


def get_format(name: str) -> ExportFormat:
    fmt = FORMATS.get(name)
    if fmt is None:
        raise UserError(f"--format: must be one of {', '.join(FORMATS)}, got {name!r}")
    return fmt


def parse_percent(text: str, option: str = "--max-ppl-increase") -> float:
    """'5%' or '5' -> 5.0 (percent). Negative or non-numbers are refused."""
    raw = text.strip().removesuffix("%").strip()
    try:
        value = float(raw)
    except ValueError:
        raise UserError(f"{option}: expected a percentage such as 5% or 5, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise UserError(f"{option}: must be a finite percentage >= 0, got {text!r}")
    return value
