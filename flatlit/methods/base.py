"""The base classification LightningModule every optimizer family subclasses.

It owns the network (built from the model registry), the loss, torchmetrics accuracies and the logging contract:
``train/loss``, ``train/acc`` (epoch means over the training batches), ``val/loss``, ``val/acc``, ``gen_gap``
(= train/acc − val/acc, Jastrzebski/LPF-SGD convention), ``test/*`` and ``lr``. The base optimizer and scheduler
are injected callables (LightningCLI ``OptimizerCallable``/``LRSchedulerCallable``), so YAML picks any
``torch.optim``, timm or pytorch-optimizer class.
"""

from __future__ import annotations

import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from flatlit.errors import ConfigError
from flatlit.models import create_model


def _default_optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.01, momentum=0.9)


def _numpy_state_to_safe(state: tuple) -> tuple:
    """NumPy's RNG state with its key array as a tensor, so ``torch.load(weights_only=True)`` accepts it."""
    kind, keys, pos, has_gauss, gauss = state
    return kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)


class ClassificationModule(pl.LightningModule):
    """Image classification with an injected base optimizer; subclasses define how a training step optimizes.

    Args:
        arch: model name in the flatlit registry (``flatlit.models.list_models()``), or a timm/torchvision name.
        arch_kwargs: extra keyword arguments for the model builder (e.g. ``{width: 512, depth: 2}``).
        num_classes, in_channels, image_size: linked from the DataModule by the CLI.
        optimizer: base optimizer factory ``params -> Optimizer`` (default SGD lr 0.01, momentum 0.9).
        lr_scheduler: optional scheduler factory ``optimizer -> scheduler``.
        scheduler_interval: ``epoch`` or ``step``: when the scheduler steps.
        scheduler_monitor: metric that ReduceLROnPlateau watches.
        label_smoothing: cross-entropy label smoothing.
    """

    def __init__(
        self,
        arch: str = "lenet",
        arch_kwargs: dict[str, Any] | None = None,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        optimizer: OptimizerCallable = _default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: str = "epoch",
        scheduler_monitor: str = "val/loss",
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if scheduler_interval not in ("epoch", "step"):
            raise ConfigError(f"model.init_args.scheduler_interval: 'epoch' or 'step', got {scheduler_interval!r}.")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.model: nn.Module = create_model(
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def loss_fn(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)

    # ---- logging helpers --------------------------------------------------------------------------------------
    def log_train(
        self,
        loss: torch.Tensor,
        logits: torch.Tensor,
        y: torch.Tensor,
        extras: dict[str, torch.Tensor | float] | None = None,
    ) -> None:
        """Accumulate one batch's training loss, accuracy and family-specific scalars (``extras``, step means).

        Sums are kept as tensors and logged once per epoch after a single all-reduce (exact means over uneven
        shards, as torchmetrics does): a per-step ``self.log`` costs ~1 ms in Lightning, a measurable share of a
        small model's step.
        """
        n = y.numel()
        dev = loss.device
        vals = [
            loss.detach().float() * n,
            (logits.detach().argmax(-1) == y).sum().float(),
            torch.tensor(float(n), device=dev),
        ]
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
        self._epoch_train_acc = sums[1] / sums[2]
        self.log("train/loss", sums[0] / sums[2], on_step=False, on_epoch=True, prog_bar=True)
        self.log("train/acc", self._epoch_train_acc, on_step=False, on_epoch=True)
        for i, k in enumerate(keys):
            self.log(k, sums[3 + i] / sums[-1], on_step=False, on_epoch=True)
        opt = self.optimizers(use_pl_optimizer=False)
        opt = opt[0] if isinstance(opt, list) else opt
        self.log("lr", float(opt.param_groups[0]["lr"]), on_step=False, on_epoch=True)

    def on_train_epoch_start(self) -> None:
        self._train_sums = None
        self._epoch_train_acc = None

    def on_train_epoch_end(self) -> None:
        self._log_train_epoch()  # an epoch cut short (max_steps) still gets its training metrics

    def _eval_step(self, batch: Any, metric: MulticlassAccuracy, prefix: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        metric.update(logits, y)
        self.log(f"{prefix}/loss", loss, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=len(y))
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, self.val_acc, "val")

    def on_validation_epoch_end(self) -> None:
        acc = self.val_acc.compute()
        self.val_acc.reset()
        self.log("val/acc", acc, prog_bar=True)
        if not self.trainer.sanity_checking and self.trainer.state.fn == "fit" and self._epoch_train_acc is not None:
            # validation runs after the epoch's last training batch, so the training accuracy covers the epoch
            self.log("gen_gap", self._epoch_train_acc - acc)

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, self.test_acc, "test")

    def on_test_epoch_end(self) -> None:
        self.log("test/acc", self.test_acc.compute())
        self.test_acc.reset()

    # ---- exact resume ----------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the RNG states (dropout, noise draws) so a resumed run continues the same random stream."""
        checkpoint["flatlit_rng"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": _numpy_state_to_safe(np.random.get_state()),
            "python": random.getstate(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("flatlit_rng")
        if not state:
            return
        torch.set_rng_state(state["torch"])
        if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        random.setstate(state["python"])

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
