"""Importing torchvision's and timm's model zoos in tests, or skipping with the reason.

Their registry wheels are CUDA builds; on a CPU-only torch ../shared/tools/torchvision_cpu.py
declares the operators they lack, so it is imported first when it is there.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import pytest

SHARED_TOOLS = Path(__file__).resolve().parents[1].parent / "shared" / "tools"


def import_zoo(name: str, module_level: bool = False) -> ModuleType:
    """`importlib.import_module(name)` ("torchvision.models", "timm"), or pytest.skip saying why."""
    if SHARED_TOOLS.is_dir() and str(SHARED_TOOLS) not in sys.path:
        sys.path.insert(0, str(SHARED_TOOLS))
    try:
        if (SHARED_TOOLS / "torchvision_cpu.py").is_file():
            import torchvision_cpu  # noqa: F401  (declares the operators a CUDA wheel lacks on CPU torch)
        return importlib.import_module(name)
    except Exception as err:  # ImportError, or a RuntimeError from a torchvision/torch mismatch
        pytest.skip(f"{name} cannot be imported ({type(err).__name__}: {str(err)[:120]})",
                    allow_module_level=module_level)
