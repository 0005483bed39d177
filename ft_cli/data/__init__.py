"""The data pipeline: files -> records -> conversations -> rendered text -> tokens + loss masks -> packed rows.

Modules, in the order data flows through them:

- `sources`   read .json/.jsonl/.csv/.tsv/.parquet files, directories and hub datasets; mix sources by weight; split eval
- `formats`   turn a record (alpaca, chat, sharegpt, text) into an `Example`: messages + tools, or plain text
- `templates` pick the chat template (the tokenizer's, a built-in, a jinja string or file) and compile it
- `render`    render conversations and find every assistant turn's characters (the prefix-consistency rules)
- `shapes`    render-once for plain conversations: one plan per shape of roles, the real render compared on a sample
- `encode`    tokenize once, label the tokens inside assistant spans, truncate or drop, count everything; on big
              data in one forked worker per core
- `batch_tokenizer` the tokenizer call: a batch of texts, NFC texts past the NFC normalizer
- `packing`   best-fit-decreasing bin packing with position_ids that restart per example
- `cache`     content-hashed, atomically written cache of the tokenized datasets
- `collate`   batches for the training loop (padding, or packed rows without an attention mask)
- `pipeline`  `build_datasets`, `load_eval_data`: the entry points the rest of ft calls (ft preprocess: ft_cli/preprocess.py)
- `audit`     the `ft validate` report: counts, length histogram, samples with trained tokens highlighted

Nothing here is imported by `ft --help`; torch is only imported by `collate`.
"""
