"""SmoothOut and AdaSmoothOut (Wen et al. 2018, arXiv 1805.07898; SPEC §1.2), with ASO as an option (§5.5).

For each ghost batch: draw uniform (or normal) noise n, add it to the weights, forward/backward at w + n,
remove the noise (the weights are restored exactly); the averaged gradient is stepped at the clean weights.
"""

from __future__ import annotations

from typing import Any

from flatlit.methods._perturb import SMOOTHOUT_ADAPT, SMOOTHOUT_SCHEDULES, smoothout_noise, smoothout_scale
from flatlit.methods.perturbation import PerturbationModule
from flatlit.utils.batching import batch_size, split_batch
from flatlit.utils.errors import ConfigError


class SmoothOut(PerturbationModule):
    """SmoothOut / AdaSmoothOut around any injected base optimizer.

    Args:
        a: noise amplitude (the original's ``--ss``; e.g. 0.009 for ASO).
        adapt: ``none`` (SmoothOut), ``weight`` (|w| scaling), ``filter`` (AdaSmoothOut: per-filter norm) or
            ``tensor`` (ASO: scaled by ‖w_tensor‖, what LPF-SGD's baseline intended).
        noise_type: ``uniform`` (U(−1, 1)) or ``normal``.
        schedule: noise multiplier c(t): ``constant``, ``anneal`` ((1+t)^(−ai/2)) or ``tanh`` (ramp 0→1).
        anneal_index: ai of ``anneal``.
        tanh_scale: steepness of ``tanh``.
        exclude_bn: leave BatchNorm parameters unperturbed (default, as the original).
        ghost_batch_size: split the batch into ghost batches of this size, each with fresh noise (None: one pass).
        bn_stats_on_noisy_pass: BatchNorm statistics update during the noisy passes (the original); when False
            they are frozen there and updated by one extra clean forward pass.
        clean_loss: log ``train/loss``/``train/acc`` at the clean weights (one extra no-grad forward pass).
        **kwargs: :class:`~flatlit.methods.perturbation.PerturbationModule` arguments.
    """

    def __init__(
        self,
        *args: Any,
        a: float = 0.01,
        adapt: str = "none",
        noise_type: str = "uniform",
        schedule: str = "constant",
        anneal_index: float = 0.55,
        tanh_scale: float = 10.0,
        exclude_bn: bool = True,
        ghost_batch_size: int | None = None,
        bn_stats_on_noisy_pass: bool = True,
        clean_loss: bool = False,
        **kwargs: Any,
    ) -> None:
        if a < 0:
            raise ConfigError(f"model.init_args.a: the noise amplitude must be >= 0, got {a}.")
        if adapt not in SMOOTHOUT_ADAPT:
            raise ConfigError(f"model.init_args.adapt: one of {', '.join(SMOOTHOUT_ADAPT)}, got {adapt!r}.")
        if noise_type not in ("uniform", "normal"):
            raise ConfigError(f"model.init_args.noise_type: 'uniform' or 'normal', got {noise_type!r}.")
        if schedule not in SMOOTHOUT_SCHEDULES:
            raise ConfigError(f"model.init_args.schedule: one of {', '.join(SMOOTHOUT_SCHEDULES)}, got {schedule!r}.")
        if ghost_batch_size is not None and ghost_batch_size < 1:
            raise ConfigError(f"model.init_args.ghost_batch_size: must be >= 1 or null, got {ghost_batch_size}.")
        super().__init__(*args, **kwargs)
        self.a, self.adapt, self.noise_type = a, adapt, noise_type
        self.schedule, self.anneal_index, self.tanh_scale = schedule, anneal_index, tanh_scale
        self.exclude_bn, self.ghost_batch_size = exclude_bn, ghost_batch_size
        self.bn_stats_on_noisy_pass, self.clean_loss = bn_stats_on_noisy_pass, clean_loss

    def current_scale(self) -> float:
        total = self.total_updates() if self.schedule == "tanh" else 0
        return smoothout_scale(self.schedule, self.global_step, total, self.anneal_index, self.tanh_scale)

    def compute_gradients(self, batch: Any, scale: float, sync: bool):
        params = [p for _, p in self.named_trainable(self.exclude_bn)]
        c = self.current_scale()
        gen, bufs = self.noise_generator(), self.noise_buffers(params)
        chunks = split_batch(batch, size=self.ghost_batch_size or max(1, batch_size(batch)))

        def draw():
            if self.a == 0:
                return None
            return smoothout_noise(params, self.a, c, self.adapt, self.noise_type, gen, bufs)

        loss, outputs, noisy_loss = self.noisy_passes(
            batch, chunks, params, draw, scale, sync, self.bn_stats_on_noisy_pass, self.clean_loss
        )
        extras = {
            "train/noisy_loss": noisy_loss,
            "train/noise_amplitude": self.a * c,
            "train/passes_per_step": float(len(chunks) * self.accumulate_grad_batches),
        }
        return loss, outputs, extras
