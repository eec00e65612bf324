"""tinyt: a small, readable trainer for encoder-decoder Transformer translation models.

The Python API, for example:

    import tinyt
    tinyt.load_translator("runs/multi30k_de_en").translate(["Ein Hund läuft."], beam_size=5)

The names below are imported on first use, not by `import tinyt`: importing torch takes
seconds, and `tinyt --version` or a config check should not pay for it.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "Translator": "tinyt.translation",
    "load_translator": "tinyt.loading",
    "TinytError": "tinyt.errors",
    "export_bundle": "tinyt.bundle",
    "export_ctranslate2": "tinyt.ctranslate2_model",
    "load_bundle": "tinyt.bundle",
    "run_info": "tinyt.run_summary",
    "average_checkpoints": "tinyt.checkpoint",
    "load_trained": "tinyt.checkpoint",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'tinyt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
