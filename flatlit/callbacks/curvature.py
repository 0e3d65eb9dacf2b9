"""Curvature callbacks: Hessian eigenvalues (Lanczos), trace (Hutchinson) and spectral density (SLQ).

Thin Lightning adapters over :mod:`flatlit.curvature`. They work with any LightningModule and DataModule: the
fixed sample comes from ``datamodule.curvature_batches`` (flatlit DataModules: a seeded subset of the training
split under the evaluation transform) or, for other DataModules, from the first ``num_samples`` examples of the
training dataloader. They observe and never perturb: the HVPs use ``torch.autograd.grad`` (``.grad`` untouched) on
the module in eval mode (BatchNorm running statistics, dropout off), every module's train/eval flag, the BatchNorm
buffers and the torch/NumPy/Python RNG states are restored, and nothing touches the optimizer. Under DDP every
rank holds its share of the sample and the HVP sums are all-reduced, so all ranks see the same operator.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from typing_extensions import override

from flatlit.callbacks.history import HistoryCSV
from flatlit.curvature import EigenResult, HessianOperator, hutchinson, lanczos, select_params, slq_density
from flatlit.errors import ConfigError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore the torch (CPU and CUDA), NumPy and Python RNG states on exit."""
    state = (
        torch.get_rng_state(),
        torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        np.random.get_state(),
        random.getstate(),
    )
    try:
        yield
    finally:
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state_all(state[1])
        np.random.set_state(state[2])
        random.setstate(state[3])


