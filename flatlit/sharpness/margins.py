"""The output margin f_y(x) − max_{j≠y} f_j(x): per-example margins over the sample, a percentile or a rank of
them, the ``margin``.

The class logits and labels of a batch come from ``inputs.logits_fn`` (e.g. a module's ``outputs_and_targets``), by
default ``model(x)`` against ``y``; under torch.distributed the margins of every rank are gathered, so every rank
agrees. The norm products, path norms and Jiang et al.'s spectral/Frobenius sums (``over_margin``) divide by
:func:`margin_value` (a ``percentile`` or a ``margin_rank``); the generalization bounds by :func:`margin_percentile`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

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
    try:
        value = float(percentile)
    except (TypeError, ValueError):
        value = math.nan
    if not 0 <= value <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {percentile!r}")
    return value


def margin_percentile(
    model: nn.Module, batches: Sequence[Batch], percentile: float = 5.0, logits_fn: LogitsFn | None = None
) -> float:
    """The ``percentile``-th percentile (numpy's linear interpolation) of :func:`sample_margins`."""
    return margin_value(model, batches, percentile, None, logits_fn)


def _check_margin_rank(margin_rank: Any) -> float | None:
    """None, or a number q in (0, 1]; a one-line ValueError naming ``margin_rank`` otherwise."""
    if margin_rank is None:
        return None
    if isinstance(margin_rank, bool) or not isinstance(margin_rank, numbers.Real) or not 0 < margin_rank <= 1:
        raise ValueError(f"margin_rank must be None or a number in (0, 1], got {margin_rank!r}")
    return float(margin_rank)


def margin_rank_k(margin_rank: float, n: int) -> int:
    """k = max(1, ⌊q·n⌋) for q = ``margin_rank`` over n margins (a 1e-9 allowance absorbs rounding in q·n, so
    0.29·100 gives 29); q = 0.1 is Jiang et al.'s ``kthvalue(m // 10)``."""
    return max(1, math.floor(margin_rank * n + 1e-9))


def margin_of(margins: torch.Tensor, percentile: float = 5.0, margin_rank: float | None = None) -> float:
    """γ from per-example ``margins``: the k-th smallest (1-based, k = :func:`margin_rank_k`) when ``margin_rank`` is
    set, else the ``percentile``-th percentile (numpy's linear interpolation)."""
    if margins.numel() == 0:
        raise ValueError("the margin needs a non-empty sample (`batches`)")
    q = _check_percentile(percentile)
    rank = _check_margin_rank(margin_rank)
    if rank is not None:
        k = margin_rank_k(rank, margins.numel())
        return float(torch.kthvalue(margins.detach().double().cpu(), k).values)
    return float(np.percentile(margins.cpu().numpy(), q))


def margin_value(
    model: nn.Module,
    batches: Sequence[Batch],
    percentile: float = 5.0,
    margin_rank: float | None = None,
    logits_fn: LogitsFn | None = None,
) -> float:
    """The margin γ that margin-normalised measures divide by: :func:`margin_of` of :func:`sample_margins` (one
    forward pass over the sample, all ranks). Settings are checked before the forward pass."""
    _check_percentile(percentile)
    _check_margin_rank(margin_rank)
    return margin_of(sample_margins(model, batches, logits_fn), percentile, margin_rank)


MARGIN_DOC = """``margin_rank`` (default None) replaces the ``percentile`` rule when set: a number q in (0, 1] picks the
    k-th smallest of the n margins of the whole sample (all ranks), k = max(1, ⌊q·n⌋); Jiang et al. 2019 (arXiv
    1912.02178, §C.1; the reference code of Dziugaite et al. 2020 takes ``kthvalue(m // 10)``) is q = 0.1. Their
    code then takes |γ|; flatlit does not (the two differ only when γ ≤ 0, where a margin-normalised value is +inf
    here)."""


def margin(
    inputs: MeasureInputs, *, percentile: float, margin_rank: float | None, inverse_squared: bool = False
) -> MeasureResult:
    """Output margin γ: the ``percentile``-th percentile over the sample of f_y(x) − max_{j≠y} f_j(x).

    Jiang et al. 2019 (arXiv 1912.02178, §C.1 uses the 10th percentile) and Neyshabur et al. 2017 (arXiv 1706.08947,
    5th percentile on the training set; SPEC F36). Default ``percentile=5`` (numpy linear interpolation). Under
    torch.distributed the margins of all ranks are gathered before the percentile, so every rank agrees.
    The logits and labels come from ``inputs.logits_fn`` (e.g. a module's ``outputs_and_targets``), by default
    ``model(x)`` against ``y``; a one-logit binary head is the two-class (0, z), margin ±z. Needs class logits:
    refused (one line) for a model that gives none, e.g. an autoencoder.
    ``inverse_squared`` (default False) reports 1/γ² instead of γ (Jiang et al. 2019 eq. 22, "inverse margin"; +inf
    for γ = 0), with γ in ``extra["margin"]``.
    ``extra``: mean, min and the fraction of non-positive margins. Cost: one forward pass over the sample.
    """
    if not isinstance(inverse_squared, bool):
        raise ValueError(f"inverse_squared must be True or False, got {inverse_squared!r}")
    q = _check_percentile(percentile)
    rank = _check_margin_rank(margin_rank)
    m = sample_margins(inputs.model, inputs.batches, inputs.logits_of)
    value = margin_of(m, q, rank)
    arr = m.cpu().numpy()
    extra = {"mean": float(arr.mean()), "min": float(arr.min()), "fraction_nonpositive": float((arr <= 0).mean())}
    if rank is not None:
        extra["rank"] = float(margin_rank_k(rank, m.numel()))
    settings = {"percentile": q, "margin_rank": rank, "inverse_squared": inverse_squared}
    if inverse_squared:
        extra["margin"] = value
        value = 1.0 / value**2 if value != 0 else float("inf")
    return MeasureResult("margin", value, None, Cost(forwards=1), settings, extra)


margin.__doc__ = (margin.__doc__ or "").rstrip() + "\n\n    " + MARGIN_DOC + ' ``extra["rank"]``: k.\n'
register_measure(
    "margin", kind="complexity", needs_logits=True, percentile=5.0, margin_rank=None, inverse_squared=False
)(margin)
