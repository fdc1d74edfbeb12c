"""securefl: federated learning with privacy and security built in.

The public recipes are importable from the top level; they load lazily so that
``import securefl`` (and the CLI's start-up) stays cheap::

    from securefl import load_config, run_simulation
    result = run_simulation(load_config("examples/quickstart.toml"), out_dir="runs/qs")
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Config": "securefl.config",
    "load_config": "securefl.build",
    "config_from_dict": "securefl.build",
    "build_simulation": "securefl.simulation",
    "run_simulation": "securefl.simulation",
    "SecureFLError": "securefl.errors",
    "ProtocolAbort": "securefl.errors",
    "BudgetExceeded": "securefl.errors",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'securefl' has no attribute {name!r}")
