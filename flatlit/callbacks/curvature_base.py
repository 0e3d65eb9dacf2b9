"""The shared base of the curvature callbacks: scheduling, the sample, loss resolution, validation and logging.

:class:`CurvatureCallback` makes the callbacks of :mod:`flatlit.callbacks.curvature` thin Lightning adapters over
:mod:`flatlit.curvature`, usable in any Lightning project:

- **Sample.** ``datamodule.curvature_batches(...)`` when the DataModule has it (flatlit's: a seeded subset of the
  training split under the evaluation transform); otherwise a seeded random subset of the training loader's
  *dataset*, read through a separate, unshuffled ``DataLoader`` with the loader's ``collate_fn``: the training
  loader, its sampler and its generator are never iterated.
- **Loss.** In this order: the callback's ``batch_loss(pl_module, batch)``; the module's ``curvature_loss(batch)``;
  ``loss_fn(pl_module(x), y)`` with the callback's ``loss_fn``, else the module's callable ``loss_fn`` attribute,
  else cross-entropy (refused at setup when the outputs and targets do not fit it). ``(x, y)`` is unpacked from
  tuples and lists (the first two items) and from dicts with the usual keys (``x``/``input``/``inputs``/``image``/
  ``images`` and ``y``/``target``/``targets``/``label``/``labels``). Batches are moved with the module's
  ``transfer_batch_to_device`` hook, floating tensors cast to the parameters' dtype.
- **Observe, never perturb.** HVPs use ``torch.autograd.grad`` (``.grad`` untouched) with every module in eval mode
  (BatchNorm running statistics, dropout off); every module's train flag, the BatchNorm buffers and the torch/NumPy/
  Python RNG states are restored, and nothing touches the optimizer or the training loader.
- **Results.** Epoch measurements are logged with ``pl_module.log`` from ``on_train_epoch_end`` (so they reach
  ``trainer.callback_metrics``, ``EarlyStopping``/``ModelCheckpoint`` monitors, every logger and ``history.csv`` at
  the same step as the epoch's other metrics); step measurements are logged at the step Lightning gives that batch;
  the measurement before training goes to the loggers at step 0 and to its own ``history.csv`` row (epoch −1).
  Non-finite weights give NaN values and a warning; a long measurement reports its progress (HVPs done, residual).

Under DDP every rank holds its share of the sample and the HVP sums are all-reduced, so all ranks see the same
operator and log the same values.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch.utils.data import DataLoader, IterableDataset, Subset
from typing_extensions import override

from flatlit.callbacks.history import HistoryCSV
from flatlit.curvature import HessianOperator
from flatlit.curvature.hvp import batch_size, evaluation_mode
from flatlit.objective import Objective, ParamsSpec, resolve_objective, select_parameters
from flatlit.utils.errors import ConfigError
from flatlit.utils.nn import preserved_rng, rank0_buffers

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
BatchLossFn = Callable[[pl.LightningModule, Any], torch.Tensor]

# the values are identical on every rank (the operator is all-reduced): Lightning's sync_dist advice does not apply
warnings.filterwarnings("ignore", message=r"It is recommended to use `self\.log\('(hessian|sharpness|complexity)/")


def draw_sample(
    trainer: pl.Trainer,
    owner: str,
    num_samples: int,
    batch_size_: int,
    seed: int,
    augment: bool = False,
    sharded: bool = True,
) -> list[Any]:
    """The fixed sample of a measuring callback, as the data gives it (any batch structure): a flatlit DataModule's
    ``curvature_batches``; otherwise a seeded subset of the training loader's *dataset* read through a separate,
    unshuffled ``DataLoader`` with the loader's ``collate_fn`` (the training loader, its sampler and generator are
    never iterated); the first examples of an iterable dataset (through a fresh loader) or of a loader that is not a
    ``DataLoader``. ``sharded``: this rank's share under DDP; else the whole sample on every rank."""
    rank, world = (trainer.global_rank, trainer.world_size) if sharded else (0, 1)
    dm = trainer.datamodule
    if dm is not None and callable(getattr(dm, "curvature_batches", None)):
        try:
            return list(dm.curvature_batches(num_samples, batch_size_, seed, augment, rank, world))
        except ConfigError as err:
            raise ConfigError(f"{owner}({err})") from None
    loader = dm.train_dataloader() if dm is not None else trainer.fit_loop._data_source.dataloader()
    if isinstance(loader, DataLoader) and not isinstance(loader.dataset, IterableDataset):
        n = len(loader.dataset)
        if num_samples > n:
            raise ConfigError(
                f"{owner}(num_samples): asked for {num_samples} samples but the training dataset holds {n}."
            )
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:num_samples].sort().values
        subset = Subset(loader.dataset, idx[rank::world].tolist())
        return list(DataLoader(subset, batch_size=batch_size_, shuffle=False, collate_fn=loader.collate_fn))
    if isinstance(loader, DataLoader):  # an iterable dataset: its first examples, through a fresh loader
        loader = DataLoader(loader.dataset, batch_size=batch_size_, collate_fn=loader.collate_fn)
    batches, n = [], 0
    for batch in loader:
        batches.append(batch)
        n += batch_size(batch)
        if n >= num_samples:
            break
    if n < num_samples:
        raise ConfigError(f"{owner}(num_samples): asked for {num_samples} samples but the training data holds {n}.")
    return batches[rank::world]


