"""`ft plan`'s output: the estimate of ft_cli/plan.py as a table, one row per component, with how each is counted."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ft_cli.progress import format_bytes

if TYPE_CHECKING:
    from ft_cli.plan import MemoryPlan


def print_plan(plan: MemoryPlan, console: Any, where: str = "") -> None:
    from rich.table import Table

    r, sh, c = plan.recipe, plan.shape, plan.counts
    quant = ""
    if r.quantized and r.quantization is not None:
        quant = f", {r.quantization.bits}-bit {r.quantization.quant_type if r.quantization.bits == 4 else 'int8'}"
    console.print(f"[bold]ft plan[/]: {r.model.name_or_path} ({sh.model_type}, {_count(c.total)} params, "
                  f"{sh.layers} layers, hidden {sh.hidden}, vocab {sh.vocab:,}) - {r.method}{quant}, {r.model.dtype}")
    if where:
        console.print(f"config from {where}", style="dim")
    n = c.trainable_count
    console.print(f"trainable parameters: {n:,} of {c.total + c.added:,} ({100 * n / max(c.total + c.added, 1):.3f}%)")
    table = Table(title=f"estimated peak memory per GPU: micro_batch_size {plan.micro_batch_size} x max_seq_len "
                        f"{plan.seq_len}, {r.train.optimizer}")
    table.add_column("component")
    table.add_column("memory", justify="right")
    table.add_column("how it is counted")
    for row in plan.rows:
        table.add_row(row.name, format_bytes(row.bytes), row.detail)
    table.add_section()
    table.add_row("[bold]total (estimate)[/]", f"[bold]{format_bytes(plan.total)}[/]", "")
    console.print(table)
    other = "off" if r.train.gradient_checkpointing else "on"
    console.print(f"with gradient_checkpointing {other}: {format_bytes(plan.total_other_checkpointing)} "
                  f"({format_bytes(plan.activations_other.bytes)} of activations)")
    console.print("These are estimates from the config (worst case: every row max_seq_len tokens); measured peaks "
                  "vary with kernels, real sequence lengths and the allocator, typically within 10-20%.", style="dim")


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)
