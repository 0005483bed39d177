"""What rendering a conversation gives (render.py makes it; shapes.py caches its shape). A leaf of the data layer."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Sample:
    """One training text and the [start, end) characters of the assistant turns that train in it."""

    text: str
    spans: list[tuple[int, int]]


@dataclass(slots=True)
class Rendered:
    """A conversation's training samples: usually one; more when turns train at their own position (case 3)."""

    samples: list[Sample]
    own_turns: int = 0  # assistant turns trained in a sample of their own
    lost: str | None = None  # assistant text the template leaves out of the training text (first found), if any
    turns: list[tuple[int, str, int, int]] = field(default_factory=list)  # (message index, text, span) per turn
