"""Generalization targets measured on the final network, and the "fit the training set" stopping rules.

The training metrics a LightningModule logs (``train/loss``, ``train/acc``) are running means over an epoch of
changing weights in train mode (dropout on, BatchNorm batch statistics, augmentation). Flat-minima studies define the
generalization gap, and stop training, on the network itself: one pass over the full training split in eval mode
(SPEC F19, F56): Jiang et al. 2020, "Fantastic generalization measures and where to find them" (arXiv 1912.02178)
and the LPF-SGD sharpness-vs-generalization grid stop at training cross-entropy ≤ 0.01; Neyshabur et al. 2017,
"Exploring generalization in deep learning" (arXiv 1706.08947) stop at training error ≤ 1 %.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch.utils.data import DataLoader, IterableDataset, Subset
from typing_extensions import override

from flatlit.callbacks.history import HistoryCSV
from flatlit.curvature.hvp import evaluation_mode
from flatlit.objective import BatchLossFn, Objective, resolve_objective
from flatlit.utils.batching import batch_size
from flatlit.utils.errors import ConfigError
from flatlit.utils.nn import preserved_rng, rank0_buffers

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class GeneralizationTargets(Callback):
    """Final train/test loss and accuracy over the full splits in eval mode, the generalization gap, and the
    stopping rules of the flat-minima studies.

    At the end of ``fit`` the network is evaluated, in eval mode (BatchNorm running statistics, dropout off) and
    under the evaluation transform, on every example of the training split as trained on (subset, noisy labels,
    fixed input noise) and of the test split. It logs ``final/train_loss``, ``final/train_acc``,
    ``final/test_loss``, ``final/test_acc``, ``final/gen_gap_acc`` (= train_acc − test_acc) and
    ``final/gen_gap_loss`` (= test_loss − train_loss) to every logger (at the last step), adds them to the last row
    of ``history.csv`` and writes them with the run's epoch/step and convergence to ``final_metrics.json`` in the
    run directory. The loss is the module's own, resolved as everywhere in flatlit (:mod:`flatlit.objective`): the
    ``batch_loss`` argument, else the ``loss_fn`` argument, else the module's ``curvature_loss(batch)``, a flatlit
    family's ``training_loss``, the module's ``loss_fn`` (label smoothing or the square loss included), else
    cross-entropy on class logits. Accuracy needs class logits and labels: the module's
    ``outputs_and_targets(batch)``, a flatlit family's ``accuracy_inputs`` or ``(module(x), y)`` with ≥ 2-class
    logits (a one-logit head is binary: correct when ``sigmoid(z) > ½`` matches the label); without them (an
    autoencoder, a language model without the hook) only the loss metrics are logged.

    Stopping rule: every ``every_n_epochs`` epochs the full training split is evaluated the same way (logged as
    ``full_train/loss`` and ``full_train/acc``); the first time the loss is ≤ ``stop_loss`` or the error
    (1 − accuracy) is ≤ ``stop_error``, the state is saved as ``converged.ckpt`` (next to the ModelCheckpoint's files,
    else in ``<log_dir>/checkpoints``) and training stops (``stop=True``; Lightning's ``min_epochs``/``min_steps``
    still apply). The rule compares exactly the values logged: the float64 means ``full_train/loss`` (Σ batch-mean
    loss · batch size / n, summed in float64) and ``1 − full_train/acc`` (correct / labelled), logged as float64
    tensors so that Lightning keeps them unrounded and ``history.csv`` holds them exactly (not rounded to float32); a
    threshold copied from ``history.csv`` fires at that very epoch.

    Observe, never perturb: the evaluation runs under ``torch.no_grad`` on separate batches (the training loader is
    never iterated), every module's train flag, the BatchNorm buffers and the torch/NumPy/Python RNG states are
    restored, so a run with this callback is bit-identical to one without it until it stops. Under DDP each rank
    evaluates its share of the examples (no padding) with rank 0's buffers (the network its checkpoints hold; its
    own are restored after) and the sums (loss·n, correct, n) are all-reduced: every rank sees the same exact means
    and takes the same decision.

    Args:
        stop_loss: stop once the full-pass training loss is ≤ this value (e.g. 0.01); None: no loss rule.
        stop_error: stop once the full-pass training error is ≤ this fraction (e.g. 0.01 for 1 %); None: no rule.
        every_n_epochs: check the rule (and log ``full_train/*``) every n epochs; default 1 when a rule is set,
            else never (only the final evaluation runs).
        stop: stop training when the rule is met; False only saves ``converged.ckpt`` and keeps training.
        test: also evaluate the test split at the end (the ``final/test_*`` and gap values).
        batch_size: evaluation batch size (default: the DataModule's ``eval_batch_size``, else 256).
        loss_fn: ``loss_fn(module(x), y)``, the batch-mean loss (see the loss order above).
        batch_loss: ``batch_loss(module, batch)``, the batch-mean loss of any batch (takes precedence).
        save_final: also save the final state as ``final.ckpt`` (``flatlit sweep`` measures it).
        filename: name of the JSON file written in the run directory.
        loss_milestones: full-pass training losses (e.g. ``[0.1, 0.01]``) whose first crossing is recorded: the
            epoch and global step of the first check at which ``full_train/loss`` ≤ the value, logged once as
            ``optimization/steps_to_loss_<value>`` and written to ``final_metrics.json`` as ``loss_milestones``.
            These are Jiang et al. 2019's optimization-based measures (arXiv 1912.02178, §C.8: steps to reach
            cross-entropy 0.1, steps from 0.1 to 0.01), which ``flatlit measure --preset jiang2019`` reads from the
            run. Resolution: the checks, every ``every_n_epochs`` epochs (default 1 when milestones are set), at
            epoch ends; Jiang et al. count iterations.

    Raises:
        ConfigError: a threshold outside [0, ∞) / [0, 1], a negative loss milestone, or ``every_n_epochs`` < 1 (at
            construction); a loss that
            cannot be evaluated on a training batch, or ``stop_error`` without class logits (at setup).

    With a flatlit DataModule the batches come from ``datamodule.evaluation_batches``; with another DataModule, the
    training loader's dataset is read through an unshuffled loader (its transform, which may augment) and the test
    split from ``test_dataloader()``. State (convergence epoch and step) is kept in checkpoints: a run resumed after
    its convergence stops at once, and one resumed from a checkpoint written before the epoch's check re-checks.

    Example::

        trainer = Trainer(callbacks=[GeneralizationTargets(stop_loss=0.01)])
    """

    def __init__(
        self,
        stop_loss: float | None = None,
        stop_error: float | None = None,
        every_n_epochs: int | None = None,
        stop: bool = True,
        test: bool = True,
        batch_size: int | None = None,
        loss_fn: LossFn | None = None,
        save_final: bool = False,
        filename: str = "final_metrics.json",
        batch_loss: BatchLossFn | None = None,
        loss_milestones: list[float] | None = None,
    ) -> None:
        if stop_loss is not None and not stop_loss >= 0:
            raise ConfigError(f"GeneralizationTargets(stop_loss): must be >= 0 or None, got {stop_loss}.")
        if stop_error is not None and not 0 <= stop_error <= 1:
            raise ConfigError(f"GeneralizationTargets(stop_error): must lie in [0, 1] or be None, got {stop_error}.")
        if every_n_epochs is not None and every_n_epochs < 1:
            raise ConfigError(f"GeneralizationTargets(every_n_epochs): must be >= 1 or None, got {every_n_epochs}.")
        if batch_size is not None and batch_size < 1:
            raise ConfigError(f"GeneralizationTargets(batch_size): must be >= 1 or None, got {batch_size}.")
        milestones = [float(v) for v in (loss_milestones or [])]
        if any(not v >= 0 for v in milestones):
            raise ConfigError(f"GeneralizationTargets(loss_milestones): losses must be >= 0, got {loss_milestones}.")
        self.loss_milestones = sorted(set(milestones), reverse=True)
        self.milestones: dict[str, dict[str, int]] = {}  # milestone (as text) -> {"epoch", "step"} first reached
        checks = stop_loss is not None or stop_error is not None or bool(milestones)
        self.stop_loss, self.stop_error, self.stop, self.test = stop_loss, stop_error, stop, test
        self.every_n_epochs = every_n_epochs if every_n_epochs is not None else (1 if checks else None)
        self.batch_size, self.loss_fn, self.save_final, self.filename = batch_size, loss_fn, save_final, filename
        self.batch_loss = batch_loss
        self.converged: dict[str, int] | None = None  # {"epoch", "step"} of the first time the rule held
        self.final_metrics: dict[str, Any] | None = None
        self._last: tuple[int, dict[str, float]] | None = None  # (global_step, train metrics) of the last pass
        self._train_ended = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(stop_loss=self.stop_loss, stop_error=self.stop_error)

    @property
    def has_rule(self) -> bool:
        return self.stop_loss is not None or self.stop_error is not None

    # ---- evaluation ---------------------------------------------------------------------------------------------
    def _batches(self, trainer: pl.Trainer, split: str, distributed: bool = True) -> Iterable[Any]:
        rank, world = (trainer.global_rank, trainer.world_size) if distributed else (0, 1)
        dm = trainer.datamodule
        if dm is not None and callable(getattr(dm, "evaluation_batches", None)):
            return dm.evaluation_batches(split, self.batch_size, rank, world)
        size = self.batch_size or 256
        if split == "test":
            if dm is None:
                raise ConfigError(
                    "GeneralizationTargets(test): needs a DataModule with test_dataloader(); or test=False."
                )
            dm.setup("test")
            return dm.test_dataloader()  # a DistributedSampler may pad the last batch of some ranks
        loader = dm.train_dataloader() if dm is not None else trainer.fit_loop._data_source.dataloader()
        if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
            raise ConfigError(
                "GeneralizationTargets: the training data is not a map-style Dataset behind a DataLoader, so the "
                "full split cannot be read in order; give the DataModule an evaluation_batches(split, batch_size, "
                "rank, world_size) method."
            )
        subset = Subset(loader.dataset, list(range(len(loader.dataset)))[rank::world])
        return DataLoader(subset, batch_size=size, shuffle=False, collate_fn=loader.collate_fn)

    def objective(self, pl_module: pl.LightningModule) -> Objective:
        """The module's loss and logits by flatlit's one resolution order (:mod:`flatlit.objective`)."""
        return resolve_objective(pl_module, "GeneralizationTargets", self.batch_loss, self.loss_fn)

    def evaluate(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, split: str, distributed: bool = True
    ) -> dict[str, float]:
        """``{"loss", "acc", "n"}`` of ``split`` (``acc`` only where the module gives class logits): exact means of
        sums all-reduced over the ranks (a collective), or of this process's pass over the whole split when not
        ``distributed``."""
        objective = self.objective(pl_module)
        device = pl_module.device
        sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss·n, correct, n, n with labels
        with preserved_rng(), evaluation_mode(pl_module), torch.no_grad(), rank0_buffers(pl_module, distributed):
            for batch in self._batches(trainer, split, distributed):
                batch = trainer.precision_plugin.convert_input(pl_module.transfer_batch_to_device(batch, device, 0))
                with trainer.precision_plugin.forward_context():
                    loss, pair = objective.loss_and_logits(batch)
                n = float(batch_size(batch))
                correct, labelled = 0.0, 0.0
                if pair is not None:
                    logits, labels = pair
                    correct, labelled = float((logits.argmax(1) == labels).sum()), float(labels.numel())
                sums += torch.tensor(
                    [float(loss.double()) * n, correct, n, labelled], dtype=torch.float64, device=device
                )
        if distributed:
            sums = trainer.strategy.reduce(sums, reduce_op="sum")
        n = float(sums[2])
        if n == 0:
            raise ConfigError(f"GeneralizationTargets: the {split} split is empty.")
        out = {"loss": float(sums[0]) / n, "n": n}
        if float(sums[3]) > 0:
            out["acc"] = float(sums[1]) / float(sums[3])
        return out

    def _train_metrics(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, distributed: bool = True
    ) -> dict[str, float]:
        if self._last is not None and self._last[0] == trainer.global_step:
            return self._last[1]
        metrics = self.evaluate(trainer, pl_module, "train", distributed)
        self._last = (trainer.global_step, metrics)
        return metrics

    def rule_met(self, metrics: dict[str, float]) -> bool:
        """Whether the stopping rule holds for full-pass training metrics ``{"loss", "acc"}``: ``loss ≤ stop_loss``
        or ``1.0 − acc ≤ stop_error``, compared in float64 on the very values logged as ``full_train/*``."""
        by_loss = self.stop_loss is not None and metrics["loss"] <= self.stop_loss
        by_error = self.stop_error is not None and "acc" in metrics and 1.0 - metrics["acc"] <= self.stop_error
        return by_loss or by_error

    # ---- hooks ----------------------------------------------------------------------------------------------------
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step == 0 and trainer.current_epoch == 0:
            return  # a fresh run
        if self.converged is not None:
            if self.stop:
                trainer.should_stop = True  # a run resumed after it converged is finished
            return
        checks = self.has_rule or bool(self.loss_milestones)
        if checks and trainer.current_epoch > 0 and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            # resumed from a checkpoint written after an epoch's last batch, possibly before that epoch's check (a
            # ModelCheckpoint saving at validation end): Lightning does not rerun the epoch's end, so check here
            self._check(trainer, pl_module, epoch=trainer.current_epoch - 1, log=False)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.every_n_epochs is None:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return
        self._check(trainer, pl_module, epoch=trainer.current_epoch, log=True)

    def _check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int, log: bool) -> None:
        metrics = self._train_metrics(trainer, pl_module)
        if log:
            # float64 tensors: a Python float would be logged as a float32 tensor (Lightning's default dtype), and
            # the logged value would differ from the one the rule compares
            f64 = {"dtype": torch.float64, "device": pl_module.device}
            pl_module.log_dict(
                {f"full_train/{k}": torch.tensor(metrics[k], **f64) for k in ("loss", "acc") if k in metrics},
                on_step=False,
                on_epoch=True,
                batch_size=1,
            )
        reached = {}
        for value in self.loss_milestones:
            key = milestone_key(value)
            if key not in self.milestones and metrics["loss"] <= value:
                self.milestones[key] = {"epoch": epoch, "step": trainer.global_step}
                reached[f"optimization/steps_to_loss_{key}"] = float(trainer.global_step)
        if log and reached:
            pl_module.log_dict(reached, on_step=False, on_epoch=True, batch_size=1)
        if self.converged is None and self.has_rule and self.rule_met(metrics):
            self.converged = {"epoch": epoch, "step": trainer.global_step}
            trainer.save_checkpoint(self._checkpoint_path(trainer, "converged.ckpt"))  # every rank: a collective
            if self.stop:
                trainer.should_stop = True

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Refuse at setup, with one line, a loss that cannot be evaluated on a training batch, and ``stop_error``
        on a module without class logits."""
        self._train_ended = False
        if stage != "fit":
            return
        objective = self.objective(pl_module)
        with preserved_rng(), evaluation_mode(pl_module):  # a loader's iterator draws its seed from the global RNG
            batch = next(iter(self._batches(trainer, "train", distributed=False)), None)
            if batch is None:
                raise ConfigError("GeneralizationTargets: the train split is empty.")
            batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
            objective.check(batch)
            if self.stop_error is not None:
                objective.require_logits("GeneralizationTargets(stop_error) (an error rate)", batch)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._train_ended = True
        log_dir = trainer.log_dir if trainer.loggers else None  # a broadcast under DDP: asked on every rank
        self._finish(trainer, pl_module, log_dir, distributed=True)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A run resumed from a checkpoint written at the very end of training skips the training loop (no
        ``on_train_end``): the final evaluation then runs here, after teardown, on the module's current device,
        on rank 0 alone over the whole splits."""
        if getattr(self, "_train_ended", True) or trainer.global_rank != 0:
            return
        logger = trainer.loggers[0] if trainer.loggers else None
        log_dir = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None) if logger else None
        self._finish(trainer, pl_module, log_dir, distributed=False)

    def _finish(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, log_dir: str | None, distributed: bool
    ) -> None:
        train = self._train_metrics(trainer, pl_module, distributed)
        final: dict[str, float] = {"final/train_loss": train["loss"]}
        if "acc" in train:
            final["final/train_acc"] = train["acc"]
        test: dict[str, float] = {}
        if self.test:
            test = self.evaluate(trainer, pl_module, "test", distributed)
            final.update({"final/test_loss": test["loss"], "final/gen_gap_loss": test["loss"] - train["loss"]})
            if "acc" in train and "acc" in test:
                final.update({"final/test_acc": test["acc"], "final/gen_gap_acc": train["acc"] - test["acc"]})
        if not all(math.isfinite(v) for v in final.values()):
            rank_zero_warn(f"GeneralizationTargets: non-finite final metrics {final}.")
        if self.save_final and (distributed or trainer.world_size == 1):
            trainer.save_checkpoint(self._checkpoint_path(trainer, "final.ckpt"))  # every rank: a collective
        self.final_metrics = final
        for logger in trainer.loggers:
            logger.log_metrics(final, step=trainer.global_step)  # Lightning's loggers log on rank 0 only
        if distributed or trainer.world_size == 1:  # HistoryCSV asks trainer.log_dir: every rank must call it
            for cb in trainer.callbacks:
                if isinstance(cb, HistoryCSV):
                    cb.on_train_end(trainer, pl_module)  # completes the last epoch's row first (idempotent)
                    last = cb.rows[-1] if cb.rows else None
                    same = last is not None and last.get("step") == trainer.global_step
                    epoch = last.get("epoch") if same else max(trainer.current_epoch - 1, 0)
                    cb.add_row(trainer, {"epoch": epoch, "step": trainer.global_step, **final})
        record = {
            **final,
            "epochs": trainer.current_epoch,
            "global_step": trainer.global_step,
            "converged": self.converged is not None,
            "converged_epoch": None if self.converged is None else self.converged["epoch"],
            "converged_step": None if self.converged is None else self.converged["step"],
            "num_train": int(train["n"]),
            "num_test": int(test["n"]) if test else None,
            "stop_loss": self.stop_loss,
            "stop_error": self.stop_error,
        }
        if self.loss_milestones:
            record["loss_milestones"] = {
                milestone_key(v): self.milestones.get(milestone_key(v)) for v in self.loss_milestones
            }
        if log_dir is not None:
            _write_json(os.path.join(log_dir, self.filename), record)

    def _checkpoint_path(self, trainer: pl.Trainer, name: str) -> str:
        folder = None
        for cb in trainer.checkpoint_callbacks:
            folder = folder or getattr(cb, "dirpath", None)
        if folder is None:
            root = trainer.log_dir if trainer.loggers else None
            folder = os.path.join(root or trainer.default_root_dir, "checkpoints")
        return os.path.join(folder, name)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"converged": self.converged, "milestones": dict(self.milestones)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.converged = state_dict.get("converged")
        self.milestones = dict(state_dict.get("milestones") or {})


def milestone_key(value: float) -> str:
    """The text of a loss milestone in logs and ``final_metrics.json`` (``0.1``, ``0.01``: ``repr`` of the float)."""
    return repr(float(value))


@rank_zero_only
def _write_json(path: str, record: dict[str, Any]) -> None:
    """Write atomically: the file's presence means the fit finished."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
