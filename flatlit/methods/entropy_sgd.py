"""Entropy-SGD (Chaudhari et al. 2017, arXiv 1611.01838), as run in LPF-SGD's baselines (SPEC §5.4).

An outer step at the anchor w_c is preceded by L inner SGLD steps on the local-entropy objective:

    dw = ∇L_B(w) − g (w_c − w) + wd_sgld·w;  m ← μ m + dw;  m += ε/√(½ η') ξ;  w ← w − η' m;
    μ_w ← α μ_w + (1 − α) w

(ξ ~ N(0, I); the noise lands in the momentum buffer, as in the original, where ``dw`` aliases it). Then the
weights return to w_c and the base optimizer steps with the gradient w_c − μ_w and learning rate g·lr
(``gscale``). The coupling g = min(g₀(1+g₁)^t, g_max) grows with the outer step count t.

Counting: every training batch is one inner step; an outer step (one ``optimizer.step()``, so one
``global_step``) happens every L batches and at the end of each epoch. An epoch is one pass over the data, i.e.
``len(loader)/L`` outer steps; the original ran ``len(loader)`` outer steps per epoch (L passes over the data),
so its "40 epochs" are ``max_epochs = 40·L`` here.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from flatlit.methods.perturbation import PerturbationModule
from flatlit.utils.errors import ConfigError


class EntropySGD(PerturbationModule):
    """Entropy-SGD around the injected base optimizer (SGD with momentum and weight decay in the original).

    Args:
        L: inner SGLD steps (batches) per outer step.
        eps: SGLD noise scale ε (thermal noise).
        g0, g1, gmax: coupling ("scoping") g = min(g₀(1+g₁)^t, g_max).
        sgld_lr: inner learning rate η'.
        alpha: averaging factor of μ_w.
        sgld_momentum: inner momentum.
        sgld_weight_decay: inner weight decay.
        gscale: multiply the outer learning rate by g.
        **kwargs: :class:`~flatlit.methods.perturbation.PerturbationModule` arguments (no accumulation: L batches
            already make one outer step).
    """

    def __init__(
        self,
        *args: Any,
        L: int = 5,
        eps: float = 1e-4,
        g0: float = 0.5,
        g1: float = 1e-4,
        gmax: float = 2.38,
        sgld_lr: float = 0.1,
        alpha: float = 0.75,
        sgld_momentum: float = 0.9,
        sgld_weight_decay: float = 1e-4,
        gscale: bool = True,
        **kwargs: Any,
    ) -> None:
        if L < 1:
            raise ConfigError(f"model.init_args.L: must be >= 1, got {L}.")
        if kwargs.get("accumulate_grad_batches", 1) != 1:
            raise ConfigError("model.init_args.accumulate_grad_batches: Entropy-SGD already spans L batches per step.")
        if not 0 <= alpha < 1:
            raise ConfigError(f"model.init_args.alpha: must lie in [0, 1), got {alpha}.")
        super().__init__(*args, **kwargs)
        self.L, self.eps, self.g0, self.g1, self.gmax = L, eps, g0, g1, gmax
        self.sgld_lr, self.alpha = sgld_lr, alpha
        self.sgld_momentum, self.sgld_weight_decay, self.gscale = sgld_momentum, sgld_weight_decay, gscale
        self._inner = 0
        self._anchor: list[torch.Tensor] | None = None

    def updates_per_epoch(self, batches: int) -> int:
        return math.ceil(batches / self.L)  # an outer step every L batches and at the end of each epoch

    def rank_offset(self) -> int:
        return 0  # identical SGLD noise on every replica keeps DDP replicas in lockstep

    def coupling(self) -> float:
        return min(self.g0 * (1 + self.g1) ** self.global_step, self.gmax)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        params = [p for _, p in self.named_trainable()]
        g = self.coupling()
        if self._inner == 0:  # a new outer step: anchor w_c, average μ_w, momentum buffer
            self._anchor = [p.detach().clone() for p in params]
            self._mu = [p.detach().clone() for p in params]
            self._mdw = [torch.zeros_like(p) for p in params]
        loss, outputs = self.training_loss(batch)
        self._step_loss = loss.detach()
        self.manual_backward(loss)
        gen = self.noise_generator()
        noise_scale = self.eps / math.sqrt(0.5 * self.sgld_lr)
        scale, scaler = self.loss_scale(), self.grad_scaler()
        grads = [p.grad for p in params if p.grad is not None]
        if scaler is not None and grads and not bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()):
            # an fp16 overflow in this inner step: drop its gradient and lower the scale, as GradScaler.step would
            scaler.update(new_scale=scale * scaler.get_backoff_factor())
            for p in params:
                p.grad = None
            skip = True
        else:
            skip = False
        with torch.no_grad():
            for p, wc, mu, mdw in zip(params, self._anchor, self._mu, self._mdw):
                if skip:
                    break
                dw = p.grad / scale if p.grad is not None else torch.zeros_like(p)
                dw = dw - g * (wc - p) + self.sgld_weight_decay * p
                mdw.mul_(self.sgld_momentum).add_(dw)
                if self.eps > 0:
                    mdw.add_(torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype), alpha=noise_scale)
                p.sub_(mdw, alpha=self.sgld_lr)
                mu.mul_(self.alpha).add_(p, alpha=1 - self.alpha)
                p.grad = None
        self._inner += 1
        last = self.trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        if self._inner >= self.L or last:
            with torch.no_grad():
                scale = self.loss_scale()  # 16-mixed: the step unscales by S
                for p, wc, mu in zip(params, self._anchor, self._mu):
                    p.copy_(wc)
                    p.grad = (wc - mu) * scale if scale != 1.0 else wc - mu
            opt = self.optimizers()
            groups = opt.optimizer.param_groups
            lrs = [group["lr"] for group in groups]
            if self.gscale:
                for group in groups:
                    group["lr"] = group["lr"] * g
            self.optimizer_update()
            for group, lr in zip(groups, lrs):
                group["lr"] = lr
            self._inner = 0
            self._anchor = self._mu = self._mdw = None
        self.log_train(loss, outputs, batch, {"train/coupling": g, "train/passes_per_step": float(self.L)})
        self.step_epoch_schedulers_on_last_batch()
