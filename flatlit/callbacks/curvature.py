"""The curvature callbacks: Hessian eigenvalues (Lanczos, LOBPCG), trace (Hutchinson) and spectral density (SLQ).

Each is a :class:`~flatlit.callbacks.curvature_base.CurvatureCallback` (the shared sample, loss resolution,
scheduling, observe-never-perturb and logging: see :mod:`flatlit.callbacks.curvature_base`) that only says what one
measurement computes on the Hessian operator of the sample. ``CurvatureCallback``, ``unpack_xy``, ``X_KEYS``,
``Y_KEYS`` and ``class_logits`` are re-exported here for the code that imports them from this module.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from flatlit.callbacks.curvature_base import BatchLossFn, CurvatureCallback, LossFn  # noqa: F401 (re-exported)
from flatlit.curvature import EigenResult, HessianOperator, hutchinson, lanczos, lobpcg, slq_density
from flatlit.objective import X_KEYS, Y_KEYS, class_logits, unpack_xy
from flatlit.utils.errors import ConfigError

__all__ = ["X_KEYS", "Y_KEYS", "CurvatureCallback", "class_logits", "unpack_xy"]


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
