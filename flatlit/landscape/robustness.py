"""Robustness of a trained network to random weight noise and to adversarial input perturbations (pure PyTorch).

**Weight noise** (SmoothOut's ``evaluate.py --ss``; Wen et al. 2018, "SmoothOut: Smoothing Out Sharp Minima to
Improve Generalization in Deep Learning", arXiv 1805.07898; SPEC §1.3, F47). Every parameter (BatchNorm γ/β
included, BN buffers not) is perturbed in place,

- ``uniform``:        w' = w + s·u,
- ``multiplicative``: w' = w · (1 + s·u),   u ~ U(−1, 1) element-wise,

and the accuracy and mean loss of the perturbed network are measured on a fixed sample in evaluation mode (BN on
running statistics, dropout off). The loss is ``loss_fn(model(x), y)`` on ``(x, y)`` batches, or, with a batch-level
objective, ``batch_loss(model, batch)`` on batches of any structure (e.g. the ``loss_of`` of
:func:`flatlit.objective.resolve_objective`), and the accuracy is then over the labels of ``logits_fn(model, batch)``
(token accuracy for a sequence model; NaN when there is none). A *draw* is one perturbed network evaluated on the
whole sample (``evaluate.py`` draws fresh noise per batch instead: both estimate E_u[accuracy], but only
whole-sample draws give a spread between networks); results are the mean and the sample standard deviation
(ddof = 1; 0 for one draw; NaN for an accuracy that is not measured) over ``draws`` draws.
Draw j uses a CPU ``torch.Generator`` seeded with :func:`draw_seed` ``(seed, j)`` and, for each parameter in
``model.parameters()`` order, u = 2·rand(shape) − 1 (float32, then cast to the parameter's dtype and device), so
every scale and both kinds share the same u (common random numbers: smooth curves in s) and every rank draws the
same noise. The weights are restored from a copy, bit for bit.

**Adversarial accuracy** (foolbox 3, Rauber et al., JOSS 2020; as LPF-SGD's ``adversarial/main.py``, SPEC F48).
Attacks run in [0, 1] pixel space, so ε is in pixel units: the DataModule's normalised batches are mapped back with
x_pix = clamp(x·σ + μ, 0, 1) and the model is wrapped in ``foolbox.PyTorchModel(model, bounds=(0, 1),
preprocessing=dict(mean=μ, std=σ))``, i.e. it sees (x_pix − μ)/σ exactly as in training.

- ``fgsm`` (Goodfellow et al. 2015, arXiv 1412.6572): x' = clip₀¹(x + ε·sign ∇ₓ CE), one step.
- ``pgd_linf`` (Madry et al. 2018, arXiv 1706.06083): random start in the L∞ ball, ``steps`` steps of size
  2.5·ε/steps along sign ∇ₓ CE, each projected onto ‖x' − x‖∞ ≤ ε and clipped to [0, 1]. Default ε = 8/255.
- ``pgd_l2``: the same in the L2 ball with normalised-gradient steps. Default ε = 0.5, the L2 threat model of
  RobustBench's CIFAR-10 leaderboard (Croce et al. 2021, arXiv 2010.09670); for 28×28 MNIST-like inputs, ε ≈ 1.5–2
  is usual. (An L∞ ball of 8/255 reaches L2 norm 8/255·√3072 ≈ 1.74 on CIFAR, so L2 ε = 0.5 is a weaker threat.)

Robust accuracy is the fraction of the sample still classified correctly after the attack (an example already
misclassified counts as broken), so it equals the clean accuracy at ε = 0. PGD's random start comes from the global
torch RNG inside foolbox: batch b runs under ``torch.manual_seed(draw_seed(seed, b))`` and the caller's RNG state
is restored afterwards. The attacks need ``(x, y)`` batches of image inputs whose outputs ``model(x)`` are the class
logits the accuracy counts; :func:`attack_inapplicable_reason` says (in one sentence) why other batches (dicts of
tokens, inputs only) or models (a one-logit head) cannot be attacked.

Every public function leaves the model as it found it (:func:`~flatlit.sharpness.base.observed`: weights and buffers
bit for bit, train/eval flags, ``.grad``, RNG states; ``requires_grad`` flags too). Under ``torch.distributed`` each
rank passes its share of the sample; loss sums and correct counts are all-reduced, so every rank returns the
numbers of the whole sample.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flatlit.sharpness.base import all_reduce_sum, observed
from flatlit.utils.batching import batch_size

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
BatchLossFn = Callable[[nn.Module, Any], torch.Tensor]
LogitsFn = Callable[[nn.Module, Any], tuple[torch.Tensor, torch.Tensor] | None]
Batch = Any  # an (x, y) pair, or any structure a ``batch_loss`` understands (weight noise only)
Normalization = tuple[torch.Tensor, torch.Tensor] | None

NOISE_KINDS = ("uniform", "multiplicative")
ATTACKS = ("fgsm", "pgd_linf", "pgd_l2")
ATTACK_NORMS = {"fgsm": "linf", "pgd_linf": "linf", "pgd_l2": "l2"}
DEFAULT_EPS = {"fgsm": 8 / 255, "pgd_linf": 8 / 255, "pgd_l2": 0.5}
DEFAULT_STEPS = 10


@dataclass(frozen=True)
class Evaluation:
    """Accuracy and mean loss of a network on a sample of ``num_samples`` examples (``acc`` NaN: no accuracy)."""

    acc: float
    loss: float
    num_samples: int

    def as_dict(self) -> dict[str, Any]:
        return {"acc": self.acc, "loss": self.loss, "num_samples": self.num_samples}


@dataclass(frozen=True)
class WeightNoiseResult:
    """Mean ± sample std (ddof = 1) over ``draws`` perturbed networks; ``accs``/``losses`` hold every draw."""

    kind: str
    scale: float
    draws: int
    acc_mean: float
    acc_std: float
    loss_mean: float
    loss_std: float
    accs: tuple[float, ...]
    losses: tuple[float, ...]

    def as_dict(self) -> dict[str, Any]:
        """The ``weight_noise`` entry of ``robustness.json``."""
        keys = ("kind", "scale", "draws", "acc_mean", "acc_std", "loss_mean", "loss_std")
        return {k: getattr(self, k) for k in keys}


@dataclass(frozen=True)
class AdversarialResult:
    """Clean and robust accuracy of one attack at one ε (``steps`` is None for the one-step FGSM)."""

    attack: str
    eps: float
    steps: int | None
    clean_acc: float
    robust_acc: float
    num_samples: int

    def as_dict(self) -> dict[str, Any]:
        """The ``adversarial`` entry of ``robustness.json``."""
        keys = ("attack", "eps", "steps", "clean_acc", "robust_acc", "num_samples")
        return {k: getattr(self, k) for k in keys}


def draw_seed(seed: int, index: int) -> int:
    """Seed of draw (or attacked batch) ``index`` under the user's ``seed``."""
    return (seed * 1_000_003 + index) % (2**63 - 1)


