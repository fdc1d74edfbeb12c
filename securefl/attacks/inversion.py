"""Gradient inversion: reconstruct a client's training images from what the server sees.

A client that takes one SGD step of learning rate ``η`` on a batch sends the update
``Δ = -η ∇_θ L(θ; x, y)``, so an honest-but-curious server knows the batch gradient
``g = -Δ / η`` exactly (:func:`gradients_from_update`).  The attacks below search for inputs
``x'`` whose gradient at the same global parameters matches ``g``:

* :func:`recover_labels` - iDLG (Zhao et al., "iDLG: Improved Deep Leakage from Gradients",
  2020): with cross-entropy, ``∂L/∂b_c = p_c - 1[c = y]`` for the last layer's bias, which is
  negative only at the true label; without a bias the row sums of ``∂L/∂W`` carry the same sign.
* :class:`DLG` - Deep Leakage from Gradients (Zhu, Liu & Han, NeurIPS 2019): L-BFGS on
  ``‖∇_θ L(x', softmax(y')) - g‖²`` over the dummy input ``x'`` and soft label ``y'``.
* :class:`InvertingGradients` - Geiping et al., NeurIPS 2020: minimise
  ``1 - <∇L(x', y), g> / (‖∇L(x', y)‖ ‖g‖) + α TV(x')`` with signed Adam (the update uses the
  sign of the gradient), step decay and the data box constraint, labels from iDLG.

Metrics are PSNR and SSIM (Wang et al., IEEE TIP 2004) per image; :func:`save_grid` writes
originals above reconstructions as a PNG.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from securefl.output import pyplot, save_figure
from securefl.vector import Layout

__all__ = [
    "DLG",
    "InvertingGradients",
    "Reconstruction",
    "best_match",
    "gradients_from_update",
    "psnr",
    "recover_labels",
    "save_grid",
    "ssim",
]


@dataclass(frozen=True)
class Reconstruction:
    """Reconstructed ``images`` ``(B, *shape)`` in the data range, their ``labels`` and the
    final gradient-matching loss."""

    images: np.ndarray
    labels: np.ndarray
    loss: float


def gradients_from_update(delta: np.ndarray, module: nn.Module, *,
                          lr: float) -> list[torch.Tensor]:
    """Per-parameter gradients ``g = -Δ / η`` of a one-step SGD update, in ``module`` order."""
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    layout = Layout.of(module)
    vector = -np.asarray(delta, dtype=np.float64) / lr
    return [torch.as_tensor(v, dtype=torch.float32).clone()
            for v in layout.split(vector.astype(np.float32)).values()]


def _last_linear(module: nn.Module) -> tuple[int, bool]:
    """Index of the last Linear layer's weight among ``module.parameters()``; has it a bias?"""
    layers = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not layers:
        raise ValueError("label recovery needs a model whose output layer is nn.Linear")
    head = layers[-1]
    ids = [id(p) for p in module.parameters()]
    return ids.index(id(head.weight)), head.bias is not None


