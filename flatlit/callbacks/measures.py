"""Sharpness and complexity measures during training, and the initial weights they compare against.

Thin Lightning adapters over :mod:`flatlit.sharpness`, with the scheduling, fixed sample, loss resolution, DDP,
logging and observe-never-perturb guarantees of :class:`~flatlit.callbacks.curvature.CurvatureCallback`.
"""

from __future__ import annotations

import os
import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from typing_extensions import override

from flatlit.callbacks.curvature import CurvatureCallback, unpack_xy
from flatlit.errors import ConfigError
from flatlit.sharpness import MeasureInputs, compute_measure, get_measure, list_measures

INIT_FILE = "model_init.ckpt"


class InitialWeights(Callback):
    """Save the module's weights before the first step as ``<log_dir>/model_init.ckpt`` (distance from
    initialisation and PAC-Bayes bounds need them; ``flatlit measure`` reads the file).

    ``flatlit fit`` adds it to every run. The file holds ``{"state_dict": pl_module.state_dict()}``.

    Example::

        Trainer(callbacks=[InitialWeights()])
    """

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step != 0 or not trainer.loggers:
            return
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank asks
        if log_dir is not None:
            self._save(os.path.join(log_dir, INIT_FILE), pl_module)

    @staticmethod
    @rank_zero_only
    def _save(path: str, pl_module: pl.LightningModule) -> None:
        if os.path.exists(path):
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        torch.save({"state_dict": state}, path)


def _check_measures(owner: str, measures: list[str] | dict[str, dict[str, Any]] | None, kind: str) -> dict:
    if measures is None:
        return {name: {} for name in list_measures(kind)}
    if isinstance(measures, (list, tuple)):
        measures = {name: {} for name in measures}
    for name, settings in measures.items():
        try:
            spec = get_measure(name)
        except ValueError as err:
            raise ConfigError(f"{owner}(measures): {err}") from None
        unknown = sorted(set(settings or {}) - set(spec.defaults))
        if unknown:
            raise ConfigError(
                f"{owner}(measures): {name}: unknown setting(s) {', '.join(unknown)}; accepted: "
                f"{', '.join(sorted(spec.defaults))}."
            )
    return {name: dict(settings or {}) for name, settings in measures.items()}


class SharpnessMeasures(CurvatureCallback):
    """Sharpness measures of the training loss on a fixed sample, during training (SPEC F24–F35).

    Each measure is a registered function of :mod:`flatlit.sharpness` (``flatlit.sharpness.list_measures()``; the
    formula, paper, defaults and cost are in its docstring, and ``flatlit measure --list`` prints them). Values are
    logged as ``sharpness/<name>`` (plus ``sharpness/<name>_se`` for Monte-Carlo estimates) through
    ``pl_module.log``, so they reach every logger, ``history.csv`` and ``trainer.callback_metrics`` (monitorable),
    at the step of the epoch's other metrics.

    Args:
        measures: names, or a mapping name → settings overriding the measure's defaults (e.g.
            ``{worst_case_l2: {rho: 0.05}}``); None: every registered measure of this kind.
        **kwargs: :class:`~flatlit.callbacks.curvature.CurvatureCallback` arguments (num_samples, batch_size,
            every_n_epochs, every_n_steps, at_train_start, loss_fn, seed, ...). Batches must unpack to (x, y).

    Raises:
        ConfigError: an unknown measure or setting (at construction); a loss or batch that cannot apply (setup).

    The initial weights (for ``distance_from_init`` and the PAC-Bayes measures) are kept from the start of training
    (and from ``<log_dir>/model_init.ckpt`` on resume).

    Example::

        Trainer(callbacks=[SharpnessMeasures(measures=["worst_case_l2", "pac_bayes_sharpness"], num_samples=1000)])
    """

    prefix = "sharpness"
    kind = "sharpness"

    def __init__(
        self,
        measures: list[str] | dict[str, dict[str, Any]] | None = None,
        num_samples: int = 1000,
        batch_size: int = 250,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_samples=num_samples, batch_size=batch_size, **kwargs)
        self.measures = _check_measures(type(self).__name__, measures, self.kind)
        self.history: dict[str, list] = {"step": [], "epoch": [], "values": []}
        self._init_state: dict[str, torch.Tensor] | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(measures=sorted(self.measures), num_samples=self.num_samples)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step == 0:
            self._init_state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        elif trainer.loggers:
            path = os.path.join(trainer.log_dir, INIT_FILE)
            if os.path.isfile(path):
                state = torch.load(path, map_location=pl_module.device, weights_only=True)["state_dict"]
                self._init_state = state
        super().on_train_start(trainer, pl_module)

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, start: float) -> dict[str, float]:
        loss_fn, _ = self._pair_loss_fn(pl_module)
        owner = type(self).__name__
        batches = [unpack_xy(self.move(b, pl_module), owner) for b in self.batches(trainer)]
        dm = trainer.datamodule
        num_train = len(dm.train_indices) if getattr(dm, "train_indices", None) is not None else None
        inputs = MeasureInputs(pl_module, batches, loss_fn, init_state=self._init_state, num_train=num_train)
        metrics: dict[str, float] = {}
        values: dict[str, float] = {}
        last_line = start
        for i, (name, settings) in enumerate(self.measures.items()):
            result = compute_measure(name, inputs, **settings)
            metrics[f"{self.prefix}/{name}"] = result.value
            values[name] = result.value
            if result.std_error is not None:
                metrics[f"{self.prefix}/{name}_se"] = result.std_error
            now = time.perf_counter()
            if self.progress_every is not None and now - last_line >= self.progress_every:
                last_line = now
                rank_zero_info(
                    f"{owner} at step {trainer.global_step}: {i + 1}/{len(self.measures)} measures done "
                    f"({name} = {result.value:.4g}), {now - start:.0f} s"
                )
        self.history["step"].append(trainer.global_step)
        self.history["epoch"].append(trainer.current_epoch)
        self.history["values"].append(values)
        return metrics

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "history": {k: list(v) for k, v in self.history.items()}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.history = {k: list(v) for k, v in state_dict.get("history", self.history).items()}


class ComplexityMeasures(SharpnessMeasures):
    """Norm and complexity measures (margins, norms, path norms, distance from initialisation, the generalization
    bounds of Neyshabur et al. 2017; SPEC F36–F41), logged as ``complexity/<name>``.

    Same arguments and guarantees as :class:`SharpnessMeasures`; ``measures=None`` computes every complexity
    measure.

    Example::

        Trainer(callbacks=[ComplexityMeasures(measures=["margin", "path_norm_2", "distance_from_init"])])
    """

    prefix = "complexity"
    kind = "complexity"
