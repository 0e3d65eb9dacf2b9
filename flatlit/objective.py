"""The loss contract: how every callback, measure, landscape and robustness evaluation gets a module's loss.

One resolver, :func:`resolve_objective`, used by the seven callbacks and the ``measure``/``landscape``/``robustness``
commands, so they all differentiate the same function the module trains on:

**Loss** (the batch-mean loss of one batch), first that applies:

1. an explicit ``batch_loss(module, batch)`` (a callback's argument);
2. an explicit ``loss_fn(module(x), y)`` (a callback's argument; ``(x, y)`` unpacked from the batch);
3. the module's ``curvature_loss(batch)``;
4. a flatlit family's ``training_loss(batch)`` (its first return value);
5. the module's callable ``loss_fn`` attribute, as ``loss_fn(module(x), y)``;
6. cross-entropy of ``module(x)`` against ``y``, only when the outputs are class logits (N, C ≥ 2) for integer
   targets (N,); otherwise one error at setup naming what to add.

**Logits and labels** (accuracy, margins, the norm bounds, adversarial robustness), first that applies: the module's
``outputs_and_targets(batch) -> (logits, labels) | None``; a flatlit family's ``accuracy_inputs(outputs, batch)``;
``(module(x), y)`` when the outputs are ≥ 2-class logits for integer labels. A one-logit head (N,) or (N, 1) with
labels in {0, 1} is binary: it becomes the two-class logits (0, z), so that argmax is ``sigmoid(z) > ½``, the
margin is ±z and cross-entropy is the logistic loss. ``None`` means the quantities do not apply (an autoencoder, a
language model without a hook): they are refused at setup, never a crash mid-run.

**Parameters**: :func:`select_parameters` takes ``None`` (every trainable parameter), a callable
``module -> iterable of parameters`` or ``fnmatch`` name patterns; :meth:`Objective.check` refuses parameters the
loss does not reach.

Everything that differentiates twice runs under :func:`twice_differentiable` (PyTorch's math attention kernel; an op
without a double backward is one error naming it).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flatlit.utils.errors import ConfigError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
BatchLossFn = Callable[[nn.Module, Any], torch.Tensor]
ParamsSpec = Callable[[nn.Module], Iterable[nn.Parameter]] | str | Sequence[str] | None
X_KEYS = ("x", "input", "inputs", "image", "images")
Y_KEYS = ("y", "target", "targets", "label", "labels")


def unpack_xy(batch: Any, owner: str) -> tuple[Any, Any]:
    """``(x, y)`` of a tuple/list batch (its first two items) or a dict batch (the usual keys)."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    if isinstance(batch, dict):
        xk = next((k for k in X_KEYS if k in batch), None)
        yk = next((k for k in Y_KEYS if k in batch), None)
        if xk is not None and yk is not None:
            return batch[xk], batch[yk]
        what = f"a dict with keys {sorted(map(str, batch))}"
    else:
        what = f"a {type(batch).__name__}" + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
    raise ConfigError(
        f"{owner}: cannot unpack a batch that is {what} into (inputs, targets). Pass {owner}(batch_loss=...), a "
        "callable batch_loss(pl_module, batch) returning the batch-mean loss, or define curvature_loss(self, batch) "
        "on the LightningModule."
    )


