"""Run configuration: one TOML file -> frozen dataclasses (a leaf package: no area imports).

* :mod:`securefl.config.schema`: the top-level :class:`Config`, :func:`load_config`;
* :mod:`securefl.config.parse`: the table -> dataclass parser and its one-line errors;
* one module per section an area owns: :mod:`~securefl.config.data`,
  :mod:`~securefl.config.privacy`, :mod:`~securefl.config.secagg`,
  :mod:`~securefl.config.he` (with the CKKS security table in :mod:`~securefl.config.ckks`)
  and :mod:`~securefl.config.network`.
"""

from __future__ import annotations

from securefl.config.he import HEConfig
from securefl.config.network import NetworkConfig
from securefl.config.privacy import PrivacyConfig
from securefl.config.schema import (
    AggregationConfig,
    ClientConfig,
    Config,
    DataConfig,
    ModelConfig,
    ProtectionConfig,
    RunConfig,
    ServerConfig,
    SimulationConfig,
    clients_per_round,
    config_from_dict,
    load_config,
)
from securefl.config.secagg import SecAggConfig

__all__ = [
    "AggregationConfig",
    "ClientConfig",
    "Config",
    "DataConfig",
    "HEConfig",
    "ModelConfig",
    "NetworkConfig",
    "PrivacyConfig",
    "ProtectionConfig",
    "RunConfig",
    "SecAggConfig",
    "ServerConfig",
    "SimulationConfig",
    "clients_per_round",
    "config_from_dict",
    "load_config",
]
