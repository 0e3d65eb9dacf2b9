"""Parallel text for sequence-to-sequence tasks: sentence pairs on disk, and an offline synthetic translation task.

On disk, the layout that fairseq's and the usual WMT preprocessing scripts leave (BPE'd or not, whitespace-
tokenized): ``{data_dir}/train.{src}`` and ``train.{tgt}`` (line i of one translates line i of the other), likewise
``valid.*`` and ``test.*``. A joint source/target vocabulary is built from the training split: the specials
``<pad>`` = 0, ``<bos>`` = 1, ``<eos>`` = 2, ``<unk>`` = 3, then the training tokens by decreasing count (ties in
alphabetical order), at most ``max_vocab`` entries, tokens seen fewer than ``min_freq`` times become ``<unk>``. The
vocabulary and the encoded splits are cached in ``{data_dir}/flatlit_cache`` (keyed by the files' sizes and
modification times and the vocabulary options), so a second run, and every DDP rank after the first, skips the
tokenization.

Batches are dicts ``{"src": LongTensor (B, S), "tgt": LongTensor (B, T)}`` padded with 0 to the longest pair of the
batch: ``src`` is the sentence followed by ``<eos>``, ``tgt`` is ``<bos>`` sentence ``<eos>``; both are truncated to
``max_len`` tokens (the end token is kept). The training loader shuffles with a ``(seed, epoch)`` permutation,
sharded over DDP ranks (torchdata's ``StatefulDistributedSampler``, which Lightning keeps as it is), and its position
is saved in checkpoints, so a run killed mid-epoch resumes at the next batch.
"""

from __future__ import annotations

import hashlib
import os
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import zip_longest
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

from flatlit.data.base import EpochStatefulDataLoader, FlatlitDataModule
from flatlit.data.splits import subset_indices
from flatlit.data.transforms import check_choice
from flatlit.utils.errors import ConfigError

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
_CACHE_VERSION = 1
Batch = dict[str, torch.Tensor]


class Vocabulary:
    """Token ↔ id map: :data:`SPECIALS` first, then ``tokens``. A special's spelling inside the text maps to
    ``<unk>`` (a literal ``<pad>`` in a corpus must not become padding)."""

    def __init__(self, tokens: Sequence[str]) -> None:
        self.tokens = list(SPECIALS) + [t for t in tokens if t not in SPECIALS]
        self.index = {t: i for i, t in enumerate(self.tokens)}
        for special in SPECIALS[:3]:
            self.index[special] = UNK_ID

    @classmethod
    def build(cls, counts: Counter, max_vocab: int | None = None, min_freq: int = 1) -> Vocabulary:
        """The ``max_vocab`` (specials included) most frequent tokens seen at least ``min_freq`` times."""
        ranked = sorted((kv for kv in counts.items() if kv[1] >= min_freq and kv[0] not in SPECIALS), key=_rank)
        if max_vocab is not None:
            ranked = ranked[: max(0, max_vocab - len(SPECIALS))]
        return cls([t for t, _ in ranked])

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, line: str) -> list[int]:
        """Ids of the whitespace-separated tokens of ``line`` (unknown tokens: ``<unk>``), no specials added."""
        get = self.index.get
        return [get(t, UNK_ID) for t in line.split()]

    def decode(self, ids: Iterable[int], strip: bool = True) -> str:
        """The tokens of ``ids`` joined by spaces; ``strip`` drops ``<bos>``/``<pad>`` and stops at ``<eos>``."""
        out = []
        for i in ids:
            i = int(i)
            if strip and i == EOS_ID:
                break
            if strip and i in (PAD_ID, BOS_ID):
                continue
            out.append(self.tokens[i])
        return " ".join(out)


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _count_lines(path: str) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for _ in f)


def _rank(item: tuple[str, int]) -> tuple[int, str]:
    return -item[1], item[0]