def recover_labels(gradients: Sequence[torch.Tensor], module: nn.Module, *,
                   num_images: int = 1) -> torch.Tensor:
    """iDLG: the label(s) whose output-layer gradient is most negative.

    For one image this is exact whenever the model's output layer is linear and the loss is
    cross-entropy (Zhao et al. 2020, Sec. 3).  For ``B > 1`` images the ``B`` most negative
    classes are returned, which is exact when the batch labels are distinct.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    index, has_bias = _last_linear(module)
    signal = gradients[index + 1] if has_bias else gradients[index].sum(dim=1)
    if num_images > signal.numel():
        raise ValueError(f"num_images must be <= {signal.numel()} classes, got {num_images}")
    return torch.argsort(signal)[:num_images].to(torch.int64)


def _total(terms: Iterable[torch.Tensor]) -> torch.Tensor:
    """``sum(terms)``, typed as the tensor it is (the terms are never empty here)."""
    return cast(torch.Tensor, sum(terms))


def _functional(module: nn.Module) -> tuple[nn.Module, list[torch.Tensor]]:
    model = copy.deepcopy(module).eval()
    params: list[torch.Tensor] = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    return model, params


def _dummy(num_images: int, shape: Sequence[int], bounds: tuple[float, float],
           generator: torch.Generator) -> torch.Tensor:
    low, high = bounds
    x = torch.rand((num_images, *shape), generator=generator) * (high - low) + low
    return x.requires_grad_(True)


@dataclass(frozen=True)
class DLG:
    """Deep Leakage from Gradients (Zhu et al. 2019).

    ``min_{x', y'} Σ_l ‖∇_{θ_l} CE(f(x'), softmax(y')) - g_l‖²`` by L-BFGS.  With
    ``labels`` given (e.g. from :func:`recover_labels`, which makes this iDLG) only ``x'`` is
    optimised.
    """

    iterations: int = 300
    lr: float = 1.0
    bounds: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        if self.iterations < 1 or self.lr <= 0:
            raise ValueError(f"iterations must be >= 1 and lr > 0, got {self.iterations}, "
                             f"{self.lr}")

    def __call__(self, module: nn.Module, gradients: Sequence[torch.Tensor], *,
                 shape: Sequence[int], num_classes: int, generator: torch.Generator,
                 num_images: int = 1, labels: torch.Tensor | None = None) -> Reconstruction:
        model, params = _functional(module)
        targets = [g.detach().to(torch.float32) for g in gradients]
        x = _dummy(num_images, shape, self.bounds, generator)
        soft = torch.randn((num_images, num_classes), generator=generator).requires_grad_(True)
        variables = [x] if labels is not None else [x, soft]
        optimizer = torch.optim.LBFGS(variables, lr=self.lr, max_iter=self.iterations,
                                      history_size=100, line_search_fn="strong_wolfe",
                                      tolerance_grad=1e-12, tolerance_change=1e-15)

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            logits = model(x)
            if labels is not None:
                loss = F.cross_entropy(logits, labels)
            else:
                loss = -(F.softmax(soft, dim=1) * F.log_softmax(logits, dim=1)).sum(1).mean()
            dummy = torch.autograd.grad(loss, params, create_graph=True)
            distance = _total(((d - t) ** 2).sum() for d, t in zip(dummy, targets, strict=True))
            distance.backward()
            return distance

        optimizer.step(closure)
        loss = float(closure().detach())
        final = labels if labels is not None else soft.detach().argmax(dim=1)
        images = x.detach().clamp(*self.bounds).numpy().astype(np.float32)
        return Reconstruction(images, final.numpy(), loss)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic TV: mean ``|x[i+1, j] - x[i, j]| + |x[i, j+1] - x[i, j]|`` over pixels."""
    return ((x[..., 1:, :] - x[..., :-1, :]).abs().mean()
            + (x[..., :, 1:] - x[..., :, :-1]).abs().mean())


