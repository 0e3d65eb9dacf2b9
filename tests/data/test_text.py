"""Parallel text on disk (fairseq/WMT layout) and the synthetic translation task."""

import os

import pytest
import torch

from flatlit.data.text import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    SPECIALS,
    UNK_ID,
    ParallelTextDataModule,
    SyntheticTranslationDataModule,
)
from flatlit.utils.errors import ConfigError

TRAIN = [
    ("the cat sat", "die katze sass"),
    ("the dog", "der hund"),
    ("a cat and the dog sat down today", "eine katze und der hund sassen heute"),
    ("the end", "das ende"),
]
VALID = [("the bird", "der vogel"), ("cat", "katze")]
TEST = [("the dog sat", "der hund sass")]


def write_corpus(folder, splits=None, src="en", tgt="de"):
    splits = splits or {"train": TRAIN, "valid": VALID, "test": TEST}
    os.makedirs(folder, exist_ok=True)
    for split, pairs in splits.items():
        for side, lang in enumerate((src, tgt)):
            with open(os.path.join(folder, f"{split}.{lang}"), "w") as f:
                f.writelines(p[side] + "\n" for p in pairs)
    return str(folder)


def text_dm(folder, **kw):
    kw = {"src": "en", "tgt": "de", "batch_size": 2, "cache_dir": os.path.join(folder, "cache"), **kw}
    return ParallelTextDataModule(folder, **kw)


def test_joint_vocabulary_specials_then_by_count(tmp_path):
    dm = text_dm(write_corpus(tmp_path))
    tokens = dm.vocab.tokens
    assert tuple(tokens[:4]) == SPECIALS and (PAD_ID, BOS_ID, EOS_ID, UNK_ID) == (0, 1, 2, 3)
    assert tokens[4:7] == ["the", "cat", "der"]  # counts 4, 2, 2: ties in alphabetical order
    assert {"katze", "sassen", "ende"} <= set(tokens)  # source and target share one vocabulary
    assert dm.num_classes == len(tokens) and dm.in_channels == 1 and dm.image_size == dm.max_len == 128
    assert dm.vocab.encode("the zebra <pad>") == [4, UNK_ID, UNK_ID]  # a literal special in the text is unknown
    small = text_dm(write_corpus(tmp_path / "b"), max_vocab=7, cache=False)
    assert small.vocab.tokens == [*SPECIALS, "the", "cat", "der"]
    rare = text_dm(write_corpus(tmp_path / "c"), min_freq=2, cache=False)
    assert set(rare.vocab.tokens[4:]) == {"the", "cat", "der", "dog", "hund", "katze", "sat"}


def test_batches_are_padded_dicts_with_bos_eos_and_truncation(tmp_path):
    dm = text_dm(write_corpus(tmp_path), max_len=6)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))  # in order: "the bird" / "cat"
    v = dm.vocab.index
    assert set(batch) == {"src", "tgt"} and batch["src"].dtype == torch.long
    assert batch["src"].tolist() == [[v["the"], UNK_ID, EOS_ID], [v["cat"], EOS_ID, PAD_ID]]
    assert batch["tgt"].tolist() == [[BOS_ID, v["der"], UNK_ID, EOS_ID], [BOS_ID, v["katze"], EOS_ID, PAD_ID]]
    assert dm.decode(batch["tgt"][1]) == "katze"
    long = dm._dataset("train")[2]  # 8 source and 7 target words, truncated to max_len with the end kept
    assert len(long[0]) == 6 and long[0][-1] == EOS_ID and dm.decode(long[0]) == "a cat and the dog"
    assert len(long[1]) == 6 and long[1][0] == BOS_ID and long[1][-1] == EOS_ID
    train = list(dm.train_dataloader())
    assert sum(len(b["src"]) for b in train) == len(TRAIN)
    dm.setup("test")
    assert dm.decode(next(iter(dm.test_dataloader()))["src"][0]) == "the dog sat"


def test_vocabulary_and_splits_are_cached(tmp_path):
    folder = write_corpus(tmp_path)
    first = text_dm(folder)
    first.setup("fit")
    cached = sorted(os.listdir(os.path.join(folder, "cache")))
    assert len(cached) == 3 and cached[-1].startswith("vocab.en-de.")  # train, valid, vocabulary
    again = text_dm(folder)
    again.setup("fit")
    assert again.vocab.tokens == first.vocab.tokens
    assert torch.equal(again.encoded("train").tgt, first.encoded("train").tgt)
    write_corpus(folder, {"train": [*TRAIN, ("new words", "neue woerter")]})  # a changed file: a new cache entry
    assert "woerter" in text_dm(folder).vocab.tokens


