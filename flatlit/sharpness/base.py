"""Shared machinery of the sharpness and complexity measures (pure PyTorch, no Lightning).

Every measure is a function ``measure(inputs: MeasureInputs, **settings) -> MeasureResult`` registered under a name
with :func:`register_measure`. :class:`MeasureInputs` bundles the model, its loss and a fixed sample of (x, y)
batches (plus the initial weights and test batches where a measure needs them). Measures run inside
:func:`observed`, which restores the weights bit for bit and leaves BatchNorm buffers, every module's train/eval
flag, ``.grad`` and the global RNG untouched; randomness comes from a seeded ``torch.Generator``. Under
``torch.distributed`` each rank holds its share of the sample and the loss sums are all-reduced
(:func:`all_reduce_sum`), so every rank computes the same value.

Cost is counted in *passes over the sample*: ``forwards`` (no-grad forward passes), ``gradients`` (forward +
backward), ``hvps`` (Hessian-vector products) and ``per_example`` (a gradient per example, by ``vmap``);
``benchmarks/measures.py`` compares a measure's wall time with these counts times the measured cost of one such
pass.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from flatlit.nn_utils import preserved_rng

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]
BN_POLICIES = ("eval", "train", "fold")


@dataclass(frozen=True)
class Cost:
    """Passes over the whole sample: no-grad forwards, gradients (forward + backward), HVPs, and per-example
    gradients (a gradient for each example separately, ``torch.func.vmap``)."""

    forwards: int = 0
    gradients: int = 0
    hvps: int = 0
    per_example: int = 0

    def __add__(self, other: Cost) -> Cost:
        return Cost(
            self.forwards + other.forwards,
            self.gradients + other.gradients,
            self.hvps + other.hvps,
            self.per_example + other.per_example,
        )


@dataclass(frozen=True)
class MeasureResult:
    """A measure's value, its Monte-Carlo standard error (None when deterministic), its cost and its settings.

    ``extra`` holds secondary values (e.g. the radius found, per-layer terms) as plain floats.
    """

    name: str
    value: float
    std_error: float | None
    cost: Cost
    settings: dict[str, Any]
    extra: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "std_error": self.std_error,
            "cost": dataclasses.asdict(self.cost),
            "settings": self.settings,
            "extra": self.extra,
        }


@dataclass
class MeasureInputs:
    """What a measure reads.

    Args:
        model: the network (unwrapped, not a DDP wrapper).
        batches: this rank's share of the fixed training sample, as (x, y) batches on the model's device.
        loss_fn: ``loss_fn(model(x), y)`` returning the batch-mean loss (default cross-entropy).
        init_state: the initial weights (``model.state_dict()`` at initialisation) for distance-from-init and
            PAC-Bayes; None when unknown.
        test_batches: a fixed test sample where a measure needs one.
        num_train: the size N of the whole training set (PAC-Bayes' log(2N/δ)); default: the sample size.
        input_shape: (C, H, W) of one input, for measures that feed synthetic inputs (path norms).
    """

    model: nn.Module
    batches: Sequence[Batch]
    loss_fn: LossFn = F.cross_entropy
    init_state: dict[str, torch.Tensor] | None = None
    test_batches: Sequence[Batch] | None = None
    num_train: int | None = None
    input_shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.input_shape is None and self.batches:
            self.input_shape = tuple(self.batches[0][0].shape[1:])

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def named_params(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    @property
    def device(self) -> torch.device:
        return self.params[0].device


# ---- registry -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MeasureSpec:
    name: str
    fn: Callable[..., MeasureResult]
    kind: str  # "sharpness" or "complexity"
    defaults: dict[str, Any]
    doc: str


_MEASURES: dict[str, MeasureSpec] = {}


def register_measure(name: str, kind: str = "sharpness", **defaults: Any) -> Callable:
    """Decorator registering a measure under ``name`` with its default settings (timm-style registry)."""

    def wrap(fn: Callable[..., MeasureResult]) -> Callable[..., MeasureResult]:
        if name in _MEASURES:
            raise ValueError(f"measure {name!r} is already registered")
        _MEASURES[name] = MeasureSpec(name, fn, kind, {"bn": "eval", **defaults}, inspect.cleandoc(fn.__doc__ or ""))
        return fn

    return wrap


def list_measures(kind: str | None = None) -> list[str]:
    """Names of the registered measures (of one ``kind``: ``sharpness`` or ``complexity``)."""
    return sorted(n for n, s in _MEASURES.items() if kind is None or s.kind == kind)


def get_measure(name: str) -> MeasureSpec:
    """The registered measure ``name``; ValueError naming the known ones otherwise."""
    if name not in _MEASURES:
        import difflib

        close = difflib.get_close_matches(name, list(_MEASURES), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown measure {name!r}.{hint} Known measures: {', '.join(list_measures())}.")
    return _MEASURES[name]


def compute_measure(name: str, inputs: MeasureInputs, **settings: Any) -> MeasureResult:
    """Run measure ``name`` with its defaults updated by ``settings`` (unknown settings are a ValueError).

    Every measure takes ``bn``: ``eval`` (running statistics, default), ``train`` (batch statistics) or ``fold``
    (BatchNorm folded into the preceding layer, :func:`fold_batchnorm`; the initial weights ``inputs.init_state``
    are folded the same way with the initial model's own BN statistics, :func:`fold_state`); dropout is always off.
    The model comes back exactly as it was (:func:`observed`).
    """
    spec = get_measure(name)
    unknown = sorted(set(settings) - set(spec.defaults))
    if unknown:
        raise ValueError(
            f"measure {name!r}: unknown setting(s) {', '.join(unknown)}; accepted: {', '.join(sorted(spec.defaults))}."
        )
    merged = {**spec.defaults, **settings}
    bn = merged.pop("bn")
    with observed(inputs.model):
        set_bn_policy(inputs.model, "eval" if bn == "fold" else bn)
        if bn == "fold":
            init_state = inputs.init_state
            if init_state is not None:
                init_state = fold_state(inputs.model, init_state)
            inputs = dataclasses.replace(inputs, model=fold_batchnorm(inputs.model), init_state=init_state)
        result = spec.fn(inputs, **merged)
    return dataclasses.replace(result, settings={**result.settings, "bn": bn})


# ---- observe, never perturb ----------------------------------------------------------------------------------------
@contextmanager
def observed(model: nn.Module) -> Iterator[None]:
    """Restore, on exit, every parameter and buffer bit for bit, every module's train flag, every ``.grad``
    (the same tensor objects) and the torch/NumPy/Python RNG states."""
    params = list(model.parameters())
    saved = [t.detach().clone() for t in params] + [b.detach().clone() for b in model.buffers()]
    grads = [(p.grad, None if p.grad is None else p.grad.detach().clone()) for p in params]
    flags = [(m, m.training) for m in model.modules()]
    try:
        with preserved_rng():
            yield
    finally:
        with torch.no_grad():
            for t, v in zip([*params, *model.buffers()], saved):
                t.copy_(v)
        for p, (g, value) in zip(params, grads):
            p.grad = g
            if g is not None:
                with torch.no_grad():
                    g.copy_(value)
        for m, flag in flags:
            m.training = flag


def set_bn_policy(model: nn.Module, bn: str) -> None:
    """Evaluation mode for a measure: dropout off; BatchNorm on running statistics (``eval``, ``fold``) or on batch
    statistics (``train``; the buffers it updates are restored by :func:`observed`)."""
    if bn not in BN_POLICIES:
        raise ValueError(f"bn must be one of {', '.join(BN_POLICIES)}, got {bn!r}")
    model.eval()
    if bn == "train":
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.train()


class FoldedBatchNorm(nn.Identity):
    """The identity left in place of a BatchNorm folded by :func:`fold_batchnorm`; remembers the BN's ``eps`` (which
    a state_dict does not hold) so initial weights can be folded with the same ε."""

    def __init__(self, eps: float) -> None:
        super().__init__()
        self.eps = float(eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode) in which every BatchNorm that directly follows a Conv/Linear layer inside an
    ``nn.Sequential`` is folded into that layer (w' = γ w / √(σ² + ε), b' = γ (b − μ) / √(σ² + ε) + β) and replaced
    by the identity (:class:`FoldedBatchNorm`): the same function, with the BN scale visible in the weights
    (Neyshabur's ``reparam``, SPEC F35). BatchNorms that cannot be folded this way are kept."""
    import copy

    return _fold_in_place(copy.deepcopy(model))


def fold_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (a full state_dict of ``model``'s architecture, e.g. its initial weights) folded exactly as
    :func:`fold_batchnorm` folds ``model``: the state_dict of ``fold_batchnorm`` applied to a copy of ``model``
    holding ``state``, so each BN is folded with the statistics, γ, β and ε *of that state* (the initial model's
    own), in the model's dtype and on its device, by the same operations (at θ = θ₀ both sides agree bit for bit).
    A ``state`` that does not load into ``model`` (missing or extra entries, other shapes) is returned unchanged."""
    import copy

    twin = copy.deepcopy(model)
    try:
        twin.load_state_dict(state)
    except (RuntimeError, KeyError):
        return state
    return {k: v.detach().clone() for k, v in _fold_in_place(twin).state_dict().items()}


def _fold_in_place(folded: nn.Module) -> nn.Module:
    folded.eval()
    with torch.no_grad():
        for seq in folded.modules():
            if not isinstance(seq, nn.Sequential):
                continue
            names = list(seq._modules)
            for prev_name, name in itertools.pairwise(names):
                prev, bn = seq._modules[prev_name], seq._modules[name]
                if not isinstance(bn, _BatchNorm) or not isinstance(prev, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                    continue
                if bn.running_mean is None:
                    continue
                scale = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(
                    bn.running_var + bn.eps
                )
                shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
                prev.weight.mul_(scale.view(-1, *([1] * (prev.weight.ndim - 1))))
                bias = prev.bias if prev.bias is not None else torch.zeros_like(bn.running_mean)
                new_bias = (bias - bn.running_mean) * scale + shift
                if prev.bias is None:
                    prev.bias = nn.Parameter(new_bias)
                else:
                    prev.bias.copy_(new_bias)
                seq._modules[name] = FoldedBatchNorm(bn.eps)
    return folded


# ---- evaluation over the sample ------------------------------------------------------------------------------------
def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (identity without torch.distributed)."""
    if distributed():
        dist.all_reduce(t)
    return t


def sample_size(batches: Sequence[Batch]) -> int:
    n = torch.tensor(float(sum(len(y) for _, y in batches)), dtype=torch.float64)
    return int(all_reduce_sum(n).item())


def mean_loss(model: nn.Module, batches: Sequence[Batch], loss_fn: LossFn, reduce: bool = True) -> float:
    """Σ_b n_b L_b / Σ_b n_b over the sample (all ranks; this rank's ``batches`` only when ``reduce`` is False),
    no grad: one forward pass."""
    dev = next(model.parameters()).device
    acc = torch.zeros(2, dtype=torch.float64, device=dev)
    with torch.no_grad():
        for x, y in batches:
            acc[0] += loss_fn(model(x), y).double() * len(y)
            acc[1] += len(y)
    if reduce:
        acc = all_reduce_sum(acc)
    return float(acc[0] / acc[1])


def loss_and_grad(
    model: nn.Module, params: Sequence[torch.Tensor], batches: Sequence[Batch], loss_fn: LossFn, reduce: bool = True
) -> tuple[float, list[torch.Tensor]]:
    """Mean loss and its gradient over the sample by ``torch.autograd.grad`` (``.grad`` untouched): over all ranks,
    or over this rank's ``batches`` only when ``reduce`` is False (e.g. m-sharpness chunks, which differ by rank)."""
    dev = params[0].device
    grads = [torch.zeros_like(p) for p in params]
    acc = torch.zeros(2, dtype=torch.float64, device=dev)
    for x, y in batches:
        with torch.enable_grad():
            loss = loss_fn(model(x), y)
            g = torch.autograd.grad(loss, list(params), allow_unused=True)
        for buf, gi in zip(grads, g):
            if gi is not None:
                buf.add_(gi, alpha=len(y))
        acc[0] += loss.detach().double() * len(y)
        acc[1] += len(y)
    flat = torch.cat([acc.to(grads[0].dtype), *[g.reshape(-1) for g in grads]])
    if reduce:
        flat = all_reduce_sum(flat)
    total = float(flat[1])
    out, i = [], 2
    for g in grads:
        out.append(flat[i : i + g.numel()].view_as(g) / total)
        i += g.numel()
    return float(flat[0]) / total, out


@contextmanager
def perturbed(params: Sequence[torch.Tensor], delta: Sequence[torch.Tensor]) -> Iterator[None]:
    """Temporarily add ``delta`` to ``params`` (restored exactly from a copy, not by subtraction)."""
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, d in zip(params, delta):
            p.add_(d)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


def mc_stats(samples: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of Monte-Carlo samples."""
    t = torch.tensor(list(samples), dtype=torch.float64)
    se = float(t.std() / math.sqrt(len(t))) if len(t) > 1 else float("nan")
    return float(t.mean()), se


def generator(seed: int) -> torch.Generator:
    """A seeded generator on the CPU (draws are made on the CPU and moved, so every device and rank agrees)."""
    return torch.Generator().manual_seed(seed)


def randn_like(p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device)
