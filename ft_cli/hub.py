"""Whether the Hugging Face hub may be reached. A leaf: no ft imports.

One answer for every command (ft plan, ft train, data sources): the hub is off when HF_HUB_OFFLINE or
TRANSFORMERS_OFFLINE is set to 1/true/yes (transformers honours both); datasets also honour HF_DATASETS_OFFLINE.
"""

from __future__ import annotations

import os

_TRUE = ("1", "true", "yes", "on")


def hub_offline(*, datasets: bool = False) -> bool:
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") + (("HF_DATASETS_OFFLINE",) if datasets else ())
    return any(os.environ.get(name, "").strip().lower() in _TRUE for name in names)