# ---- evaluation ------------------------------------------------------------------------------------------------------
def _sums(
    model: nn.Module,
    batches: Sequence[Batch],
    loss_fn: LossFn,
    batch_loss: BatchLossFn | None = None,
    logits_fn: LogitsFn | None = None,
) -> torch.Tensor:
    """[Σ n_b·L_b, #correct, #examples, #labels] over this rank's batches, float64, no grad (#correct NaN when a
    batch gives no logits under a batch-level objective)."""
    dev = next(model.parameters()).device
    acc = torch.zeros(4, dtype=torch.float64, device=dev)
    objective = batch_loss is not None or logits_fn is not None
    with torch.no_grad():
        for batch in batches:
            if not objective:
                x, y = batch
                x, y = x.to(dev), y.to(dev)
                logits = model(x)
                acc[0] += loss_fn(logits, y).double() * len(y)
                acc[1] += (logits.argmax(dim=1) == y).sum()
                acc[2] += len(y)
                acc[3] += len(y)
                continue
            n = batch_size(batch)
            if batch_loss is not None:
                loss = batch_loss(model, batch)
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    what = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
                    raise ValueError(f"batch_loss must return the batch-mean loss as a scalar tensor, got {what}")
            else:
                x, y = batch
                loss = loss_fn(model(x), y)
            acc[0] += loss.reshape(()).double() * n
            acc[2] += n
            pair = logits_fn(model, batch) if logits_fn is not None else None
            if pair is None:
                acc[1] = float("nan")
            else:
                logits, labels = pair
                acc[1] += (logits.argmax(dim=1) == labels).sum()
                acc[3] += len(labels)
    return acc


