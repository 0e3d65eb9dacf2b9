"""Average-case (Gaussian) sharpness: average sharpness, the LPF-SGD low-pass loss and Neyshabur's expected sharpness.

All three average the sample loss over Gaussian weight noise δ with a per-coordinate standard deviation s(w):

    E_δ L(w + δ),   δ_i ~ N(0, s_i²),

estimated with ``draws`` Monte-Carlo draws. Draw k takes, for each parameter in ``inputs.named_params``
order, ``randn_like(p, gen)`` from one ``generator(seed)`` (on the CPU, so every rank draws the same noise) and
multiplies it by s. The standard error is that of the draws (sample std / √draws).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from flatlit.sharpness.base import (
    Cost,
    MeasureInputs,
    MeasureResult,
    generator,
    mc_stats,
    perturbed,
    randn_like,
    register_measure,
)
from flatlit.sharpness.worst_case import check_bool, check_int, check_positive, check_seed

Scale = Callable[[torch.Tensor], torch.Tensor | float]  # parameter -> standard deviation of its noise


def noisy_values(
    inputs: MeasureInputs, std: Scale, draws: int, seed: int, evaluate: Callable[[], float]
) -> list[float]:
    """``evaluate()`` at w + δ_k for k = 1..draws, δ_k,i = s_i·z_k,i with z from ``generator(seed)`` drawn in
    (draw, parameter) order; the same seed gives the same z whatever ``std`` is (common random numbers).
    Cost: ``draws`` evaluations (forward passes for the sample loss or accuracy)."""
    params = inputs.params
    scales = [std(p.detach()) for p in params]
    gen = generator(seed)
    out = []
    for _ in range(draws):
        delta = [randn_like(p, gen) * s for p, s in zip(params, scales)]
        with perturbed(params, delta):
            out.append(evaluate())
    return out


def noisy_losses(inputs: MeasureInputs, std: Scale, draws: int, seed: int) -> list[float]:
    """The sample loss at w + δ_k for k = 1..draws (:func:`noisy_values`). Cost: ``draws`` forward passes."""
    return noisy_values(inputs, std, draws, seed, inputs.sample_loss)


def _gain_result(
    name: str, inputs: MeasureInputs, std: Scale, draws: int, seed: int, settings: dict, relative_to_clean: bool
) -> MeasureResult:
    clean = inputs.sample_loss()
    losses = noisy_losses(inputs, std, draws, seed)
    expected, se = mc_stats(losses)
    value = expected - clean if relative_to_clean else expected
    extra = {"clean_loss": clean, "expected_loss": expected, "difference": expected - clean}
    return MeasureResult(name, value, se if draws > 1 else None, Cost(forwards=draws + 1), settings, extra)


def _check(sigma_name: str, sigma: float, draws: int, seed: int) -> tuple[float, int, int]:
    return check_positive(sigma_name, sigma), check_int("draws", draws, 1), check_seed("seed", seed)


@register_measure("average_sharpness", sigma=0.01, adaptive=False, draws=100, seed=0)
def average_sharpness(
    inputs: MeasureInputs, sigma: float = 0.01, adaptive: bool = False, draws: int = 100, seed: int = 0
) -> MeasureResult:
    """Average-case sharpness E_δ L(w + δ) − L(w), δ ~ N(0, σ²I) or, adaptive, δ ~ N(0, σ² diag(|w|²))
    (Andriushchenko et al., "A modern look at the relationship between sharpness and generalization", ICML 2023,
    arXiv 2302.07011, their ``eval_average_sharpness`` with ``norm="l2"``; adaptive after Kwon et al., arXiv
    2102.11600: δ = σ|w| ⊙ z, invariant to the layer rescalings of ReLU networks).

    Settings: ``sigma`` (0.01) the per-coordinate noise std (relative to |w_i| when adaptive; the paper sweeps
    0.05–0.4 on ResNet-18/CIFAR-10 with both variants); ``adaptive`` (False); ``draws`` (100, the default
    ``n_iters`` of the paper's function; its scripts use 20 per batch of 128) Monte-Carlo draws; ``seed`` (0).
    The whole sample is used for every draw (the paper averages per batch, which is the same in expectation).

    Value: the mean over draws of L(w + δ_k) − L(w), std_error from the draws. extra: ``clean_loss``,
    ``expected_loss``, ``difference``. Cost: draws + 1 forward passes.
    """
    sigma, draws, seed = _check("sigma", sigma, draws, seed)
    adaptive = check_bool("adaptive", adaptive)

    def std(p: torch.Tensor) -> torch.Tensor | float:
        return sigma * p.abs() if adaptive else sigma

    settings = {"sigma": sigma, "adaptive": adaptive, "draws": draws, "seed": seed}
    return _gain_result("average_sharpness", inputs, std, draws, seed, settings, relative_to_clean=True)


@register_measure("lpf_sharpness", sigma=0.01, draws=100, seed=0)
def lpf_sharpness(inputs: MeasureInputs, sigma: float = 0.01, draws: int = 100, seed: int = 0) -> MeasureResult:
    """The LPF-SGD low-pass measure E_{ε ~ N(0, σ²I)} L(w + ε), the loss convolved with a Gaussian kernel (Bisla,
    Wang & Choromanska, "Low-pass filtering SGD for recovering flat optima in the deep learning optimization
    landscape", AISTATS 2022, arXiv 2201.08025; ``flat_meas`` ``low_pass``, SPEC 5.6, F30), the measure they found
    best correlated with the generalization gap.

    Every trainable parameter is perturbed isotropically. The original first applies its ``model.norm()``
    filter-normalising reparametrisation; here the weights are taken as they are (``bn="fold"`` folds BatchNorm).

    Settings: ``sigma`` (0.01, the original's σ) noise std; ``draws`` (100, the original's) Monte-Carlo draws;
    ``seed`` (0).

    Value: the expected loss itself (not a difference), std_error from the draws. extra: ``clean_loss``,
    ``expected_loss`` and ``difference`` (expected − clean, the relative variant). Cost: draws + 1 forward passes.
    """
    sigma, draws, seed = _check("sigma", sigma, draws, seed)
    settings = {"sigma": sigma, "draws": draws, "seed": seed}
    return _gain_result("lpf_sharpness", inputs, lambda p: sigma, draws, seed, settings, relative_to_clean=False)


@register_measure("expected_sharpness", alpha=5e-4, draws=100, seed=0)
def expected_sharpness(inputs: MeasureInputs, alpha: float = 5e-4, draws: int = 100, seed: int = 0) -> MeasureResult:
    """Expected sharpness of Neyshabur et al., "Exploring generalization in deep learning" (NeurIPS 2017,
    arXiv 1706.08947): E_ν L(w + ν) − L(w) with ν_i ~ N(0, σ_i²), σ_i = α(10|w_i| + 1) (SPEC 4.2, F34).

    This is the paper's definition; ``christina-aigner/exploring-generalization``'s ``calc_exp_sharpness`` (broken,
    unused) instead added one scalar per layer drawn with std α(10·|mean W| + 1).

    Settings: ``alpha`` (5e-4, the value in that repository) the noise scale; ``draws`` (100) Monte-Carlo draws;
    ``seed`` (0).

    Value: the mean over draws of L(w + ν_k) − L(w), std_error from the draws. extra: ``clean_loss``,
    ``expected_loss``, ``difference``. Cost: draws + 1 forward passes.
    """
    alpha, draws, seed = _check("alpha", alpha, draws, seed)
    settings = {"alpha": alpha, "draws": draws, "seed": seed}
    return _gain_result("expected_sharpness", inputs, lambda p: alpha * (10 * p.abs() + 1), draws, seed, settings, True)
