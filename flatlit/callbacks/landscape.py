"""A 1-D loss-landscape slice drawn into TensorBoard during training (Li et al. 2018, arXiv 1712.09913)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from typing_extensions import override

from flatlit.callbacks.curvature_base import CurvatureCallback, draw_sample
from flatlit.landscape import BIAS_BN, LandscapeResult, compute_surface, random_directions
from flatlit.landscape.evaluation import EvaluationFunctions, evaluation_functions
from flatlit.objective import Objective, ParamsSpec, resolve_objective, select_parameters
from flatlit.utils.errors import ConfigError
from flatlit.utils.nn import preserved_rng

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
BatchLossFn = Callable[[pl.LightningModule, Any], torch.Tensor]


class LossLandscape(Callback):
    """Every ``every_n_epochs`` epochs, the training loss and accuracy along one filter-normalised random direction,
    L(w + α·d) for α on a fixed grid, on a fixed seeded sample of the training split.

    The loss is the one the module trains on, by flatlit's one resolution order (:mod:`flatlit.objective`): the
    callback's ``batch_loss(pl_module, batch)``, else its ``loss_fn(pl_module(x), y)``, the module's
    ``curvature_loss(batch)``, a flatlit family's ``training_loss``, the module's ``loss_fn``, cross-entropy on class
    logits. Batches keep their structure (dicts, several inputs, inputs only); L is the size-weighted mean of the
    batch losses. The accuracy is that of the module's class logits (``outputs_and_targets``, a flatlit family's
    ``accuracy_inputs``, or ``pl_module(x)`` against integer ``y``); a module without them (an autoencoder, a
    language model without a hook) gets the loss only (NaN accuracies, no accuracy axis). Everything that could
    fail is checked at setup on one batch of the sample (the loss evaluates to a scalar that reaches every selected
    parameter): one ConfigError there, never a crash mid-run.

    d is drawn from N(0, I) with the fixed ``seed`` and rescaled filter by filter to the current weights,
    d_i ← d_i/‖d_i‖·‖w_i‖ (Li, Xu, Taylor, Studer & Goldstein, "Visualizing the Loss Landscape of Neural Nets",
    NeurIPS 2018, arXiv 1712.09913), so the slices of successive epochs are comparable. The figure (loss on a log
    axis, accuracy on a twin axis) goes to TensorBoard as the image ``landscape/line`` (when a logger is a
    :class:`~lightning.pytorch.loggers.TensorBoardLogger`) and, with the values, to
    ``<log_dir>/landscape/epoch{E}.png`` and ``.npz``; ``landscape/loss_origin`` and ``landscape/rise`` (mean over α
    of L(w + α·d) − L(w)) go to every logger.

    Observe, never perturb: the points are written into the module's own parameters and the module comes back bit
    for bit (weights, BatchNorm buffers, train/eval flags, ``.grad`` and the torch/NumPy/Python RNG states); the
    optimizer and the training loader are never touched, so a run with this callback trains exactly as one without.
    Under DDP every rank holds the whole sample and evaluates every world-size-th point; the values are all-reduced
    and rank 0 draws.

    Args:
        every_n_epochs: draw at the end of every n-th training epoch.
        span, resolution: the grid, ``resolution`` evenly spaced α from ``span[0]`` to ``span[1]``.
        alphas: explicit α values instead (overrides ``span``/``resolution``).
        num_samples: size of the fixed sample (flatlit DataModules: ``curvature_batches``; otherwise a seeded subset
            of the training loader's dataset read through a separate loader).
        batch_size: batch size of the evaluation passes.
        seed: seed of the sample and of the direction.
        norm: ``filter`` (Li et al.), ``layer``, ``model`` or None; ``bias_bn``: ``ignore`` (1-D parameters do not
            move, Li et al.'s default) or ``filter``.
        bn: ``eval`` (running statistics of the current weights) or ``update`` (re-estimated at every point).
        at_train_start: also draw before the first step.
        loss_fn: ``loss_fn(pl_module(x), y)`` with ``(x, y)`` unpacked from the batch (see above for the default).
        batch_loss: ``batch_loss(pl_module, batch)`` returning the batch-mean loss of any batch; takes precedence
            over everything else.
        params: the parameters the direction moves: a callable ``pl_module -> parameters`` or ``fnmatch`` name
            patterns (e.g. ``"generator.*"``); the others stay at their values. Default every trainable parameter.

    Raises:
        ConfigError: a bad argument (at construction); at setup, a loss that fails on a batch of the sample, is not
            a scalar or does not reach a selected parameter, and a ``params`` that selects nothing.

    Example::

        trainer = Trainer(callbacks=[LossLandscape(every_n_epochs=5, span=(-1.0, 1.0), resolution=21)])
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        span: tuple[float, float] = (-1.0, 1.0),
        resolution: int = 21,
        alphas: Sequence[float] | None = None,
        num_samples: int = 500,
        batch_size: int = 250,
        seed: int = 0,
        norm: str | None = "filter",
        bias_bn: str = "ignore",
        bn: str = "eval",
        at_train_start: bool = False,
        loss_fn: LossFn | None = None,
        batch_loss: BatchLossFn | None = None,
        params: ParamsSpec = None,
    ) -> None:
        for key, val in (("every_n_epochs", every_n_epochs), ("num_samples", num_samples), ("batch_size", batch_size)):
            if val < 1:
                raise ConfigError(f"LossLandscape({key}): must be >= 1, got {val}.")
        if norm not in ("filter", "layer", "model", None):
            raise ConfigError(f"LossLandscape(norm): 'filter', 'layer', 'model' or None, got {norm!r}.")
        if bias_bn not in BIAS_BN:
            raise ConfigError(f"LossLandscape(bias_bn): 'ignore' or 'filter', got {bias_bn!r}.")
        if bn not in ("eval", "update"):
            raise ConfigError(f"LossLandscape(bn): 'eval' or 'update', got {bn!r}.")
        if alphas is not None:
            grid = np.asarray(list(alphas), dtype=np.float64)
            if grid.size < 2 or not np.isfinite(grid).all():
                raise ConfigError(f"LossLandscape(alphas): at least 2 finite values, got {alphas!r}.")
        else:
            if resolution < 2:
                raise ConfigError(f"LossLandscape(resolution): must be >= 2, got {resolution}.")
            if len(span) != 2 or not np.isfinite(span).all() or span[0] == span[1]:
                raise ConfigError(f"LossLandscape(span): two different finite ends (a, b), got {span!r}.")
            grid = np.linspace(float(span[0]), float(span[1]), resolution)
        self.every_n_epochs, self.alphas = every_n_epochs, grid
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.norm, self.bias_bn, self.bn, self.at_train_start = norm, bias_bn, bn, at_train_start
        self.loss_fn, self.batch_loss, self.param_spec = loss_fn, batch_loss, params
        self.history: dict[str, list] = {"epoch": [], "step": [], "loss": [], "acc": []}
        self.last_result: LandscapeResult | None = None
        self._batches: list[Any] | None = None
        self._functions: EvaluationFunctions | None = None
        self._source = ""

    @property
    def state_key(self) -> str:
        return self._generate_state_key(seed=self.seed, num_samples=self.num_samples)

    # ---- sample ------------------------------------------------------------------------------------------------
    def _draw_sample(self, trainer: pl.Trainer) -> list[Any]:
        """The fixed sample as the data gives it, whole on every rank (see :func:`draw_sample`)."""
        return draw_sample(trainer, "LossLandscape", self.num_samples, self.batch_size, self.seed, sharded=False)

    def _sample(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Any]:
        """The whole fixed sample on every rank (the points, not the data, are split across ranks), moved to the
        module's device with its ``transfer_batch_to_device`` (floating tensors in the parameters' dtype)."""
        if self._batches is None:
            with preserved_rng():  # a DataLoader's iterator draws its base seed from the global RNG
                raw = self._draw_sample(trainer)
            if not raw:
                raise ConfigError("LossLandscape(num_samples): the sample is empty.")
            self._batches = [CurvatureCallback.move(b, pl_module) for b in raw]
        return self._batches

    # ---- loss ----------------------------------------------------------------------------------------------------
    def objective(self, pl_module: pl.LightningModule) -> Objective:
        """The module's loss (and logits) by :func:`flatlit.objective.resolve_objective`."""
        return resolve_objective(pl_module, "LossLandscape", self.batch_loss, self.loss_fn)

    def params(self, pl_module: pl.LightningModule) -> list[torch.nn.Parameter]:
        """The parameters the direction moves (``params``; one ConfigError when it selects none)."""
        return select_parameters(pl_module, self.param_spec, owner="LossLandscape")

    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> EvaluationFunctions:
        """Check the loss on one batch of the sample (a scalar reaching every selected parameter) and find out
        whether there is an accuracy; the module is left exactly as it was."""
        if self._functions is None:
            from flatlit.sharpness.base import observed

            batch = self._sample(trainer, pl_module)[0]
            objective = self.objective(pl_module)
            params = self.params(pl_module)
            with observed(pl_module):  # weights, buffers, flags, .grad and the RNG states restored
                pl_module.eval()
                objective.check(batch, params)
            self._functions = evaluation_functions(objective, batch)
            self._source = objective.source
            if self._functions.no_accuracy is not None:
                rank_zero_info(f"LossLandscape: {self._functions.no_accuracy}; the landscape shows the loss only.")
        return self._functions

    # ---- hooks -------------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Refuse at setup, with one line, what would fail mid-run (see :meth:`_prepare`)."""
        if stage == "fit":
            self._functions = None  # a new fit (possibly of another module): check again
            self._batches = None
            self._prepare(trainer, pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_train_start and trainer.global_step == 0:
            self.draw(trainer, pl_module, "start")

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.draw(trainer, pl_module, f"epoch{trainer.current_epoch:03d}")

    def draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule, name: str) -> LandscapeResult:
        """Compute the slice (every rank: a collective under DDP) and draw it (rank 0)."""
        log_dir = trainer.log_dir if trainer.loggers else None  # a broadcast under DDP: every rank asks
        batches = self._sample(trainer, pl_module)
        functions = self._prepare(trainer, pl_module)
        with preserved_rng():
            params = self.params(pl_module)
            directions = random_directions(pl_module, 1, self.seed, self.norm, self.bias_bn, params=params)
            meta = {"mode": "line", "epoch": trainer.current_epoch, "step": trainer.global_step, "seed": self.seed}
            meta["labels"] = {"alpha": "α (filter-normalised direction)" if self.norm == "filter" else "α"}
            meta["loss"] = self._source
            result = compute_surface(
                pl_module,
                batches,
                directions,
                self.alphas,
                batch_loss=functions.batch_loss,
                logits_fn=functions.logits_fn,
                bn=self.bn,
                meta=meta,
            )
        self.last_result = result
        self.history["epoch"].append(trainer.current_epoch)
        self.history["step"].append(trainer.global_step)
        self.history["loss"].append(result.loss.tolist())
        self.history["acc"].append(result.acc.tolist())
        self._output(trainer, result, log_dir, name)
        return result

    @rank_zero_only
    def _output(self, trainer: pl.Trainer, result: LandscapeResult, log_dir: str | None, name: str) -> None:
        i0 = int(np.argmin(np.abs(result.alphas)))
        metrics = {
            "landscape/loss_origin": float(result.loss[i0]),
            "landscape/rise": float(np.nanmean(result.loss) - result.loss[i0]),
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if log_dir is None:
            return
        from matplotlib.image import imread

        from flatlit.figures.landscape import plot_line

        stem = os.path.join(log_dir, "landscape", name)
        result.save(f"{stem}.npz")
        png = plot_line(result, f"{stem}.png", title=f"epoch {trainer.current_epoch}, step {trainer.global_step}")
        image = imread(png)[..., :3]
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("landscape/line", image, trainer.global_step, dataformats="HWC")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": {k: list(v) for k, v in self.history.items()}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = {k: list(v) for k, v in state_dict.get("history", self.history).items()}
