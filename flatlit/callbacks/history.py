"""Per-epoch CSV history (``history.csv`` in the run directory), like Keras' CSVLogger in the sharpest-directions
code. One row per training epoch with every scalar Lightning holds at its end (``trainer.callback_metrics``), plus
rows that callbacks add (the curvature measured before training: epoch −1). The file is replaced atomically."""

from __future__ import annotations

import csv
import os
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override


class HistoryCSV(Callback):
    """Append one row of scalars per epoch to ``<log_dir>/<filename>``.

    Args:
        filename: file name inside ``trainer.log_dir``.

    Columns are the union of all keys seen so far. Lightning's ``name_step``/``name_epoch`` forks of a metric
    logged both per step and per epoch appear once, as ``name`` (the epoch value); other names, such as
    ``train/passes_per_step``, are kept as they are. The file is written to a temporary file and renamed, so a reader
    never sees a partial file. A resumed run continues the rows saved in its checkpoint.

    Example::

        Trainer(callbacks=[HistoryCSV()])
    """

    def __init__(self, filename: str = "history.csv") -> None:
        self.filename = filename
        self.rows: list[dict[str, Any]] = []
        self._pending: dict[str, Any] | None = None
        self._restored = False
        self._trainer: pl.Trainer | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(filename=self.filename)

    def path(self, trainer: pl.Trainer) -> str | None:
        """``<log_dir>/<filename>``, or None without a logger (log_dir would be the working directory)."""
        if not trainer.loggers:
            return None
        log_dir = trainer.log_dir  # broadcasts under DDP: called on every rank
        return None if log_dir is None else os.path.join(log_dir, self.filename)

    def add_row(self, trainer: pl.Trainer, row: dict[str, Any]) -> None:
        """Add a row now (e.g. a measurement before training, with ``epoch`` −1) and rewrite the file; values for
        the same (epoch, step) as an existing row are merged into it (several callbacks measuring at one point)."""
        same = [r for r in self.rows if r.get("epoch") == row.get("epoch") and r.get("step") == row.get("step")]
        if same:
            same[-1].update(row)
        else:
            self.rows.append(dict(row))
        self._write(self.path(trainer))

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._restored:
            self._restored = False
            self._recover_rows(trainer)

    def _recover_rows(self, trainer: pl.Trainer) -> None:
        """Keep the on-disk rows of finished epochs that the checkpoint lacks.

        A checkpoint written right after an epoch's last batch precedes that epoch's row, and Lightning does not
        rerun the epoch's end when it resumes from it; the interrupted run may have written the row already.
        """
        path = self.path(trainer)
        if path is None or not os.path.isfile(path):
            return
        known = {r.get("epoch") for r in self.rows}
        with open(path, newline="") as f:
            for raw in csv.DictReader(f):
                try:
                    epoch, step = int(raw["epoch"]), int(raw["step"])
                except (KeyError, TypeError, ValueError):
                    continue
                if epoch in known or epoch >= trainer.current_epoch:
                    continue
                row: dict[str, Any] = {"epoch": epoch, "step": step}
                row.update({k: float(v) for k, v in raw.items() if k not in row and v not in ("", None)})
                self.rows.append(row)
        self.rows.sort(key=lambda r: (r.get("epoch", 0), r.get("step", 0)))

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The row is completed later (next epoch start, end of training, or a checkpoint), once every hook of this
        # epoch (module, other callbacks) has logged.
        self._pending = {"epoch": trainer.current_epoch, "step": trainer.global_step}

    def _flush(self, trainer: pl.Trainer) -> None:
        if self._pending is None:
            return
        row = self._pending
        self._pending = None
        metrics = trainer.callback_metrics
        # Lightning's forks of a metric logged per step and per epoch: kept once, as the base name (epoch value)
        forks = {k for k in metrics if k.endswith("_step") and f"{k[:-5]}_epoch" in metrics}
        forks |= {f"{k[:-5]}_epoch" for k in forks}
        for key, value in sorted(metrics.items()):
            if key not in forks:
                row[key] = float(value)
            elif key.endswith("_epoch") and key[:-6] not in metrics:
                row[key[:-6]] = float(value)
        self.rows.append(row)
        self._write(self.path(trainer))

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush(trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush(trainer)

    @rank_zero_only
    def _write(self, path: str | None) -> None:
        if path is None:
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fields: list[str] = []
        for r in self.rows:
            fields += [k for k in r if k not in fields]
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, path)  # atomic: a reader sees the old file or the new one

    @override
    def state_dict(self) -> dict[str, Any]:
        if self._trainer is not None:
            self._flush(self._trainer)  # a checkpoint taken at epoch end carries that epoch's row
        return {"rows": list(self.rows)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = list(state_dict.get("rows", []))
        self._restored = True
