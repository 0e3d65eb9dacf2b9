"""Minimum sharpness (Ibayashi, Hamaguchi, Imaizumi, "Minimum sharpness: Scale-invariant parameter-robustness of
neural networks", arXiv 2106.12612; SPEC §2.3, F33).

The Hessian trace of the cross-entropy, restricted to its diagonal Gauss–Newton part, minimised over the
function-preserving layer rescalings of a ReLU network (W_l → α_l W_l for l < L−1, W_{L−1} → W_{L−1} / Π α). Only
per-layer traces of the diagonal are needed: a weight block's trace scales as 1/α_l², the bias of layer l as
1/(Π_{i≤l} α_i)², the last weight as (Π_{i<L−1} α_i)² and the last bias is unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn.modules.batchnorm import _BatchNorm

from flatlit.sharpness.base import (
    Batch,
    Cost,
    LogitsFn,
    MeasureInputs,
    MeasureNotApplicable,
    MeasureResult,
    all_reduce_sum,
    register_measure,
)
from flatlit.sharpness.norms import find_layers
from flatlit.utils.batching import split_batch


def gauss_newton_diagonal(
    model: nn.Module, batches: Sequence[Batch], names: Sequence[str], chunk_size: int = 16
) -> tuple[dict[str, torch.Tensor], int]:
    """Diagonal of the Gauss–Newton matrix of the cross-entropy w.r.t. the parameters ``names`` of ``model``,
    averaged over the sample (all ranks), and the sample size.

    For each example, with logits f and p = softmax(f), GN = Jᵀ(diag p − p pᵀ)J with J = ∂f/∂θ; it does not depend
    on the label. Since Σ_k p_k = 1, diag p − p pᵀ = S Sᵀ with columns s_k = √p_k (e_k − p), so
    diag GN = Σ_k (Jᵀ s_k)²: K vector–Jacobian products per example, each squared into the sum (``addcmul_``). They come
    from ``torch.func``: ``vmap`` over ``chunk_size`` examples at a time of ``grad`` of s_kᵀ f (K per-example
    gradient passes, one chunk × P buffer alive at a time), after one no-grad forward for p. The model is evaluated
    as it is (call in eval mode: per-example BatchNorm batch statistics would be meaningless).
    """
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"model has no parameter(s) {', '.join(missing)}")
    theta = {n: params[n].detach() for n in names}

    def projected(th: dict[str, torch.Tensor], x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return (functional_call(model, th, (x.unsqueeze(0),)).squeeze(0) * s).sum()

    vjp_rows = vmap(grad(projected), in_dims=(None, 0, 0))
    sums = {n: torch.zeros_like(t) for n, t in theta.items()}
    count = 0
    for x, _ in batches:
        count += len(x)
        for chunk in x.split(chunk_size):
            with torch.no_grad():
                logits = functional_call(model, theta, (chunk,))
                prob = torch.softmax(logits.double(), dim=-1)  # (B, K), float64 so s_k sums to zero exactly enough
            root = prob.sqrt()
            for k in range(prob.shape[1]):
                s_k = -root[:, k : k + 1] * prob  # √p_k (e_k − p)
                s_k[:, k] += root[:, k]
                rows = vjp_rows(theta, chunk, s_k.to(logits.dtype))  # rows[n]: (B, *shape)
                for n, r in rows.items():
                    for row in r:  # one fused multiply-add per example: 3x faster than squaring then summing
                        sums[n].addcmul_(row, row)
    return _sample_mean(sums, count)


def _sample_mean(sums: dict[str, torch.Tensor], count: int) -> tuple[dict[str, torch.Tensor], int]:
    """``sums`` / count over all ranks (sums and count all-reduced), and the total count."""
    flat = torch.cat(
        [torch.tensor([float(count)], dtype=torch.float64, device=next(iter(sums.values())).device)]
        + [s.detach().reshape(-1).double() for s in sums.values()]
    )
    flat = all_reduce_sum(flat)
    total = int(flat[0])
    out, i = {}, 1
    for n, s in sums.items():
        out[n] = (flat[i : i + s.numel()] / total).view_as(s).to(s.dtype)
        i += s.numel()
    return out, total


def gauss_newton_diagonal_of_logits(
    model: nn.Module, batches: Sequence[Batch], names: Sequence[str], logits_fn: LogitsFn, chunk_size: int = 16
) -> tuple[dict[str, torch.Tensor], int]:
    """:func:`gauss_newton_diagonal` for batches of any structure, with the class logits of
    ``logits_fn(model, batch) -> (logits (R, C), labels)`` (e.g. a module's ``outputs_and_targets``; a one-logit
    binary head as (0, z)): every logits row is one example of the average (R may differ from the batch size, e.g.
    the tokens of a sequence batch). Each batch is cut into pieces of ``chunk_size`` examples
    (:func:`flatlit.utils.batching.split_batch`); for each piece one forward with grad gives the logits, and for each
    class k the per-row vector–Jacobian products Jᵣᵀ s_rk come from backward passes batched over ``chunk_size`` rows
    (``torch.autograd.grad(..., is_grads_batched=True)``), each squared into the sum. Rows must not interact (call in
    eval mode)."""
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"model has no parameter(s) {', '.join(missing)}")
    theta = [params[n] for n in names]
    sums = {n: torch.zeros_like(params[n]) for n in names}
    count = 0
    for batch in batches:
        for piece in split_batch(batch, size=chunk_size):
            with torch.enable_grad():
                pair = logits_fn(model, piece)
                if pair is None:
                    raise MeasureNotApplicable("minimum_sharpness needs class logits on every batch")
                logits = pair[0]
                if not logits.requires_grad:
                    raise MeasureNotApplicable(
                        "minimum_sharpness differentiates the class logits, but they are detached from the parameters"
                    )
                prob = torch.softmax(logits.detach().double(), dim=-1)  # (R, K)
                root = prob.sqrt()
                rows, classes = prob.shape
                count += rows
                for start in range(0, rows, chunk_size):
                    idx = torch.arange(start, min(rows, start + chunk_size), device=logits.device)
                    for k in range(classes):
                        s_k = -root[idx, k : k + 1] * prob[idx]  # √p_k (e_k − p) for these rows
                        s_k[:, k] += root[idx, k]
                        cot = torch.zeros(len(idx), rows, classes, dtype=logits.dtype, device=logits.device)
                        cot[torch.arange(len(idx), device=logits.device), idx] = s_k.to(logits.dtype)
                        grads = torch.autograd.grad(
                            logits, theta, cot, retain_graph=True, is_grads_batched=True, allow_unused=True
                        )
                        for n, g in zip(names, grads):
                            if g is not None:
                                for row in g:
                                    sums[n].addcmul_(row, row)
    return _sample_mean(sums, count)


def minimize_rescaled_trace(
    weights: Sequence[float], biases: Sequence[float], max_steps: int = 100, tol: float = 1e-12
) -> tuple[float, list[float], int, bool]:
    """min over e ∈ R^{L−1} (α = exp(e)) of
    Σ_{l<L−1} [w_l/α_l² + b_l/(Π_{i≤l} α_i)²] + w_{L−1} (Π_{i<L−1} α_i)² + b_{L−1}   (Ibayashi et al. 2021, eq. 6).

    Every term is c·exp(a·e) with c ≥ 0, so the objective is convex and smooth in e. It is minimised in float64 by
    Newton's method with Armijo backtracking (pseudo-inverse of the Hessian, gradient step as a fallback), starting at
    e = 0, after dividing the traces by their sum (as the reference does); it stops when the Newton decrement ½λ²
    falls below ``tol`` × objective or after ``max_steps`` steps (typically < 20; the reference used 1e5 SGD steps).
    Returns (minimum, exponents e, steps taken, converged).
    """
    L = len(weights)
    if L != len(biases) or L == 0:
        raise ValueError("weights and biases must be non-empty and of the same length")
    w = torch.tensor(list(weights), dtype=torch.float64)
    b = torch.tensor(list(biases), dtype=torch.float64)
    if (w < 0).any() or (b < 0).any():
        raise ValueError("the traces must be non-negative")
    scale = float(w.sum() + b.sum())
    if L == 1 or scale == 0.0:
        return scale, [0.0] * (L - 1), 0, True
    n = L - 1
    rows, coef = [], []
    tri = torch.tril(torch.ones(n, n, dtype=torch.float64))  # row l: Σ_{i≤l} e_i
    for l in range(n):
        rows.append(-2 * torch.eye(n, dtype=torch.float64)[l])
        coef.append(w[l])
        rows.append(-2 * tri[l])
        coef.append(b[l])
    rows.append(2 * torch.ones(n, dtype=torch.float64))
    coef.append(w[n])
    A = torch.stack(rows)
    c = torch.stack(coef) / scale
    keep = c > 0
    A, c = A[keep], c[keep]
    const = float(b[n]) / scale

    def f(e: torch.Tensor) -> float:
        return float((c * torch.exp(A @ e)).sum()) + const

    e = torch.zeros(n, dtype=torch.float64)
    fe = f(e)
    converged = False
    steps = 0
    for steps in range(1, max_steps + 1):  # noqa: B007
        t = c * torch.exp(A @ e)
        g = A.T @ t
        H = A.T @ (t.unsqueeze(1) * A)
        d = -(torch.linalg.pinv(H, hermitian=True) @ g)
        slope = float(g @ d)
        if not slope < 0:
            d, slope = -g, -float(g @ g)
        if -slope / 2 <= tol * fe:
            converged = True
            break
        step = 1.0
        while True:
            new = f(e + step * d)
            if new <= fe + 1e-4 * step * slope or step < 1e-20:
                break
            step /= 2
        if new >= fe:  # no progress possible in float64
            converged = True
            break
        e, fe = e + step * d, new
    return fe * scale, e.tolist(), steps, converged


@register_measure(
    "minimum_sharpness", kind="sharpness", needs_logits="differentiable", chunk_size=16, max_steps=100, tol=1e-12
)
def minimum_sharpness(inputs: MeasureInputs, *, chunk_size: int, max_steps: int, tol: float) -> MeasureResult:
    """Minimum sharpness (Ibayashi et al. 2021, arXiv 2106.12612; SPEC §2.3, F33): the trace of the diagonal
    Gauss–Newton matrix of the cross-entropy over the Linear/Conv weights and biases, minimised over the
    function-preserving layer rescalings of a ReLU network.

    1. diag GN = mean over the sample of Σ_k p_k (∂f_k/∂θ)² − (∂ logsumexp f/∂θ)² (:func:`gauss_newton_diagonal`,
       K vector–Jacobian products per example by ``torch.func``, ``chunk_size`` = 16 examples at a time).
    2. Per-layer traces w_l (weight) and b_l (bias, 0 without bias) for the L Linear/Conv layers in forward order.
       As upstream, layers are the Linear/Conv modules only: BatchNorm parameters are excluded (and not counted as
       layers; the CS-439 port's quirk of counting them as zero-trace layers is not reproduced); use ``bn="fold"``
       to fold BN into the layers first.
    3. The minimum over rescalings of Σ_{l<L−1}[w_l/α_l² + b_l/(Π_{i≤l}α_i)²] + w_{L−1}(Π_{i<L−1}α_i)² + b_{L−1}
       (:func:`minimize_rescaled_trace`: Newton's method on the convex objective in log α, at most ``max_steps`` =
       100 steps, stopping when the Newton decrement is below ``tol`` = 1e-12 relative). Value: that minimum.

    The cross-entropy GN of the class logits is used whatever the loss is (labels are not needed): the logits come
    from ``inputs.logits_fn`` (e.g. a module's ``outputs_and_targets``; :func:`gauss_newton_diagonal_of_logits`) or,
    by default, ``model(x)`` (:func:`gauss_newton_diagonal`); a one-logit binary head counts as the two-class
    logits (0, z). Needs class logits that carry gradients: refused (one line) for a model that gives none (an
    autoencoder) or gives them detached. ``bn="train"`` is refused
    (per-example batch statistics). ``extra``: ``trace`` (the un-rescaled trace Σ w_l + b_l), ``w/<layer>``,
    ``b/<layer>``, ``alpha/<layer>`` (the optimal α_l), ``steps`` and ``converged``. Cost: ``per_example`` = K (the
    number of classes): each example needs K vector–Jacobian products, i.e. K per-example gradient passes (``vmap``
    over examples: no batched weight-gradient GEMM, each example's gradient is materialised), and ``forwards`` = 1
    (the probabilities).
    """
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size!r}")
    if int(max_steps) < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps!r}")
    if float(tol) < 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")
    model = inputs.model
    if any(isinstance(m, _BatchNorm) and m.training for m in model.modules()):
        raise ValueError("minimum_sharpness needs bn='eval' or bn='fold' (per-example gradients), not bn='train'")
    if not inputs.batches:
        raise ValueError("minimum_sharpness needs a non-empty sample (`batches`)")
    layers = find_layers(model, inputs.input_shape)
    if not layers:
        raise ValueError("the model has no nn.Linear / nn.Conv layers")
    trainable = {n for n, _ in inputs.named_params}
    names = [f"{layer.name}.{kind}" for layer in layers for kind in ("weight", "bias")]
    names = [n for n in names if n in trainable]
    first = inputs.batches[0]
    plain = inputs.logits_fn is None and inputs.batch_loss is None and _class_outputs(model, first)
    if plain:  # model(x) gives (N, C ≥ 2) logits: per-example gradients by vmap
        diag, _ = gauss_newton_diagonal(model, inputs.batches, names, chunk_size=int(chunk_size))
    else:
        diag, _ = gauss_newton_diagonal_of_logits(
            model, inputs.batches, names, inputs.logits_of, chunk_size=int(chunk_size)
        )
    w = [
        float(diag[f"{layer.name}.weight"].double().sum()) if f"{layer.name}.weight" in diag else 0.0
        for layer in layers
    ]
    b = [float(diag[f"{layer.name}.bias"].double().sum()) if f"{layer.name}.bias" in diag else 0.0 for layer in layers]
    value, exponents, steps, converged = minimize_rescaled_trace(w, b, max_steps=int(max_steps), tol=float(tol))
    with torch.no_grad():
        pair = inputs.logits_of(model, first)
        num_classes = int(pair[0].shape[-1]) if pair is not None else 0
    extra = {"trace": sum(w) + sum(b), "steps": float(steps), "converged": float(converged)}
    for layer, wl, bl in zip(layers, w, b):
        extra[f"w/{layer.name}"] = wl
        extra[f"b/{layer.name}"] = bl
    for layer, e in zip(layers, exponents):
        extra[f"alpha/{layer.name}"] = math.exp(e)
    settings = {"chunk_size": int(chunk_size), "max_steps": int(max_steps), "tol": float(tol)}
    return MeasureResult("minimum_sharpness", value, None, Cost(forwards=1, per_example=num_classes), settings, extra)


def _class_outputs(model: nn.Module, batch: Batch) -> bool:
    """Whether ``batch`` is ``(x, y)`` and ``model(x)`` gives (N, C ≥ 2) class logits."""
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], torch.Tensor)):
        return False
    with torch.no_grad():
        out = model(batch[0][:1])
    return isinstance(out, torch.Tensor) and out.ndim == 2 and out.shape[1] >= 2
