"""The base LightningModule every optimizer family subclasses: image classification by default, any task by override.

It owns the network (built from the model registry), the loss, torchmetrics accuracies and the logging contract:
``train/loss``, ``train/acc`` (epoch means over the training batches), ``val/loss``, ``val/acc``, ``gen_gap``
(= train/acc − val/acc, Jastrzebski/LPF-SGD convention), ``test/*`` and ``lr``. The base optimizer and scheduler
are injected callables (LightningCLI ``OptimizerCallable``/``LRSchedulerCallable``), so YAML picks any
``torch.optim``, timm or pytorch-optimizer class.

Every family takes its losses from one method, :meth:`ClassificationModule.training_loss` ``(batch) -> (loss,
outputs)``, so another task (regression, sequence models, dict batches) gets SGD, SAM, LPF-SGD, SmoothOut or
Entropy-SGD by overriding it (and :meth:`~ClassificationModule.accuracy_inputs` for the accuracy metrics); see
``flatlit.tasks.seq2seq`` and the README's recipe.
"""

from __future__ import annotations

import os
import random
import warnings
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from flatlit.models import create_model
from flatlit.utils.batching import batch_size
from flatlit.utils.errors import ConfigError, DivergenceError

LOSSES = ("cross_entropy", "mse")


def mse_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cohen et al. 2021's square loss: ``0.5 * mean_i sum_c (logits[i, c] - onehot(y)[i, c])**2``."""
    target = F.one_hot(y, logits.shape[-1]).to(logits.dtype)
    return 0.5 * (logits - target).pow(2).sum(-1).mean()


# Console noise that says nothing to a flatlit user: the epoch metrics below are reduced over ranks before they
# are logged (so Lightning's sync_dist advice does not apply), flatlit logs per epoch (so the per-step logging
# interval is irrelevant), and Lightning's own pytree deprecation is not the user's to fix.
_PRE_REDUCED = r"(train/|lr'|gen_gap'|val/acc'|test/acc')"
warnings.filterwarnings("ignore", message=r"It is recommended to use `self\.log\('" + _PRE_REDUCED)
warnings.filterwarnings("ignore", message=r"The number of training batches .* is smaller than the logging interval")
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


def _default_optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.01, momentum=0.9)


def _numpy_state_to_safe(state: tuple) -> tuple:
    """NumPy's RNG state with its key array as a tensor, so ``torch.load(weights_only=True)`` accepts it."""
    kind, keys, pos, has_gauss, gauss = state
    return kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)


