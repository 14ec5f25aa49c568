"""Split assignment by image content."""

from cm3leon.data.splits import assign_splits

FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}


def test_exact_proportions_of_unique_images_and_determinism():
    hashes = [f"h{i}" for i in range(1000)]
    splits = assign_splits(hashes, FRACTIONS, seed=1)
    assert [splits.count(s) for s in ("train", "val", "test")] == [800, 100, 100]
    assert splits == assign_splits(hashes, FRACTIONS, seed=1)
    assert splits != assign_splits(hashes, FRACTIONS, seed=2)


def test_identical_images_share_a_split():
    hashes = [f"h{i % 50}" for i in range(500)]
    splits = assign_splits(hashes, FRACTIONS, seed=0)
    by_hash = {}
    for h, s in zip(hashes, splits, strict=True):
        by_hash.setdefault(h, set()).add(s)
    assert all(len(s) == 1 for s in by_hash.values())


def test_user_splits_are_kept_and_copies_follow_them():
    hashes = ["a", "a", "b", "c"]
    given = ["test", None, "val", None]
    splits = assign_splits(hashes, FRACTIONS, seed=0, given=given)
    assert splits[:3] == ["test", "test", "val"]
    assert splits[3] in {"train", "val", "test"}
