"""Nudged SGD (NSGD; Jastrzębski et al. 2019, arXiv 1807.05031, SPEC §3.3): a step whose component along the
top-KK Hessian eigendirections V is scaled by the overshoot γ.

``correct_v`` (default): the base optimizer computes its step Δ (SGD with momentum: Δ = μm − lr·g) and the
weights move by Δ + (γ−1) V Vᵀ Δ; the optimizer's buffers keep the uncorrected velocity, as in the original.
``correct_g``: the gradient is replaced by g + (γ−1) V Vᵀ g before the base step. Either way the effective
learning rate is γ·lr along V and lr on its complement. V is refreshed at the start of every epoch after
``burnin`` epochs (plain steps until then), from a :class:`~flatlit.callbacks.HessianEigenvalues` callback when
one is attached and measured the same parameters (no second computation), otherwise from the curvature engine
on the DataModule's fixed sample. ``random_subspace`` replaces V by a random orthonormal KK-frame (the ablation).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from flatlit.curvature import HessianOperator, lanczos
from flatlit.curvature.hvp import flatten, unflatten
from flatlit.methods.sgd import SGDFamily
from flatlit.utils.errors import ConfigError


class NSGD(SGDFamily):
    """Nudged SGD around the injected base optimizer (the original: SGD, momentum 0).

    Args:
        overshoot: γ, the step multiplier along the sharpest directions (1 = the base optimizer).
        KK: number of sharpest directions used.
        burnin: epochs of plain steps before nudging starts.
        mode: ``correct_v`` (correct the step) or ``correct_g`` (correct the gradient).
        random_subspace: use a random orthonormal KK-frame instead of eigenvectors (ablation).
        num_samples, batch_size, max_iter, tol, include_l2, seed: the eigenvector computation when no
            HessianEigenvalues callback provides it (SPEC: N=2250, L2 included).
        **kwargs: :class:`~flatlit.methods.base.ClassificationModule` arguments.
    """

    def __init__(
        self,
        *args: Any,
        overshoot: float = 1.0,
        KK: int = 5,
        burnin: int = 0,
        mode: str = "correct_v",
        random_subspace: bool = False,
        num_samples: int = 2250,
        batch_size: int = 250,
        max_iter: int = 100,
        tol: float = 1e-3,
        include_l2: bool = True,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        if overshoot < 0:
            raise ConfigError(f"model.init_args.overshoot: must be >= 0, got {overshoot}.")
        if KK < 1:
            raise ConfigError(f"model.init_args.KK: must be >= 1, got {KK}.")
        if mode not in ("correct_v", "correct_g"):
            raise ConfigError(f"model.init_args.mode: 'correct_v' or 'correct_g', got {mode!r}.")
        super().__init__(*args, **kwargs)
        self.overshoot, self.KK, self.burnin, self.mode = overshoot, KK, burnin, mode
        self.random_subspace = random_subspace
        self.num_samples, self.batch_size, self.max_iter, self.tol = num_samples, batch_size, max_iter, tol
        self.include_l2, self.seed = include_l2, seed
        self.directions: torch.Tensor | None = None  # KK × n, orthonormal rows
        self.eigen_source = "none"

    def _trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def refresh_directions(self) -> None:
        """Take V from an attached HessianEigenvalues callback, or compute it."""
        params = self._trainable()
        n = sum(p.numel() for p in params)
        if self.random_subspace:
            g = torch.Generator().manual_seed(self.seed + self.current_epoch)
            q, _ = torch.linalg.qr(torch.randn(n, self.KK, generator=g, dtype=torch.float64))
            self.directions, self.eigen_source = q.T.to(params[0]), "random"
            return
        from flatlit.callbacks.curvature import HessianEigenvalues

        for cb in self.trainer.callbacks:
            res = getattr(cb, "last_result", None)
            if (
                isinstance(cb, HessianEigenvalues)
                and res is not None
                and res.eigenvectors is not None
                and cb.which == "LA"
                and res.eigenvectors.shape[0] >= self.KK
                and res.eigenvectors.shape[1] == n
                and cb.last_step == self.global_step
            ):
                self.directions, self.eigen_source = res.eigenvectors[: self.KK].to(params[0]), "callback"
                return
        dm = self.trainer.datamodule
        rank, world = self.trainer.global_rank, self.trainer.world_size
        batches = dm.curvature_batches(self.num_samples, self.batch_size, self.seed, False, rank, world)
        batches = [move_data_to_device(b, self.device) for b in batches]
        wd = float(self.trainer.optimizers[0].param_groups[0].get("weight_decay", 0.0)) if self.include_l2 else 0.0
        loss = lambda b: self.training_loss(b)[0]  # noqa: E731
        op = HessianOperator(self, batches, params=params, weight_decay=wd, batch_loss=loss)
        state = torch.get_rng_state()
        res = lanczos(op.matvec, op.numel, self.KK, self.max_iter, self.tol, self.seed, "LA", op.dtype, op.device)
        torch.set_rng_state(state)
        self.directions, self.eigen_source = res.eigenvectors, "own"

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        if self.current_epoch >= self.burnin and self.overshoot != 1.0:
            self.refresh_directions()
        else:
            self.directions = None

    def _nudge(self, tensors: list[torch.Tensor]) -> None:
        """tensors += (γ − 1) V Vᵀ tensors (flattened over the trainable parameters), in place."""
        V = self.directions
        flat = flatten(tensors)
        flat = flat + (self.overshoot - 1.0) * (V.T @ (V @ flat))
        for t, new in zip(tensors, unflatten(flat, tensors)):
            t.copy_(new)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        if self.directions is None:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        params = self._trainable()
        if self.mode == "correct_g":

            def closure() -> Any:
                loss = optimizer_closure()
                with torch.no_grad():
                    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
                    self._nudge(grads)
                    for p, g in zip(params, grads):
                        p.grad = g
                return loss

            optimizer.step(closure=closure)
            return None
        before = [p.detach().clone() for p in params]
        optimizer.step(closure=optimizer_closure)
        with torch.no_grad():
            delta = [p.detach() - b for p, b in zip(params, before)]
            self._nudge(delta)
            for p, b, d in zip(params, before, delta):
                p.copy_(b + d)
        return None
