"""Five small Lightning projects that are not classifiers on ``(x, y)`` batches, as users write them (issue 22): an
autoencoder, a Transformer language model, a one-logit binary fine-tune with a frozen BatchNorm backbone, a module
whose ``training_step`` returns a dict, and a two-optimizer GAN in manual optimization. Each has a DataModule whose
training loader shuffles with a generator it owns, and a ``reference_loss(module, batch)``: its own loss written
out independently of flatlit, for the tests' references."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

N_TRAIN, N_TEST, IN, VOCAB, SEQ = 48, 16, 4, 6, 5


class Items(Dataset):
    """Examples as built by ``make(i)``: a tensor, a tuple or a dict."""

    def __init__(self, n: int, make) -> None:
        self.n, self.make = n, make

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.make(i)


def _data(kind: str, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN, generator=g, dtype=torch.float64)
    if kind == "autoencoder":
        return lambda i: x[i]
    if kind == "language_model":
        tokens = torch.randint(0, VOCAB, (n, SEQ), generator=g)
        return lambda i: tokens[i]
    if kind == "binary":
        y = (x[:, 0] - 0.5 * x[:, 1] > 0).double()
        return lambda i: (x[i], y[i])
    if kind == "dict_step":
        y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
        return lambda i: {"image": x[i], "label": y[i]}
    if kind == "gan":
        z = torch.randn(n, 2, generator=g, dtype=torch.float64)
        real = x * 0.5 + 1.0
        return lambda i: {"real": real[i], "noise": z[i]}
    raise ValueError(kind)


class ZooDM(pl.LightningDataModule):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.gen = torch.Generator().manual_seed(1234)

    def setup(self, stage: str) -> None:
        self.train = Items(N_TRAIN, _data(self.kind, N_TRAIN, 0))
        self.test = Items(N_TEST, _data(self.kind, N_TEST, 1))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=8, shuffle=True, generator=self.gen)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test, batch_size=8)


class AutoEncoder(pl.LightningModule):
    """Batches are the inputs alone; the loss is the reconstruction error (``curvature_loss``)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(IN, 2), nn.Tanh())
        self.decoder = nn.Linear(2, IN)
        self.double()

    def forward(self, x):
        return self.decoder(self.encoder(x))

    def curvature_loss(self, batch):
        return F.mse_loss(self(batch), batch)

    def training_step(self, batch, batch_idx):
        return self.curvature_loss(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    @staticmethod
    def reference_loss(module, batch):
        return ((module.decoder(torch.tanh(module.encoder[0](batch))) - batch) ** 2).mean()


class LanguageModel(pl.LightningModule):
    """A one-layer causal Transformer over token batches (B, T) with ``F.scaled_dot_product_attention``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 4)
        self.qkv = nn.Linear(4, 12, bias=False)
        self.head = nn.Linear(4, VOCAB)
        self.double()

    def forward(self, tokens):
        h = self.embed(tokens)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        return self.head(h + F.scaled_dot_product_attention(q, k, v, is_causal=True))

    def curvature_loss(self, batch):
        logits = self(batch[:, :-1])
        return F.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))

    def training_step(self, batch, batch_idx):
        return self.curvature_loss(batch)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)

    @staticmethod
    def reference_loss(module, batch):  # attention written out (causal softmax), no fused kernel
        inputs, targets = batch[:, :-1], batch[:, 1:]
        h = module.embed(inputs)
        q, k, v = module.qkv(h).chunk(3, dim=-1)
        scores = q @ k.transpose(-1, -2) / 2.0  # sqrt(4)
        t = inputs.shape[1]
        scores = scores.masked_fill(torch.triu(torch.ones(t, t, dtype=torch.bool), 1), float("-inf"))
        logits = module.head(h + torch.softmax(scores, -1) @ v)
        logp = torch.log_softmax(logits, -1)
        return -logp.gather(-1, targets.unsqueeze(-1)).mean()


class BinaryFinetune(pl.LightningModule):
    """A frozen backbone with BatchNorm (eval mode, no gradients) and a trainable one-logit head; BCE-with-logits on
    float 0/1 labels as the module's ``loss_fn``."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(IN, 6), nn.BatchNorm1d(6), nn.Tanh())
        with torch.no_grad():
            self.backbone[1].running_mean.uniform_(-0.2, 0.2)
            self.backbone[1].running_var.uniform_(0.5, 1.5)
        self.backbone.requires_grad_(False)
        self.head = nn.Linear(6, 1)
        self.double()

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen: BatchNorm on its running statistics, always
        return self

    def forward(self, x):
        return self.head(self.backbone(x))

    def loss_fn(self, out, y):
        return F.binary_cross_entropy_with_logits(out.squeeze(-1), y)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.loss_fn(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.head.parameters(), lr=0.5)

    @staticmethod
    def reference_loss(module, batch):
        x, y = batch
        bn = module.backbone[1]
        h = torch.tanh(
            (module.backbone[0](x) - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
        )
        z = module.head(h).squeeze(-1)
        return (torch.clamp(z, min=0) - z * y + torch.log1p(torch.exp(-z.abs()))).mean()

    @staticmethod
    def reference_accuracy(module, batches) -> float:
        correct = total = 0
        with torch.no_grad():
            for x, y in batches:
                correct += int(((module(x).squeeze(-1) > 0).double() == y).sum())
                total += len(y)
        return correct / total


class DictStep(pl.LightningModule):
    """Dict batches {"image", "label"}, a label-smoothed ``loss_fn`` and a ``training_step`` returning a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(IN, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Dropout(0.2), nn.Linear(5, 3))
        self.double()

    def forward(self, x):
        return self.net(x)

    def loss_fn(self, out, y):
        return F.cross_entropy(out, y, label_smoothing=0.1)

    def training_step(self, batch, batch_idx):
        out = self(batch["image"])
        return {"loss": self.loss_fn(out, batch["label"]), "logits": out.detach()}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    @staticmethod
    def reference_loss(module, batch):
        logp = torch.log_softmax(module(batch["image"]), -1)
        y = batch["label"]
        return (-(0.9 * logp.gather(1, y[:, None]).squeeze(1)) - 0.1 * logp.mean(1)).mean()


class GAN(pl.LightningModule):
    """Generator and discriminator with two optimizers (manual optimization). The curvature of interest is the
    discriminator's loss, whose fake half sees ``generator(noise).detach()``: the generator is out of its reach."""

    def __init__(self) -> None:
        super().__init__()
        self.generator = nn.Linear(2, IN)
        self.discriminator = nn.Sequential(nn.Linear(IN, 3), nn.Tanh(), nn.Linear(3, 1))
        self.automatic_optimization = False
        self.double()

    def forward(self, noise):
        return self.generator(noise)

    def curvature_loss(self, batch):
        real, fake = self.discriminator(batch["real"]), self.discriminator(self(batch["noise"]).detach())
        ones, zeros = torch.ones_like(real), torch.zeros_like(fake)
        return F.binary_cross_entropy_with_logits(real, ones) + F.binary_cross_entropy_with_logits(fake, zeros)

    def training_step(self, batch, batch_idx):
        opt_g, opt_d = self.optimizers()
        d_loss = self.curvature_loss(batch)
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        fake = self.discriminator(self(batch["noise"]))
        g_loss = F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()

    def configure_optimizers(self):
        return (
            torch.optim.Adam(self.generator.parameters(), lr=1e-2),
            torch.optim.SGD(self.discriminator.parameters(), lr=0.1, momentum=0.5),
        )

    @staticmethod
    def reference_loss(module, batch):
        d = module.discriminator

        def logit(x):
            return d[2](torch.tanh(d[0](x)))

        real, fake = logit(batch["real"]), logit(module.generator(batch["noise"]).detach())
        return F.softplus(-real).mean() + F.softplus(fake).mean()


ZOO = {
    "autoencoder": AutoEncoder,
    "language_model": LanguageModel,
    "binary": BinaryFinetune,
    "dict_step": DictStep,
    "gan": GAN,
}
