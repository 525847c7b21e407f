"""Partitioners give the configured label proportions; train and validation never share text."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cotune.config.schema import DataConfig, PartitionConfig
from cotune.data.corpora import DataError
from cotune.data.partition import partition
from cotune.data.windows import WindowSampler, build_federated_data, pack_windows
from cotune.models.tiny import byte_tokenizer

LABELS = ["a"] * 40 + ["b"] * 40 + ["c"] * 40 + ["d"] * 40


def test_one_label_gives_each_client_one_label():
    p = partition(LABELS, 4, PartitionConfig(kind="one_label"), np.random.default_rng(0))
    assert p.label_names == ["a", "b", "c", "d"]
    np.testing.assert_allclose(p.mixtures, np.eye(4))
    assert [len(ix) for ix in p.indices] == [40, 40, 40, 40]


def test_one_label_shares_a_label_between_clients():
    p = partition(LABELS, 8, PartitionConfig(kind="one_label"), np.random.default_rng(0))
    assert [len(ix) for ix in p.indices] == [20] * 8
    assert set(p.indices[0]).isdisjoint(p.indices[4])


def test_mixed_is_three_quarters_one_quarter():
    p = partition(LABELS, 4, PartitionConfig(kind="mixed", major_fraction=0.75), np.random.default_rng(0))
    for c in range(4):
        assert p.mixtures[c, c] == pytest.approx(0.75)
        assert p.mixtures[c, (c + 1) % 4] == pytest.approx(0.25)
    all_items = [i for ix in p.indices for i in ix]
    assert len(all_items) == len(set(all_items)) == 160


def test_iid_clients_see_every_label_about_equally():
    p = partition(LABELS, 4, PartitionConfig(kind="iid"), np.random.default_rng(0))
    assert [len(ix) for ix in p.indices] == [40] * 4
    assert (p.mixtures > 0.1).all()


def test_dirichlet_small_alpha_is_skewed_large_alpha_is_even():
    skewed = partition(LABELS * 5, 4, PartitionConfig(kind="dirichlet", alpha=0.05), np.random.default_rng(1))
    even = partition(LABELS * 5, 4, PartitionConfig(kind="dirichlet", alpha=1000.0), np.random.default_rng(1))
    assert skewed.mixtures.max(axis=1).mean() > 0.7
    assert np.abs(even.mixtures - 0.25).max() < 0.1


def test_partition_rejects_unknown_labels():
    with pytest.raises(ValueError, match="do not occur"):
        partition(LABELS, 2, PartitionConfig(labels=["zzz"]), np.random.default_rng(0))


def test_pack_windows_separates_documents_with_eos():
    w = pack_windows([[1, 2, 3], [4, 5]], seq_len=3, eos_id=9, limit=None)
    assert w.tolist() == [[1, 2, 3], [9, 4, 5]]


def test_no_window_shared_between_train_and_val(corpus_dir):
    cfg = DataConfig(path=corpus_dir, seq_len=96, max_val_windows=100, public_windows=2)
    data = build_federated_data(cfg, 4, byte_tokenizer(), seed=0)
    public = {tuple(w.tolist()) for w in data.public}
    for c in data.clients:
        train = {tuple(w.tolist()) for w in c.train}
        val = {tuple(w.tolist()) for w in c.val}
        assert train and val
        assert train.isdisjoint(val)
        assert public.isdisjoint(train | val)
        assert len(c.label_counts) == 1
    torch.testing.assert_close(data.mixtures, torch.eye(4))


def test_test_split_is_held_out_by_document_and_leaves_validation_in_place(corpus_dir):
    """Each client's test windows share no document with its train or validation windows; adding the
    test split moves documents out of training only, so the validation windows stay what they were."""
    with_test = build_federated_data(
        DataConfig(path=corpus_dir, seq_len=96, max_val_windows=100, public_windows=2, test_fraction=0.25),
        4,
        byte_tokenizer(),
        seed=0,
    )
    without = build_federated_data(
        DataConfig(path=corpus_dir, seq_len=96, max_val_windows=100, public_windows=2, test_fraction=0.0),
        4,
        byte_tokenizer(),
        seed=0,
    )
    for c, plain in zip(with_test.clients, without.clients, strict=True):
        assert c.test is not None and len(c.test) > 0 and plain.test is None
        windows = {name: {tuple(w.tolist()) for w in getattr(c, name)} for name in ("train", "val", "test")}
        assert windows["test"].isdisjoint(windows["train"] | windows["val"])
        assert windows["train"].isdisjoint(windows["val"])
        torch.testing.assert_close(c.val, plain.val, rtol=0, atol=0)
        assert len(c.train) < len(plain.train)


def test_validation_and_test_fractions_must_leave_training_documents():
    with pytest.raises(ValueError, match="leave no documents to train on"):
        DataConfig(val_fraction=0.5, test_fraction=0.5)


def test_too_few_documents_for_a_test_split_names_the_way_out(tmp_path):
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(2):  # distinct documents: copies are dropped
            (tmp_path / label / f"{i}.txt").write_text(f"{label}{i} " + "word " * 200)
    cfg = DataConfig(path=tmp_path, seq_len=16, public_windows=0)
    with pytest.raises(DataError, match="test_fraction: 0"):
        build_federated_data(cfg, 2, byte_tokenizer(), seed=0)
    data = build_federated_data(cfg.model_copy(update={"test_fraction": 0.0}), 2, byte_tokenizer(), seed=0)
    assert all(c.test is None for c in data.clients)


def test_too_little_text_is_a_clear_error(corpus_dir):
    cfg = DataConfig(path=corpus_dir, seq_len=100_000, public_windows=0)
    with pytest.raises(DataError, match="too little text"):
        build_federated_data(cfg, 4, byte_tokenizer(), seed=0)


def test_sampler_resumes_exactly():
    a = WindowSampler(10, 4, seed=3)
    for _ in range(4):
        a.next_indices()
    b = WindowSampler(10, 4, seed=3)
    b.load_state_dict(a.state_dict())
    for _ in range(5):
        assert torch.equal(a.next_indices(), b.next_indices())


def _owners(tmp_path, corpus_dir):
    """Four owners: three directories of documents, one single long text file."""
    from pathlib import Path

    dirs = [corpus_dir / label for label in ("alpha", "beta", "gamma")]
    long_file = tmp_path / "delta-notes.txt"
    long_file.write_text(
        " ".join((Path(corpus_dir) / "delta" / f"{i:03d}.txt").read_text() for i in range(12))
    )
    return [*dirs, long_file]


def test_each_owner_brings_its_own_data_and_one_long_file_is_split_by_position(tmp_path, corpus_dir):
    from cotune.data.windows import build_owned_data

    owners = _owners(tmp_path, corpus_dir)
    cfg = DataConfig(
        clients=owners, seq_len=32, test_fraction=0.2, public=corpus_dir / "alpha", public_windows=2
    )
    data = build_owned_data(cfg, byte_tokenizer(), seed=0)
    assert len(data.clients) == 4 and len(data.public) == 2
    assert data.clients[0].label_counts == {"alpha": 12} and data.clients[3].label_counts == {
        "delta-notes": 1
    }
    for c in data.clients:
        splits = [{tuple(w.tolist()) for w in getattr(c, name)} for name in ("train", "val", "test")]
        assert all(splits) and splits[0].isdisjoint(splits[1] | splits[2]) and splits[1].isdisjoint(splits[2])
    # the long file's splits are consecutive stretches of its text: train first, the test tail last
    text = byte_tokenizer()(owners[3].read_text(), add_special_tokens=False)["input_ids"]
    last = data.clients[3]
    assert last.train[0].tolist() == text[:32] and last.test is not None
    assert last.test[0].tolist() == text[len(text) + 1 - round(0.2 * (len(text) + 1)) :][:32]


def test_per_owner_settings_are_checked_before_any_work(tmp_path, corpus_dir):
    from tests.conftest import tiny_tree

    from cotune.config import ConfigError, config_from_dict
    from cotune.data.windows import build_owned_data

    owners = _owners(tmp_path, corpus_dir)

    def tree(**data):
        t = tiny_tree(corpus_dir, tmp_path)
        t["data"] = {k: v for k, v in t["data"].items() if k != "path"} | data
        return t

    with pytest.raises(ConfigError, match="one per client"):
        config_from_dict(tree(clients=[str(p) for p in owners[:3]]))
    with pytest.raises(ConfigError, match="would be ignored"):
        config_from_dict(tree(clients=[str(p) for p in owners], path=str(corpus_dir)))
    with pytest.raises(ConfigError, match=r"data\.public"):
        config_from_dict(tree(clients=[str(p) for p in owners]) | {"strategy": {"name": "prediction"}})
    with pytest.raises(ConfigError, match=r"needs data\.clients"):
        config_from_dict(tree(public=str(corpus_dir)))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"client 1: .*no data files"):
        build_owned_data(DataConfig(clients=[owners[0], empty], seq_len=32), byte_tokenizer(), seed=0)