@dataclass(frozen=True)
class InvertingGradients:
    """Inverting Gradients (Geiping, Bauermeister, Dröge & Moeller, NeurIPS 2020).

    ``min_{x' ∈ [lo, hi]} 1 - cos(∇_θ CE(f(x'), y), g) + tv_weight · TV(x')`` with labels
    ``y`` from iDLG, Adam on the *sign* of the gradient, learning rate decayed ×0.1 at 3/8,
    5/8 and 7/8 of the iterations, and projection onto the data box after every step.  The
    restart with the lowest loss is kept.
    """

    iterations: int = 1000
    lr: float = 0.1
    tv_weight: float = 1e-4
    restarts: int = 1
    bounds: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        if self.iterations < 1 or self.restarts < 1:
            raise ValueError("iterations and restarts must be >= 1")
        if self.lr <= 0 or self.tv_weight < 0:
            raise ValueError("lr must be > 0 and tv_weight >= 0")

    def __call__(self, module: nn.Module, gradients: Sequence[torch.Tensor], *,
                 shape: Sequence[int], num_classes: int, generator: torch.Generator,
                 num_images: int = 1, labels: torch.Tensor | None = None) -> Reconstruction:
        model, params = _functional(module)
        targets = [g.detach().to(torch.float32) for g in gradients]
        target_norm = torch.sqrt(_total((t ** 2).sum() for t in targets))
        if labels is None:
            labels = recover_labels(targets, module, num_images=num_images)
        candidates = []
        for _ in range(self.restarts):
            x = _dummy(num_images, shape, self.bounds, generator)
            optimizer = torch.optim.Adam([x], lr=self.lr)
            milestones = [int(self.iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
            schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
            loss = torch.tensor(math.inf)
            for _ in range(self.iterations):
                optimizer.zero_grad()
                dummy = torch.autograd.grad(F.cross_entropy(model(x), labels), params,
                                            create_graph=True)
                dot = _total((d * t).sum() for d, t in zip(dummy, targets, strict=True))
                norm = torch.sqrt(_total((d ** 2).sum() for d in dummy))
                loss = 1 - dot / (norm * target_norm + 1e-12)
                loss = loss + self.tv_weight * total_variation(x)
                loss.backward()
                if x.grad is not None:  # signed gradients (Geiping et al. 2020)
                    x.grad.sign_()
                optimizer.step()
                schedule.step()
                with torch.no_grad():
                    x.clamp_(*self.bounds)
            candidates.append(Reconstruction(x.detach().numpy().astype(np.float32),
                                             labels.numpy(), float(loss.detach())))
        return min(candidates, key=lambda c: c.loss)


# ----------------------------------------------------------------------------- metrics
def psnr(reference: np.ndarray, estimate: np.ndarray, *, data_range: float = 1.0) -> np.ndarray:
    """Per image ``10 log10(R² / MSE)`` in dB over all but the first axis; ``inf`` if equal."""
    ref, est = _pair(reference, estimate)
    mse = ((ref - est) ** 2).reshape(len(ref), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(data_range ** 2 / mse)


def _pair(reference: np.ndarray, estimate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ref = np.asarray(reference, dtype=np.float64)
    est = np.asarray(estimate, dtype=np.float64)
    if ref.shape != est.shape or ref.ndim < 2:
        raise ValueError(f"images must have equal shapes (B, ..., H, W), got {ref.shape} "
                         f"and {est.shape}")
    return ref, est


def _gaussian_window(size: int, sigma: float) -> np.ndarray:
    axis = np.arange(size) - (size - 1) / 2
    kernel = np.exp(-(axis ** 2) / (2 * sigma ** 2))
    window = np.outer(kernel, kernel)
    return window / window.sum()


def _filter(image: np.ndarray, window: np.ndarray) -> np.ndarray:
    """'valid' 2-D correlation of the last two axes with ``window``."""
    k = window.shape[0]
    patches = np.lib.stride_tricks.sliding_window_view(image, (k, k), axis=(-2, -1))
    return np.einsum("...ij,ij->...", patches, window)


def ssim(reference: np.ndarray, estimate: np.ndarray, *, data_range: float = 1.0,
         window: int = 7, sigma: float = 1.5) -> np.ndarray:
    """Per image mean SSIM (Wang, Bovik, Sheikh & Simoncelli 2004).

    ``SSIM = (2 μx μy + C1)(2 σxy + C2) / ((μx² + μy² + C1)(σx² + σy² + C2))`` with
    ``C1 = (0.01 R)²``, ``C2 = (0.03 R)²``, local statistics under a Gaussian window of width
    ``window`` (shrunk to the image side for small images, e.g. 8×8 digits), averaged over
    positions and channels.
    """
    ref, est = _pair(reference, estimate)
    size = min(window, ref.shape[-1], ref.shape[-2])
    size -= 1 - size % 2  # odd window
    w = _gaussian_window(size, sigma)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = _filter(ref, w), _filter(est, w)
    var_x = _filter(ref * ref, w) - mu_x ** 2
    var_y = _filter(est * est, w) - mu_y ** 2
    cov = _filter(ref * est, w) - mu_x * mu_y
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)
             / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2)))
    return index.reshape(len(ref), -1).mean(axis=1)


def best_match(originals: np.ndarray, reconstruction: np.ndarray, *,
               data_range: float = 1.0) -> tuple[int, float]:
    """The original closest to one reconstructed image, and its PSNR.

    Used when the server saw an aggregate of several clients' images: the attack succeeds if it
    recovers *any* of them, so each reconstruction is scored against its best match.
    """
    repeated = np.repeat(reconstruction[None], len(originals), axis=0)
    scores = psnr(originals, repeated, data_range=data_range)
    index = int(np.argmax(scores))
    return index, float(scores[index])


def save_grid(path: str | Path, originals: np.ndarray, reconstructions: np.ndarray, *,
              titles: Sequence[str] = ()) -> Path:
    """PNG with originals in the top row and reconstructions below (one column per image)."""
    plt = pyplot()
    ref, est = _pair(originals, reconstructions)
    count = len(ref)
    figure, axes = plt.subplots(2, count, figsize=(1.6 * count, 3.4), squeeze=False)
    for column in range(count):
        for row, images in enumerate((ref, est)):
            image = images[column]
            image = image[0] if image.ndim == 3 and image.shape[0] == 1 else image
            if image.ndim == 3:
                image = np.moveaxis(image, 0, -1)
            axis = axes[row][column]
            axis.imshow(np.clip(image, 0, 1), cmap="gray", vmin=0, vmax=1)
            axis.set_xticks([])
            axis.set_yticks([])
        if column < len(titles):
            axes[1][column].set_xlabel(titles[column], fontsize=7)
    axes[0][0].set_ylabel("original")
    axes[1][0].set_ylabel("reconstructed")
    figure.tight_layout()
    return save_figure(figure, path, dpi=120)
