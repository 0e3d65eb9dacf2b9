"""A run's optimizer read from its config: a label for the run and its edge-of-stability threshold (Cohen et al.
2021, arXiv 2103.00065)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: optimizers whose update is (heavy-ball or Nesterov) momentum SGD: the ones with a 2/η-type threshold
SGD_LIKE = ("SGD", "SGDW")

ADAPTIVE_HINT = ("adam", "adagrad", "rmsprop", "adabound", "adashift", "adadelta", "lamb", "lion", "sophia", "nadam")

METHOD_NAMES = {
    "SAM": "SAM",
    "LPFSGD": "LPF-SGD",
    "SmoothOut": "SmoothOut",
    "EntropySGD": "Entropy-SGD",
    "NSGD": "NSGD",
}


def class_and_args(node: Any) -> tuple[str, dict[str, Any]]:
    """(class name, init_args) of a ``class_path``/``init_args`` node (or a bare class path string)."""
    if isinstance(node, str):
        return node.rsplit(".", 1)[-1], {}
    if isinstance(node, dict):
        return str(node.get("class_path", "")).rsplit(".", 1)[-1], dict(node.get("init_args") or {})
    return "", {}


def optimizer_and_args(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The (base) optimizer's class name and arguments; flatlit's default is SGD(lr=0.01, momentum=0.9)."""
    model = config.get("model") or {}
    node = (model.get("init_args") or {}).get("optimizer") if isinstance(model, dict) else None
    if not node:
        return "SGD", {"lr": 0.01, "momentum": 0.9}
    return class_and_args(node)


def short_number(v: Any) -> str:
    """A number in ``%g`` form (other values as text)."""
    return f"{float(v):g}" if isinstance(v, (int, float)) else str(v)


def default_label(config: dict[str, Any]) -> str:
    """The method and its key settings, e.g. ``"SGD lr=0.05"``, ``"SAM ρ=0.05"``, ``"Adam lr=0.001"``."""
    method, margs = class_and_args(config.get("model"))
    opt, oargs = optimizer_and_args(config)
    lr = f" lr={short_number(oargs['lr'])}" if "lr" in oargs else ""
    if method == "SAM":
        kind = "SAM" if margs.get("adaptive", "none") == "none" else "ASAM"
        return f"{kind} ρ={short_number(margs.get('rho', 0.05))}"
    if method == "LPFSGD":
        return f"LPF-SGD γ={short_number(margs.get('gamma', 0.002))}"
    if method == "SmoothOut":
        return f"SmoothOut a={short_number(margs.get('a', 0.01))}"
    if method == "EntropySGD":
        return f"Entropy-SGD L={short_number(margs.get('L', 5))}"
    if method == "NSGD":
        return f"NSGD γ={short_number(margs.get('overshoot', 1.0))}"
    return f"{opt or method or 'run'}{lr}"


@dataclass(frozen=True)
class Stability:
    """The edge-of-stability threshold ``factor/η`` of a run's optimizer (``factor`` None: no threshold)."""

    factor: float | None
    formula: str
    lr: float | None
    scheduled: bool
    explanation: str


def stability(config: dict[str, Any] | None) -> Stability:
    """The sharpness above which (full-batch) gradient descent with the run's optimizer cannot be stable.

    Plain GD: 2/η. Heavy-ball momentum β (PyTorch SGD, dampening d): (2+2β)/(η(1−d)); Nesterov:
    (2+2β)/(η(1+2β)) (Cohen et al. 2021, arXiv 2103.00065, App. on momentum; the largest stable curvature of the
    linear recurrence on a quadratic). Adaptive optimizers have no such line (their threshold depends on the
    preconditioner).
    """
    if not config:
        return Stability(None, "", None, False, "no config.yaml, so the optimizer is unknown")
    method, _ = class_and_args(config.get("model"))
    opt, args = optimizer_and_args(config)
    model_args = (config.get("model") or {}).get("init_args") or {}
    scheduled = bool(model_args.get("lr_scheduler"))
    lr = args.get("lr")
    lr = float(lr) if isinstance(lr, (int, float)) else None
    if opt not in SGD_LIKE:
        kind = "an adaptive optimizer" if any(h in opt.lower() for h in ADAPTIVE_HINT) else "not (momentum) SGD"
        return Stability(
            None, "", lr, scheduled, f"{opt} is {kind}: the 2/η threshold holds for (momentum) gradient descent only"
        )
    beta = float(args.get("momentum") or 0.0)
    damp = float(args.get("dampening") or 0.0)
    nesterov = bool(args.get("nesterov", False))
    if beta == 0:
        factor, formula, expl = 2.0, "2/η", "gradient descent without momentum"
    elif nesterov:  # PyTorch refuses Nesterov with dampening
        factor, formula = (2 + 2 * beta) / (1 + 2 * beta), "(2+2β)/(η(1+2β))"
        expl = f"Nesterov momentum β = {beta:g}"
    elif damp:
        factor, formula = (2 + 2 * beta) / (1 - damp), "(2+2β)/(η(1−d))"
        expl = f"heavy-ball momentum β = {beta:g}, dampening d = {damp:g}"
    else:
        factor, formula = 2 + 2 * beta, "(2+2β)/η"
        expl = f"heavy-ball momentum β = {beta:g}"
    if method and method != "SGDFamily":
        expl += f"; the line is the threshold of {METHOD_NAMES.get(method, method)}'s base optimizer"
    return Stability(factor, formula, lr, scheduled, expl)
