"""Curvature callbacks: Hessian eigenvalues (Lanczos), trace (Hutchinson) and spectral density (SLQ).

Thin Lightning adapters over :mod:`flatlit.curvature`, usable in any Lightning project:

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
from flatlit.curvature import EigenResult, HessianOperator, hutchinson, lanczos, lobpcg, slq_density
from flatlit.curvature.hvp import batch_size, evaluation_mode
from flatlit.objective import (
    X_KEYS,
    Y_KEYS,
    Objective,
    ParamsSpec,
    class_logits,
    resolve_objective,
    select_parameters,
    unpack_xy,
)
from flatlit.utils.errors import ConfigError
from flatlit.utils.nn import preserved_rng, rank0_buffers

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
BatchLossFn = Callable[[pl.LightningModule, Any], torch.Tensor]
__all__ = ["X_KEYS", "Y_KEYS", "CurvatureCallback", "class_logits", "unpack_xy"]

# the values are identical on every rank (the operator is all-reduced): Lightning's sync_dist advice does not apply
warnings.filterwarnings("ignore", message=r"It is recommended to use `self\.log\('(hessian|sharpness|complexity)/")


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
        rank, world = trainer.global_rank, trainer.world_size
        dm = trainer.datamodule
        if dm is not None and callable(getattr(dm, "curvature_batches", None)):
            try:
                return dm.curvature_batches(self.num_samples, self.batch_size, seed, self.augment, rank, world)
            except ConfigError as err:
                raise ConfigError(f"{type(self).__name__}({err})") from None
        loader = dm.train_dataloader() if dm is not None else trainer.fit_loop._data_source.dataloader()
        if isinstance(loader, DataLoader) and not isinstance(loader.dataset, IterableDataset):
            n = len(loader.dataset)
            if self.num_samples > n:
                raise ConfigError(
                    f"{type(self).__name__}(num_samples): asked for {self.num_samples} samples but the training "
                    f"dataset holds {n}."
                )
            idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: self.num_samples].sort().values
            subset = Subset(loader.dataset, idx[rank::world].tolist())
            sample = DataLoader(subset, batch_size=self.batch_size, shuffle=False, collate_fn=loader.collate_fn)
            return list(sample)
        # an iterable dataset or a custom loader: its first examples, read through a fresh loader where possible
        if isinstance(loader, DataLoader):
            loader = DataLoader(loader.dataset, batch_size=self.batch_size, collate_fn=loader.collate_fn)
        batches, n = [], 0
        for batch in loader:
            batches.append(batch)
            n += batch_size(batch)
            if n >= self.num_samples:
                break
        if n < self.num_samples:
            raise ConfigError(
                f"{type(self).__name__}(num_samples): asked for {self.num_samples} samples but the training data "
                f"holds {n}."
            )
        return batches[rank::world]

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


class HessianEigenvalues(CurvatureCallback):
    """Top-k Hessian eigenvalues of the training loss on a fixed sample, during training.

    Follows Jastrzębski et al. 2019 ("On the relation between the sharpest directions of DNN loss and the SGD step
    length", arXiv 1807.05031; SPEC §3.2): k=5 on N=2250 training examples, every epoch. Either solver stops when
    the top-k pairs have relative residual ‖Hv − λv‖/|λ| ≤ ``tol``; Lanczos, and the block solver when warm-started,
    then verify that they are the top k (:func:`~flatlit.curvature.lanczos.verify_extremes`): a Lanczos restart on
    the Hessian deflated by the found vectors either finds a pair they lack (a second copy of a repeated eigenvalue,
    which the Krylov space of one start vector cannot hold; a stale warm start) or certifies, from its Lanczos
    polynomials, that nothing lies beyond λ_k (wrong with probability ≤ 1e-3). ``hessian/converged`` is 1 only then.

    - ``lanczos`` (default): Lanczos with full reorthogonalisation from a seeded start vector, one HVP at a time;
    - ``block``: block LOBPCG (:func:`~flatlit.curvature.lobpcg`) on batched HVPs (:meth:`HessianOperator.matmat`,
      one forward and first backward per block), warm-started from the previous measurement's eigenvectors
      (``warm_start``; they are kept in the callback's checkpoint state, so a resumed run keeps the warm start);
    - ``auto``: Lanczos for a measurement without a warm start (the first), ``block`` after it.

    Lanczos is the default because it was the cheaper one where measured (``benchmarks/curvature.py``, lenet on
    Fashion-MNIST, top-5 on 1,000 examples to 1e-3 after every epoch, before the verification): 21-23 HVPs per
    measurement against 27-42 batched columns for the warm-started block solver (each column costs about 0.75 of an
    HVP); both now pay the verification restart on top. Its cost in that setting (measured apart from the benchmark;
    HVPs of the first run → with the verification): 19 → 29 after one epoch of SGD, 28 → 43 after 30 steps, 49 → 94
    at initialisation, where λ_6 lies within 2 % of λ_5 and the certificate needs longer polynomials; converging the
    deflated top pair to ``tol`` instead would cost as much or more (more than 29, 43, more than 94). An epoch of SGD
    moves the top eigenvectors too far for the warm start to pay; it pays when measurements are close together
    (``every_n_steps``) and with block-friendly hardware.

    Args:
        top_k: number of eigenvalues (logged as ``hessian/lambda_1..k``, descending; with ``which="SA"``,
            ``hessian/lambda_min_1..k``, ascending).
        max_iter: maximum Lanczos iterations (HVPs) of a measurement's first run; the verification restarts may use
            as many again (the block solver: maximum block iterations; its verification, max_iter × block size HVPs).
        tol: relative Ritz residual for convergence (``hessian/residual_i`` are logged, and ``hessian/converged``: 1
            when all pairs met it and were verified to be the top k).
        which: ``LA`` (largest, default) or ``SA`` (smallest: λ_min).
        solver: ``lanczos`` (default), ``block`` or ``auto`` (see above).
        warm_start: start the block solver from the previous measurement's eigenvectors (default True).
        block_size: columns of the block solver (default ``top_k``; extra columns help clustered spectra).
        save_eigenvectors: save the Ritz vectors of each measurement (``eigenvectors_step{N}.pt``).
        **kwargs: :class:`CurvatureCallback` arguments (num_samples, batch_size, every_n_epochs, ...).

    Raises:
        ConfigError: ``top_k`` larger than the number of parameters, ``num_samples`` larger than the training
            split, or a ``loss_fn`` that cannot be applied to the module's outputs (at setup).

    Writes ``eigenvalues.npz`` (steps, epochs, eigenvalues, residuals) in the log directory and keeps the series in
    its ``state_dict`` so a resumed run continues it. ``last_result`` holds the latest eigenpairs (NSGD reuses them).

    Example::

        trainer = Trainer(callbacks=[HessianEigenvalues(top_k=5, num_samples=2250)])
    """

    def __init__(
        self,
        top_k: int = 5,
        max_iter: int = 100,
        tol: float = 1e-3,
        which: str = "LA",
        save_eigenvectors: bool = False,
        solver: str = "lanczos",
        warm_start: bool = True,
        block_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if solver not in ("auto", "lanczos", "block"):
            raise ConfigError(f"HessianEigenvalues(solver): 'auto', 'lanczos' or 'block', got {solver!r}.")
        if block_size is not None and block_size < top_k:
            raise ConfigError(f"HessianEigenvalues(block_size): must be >= top_k={top_k} or None, got {block_size}.")
        self.solver, self.warm_start, self.block_size = solver, warm_start, block_size
        self.warm_vectors: torch.Tensor | None = None  # the last measurement's eigenvectors (k × n, on the CPU)
        if top_k < 1:
            raise ConfigError(f"HessianEigenvalues(top_k): must be >= 1, got {top_k}.")
        if which not in ("LA", "SA"):
            raise ConfigError(f"HessianEigenvalues(which): 'LA' or 'SA', got {which!r}.")
        if max_iter < top_k:
            raise ConfigError(f"HessianEigenvalues(max_iter): must be >= top_k={top_k}, got {max_iter}.")
        self.top_k, self.max_iter, self.tol, self.which = top_k, max_iter, tol, which
        self.save_eigenvectors = save_eigenvectors
        self.history: dict[str, list] = {
            "step": [],
            "epoch": [],
            "eigenvalues": [],
            "residuals": [],
            "warm_start": [],
            "hvps": [],
        }
        self.last_result: EigenResult | None = None
        self.last_step: int | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(top_k=self.top_k, num_samples=self.num_samples, which=self.which)

    def check_sizes(self, pl_module: pl.LightningModule) -> None:
        n = sum(p.numel() for p in self.params(pl_module))
        if self.top_k > n:
            raise ConfigError(f"HessianEigenvalues(top_k): {self.top_k} exceeds the {n} parameters of the module.")

    def compute(self, trainer: pl.Trainer, pl_module: pl.LightningModule, op: HessianOperator) -> dict[str, float]:
        if self.num_measurements == 0:  # 2 extra HVPs: probe once per run
            op.check_determinism(self.seed)
        warm = self.warm_vectors if self.warm_start else None
        if warm is not None and tuple(warm.shape) != (self.top_k, op.numel):
            warm = None  # another parameter filter or model: start afresh
        block = self.solver == "block" or (self.solver == "auto" and warm is not None)
        if block:
            res = lobpcg(
                op.matmat,
                op.numel,
                self.top_k,
                X0=None if warm is None else warm.to(op.device),
                max_iter=self.max_iter,
                tol=self.tol,
                seed=self.seed,
                which=self.which,
                dtype=op.dtype,
                device=op.device,
                block_size=self.block_size,
                on_check=self._note_residual,
            )
        else:
            res = lanczos(
                op.matvec,
                op.numel,
                self.top_k,
                self.max_iter,
                self.tol,
                self.seed,
                self.which,
                op.dtype,
                op.device,
                return_eigenvectors=True,
                on_check=self._note_residual,
            )
        if res.eigenvectors is not None and bool(torch.isfinite(res.eigenvalues).all()):
            self.warm_vectors = res.eigenvectors.detach().to("cpu", copy=True)
        if bool((res.eigenvalues == 0).all()):
            rank_zero_warn(
                f"HessianEigenvalues: the Hessian is identically zero at step {trainer.global_step}: the loss does not "
                "depend on these parameters (e.g. cross-entropy of a single output). Check loss_fn / batch_loss."
            )
        self.last_result, self.last_step = res, trainer.global_step
        self.history["step"].append(trainer.global_step)
        self.history["epoch"].append(trainer.current_epoch)
        self.history["eigenvalues"].append(res.eigenvalues.tolist())
        self.history["residuals"].append(res.residuals.tolist())
        self.history["warm_start"].append(int(block and warm is not None))
        self.history["hvps"].append(op.num_matvecs)
        self._save(trainer, res)
        tag = "" if self.which == "LA" else "min_"  # two instances (λ_max and λ_min) must not share names
        metrics = {f"{self.prefix}/lambda_{tag}{i + 1}": float(v) for i, v in enumerate(res.eigenvalues)}
        metrics.update({f"{self.prefix}/residual_{tag}{i + 1}": float(r) for i, r in enumerate(res.residuals)})
        metrics[f"{self.prefix}/converged{'' if self.which == 'LA' else '_min'}"] = float(res.converged)
        return metrics

    @rank_zero_only
    def _save(self, trainer: pl.Trainer, res: EigenResult) -> None:
        path = self.save_path(trainer, "eigenvalues.npz")
        if path is None:
            return
        np.savez(path, **{k: np.asarray(v) for k, v in self.history.items()})
        if self.save_eigenvectors and res.eigenvectors is not None:
            torch.save(res.eigenvectors.cpu(), self.save_path(trainer, f"eigenvectors_step{trainer.global_step}.pt"))

    def state_dict(self) -> dict[str, Any]:
        state = {**super().state_dict(), "history": {k: list(v) for k, v in self.history.items()}}
        if self.warm_start and self.warm_vectors is not None:
            state["warm_vectors"] = self.warm_vectors.clone()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.history.update({k: list(v) for k, v in state_dict.get("history", {}).items()})
        for key in ("warm_start", "hvps"):  # checkpoints of older versions lack them
            self.history[key] += [0] * (len(self.history["step"]) - len(self.history[key]))
        self.warm_vectors = state_dict.get("warm_vectors")


class HessianTrace(CurvatureCallback):
    """Hessian trace by Hutchinson's estimator (Rademacher probes), logged as ``hessian/trace`` and
    ``hessian/trace_se`` (its standard error). Avron & Toledo 2011; Yao et al. 2020 (PyHessian, arXiv 1912.07145).

    Args:
        num_probes: Rademacher probes (HVPs) per measurement.
        **kwargs: :class:`CurvatureCallback` arguments.

    Example::

        Trainer(callbacks=[HessianTrace(num_probes=50, num_samples=1000)])
    """

    cost_name = "trace_"

    def __init__(self, num_probes: int = 50, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_probes < 2:
            raise ConfigError(f"HessianTrace(num_probes): must be >= 2, got {num_probes}.")
        self.num_probes = num_probes

    @property
    def state_key(self) -> str:
        return self._generate_state_key(num_probes=self.num_probes, num_samples=self.num_samples)

    def compute(self, trainer: pl.Trainer, pl_module: pl.LightningModule, op: HessianOperator) -> dict[str, float]:
        res = hutchinson(op.matvec, op.numel, self.num_probes, self.seed + self.num_measurements, op.dtype, op.device)
        if res.estimate == 0 and res.std_error == 0:
            rank_zero_warn(
                f"HessianTrace: the Hessian is identically zero at step {trainer.global_step}: the loss does not "
                "depend on these parameters. Check loss_fn / batch_loss."
            )
        return {f"{self.prefix}/trace": res.estimate, f"{self.prefix}/trace_se": res.std_error}


class HessianSpectrum(CurvatureCallback):
    """Hessian spectral density by stochastic Lanczos quadrature (Ghorbani et al. 2019, arXiv 1901.10159).

    Logged to TensorBoard as a histogram (``hessian/spectrum``, bucket mass = density × width) and saved as
    ``spectrum_step{N}.npz`` (grid, density, nodes, weights).

    Args:
        num_runs: random start vectors.
        num_steps: Lanczos steps per run.
        num_points: grid points of the smoothed density.
        **kwargs: :class:`CurvatureCallback` arguments.
    """

    cost_name = "spectrum_"

    def __init__(self, num_runs: int = 4, num_steps: int = 40, num_points: int = 256, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_runs, self.num_steps, self.num_points = num_runs, num_steps, num_points

    @property
    def state_key(self) -> str:
        return self._generate_state_key(num_runs=self.num_runs, num_steps=self.num_steps, num_samples=self.num_samples)

    def compute(self, trainer: pl.Trainer, pl_module: pl.LightningModule, op: HessianOperator) -> dict[str, float]:
        d = slq_density(
            op.matvec,
            op.numel,
            self.num_runs,
            self.num_steps,
            self.num_points,
            seed=self.seed,
            dtype=op.dtype,
            device=op.device,
        )
        if bool(torch.isfinite(d.nodes).all()):
            self._save(trainer, d)
        return {
            f"{self.prefix}/spectrum_max": float(d.nodes.max()),
            f"{self.prefix}/spectrum_min": float(d.nodes.min()),
        }

    @rank_zero_only
    def _save(self, trainer: pl.Trainer, d) -> None:
        path = self.save_path(trainer, f"spectrum_step{trainer.global_step}.npz")
        if path is not None:
            np.savez(
                path, grid=d.grid.numpy(), density=d.density.numpy(), nodes=d.nodes.numpy(), weights=d.weights.numpy()
            )
        dx = float(d.grid[1] - d.grid[0])
        mass = (d.density * dx).numpy()
        for logger in trainer.loggers:
            exp = getattr(logger, "experiment", None)
            if hasattr(exp, "add_histogram_raw"):
                edges = (d.grid + dx / 2).numpy()
                exp.add_histogram_raw(
                    f"{self.prefix}/spectrum",
                    min=float(d.grid[0]),
                    max=float(d.grid[-1]),
                    num=float(mass.sum()),
                    sum=float((mass * d.grid.numpy()).sum()),
                    sum_squares=float((mass * d.grid.numpy() ** 2).sum()),
                    bucket_limits=edges.tolist(),
                    bucket_counts=mass.tolist(),
                    global_step=trainer.global_step,
                )