def _evaluation(
    model: nn.Module,
    batches: Sequence[Batch],
    loss_fn: LossFn,
    batch_loss: BatchLossFn | None = None,
    logits_fn: LogitsFn | None = None,
) -> Evaluation:
    s = all_reduce_sum(_sums(model, batches, loss_fn, batch_loss, logits_fn))
    if s[2] == 0:
        raise ValueError("batches: the sample is empty")
    acc = float(s[1] / s[3]) if s[3] > 0 else float("nan")
    return Evaluation(acc, float(s[0] / s[2]), int(s[2]))


def accuracy_and_loss(
    model: nn.Module,
    batches: Sequence[Batch],
    loss_fn: LossFn = F.cross_entropy,
    *,
    batch_loss: BatchLossFn | None = None,
    logits_fn: LogitsFn | None = None,
) -> Evaluation:
    """Accuracy and mean loss Σ_b n_b L_b / Σ_b n_b of ``model`` in evaluation mode (all ranks); with
    ``batch_loss``/``logits_fn``, batches of any structure (see the module docstring)."""
    with observed(model):
        model.eval()
        return _evaluation(model, batches, loss_fn, batch_loss, logits_fn)


# ---- weight noise ----------------------------------------------------------------------------------------------------
def _check_noise(kind: str, scale: float, draws: int) -> None:
    if kind not in NOISE_KINDS:
        raise ValueError(f"noise kind: unknown {kind!r}; choose one of {', '.join(NOISE_KINDS)}")
    if not (scale >= 0 and math.isfinite(scale)):
        raise ValueError(f"scale: must be a finite number >= 0, got {scale}")
    if draws < 1:
        raise ValueError(f"draws: must be >= 1, got {draws}")


def unit_noise(params: Sequence[torch.Tensor], gen: torch.Generator) -> list[torch.Tensor]:
    """u ~ U(−1, 1) shaped like each of ``params`` in turn (drawn on the CPU from ``gen``, moved and cast)."""
    return [(2 * torch.rand(p.shape, generator=gen) - 1).to(device=p.device, dtype=p.dtype) for p in params]


def weight_noise(params: Sequence[torch.Tensor], kind: str, scale: float, gen: torch.Generator) -> list[torch.Tensor]:
    """The perturbation δ to add to ``params``: s·u (``uniform``) or s·u·w (``multiplicative``), u ~ U(−1, 1)."""
    _check_noise(kind, scale, 1)
    u = unit_noise(params, gen)
    if kind == "uniform":
        return [scale * ui for ui in u]
    return [scale * ui * p.detach() for ui, p in zip(u, params)]


def weight_noise_robustness(
    model: nn.Module,
    batches: Sequence[Batch],
    kind: str = "uniform",
    scale: float = 0.006,
    draws: int = 5,
    seed: int = 0,
    loss_fn: LossFn = F.cross_entropy,
    *,
    batch_loss: BatchLossFn | None = None,
    logits_fn: LogitsFn | None = None,
) -> WeightNoiseResult:
    """Accuracy and loss of ``model`` with every parameter perturbed by weight noise of ``kind`` and ``scale``.

    w' = w + s·u (``uniform``, SmoothOut's ``--ss``; s = 0.006 in its README) or w' = w·(1 + s·u)
    (``multiplicative``), u ~ U(−1, 1); ``draws`` seeded draws (see the module docstring), evaluation mode, the
    weights restored bit for bit. Returns mean ± sample std over the draws. With ``batch_loss`` (and ``logits_fn``
    for the accuracy; NaN without), batches of any structure.

    Raises:
        ValueError: unknown ``kind``, negative ``scale`` or ``draws`` < 1.
    """
    _check_noise(kind, scale, draws)
    params = list(model.parameters())
    accs, losses = [], []
    with observed(model):
        model.eval()
        clean = [p.detach().clone() for p in params]
        for j in range(draws):
            delta = weight_noise(params, kind, scale, torch.Generator().manual_seed(draw_seed(seed, j)))
            with torch.no_grad():
                for p, d in zip(params, delta):
                    p.add_(d)
            try:
                ev = _evaluation(model, batches, loss_fn, batch_loss, logits_fn)
            finally:
                with torch.no_grad():
                    for p, c in zip(params, clean):
                        p.copy_(c)
            accs.append(ev.acc)
            losses.append(ev.loss)

    def std(v: list[float]) -> float:
        if any(math.isnan(x) for x in v):  # no accuracy (statistics.stdev fails on NaN)
            return math.nan
        return statistics.stdev(v) if len(v) > 1 else 0.0

    return WeightNoiseResult(
        kind, float(scale), draws, statistics.fmean(accs), std(accs), statistics.fmean(losses), std(losses),
        tuple(accs), tuple(losses),
    )  # fmt: skip


