"""LPF-SGD: low-pass filtering SGD (Bisla, Wang, Choromanska 2022, arXiv 2201.08025; SPEC §5.2).

The stepped gradient is a Monte-Carlo estimate of ∇(L ⊛ K_Σ)(w) = E_{ε~N(0,Σ)} ∇L(w + ε): the batch is split
into M chunks, each evaluated at its own noisy point, and the chunk gradients are averaged. Σ is diagonal with a
per-filter std σ_j = γ‖w_j‖ (per tensor for 1-D parameters); γ follows the CosineInc schedule, stepped per
optimizer step.
"""

from __future__ import annotations

from typing import Any

from flatlit.methods._perturb import cosine_inc, lpf_noise
from flatlit.methods.perturbation import PerturbationModule
from flatlit.utils.batching import split_batch
from flatlit.utils.errors import ConfigError


class LPFSGD(PerturbationModule):
    """LPF-SGD around any injected base optimizer (the paper uses SGD with momentum 0.9).

    Args:
        gamma: γ₀, the noise std relative to the filter norm (0.001 MNIST, 0.002 CIFAR, 0.0005 ImageNet).
        num_samples: M, Monte-Carlo samples per step; the batch is split into M chunks (must divide the batch size).
        inc: CosineInc final multiple: γ rises from γ₀ to inc·γ₀ along a half cosine over the run's optimizer
            updates (1 = fixed γ). It equals the original's ``--inc`` (the README's α): ``--inc 15`` is ``inc: 15``.
        exclude_bn: leave BatchNorm parameters unperturbed (the original perturbs all parameters).
        exclude_bias: leave biases unperturbed.
        bn_stats_on_noisy_pass: BatchNorm statistics update during the noisy passes (the original). When False
            they are frozen during the noisy passes and updated by one extra clean forward pass.
        clean_loss: log ``train/loss``/``train/acc`` at the clean weights with one extra no-grad forward pass;
            by default they are measured at the noisy points (free; the noisy loss is what the original logs).
        **kwargs: :class:`~flatlit.methods.perturbation.PerturbationModule` arguments.
    """

    def __init__(
        self,
        *args: Any,
        gamma: float = 0.002,
        num_samples: int = 1,
        inc: float = 1.0,
        exclude_bn: bool = False,
        exclude_bias: bool = False,
        bn_stats_on_noisy_pass: bool = True,
        clean_loss: bool = False,
        **kwargs: Any,
    ) -> None:
        if gamma < 0:
            raise ConfigError(f"model.init_args.gamma: must be >= 0, got {gamma}.")
        if num_samples < 1:
            raise ConfigError(f"model.init_args.num_samples: M must be >= 1, got {num_samples}.")
        if inc < 1:
            raise ConfigError(f"model.init_args.inc: the final multiple of gamma must be >= 1, got {inc}.")
        super().__init__(*args, **kwargs)
        self.gamma0, self.num_samples, self.inc = gamma, num_samples, inc
        self.exclude_bn, self.exclude_bias = exclude_bn, exclude_bias
        self.bn_stats_on_noisy_pass, self.clean_loss = bn_stats_on_noisy_pass, clean_loss

    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = getattr(self.trainer, "datamodule", None)
        bs = getattr(dm, "batch_size", None)
        if bs is not None and bs % self.num_samples:
            raise ConfigError(
                f"model.init_args.num_samples: M={self.num_samples} must divide data.init_args.batch_size={bs}."
            )

    def current_gamma(self) -> float:
        total = self.total_updates() if self.inc != 1 else 0
        return cosine_inc(self.global_step, total, self.gamma0, self.inc)

    def compute_gradients(self, batch: Any, scale: float, sync: bool):
        params = [p for _, p in self.named_trainable(self.exclude_bn, self.exclude_bias)]
        gamma = self.current_gamma()
        gen, bufs = self.noise_generator(), self.noise_buffers(params)
        loss, outputs, noisy_loss = self.noisy_passes(
            batch,
            split_batch(batch, sections=self.num_samples),
            params,
            lambda: lpf_noise(params, gamma, gen, bufs),
            scale,
            sync,
            self.bn_stats_on_noisy_pass,
            self.clean_loss,
        )
        extras = {
            "train/noisy_loss": noisy_loss,
            "train/gamma": gamma,
            "train/passes_per_step": float(self.num_samples * self.accumulate_grad_batches),
        }
        return loss, outputs, extras