def test_missing_or_uneven_files_are_clear_config_errors(tmp_path):
    folder = write_corpus(tmp_path)
    os.remove(os.path.join(folder, "valid.de"))
    dm = text_dm(folder)
    assert dm.num_classes > 4  # the training split is enough for the vocabulary
    with pytest.raises(ConfigError, match=r"data.init_args.data_dir: .*valid\.de is missing") as err:
        dm.setup("fit")
    assert "valid_split" in str(err.value)
    with pytest.raises(ConfigError, match=r"train\.en is missing"):
        text_dm(str(tmp_path / "nowhere")).num_classes  # noqa: B018
    with open(os.path.join(folder, "train.de"), "a") as f:
        f.write("ein satz zu viel\n")
    with pytest.raises(ConfigError, match=r"train\.en has 4 lines and .*train\.de 5"):
        text_dm(folder, cache=False).num_classes  # noqa: B018
    with pytest.raises(ConfigError, match=r"data\.init_args\.max_len"):
        text_dm(folder, max_len=2)


def test_seeded_shuffling_subset_and_curvature_sample(tmp_path):
    dm = SyntheticTranslationDataModule(num_train=40, num_val=8, num_test=8, batch_size=8, train_subset=24)
    dm.setup("fit")
    order = [b["src"].tolist() for b in dm.train_dataloader()]
    assert sum(len(b) for b in order) == 24
    again = SyntheticTranslationDataModule(num_train=40, num_val=8, num_test=8, batch_size=8, train_subset=24)
    again.setup("fit")
    assert [b["src"].tolist() for b in again.train_dataloader()] == order
    other = SyntheticTranslationDataModule(num_train=40, num_val=8, num_test=8, batch_size=8, train_subset=24, seed=1)
    other.setup("fit")
    assert [b["src"].tolist() for b in other.train_dataloader()] != order
    sample = dm.curvature_batches(12, 5, seed=3)
    assert [len(b["src"]) for b in sample] == [5, 5, 2] and set(sample[0]) == {"src", "tgt"}
    shares = [dm.curvature_batches(12, 5, seed=3, rank=r, world_size=2) for r in range(2)]
    rows = lambda batches: sorted(dm.decode(r) for b in batches for r in b["tgt"])  # noqa: E731
    assert rows(shares[0] + shares[1]) == rows(sample) and len(rows(shares[0])) == 6
    assert sum(len(b["src"]) for b in dm.evaluation_batches("test", batch_size=3)) == 8
    with pytest.raises(ConfigError, match="num_samples"):
        dm.curvature_batches(25, 5)


def test_synthetic_task_is_deterministic_and_follows_its_rule(tmp_path):
    a, b = SyntheticTranslationDataModule(num_train=50), SyntheticTranslationDataModule(num_train=50)
    assert a._generate() == b._generate() and a.vocab.tokens == b.vocab.tokens
    assert SyntheticTranslationDataModule(num_train=50, task_seed=1)._generate() != a._generate()
    perm, compound = a.dictionary()
    assert sorted(perm) == list(range(16)) and len(compound) == 2
    for src, tgt in a._generate()["train"]:
        words = [int(w[1:]) for w in src.split()]
        assert 4 <= len(words) <= 12
        expected = []
        for w in reversed(words):
            expected += [f"b{perm[w]}"] + ([f"c{w}"] if w in compound else [])
        assert tgt.split() == expected
    assert a.num_classes == 4 + 16 + 16 + 2  # specials, source words, target words, compound second halves
    a.export(str(tmp_path))  # the on-disk format reads back to the same data
    disk = ParallelTextDataModule(str(tmp_path), src="src", tgt="tgt", max_len=32, cache=False)
    assert disk.vocab.tokens == a.vocab.tokens
    assert torch.equal(disk.encoded("valid").src, a.encoded("valid").src)
    with pytest.raises(ConfigError, match=r"data\.init_args\.num_compound"):
        SyntheticTranslationDataModule(vocab_size=4, num_compound=5)
