"""Per-epoch CSV history (``history.csv`` in the run directory), like Keras' CSVLogger in the sharpest-directions
code. One row per training epoch with every epoch-level scalar Lightning holds (``trainer.callback_metrics``)."""

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

    Columns are the union of all keys seen so far; a resumed run appends to the same file (rows after the
    restored epoch are dropped so the history has no duplicates).

    Example::

        Trainer(callbacks=[HistoryCSV()])
    """

    def __init__(self, filename: str = "history.csv") -> None:
        self.filename = filename
        self.rows: list[dict[str, Any]] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(filename=self.filename)

    def path(self, trainer: pl.Trainer) -> str | None:
        return None if trainer.log_dir is None else os.path.join(trainer.log_dir, self.filename)

    def extra_row(self, trainer: pl.Trainer, row: dict[str, Any]) -> None:
        """Merge values (e.g. from a measurement callback) into the current epoch's row."""
        if self.rows and self.rows[-1]["epoch"] == trainer.current_epoch:
            self.rows[-1].update(row)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        row: dict[str, Any] = {"epoch": trainer.current_epoch, "step": trainer.global_step}
        for key, value in sorted(trainer.callback_metrics.items()):
            if key.endswith("_step"):
                continue
            row[key.removesuffix("_epoch")] = float(value)
        self.rows.append(row)
        self._write(trainer)

    @rank_zero_only
    def _write(self, trainer: pl.Trainer) -> None:
        path = self.path(trainer)
        if path is None:
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fields: list[str] = []
        for r in self.rows:
            fields += [k for k in r if k not in fields]
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(self.rows)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"rows": list(self.rows)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = list(state_dict.get("rows", []))
