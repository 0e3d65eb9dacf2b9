"""Gradient noise: the spread of per-example (or per-chunk) gradients around the sample gradient at the weights.

Jiang, Neyshabur, Mobahi, Krishnan, Bengio, "Fantastic generalization measures and where to find them" (ICLR 2020,
arXiv 1912.02178, §C.8, "gradient noise" among the optimization-based measures): the variance of the gradients of
the loss over the training examples at the end of training, Var_{(x,y)∈S}(∇_w ℓ(f_w(x), y)), a scalar by taking the
trace of the covariance. The step counts of that section (steps to a training cross-entropy of 0.1, from 0.1 to
0.01) are properties of the training run, recorded by
:class:`~flatlit.callbacks.generalization.GeneralizationTargets` (``loss_milestones``), not measures of weights.
"""

from __future__ import annotations

import math

import torch

from flatlit.sharpness.base import Cost, MeasureInputs, MeasureResult, all_reduce_sum, narrow_batch, register_measure
from flatlit.utils.batching import batch_size


def _bn_train(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())


@register_measure("gradient_noise", chunk=1)
def gradient_noise(inputs: MeasureInputs, chunk: int = 1) -> MeasureResult:
    """Gradient noise tr Cov(g) = (1/n) Σ_i ‖g_i − ḡ‖² with g_i = ∇_θ ℓ_i the gradient of example i's loss (Jiang
    et al. 2019, arXiv 1912.02178, §C.8 "gradient noise"; the variance of the gradients after training).

    ℓ_i is the module's loss on example i alone (the batch cut to it, so any batch structure works) and ḡ = (1/n)
    Σ_i g_i the sample gradient; computed as (1/n) Σ‖g_i‖² − ‖ḡ‖² in float64, with the sums all-reduced under
    torch.distributed. ``chunk`` = c > 1 takes the gradients of consecutive chunks of c examples of each batch
    instead (the variance of mini-batch gradients of size c, ≈ tr Cov(g)/c; a last shorter chunk counts with its
    own size as one gradient). Needs ``bn="eval"`` or ``"fold"`` (batch statistics of one example are meaningless).
    ``extra``: ``mean_grad_norm_sq`` (‖ḡ‖²), ``mean_sq_norm`` ((1/n) Σ‖g_i‖²), ``gradients`` (n), ``relative``
    (the noise over ‖ḡ‖²). Deterministic. Cost: ``per_example`` = 1 (a gradient per example, or per chunk).
    """
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an integer >= 1, got {chunk!r}")
    if _bn_train(inputs.model):
        raise ValueError("gradient_noise takes one example (chunk) at a time: use bn='eval' or bn='fold'")
    params = list(inputs.params)
    sum_g = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    acc = torch.zeros(2, dtype=torch.float64, device=inputs.device)  # Σ‖g_i‖², number of gradients
    for batch in inputs.batches:
        size = batch_size(batch)
        for start in range(0, size, chunk):
            with torch.enable_grad():
                loss = inputs.loss_of(inputs.model, narrow_batch(batch, start, min(chunk, size - start)))
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            sq = torch.zeros((), dtype=torch.float64, device=acc.device)
            for s, g in zip(sum_g, grads):
                if g is not None:
                    s.add_(g.double())
                    sq = sq + g.double().pow(2).sum()
            acc[0] += sq
            acc[1] += 1
    flat = all_reduce_sum(torch.cat([s.reshape(-1) for s in sum_g] + [acc]))
    n = float(flat[-1])
    if n == 0:
        raise ValueError("gradient_noise needs a non-empty sample (`batches`)")
    mean_sq = float(flat[-2]) / n
    mean_g_sq = float(flat[:-2].div(n).pow(2).sum())
    value = max(mean_sq - mean_g_sq, 0.0)
    extra = {
        "mean_grad_norm_sq": mean_g_sq,
        "mean_sq_norm": mean_sq,
        "gradients": n,
        "relative": value / mean_g_sq if mean_g_sq > 0 else math.inf,
    }
    return MeasureResult("gradient_noise", value, None, Cost(per_example=1), {"chunk": chunk}, extra)
