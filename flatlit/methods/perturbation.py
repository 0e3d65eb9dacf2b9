"""Shared machinery of the multi-pass perturbation families (SAM, LPF-SGD, SmoothOut, Entropy-SGD).

Manual optimization, done so Lightning behaves as with automatic optimization (PEERS §4.1, §9):

- exactly one ``LightningOptimizer.step()`` per optimizer update (per batch, or per ``accumulate_grad_batches``
  batches), so ``global_step``, ``max_steps``, ModelCheckpoint and per-step schedulers count as usual
  (Lightning issue #16143); ``configure_optimizers`` returns the plain base optimizer, so its state (momentum) is
  checkpointed and perturbation buffers are not;
- gradient clipping and accumulation are offered here (Lightning refuses both in manual mode); clipping acts on
  the gradient that is stepped, after the last (perturbed) pass and, under DDP, after the all-reduce;
- LR schedulers are stepped by the module (Lightning leaves that to manual-optimization modules);
- passes whose gradient must stay local run under ``strategy.block_backward_sync()`` (no DDP all-reduce);
- a module-owned noise generator (seeded by ``noise_seed`` and the rank) is saved in the checkpoint, and every
  schedule reads ``global_step``, so a resumed run draws the same noise;
- ``16-mixed`` precision (fp16 autocast with Lightning's GradScaler): every backward pass of a step is scaled by
  the same factor S (``manual_backward``), so the accumulated gradient is S times the family's gradient and
  Lightning's single ``optimizer.step()`` unscales it, checks it for inf/NaN and skips the step (lowering S) when
  any pass overflowed; a perturbation built from a pass-1 gradient is scale-invariant (SAM's ε = ρ g/‖g‖) or
  unscaled explicitly (AE-SAM's ‖g‖², Entropy-SGD's inner steps), clipping acts on S times the threshold, and the
  scaler's state is in the checkpoint (Lightning's precision plugin). ``16-true`` is refused (no loss scaling).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from lightning.pytorch.strategies import ParallelStrategy
from torch import nn

from flatlit.methods.base import ClassificationModule
from flatlit.utils.batching import batch_size, cat_outputs
from flatlit.utils.errors import ConfigError
from flatlit.utils.nn import frozen_bn_stats, is_bn_param


class PerturbationModule(ClassificationModule):
    """Base class of the manual-optimization families.

    Args:
        gradient_clip_val: clip the stepped gradient to this norm (or value); None disables clipping.
        gradient_clip_algorithm: ``norm`` or ``value``.
        accumulate_grad_batches: optimizer update every k batches (gradients of the k batches averaged).
        noise_seed: seed of the perturbation noise generator (offset by the DDP rank).
        **kwargs: :class:`~flatlit.methods.base.ClassificationModule` arguments (arch, optimizer, ...).

    Subclasses implement :meth:`compute_gradients`.
    """

    def __init__(
        self,
        *args: Any,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
        accumulate_grad_batches: int = 1,
        noise_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if gradient_clip_algorithm not in ("norm", "value"):
            raise ConfigError(
                f"model.init_args.gradient_clip_algorithm: 'norm' or 'value', got {gradient_clip_algorithm!r}."
            )
        if accumulate_grad_batches < 1:
            raise ConfigError(f"model.init_args.accumulate_grad_batches: must be >= 1, got {accumulate_grad_batches}.")
        if gradient_clip_val is not None and gradient_clip_val <= 0:
            raise ConfigError(f"model.init_args.gradient_clip_val: must be > 0 or null, got {gradient_clip_val}.")
        self.automatic_optimization = False
        self.gradient_clip_val = gradient_clip_val
        self.gradient_clip_algorithm = gradient_clip_algorithm
        self.accumulate_grad_batches = accumulate_grad_batches
        self.noise_seed = noise_seed
        self._micro = 0
        self._gen: torch.Generator | None = None
        self._gen_state: torch.Tensor | None = None
        self._backup: list[torch.Tensor] | None = None

    # ---- Lightning plumbing -------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        super().setup(stage)
        precision = str(self.trainer.precision)
        if precision in ("16", "16-true"):
            raise ConfigError(
                f"trainer.precision: {type(self).__name__} runs several backward passes per step and needs loss "
                f"scaling in fp16; precision={precision!r} has none. Use '16-mixed', 'bf16-mixed' or '32-true'."
            )

    def noise_generator(self) -> torch.Generator:
        """The module's noise generator on the parameters' device (restored from the checkpoint if resuming)."""
        device = next(self.parameters()).device
        if self._gen is None or self._gen.device != device:
            self._gen = torch.Generator(device=device)
            rank = self.trainer.global_rank if self._trainer is not None else 0
            self._gen.manual_seed(self.noise_seed * 1_000_003 + self.rank_offset() * rank)
            if self._gen_state is not None:
                self._gen.set_state(self._gen_state)
                self._gen_state = None
        return self._gen

    def rank_offset(self) -> int:
        """Multiplier of the rank in the noise seed (0 gives every rank the same noise)."""
        return 7919

    def resume_state(self) -> dict[str, Any]:
        """Adds this rank's noise generator and the accumulation position to the checkpointed state."""
        state = super().resume_state()
        gen_state = self._gen.get_state() if self._gen is not None else self._gen_state
        state["noise_rng"] = None if gen_state is None else gen_state.cpu()
        state["micro"] = self._micro
        return state

    def load_resume_state(self, state: dict[str, Any]) -> None:
        super().load_resume_state(state)
        self._gen_state = state.get("noise_rng")
        self._gen = None
        self._micro = int(state.get("micro", 0))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if "flatlit_noise_rng" in checkpoint:  # checkpoints of flatlit 0.1
            self._gen_state, self._gen = checkpoint["flatlit_noise_rng"], None

    def no_sync(self, enabled: bool = True) -> AbstractContextManager:
        """Skip the DDP gradient all-reduce for the backward passes inside (a no-op without DDP)."""
        strategy = self.trainer.strategy
        if enabled and isinstance(strategy, ParallelStrategy):
            return strategy.block_backward_sync()
        return nullcontext()

    # ---- parameter helpers --------------------------------------------------------------------------------------
    def named_trainable(self, exclude_bn: bool = False, exclude_bias: bool = False) -> list[tuple[str, nn.Parameter]]:
        bn = is_bn_param(self.model) if exclude_bn else set()
        return [
            (n, p)
            for n, p in self.model.named_parameters()
            if p.requires_grad and id(p) not in bn and not (exclude_bias and n.endswith("bias"))
        ]

    def backup(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Copy the parameters into reusable buffers (kept outside the optimizer state)."""
        if (
            self._backup is None
            or len(self._backup) != len(params)
            or any(b.shape != p.shape or b.device != p.device for b, p in zip(self._backup, params))
        ):
            self._backup = [torch.empty_like(p) for p in params]
        with torch.no_grad():
            torch._foreach_copy_(self._backup, [p.detach() for p in params])
        return self._backup

    def noise_buffers(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Reusable noise buffers, one per parameter (no allocation per step)."""
        bufs = getattr(self, "_noise_bufs", None)
        if (
            bufs is None
            or len(bufs) != len(params)
            or any(b.shape != p.shape or b.device != p.device or b.dtype != p.dtype for b, p in zip(bufs, params))
        ):
            bufs = self._noise_bufs = [torch.empty_like(p) for p in params]
        return bufs

    @staticmethod
    def restore(params: Sequence[torch.Tensor], saved: Sequence[torch.Tensor]) -> None:
        """Copy the saved values back: the clean weights are restored bit for bit."""
        with torch.no_grad():
            torch._foreach_copy_([p.data for p in params], list(saved))

    def noisy_passes(
        self,
        batch: Any,
        chunks: Sequence[Any],
        params: Sequence[torch.Tensor],
        draw: Callable[[], Sequence[torch.Tensor] | None],
        scale: float,
        sync: bool,
        bn_stats_on_noisy_pass: bool,
        clean_loss: bool,
    ) -> tuple[torch.Tensor, Any, torch.Tensor]:
        """One forward/backward per chunk of ``batch`` (:func:`~flatlit.utils.batching.split_batch`) at w + draw(), the
        weights restored exactly after each pass; every loss comes from :meth:`training_loss`.

        Gradients accumulate as Σ_c (|c|/|B|)·scale·∇L_c(w + n_c): the size-weighted mean over chunks. Only the last
        pass of an update all-reduces under DDP. Returns (loss, outputs) for logging (the clean point when
        ``clean_loss`` or when BN statistics come from a clean pass, else the noisy points) and the noisy loss.
        """
        chunks = [c for c in chunks if batch_size(c) > 0]
        n = batch_size(batch)
        saved = self.backup(params)
        losses, outputs_all = [], []
        for i, chunk in enumerate(chunks):
            noise = draw()
            if noise is not None:
                with torch.no_grad():
                    torch._foreach_add_([p.data for p in params], list(noise))
            last = i == len(chunks) - 1
            share = batch_size(chunk) / n
            with frozen_bn_stats(self.model, not bn_stats_on_noisy_pass), self.no_sync(not (sync and last)):
                loss, outputs = self.training_loss(chunk)
                self.manual_backward(loss * share * scale)
            self.restore(params, saved)
            losses.append(loss.detach() * share)
            outputs_all.append(outputs)
        noisy_loss = torch.stack(losses).sum()
        outputs, loss = cat_outputs(outputs_all), noisy_loss
        if clean_loss or not bn_stats_on_noisy_pass:
            # one clean no-grad pass: the clean-point loss, and the BN statistics when the noisy passes froze them
            with torch.no_grad(), frozen_bn_stats(self.model, bn_stats_on_noisy_pass):
                loss, outputs = self.training_loss(batch)
        return loss, outputs, noisy_loss

    @staticmethod
    def put_grads(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> None:
        for p, g in zip(params, grads):
            if g is None:
                continue
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)

    # ---- schedules ---------------------------------------------------------------------------------------------
    def updates_per_epoch(self, batches: int) -> int:
        """Optimizer updates in an epoch of ``batches`` batches (an update every k batches and at the epoch end)."""
        return math.ceil(batches / self.accumulate_grad_batches)

    def total_updates(self) -> int:
        """T, the number of optimizer updates of the whole run, however it is bounded.

        ``trainer.estimated_stepping_batches`` counts batches for manual optimization (Lightning's own
        ``accumulate_grad_batches`` is 1 there): here an epoch of ``num_training_batches`` batches (after
        ``limit_train_batches``, per process under DDP) makes :meth:`updates_per_epoch` updates, times
        ``max_epochs``, capped by ``max_steps``. Schedules over the run (CosineInc, SmoothOut's tanh) use it.
        """
        trainer = self.trainer
        batches = trainer.num_training_batches
        max_epochs, max_steps = trainer.max_epochs, trainer.max_steps
        epochs_bound = max_epochs is not None and max_epochs >= 0 and math.isfinite(batches)
        total = self.updates_per_epoch(int(batches)) * max_epochs if epochs_bound else math.inf
        if max_steps is not None and max_steps >= 0:
            total = min(total, max_steps)
        if not math.isfinite(total):
            raise ConfigError(
                f"{type(self).__name__}: its schedule needs the run's length; set trainer.max_steps (the training "
                "data has no length) or trainer.max_epochs."
            )
        return int(total)

    # ---- the training step --------------------------------------------------------------------------------------
    def compute_gradients(self, batch: Any, scale: float, sync: bool) -> tuple[torch.Tensor, Any, dict[str, Any]]:
        """Accumulate ``scale`` × this family's gradient of :meth:`training_loss` on ``batch`` into ``.grad``.

        ``sync`` is True on the pass that ends an optimizer update (its backward all-reduces under DDP).
        Returns (loss, outputs, extras) for logging: the training loss and outputs, and family scalars.
        """
        raise NotImplementedError

    def is_update_batch(self) -> bool:
        last = self.trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        return last or self._micro + 1 >= self.accumulate_grad_batches

    def training_step(self, batch: Any, batch_idx: int) -> None:
        step_now = self.is_update_batch()
        loss, outputs, extras = self.compute_gradients(batch, 1.0 / self.accumulate_grad_batches, sync=step_now)
        self._step_loss = loss.detach()
        if step_now:
            self.optimizer_update()
        else:
            self._micro += 1
        self.log_train(loss, outputs, batch, extras)
        self.step_epoch_schedulers_on_last_batch()

    def optimizer_update(self) -> None:
        """Clip, take exactly one optimizer step, zero the gradients, step per-step schedulers."""
        opt = self.optimizers()
        if self.gradient_clip_val is not None:  # the gradients are still scaled by S here under 16-mixed
            self.clip_gradients(opt, self.gradient_clip_val * self.loss_scale(), self.gradient_clip_algorithm)
        opt.step()
        opt.zero_grad(set_to_none=False)  # zeroed in place: the gradient buffers are reused by the next step
        self._micro = 0
        if self.hparams.scheduler_interval == "step":
            self._step_schedulers()

    def step_epoch_schedulers_on_last_batch(self) -> None:
        """Step the epoch-interval schedulers (except ReduceLROnPlateau) with the epoch's last batch, not in
        ``on_train_epoch_end``: a checkpoint written after this batch then holds the stepped scheduler (Lightning
        does not rerun the epoch-end hooks when it resumes from such a checkpoint)."""
        if self.hparams.scheduler_interval == "epoch" and self.trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self._step_schedulers(plateau=False)

    def _step_schedulers(self, plateau: bool | None = None) -> None:
        """Step the LR schedulers (``plateau``: only ReduceLROnPlateau (True), only the others (False), all)."""
        schedulers = self.lr_schedulers()
        if schedulers is None:
            return
        for sch in schedulers if isinstance(schedulers, list) else [schedulers]:
            is_plateau = isinstance(sch, torch.optim.lr_scheduler.ReduceLROnPlateau)
            if plateau is not None and plateau != is_plateau:
                continue
            if is_plateau:
                metric = self.trainer.callback_metrics.get(self.hparams.scheduler_monitor)
                if metric is not None:
                    sch.step(metric)
            else:
                sch.step()

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        if self.hparams.scheduler_interval == "epoch":
            # ReduceLROnPlateau needs this epoch's validation metric; an epoch cut short (max_steps) never saw
            # its last batch, so its other schedulers step here
            last = self.trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
            self._step_schedulers(plateau=None if not last else True)