# ---- adversarial accuracy --------------------------------------------------------------------------------------------
def _shape(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, dict):
        return f"dicts with keys {sorted(map(str, value))}"
    return type(value).__name__


def attack_inapplicable_reason(model: nn.Module, batch: Batch, logits_fn: LogitsFn | None = None) -> str | None:
    """Why the adversarial attacks cannot run on ``batch`` (one sentence), or None when they can: they need
    ``(x, y)`` batches of floating image inputs x (N, C, H, W) whose outputs ``model(x)`` are class logits (N, C ≥ 2)
    for integer labels y (N,) and, with ``logits_fn`` (the objective's logits), the logits and labels it gives (what
    the accuracy counts) must be those. Evaluated without grad, in evaluation mode, the model left as it was."""
    name = type(model).__name__
    need = "the adversarial attacks need image inputs and class logits: (x, y) batches with x a float image tensor"
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(t, torch.Tensor) for t in batch)):
        what = _shape(batch) if not isinstance(batch, (tuple, list)) else f"{type(batch).__name__}s of {len(batch)}"
        return f"{need} (N, C, H, W), but {name}'s batches are {what}"
    x, y = batch
    if not x.is_floating_point() or x.ndim != 4:
        return f"{need} (N, C, H, W), but {name}'s inputs are {_shape(x)}"
    if y.ndim != 1 or y.is_floating_point():
        return f"{need} and integer labels (N,), but {name}'s targets are {_shape(y)}"
    with observed(model), torch.no_grad():
        model.eval()
        out = model(x)
        pair = logits_fn(model, batch) if logits_fn is not None else (out, y)
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[1] < 2 or out.shape[0] != len(y):
        return f"{need} and {name}(x) to be class logits (N, C >= 2), but it gives {_shape(out)}"
    same = pair is not None and pair[0].shape == out.shape and torch.equal(pair[1], y)
    if not (same and torch.allclose(pair[0].double(), out.double(), rtol=1e-4, atol=1e-5)):
        return f"{need} and the accuracy of {name} to be that of its outputs {name}(x) against y, which it is not"
    return None


def _check_attack(attack: str, eps: float, steps: int) -> None:
    if attack not in ATTACKS:
        raise ValueError(f"attack: unknown {attack!r}; choose one of {', '.join(ATTACKS)}")
    if not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps: must be a finite number >= 0, got {eps}")
    if steps < 1:
        raise ValueError(f"steps: must be >= 1, got {steps}")