@dataclass
class EncodedPairs:
    """A split's sentence pairs as flat int32 token ids with offsets (no Python list per sentence)."""

    src: torch.Tensor
    src_offsets: torch.Tensor
    tgt: torch.Tensor
    tgt_offsets: torch.Tensor

    def __len__(self) -> int:
        return len(self.src_offsets) - 1

    def pair(self, i: int, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pair ``i`` with specials: (sentence ``<eos>``, ``<bos>`` sentence ``<eos>``), each at most ``max_len``."""
        s = self.src[self.src_offsets[i] : self.src_offsets[i + 1]][: max_len - 1].long()
        t = self.tgt[self.tgt_offsets[i] : self.tgt_offsets[i + 1]][: max_len - 2].long()
        eos, bos = torch.tensor([EOS_ID]), torch.tensor([BOS_ID])
        return torch.cat([s, eos]), torch.cat([bos, t, eos])

    @classmethod
    def encode(cls, pairs: Iterable[tuple[str, str]], vocab: Vocabulary) -> EncodedPairs:
        src, tgt = array("i"), array("i")
        src_off, tgt_off = array("q", [0]), array("q", [0])
        for s, t in pairs:
            src.extend(vocab.encode(s))
            tgt.extend(vocab.encode(t))
            src_off.append(len(src))
            tgt_off.append(len(tgt))
        return cls(
            _tensor(src, torch.int32),
            _tensor(src_off, torch.int64),
            _tensor(tgt, torch.int32),
            _tensor(tgt_off, torch.int64),
        )


def _tensor(values: array, dtype: torch.dtype) -> torch.Tensor:
    """A copy of an ``array`` as a tensor (``torch.frombuffer`` refuses an empty buffer)."""
    return torch.frombuffer(values, dtype=dtype).clone() if len(values) else torch.zeros(0, dtype=dtype)


class PairDataset(Dataset):
    """The pairs at ``positions`` of an encoded split, as (src, tgt) LongTensors with specials (see the module)."""

    def __init__(self, data: EncodedPairs, positions: torch.Tensor, max_len: int) -> None:
        self.data, self.positions, self.max_len = data, positions.tolist(), max_len

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data.pair(self.positions[i], self.max_len)


def pad_batch(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Batch:
    """Collate (src, tgt) pairs into ``{"src": (B, S), "tgt": (B, T)}`` padded with ``<pad>`` = 0."""
    return {
        "src": pad_sequence([p[0] for p in pairs], batch_first=True, padding_value=PAD_ID),
        "tgt": pad_sequence([p[1] for p in pairs], batch_first=True, padding_value=PAD_ID),
    }


class ParallelTextDataModule(FlatlitDataModule):
    """Whitespace-tokenized parallel text (WMT-style files) for sequence-to-sequence models.

    The CLI links ``num_classes`` (the vocabulary size), ``in_channels`` (1) and ``image_size`` (``max_len``, the
    model's longest sequence) into the model; reading ``num_classes`` builds (or loads) the vocabulary.

    Args:
        data_dir: folder holding ``{split}.{src}`` and ``{split}.{tgt}`` for the three splits.
        src, tgt: the language suffixes of the files (e.g. ``en``, ``de``).
        batch_size: training sentence pairs per batch (per process under DDP).
        eval_batch_size: validation/test batch size (defaults to ``batch_size``).
        num_workers: DataLoader workers.
        max_len: longest ``src``/``tgt`` sequence in tokens, specials included (longer sentences are truncated).
        max_vocab: vocabulary size cap, specials included (None: every training token).
        min_freq: training tokens seen fewer times are ``<unk>``.
        train_subset: train on a seeded random subset of this many pairs (None = all; the vocabulary still comes
            from the whole training split).
        subset_seed: seed of the subset.
        seed: seed of the shuffling.
        train_split, valid_split, test_split: the files' split prefixes (e.g. ``newstest2013`` for ``valid``).
        cache: keep the vocabulary and encoded splits in ``cache_dir`` (a failed write only warns).
        cache_dir: where the cache lives (default ``{data_dir}/flatlit_cache``).

    Raises:
        ConfigError: a file is missing, or a split's two files have different line counts.

    Example::

        dm = ParallelTextDataModule("data/wmt14_en_de", src="en", tgt="de", batch_size=256)
        Trainer(max_steps=100_000).fit(Seq2SeqAdam(arch="seq2seq_transformer", num_classes=dm.num_classes,
                                                    image_size=dm.max_len), datamodule=dm)
    """

    in_channels: int = 1

    def __init__(
        self,
        data_dir: str = "data/wmt14_en_de",
        src: str = "en",
        tgt: str = "de",
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        max_len: int = 128,
        max_vocab: int | None = None,
        min_freq: int = 1,
        train_subset: int | None = None,
        subset_seed: int = 0,
        seed: int = 0,
        train_split: str = "train",
        valid_split: str = "valid",
        test_split: str = "test",
        cache: bool = True,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__(
            data_dir=data_dir,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            train_subset=train_subset,
            subset_seed=subset_seed,
            download=False,
            normalize="none",
            seed=seed,
        )
        if max_len < 3:
            raise ConfigError(f"data.init_args.max_len: must be >= 3 (<bos>, a token, <eos>), got {max_len}.")
        if max_vocab is not None and max_vocab <= len(SPECIALS):
            raise ConfigError(f"data.init_args.max_vocab: must exceed the {len(SPECIALS)} specials, got {max_vocab}.")
        if min_freq < 1:
            raise ConfigError(f"data.init_args.min_freq: must be >= 1, got {min_freq}.")
        self.src, self.tgt = src, tgt
        self.max_len, self.image_size = max_len, max_len
        self.max_vocab, self.min_freq = max_vocab, min_freq
        self.split_names = {"train": train_split, "valid": valid_split, "test": test_split}
        self.cache = cache
        self.cache_dir = os.path.expanduser(cache_dir) if cache_dir else os.path.join(self.data_dir, "flatlit_cache")
        self._vocab: Vocabulary | None = None
        self._data: dict[str, EncodedPairs] = {}

    # ---- vocabulary ----------------------------------------------------------------------------------------------
    @property
    def vocab(self) -> Vocabulary:
        """The joint vocabulary (built from the training split, or read from the cache, on first use)."""
        if self._vocab is None:
            self._vocab = self._load_vocab()
        return self._vocab

    @property
    def num_classes(self) -> int:  # the model's output size: the vocabulary
        return len(self.vocab)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of a token-id sequence (``<bos>``/``<pad>`` dropped, cut at ``<eos>``)."""
        return self.vocab.decode(ids)

    def _load_vocab(self) -> Vocabulary:
        key = self._key("vocab", self.max_vocab, self.min_freq, *self._file_stats("train"))
        path = os.path.join(self.cache_dir, f"vocab.{self.src}-{self.tgt}.{key}.txt") if self.cache else None
        if path is not None and os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return Vocabulary([line.split()[0] for line in f if line.strip()])
        counts: Counter = Counter()
        for s, t in self._pairs("train"):
            counts.update(s.split())
            counts.update(t.split())
        vocab = Vocabulary.build(counts, self.max_vocab, self.min_freq)
        if path is not None:  # fairseq's dict format: "token count" per line (specials excluded)
            text = "".join(f"{t} {counts[t]}\n" for t in vocab.tokens[len(SPECIALS) :])
            self._write(path, lambda tmp: _write_text(tmp, text))
        return vocab

    # ---- reading -------------------------------------------------------------------------------------------------
    def _paths(self, split: str) -> tuple[str, str]:
        name = self.split_names[split]
        return (os.path.join(self.data_dir, f"{name}.{self.src}"), os.path.join(self.data_dir, f"{name}.{self.tgt}"))

    def _check_files(self, split: str) -> None:
        missing = [p for p in self._paths(split) if not os.path.isfile(p)]
        if missing:
            name = self.split_names[split]
            raise ConfigError(
                f"data.init_args.data_dir: {missing[0]} is missing. ParallelTextDataModule reads {{split}}.{self.src} "
                f"and {{split}}.{self.tgt} in {self.data_dir!r}, one whitespace-tokenized sentence per line (as "
                f"fairseq's prepare-wmt14en2de.sh leaves them); put the {name!r} files there, point data_dir at "
                f"them, or set data.init_args.{split}_split to their prefix."
            )

    def _file_stats(self, split: str) -> list[Any]:
        self._check_files(split)
        stats = [(os.path.abspath(p), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in self._paths(split)]
        return [_CACHE_VERSION, *stats]

    def _pairs(self, split: str) -> Iterator[tuple[str, str]]:
        """The split's (source line, target line) pairs; the two files must have as many lines."""
        self._check_files(split)
        src_path, tgt_path = self._paths(split)
        with open(src_path, encoding="utf-8") as fs, open(tgt_path, encoding="utf-8") as ft:
            for s, t in zip_longest(fs, ft):
                if s is None or t is None:
                    counts = [_count_lines(p) for p in (src_path, tgt_path)]
                    raise ConfigError(
                        f"data.init_args.data_dir: {src_path} has {counts[0]} lines and {tgt_path} {counts[1]}; "
                        "parallel files need one line per sentence pair in both."
                    )
                yield s, t

    def encoded(self, split: str) -> EncodedPairs:
        """The split (``train``, ``valid`` or ``test``) encoded with :attr:`vocab` (cached)."""
        if split not in self._data:
            self._data[split] = self._load_split(split)
        return self._data[split]

    def _load_split(self, split: str) -> EncodedPairs:
        vocab = self.vocab
        path = None
        if self.cache:
            key = self._key("split", len(vocab), self.max_vocab, self.min_freq, *self._file_stats("train"))
            key = self._key(key, *self._file_stats(split))
            path = os.path.join(self.cache_dir, f"{self.split_names[split]}.{self.src}-{self.tgt}.{key}.pt")
            if os.path.isfile(path):
                return EncodedPairs(**torch.load(path, weights_only=True))
        data = EncodedPairs.encode(self._pairs(split), vocab)
        if path is not None:
            self._write(path, lambda tmp: torch.save(data.__dict__, tmp))
        return data

    @staticmethod
    def _key(*parts: Any) -> str:
        return hashlib.sha1(repr(parts).encode()).hexdigest()[:12]

    def _write(self, path: str, write: Callable[[str], object]) -> None:
        """Write a cache file atomically (each DDP rank may write the same one); a failure only warns."""
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write(tmp)
            os.replace(tmp, path)
        except OSError as err:
            rank_zero_warn(f"flatlit: could not write the text cache {path} ({err}); set data.init_args.cache_dir.")

    # ---- Lightning hooks -----------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate"):
            self._setup_train()
            self.encoded("valid")
        if stage in (None, "test"):
            self.encoded("test")

    def _setup_train(self) -> None:
        if self.train_indices is None:
            train = self.encoded("train")
            self.train_indices = subset_indices(torch.arange(len(train)), self.train_subset, self.subset_seed)

    def _dataset(self, split: str, positions: torch.Tensor | None = None) -> PairDataset:
        data = self.encoded(split)
        return PairDataset(data, torch.arange(len(data)) if positions is None else positions, self.max_len)

    def _eval_loader(self, ds: Dataset, batch_size: int | None = None) -> DataLoader:
        return DataLoader(
            ds,
            batch_size=batch_size or self.eval_batch_size,
            collate_fn=pad_batch,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed),  # worker seeds: never from the global RNG
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        self._setup_train()
        ds = self._dataset("train", self.train_indices)
        rank, world = self._rank_world()
        sampler = StatefulDistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=self.seed)
        return EpochStatefulDataLoader(
            ds,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=pad_batch,
            generator=torch.Generator().manual_seed(self.seed),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self._dataset("valid"))

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self._dataset("test"))

    # ---- fixed samples for curvature and measures ----------------------------------------------------------------
    def curvature_batches(
        self,
        num_samples: int,
        batch_size: int,
        seed: int = 0,
        augment: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> list[Batch]:
        """A fixed seeded sample of the training split as dict batches, this rank's share ``rank::world_size``
        (``augment`` is ignored: text has no augmentation)."""
        self._setup_train()
        pos = self.curvature_indices(num_samples, seed)[rank::world_size]
        return list(self._eval_loader(self._dataset("train", self.train_indices[pos]), batch_size))

    def evaluation_batches(
        self, split: str = "train", batch_size: int | None = None, rank: int = 0, world_size: int = 1
    ) -> Iterator[Batch]:
        """Every pair of the ``train`` split (as trained on: the subset) or the ``test`` split, in order, this rank's
        share ``rank::world_size``, as dict batches of ``batch_size`` (default ``eval_batch_size``)."""
        check_choice("split", split, ("train", "test"))
        if split == "train":
            self._setup_train()
            positions = self.train_indices
        else:
            positions = torch.arange(len(self.encoded("test")))
        yield from self._eval_loader(self._dataset(split, positions[rank::world_size]), batch_size)


class SyntheticTranslationDataModule(ParallelTextDataModule):
    """An offline translation-like task generated from ``task_seed``: nothing is downloaded or written.

    Source sentences are ``min_length``–``max_length`` words ``a0 … a{V-1}`` drawn uniformly (V = ``vocab_size``).
    The translation reverses the word order and looks each word up in a fixed seeded dictionary: ``a{i}`` becomes
    ``b{π(i)}`` (π a random permutation), and ``num_compound`` of the words become two target words,
    ``b{π(i)} c{i}``. Reversal needs attention over the whole source, and the compounds make the target length
    differ from the source length. The joint vocabulary (specials, ``a*``, ``b*``, ``c*``) is built from the
    training split as for files on disk; :meth:`export` writes the task in that on-disk format.

    Args:
        num_train, num_val, num_test: sentence pairs per split.
        vocab_size: source words V.
        num_compound: source words translated into two target words.
        min_length, max_length: source sentence lengths (uniform, inclusive).
        task_seed: seed of the dictionary and the sentences (``seed`` seeds only the shuffling).
        max_len: longest sequence, specials included (default 32: a 12-word source with 2 compounds fits).
        batch_size, eval_batch_size, num_workers, train_subset, subset_seed, seed: as in
            :class:`ParallelTextDataModule`.

    Example::

        dm = SyntheticTranslationDataModule(num_train=4000, batch_size=64)
        Trainer(max_epochs=5).fit(Seq2SeqAdam(arch="seq2seq_transformer", num_classes=dm.num_classes,
                                              image_size=dm.max_len), datamodule=dm)
    """

    def __init__(
        self,
        num_train: int = 4000,
        num_val: int = 500,
        num_test: int = 500,
        vocab_size: int = 16,
        num_compound: int = 2,
        min_length: int = 4,
        max_length: int = 12,
        task_seed: int = 0,
        max_len: int = 32,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        train_subset: int | None = None,
        subset_seed: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(
            data_dir="",
            src="src",
            tgt="tgt",
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            max_len=max_len,
            train_subset=train_subset,
            subset_seed=subset_seed,
            seed=seed,
            cache=False,
        )
        for key, value in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
            if value < 1:
                raise ConfigError(f"data.init_args.{key}: must be >= 1, got {value}.")
        if vocab_size < 2:
            raise ConfigError(f"data.init_args.vocab_size: must be >= 2, got {vocab_size}.")
        if not 0 <= num_compound <= vocab_size:
            raise ConfigError(
                f"data.init_args.num_compound: must lie in [0, vocab_size={vocab_size}], got {num_compound}."
            )
        if not 1 <= min_length <= max_length:
            raise ConfigError(
                f"data.init_args.min_length/max_length: need 1 <= min_length <= max_length, got {min_length} and "
                f"{max_length}."
            )
        self.sizes = {"train": num_train, "valid": num_val, "test": num_test}
        self.vocab_size, self.num_compound = vocab_size, num_compound
        self.min_length, self.max_length, self.task_seed = min_length, max_length, task_seed
        self._lines: dict[str, list[tuple[str, str]]] | None = None

    def dictionary(self) -> tuple[list[int], set[int]]:
        """The task's word map: π as a list (``a{i}`` → ``b{π[i]}``) and the set of compound source words."""
        g = torch.Generator().manual_seed(self.task_seed)
        perm = torch.randperm(self.vocab_size, generator=g).tolist()
        compound = set(torch.randperm(self.vocab_size, generator=g)[: self.num_compound].tolist())
        return perm, compound

    def translate_words(self, words: Sequence[int]) -> str:
        """The reference translation of a source sentence given as word indices."""
        perm, compound = self.dictionary()
        out = []
        for w in reversed(words):
            out.append(f"b{perm[w]}")
            if w in compound:
                out.append(f"c{w}")
        return " ".join(out)

    def _generate(self) -> dict[str, list[tuple[str, str]]]:
        if self._lines is None:
            g = torch.Generator().manual_seed(self.task_seed + 1)
            total = sum(self.sizes.values())
            lengths = torch.randint(self.min_length, self.max_length + 1, (total,), generator=g).tolist()
            words = torch.randint(0, self.vocab_size, (total, self.max_length), generator=g).tolist()
            pairs = [(" ".join(f"a{w}" for w in ws[:n]), self.translate_words(ws[:n])) for ws, n in zip(words, lengths)]
            self._lines, start = {}, 0
            for split, n in self.sizes.items():
                self._lines[split] = pairs[start : start + n]
                start += n
        return self._lines

    def _check_files(self, split: str) -> None:
        pass

    def _file_stats(self, split: str) -> list[Any]:
        return []

    def _pairs(self, split: str) -> Iterator[tuple[str, str]]:
        yield from self._generate()[split]

    def export(self, directory: str) -> None:
        """Write the task as ``{train,valid,test}.{src,tgt}`` files, the format :class:`ParallelTextDataModule`
        reads."""
        os.makedirs(directory, exist_ok=True)
        for split, pairs in self._generate().items():
            for side, lang in enumerate((self.src, self.tgt)):
                with open(os.path.join(directory, f"{split}.{lang}"), "w", encoding="utf-8") as f:
                    f.writelines(p[side] + "\n" for p in pairs)