class ClassificationModule(pl.LightningModule):
    """Image classification with an injected base optimizer; subclasses define how a training step optimizes.

    Other tasks override :meth:`training_loss` (the batch-mean loss and the outputs of any batch: tuples, dicts)
    and :meth:`accuracy_inputs` (what the accuracy metrics see, or None); every family and the validation and
    test steps call only these two.

    Args:
        arch: model name in the flatlit registry (``flatlit.models.list_models()``), a timm/torchvision name, or an
            ``nn.Module`` (in YAML: a ``class_path``/``init_args`` block) used as the network as it is.
        arch_kwargs: extra keyword arguments for the model builder (e.g. ``{width: 512, depth: 2}``).
        num_classes, in_channels, image_size: linked from the DataModule by the CLI.
        optimizer: base optimizer factory ``params -> Optimizer`` (default SGD lr 0.01, momentum 0.9).
        lr_scheduler: optional scheduler factory ``optimizer -> scheduler``.
        scheduler_interval: ``epoch`` or ``step``: when the scheduler steps.
        scheduler_monitor: metric that ReduceLROnPlateau watches.
        label_smoothing: cross-entropy label smoothing (``loss: cross_entropy`` only).
        loss: ``cross_entropy`` or ``mse``, the square loss of Cohen et al. 2021 (edge of stability):
            ``0.5 * mean over examples of sum over classes of (logit - onehot)**2``. Training, validation, test
            and the curvature callbacks all use this loss (:meth:`loss_fn`).
        stop_on_nonfinite: stop the run at the first non-finite training loss or gradient, before that step is
            taken: a checkpoint of the last finite state is saved and :class:`~flatlit.utils.errors.DivergenceError`
            names the step, the epoch and the last finite loss (``flatlit fit`` prints it as one line, exit code
            2). ``false`` keeps training (the NaN values are logged).
    """

    def __init__(
        self,
        arch: str | nn.Module = "lenet",
        arch_kwargs: dict[str, Any] | None = None,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        optimizer: OptimizerCallable = _default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: str = "epoch",
        scheduler_monitor: str = "val/loss",
        label_smoothing: float = 0.0,
        loss: str = "cross_entropy",
        stop_on_nonfinite: bool = True,
    ) -> None:
        super().__init__()
        if scheduler_interval not in ("epoch", "step"):
            raise ConfigError(f"model.init_args.scheduler_interval: 'epoch' or 'step', got {scheduler_interval!r}.")
        if loss not in LOSSES:
            raise ConfigError(f"model.init_args.loss: one of {', '.join(LOSSES)}, got {loss!r}.")
        if loss != "cross_entropy" and label_smoothing > 0:
            raise ConfigError(
                f"model.init_args.label_smoothing: applies to the cross-entropy loss only; set it to 0 with "
                f"loss {loss!r}."
            )
        linked = sorted(set(arch_kwargs or {}) & {"num_classes", "in_channels", "image_size"})
        if linked:
            raise ConfigError(
                f"model.init_args.arch_kwargs: {', '.join(linked)} come from model.init_args (linked from the data); "
                f"remove them from arch_kwargs."
            )
        if isinstance(arch, nn.Module):
            if arch_kwargs:
                raise ConfigError("model.init_args.arch_kwargs: only for a registered model name; arch is a module.")
            self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "arch"])
            self.model: nn.Module = arch
        else:
            self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
            self.model = create_model(
                arch,
                num_classes=num_classes,
                in_channels=in_channels,
                image_size=image_size,
                **(arch_kwargs or {}),
            )
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.val_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
        self.test_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
        self._train_sums: torch.Tensor | None = None
        self._train_keys: list[str] = []
        self._epoch_train_acc: torch.Tensor | None = None
        self._step_loss: torch.Tensor | None = None
        self._last_finite: tuple[torch.Tensor, int] | None = None

    def setup(self, stage: str) -> None:
        if stage == "fit" and getattr(self.trainer, "limit_val_batches", None) == 0:
            # validation is off on purpose: a checkpoint monitoring val/* cannot find its key, as expected
            warnings.filterwarnings("ignore", message=r"`ModelCheckpoint\(monitor='val/")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def training_loss(self, batch: Any) -> tuple[torch.Tensor, Any]:
        """The batch-mean loss of ``batch`` and the outputs it came from: the one place every family (each of SAM's,
        LPF-SGD's and SmoothOut's passes), validation and test get a loss. Default: ``x, y = batch`` and
        :meth:`loss_fn` of ``self(x)``. Override it for another task; chunked families split every tensor of a
        batch along dim 0 (:func:`flatlit.utils.batching.split_batch`) and weight chunks by
        :func:`flatlit.utils.batching.batch_size`, so the loss must be a mean over the leading dimension's examples."""
        x, y = batch
        logits = self(x)
        return self.loss_fn(logits, y), logits

    def accuracy_inputs(self, outputs: Any, batch: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(logits (N, C), integer targets (N,)) for the accuracy metrics, or None for a task without accuracy
        (``train/acc``, ``val/acc`` and ``gen_gap`` are then not logged). Default: ``(outputs, batch[1])``."""
        return outputs, batch[1]

    def loss_fn(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The batch-mean training loss of ``logits`` against integer labels ``y`` (``loss`` hyperparameter)."""
        if self.hparams.get("loss", "cross_entropy") == "mse":
            return mse_loss(logits, y)
        return F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)

    # ---- logging helpers --------------------------------------------------------------------------------------
    def log_train(
        self,
        loss: torch.Tensor,
        outputs: Any,
        batch: Any,
        extras: dict[str, torch.Tensor | float] | None = None,
    ) -> None:
        """Accumulate one batch's training loss, accuracy (:meth:`accuracy_inputs`) and family-specific scalars
        (``extras``, step means).

        Sums are kept as tensors and logged once per epoch after a single all-reduce (exact means over uneven
        shards, as torchmetrics does): a per-step ``self.log`` costs ~1 ms in Lightning, a measurable share of a
        small model's step.
        """
        n = batch_size(batch)
        dev = loss.device
        self._step_loss = loss.detach()
        acc = self.accuracy_inputs(outputs, batch)
        if acc is None:
            correct, counted = torch.full((), float("nan"), device=dev), torch.zeros((), device=dev)
        else:
            logits, y = acc
            correct = (logits.detach().argmax(-1) == y).sum().float()
            counted = torch.tensor(float(y.numel()), device=dev)
        vals = [loss.detach().float() * n, correct, torch.tensor(float(n), device=dev), counted]
        keys = sorted(extras) if extras else []
        vals += [torch.as_tensor(extras[k], dtype=torch.float32, device=dev).detach().reshape(()) for k in keys]
        vals.append(torch.ones((), device=dev))
        stats = torch.stack(vals)
        if self._train_sums is None or self._train_keys != keys:
            self._train_sums, self._train_keys = stats, keys
        else:
            self._train_sums = self._train_sums + stats
        if self.trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self._log_train_epoch()

    def _log_train_epoch(self) -> None:
        if self._train_sums is None:
            return
        sums = self.trainer.strategy.reduce(self._train_sums, reduce_op="sum")
        keys, self._train_sums = self._train_keys, None
        self.log("train/loss", sums[0] / sums[2], on_step=False, on_epoch=True, prog_bar=True)
        if torch.isfinite(sums[1]):  # a task with accuracy
            self._epoch_train_acc = sums[1] / sums[3]
            self.log("train/acc", self._epoch_train_acc, on_step=False, on_epoch=True)
        for i, k in enumerate(keys):
            self.log(k, sums[4 + i] / sums[-1], on_step=False, on_epoch=True)
        opt = self.optimizers(use_pl_optimizer=False)
        opt = opt[0] if isinstance(opt, list) else opt
        self.log("lr", float(opt.param_groups[0]["lr"]), on_step=False, on_epoch=True)

    def on_train_epoch_start(self) -> None:
        self._train_sums = None
        self._epoch_train_acc = None

    def on_train_epoch_end(self) -> None:
        self._log_train_epoch()  # an epoch cut short (max_steps) still gets its training metrics

    def _eval_step(self, batch: Any, metric: MulticlassAccuracy, prefix: str) -> torch.Tensor:
        loss, outputs = self.training_loss(batch)
        acc = self.accuracy_inputs(outputs, batch)
        if acc is not None:
            metric.update(*acc)
        self.log(f"{prefix}/loss", loss, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=batch_size(batch))
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, self.val_acc, "val")

    def on_validation_epoch_end(self) -> None:
        if not self.val_acc.update_called:  # a task without accuracy
            return
        acc = self.val_acc.compute()
        self.val_acc.reset()
        self.log("val/acc", acc, prog_bar=True)
        if not self.trainer.sanity_checking and self.trainer.state.fn == "fit" and self._epoch_train_acc is not None:
            # validation runs after the epoch's last training batch, so the training accuracy covers the epoch
            self.log("gen_gap", self._epoch_train_acc - acc)

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, self.test_acc, "test")

    def on_test_epoch_end(self) -> None:
        if not self.test_acc.update_called:
            return
        self.log("test/acc", self.test_acc.compute())
        self.test_acc.reset()

    # ---- divergence -------------------------------------------------------------------------------------------
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Check the step about to be taken (automatic and manual optimization alike)."""
        self.check_finite()

    def check_finite(self) -> None:
        """Stop at the first non-finite training loss or gradient, before the optimizer steps with it.

        The gradient is checked after the DDP all-reduce, so every rank decides alike; the local loss is checked
        too in a single process (under DDP a non-finite loss shows in the reduced gradient). On failure the
        gradients are dropped (the step is a no-op), a checkpoint of the current, last finite, state is written
        and :class:`~flatlit.utils.errors.DivergenceError` is raised.
        """
        if not self.hparams.get("stop_on_nonfinite", True):
            return
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else torch.zeros(())
        loss = self._step_loss
        ok = torch.isfinite(norm)
        if loss is not None and self.trainer.world_size == 1:
            ok = ok & torch.isfinite(loss)
        if bool(ok):
            if loss is not None:
                self._last_finite = (loss, self.global_step)
            return
        if self.grad_scaler() is not None and (loss is None or bool(torch.isfinite(loss))):
            return  # fp16 overflow of the scaled gradient: the GradScaler skips this step and lowers its scale
        for p in self.parameters():
            p.grad = None
        path = self._save_last_finite()
        what = f"training loss {float(loss):.4g}" if loss is not None and not torch.isfinite(loss) else "gradient"
        last = "none"
        if self._last_finite is not None:
            last = f"{float(self._last_finite[0]):.6g} at step {self._last_finite[1]}"
        raise DivergenceError(
            f"non-finite {what} at step {self.global_step} (epoch {self.current_epoch}); the last finite training "
            f"loss was {last}. The state before this step is saved in {path}. Lower the learning rate or clip "
            f"the gradients, or set model.init_args.stop_on_nonfinite: false to keep going."
        )

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """The loss scaler of ``16-mixed`` precision (None otherwise)."""
        if self._trainer is None:
            return None
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        return scaler if scaler is not None and scaler.is_enabled() else None

    def loss_scale(self) -> float:
        """The factor every backward pass is multiplied by under ``16-mixed`` (1 otherwise)."""
        scaler = self.grad_scaler()
        return 1.0 if scaler is None else float(scaler.get_scale())

    def _save_last_finite(self) -> str:
        trainer = self.trainer
        folder = None
        for cb in trainer.checkpoint_callbacks:
            folder = getattr(cb, "dirpath", None) or folder
        if folder is None:
            folder = os.path.join(trainer.log_dir or trainer.default_root_dir, "checkpoints")
        path = os.path.join(folder, f"last-finite-step{self.global_step}.ckpt")
        trainer.save_checkpoint(path, weights_only=False)  # on every rank (it gathers the resume state); rank 0 writes
        return path

    # ---- exact resume ----------------------------------------------------------------------------------------
    def resume_state(self) -> dict[str, Any]:
        """This process's state that a checkpoint must carry for an exact resume from any step.

        The RNG streams (dropout, augmentation, noise draws) and the partial epoch's training-metric sums (a
        checkpoint taken mid-epoch must not lose the batches already seen). Subclasses extend it.
        """
        sums = self._train_sums
        return {
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "numpy": _numpy_state_to_safe(np.random.get_state()),
                "python": random.getstate(),
            },
            "train_sums": None if sums is None else sums.detach().cpu(),
            "train_keys": list(self._train_keys),
        }

    def load_resume_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`resume_state` saved."""
        rng = state.get("rng")
        if rng:
            torch.set_rng_state(rng["torch"])
            if rng.get("cuda") and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(rng["cuda"])
            kind, keys, pos, has_gauss, gauss = rng["numpy"]
            np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
            random.setstate(rng["python"])
        if state.get("train_sums") is not None:
            self._train_sums = state["train_sums"].to(self.device)
            self._train_keys = list(state.get("train_keys", []))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store every rank's :meth:`resume_state` (gathered: Lightning calls this hook on all ranks and only
        rank 0 writes), so each rank of a resumed DDP run continues its own random streams and sums."""
        local = self.resume_state()
        states = [local]
        if self._trainer is not None and self.trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            states = [None] * dist.get_world_size()
            dist.all_gather_object(states, local)
        checkpoint["flatlit_resume"] = states

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("flatlit_resume")
        if not states:
            legacy = checkpoint.get("flatlit_rng")  # checkpoints of flatlit 0.1
            states = [{"rng": legacy}] if legacy else []
        if not states:
            return
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self._trainer is not None else (0, 1)
        if len(states) != world:
            rank_zero_warn(
                f"flatlit: the checkpoint was written by {len(states)} process(es) and this run has {world}; random "
                "streams and partial-epoch metric sums are restored from rank 0's, so the resume is not exact."
            )
            rank = 0
        self.load_resume_state(states[rank])

    # ---- optimizers -------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        config = {"scheduler": scheduler, "interval": self.hparams.scheduler_interval}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = self.hparams.scheduler_monitor
        return {"optimizer": optimizer, "lr_scheduler": config}
