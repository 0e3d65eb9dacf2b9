"""The measure registry and what a measure reads and returns: MeasureInputs, MeasureResult, compute_measure.

Every measure is a function ``measure(inputs: MeasureInputs, **settings) -> MeasureResult`` registered under a name
with :func:`register_measure`. :class:`MeasureInputs` bundles the model, its loss and a fixed sample of batches
(plus the initial weights and test batches where a measure needs them): ``(x, y)`` batches with
``loss_fn(model(x), y)``, or batches of any structure with a ``batch_loss(model, batch)`` (the loss contract of
:mod:`flatlit.objective`, e.g. ``resolve_objective(module, owner).loss_of``); every loss evaluation of every measure
goes through :meth:`MeasureInputs.loss_of`. Measures that read class logits and labels (margins, the bounds,
prediction entropy, minimum sharpness) declare it (``register_measure(..., needs_logits=True)``) and take them from
:meth:`MeasureInputs.logits_of`; :func:`compute_measure` refuses, with one :class:`MeasureNotApplicable` line, a
measure whose requirements the inputs do not meet, and :func:`inapplicable_reason` tells it without running the
measure (for setup checks). Measures run inside
:func:`observed`, which restores the weights bit for bit and leaves BatchNorm buffers, every module's train/eval
flag, ``.grad`` and the global RNG untouched; randomness comes from a seeded ``torch.Generator``. Under
``torch.distributed`` each rank holds its share of the sample and the loss sums are all-reduced
(:func:`all_reduce_sum`), so every rank computes the same value.

The evaluation helpers the measures share (losses and gradients over the sample, :func:`observed`, BatchNorm
folding, perturbations, seeded noise) live in :mod:`flatlit.sharpness.evaluation` and are re-exported here, so
``from flatlit.sharpness.base import ...`` stays the one import of a family of measures.

Cost is counted in *passes over the sample*: ``forwards`` (no-grad forward passes), ``gradients`` (forward +
backward), ``hvps`` (Hessian-vector products) and ``per_example`` (a gradient per example, by ``vmap``);
``benchmarks/measures.py`` compares a measure's wall time with these counts times the measured cost of one such
pass.

Every measure also takes three *universal* settings, handled here by :func:`compute_measure` and recorded in the
result's settings: ``bn`` (how BatchNorm runs: ``eval``, ``train`` or ``fold``), ``reparametrize`` (None, or
``"lpf_norm"``: the measure runs on LPF-SGD's function-preserving unit-filter copy,
:func:`~flatlit.sharpness.norms.lpf_normalize`) and ``scale`` (``"none"``, or Jiang et al.'s adjustment for the
dataset size m: ``"sqrt_m"`` → √(v/m), ``"half_log_m"`` → ½(v − log m)).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flatlit.objective import X_KEYS, class_logits
from flatlit.sharpness.evaluation import (  # noqa: F401 (re-exported: the measures import them from here)
    BN_POLICIES,
    Batch,
    BatchLossFn,
    FoldedBatchNorm,
    LossFn,
    all_reduce_sum,
    batch_loss_of,
    distributed,
    fold_batchnorm,
    fold_state,
    generator,
    loss_and_grad,
    mc_stats,
    mean_loss,
    narrow_batch,
    observed,
    perturbed,
    randn_like,
    sample_size,
    set_bn_policy,
)
from flatlit.sharpness.universal import lpf_inputs as _lpf_inputs
from flatlit.sharpness.universal import scaled as _scaled
from flatlit.utils.errors import ConfigError

LogitsFn = Callable[[nn.Module, Any], "tuple[torch.Tensor, torch.Tensor] | None"]  # (model, batch) -> (logits, labels)


class MeasureNotApplicable(ConfigError):
    """A measure cannot apply to these inputs (e.g. it needs class logits and labels the model does not give); the
    message is one line naming the measure, what it needs and what to do."""


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
        batches: this rank's share of the fixed training sample, on the model's device: ``(x, y)`` batches, or
            batches of any structure (tensors, tuples, dicts) when ``batch_loss`` is given; a batch's size is
            :func:`flatlit.utils.batching.batch_size` (the leading size of its first tensor).
        loss_fn: ``loss_fn(model(x), y)`` returning the batch-mean loss (default cross-entropy); not used when
            ``batch_loss`` is given.
        init_state: the initial weights (``model.state_dict()`` at initialisation) for distance-from-init and
            PAC-Bayes; None when unknown.
        test_batches: a fixed test sample where a measure needs one (same structure as ``batches``).
        num_train: the size N of the whole training set (PAC-Bayes' log(2N/δ), the m of the ``scale`` setting);
            default: the sample size.
        input_shape: the shape of one input, for measures that feed synthetic inputs (path norms, the bounds' input
            dimension, layer tracing); default: from the first batch when its inputs can be told (the first item
            of a tuple/list batch, a dict's ``x``/``input``/``image``... entry, or the batch itself when it is a
            tensor), else None.
        batch_loss: ``batch_loss(model, batch)`` returning the batch-mean loss of any batch (e.g. the ``loss_of``
            of :func:`flatlit.objective.resolve_objective`); takes the model as an argument, so it also evaluates a
            BatchNorm-folded copy. Every loss evaluation of every measure goes through it when it is given.
        logits_fn: ``logits_fn(model, batch) -> (logits (N, C ≥ 2), labels (N,)) | None`` for the measures that
            need class logits (the objective's ``logits_of``); default: ``model(x)`` against ``y`` for ``(x, y)``
            batches when those are class logits (a one-logit binary head becomes (0, z)), else None.
        params: the parameters the measures differentiate, perturb and sum over (a subset of ``model``'s
            parameters, e.g. from :func:`flatlit.objective.select_parameters`); default: every parameter that
            requires grad. Kept in the model's parameter order; with ``bn="fold"`` they are mapped onto the
            folded copy by name (BatchNorm parameters folded away drop out), with ``reparametrize="lpf_norm"``
            onto the normalised copy (``0.weight`` → ``0.0.weight``).
    """

    model: nn.Module
    batches: Sequence[Batch]
    loss_fn: LossFn = F.cross_entropy
    init_state: dict[str, torch.Tensor] | None = None
    test_batches: Sequence[Batch] | None = None
    num_train: int | None = None
    input_shape: tuple[int, ...] | None = None
    batch_loss: BatchLossFn | None = None
    logits_fn: LogitsFn | None = None
    params: Sequence[nn.Parameter] | None = None
    explicit_params: bool = field(init=False, default=False, repr=False)
    _checked: dict[Any, str | None] = field(init=False, default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.input_shape is None and self.batches:
            self.input_shape = input_shape_of(self.batches[0])
        named = list(self.model.named_parameters())
        if self.params is None:
            self.params = [p for _, p in named if p.requires_grad]
            return
        wanted = {id(p) for p in self.params}
        if isinstance(self.params, torch.Tensor) or not wanted:
            raise ValueError("MeasureInputs(params): selects no parameter; pass a non-empty list of model parameters")
        known = {id(p) for _, p in named}
        if wanted - known:
            raise ValueError("MeasureInputs(params): holds a tensor that is not a parameter of the model")
        frozen = [n for n, p in named if id(p) in wanted and not p.requires_grad]
        if frozen:
            raise ValueError(f"MeasureInputs(params): {', '.join(frozen[:5])} do(es) not require grad")
        self.params = [p for _, p in named if id(p) in wanted]
        self.explicit_params = True

    @property
    def named_params(self) -> list[tuple[str, nn.Parameter]]:
        """``params`` with their names in ``model``, in the model's order."""
        ids = {id(p) for p in self.params}
        return [(n, p) for n, p in self.model.named_parameters() if id(p) in ids]

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    def loss_of(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The batch-mean loss of ``model`` on ``batch``: ``batch_loss(model, batch)``, else loss_fn(model(x), y)."""
        return batch_loss_of(model, batch, self.loss_fn, self.batch_loss)

    def logits_of(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(logits (N, C ≥ 2), labels (N,))`` of ``model`` on ``batch``, or None when it gives none."""
        if self.logits_fn is not None:
            return self.logits_fn(model, batch)
        return default_logits(model, batch)

    def sample_loss(self, batches: Sequence[Batch] | None = None, reduce: bool = True) -> float:
        """:func:`mean_loss` of ``model`` over ``batches`` (default: the sample) through :meth:`loss_of`."""
        batches = self.batches if batches is None else batches
        return mean_loss(self.model, batches, self.loss_fn, reduce, batch_loss=self.batch_loss)

    def sample_loss_and_grad(
        self, batches: Sequence[Batch] | None = None, params: Sequence[torch.Tensor] | None = None, reduce: bool = True
    ) -> tuple[float, list[torch.Tensor]]:
        """:func:`loss_and_grad` over ``batches`` (default: the sample) for ``params`` (default: ``self.params``)."""
        batches = self.batches if batches is None else batches
        params = self.params if params is None else params
        return loss_and_grad(self.model, params, batches, self.loss_fn, reduce, batch_loss=self.batch_loss)


def _is_pair(batch: Any) -> bool:
    return isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(t, torch.Tensor) for t in batch)


def input_shape_of(batch: Any) -> tuple[int, ...] | None:
    """The shape of one input of ``batch``: its first item (tuple/list), its ``x``/``input``/``image``... entry
    (dict), or the batch itself (a tensor); None when it cannot be told."""
    x: Any = None
    if isinstance(batch, torch.Tensor):
        x = batch
    elif isinstance(batch, (tuple, list)) and batch:
        x = batch[0]
    elif isinstance(batch, dict):
        x = next((batch[k] for k in X_KEYS if k in batch), None)
    if isinstance(x, torch.Tensor) and x.ndim >= 1:
        return tuple(x.shape[1:])
    return None


def default_logits(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(logits, labels)`` of an ``(x, y)`` batch from ``model(x)`` when they are class logits
    (:func:`flatlit.objective.class_logits`; a one-logit binary head becomes (0, z)); outputs (N, C, *d) against
    integer labels (N, *d) count every position as one example. None otherwise."""
    if not _is_pair(batch):
        return None
    x, y = batch
    out = model(x)
    if (
        isinstance(out, torch.Tensor)
        and out.ndim > 2
        and not y.is_floating_point()
        and y.shape == out.shape[:1] + out.shape[2:]
    ):
        out = out.movedim(1, -1).reshape(-1, out.shape[1])
        y = y.reshape(-1)
    return class_logits(out, y)


# ---- registry -----------------------------------------------------------------------------------------------------
REPARAMETRIZATIONS = (None, "lpf_norm")
"""Values of the universal ``reparametrize`` setting (see :func:`compute_measure`)."""
SCALES = ("none", "sqrt_m", "half_log_m")
"""Values of the universal ``scale`` setting (see :func:`compute_measure`)."""
UNIVERSAL_SETTINGS = {"bn": "eval", "reparametrize": None, "scale": "none"}
"""The settings every measure takes, handled by :func:`compute_measure` (not passed to the measure's function), with
their defaults; a measure may register another default for them (the norm measures: ``bn="fold"``)."""

Requirement = bool | str | Callable[[dict[str, Any]], "bool | str"]


@dataclass(frozen=True)
class MeasureSpec:
    """A registered measure. ``needs_logits``: False, True (class logits and labels, :meth:`MeasureInputs.logits_of`)
    or ``"differentiable"`` (logits that carry gradients to the parameters), or a function of the settings giving
    one of those; ``needs_input_shape``: whether it feeds synthetic inputs of ``input_shape`` (True, or ``"conv"``:
    only when the model has convolutions; or a function of the settings giving one of those)."""

    name: str
    fn: Callable[..., MeasureResult]
    kind: str  # "sharpness" or "complexity"
    defaults: dict[str, Any]
    doc: str
    needs_logits: Requirement = False
    needs_input_shape: Requirement = False

    def requirements(self, settings: dict[str, Any]) -> tuple[bool | str, bool | str]:
        """(needs_logits, needs_input_shape) under ``settings`` (merged with the defaults)."""
        merged = {**self.defaults, **settings}
        logits = self.needs_logits(merged) if callable(self.needs_logits) else self.needs_logits
        shape = self.needs_input_shape(merged) if callable(self.needs_input_shape) else self.needs_input_shape
        return logits, shape


_MEASURES: dict[str, MeasureSpec] = {}


def register_measure(
    name: str,
    kind: str = "sharpness",
    *,
    needs_logits: Requirement = False,
    needs_input_shape: Requirement = False,
    **defaults: Any,
) -> Callable:
    """Decorator registering a measure under ``name`` with its default settings (timm-style registry).

    ``needs_logits`` declares that the measure reads class logits and labels (True; ``"differentiable"`` when it
    differentiates them; or a function of the settings, e.g. only with ``over_margin``); ``needs_input_shape`` that
    it feeds synthetic inputs of ``input_shape`` (``"conv"``: only for a model with convolutions).
    :func:`compute_measure` refuses the measure, with one line, when the inputs do not meet them."""

    def wrap(fn: Callable[..., MeasureResult]) -> Callable[..., MeasureResult]:
        if name in _MEASURES:
            raise ValueError(f"measure {name!r} is already registered")
        doc = inspect.cleandoc(fn.__doc__ or "")
        merged = {**UNIVERSAL_SETTINGS, **defaults}
        _MEASURES[name] = MeasureSpec(name, fn, kind, merged, doc, needs_logits, needs_input_shape)
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


def _merged(name: str, settings: dict[str, Any]) -> tuple[MeasureSpec, dict[str, Any]]:
    spec = get_measure(name)
    unknown = sorted(set(settings) - set(spec.defaults))
    if unknown:
        raise ValueError(
            f"measure {name!r}: unknown setting(s) {', '.join(unknown)}; accepted: {', '.join(sorted(spec.defaults))}."
        )
    merged = {**spec.defaults, **settings}
    for key, allowed in (("reparametrize", REPARAMETRIZATIONS), ("scale", SCALES)):
        if merged[key] not in allowed:
            shown = ", ".join(repr(a) for a in allowed)
            raise ValueError(f"measure {name!r}: setting {key!r} must be one of {shown}, got {merged[key]!r}")
    return spec, merged


def _reason(spec: MeasureSpec, inputs: MeasureInputs, settings: dict[str, Any]) -> str | None:
    """Why ``spec`` cannot apply to ``inputs`` (one line), or None; evaluates the logits of one batch at most (call
    with the model in its measuring mode, inside :func:`observed`)."""
    logits, shape = spec.requirements(settings)
    what = type(inputs.model).__name__
    if shape == "conv":
        shape = any(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) for m in inputs.model.modules())
    if shape and inputs.input_shape is None:
        return (
            f"measure {spec.name!r} needs the shape of one input (input_shape), which the batches of {what} do not "
            "tell (they are not (inputs, ...) tuples, dicts with an 'x'/'input'/'image' entry or input tensors); "
            "pass MeasureInputs(input_shape=...) or leave it out."
        )
    if not logits or not inputs.batches:
        return None
    differentiable = logits == "differentiable"
    key = (id(inputs.model), differentiable)
    if key not in inputs._checked:
        inputs._checked[key] = _logits_reason(inputs, differentiable)
    found = inputs._checked[key]
    return None if found is None else f"measure {spec.name!r} {found}"


def _logits_reason(inputs: MeasureInputs, differentiable: bool) -> str | None:
    what = type(inputs.model).__name__
    hook = "define outputs_and_targets(self, batch) -> (logits, labels) on the module (or MeasureInputs(logits_fn=...))"
    try:
        with torch.enable_grad() if differentiable else torch.no_grad():
            pair = inputs.logits_of(inputs.model, inputs.batches[0])
    except Exception as err:  # any failure of the user's hook is reported in the one line
        first = str(err).splitlines()[0] if str(err) else ""
        return (
            f"needs class logits and labels, but getting them from {what} failed on a batch "
            f"({type(err).__name__}: {first}); {hook}, or leave the measure out."
        )
    if pair is None:
        return (
            f"needs class logits and labels, which {what} does not give on its batches (they are not (inputs, "
            f"integer labels) with class-logit outputs); {hook}, or leave the measure out."
        )
    if differentiable and not pair[0].requires_grad:
        return (
            f"differentiates the class logits, but those {what} gives are detached from its parameters; make "
            "outputs_and_targets(self, batch) return logits that carry gradients, or leave the measure out."
        )
    return None


def inapplicable_reason(name: str, inputs: MeasureInputs, **settings: Any) -> str | None:
    """Why measure ``name`` (with ``settings``) cannot apply to ``inputs``, as one line naming it, or None when it
    can: without running it (at most one forward of the first batch, in the measure's BatchNorm mode, leaving the
    model exactly as it was). For setup checks; :func:`compute_measure` raises :class:`MeasureNotApplicable` with
    the same line."""
    spec, merged = _merged(name, settings)
    bn = merged["bn"]
    with observed(inputs.model):
        set_bn_policy(inputs.model, "eval" if bn == "fold" else bn)
        return _reason(spec, inputs, merged)


def measure_applies(name: str, inputs: MeasureInputs, **settings: Any) -> bool:
    """Whether measure ``name`` can apply to ``inputs`` (:func:`inapplicable_reason` is None)."""
    return inapplicable_reason(name, inputs, **settings) is None


def _folded_params(inputs: MeasureInputs, folded: nn.Module, name: str) -> list[nn.Parameter] | None:
    """The explicit parameter selection mapped onto the folded copy by name (None: every trainable parameter)."""
    if not inputs.explicit_params:
        return None
    by_name = dict(folded.named_parameters())
    mapped = [by_name[n] for n, _ in inputs.named_params if n in by_name and by_name[n].requires_grad]
    if not mapped:
        raise ValueError(
            f"measure {name!r}: params selects only parameters that bn='fold' folds away (BatchNorm); select the "
            "layers' weights or use bn='eval'."
        )
    return mapped


def compute_measure(name: str, inputs: MeasureInputs, **settings: Any) -> MeasureResult:
    """Run measure ``name`` with its defaults updated by ``settings`` (unknown settings are a ValueError).

    Every measure takes three universal settings (:data:`UNIVERSAL_SETTINGS`), applied here in this order and
    recorded in the result's settings:

    * ``bn``: ``eval`` (running statistics, default), ``train`` (batch statistics) or ``fold`` (BatchNorm folded
      into the preceding layer, :func:`fold_batchnorm`; the initial weights ``inputs.init_state`` are folded the
      same way with the initial model's own BN statistics, :func:`fold_state`, and an explicit ``inputs.params`` is
      mapped onto the folded copy by name); dropout is always off.
    * ``reparametrize``: None (default) or ``"lpf_norm"``: the measure runs on
      :func:`~flatlit.sharpness.norms.lpf_normalize` of the model (after folding, with ``bn="fold"``): LPF-SGD's
      ``norm()`` (Bisla et al. 2022, arXiv 2201.08025; SPEC §5.6), the same function with every Linear/Conv filter
      at ‖W_j‖₂ + |b_j| = 1 and every BatchNorm at |γ_j| + |β_j| = 1, the scales moved into constant buffers. An
      explicit ``inputs.params`` is mapped onto the copy (``0.weight`` → ``0.0.weight``); ``inputs.init_state`` is
      normalised with the *initial* model's own filter norms (``lpf_normalize`` of a copy holding it). LPF-SGD's
      own measures never read θ₀ (its PAC-Bayes term uses 0). The losses and logits are evaluated on the copy
      (``batch_loss(model, batch)`` and ``logits_fn(model, batch)`` take the model as an argument); a loss that
      reads a layer's ``.weight`` by attribute, outside the layer's forward, does not see the wrapped layer.
    * ``scale``: ``"none"`` (default), ``"sqrt_m"`` (value → √(value/m)) or ``"half_log_m"`` (value → ½(value −
      log m)), with m = ``inputs.num_train`` when set, else the sample size (:func:`sample_size`): the adjustment
      of Jiang et al. 2019 (arXiv 1912.02178) for the dataset size, as coded by Dziugaite et al. 2020 (log measures
      ½(v − log m), the others √(v/m)). The standard error follows by the delta method (SE / (2√(v·m)) and SE / 2);
      ``extra`` gains ``unscaled`` (v) and ``m``, the other extras stay unscaled. √ of a negative value is NaN
      with a one-line RuntimeWarning.

    A measure whose requirements (class logits, an input shape) the inputs do not meet raises
    :class:`MeasureNotApplicable` (one line) before anything runs. The model comes back exactly as it was
    (:func:`observed`).
    """
    spec, merged = _merged(name, settings)
    bn = merged.pop("bn")
    reparametrize = merged.pop("reparametrize")
    scale = merged.pop("scale")
    universal = {"bn": bn, "reparametrize": reparametrize, "scale": scale}
    with observed(inputs.model):
        set_bn_policy(inputs.model, "eval" if bn == "fold" else bn)
        reason = _reason(spec, inputs, {**merged, **universal})
        if reason is not None:
            raise MeasureNotApplicable(reason)
        if bn == "fold":
            init_state = inputs.init_state
            if init_state is not None:
                init_state = fold_state(inputs.model, init_state)
            folded = fold_batchnorm(inputs.model)
            params = _folded_params(inputs, folded, name)
            inputs = dataclasses.replace(inputs, model=folded, init_state=init_state, params=params)
        if reparametrize == "lpf_norm":
            inputs = _lpf_inputs(inputs)
        result = spec.fn(inputs, **merged)
    if scale != "none":
        m = inputs.num_train if inputs.num_train is not None else sample_size(inputs.batches)
        if m < 1:
            raise ValueError(f"measure {name!r}: scale={scale!r} needs a dataset size m >= 1 (num_train), got {m}")
        result = _scaled(result, scale, m)
    return dataclasses.replace(result, settings={**result.settings, **universal})
