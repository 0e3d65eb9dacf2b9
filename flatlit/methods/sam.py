"""SAM and adaptive SAM (Foret et al. 2021, arXiv 2010.01412; Kwon et al. 2021, arXiv 2102.11600), with cheaper
schedules that take SAM's second pass only on some steps.

One SAM update: g = ∇L_B(w) (pass 1, local to the replica under DDP); ε = ρ T² g / ‖T g‖; the stepped gradient is
∇L_B(w + ε) (pass 2, all-reduced), taken by the base optimizer at the restored clean weights w. A step without SAM
is one forward/backward: the stepped gradient is g (all-reduced), or LookSAM's corrected g.

Schedules (``schedule``), each paying 2 passes on SAM steps and exactly 1 on the others:

- ``every``: SAM on every step.
- ``interval``: SAM when ``global_step % interval == 0`` (MosaicML Composer's ``interval``, PEERS §1.6).
- ``looksam``: LookSAM (Liu et al. 2022, "Towards Efficient and Scalable Sharpness-Aware Minimization", CVPR,
  arXiv 2203.02714, Alg. 1): every ``interval`` steps a SAM step that also stores g_v = g_s − (⟨g, g_s⟩/‖g‖²) g, the
  component of the SAM gradient g_s orthogonal to g; the other steps use g + α (‖g‖/‖g_v‖) g_v.
- ``rst``: randomized sharpness-aware training (Zhao, Zhang & Hu 2022, arXiv 2203.09962): SAM with probability p_t
  (Bernoulli), p_t constant or linear from ``switch_prob_start`` to ``switch_prob`` over the run.
- ``ae_sam``: AE-SAM (Jiang, Yang, Zhang & Kwok 2023, "An Adaptive Policy to Employ Sharpness-Aware
  Minimization", ICLR, arXiv 2304.14647): with s_t = ‖g_t‖² of the clean gradient, μ_t = δ μ_{t−1} + (1−δ) s_t,
  σ²_t = δ σ²_{t−1} + (1−δ)(s_t − μ_t)², SAM when s_t ≥ μ_t + c_t σ_t, c_t linear from ``ae_c_start`` to
  ``ae_c_end`` over the run (μ₀ = σ₀ = 0).

The decision of ``interval`` and ``rst`` is known before pass 1 (a function of the step and ``noise_seed``, the same
on every rank and after a resume). ``looksam`` and ``ae_sam`` need g first, so their pass 1 is all-reduced under DDP
(ε then comes from the global gradient, as with ``sync_perturbation``), and they do not combine with gradient
accumulation. Their state (g_v; μ, σ²) is checkpointed.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from flatlit.methods._perturb import SAM_ADAPTIVE, global_grad_norm, sam_epsilon, sam_scales
from flatlit.methods.perturbation import PerturbationModule
from flatlit.utils.errors import ConfigError
from flatlit.utils.nn import frozen_bn_stats

SAM_SCHEDULES = ("every", "interval", "looksam", "rst", "ae_sam")


class SAM(PerturbationModule):
    """Sharpness-Aware Minimization around any injected base optimizer.

    Args:
        rho: neighbourhood radius ρ (0.05 in SAM/LPF-SGD/CS-439; ASAM uses 0.5–2).
        adaptive: ``none`` (SAM), ``elementwise`` (davda54's ASAM, T = |w| everywhere) or ``asam`` (official ASAM,
            T = |w| + η on weights only).
        eta: ASAM's η.
        bn_stats: ``first`` keeps the BatchNorm running statistics of pass 1 only (google-research/sam); ``both``
            lets pass 2 update them too (davda54 without its bypass).
        sync_perturbation: all-reduce pass 1's gradient, so every DDP replica uses the same ε (default: each
            replica perturbs with its own gradient, the paper's m-sharpness semantics).
        schedule: ``every`` | ``interval`` | ``looksam`` | ``rst`` | ``ae_sam`` (module docstring).
        interval: k of ``interval`` (SAM every k steps) and of ``looksam`` (g_v refreshed every k steps).
        looksam_alpha: LookSAM's α (0.7).
        switch_prob: RST's probability of a SAM step (0.5; the final value of the linear schedule).
        switch_prob_start: RST's probability at step 0 when the schedule is linear (None: constant ``switch_prob``).
        ae_delta: AE-SAM's moving-average factor δ (0.9).
        ae_c_start, ae_c_end: AE-SAM's threshold multiplier c_t, linear over the run (1 → −1: SAM gets more frequent).
        **kwargs: :class:`~flatlit.methods.perturbation.PerturbationModule` arguments.

    Logs ``train/loss`` (clean point), ``train/perturbed_loss`` (schedule ``every``), ``train/grad_norm`` (pass 1),
    ``train/rho``, ``train/passes_per_step`` and ``train/sam_fraction`` (the share of SAM steps).

    Example::

        SAM(arch="cifar_resnet18", rho=0.05, optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
    """

    def __init__(
        self,
        *args: Any,
        rho: float = 0.05,
        adaptive: str = "none",
        eta: float = 0.01,
        bn_stats: str = "first",
        sync_perturbation: bool = False,
        schedule: str = "every",
        interval: int = 5,
        looksam_alpha: float = 0.7,
        switch_prob: float = 0.5,
        switch_prob_start: float | None = None,
        ae_delta: float = 0.9,
        ae_c_start: float = 1.0,
        ae_c_end: float = -1.0,
        **kwargs: Any,
    ) -> None:
        if rho < 0:
            raise ConfigError(f"model.init_args.rho: must be >= 0, got {rho}.")
        if adaptive not in SAM_ADAPTIVE:
            raise ConfigError(f"model.init_args.adaptive: one of {', '.join(SAM_ADAPTIVE)}, got {adaptive!r}.")
        if bn_stats not in ("first", "both"):
            raise ConfigError(f"model.init_args.bn_stats: 'first' or 'both', got {bn_stats!r}.")
        if schedule not in SAM_SCHEDULES:
            raise ConfigError(f"model.init_args.schedule: one of {', '.join(SAM_SCHEDULES)}, got {schedule!r}.")
        if interval < 1:
            raise ConfigError(f"model.init_args.interval: must be >= 1, got {interval}.")
        for key, p in (("switch_prob", switch_prob), ("switch_prob_start", switch_prob_start)):
            if p is not None and not 0 <= p <= 1:
                raise ConfigError(f"model.init_args.{key}: a probability in [0, 1], got {p}.")
        if not 0 <= ae_delta < 1:
            raise ConfigError(f"model.init_args.ae_delta: must lie in [0, 1), got {ae_delta}.")
        if schedule in ("looksam", "ae_sam") and kwargs.get("accumulate_grad_batches", 1) != 1:
            raise ConfigError(
                f"model.init_args.accumulate_grad_batches: schedule {schedule!r} decides from the update's whole "
                "gradient and does not combine with accumulation; use 1 (or schedule every/interval/rst)."
            )
        super().__init__(*args, **kwargs)
        self.rho, self.adaptive, self.eta = rho, adaptive, eta
        self.bn_stats, self.sync_perturbation = bn_stats, sync_perturbation
        self.schedule, self.interval, self.looksam_alpha = schedule, interval, looksam_alpha
        self.switch_prob, self.switch_prob_start = switch_prob, switch_prob_start
        self.ae_delta, self.ae_c_start, self.ae_c_end = ae_delta, ae_c_start, ae_c_end
        self._gv: list[torch.Tensor] | None = None  # LookSAM's orthogonal component, per parameter
        self._ae = [0.0, 0.0]  # AE-SAM's μ, σ²

    # ---- schedules ---------------------------------------------------------------------------------------------
    def _progress(self) -> float:
        """t/T over the run's optimizer updates, in [0, 1]."""
        return min(1.0, self.global_step / max(1, self.total_updates()))

    def rst_probability(self) -> float:
        if self.switch_prob_start is None:
            return self.switch_prob
        return self.switch_prob_start + (self.switch_prob - self.switch_prob_start) * self._progress()

    def sam_step_planned(self) -> bool | None:
        """Whether this update takes SAM's second pass, when it is known before pass 1 (None: decided from g)."""
        if self.schedule == "every":
            return True
        if self.schedule in ("interval", "looksam"):
            return self.global_step % self.interval == 0
        if self.schedule == "rst":  # a draw per update: the same on every rank and after a resume
            gen = torch.Generator().manual_seed(self.noise_seed * 1_000_003 + 7_777_777 + self.global_step)
            return bool(torch.rand((), generator=gen) < self.rst_probability())
        return None

    def ae_threshold(self, s: float) -> bool:
        """AE-SAM: update μ, σ² with s = ‖g‖² and return s ≥ μ + c_t σ."""
        mu, var = self._ae
        d = self.ae_delta
        mu = d * mu + (1 - d) * s
        var = d * var + (1 - d) * (s - mu) ** 2
        self._ae = [mu, var]
        c = self.ae_c_start + (self.ae_c_end - self.ae_c_start) * self._progress()
        return s >= mu + c * math.sqrt(var)

    # ---- the step -----------------------------------------------------------------------------------------------
    def compute_gradients(self, batch: Any, scale: float, sync: bool):
        planned = self.sam_step_planned()
        if planned is False and self.schedule != "looksam":  # a plain step: one forward/backward
            with self.no_sync(not sync):
                loss, outputs = self.training_loss(batch)
                self.manual_backward(loss * scale)
            grads = [p.grad for _, p in self.named_trainable() if p.grad is not None]
            norm = global_grad_norm(grads).detach() / (self.loss_scale() * scale)
            return loss, outputs, self._extras(None, norm, sam=False)
        named = self.named_trainable()
        stash = None
        if self._micro > 0:  # keep the accumulated pass-2 gradients out of this micro-batch's ascent direction
            stash = [p.grad.clone() if p.grad is not None else None for _, p in named]
            for _, p in named:
                if p.grad is not None:
                    p.grad.zero_()
        local = not self.sync_perturbation and planned is not None and self.schedule != "looksam"
        with self.no_sync(local):  # pass 1 at w
            loss, outputs = self.training_loss(batch)
            self.manual_backward(loss)
        named = [(n, p) for n, p in named if p.grad is not None]  # parameters without gradient stay unperturbed
        names, params = [n for n, _ in named], [p for _, p in named]
        grads = [p.grad for p in params]
        unscale = 1.0 / self.loss_scale()  # 16-mixed: pass 1's gradient is S·g
        if self.schedule == "looksam" and not planned:
            return loss, outputs, self._looksam_reuse(grads, unscale)
        if self.schedule == "ae_sam":
            s = float(global_grad_norm(grads) * unscale) ** 2
            if not math.isfinite(s):  # an fp16 overflow: the scaler skips this step; the statistics stay
                return loss, outputs, self._extras(None, s, sam=False)
            if not self.ae_threshold(s):
                return loss, outputs, self._extras(None, math.sqrt(s), sam=False)
        g_clean = [g.clone() for g in grads] if self.schedule == "looksam" else None
        with torch.no_grad():
            # ε = ρ T² g / ‖T g‖, computed in place in the gradient buffers (no allocation per step)
            scales = sam_scales(params, names, self.adaptive, self.eta)
            eps, norm = sam_epsilon(grads, self.rho, scales, inplace=True)
            saved = self.backup(params)
            torch._foreach_add_([p.data for p in params], eps)
            torch._foreach_zero_(grads)
        if stash is not None:
            self.put_grads([p for _, p in self.named_trainable()], stash)
        with frozen_bn_stats(self.model, self.bn_stats == "first"), self.no_sync(not sync):  # pass 2 at w + ε
            perturbed_loss, _ = self.training_loss(batch)
            self.manual_backward(perturbed_loss * scale)
        self.restore(params, saved)
        if g_clean is not None:
            self._looksam_store(g_clean, [p.grad for p in params])
        return loss, outputs, self._extras(perturbed_loss, norm * unscale, sam=True)

    def _looksam_store(self, g: list[torch.Tensor], gs: list[torch.Tensor]) -> None:
        """g_v = g_s − (⟨g, g_s⟩/‖g‖²) g, the part of the SAM gradient orthogonal to the clean one (kept only when
        finite: an fp16-overflowed refresh keeps the previous g_v; its scale does not matter, only its direction)."""
        with torch.no_grad():
            dot = sum((a * b).sum() for a, b in zip(g, gs))
            coef = dot / global_grad_norm(g).pow(2).clamp_min(1e-30)
            gv = [b - coef * a for a, b in zip(g, gs)]
            if bool(torch.isfinite(global_grad_norm(gv))):
                self._gv = gv

    def _looksam_reuse(self, grads: list[torch.Tensor], unscale: float = 1.0) -> dict[str, Any]:
        """In place: g ← g + α (‖g‖/‖g_v‖) g_v (Liu et al. 2022, Alg. 1); no second pass. Scale-free: under
        16-mixed g is S·g and so is the added term."""
        norm = global_grad_norm(grads)
        if self._gv is not None and len(self._gv) == len(grads):
            with torch.no_grad():
                coef = self.looksam_alpha * norm / global_grad_norm(self._gv).clamp_min(1e-30)
                torch._foreach_add_(grads, [coef * v for v in self._gv])
        return self._extras(None, norm * unscale, sam=False)

    def _extras(self, perturbed_loss: torch.Tensor | None, norm: Any, sam: bool) -> dict[str, Any]:
        """The same keys on every step (the epoch sums are per key): the perturbed loss only when every step is a
        SAM step; the gradient norm of pass 1 (‖T g‖ on SAM steps, ‖g‖ otherwise)."""
        extras: dict[str, Any] = {
            "train/rho": self.rho,
            "train/passes_per_step": (2.0 if sam else 1.0) * self.accumulate_grad_batches,
            "train/sam_fraction": float(sam),
            "train/grad_norm": norm,
        }
        if self.schedule == "every" and perturbed_loss is not None:
            extras["train/perturbed_loss"] = perturbed_loss.detach()
        return extras

    # ---- exact resume ------------------------------------------------------------------------------------------
    def resume_state(self) -> dict[str, Any]:
        state = super().resume_state()
        state["looksam_gv"] = None if self._gv is None else [v.detach().cpu() for v in self._gv]
        state["ae_sam"] = list(self._ae)
        return state

    def load_resume_state(self, state: dict[str, Any]) -> None:
        super().load_resume_state(state)
        gv = state.get("looksam_gv")
        self._gv = None if gv is None else [v.to(self.device) for v in gv]
        self._ae = list(state.get("ae_sam", [0.0, 0.0]))
