"""Small plain-Lightning projects (no flatlit module or DataModule), as a user would write them: the curvature
callbacks must leave their training untouched and measure the Hessian of each module's own loss."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

N_TRAIN, IN = 64, 6


def data(regression: bool = False, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_TRAIN, IN, generator=g, dtype=torch.float64)
    if regression:
        return x, (x[:, :1] * 0.7 - x[:, 1:2] ** 2 + 0.1 * torch.randn(N_TRAIN, 1, generator=g, dtype=torch.float64))
    return x, (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()


class DictDataset(Dataset):
    """Examples as dicts, e.g. {"image": x, "label": y} (or other keys)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, keys: tuple[str, str] = ("image", "label")) -> None:
        self.x, self.y, self.keys = x, y, keys

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {self.keys[0]: self.x[i], self.keys[1]: self.y[i]}


class ShuffleGeneratorDM(pl.LightningDataModule):
    """A DataModule whose training loader shuffles with a generator it owns (drawing from it changes training)."""

    def __init__(self, regression: bool = False, dict_keys: tuple[str, str] | None = None) -> None:
        super().__init__()
        self.regression, self.dict_keys = regression, dict_keys
        self.gen = torch.Generator().manual_seed(1234)

    def setup(self, stage: str) -> None:
        x, y = data(self.regression)
        self.ds = DictDataset(x, y, self.dict_keys) if self.dict_keys else TensorDataset(x, y)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.ds, batch_size=8, shuffle=True, generator=self.gen)


class Net(pl.LightningModule):
    """MLP with dropout and BatchNorm; ``frozen_bn`` puts the BN layer in eval mode for the whole run."""

    def __init__(
        self, out: int = 3, frozen_bn: bool = False, manual: bool = False, dict_batch: tuple[str, str] | None = None
    ):
        super().__init__()
        self.dict_batch = dict_batch
        self.net = nn.Sequential(nn.Linear(IN, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Dropout(0.3), nn.Linear(5, out))
        if frozen_bn:
            self.net[1].eval()  # a deliberately frozen BatchNorm: its running statistics must not move
        self.automatic_optimization = not manual
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def unpack(self, batch):
        return (batch[self.dict_batch[0]], batch[self.dict_batch[1]]) if self.dict_batch else batch

    def criterion(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The training loss (cross-entropy here). Not exposed as ``loss_fn``: the callbacks default to it."""
        return getattr(self, "loss_fn", F.cross_entropy)(out, y)

    def training_step(self, batch, batch_idx):
        x, y = self.unpack(batch)
        loss = self.criterion(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True, batch_size=len(y))
        if self.automatic_optimization:
            return loss
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)


class Regression(Net):
    """One output and a mean-squared-error loss (the module's own ``loss_fn``)."""

    def __init__(self, **kw) -> None:
        super().__init__(out=1, **kw)

    def loss_fn(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(out, y)


class RegressionWithoutLoss(Net):
    """A regression module that computes its loss inline (no ``loss_fn``): the callbacks cannot guess it."""

    def __init__(self) -> None:
        super().__init__(out=1)

    def criterion(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(out, y)


class LabelSmoothing(Net):
    def loss_fn(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, y, label_smoothing=0.2)


class DictForward(Net):
    """``forward`` takes the whole dict batch; the loss is given by ``curvature_loss``."""

    def __init__(self) -> None:
        super().__init__(dict_batch=("features", "target"))

    def forward(self, batch: dict) -> torch.Tensor:
        return self.net(batch["features"])

    def curvature_loss(self, batch: dict) -> torch.Tensor:
        return F.cross_entropy(self(batch), batch["target"])

    def training_step(self, batch, batch_idx):
        return self.curvature_loss(batch)
