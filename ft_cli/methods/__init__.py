"""Fine-tuning methods: each turns a loaded base model into one whose trainable parameters are the method's.

What each method is and does (its recipe section, what it saves, whether it merges, packs, ...) is one entry of
`ft_cli.methods.registry.METHODS`; the rest of ft asks that table. One module per method family, each importing its
heavy dependencies (peft, bitsandbytes) only when used:

    registry.py    METHODS: one MethodSpec per method (a leaf: no torch, no ft imports)
    lora.py        lora, qlora, dora (+ rsLoRA; LoRA+ lives in ft_cli.optim as parameter groups)   peft
    ia3.py         ia3                                                                              peft
    prompt.py      prompt_tuning, prefix_tuning                                                     peft
    bottleneck.py  adapter (Houlsby bottleneck adapters)                                            ft's own
    whole.py       full, freeze                                                                     plain torch
    peft_common.py get_peft_model_for, load_peft_adapter: shared by the peft methods
    apply.py       apply_method, save_trained, load_trained: registry lookups, the entry points the rest of ft uses

This package's __init__ imports nothing, so the recipe schema can take the method names from the registry
without importing the methods (which import the recipe): imports flow one way (tests/test_import_cycles.py).
"""
