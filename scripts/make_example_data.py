"""Write the small example datasets under examples/data/ and the samples ft ships in its package (our own
synthetic data, free to ship).

They are made to be learnable by a tiny model in a few dozen steps, so the quickstart shows the loss falling.
ft_cli/samples/ holds one small file per data format, which `ft train RECIPE --smoke` trains on when the recipe's
own data is not there (e.g. a shipped recipe tried before its data exists):
    python scripts/make_example_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "examples" / "data"
SAMPLES = Path(__file__).resolve().parents[1] / "ft_cli" / "samples"
SAMPLE_ROWS = 64
COLORS = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple"]
ANIMALS = ["cat", "dog", "horse", "bird", "fish", "lion", "mouse", "sheep"]


def alpaca_rows(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        kind = rng.choice(["add", "upper", "reverse", "color"])
        if kind == "add":
            a, b = rng.randint(1, 20), rng.randint(1, 20)
            rows.append({"instruction": "Add the two numbers.", "input": f"{a} and {b}", "output": f"{a} + {b} = {a + b}."})
        elif kind == "upper":
            words = " ".join(rng.sample(ANIMALS, 2))
            rows.append({"instruction": "Write the words in capital letters.", "input": words, "output": words.upper()})
        elif kind == "reverse":
            words = rng.sample(COLORS, 3)
            rows.append({"instruction": "Reverse the order of the words.", "input": " ".join(words),
                         "output": " ".join(reversed(words))})
        else:
            animal, color = rng.choice(ANIMALS), rng.choice(COLORS)
            rows.append({"instruction": f"What color is the {animal}?", "input": "",
                         "output": f"The {animal} is {color}."})
    return rows


def chat_rows(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        animal = rng.choice(ANIMALS)
        rows.append({"messages": [
            {"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": f"What is {a} times {b}?"},
            {"role": "assistant", "content": f"{a} times {b} is {a * b}."},
            {"role": "user", "content": f"Name an animal that starts with {animal[0]}."},
            {"role": "assistant", "content": f"A {animal}."},
        ]})
    return rows


def sharegpt_rows(chat: list[dict]) -> list[dict]:
    """The chat rows as sharegpt conversations (system, human, gpt)."""
    tags = {"system": "system", "user": "human", "assistant": "gpt"}
    return [{"conversations": [{"from": tags[m["role"]], "value": m["content"]} for m in row["messages"]]}
            for row in chat]


def text_rows(rng: random.Random, n: int) -> list[dict]:
    """Short documents of simple sentences; every eighth is long (~600 tokens), so data.text_chunking has work."""
    rows = []
    for i in range(n):
        sentences = []
        for _ in range(rng.randint(60, 90) if i % 8 == 0 else rng.randint(2, 6)):
            animal, color = rng.choice(ANIMALS), rng.choice(COLORS)
            a, b = rng.randint(1, 20), rng.randint(1, 20)
            sentences.append(rng.choice([f"The {animal} is {color}.", f"{a} plus {b} is {a + b}.",
                                         f"A {color} {animal} sat next to the {rng.choice(ANIMALS)}."]))
        rows.append({"text": " ".join(sentences)})
    return rows


def main() -> None:
    rng = random.Random(0)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "quickstart_alpaca.json").write_text(json.dumps(alpaca_rows(rng, 200), indent=1) + "\n")
    with (OUT / "quickstart_chat.jsonl").open("w") as f:
        for row in chat_rows(rng, 120):
            f.write(json.dumps(row) + "\n")
    print(f"wrote {OUT}")

    rng = random.Random(1)
    SAMPLES.mkdir(parents=True, exist_ok=True)
    chat = chat_rows(rng, SAMPLE_ROWS)
    samples = {"alpaca.json": alpaca_rows(rng, SAMPLE_ROWS), "chat.jsonl": chat,
               "sharegpt.jsonl": sharegpt_rows(chat), "text.jsonl": text_rows(rng, SAMPLE_ROWS)}
    for name, rows in samples.items():
        if name.endswith(".jsonl"):
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        else:
            text = json.dumps(rows, indent=1, ensure_ascii=False) + "\n"
        (SAMPLES / name).write_text(text, encoding="utf-8")
    print(f"wrote {SAMPLES}")


if __name__ == "__main__":
    main()