class CurvatureCallback(Callback):
    """Shared scheduling, sampling and validation of the curvature callbacks.

    Args:
        num_samples: size N of the fixed sample (over all ranks).
        batch_size: HVP mini-batch size (the HVP is the size-weighted mean over batches).
        every_n_epochs: measure at the end of every n-th epoch (None disables).
        every_n_steps: measure every n optimizer steps (None disables).
        at_train_start: also measure before the first step (the initialisation).
        resample: draw a new sample at every measurement (seed + measurement index); default: one fixed sample.
        augment: apply the training augmentation to the sample (Jastrzębski et al.'s ``lanczos_aug``).
        include_l2: include the L2 penalty ½λ‖θ‖² with λ the optimizer's ``weight_decay``.
        loss_fn: ``loss_fn(pl_module(x), y)``; default: the module's callable ``loss_fn`` (flatlit modules), else
            cross-entropy.
        exclude_bn, exclude_bias: leave BatchNorm parameters / biases out of the Hessian.
        bn_mode: ``eval`` (running statistics, default) or ``train`` (batch statistics, buffers restored).
        backend: ``double`` (double backward) or ``func`` (torch.func forward-over-reverse).
        seed: seed of the sample and of the random start vectors (identical on every rank).
    """

    prefix = "hessian"
    cost_name = ""  # distinguishes the seconds/HVP counters of the callbacks

    def __init__(
        self,
        num_samples: int = 2250,
        batch_size: int = 250,
        every_n_epochs: int | None = 1,
        every_n_steps: int | None = None,
        at_train_start: bool = True,
        resample: bool = False,
        augment: bool = False,
        include_l2: bool = False,
        loss_fn: LossFn | None = None,
        exclude_bn: bool = False,
        exclude_bias: bool = False,
        bn_mode: str = "eval",
        backend: str = "double",
        seed: int = 0,
    ) -> None:
        name = type(self).__name__
        if num_samples < 1:
            raise ConfigError(f"{name}(num_samples): must be >= 1, got {num_samples}.")
        if batch_size < 1:
            raise ConfigError(f"{name}(batch_size): must be >= 1, got {batch_size}.")
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
        self.loss_fn = loss_fn or F.cross_entropy
        self._user_loss_fn = loss_fn
        self.exclude_bn, self.exclude_bias, self.bn_mode, self.backend = exclude_bn, exclude_bias, bn_mode, backend
        self.seed = seed
        self.num_measurements = 0
        self._batches: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._last_step = -1
        self._log_dir: str | None = None

    # ---- sample ------------------------------------------------------------------------------------------------
    def _draw(self, trainer: pl.Trainer, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        rank, world = trainer.global_rank, trainer.world_size
        dm = trainer.datamodule
        if dm is not None and callable(getattr(dm, "curvature_batches", None)):
            try:
                return dm.curvature_batches(self.num_samples, self.batch_size, seed, self.augment, rank, world)
            except ConfigError as err:
                raise ConfigError(f"{type(self).__name__}({err})") from None
        loader = dm.train_dataloader() if dm is not None else trainer.fit_loop._data_source.dataloader()
        xs, ys, n = [], [], 0
        for x, y in loader:
            xs.append(x.cpu())
            ys.append(y.cpu())
            n += len(y)
            if n >= self.num_samples:
                break
        if n < self.num_samples:
            raise ConfigError(
                f"{type(self).__name__}(num_samples): asked for {self.num_samples} samples but the "
                f"training data holds {n}."
            )
        x, y = torch.cat(xs)[: self.num_samples][rank::world], torch.cat(ys)[: self.num_samples][rank::world]
        return [(x[i : i + self.batch_size], y[i : i + self.batch_size]) for i in range(0, len(y), self.batch_size)]

    def batches(self, trainer: pl.Trainer) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self._batches is None or self.resample:
            seed = self.seed + (self.num_measurements if self.resample else 0)
            with preserved_rng():
                self._batches = self._draw(trainer, seed)
        return self._batches

    def params(self, pl_module: pl.LightningModule) -> list[torch.nn.Parameter]:
        return select_params(pl_module, self.exclude_bn, self.exclude_bias)

    @staticmethod
    def _to_module(x: torch.Tensor, pl_module: pl.LightningModule) -> torch.Tensor:
        """Move inputs to the module's device, and floating inputs to its parameter dtype (e.g. float64)."""
        p = next(pl_module.parameters())
        return x.to(device=p.device, dtype=p.dtype) if x.is_floating_point() else x.to(p.device)

    def operator(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> HessianOperator:
        device = next(pl_module.parameters()).device
        batches = [(self._to_module(x, pl_module), y.to(device)) for x, y in self.batches(trainer)]
        wd = 0.0
        if self.include_l2 and trainer.optimizers:
            wd = float(trainer.optimizers[0].param_groups[0].get("weight_decay", 0.0))
        loss_fn = self.module_loss_fn(pl_module)
        return HessianOperator(pl_module, batches, loss_fn, self.params(pl_module), wd, self.bn_mode, self.backend)

    def module_loss_fn(self, pl_module: pl.LightningModule) -> LossFn:
        """The ``loss_fn`` given to the callback, else the module's callable ``loss_fn``, else cross-entropy."""
        if self._user_loss_fn is None and callable(getattr(pl_module, "loss_fn", None)):
            return pl_module.loss_fn
        return self.loss_fn

    # ---- validation at setup -----------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.check_sizes(pl_module)
        x, y = self.batches(trainer)[0]
        device = next(pl_module.parameters()).device
        try:
            with torch.no_grad(), preserved_rng():
                was = pl_module.training
                pl_module.eval()
                loss = self.module_loss_fn(pl_module)(pl_module(self._to_module(x[:2], pl_module)), y[:2].to(device))
                pl_module.train(was)
        except Exception as err:
            raise ConfigError(
                f"{type(self).__name__}(loss_fn): cannot be applied to the module's outputs "
                f"({type(err).__name__}: {err})."
            ) from None
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ConfigError(
                f"{type(self).__name__}(loss_fn): must return a scalar tensor, got "
                f"{getattr(loss, 'shape', type(loss))}."
            )

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
            self._measure(trainer, pl_module)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.should_run(trainer, "step"):
            self._measure(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.should_run(trainer, "epoch"):
            self._measure(trainer, pl_module)

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_step = trainer.global_step
        # a collective under DDP: every rank must ask, never inside rank-zero code; files only go to a logger's run
        # directory (without a logger, log_dir would be the working directory)
        self._log_dir = trainer.log_dir if trainer.loggers else None
        with preserved_rng():
            start = time.perf_counter()
            op = self.operator(trainer, pl_module)
            finite = all(bool(torch.isfinite(p).all()) for p in op.params)
            metrics = self.compute(trainer, pl_module, op)  # the solvers return NaN for a non-finite operator
            if not all(np.isfinite(v) for v in metrics.values()):
                rank_zero_warn(
                    f"{type(self).__name__}: non-finite {'weights' if not finite else 'curvature'} at step "
                    f"{trainer.global_step} (epoch {trainer.current_epoch}); logging NaN for this measurement."
                )
            metrics[f"{self.prefix}/{self.cost_name}seconds"] = time.perf_counter() - start
            metrics[f"{self.prefix}/{self.cost_name}hvps"] = float(op.num_matvecs)
        self.num_measurements += 1
        self._log(trainer, metrics)

    def compute(self, trainer: pl.Trainer, pl_module: pl.LightningModule, op: HessianOperator) -> dict[str, float]:
        raise NotImplementedError

    # ---- output ------------------------------------------------------------------------------------------------
    @rank_zero_only
    def _log(self, trainer: pl.Trainer, metrics: dict[str, float]) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        for cb in trainer.callbacks:
            if isinstance(cb, HistoryCSV):
                cb.extra_row(trainer, metrics)

    def save_path(self, trainer: pl.Trainer, name: str) -> str | None:
        """A file in the run directory (read by :meth:`_measure` on every rank: ``trainer.log_dir`` broadcasts)."""
        if self._log_dir is None:
            return None
        os.makedirs(self._log_dir, exist_ok=True)
        return os.path.join(self._log_dir, name)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"num_measurements": self.num_measurements}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_measurements = state_dict.get("num_measurements", 0)


class HessianEigenvalues(CurvatureCallback):
    """Top-k Hessian eigenvalues of the training loss on a fixed sample, by Lanczos, during training.

    Follows Jastrzębski et al. 2019 ("On the relation between the sharpest directions of DNN loss and the SGD step
    length", arXiv 1807.05031; SPEC §3.2): k=5 on N=2250 training examples, every epoch. Lanczos with full
    reorthogonalisation stops when the top-k Ritz pairs have relative residual ≤ ``tol``.

    Args:
        top_k: number of eigenvalues (logged as ``hessian/lambda_1..k``, descending).
        max_iter: maximum Lanczos iterations (HVPs) per measurement.
        tol: relative Ritz residual for convergence (``hessian/residual_i`` are logged, and ``hessian/converged``).
        which: ``LA`` (largest, default) or ``SA`` (smallest: λ_min).
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
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if top_k < 1:
            raise ConfigError(f"HessianEigenvalues(top_k): must be >= 1, got {top_k}.")
        if which not in ("LA", "SA"):
            raise ConfigError(f"HessianEigenvalues(which): 'LA' or 'SA', got {which!r}.")
        if max_iter < top_k:
            raise ConfigError(f"HessianEigenvalues(max_iter): must be >= top_k={top_k}, got {max_iter}.")
        self.top_k, self.max_iter, self.tol, self.which = top_k, max_iter, tol, which
        self.save_eigenvectors = save_eigenvectors
        self.history: dict[str, list] = {"step": [], "epoch": [], "eigenvalues": [], "residuals": []}
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
        )
        self.last_result, self.last_step = res, trainer.global_step
        self.history["step"].append(trainer.global_step)
        self.history["epoch"].append(trainer.current_epoch)
        self.history["eigenvalues"].append(res.eigenvalues.tolist())
        self.history["residuals"].append(res.residuals.tolist())
        self._save(trainer, res)
        metrics = {f"{self.prefix}/lambda_{i + 1}": float(v) for i, v in enumerate(res.eigenvalues)}
        metrics.update({f"{self.prefix}/residual_{i + 1}": float(r) for i, r in enumerate(res.residuals)})
        metrics[f"{self.prefix}/converged"] = float(res.converged)
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
        return {**super().state_dict(), "history": {k: list(v) for k, v in self.history.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.history = {k: list(v) for k, v in state_dict.get("history", self.history).items()}


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
