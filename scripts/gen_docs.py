"""Regenerate docs/recipe.md from the recipe schema (ft_cli/recipe.py): every key's type, default, limits and help.

    python scripts/gen_docs.py           # rewrite docs/recipe.md
    python scripts/gen_docs.py --check   # exit 1 if docs/recipe.md is out of date (tests do the same)
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ft_cli.schema_docs import DOCS_PATH, render_recipe_docs  # noqa: E402


def main(argv: list[str]) -> int:
    path = ROOT / DOCS_PATH
    text = render_recipe_docs()
    if "--check" in argv:
        current = path.read_text(encoding="utf-8") if path.is_file() else ""
        if current != text:
            print(f"{DOCS_PATH} is out of date: run python scripts/gen_docs.py", file=sys.stderr)
            return 1
        print(f"{DOCS_PATH} is up to date")
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
