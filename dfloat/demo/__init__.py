"""The bundled demo model: a small PolyCom causal LM shipped compressed, so `dfloat generate` works offline at once.

How it was trained: docs/demo_model.md (script: scripts/train_demo_model.py).
"""

from __future__ import annotations

from pathlib import Path

from dfloat.errors import ModelSourceError

DEMO_DIR = Path(__file__).parent / "model"


def demo_model_path() -> Path:
    if not (DEMO_DIR / "config.json").is_file():
        raise ModelSourceError(f"the bundled demo model is missing from {DEMO_DIR}: reinstall dfloat")
    return DEMO_DIR
