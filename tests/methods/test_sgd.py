import torch
import torch.nn.functional as F

from flatlit.data import MNISTDataModule
from flatlit.methods import SGDFamily
from tests.helpers import quiet_trainer


def sgd(lr=0.1, momentum=0.0):
    return lambda p: torch.optim.SGD(p, lr=lr, momentum=momentum)


trainer = quiet_trainer


def test_one_step_equals_hand_computed_sgd(mnist_dir):
    torch.manual_seed(0)
    module = SGDFamily(arch="mlp", arch_kwargs={"width": 8}, optimizer=sgd(0.1))
    w0 = {k: v.clone() for k, v in module.model.state_dict().items()}
    dm = MNISTDataModule(data_dir=mnist_dir, batch_size=16, download=False, seed=0)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    ref = SGDFamily(arch="mlp", arch_kwargs={"width": 8})
    ref.model.load_state_dict(w0)
    F.cross_entropy(ref.model(x), y).backward()
    expected = {n: p.detach() - 0.1 * p.grad for n, p in ref.model.named_parameters()}
    trainer(max_steps=1, limit_val_batches=0).fit(module, datamodule=dm)
    for n, p in module.model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n])


def test_training_learns_and_logs(mnist_dir):
    torch.manual_seed(0)
    module = SGDFamily(arch="mlp", arch_kwargs={"width": 32}, optimizer=sgd(0.05, 0.9))
    dm = MNISTDataModule(data_dir=mnist_dir, batch_size=32, val_size=40, download=False)
    t = trainer(max_epochs=6)
    t.fit(module, datamodule=dm)
    m = t.callback_metrics
    for key in ("train/loss", "train/acc", "val/loss", "val/acc", "gen_gap", "lr"):
        assert key in m, key
    torch.testing.assert_close(m["gen_gap"], m["train/acc"] - m["val/acc"])
    assert m["train/acc"] > 0.5 and t.global_step == 6 * 7


def test_train_metrics_are_exact_epoch_means(mnist_dir):
    torch.manual_seed(0)
    module = SGDFamily(arch="mlp", arch_kwargs={"width": 8}, optimizer=sgd(0.0))  # lr 0: weights stay fixed
    dm = MNISTDataModule(data_dir=mnist_dir, batch_size=50, download=False)  # 240 = 4×50 + 40: uneven batches
    t = trainer(max_epochs=1, limit_val_batches=0)
    t.fit(module, datamodule=dm)
    module.eval()
    x = (dm._train_images.float() / 255 - 0.1307) / 0.3081
    with torch.no_grad():
        logits = module(x)
    # dropout-free MLP in train mode equals eval mode
    torch.testing.assert_close(t.callback_metrics["train/loss"], F.cross_entropy(logits, dm.train_targets))
    acc = (logits.argmax(1) == dm.train_targets).float().mean()
    torch.testing.assert_close(t.callback_metrics["train/acc"], acc)


def test_schedulers_wired(mnist_dir):
    from torch.optim.lr_scheduler import MultiStepLR, ReduceLROnPlateau

    dm = MNISTDataModule(data_dir=mnist_dir, batch_size=60, download=False)
    module = SGDFamily(
        arch="mlp",
        arch_kwargs={"width": 8},
        optimizer=sgd(1.0),
        lr_scheduler=lambda o: MultiStepLR(o, milestones=[1, 2], gamma=0.1),
    )
    t = trainer(max_epochs=3, limit_val_batches=1)
    t.fit(module, datamodule=dm)
    assert abs(t.optimizers[0].param_groups[0]["lr"] - 0.01) < 1e-9
    module = SGDFamily(
        arch="mlp",
        arch_kwargs={"width": 8},
        optimizer=sgd(1.0),
        lr_scheduler=lambda o: ReduceLROnPlateau(o, patience=0, factor=0.5),
    )
    config = module.configure_optimizers()
    assert config["lr_scheduler"]["monitor"] == "val/loss"
    module = SGDFamily(
        arch="mlp",
        arch_kwargs={"width": 8},
        optimizer=sgd(1.0),
        scheduler_interval="step",
        lr_scheduler=lambda o: MultiStepLR(o, milestones=[2], gamma=0.1),
    )
    t = trainer(max_steps=3, limit_val_batches=0)
    t.fit(module, datamodule=dm)
    assert abs(t.optimizers[0].param_groups[0]["lr"] - 0.1) < 1e-9  # stepped per optimizer step
