"""ft: fine-tune large language models from validated YAML recipes."""

import logging as _logging

__version__ = "0.1.0"

# bitsandbytes 0.50.2 logs "Failed to load CPU gemm_4bit_forward from kernels-community ..." when it is imported on
# a CPU with AVX512-BF16 and the optional `kernels` package is missing. That kernel serves only bitsandbytes' packed
# 4-bit inference path, which ft never uses (ft_cli.model.keep_bnb_cpu_path_trainable, docs/SPEC.md), so the notice
# is noise in every run; `ft doctor` reports the kernel in one line instead. Set here, before anything can import
# bitsandbytes.
BNB_KERNEL_NOTICE = "from kernels-community"
_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: BNB_KERNEL_NOTICE not in record.getMessage())