def shape_of(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    return type(value).__name__


def class_logits(outputs: Any, targets: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(logits (N, C ≥ 2), labels (N,))`` when ``outputs`` are class logits for integer ``targets``; a one-logit
    binary head ((N,) or (N, 1) with labels in {0, 1}, integer or float) as the two-class logits (0, z); else None."""
    if not isinstance(outputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
        return None
    if not outputs.is_floating_point() or targets.ndim != 1 or outputs.ndim not in (1, 2):
        return None
    if outputs.shape[0] != targets.shape[0]:
        return None
    if outputs.ndim == 2 and outputs.shape[1] >= 2:
        return None if targets.is_floating_point() else (outputs, targets)
    if not bool(((targets == 0) | (targets == 1)).all()):
        return None
    z = outputs.reshape(-1)
    return torch.stack([torch.zeros_like(z), z], dim=1), targets.long()


def cross_entropy_fits(out: Any, y: Any) -> bool:
    """Whether ``F.cross_entropy(out, y)`` is meaningful: class logits (N, C≥2, …) and class indices (N, …) or
    class probabilities of the same shape."""
    if not isinstance(out, torch.Tensor) or not isinstance(y, torch.Tensor) or out.ndim < 2 or out.shape[1] < 2:
        return False
    if y.is_floating_point():  # class probabilities: non-negative, summing to 1 over the class dimension
        return y.shape == out.shape and bool((y >= 0).all()) and bool(torch.allclose(y.sum(1), torch.ones(())))
    return y.ndim == out.ndim - 1 and y.shape[0] == out.shape[0]


def _is_flatlit_family(module: nn.Module) -> bool:
    from flatlit.methods.base import ClassificationModule

    return isinstance(module, ClassificationModule)


@dataclass
class Objective:
    """A module's loss (and, where they apply, its logits and labels) on any batch.

    The functions take the module as their first argument, so the same objective evaluates a copy (e.g. a
    BatchNorm-folded one) or the module under ``torch.func.functional_call``.

    Attributes:
        module: the module the objective was resolved for.
        loss_of: ``(module, batch) -> scalar`` batch-mean loss.
        logits_of: ``(module, batch) -> (logits (N, C ≥ 2), labels (N,)) | None``.
        source: what the loss is, for messages (e.g. ``MyModule.curvature_loss``).
        owner: who asked (a callback or command name), for messages.
        pair_loss_fn: the ``loss_fn(outputs, targets)`` when the loss is of that form (else None).
    """

    module: nn.Module
    loss_of: Callable[[nn.Module, Any], torch.Tensor]
    logits_of: Callable[[nn.Module, Any], tuple[torch.Tensor, torch.Tensor] | None]
    source: str
    owner: str
    pair_loss_fn: LossFn | None = None
    default_cross_entropy: bool = False

    def loss(self, batch: Any) -> torch.Tensor:
        """The batch-mean loss of the resolved module on ``batch``."""
        return self.loss_of(self.module, batch)

    def logits(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(logits, labels) of the resolved module on ``batch``, or None."""
        return self.logits_of(self.module, batch)

    def loss_and_logits(self, batch: Any) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """The loss and (logits, labels) of one batch with one forward pass where the loss is a flatlit family's
        ``training_loss`` or ``loss_fn(module(x), y)``; two (the loss, then :meth:`logits`) otherwise."""
        m = self.module
        if self.source.endswith(".training_loss") and not callable(getattr(m, "outputs_and_targets", None)):
            loss, outputs = m.training_loss(batch)
            pair = m.accuracy_inputs(outputs, batch)
            return loss, None if pair is None else class_logits(*pair)
        if "loss_fn" in self.source and not callable(getattr(m, "outputs_and_targets", None)):
            x, y = unpack_xy(batch, self.owner)
            out = m(x)
            fn = self.pair_loss_fn if self.pair_loss_fn is not None else m.loss_fn
            return fn(out, y), class_logits(out, y)
        return self.loss(batch), self.logits(batch)

    def check(self, batch: Any, params: Sequence[nn.Parameter] | None = None) -> torch.Tensor:
        """Evaluate the loss on one (moved) batch and refuse, with one line, what cannot work: a loss that fails,
        is not a scalar or (with ``params``) does not reach some of them; default cross-entropy on outputs that are
        not class logits. Returns the (detached) loss."""
        if self.default_cross_entropy:
            x, y = unpack_xy(batch, self.owner)
            out = _call(self.module, x, self.owner)
            if not cross_entropy_fits(out, y):
                raise ConfigError(
                    f"{self.owner}(loss_fn): cross-entropy (the default) cannot apply to outputs {shape_of(out)}, "
                    f"targets {shape_of(y)}; pass loss_fn (e.g. torch.nn.functional.mse_loss), give the module a "
                    "loss_fn(outputs, targets), or define curvature_loss(self, batch) on it."
                )
        try:
            with torch.enable_grad(), twice_differentiable(self.owner):
                loss = self.loss(batch)
        except ConfigError:
            raise
        except Exception as err:
            what = "failed on a training batch"
            if "loss_fn" in self.source:  # loss_fn(module(x), y): say what it was given
                x, y = unpack_xy(batch, self.owner)
                with torch.no_grad():
                    out = _call(self.module, x, self.owner)
                what = f"cannot be applied to outputs {shape_of(out)}, targets {shape_of(y)}"
            raise ConfigError(f"{self.source}: {what} ({type(err).__name__}: {err}).") from None
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ConfigError(
                f"{self.source}: must return the batch-mean loss as a scalar tensor, got {shape_of(loss)}."
            )
        if params is not None:
            if not loss.requires_grad:
                raise ConfigError(
                    f"{self.owner}(params): the loss ({self.source}) does not depend on any selected parameter."
                )
            grads = torch.autograd.grad(loss, list(params), allow_unused=True)
            unused = [_name(self.module, p) for p, g in zip(params, grads) if g is None]
            if unused:
                shown = ", ".join(unused[:5]) + (f" and {len(unused) - 5} more" if len(unused) > 5 else "")
                raise ConfigError(
                    f"{self.owner}(params): the loss ({self.source}) does not reach {shown}; leave them out with "
                    "params=... (a callable module -> parameters, or name patterns)."
                )
        return loss.detach()

    def require_logits(self, what: str, batch: Any) -> None:
        """One error naming ``what`` needs logits and labels (and the hook) when ``batch`` gives none."""
        try:
            with torch.no_grad():
                ok = self.logits(batch) is not None
        except ConfigError:
            ok = False
        if not ok:
            raise ConfigError(
                f"{self.owner}: {what} needs class logits and labels, which {type(self.module).__name__} does not "
                "give on its batches (they are not (inputs, integer labels) with class-logit outputs); define "
                "outputs_and_targets(self, batch) -> (logits, labels) on the module, or leave it out."
            )


def _name(module: nn.Module, p: nn.Parameter) -> str:
    return next((n for n, q in module.named_parameters() if q is p), "<unnamed parameter>")


def _call(module: nn.Module, x: Any, owner: str) -> Any:
    try:
        return module(x)
    except Exception as err:
        raise ConfigError(
            f"{owner}: the module's forward failed on the batch's inputs {shape_of(x)} ({type(err).__name__}: "
            f"{err}). If forward takes the whole batch, pass {owner}(batch_loss=...) or define "
            "curvature_loss(self, batch) on the LightningModule."
        ) from None


def resolve_objective(
    module: nn.Module,
    owner: str,
    batch_loss: BatchLossFn | None = None,
    loss_fn: LossFn | None = None,
) -> Objective:
    """The :class:`Objective` of ``module`` by the resolution order of this module's docstring."""
    name = type(module).__name__
    pair: LossFn | None = None
    default_ce = False
    if batch_loss is not None:
        loss_of, source = batch_loss, f"{owner}(batch_loss)"
    elif loss_fn is not None:
        pair, source = loss_fn, f"{owner}(loss_fn)"
    elif callable(getattr(module, "curvature_loss", None)):
        loss_of, source = (lambda m, batch: m.curvature_loss(batch)), f"{name}.curvature_loss"
    elif _is_flatlit_family(module):
        loss_of, source = (lambda m, batch: m.training_loss(batch)[0]), f"{name}.training_loss"
    elif callable(getattr(module, "loss_fn", None)):
        source = f"{name}.loss_fn"

        def loss_of(m: nn.Module, batch: Any) -> torch.Tensor:
            x, y = unpack_xy(batch, owner)
            return m.loss_fn(m(x), y)

    else:
        pair, source, default_ce = F.cross_entropy, f"{owner}(loss_fn)", True
    if pair is not None:
        pair_fn = pair

        def loss_of(m: nn.Module, batch: Any) -> torch.Tensor:
            x, y = unpack_xy(batch, owner)
            return pair_fn(m(x), y)

    return Objective(module, loss_of, _logits_fn(module, owner), source, owner, pair, default_ce)


def _logits_fn(module: nn.Module, owner: str) -> Callable[[nn.Module, Any], tuple[torch.Tensor, torch.Tensor] | None]:
    if callable(getattr(module, "outputs_and_targets", None)):

        def from_hook(m: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
            pair = m.outputs_and_targets(batch)
            return None if pair is None else class_logits(*pair)

        return from_hook
    if _is_flatlit_family(module):

        def from_family(m: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
            _, outputs = m.training_loss(batch)
            pair = m.accuracy_inputs(outputs, batch)
            return None if pair is None else class_logits(*pair)

        return from_family

    def from_pair(m: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        try:
            x, y = unpack_xy(batch, owner)
        except ConfigError:
            return None
        return class_logits(m(x), y)

    return from_pair


def select_parameters(
    module: nn.Module,
    params: ParamsSpec = None,
    exclude_bn: bool = False,
    exclude_bias: bool = False,
    owner: str = "params",
) -> list[nn.Parameter]:
    """The parameters a measurement differentiates: trainable ones by default, ``params(module)`` when callable, or
    those whose names match the ``fnmatch`` pattern(s); then without BatchNorm parameters / biases if asked. An
    empty selection is one error naming ``params``."""
    from flatlit.utils.nn import is_bn_param

    named = list(module.named_parameters())
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
    elif callable(params):
        ids = {id(p) for p in params(module)}
        chosen = [(n, p) for n, p in named if id(p) in ids]
    else:
        patterns = [params] if isinstance(params, str) else list(params)
        chosen = [(n, p) for n, p in named if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)]
    bn = is_bn_param(module) if exclude_bn else set()
    chosen = [(n, p) for n, p in chosen if id(p) not in bn and not (exclude_bias and n.endswith("bias"))]
    if not chosen:
        raise ConfigError(
            f"{owner}(params): selects no parameter of {type(module).__name__} (names: "
            f"{', '.join(n for n, _ in named[:6])}{', ...' if len(named) > 6 else ''}); pass a callable "
            "module -> parameters or name patterns such as 'discriminator.*'."
        )
    return [p for _, p in chosen]


_NO_DOUBLE_BACKWARD = re.compile(r"derivative for (\S+) is not implemented")


@contextmanager
def twice_differentiable(owner: str = "flatlit") -> Iterator[None]:
    """Run second-order autograd under PyTorch's math attention kernel (the fused CPU/GPU kernels of
    ``F.scaled_dot_product_attention`` have no double backward); an op without one becomes one ConfigError
    naming it and the fix."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    except RuntimeError as err:
        found = _NO_DOUBLE_BACKWARD.search(str(err))
        if found is None:
            raise
        raise ConfigError(
            f"{owner}: the loss uses {found.group(1).removeprefix('aten::')}, which PyTorch cannot differentiate "
            "twice; replace that op in the loss the measurement evaluates (e.g. a math implementation in "
            "curvature_loss(self, batch)) or measure without it."
        ) from None