class CurvatureCallback(Callback):
    """Shared scheduling, sampling, loss resolution, validation and logging of the curvature callbacks.

    Args:
        num_samples: size N of the fixed sample (over all ranks).
        batch_size: HVP mini-batch size (the HVP is the size-weighted mean over batches).
        every_n_epochs: measure at the end of every n-th epoch (None disables); ``"auto"``: 1, or None when
            ``every_n_steps`` is set.
        every_n_steps: measure every n optimizer steps (None disables).
        at_train_start: also measure before the first step (the initialisation).
        resample: draw a new sample at every measurement (seed + measurement index); default: one fixed sample.
        augment: apply the training augmentation to the sample (flatlit DataModules; Jastrzębski et al.'s
            ``lanczos_aug``).
        include_l2: include the L2 penalty ½λ‖θ‖² with λ the optimizer's ``weight_decay``.
        loss_fn: ``loss_fn(pl_module(x), y)`` (see :mod:`flatlit.objective` for the whole resolution order: an
            explicit ``batch_loss``, then ``loss_fn``, the module's ``curvature_loss(batch)``, a flatlit family's
            ``training_loss``, the module's ``loss_fn``, cross-entropy on class logits).
        batch_loss: ``batch_loss(pl_module, batch)`` returning the batch-mean loss of any batch (dicts, several
            inputs); takes precedence over everything else.
        params: the parameters to measure: a callable ``pl_module -> parameters`` or ``fnmatch`` name patterns
            (e.g. ``"discriminator.*"``); default every trainable parameter. Parameters the loss does not reach are
            an error at setup.
        exclude_bn, exclude_bias: leave BatchNorm parameters / biases out of the Hessian.
        bn_mode: ``eval`` (running statistics, default) or ``train`` (batch statistics, buffers restored).
        backend: ``double`` (double backward) or ``func`` (torch.func forward-over-reverse).
        seed: seed of the sample and of the random start vectors (identical on every rank).
        progress_every: seconds between progress lines of a running measurement (None: silent).
    """

    prefix = "hessian"
    cost_name = ""  # distinguishes the seconds/HVP counters of the callbacks

    def __init__(
        self,
        num_samples: int = 2250,
        batch_size: int = 250,
        every_n_epochs: int | str | None = "auto",
        every_n_steps: int | None = None,
        at_train_start: bool = True,
        resample: bool = False,
        augment: bool = False,
        include_l2: bool = False,
        loss_fn: LossFn | None = None,
        batch_loss: BatchLossFn | None = None,
        params: ParamsSpec = None,
        exclude_bn: bool = False,
        exclude_bias: bool = False,
        bn_mode: str = "eval",
        backend: str = "double",
        seed: int = 0,
        progress_every: float | None = 10.0,
    ) -> None:
        name = type(self).__name__
        if num_samples < 1:
            raise ConfigError(f"{name}(num_samples): must be >= 1, got {num_samples}.")
        if batch_size < 1:
            raise ConfigError(f"{name}(batch_size): must be >= 1, got {batch_size}.")
        if every_n_epochs == "auto":
            every_n_epochs = None if every_n_steps is not None else 1
        if isinstance(every_n_epochs, str):
            raise ConfigError(f"{name}(every_n_epochs): an int >= 1, None or 'auto', got {every_n_epochs!r}.")
        for key, val in (("every_n_epochs", every_n_epochs), ("every_n_steps", every_n_steps)):
            if val is not None and val < 1:
                raise ConfigError(f"{name}({key}): must be >= 1 or None, got {val}.")
        if bn_mode not in ("eval", "train"):
            raise ConfigError(f"{name}(bn_mode): 'eval' or 'train', got {bn_mode!r}.")
        if backend not in ("double", "func"):
            raise ConfigError(f"{name}(backend): 'double' or 'func', got {backend!r}.")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.every_n_epochs, self.every_n_steps, self.at_train_start = every_n_epochs, every_n_steps, at_train_start
        self.resample, self.augment, self.include_l2 = resample, augment, include_l2
        self.loss_fn, self.batch_loss, self.param_spec = loss_fn, batch_loss, params
        self.exclude_bn, self.exclude_bias, self.bn_mode, self.backend = exclude_bn, exclude_bias, bn_mode, backend
        self.seed, self.progress_every = seed, progress_every
        self.num_measurements = 0
        self._batches: list[Any] | None = None
        self._last_step = -1
        self.last_metrics: dict[str, float] | None = None
        self._log_dir: str | None = None

    # ---- sample ------------------------------------------------------------------------------------------------
    def _draw(self, trainer: pl.Trainer, seed: int) -> list[Any]:
        return draw_sample(
            trainer, type(self).__name__, self.num_samples, self.batch_size, seed, self.augment, sharded=True
        )

    def batches(self, trainer: pl.Trainer) -> list[Any]:
        if self._batches is None or self.resample:
            seed = self.seed + (self.num_measurements if self.resample else 0)
            with preserved_rng():
                self._batches = self._draw(trainer, seed)
        return self._batches

    def params(self, pl_module: pl.LightningModule) -> list[torch.nn.Parameter]:
        return select_parameters(pl_module, self.param_spec, self.exclude_bn, self.exclude_bias, type(self).__name__)

    @staticmethod
    def move(batch: Any, pl_module: pl.LightningModule) -> Any:
        """The module's ``transfer_batch_to_device``, then floating tensors in the parameters' dtype."""
        p = next(pl_module.parameters())
        batch = pl_module.transfer_batch_to_device(batch, p.device, 0)
        return apply_to_collection(batch, torch.Tensor, lambda t: t.to(dtype=p.dtype) if t.is_floating_point() else t)

    # ---- loss --------------------------------------------------------------------------------------------------
    def objective(self, pl_module: pl.LightningModule) -> Objective:
        """The module's loss (and logits) by flatlit's one resolution order (:mod:`flatlit.objective`)."""
        return resolve_objective(pl_module, type(self).__name__, self.batch_loss, self.loss_fn)

    def module_batch_loss(self, pl_module: pl.LightningModule) -> Callable[[Any], torch.Tensor]:
        """The batch-mean loss of a (moved) batch, as the module trains on it (see :mod:`flatlit.objective`)."""
        return self.objective(pl_module).loss

    def operator(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> HessianOperator:
        batches = [self.move(b, pl_module) for b in self.batches(trainer)]
        wd = 0.0
        if self.include_l2 and trainer.optimizers:
            wd = float(trainer.optimizers[0].param_groups[0].get("weight_decay", 0.0))
        return HessianOperator(
            pl_module,
            batches,
            params=self.params(pl_module),
            weight_decay=wd,
            bn_mode=self.bn_mode,
            backend=self.backend,
            batch_loss=self.module_batch_loss(pl_module),
        )

    # ---- validation at setup -----------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Refuse at setup, with one line, what would fail mid-run: the loss on a training batch (not a scalar, not
        applicable to the outputs), a ``params`` that selects nothing or parameters the loss does not reach."""
        if stage != "fit":
            return
        self.check_sizes(pl_module)
        batch = self.move(self.batches(trainer)[0], pl_module)
        params = self.params(pl_module)
        with preserved_rng(), evaluation_mode(pl_module):  # every module's flag and BN buffer kept
            self.check_objective(self.objective(pl_module), batch, params)

    def check_objective(self, objective: Objective, batch: Any, params: list[torch.nn.Parameter]) -> None:
        """Subclass hook: what else the measurement needs of the objective (e.g. class logits)."""
        objective.check(batch, params)

    def check_sizes(self, pl_module: pl.LightningModule) -> None:
        """Subclass hook for argument checks that need the module."""

    # ---- scheduling ----------------------------------------------------------------------------------------------
    def should_run(self, trainer: pl.Trainer, where: str) -> bool:
        if trainer.sanity_checking:
            return False
        if where == "start":
            return self.at_train_start and trainer.global_step == 0
        if where == "epoch":
            return self.every_n_epochs is not None and (trainer.current_epoch + 1) % self.every_n_epochs == 0
        return (
            self.every_n_steps is not None
            and trainer.global_step > 0
            and trainer.global_step != self._last_step
            and trainer.global_step % self.every_n_steps == 0
        )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.should_run(trainer, "start"):
            metrics = self._measure(trainer, pl_module)
            self._log_direct(trainer, metrics, step=0)
            for cb in trainer.callbacks:
                if isinstance(cb, HistoryCSV):
                    cb.add_row(trainer, {"epoch": -1, "step": 0, **metrics})

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.should_run(trainer, "step"):
            metrics = self._measure(trainer, pl_module)
            # to the loggers once, at the step Lightning gives this batch's metrics, and into callback_metrics for
            # monitors (``pl_module.log(on_step=True)`` would re-send the stale value at every later logging step)
            self._log_direct(trainer, metrics, step=trainer.fit_loop.epoch_loop._batches_that_stepped)
            trainer._logger_connector._callback_metrics.update(
                {k: torch.tensor(v, dtype=torch.float32) for k, v in metrics.items()}
            )

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.should_run(trainer, "epoch"):
            return
        if trainer.global_step == self._last_step and self.last_metrics is not None:
            metrics = self.last_metrics  # measured at this very step already: log it, do not measure twice
        else:
            metrics = self._measure(trainer, pl_module)
        pl_module.log_dict(metrics, on_step=False, on_epoch=True, batch_size=1)

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        self._last_step = trainer.global_step
        # a collective under DDP: every rank must ask, never inside rank-zero code; files only go to a logger's run
        # directory (without a logger, log_dir would be the working directory)
        self._log_dir = trainer.log_dir if trainer.loggers else None
        # under DDP every rank measures rank 0's network: BN statistics drift apart between DDP's broadcasts
        with preserved_rng(), rank0_buffers(pl_module):
            start = time.perf_counter()
            finite = all(bool(torch.isfinite(p).all()) for p in self.params(pl_module))
            metrics = self.measure(trainer, pl_module, start)  # non-finite weights give NaN values, not a crash
            if not all(np.isfinite(v) for v in metrics.values()):
                rank_zero_warn(
                    f"{type(self).__name__}: non-finite {'weights' if not finite else 'values'} at step "
                    f"{trainer.global_step} (epoch {trainer.current_epoch}); logging NaN for this measurement."
                )
            metrics[f"{self.prefix}/{self.cost_name}seconds"] = time.perf_counter() - start
        self.num_measurements += 1
        self.last_metrics = metrics
        return metrics

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, start: float) -> dict[str, float]:
        """One measurement: the Hessian operator on the sample, then :meth:`compute` (the solvers return NaN for a
        non-finite operator)."""
        op = self.operator(trainer, pl_module)
        progress = {"count": 0, "next": start + (self.progress_every or 0.0)}  # shared: HVPs of both kinds
        op.matvec = self._with_progress(op.matvec, trainer, start, progress)  # type: ignore[method-assign]
        op.matmat = self._with_progress(op.matmat, trainer, start, progress)  # type: ignore[method-assign]
        metrics = self.compute(trainer, pl_module, op)
        metrics[f"{self.prefix}/{self.cost_name}hvps"] = float(op.num_matvecs)
        return metrics

    def _with_progress(self, matvec: Callable, trainer: pl.Trainer, start: float, state: dict[str, Any]) -> Callable:
        """``matvec`` (or ``matmat``: one HVP per column) that prints a rank-zero line every ``progress_every``
        seconds (HVPs done, last residual); ``state`` holds the count and the next print time."""
        if self.progress_every is None:
            return matvec

        def counted(v: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            out = matvec(v, *args, **kwargs)
            state["count"] += 1 if v.ndim == 1 else v.shape[1]
            now = time.perf_counter()
            if now >= state["next"]:
                state["next"] = now + self.progress_every
                residual = f", residual {self.progress_residual:.2e}" if self.progress_residual is not None else ""
                rank_zero_info(
                    f"{type(self).__name__} at step {trainer.global_step}: {state['count']} HVPs{residual}, "
                    f"{now - start:.0f} s"
                )
            return out

        self.progress_residual = None
        return counted

    progress_residual: float | None = None

    def _note_residual(self, iteration: int, residual: float) -> None:
        self.progress_residual = residual

    def compute(self, trainer: pl.Trainer, pl_module: pl.LightningModule, op: HessianOperator) -> dict[str, float]:
        raise NotImplementedError

    # ---- output ------------------------------------------------------------------------------------------------
    @rank_zero_only
    def _log_direct(self, trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def save_path(self, trainer: pl.Trainer, name: str) -> str | None:
        """A file in the run directory (read by :meth:`_measure` on every rank: ``trainer.log_dir`` broadcasts)."""
        if self._log_dir is None:
            return None
        os.makedirs(self._log_dir, exist_ok=True)
        return os.path.join(self._log_dir, name)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"num_measurements": self.num_measurements, "last_step": self._last_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_measurements = state_dict.get("num_measurements", 0)
        self._last_step = state_dict.get("last_step", -1)
