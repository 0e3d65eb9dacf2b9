"""The output margin f_y(x) − max_{j≠y} f_j(x): per-example margins over the sample, a percentile, the ``margin``.

The class logits and labels of a batch come from ``inputs.logits_fn`` (e.g. a module's ``outputs_and_targets``), by
default ``model(x)`` against ``y``; under torch.distributed the margins of every rank are gathered, so every rank
agrees. The norm products (``over_margin``) and the generalization bounds divide by :func:`margin_percentile`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from flatlit.sharpness.base import (
    Batch,
    Cost,
    LogitsFn,
    MeasureInputs,
    MeasureNotApplicable,
    MeasureResult,
    default_logits,
    distributed,
    register_measure,
)


def _all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a 1-D tensor over ranks (rank order; sizes may differ). Identity without torch.distributed."""
    if not distributed():
        return t
    n = torch.tensor([t.numel()], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    largest = max(int(s) for s in sizes)
    padded = torch.zeros(largest, dtype=t.dtype, device=t.device)
    padded[: t.numel()] = t
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return torch.cat([o[: int(s)] for o, s in zip(out, sizes)])


def sample_margins(model: nn.Module, batches: Sequence[Batch], logits_fn: LogitsFn | None = None) -> torch.Tensor:
    """f_y(x) − max_{j≠y} f_j(x) for every example of the sample, all ranks (float64, rank order): one forward.

    The class logits and labels of a batch are ``logits_fn(model, batch)`` when given (e.g. a module's
    ``outputs_and_targets``), else ``model(x)`` against ``y``
    (:func:`~flatlit.sharpness.base.default_logits`); a one-logit binary head counts as the two-class logits (0, z),
    whose margin is ±z. A batch without class logits is a :class:`~flatlit.sharpness.base.MeasureNotApplicable`."""
    local = []
    with torch.no_grad():
        for batch in batches:
            pair = logits_fn(model, batch) if logits_fn is not None else default_logits(model, batch)
            if pair is None:
                raise MeasureNotApplicable(
                    "the margin needs class logits and labels; define outputs_and_targets(self, batch) -> "
                    "(logits, labels) on the module"
                )
            out, y = pair[0].double(), pair[1].long()
            true = out.gather(1, y.view(-1, 1)).squeeze(1)
            other = out.scatter(1, y.view(-1, 1), float("-inf")).amax(dim=1)
            local.append(true - other)
    p = next(model.parameters())
    t = torch.cat(local) if local else torch.zeros(0, dtype=torch.float64, device=p.device)
    return _all_gather_cat(t)


def _check_percentile(percentile: float) -> float:
    if not 0 <= float(percentile) <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {percentile!r}")
    return float(percentile)


def margin_percentile(
    model: nn.Module, batches: Sequence[Batch], percentile: float = 5.0, logits_fn: LogitsFn | None = None
) -> float:
    """The ``percentile``-th percentile (numpy's linear interpolation) of :func:`sample_margins`."""
    m = sample_margins(model, batches, logits_fn)
    if m.numel() == 0:
        raise ValueError("the margin needs a non-empty sample (`batches`)")
    return float(np.percentile(m.cpu().numpy(), _check_percentile(percentile)))


@register_measure("margin", kind="complexity", needs_logits=True, percentile=5.0)
def margin(inputs: MeasureInputs, *, percentile: float) -> MeasureResult:
    """Output margin γ: the ``percentile``-th percentile over the sample of f_y(x) − max_{j≠y} f_j(x).

    Jiang et al. 2019 (arXiv 1912.02178, §C.1 uses the 10th percentile) and Neyshabur et al. 2017 (arXiv 1706.08947,
    5th percentile on the training set; SPEC F36). Default ``percentile=5`` (numpy linear interpolation). Under
    torch.distributed the margins of all ranks are gathered before the percentile, so every rank agrees.
    The logits and labels come from ``inputs.logits_fn`` (e.g. a module's ``outputs_and_targets``), by default
    ``model(x)`` against ``y``; a one-logit binary head is the two-class (0, z), margin ±z. Needs class logits:
    refused (one line) for a model that gives none, e.g. an autoencoder.
    ``extra``: mean, min and the fraction of non-positive margins. Cost: one forward pass over the sample.
    """
    m = sample_margins(inputs.model, inputs.batches, inputs.logits_of)
    if m.numel() == 0:
        raise ValueError("the margin needs a non-empty sample (`batches`)")
    q = _check_percentile(percentile)
    arr = m.cpu().numpy()
    return MeasureResult(
        "margin",
        float(np.percentile(arr, q)),
        None,
        Cost(forwards=1),
        {"percentile": q},
        {"mean": float(arr.mean()), "min": float(arr.min()), "fraction_nonpositive": float((arr <= 0).mean())},
    )
