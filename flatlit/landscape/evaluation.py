"""The loss and accuracy functions the landscape evaluators take from a module's resolved objective.

:func:`evaluation_functions` turns an :class:`~flatlit.objective.Objective` (:func:`flatlit.objective.
resolve_objective`) into the ``batch_loss`` and ``logits_fn`` arguments of :func:`~flatlit.landscape.compute_surface`,
:func:`~flatlit.landscape.robustness.weight_noise_robustness` and the others, after finding out on one batch whether
the module gives class logits at all: where it does not (an autoencoder, a language model without a hook), there is
no accuracy (``logits_fn`` None, NaN accuracies, no accuracy axis), never a crash mid-run.

A flatlit family whose loss is its ``training_loss`` (no ``curvature_loss``/``outputs_and_targets`` hook) gets its
loss and its accuracy from one forward pass per batch: the outputs of the loss evaluation are reused for
``accuracy_inputs`` when the accuracy of the same batch is asked next (as every evaluator here does), without grad.
The numbers are those of the objective's ``loss_of`` and ``logits_of``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from flatlit.objective import Objective, class_logits
from flatlit.utils.errors import ConfigError

BatchLossFn = Callable[[nn.Module, Any], torch.Tensor]
LogitsFn = Callable[[nn.Module, Any], tuple[torch.Tensor, torch.Tensor] | None]


@dataclass
class EvaluationFunctions:
    """``batch_loss(model, batch)``, ``logits_fn(model, batch)`` (None: no accuracy) and, when there is no
    accuracy, why (one sentence)."""

    batch_loss: BatchLossFn
    logits_fn: LogitsFn | None
    no_accuracy: str | None = None


class _SharedForward:
    """A flatlit family's ``training_loss`` and ``accuracy_inputs`` from one forward pass per batch (no grad)."""

    def __init__(self) -> None:
        self._last: tuple[nn.Module, Any, Any] | None = None

    def loss(self, module: nn.Module, batch: Any) -> torch.Tensor:
        loss, outputs = module.training_loss(batch)
        self._last = None if torch.is_grad_enabled() else (module, batch, outputs)
        return loss

    def logits(self, module: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        last, self._last = self._last, None
        if last is not None and last[0] is module and last[1] is batch:
            outputs = last[2]
        else:
            _, outputs = module.training_loss(batch)
        pair = module.accuracy_inputs(outputs, batch)
        return None if pair is None else class_logits(*pair)


def _has_logits_hook(module: nn.Module) -> bool:
    from flatlit.methods.base import ClassificationModule

    return callable(getattr(module, "outputs_and_targets", None)) or isinstance(module, ClassificationModule)


def evaluation_functions(objective: Objective, batch: Any, module: nn.Module | None = None) -> EvaluationFunctions:
    """The loss and (where they apply) logits of ``objective`` for the landscape evaluators, with the accuracy
    probed on one (moved) ``batch`` of ``module`` (default the objective's), without grad, in evaluation mode, the
    module left as it was.

    Logits that a hook of the module gives (``outputs_and_targets``, a flatlit family's ``accuracy_inputs``) must
    evaluate: a failing hook is one ConfigError naming the objective's owner. Without such a hook the accuracy is
    that of ``(module(x), y)`` when those are class logits for integer labels, else there is none.
    """
    from flatlit.sharpness.base import observed

    module = objective.module if module is None else module
    name = type(module).__name__
    try:
        with observed(module), torch.no_grad():
            module.eval()
            pair = objective.logits_of(module, batch)
    except Exception as err:
        if _has_logits_hook(module):
            raise ConfigError(
                f"{objective.owner}: the logits and labels of {name} (for the accuracy) failed on a batch "
                f"({type(err).__name__}: {err})."
            ) from None
        pair = None
    loss_of: BatchLossFn = objective.loss_of
    logits_of: LogitsFn | None = objective.logits_of
    own = type(objective.module).__name__
    if objective.source == f"{own}.training_loss" and not callable(getattr(module, "outputs_and_targets", None)):
        shared = _SharedForward()
        loss_of, logits_of = shared.loss, shared.logits
    if pair is None:
        reason = (
            f"{name} gives no class logits and integer labels on its batches (no accuracy; define "
            "outputs_and_targets(self, batch) -> (logits, labels) on the module to get one)"
        )
        return EvaluationFunctions(objective.loss_of, None, reason)
    return EvaluationFunctions(loss_of, logits_of)
