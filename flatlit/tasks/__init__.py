"""Tasks beyond image classification, each trainable with every optimizer family (see :mod:`flatlit.tasks.seq2seq`
for the recipe)."""

from flatlit.tasks.seq2seq import (
    Seq2SeqAdam,
    Seq2SeqEntropy,
    Seq2SeqLPF,
    Seq2SeqSAM,
    Seq2SeqSmoothOut,
    Seq2SeqTask,
)

__all__ = ["Seq2SeqAdam", "Seq2SeqEntropy", "Seq2SeqLPF", "Seq2SeqSAM", "Seq2SeqSmoothOut", "Seq2SeqTask"]
