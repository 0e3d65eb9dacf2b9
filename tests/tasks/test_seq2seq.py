"""The seq2seq Transformer and the families on the synthetic translation task (dict batches through
``training_loss``), greedy decoding, curvature through ``curvature_loss``, and a shipped config through the CLI."""

import copy
import csv
import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from flatlit.callbacks.curvature import HessianEigenvalues
from flatlit.cli import run
from flatlit.data.text import BOS_ID, EOS_ID, PAD_ID, SyntheticTranslationDataModule
from flatlit.models import create_model
from flatlit.tasks import Seq2SeqAdam, Seq2SeqEntropy, Seq2SeqLPF, Seq2SeqSAM, Seq2SeqSmoothOut
from tests.helpers import quiet_trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = {"d_model": 32, "nhead": 2, "num_encoder_layers": 1, "num_decoder_layers": 1, "dim_feedforward": 64}


def small_task(**kw):
    kw = {"num_train": 256, "num_val": 64, "num_test": 32, "max_length": 8, "batch_size": 32, **kw}
    return SyntheticTranslationDataModule(**kw)


def module(cls, dm, lr=3e-3, **kw):
    torch.manual_seed(0)
    return cls(
        arch="seq2seq_transformer",
        arch_kwargs={**TINY, "dropout": 0.0},
        num_classes=dm.num_classes,
        image_size=dm.max_len,
        optimizer=lambda p: torch.optim.Adam(p, lr=lr, betas=(0.9, 0.99)),
        **kw,
    )


def test_decoder_is_causal_and_ignores_padding():
    torch.manual_seed(0)
    model = create_model("seq2seq_transformer", num_classes=20, image_size=16, **TINY).eval()
    src = torch.tensor([[5, 6, 7, EOS_ID], [8, 9, EOS_ID, PAD_ID]])
    tgt = torch.tensor([[BOS_ID, 10, 11, 12, 13], [BOS_ID, 14, 15, EOS_ID, PAD_ID]])
    out = model(src, tgt)
    assert out.shape == (2, 5, 20) and getattr(model, "input_kind", None) == "tokens"
    changed = tgt.clone()
    changed[:, 3] = 19  # a future token: earlier positions must not see it
    out2 = model(src, changed)
    torch.testing.assert_close(out2[:, :3], out[:, :3], rtol=0, atol=1e-6)
    assert (out2[:, 3:] - out[:, 3:]).abs().amax() > 1e-3
    padded = model(F.pad(src, (0, 3)), F.pad(tgt, (0, 2)))  # extra padding changes nothing before it
    torch.testing.assert_close(padded[:, :5], out, rtol=0, atol=1e-5)
    torch.testing.assert_close(model(src[1:, :3], tgt[1:, :4]), out[1:, :4], rtol=0, atol=1e-5)


def test_loss_is_teacher_forced_cross_entropy_over_non_pad_tokens():
    dm = small_task()
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    task = module(Seq2SeqAdam, dm, label_smoothing=0.1).eval()
    loss, logits = task.training_loss(batch)
    inputs, targets = batch["tgt"][:, :-1], batch["tgt"][:, 1:]
    assert logits.shape == (*inputs.shape, dm.num_classes)
    torch.testing.assert_close(logits, task.model(batch["src"], inputs))
    keep = targets != PAD_ID
    torch.testing.assert_close(loss, F.cross_entropy(logits[keep], targets[keep], label_smoothing=0.1))
    acc_logits, acc_targets = task.accuracy_inputs(logits, batch)
    assert acc_logits.shape == (int(keep.sum()), dm.num_classes) and torch.equal(acc_targets, targets[keep])


