"""The base classification LightningModule every optimizer family subclasses.

It owns the network (built from the model registry), the loss, torchmetrics accuracies and the logging contract:
``train/loss``, ``train/acc`` (epoch means over the training batches), ``val/loss``, ``val/acc``, ``gen_gap``
(= train/acc − val/acc, Jastrzebski/LPF-SGD convention), ``test/*`` and ``lr``. The base optimizer and scheduler
are injected callables (LightningCLI ``OptimizerCallable``/``LRSchedulerCallable``), so YAML picks any
``torch.optim``, timm or pytorch-optimizer class.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from flatlit.errors import ConfigError
from flatlit.models import create_model


def _default_optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.01, momentum=0.9)


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
        self.model: nn.Module = create_model(arch, num_classes=num_classes, in_channels=in_channels,
                                             image_size=image_size, **(arch_kwargs or {}))
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def loss_fn(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)

    # ---- logging helpers --------------------------------------------------------------------------------------
    def log_train(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        """Log the clean training loss, training accuracy and LR as epoch means (DDP-synced via torchmetrics)."""
        self.train_acc.update(logits.detach(), y)
        self.log("train/loss", loss.detach(), on_step=False, on_epoch=True, prog_bar=True, sync_dist=True,
                 batch_size=len(y))
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        opt = self.optimizers(use_pl_optimizer=False)
        opt = opt[0] if isinstance(opt, list) else opt
        self.log("lr", float(opt.param_groups[0]["lr"]), on_step=False, on_epoch=True, batch_size=1)

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
        if not self.trainer.sanity_checking and self.trainer.state.fn == "fit" and self.train_acc.update_count:
            # validation runs after the epoch's last training batch, so train_acc covers the whole epoch
            self.log("gen_gap", self.train_acc.compute() - acc)

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, self.test_acc, "test")

    def on_test_epoch_end(self) -> None:
        self.log("test/acc", self.test_acc.compute())
        self.test_acc.reset()

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
