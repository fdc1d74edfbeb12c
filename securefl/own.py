"""Bring your own model and data: the Python API (see ``docs/own-model-and-data.md``).

::

    import numpy as np, torch
    from securefl import own
    from securefl.config import load_config

    x, y = np.random.default_rng(0).normal(size=(1200, 20)), ...   # float64 is fine
    model = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
    result = own.run(load_config("secagg-dp.toml"), model=model, data=x, labels=y,
                     out_dir="runs/mine")

What users bring:

* **a model**: a ``torch.nn.Module`` (each party starts from a deep copy of its weights) or
  a factory, ``factory()`` or ``factory(in_shape, num_classes)``, called with torch's RNG
  forked and seeded from ``[run] seed`` (:func:`securefl.models.own_model`);
* **data**: feature and label arrays (numpy or torch, any numeric dtype: converted to
  float32 features and int64 labels), a torch ``Dataset`` of ``(x, y)`` items, or a loader
  / iterable of ``(x, y)`` batches (:mod:`securefl.data.own`);
* optionally **a test set** in the same forms; otherwise ``[data] test_fraction`` is held
  out (stratified), as for the built-in sets;
* optionally **a loss** ``loss(outputs, labels)`` and **a training step**
  ``step(model, features, labels, loss)`` returning the batch's loss, which the engine then
  back-propagates and steps (:mod:`securefl.objective` states the contract DP-SGD needs:
  the mean, or with ``loss.reduction = "sum"`` the sum, of per-example losses).

The rest of the configuration applies unchanged: the data are partitioned over
``[data] num_clients`` by ``[data] partition``, and every protection, privacy mode,
aggregator, attack hook and the run directory work as with a built-in model.  The run
directory's ``config.toml`` records ``[model] name = "python"`` with the object's class and
``[data] dataset = "python"``; ``provenance.json`` records the parameter layout's hash and
each client's and the test set's row counts and fingerprints.  A loss or step given as a
Python object is recorded as ``[client] loss = "python:<module>.<name>"`` (and ``step``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from securefl.config import Config, ModelConfig
from securefl.data import Dataset, FederatedData, federate
from securefl.data.own import as_dataset, from_torch
from securefl.errors import DataError
from securefl.models import OwnModel
from securefl.objective import Loss, Step, objective, reference
from securefl.simulation import RunResult, Simulation, build_simulation, run_simulation

__all__ = ["federation", "recorded", "run", "simulation"]

Data = Any  # numpy / torch arrays, a torch Dataset, or an iterable of (x, y) batches


def _dataset(data: Data, labels: Any, *, name: str, num_classes: int | None) -> Dataset:
    if isinstance(data, Dataset):
        return as_dataset(data.features, data.labels, name=name, num_classes=num_classes)
    if labels is not None:
        return as_dataset(data, labels, name=name, num_classes=num_classes)
    if hasattr(data, "shape"):
        raise DataError(f"{name}: features given without labels (pass labels=...)")
    if not isinstance(data, Iterable) and not hasattr(data, "__getitem__"):
        raise DataError(f"{name}: data must be arrays, a torch Dataset or a loader, got "
                        f"{type(data).__name__}")
    return from_torch(data, name=name, num_classes=num_classes)


def federation(config: Config, data: Data, labels: Any = None, *,
               test: Data | tuple[Any, Any] | None = None) -> FederatedData:
    """Validate and convert users' data, then partition it over ``[data] num_clients`` with
    ``[data] partition`` (the same seeded partitioners as every built-in dataset)."""
    classes = config.data.num_classes
    train = _dataset(data, labels, name="data", num_classes=classes)
    held: Dataset | None = None
    if test is not None:
        x, y = test if isinstance(test, tuple) else (test, None)
        held = _dataset(x, y, name="test", num_classes=classes)
        if held.shape != train.shape:
            raise DataError(f"test: examples of shape {held.shape}, data {train.shape}")
        k = max(train.num_classes, held.num_classes)
        train = Dataset(train.features, train.labels, k, "data")
        held = Dataset(held.features, held.labels, k, "test")
    return federate(config.data, seed=config.run.seed, source=(train, held))


def recorded(config: Config, model: OwnModel, *, loss: Loss | None = None,
             step: Step | None = None) -> Config:
    """The configuration as it really ran: ``[model] name = "python"`` with the object's
    class or the factory's qualified name, ``[data] dataset = "python"``, and a Python
    ``loss`` or ``step`` as ``"python:<module>.<name>"``."""
    kind = model if callable(model) and not hasattr(model, "parameters") else type(model)
    where = f"{getattr(kind, '__module__', '?')}.{getattr(kind, '__qualname__', '?')}"
    client = dataclasses.replace(
        config.client,
        loss=reference(loss) if loss is not None else config.client.loss,
        step=reference(step) if step is not None else config.client.step)
    return config.replace(model=ModelConfig(name="python", factory=where), client=client,
                          data=dataclasses.replace(config.data, dataset="python", path=None,
                                                   test_path=None))


def simulation(config: Config, *, model: OwnModel, data: Data, labels: Any = None,
               test: Data | tuple[Any, Any] | None = None, loss: Loss | None = None,
               step: Step | None = None, **options: Any) -> Simulation:
    """:func:`securefl.simulation.build_simulation` on users' model, data, loss and step."""
    return build_simulation(recorded(config, model, loss=loss, step=step),
                            data=federation(config, data, labels, test=test), model=model,
                            objective=objective(config, loss=loss, step=step), **options)


def run(config: Config | None = None, *, model: OwnModel, data: Data, labels: Any = None,
        test: Data | tuple[Any, Any] | None = None, loss: Loss | None = None,
        step: Step | None = None, out_dir: str | Path | None = None,
        **options: Any) -> RunResult:
    """:func:`securefl.simulation.run_simulation` on users' model and data (and optionally
    loss and training step); with ``out_dir``, the full run directory (``config.toml``,
    ``provenance.json``, metrics, model, summary, and ``privacy.json`` under DP)."""
    config = config or Config()
    fed = federation(config, data, labels, test=test)
    return run_simulation(recorded(config, model, loss=loss, step=step), out_dir=out_dir,
                          data=fed, model=model,
                          objective=objective(config, loss=loss, step=step), **options)