def _chw(t: torch.Tensor | Sequence[float], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """μ or σ as a (C|1, H|1, W|1) tensor: a 1-D sequence is per channel; (1, C, 1, 1) or (1, C, H, W) lose the 1."""
    t = torch.as_tensor(t, dtype=dtype, device=device)
    return t.reshape(-1, 1, 1) if t.ndim <= 1 else t.reshape(t.shape[-3:])


def to_pixels(x: torch.Tensor, normalization: Normalization) -> torch.Tensor:
    """Undo the DataModule's normalisation: clamp(x·σ + μ, 0, 1) (only the clamp when ``normalization`` is None)."""
    if normalization is not None:
        mean, std = (_chw(t, x.device, x.dtype) for t in normalization)
        x = x * std + mean
    return x.clamp(0.0, 1.0)


def pixel_model(model: nn.Module, normalization: Normalization = None):
    """``foolbox.PyTorchModel`` over [0, 1] pixels that feeds ``model`` with (x − μ)/σ (model in eval mode)."""
    import foolbox

    dev = next(model.parameters()).device
    pre = None
    if normalization is not None:
        # per channel (1, C, 1, 1) or (C,), or a per-pixel μ (normalize='center'): broadcast over N×C×H×W
        mean, std = (_chw(t, dev, torch.float32) for t in normalization)
        pre = {"mean": mean, "std": std}
    return foolbox.PyTorchModel(model, bounds=(0.0, 1.0), device=dev, preprocessing=pre)


def make_attack(attack: str, steps: int = DEFAULT_STEPS):
    """The foolbox attack behind ``attack`` (PGD: random start, ``steps`` steps of 2.5·ε/steps)."""
    import foolbox.attacks as fa

    _check_attack(attack, 0.0, steps)
    if attack == "fgsm":
        return fa.FGSM()
    cls = fa.LinfPGD if attack == "pgd_linf" else fa.L2PGD
    return cls(rel_stepsize=2.5 / steps, steps=steps, random_start=True)


@contextmanager
def _no_param_grads(model: nn.Module) -> Iterator[None]:
    """Attacks need ∇ₓ only: parameters stop requiring grad meanwhile (flags restored)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _attack(fmodel: Any, atk: Any, pixels: torch.Tensor, labels: torch.Tensor, eps: float, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)  # PGD's random start uses the global RNG (restored by the caller's observed())
    _, clipped, _ = atk(fmodel, pixels, labels, epsilons=eps)
    return clipped.detach()


def adversarial_examples(
    model: nn.Module,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    attack: str,
    eps: float,
    normalization: Normalization = None,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
) -> torch.Tensor:
    """Adversarial inputs in [0, 1] pixel space for ``pixels`` (in [0, 1]) against ``model`` fed (x − μ)/σ;
    ``seed`` seeds PGD's random start (``torch.manual_seed(seed)``; the global RNG is restored)."""
    _check_attack(attack, eps, steps)
    dev = next(model.parameters()).device
    with observed(model), _no_param_grads(model):
        model.eval()
        fmodel = pixel_model(model, normalization)
        return _attack(fmodel, make_attack(attack, steps), pixels.to(dev), labels.to(dev), eps, seed)


def adversarial_robustness(
    model: nn.Module,
    batches: Sequence[Batch],
    attack: str = "pgd_linf",
    eps: float | None = None,
    normalization: Normalization = None,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
) -> AdversarialResult:
    """Clean and robust accuracy of ``model`` under ``attack`` at ``eps`` (pixel units; default
    :data:`DEFAULT_EPS`) on normalised ``batches`` as the DataModule yields them (``normalization`` = its (μ, σ)).

    Batch b is attacked with :func:`adversarial_examples` seeded by ``draw_seed(seed, b)``; counts are all-reduced.

    Raises:
        ValueError: unknown ``attack``, negative ``eps`` or ``steps`` < 1.
    """
    eps = DEFAULT_EPS.get(attack, 0.0) if eps is None else float(eps)
    _check_attack(attack, eps, steps)
    dev = next(model.parameters()).device
    counts = torch.zeros(3, dtype=torch.float64, device=dev)
    with observed(model), _no_param_grads(model):
        model.eval()
        fmodel = pixel_model(model, normalization)
        atk = make_attack(attack, steps)
        for b, (x, y) in enumerate(batches):
            x, y = to_pixels(x.to(dev), normalization), y.to(dev)
            adv = _attack(fmodel, atk, x, y, eps, draw_seed(seed, b))
            with torch.no_grad():
                counts[0] += (fmodel(x).argmax(dim=1) == y).sum()
                counts[1] += (fmodel(adv).argmax(dim=1) == y).sum()
            counts[2] += len(y)
    counts = all_reduce_sum(counts)
    if counts[2] == 0:
        raise ValueError("batches: the sample is empty")
    n = float(counts[2])
    return AdversarialResult(
        attack, eps, None if attack == "fgsm" else steps, float(counts[0]) / n, float(counts[1]) / n, int(n)
    )
