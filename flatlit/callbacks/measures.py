"""Sharpness and complexity measures during training, and the initial weights they compare against.

Thin Lightning adapters over :mod:`flatlit.sharpness`, with the scheduling, fixed sample, DDP, logging and
observe-never-perturb guarantees of :class:`~flatlit.callbacks.curvature_base.CurvatureCallback`. The loss is the
module's, by the loss contract of :func:`flatlit.objective.resolve_objective` (the callback's ``batch_loss`` or
``loss_fn``, else the module's ``curvature_loss``, a flatlit family's ``training_loss``, its ``loss_fn``, or
cross-entropy where the outputs are class logits); batches may have any structure.
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

from flatlit.callbacks.curvature_base import CurvatureCallback
from flatlit.objective import Objective, ParamsSpec, resolve_objective, select_parameters
from flatlit.sharpness import MeasureInputs, compute_measure, get_measure, list_measures
from flatlit.sharpness.base import inapplicable_reason, observed, set_bn_policy
from flatlit.sharpness.presets import MeasureEntry, measure_table, preset_measures
from flatlit.utils.errors import ConfigError

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


def _skip_note(reasons: dict[str, str], module: str) -> str:
    """One line naming the measures skipped, grouped by why (the reasons name the measure first)."""
    groups: dict[str, list[str]] = {}
    for name, reason in reasons.items():
        groups.setdefault(reason.replace(f"measure {name!r} ", "", 1), []).append(name)
    parts = [f"{', '.join(names)}: {why}" for why, names in groups.items()]
    return f"skipping {len(reasons)} measure(s) that do not apply to {module} ({'; '.join(parts)})"


def _check_measures(
    owner: str, measures: list[str] | dict[str, dict[str, Any]] | None, kind: str, preset: str | None = None
) -> dict[str, MeasureEntry]:
    """The callback's measure table, label -> entry: the preset's entries of this ``kind`` (those ``measures``
    names, if given), else ``measures`` (names or label -> settings), else every registered measure of ``kind``."""
    if preset is not None:
        names = list(measures) if measures is not None else None
        overrides = measures if isinstance(measures, dict) else None
        entries = preset_measures(preset, names, overrides, f"{owner}(preset)", f"{owner}(measures)")
        entries = [e for e in entries if not e.is_record and get_measure(e.measure).kind == kind]
        if not entries:
            raise ConfigError(f"{owner}(preset): preset {preset!r} has no {kind} measure; use the other callback.")
    else:
        entries = measure_table(measures, f"{owner}(measures)", default=list_measures(kind))
        records = [e.label for e in entries if e.is_record]
        if records:
            raise ConfigError(
                f"{owner}(measures): {records[0]} is a record of the training run, read by `flatlit measure`."
            )
    return {e.label: e for e in entries}


class SharpnessMeasures(CurvatureCallback):
    """Sharpness measures of the training loss on a fixed sample, during training (SPEC F24–F35).

    Each measure is a registered function of :mod:`flatlit.sharpness` (``flatlit.sharpness.list_measures()``; the
    formula, paper, defaults and cost are in its docstring, and ``flatlit measure --list`` prints them). Values are
    logged as ``sharpness/<name>`` (plus ``sharpness/<name>_se`` for Monte-Carlo estimates) through
    ``pl_module.log``, so they reach every logger, ``history.csv`` and ``trainer.callback_metrics`` (monitorable),
    at the step of the epoch's other metrics.

    The loss is the one the module trains on (:func:`flatlit.objective.resolve_objective`: ``batch_loss``,
    ``loss_fn``, the module's ``curvature_loss(batch)``, a flatlit family's ``training_loss``, its ``loss_fn``, or
    cross-entropy for class logits), on batches of any structure. Measures that need class logits and labels
    (margins, the bounds, prediction entropy, minimum sharpness) take them from the module's
    ``outputs_and_targets(batch)`` hook, a flatlit family's ``accuracy_inputs``, or ``(module(x), y)`` when those
    are class logits (a one-logit binary head counts as (0, z)). At setup the loss is checked on one batch, and a
    measure that cannot apply (an autoencoder's margin, say) is refused with one line when it was asked for by
    name, or skipped with one logged note when ``measures`` is None (all).

    Args:
        measures: names, or a mapping label → settings overriding the measure's defaults (e.g.
            ``{worst_case_l2: {rho: 0.05}}``; an entry may name its ``measure``, e.g. ``{sam_05: {measure:
            sam_sharpness, rho: 0.5}}``); None: every registered measure of this kind that applies. With a
            ``preset``: the preset's labels to run (None: all) or label → settings it leaves free.
        preset: a paper's measure set (``jiang2019``, ``andriushchenko2023``, ``lpf2022``; see
            :mod:`flatlit.sharpness.presets`): its measures of this callback's kind, logged under the paper's names
            (``<prefix>/<label>``) with the paper's conventions; those that do not apply are skipped with a note.
            The run records a preset reads (Jiang's step counts) are ``flatlit measure``'s, not logged here.
        params: the parameters the measures differentiate and perturb (:func:`flatlit.objective.select_parameters`):
            None (every trainable one), a callable ``module -> parameters`` or ``fnmatch`` name pattern(s) such as
            ``"net.0.*"``; ``exclude_bn`` / ``exclude_bias`` then leave BatchNorm parameters / biases out.
        **kwargs: :class:`~flatlit.callbacks.curvature_base.CurvatureCallback` arguments (num_samples, batch_size,
            every_n_epochs, every_n_steps, at_train_start, loss_fn, batch_loss, exclude_bn, exclude_bias, seed, ...).

    Raises:
        ConfigError: an unknown measure or setting (at construction); a loss, parameter selection or explicitly
            requested measure that cannot apply (at setup, one line).

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
        params: ParamsSpec = None,
        preset: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_samples=num_samples, batch_size=batch_size, **kwargs)
        self.measures = _check_measures(type(self).__name__, measures, self.kind, preset)
        self.all_measures = measures is None or preset is not None  # skip (with a note) what does not apply
        self.preset = preset
        self.param_spec = params
        self.skipped: dict[str, str] = {}  # measures (of "all") that do not apply to this module: name -> reason
        self.history: dict[str, list] = {"step": [], "epoch": [], "values": []}
        self._init_state: dict[str, torch.Tensor] | None = None
        self._objective: Objective | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(measures=sorted(self.measures), num_samples=self.num_samples)

    def params(self, pl_module: pl.LightningModule) -> list[torch.nn.Parameter]:
        """The selected parameters (``params``, ``exclude_bn``, ``exclude_bias``); one ConfigError when none."""
        return select_parameters(pl_module, self.param_spec, self.exclude_bn, self.exclude_bias, type(self).__name__)

    def objective(self, pl_module: pl.LightningModule) -> Objective:
        """The module's loss (and logits) by :func:`flatlit.objective.resolve_objective`."""
        if self._objective is None or self._objective.module is not pl_module:
            self._objective = resolve_objective(pl_module, type(self).__name__, self.batch_loss, self.loss_fn)
        return self._objective

    def inputs(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batches: list[Any]) -> MeasureInputs:
        """:class:`~flatlit.sharpness.MeasureInputs` of the (moved) ``batches`` with the module's loss and logits."""
        objective = self.objective(pl_module)
        explicit = self.param_spec is not None or self.exclude_bn or self.exclude_bias
        dm = trainer.datamodule
        num_train = len(dm.train_indices) if getattr(dm, "train_indices", None) is not None else None
        return MeasureInputs(
            pl_module,
            batches,
            init_state=self._init_state,
            num_train=num_train,
            batch_loss=objective.loss_of,
            logits_fn=objective.logits_of,
            params=self.params(pl_module) if explicit else None,
        )

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check, on one batch of the sample, the loss (a scalar reaching every selected parameter) and which
        measures apply: refuse (one line) a requested one that does not, skip (one note) those of "all" that do not.
        The module is left exactly as it was."""
        if stage != "fit":
            return
        owner = type(self).__name__
        self.check_sizes(pl_module)
        objective = self.objective(pl_module)
        params = self.params(pl_module)
        batch = self.move(self.batches(trainer)[0], pl_module)
        with observed(pl_module):
            set_bn_policy(pl_module, "eval")
            objective.check(batch, params)
        inputs = self.inputs(trainer, pl_module, [batch])
        reasons = {label: inapplicable_reason(e.measure, inputs, **e.settings) for label, e in self.measures.items()}
        bad = {name: reason for name, reason in reasons.items() if reason is not None}
        if bad and not self.all_measures:
            raise ConfigError(f"{owner}(measures): {next(iter(bad.values()))}")
        self.skipped = bad
        if bad:
            rank_zero_info(f"{owner}: {_skip_note(bad, type(pl_module).__name__)}")

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
        owner = type(self).__name__
        batches = [self.move(b, pl_module) for b in self.batches(trainer)]
        inputs = self.inputs(trainer, pl_module, batches)
        active = {label: e for label, e in self.measures.items() if label not in self.skipped}
        metrics: dict[str, float] = {}
        values: dict[str, float] = {}
        last_line = start
        for i, (name, e) in enumerate(active.items()):
            result = compute_measure(e.measure, inputs, **e.settings)
            metrics[f"{self.prefix}/{name}"] = result.value
            values[name] = result.value
            if result.std_error is not None:
                metrics[f"{self.prefix}/{name}_se"] = result.std_error
            now = time.perf_counter()
            if self.progress_every is not None and now - last_line >= self.progress_every:
                last_line = now
                rank_zero_info(
                    f"{owner} at step {trainer.global_step}: {i + 1}/{len(active)} measures done "
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
