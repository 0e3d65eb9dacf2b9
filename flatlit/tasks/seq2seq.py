"""Sequence-to-sequence (translation) with every optimizer family: teacher-forced token cross-entropy.

The recipe for a task of your own. Every family (:class:`~flatlit.methods.SGDFamily`, :class:`~flatlit.methods.SAM`,
:class:`~flatlit.methods.LPFSGD`, :class:`~flatlit.methods.SmoothOut`, :class:`~flatlit.methods.EntropySGD`) takes
its losses from one method of :class:`~flatlit.methods.base.ClassificationModule`, so a mixin that overrides it,
placed *before* the family in the bases, gives the task that family::

    class MyTask:
        def training_loss(self, batch):              # -> (batch-mean loss, outputs); every pass of every family
            out = self.model(batch["inputs"])
            return my_loss(out, batch["target"]), out

        def accuracy_inputs(self, outputs, batch):   # -> ((N, C) logits, (N,) labels) for train/val/test acc, or None
            return None

        def curvature_loss(self, batch):             # optional: the loss the curvature callbacks differentiate
            return self.training_loss(batch)[0]

    class MyTaskSAM(MyTask, SAM): ...                # YAML: model.class_path: mypkg.MyTaskSAM, init_args: {rho: ...}

Batches may be tensors or tuples, lists and dicts of tensors; LPF-SGD and SmoothOut split every tensor of a batch along
dim 0 and weight the chunk losses by their share of the examples (:func:`flatlit.utils.batching.batch_size`), so the
loss must be a mean over the batch. ``arch`` may be a registered name (``num_classes``, ``in_channels`` and
``image_size`` come from the DataModule) or an ``nn.Module``.

Here: batches ``{"src": (B, S), "tgt": (B, T)}`` from :mod:`flatlit.data.text` (``<pad>`` = 0, ``tgt`` =
``<bos>`` … ``<eos>``); the model reads ``src`` and ``tgt[:, :-1]`` and predicts ``tgt[:, 1:]`` (teacher forcing).
The loss is the cross-entropy averaged over the batch's non-pad target tokens (with ``label_smoothing``), as in
LPF-SGD's machine-translation code, whose LPF-Adam also averaged the M chunks' token means with equal weights.
``train/acc``, ``val/acc`` and ``test/acc`` are token accuracies over non-pad positions; ``val/seq_acc`` and
``test/seq_acc`` are the share of sentences whose every target token is the argmax under teacher forcing, which is
exactly the share that greedy decoding (:meth:`Seq2SeqTask.translate`) reproduces word for word.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from flatlit.data.text import BOS_ID, EOS_ID, PAD_ID
from flatlit.methods import LPFSGD, SAM, EntropySGD, SGDFamily, SmoothOut

Batch = dict[str, torch.Tensor]

# the sentence accuracies are summed over ranks before they are logged (Lightning's sync_dist advice does not apply)
warnings.filterwarnings("ignore", message=r"It is recommended to use `self\.log\('(val|test)/seq_acc'")


class Seq2SeqTask:
    """Mixin: teacher-forced sequence-to-sequence training on ``{"src", "tgt"}`` dict batches (module docstring).

    Mix it in before a family: ``class Seq2SeqSAM(Seq2SeqTask, SAM)``. The network (``arch``) is called as
    ``model(src, tgt_in) -> logits (B, T, V)``; :meth:`translate` also needs its ``encode``/``decode`` methods
    (:class:`~flatlit.models.transformer.Seq2SeqTransformer` has them). The hyperparameters ``loss`` (``mse`` is
    applied to the non-pad positions) and ``label_smoothing`` of the family apply.
    """

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        return self.model(src, tgt_in)

    def sequence_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean loss over the non-pad positions of ``targets`` ``(B, T)`` given ``logits`` ``(B, T, V)``."""
        if self.hparams.get("loss", "cross_entropy") == "cross_entropy":
            smoothing = self.hparams.get("label_smoothing", 0.0)
            flat = logits.reshape(-1, logits.shape[-1])
            return F.cross_entropy(flat, targets.reshape(-1), ignore_index=PAD_ID, label_smoothing=smoothing)
        mask = targets != PAD_ID
        return self.loss_fn(logits[mask], targets[mask])

    def training_loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        tgt = batch["tgt"]
        logits = self(batch["src"], tgt[:, :-1])
        return self.sequence_loss(logits, tgt[:, 1:]), logits

    def accuracy_inputs(self, outputs: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and targets of the non-pad target positions (token accuracy); while validating or testing, also
        counts the sentences predicted exactly (``val/seq_acc``, ``test/seq_acc``)."""
        targets = batch["tgt"][:, 1:]
        mask = targets != PAD_ID
        logits = outputs.detach()
        trainer = self._trainer
        if trainer is not None and (trainer.validating or trainer.testing):
            wrong = (logits.argmax(-1) != targets) & mask
            exact = (~wrong.any(1)).sum().float()
            sums = torch.stack([exact, torch.tensor(float(len(targets)), device=exact.device)])
            stage = "val" if trainer.validating else "test"
            totals = self.__dict__.setdefault("_seq_sums", {})  # per stage; logged and reset at the epoch end
            totals[stage] = sums + totals[stage] if stage in totals else sums
        return logits[mask], targets[mask]

    def _log_seq_acc(self, stage: str) -> None:
        sums = self.__dict__.get("_seq_sums", {}).pop(stage, None)
        if sums is not None:
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
            self.log(f"{stage}/seq_acc", sums[0] / sums[1].clamp_min(1))

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self._log_seq_acc("val")

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self._log_seq_acc("test")

    def curvature_loss(self, batch: Batch) -> torch.Tensor:
        """The training loss through the math attention kernel, which (unlike the fused ones) is twice
        differentiable, as Hessian-vector products need."""
        with sdpa_kernel(SDPBackend.MATH):
            return self.training_loss(batch)[0]

    @torch.no_grad()
    def translate(self, src: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
        """Greedy decoding: ``(B, ≤ max_len)`` token ids starting with ``<bos>``, ``<pad>`` after each ``<eos>``
        (``max_len`` defaults to the model's). Runs in eval mode and restores the training flag."""
        model = self.model
        max_len = max_len or getattr(model, "max_len", None) or self.hparams.get("image_size", 128)
        was_training = model.training
        model.eval()
        try:
            memory, src_pad = model.encode(src)
            out = torch.full((len(src), 1), BOS_ID, dtype=torch.long, device=src.device)
            done = torch.zeros(len(src), dtype=torch.bool, device=src.device)
            while out.shape[1] < max_len and not bool(done.all()):
                nxt = model.decode(out, memory, src_pad)[:, -1].argmax(-1).masked_fill(done, PAD_ID)
                out = torch.cat([out, nxt[:, None]], 1)
                done |= nxt == EOS_ID
        finally:
            model.train(was_training)
        return out


class Seq2SeqAdam(Seq2SeqTask, SGDFamily):
    """Sequence-to-sequence with a first-order optimizer (Adam in the configs; any injected one works)."""


class Seq2SeqSAM(Seq2SeqTask, SAM):
    """Sequence-to-sequence with SAM (Foret et al. 2021, arXiv 2010.01412) around the injected optimizer."""


class Seq2SeqLPF(Seq2SeqTask, LPFSGD):
    """Sequence-to-sequence with LPF-SGD (Bisla et al. 2022, arXiv 2201.08025); LPF-Adam with an Adam base."""


class Seq2SeqSmoothOut(Seq2SeqTask, SmoothOut):
    """Sequence-to-sequence with SmoothOut / ASO (Wen et al. 2018, arXiv 1805.07898)."""


class Seq2SeqEntropy(Seq2SeqTask, EntropySGD):
    """Sequence-to-sequence with Entropy-SGD (Chaudhari et al. 2017, arXiv 1611.01838); E-Adam with an Adam base."""