def test_sam_step_on_the_transformer_equals_hand_computed():
    """One SAM-SGD step through Seq2SeqTask.training_loss: w - lr·∇L(w + ρ g/‖g‖) on the teacher-forced loss."""
    rho, lr = 0.05, 0.1
    dm = small_task()
    dm.setup("fit")
    task = module(Seq2SeqSAM, dm, rho=rho)
    task.configure_optimizers = lambda: torch.optim.SGD(task.parameters(), lr=lr)
    batch = next(iter(dm.val_dataloader()))  # a fixed padded dict batch
    ref = copy.deepcopy(task).train()
    params = list(ref.model.parameters())
    w0 = [p.detach().clone() for p in params]
    g = torch.autograd.grad(ref.training_loss(batch)[0], params)
    norm = torch.cat([gi.flatten() for gi in g]).norm()
    with torch.no_grad():
        for p, gi in zip(params, g):
            p.add_(gi, alpha=rho / (norm + 1e-12))
    g2 = torch.autograd.grad(ref.training_loss(batch)[0], params)
    quiet_trainer(max_steps=1, limit_val_batches=0).fit(task, train_dataloaders=DataLoader([batch], batch_size=None))
    for p, w, gi in zip(task.model.parameters(), w0, g2):
        torch.testing.assert_close(p.detach(), w - lr * gi, rtol=1e-5, atol=1e-6)


FAMILIES = [
    (Seq2SeqAdam, {}),
    (Seq2SeqSAM, {"rho": 0.05}),
    (Seq2SeqLPF, {"gamma": 0.0005, "num_samples": 4, "inc": 15}),
    (Seq2SeqSmoothOut, {"a": 0.009, "adapt": "tensor", "exclude_bn": False}),
    (Seq2SeqEntropy, {"L": 2, "sgld_lr": 0.05, "eps": 1e-4, "gmax": 2.0, "lr": 1e-2}),  # outer steps: lr × g
]


@pytest.mark.parametrize("cls, kw", FAMILIES, ids=["adam", "sam", "lpf", "smoothout", "entropy"])
def test_every_family_lowers_the_training_loss(cls, kw):
    dm = small_task()
    task = module(cls, dm, **kw)
    dm.setup("fit")
    probe = next(iter(dm._eval_loader(dm._dataset("train"), 128)))
    with torch.no_grad():
        before = float(task.eval().training_loss(probe)[0])
    task.train()
    trainer = quiet_trainer(max_steps=16, limit_val_batches=1)
    trainer.fit(task, datamodule=dm)
    with torch.no_grad():
        after = float(task.eval().training_loss(probe)[0])
    assert after < 0.75 * before, (before, after)
    metrics = trainer.callback_metrics
    assert {"train/loss", "train/acc", "val/loss", "val/acc", "val/seq_acc"} <= set(metrics)


def test_seq_acc_is_greedy_decoding_exact_match_and_curvature_runs():
    dm = small_task(num_train=512, min_length=2, max_length=5)
    task = module(Seq2SeqAdam, dm)
    curvature = HessianEigenvalues(top_k=1, max_iter=8, num_samples=16, batch_size=8, progress_every=None)
    trainer = quiet_trainer(max_epochs=8, callbacks=[curvature])
    trainer.fit(task, datamodule=dm)
    assert float(trainer.callback_metrics["hessian/lambda_1"]) > 0  # double backward through the attention
    seq_acc = float(trainer.validate(task, datamodule=dm, verbose=False)[0]["val/seq_acc"])
    exact, total = 0, 0
    for batch in dm.val_dataloader():
        out = task.translate(batch["src"], max_len=dm.max_len)
        assert (out[:, 0] == BOS_ID).all()
        for hyp, ref in zip(out, batch["tgt"]):
            exact += dm.decode(hyp) == dm.decode(ref)
            total += 1
    assert 0 < seq_acc < 1 and seq_acc == pytest.approx(exact / total)


def test_synthetic_config_through_the_cli(tmp_path):
    cli = run(
        [
            "fit",
            "--config",
            os.path.join(ROOT, "experiments", "seq2seq", "synthetic_sam_adam.yaml"),
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
            "--trainer.max_epochs",
            "2",
            "--trainer.limit_train_batches",
            "2",
            "--trainer.limit_val_batches",
            "2",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.enable_model_summary",
            "false",
        ]
    )
    assert isinstance(cli.model, Seq2SeqSAM) and cli.trainer.global_step == 4
    assert cli.model.hparams.num_classes == cli.datamodule.num_classes == 38  # linked: the vocabulary
    assert cli.model.model.max_len == cli.datamodule.max_len == 32
    with open(os.path.join(cli.trainer.log_dir, "history.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and {"train/loss", "val/acc", "val/seq_acc", "train/perturbed_loss"} <= set(rows[0])
