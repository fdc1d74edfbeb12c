"""A torch module <-> one flat float32 vector, with the layout kept for unflattening.

A model crosses the framework boundary exactly once, as a vector: everything after local
training (masking, encryption, aggregation, attacks) works on ``(d,)`` or ``(n, d)`` arrays.
The :class:`Layout` records each parameter's name, shape and offset, so a vector can be
loaded back and a subset of layers can be selected by name (e.g. encrypt only some layers).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

__all__ = ["Layout", "ParamSpec", "flatten", "unflatten"]


@dataclass(frozen=True)
class ParamSpec:
    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def slice(self) -> slice:
        return slice(self.offset, self.offset + self.size)


@dataclass(frozen=True)
class Layout:
    """Where each named parameter of a module lives in the flat vector."""

    specs: tuple[ParamSpec, ...]

    @classmethod
    def of(cls, module: nn.Module) -> Layout:
        specs, offset = [], 0
        for name, param in module.named_parameters():
            spec = ParamSpec(name, tuple(param.shape), offset)
            specs.append(spec)
            offset += spec.size
        return cls(tuple(specs))

    @property
    def size(self) -> int:
        return self.specs[-1].offset + self.specs[-1].size if self.specs else 0

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.specs)

    def select(self, patterns: Iterable[str]) -> np.ndarray:
        """Indices (sorted, int64) of every parameter whose name matches a glob pattern.

        ``layout.select(["fc2.*"])`` picks the weight and bias of ``fc2``.  A pattern that
        matches nothing is an error, so a typo never silently selects less.
        """
        chosen: list[ParamSpec] = []
        for pattern in patterns:
            matched = [s for s in self.specs if fnmatch.fnmatchcase(s.name, pattern)]
            if not matched:
                raise ValueError(f"layer pattern {pattern!r} matches no parameter "
                                 f"(parameters: {', '.join(self.names)})")
            chosen.extend(m for m in matched if m not in chosen)
        if not chosen:
            return np.zeros(0, dtype=np.int64)
        return np.sort(np.concatenate(
            [np.arange(s.offset, s.offset + s.size, dtype=np.int64) for s in chosen]))

    def split(self, vector: np.ndarray) -> dict[str, np.ndarray]:
        """Views of ``vector`` per parameter, reshaped."""
        self._check(vector)
        return {s.name: vector[s.slice].reshape(s.shape) for s in self.specs}

    def _check(self, vector: np.ndarray) -> None:
        if vector.shape != (self.size,):
            raise ValueError(f"vector has shape {vector.shape}, layout needs ({self.size},)")


def flatten(module: nn.Module) -> np.ndarray:
    """All parameters of ``module`` concatenated in ``named_parameters`` order (float32 copy)."""
    with torch.no_grad():
        parts = [p.detach().reshape(-1).to(torch.float32).cpu() for p in module.parameters()]
        if not parts:
            return np.zeros(0, dtype=np.float32)
        return torch.cat(parts).numpy().copy()


def unflatten(module: nn.Module, vector: np.ndarray, layout: Layout | None = None) -> None:
    """Load ``vector`` into ``module``'s parameters in place."""
    layout = layout or Layout.of(module)
    layout._check(vector)
    source = torch.from_numpy(np.array(vector, dtype=np.float32))  # writable copy
    with torch.no_grad():
        for spec, param in zip(layout.specs, module.parameters(), strict=True):
            param.copy_(source[spec.slice].view(spec.shape))
