"""pipeline.data.folds: every tile once, groups kept whole, strata balanced, reproducible, checked on load."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import real_data_or_skip
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.core.config import DataConfig
from pipeline.data import rle
from pipeline.data.demo import generate
from pipeline.data.folds import (
    FoldsError,
    fraction_bins,
    group_csv_of,
    load_folds,
    main,
    make_folds,
    save_folds,
)
from pipeline.data.layouts import read_source


def _names(n: int) -> list[str]:
    return [f"t{i:05d}.jpg" for i in range(n)]


def _fractions(n: int, empty_share: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.where(rng.random(n) < empty_share, 0.0, rng.beta(2, 6, n))


def _fold_of(df: pd.DataFrame, names: list[str]) -> np.ndarray:
    return df.set_index("name").loc[names, "fold"].to_numpy()


# --------------------------------------------------------------------------------------------- basics


def test_every_name_once_sorted_with_folds_0_to_k_minus_1():
    names = _names(103)[::-1]  # given in reverse: the output is sorted anyway
    df = make_folds(names, _fractions(103, 0.2, 0), n_folds=5, seed=1)
    assert list(df.columns) == ["name", "fold"] and df["fold"].dtype == np.int64
    assert df["name"].tolist() == sorted(names)
    assert sorted(set(df["fold"])) == [0, 1, 2, 3, 4]


def test_same_seed_same_frame_other_seed_other_frame():
    names, fr = _names(100), _fractions(100, 0.2, 0)
    groups = [f"g{i // 4}" for i in range(100)]
    for g in (None, groups):
        a = make_folds(names, fr, 5, seed=7, groups=g)
        pd.testing.assert_frame_equal(a, make_folds(names, fr, 5, seed=7, groups=g))
        assert not a.equals(make_folds(names, fr, 5, seed=8, groups=g))


def test_empty_tiles_are_a_bin_of_their_own_and_others_are_quantiles():
    fr = np.array([0, 0.5, 0, 0.1, 0.2, 0.9, 0.3, 0.05, 0.7, 0.6, 0, 0.4])
    bins = fraction_bins(fr, n_folds=3)  # 9 non-empty tiles // 3 folds = 3 quantile bins
    assert bins[fr == 0].tolist() == [0, 0, 0]
    # Sorted non-empty: .05 .1 .2 | .3 .4 .5 | .6 .7 .9
    assert dict(zip(fr[fr > 0].tolist(), bins[fr > 0].tolist())) == {
        0.05: 1,
        0.1: 1,
        0.2: 1,
        0.3: 2,
        0.4: 2,
        0.5: 2,
        0.6: 3,
        0.7: 3,
        0.9: 3,
    }


# --------------------------------------------------------------------------------------------- stratified


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(10, 400),
    k=st.integers(2, 7),
    empty_share=st.sampled_from([0.0, 0.05, 0.3, 0.9]),
    seed=st.integers(0, 2**16),
)
def test_ungrouped_folds_deal_every_stratum_evenly(n, k, empty_share, seed):
    # Tiles are dealt stratum by stratum to the emptiest fold, so the exact guarantee is: fold sizes,
    # empty-tile counts and the count of every fraction bin differ by at most one tile between folds.
    if n < k:
        return
    names, fr = _names(n), _fractions(n, empty_share, seed)
    fold = _fold_of(make_folds(names, fr, k, seed=seed), names)
    bins = fraction_bins(fr, k)
    table = np.zeros((k, bins.max() + 1), np.int64)
    np.add.at(table, (fold, bins), 1)
    assert (table.max(axis=0) - table.min(axis=0)).max() <= 1
    sizes = np.bincount(fold, minlength=k)
    assert sizes.max() - sizes.min() <= 1


def test_stratified_fold_means_are_much_tighter_than_a_random_split():
    # 500 tiles, 5 folds, 30% empty. Decile bins leave only within-bin differences: the spread of fold
    # mean fractions must be well under a third of what random splits of the same tiles give (~0.03
    # here; stratified ~0.005). Averaged over 10 seeds so neither side wins by luck.
    n, k = 500, 5
    names, fr = _names(n), _fractions(n, 0.3, 0)
    rng = np.random.default_rng(0)
    strat, rand = [], []
    for seed in range(10):
        fold = _fold_of(make_folds(names, fr, k, seed=seed), names)
        means = np.array([fr[fold == j].mean() for j in range(k)])
        strat.append(means.max() - means.min())
        rfold = rng.permutation(np.arange(n) % k)
        rmeans = np.array([fr[rfold == j].mean() for j in range(k)])
        rand.append(rmeans.max() - rmeans.min())
    assert np.mean(strat) < np.mean(rand) / 3
    assert max(strat) < 0.02  # absolute: 1/10 of the fractions' std (~0.19 with the empties)


# --------------------------------------------------------------------------------------------- grouped


@st.composite
def group_layouts(draw):
    """Random group sizes (1..25 tiles), each group one fraction level or empty, and a fold count."""
    sizes = draw(st.lists(st.integers(1, 25), min_size=2, max_size=40))
    k = draw(st.integers(2, min(6, len(sizes))))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    level = np.where(rng.random(len(sizes)) < 0.25, 0.0, rng.beta(2, 5, len(sizes)))
    groups = np.repeat([f"scene{g}" for g in range(len(sizes))], sizes)
    fr = np.repeat(level, sizes) * rng.uniform(0.8, 1.2, len(groups))
    return groups.tolist(), np.clip(fr, 0, 1), k, seed, max(sizes)


@settings(max_examples=80, deadline=None)
@given(group_layouts())
def test_grouped_folds_never_split_a_group(layout):
    groups, fr, k, seed, biggest = layout
    names = _names(len(groups))
    df = make_folds(names, fr, k, seed=seed, groups=groups)
    assert df["name"].tolist() == names  # every tile once (the names are already sorted)
    per_group = (
        pd.DataFrame({"group": groups, "fold": _fold_of(df, names)}).groupby("group")["fold"].nunique()
    )
    assert (per_group == 1).all(), per_group[per_group > 1]
    sizes = np.bincount(_fold_of(df, names), minlength=k)
    assert sizes.min() > 0
    # Whole groups cannot always be balanced exactly; largest-first greedy keeps folds within one
    # group of each other (the classic bound for greedy largest-first placement).
    assert sizes.max() - sizes.min() <= biggest


def test_grouped_folds_spread_empty_scenes():
    # 40 scenes of 4 tiles, 10 of them empty: each of 5 folds should get 2 empty scenes (8 tiles).
    groups = [f"s{i // 4}" for i in range(160)]
    level = np.where(np.arange(40) % 4 == 0, 0.0, np.linspace(0.05, 0.6, 40))
    fr = np.repeat(level, 4)
    fold = _fold_of(make_folds(_names(160), fr, 5, seed=3, groups=groups), _names(160))
    assert np.bincount(fold[fr == 0], minlength=5).tolist() == [8] * 5
    assert np.bincount(fold, minlength=5).tolist() == [32] * 5


def test_grouped_folds_balance_empty_tiles_in_mixed_scenes():
    # 60 scenes of 1-6 tiles; a scene is all empty, all built-up or half and half. Empty tiles come in
    # whole scenes, so one scene's worth (<= 6 tiles) of imbalance is unavoidable; the bin term keeps
    # the spread of empty-tile counts across folds about there (~4 on average; ~9 by fold size alone).
    spreads = []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        sizes = rng.integers(1, 7, 60)
        groups = np.repeat(np.arange(60), sizes)
        p_empty = rng.choice([0.0, 0.5, 1.0], 60)[groups]
        fr = np.where(rng.random(len(groups)) < p_empty, 0.0, rng.uniform(0.05, 0.5, len(groups)))
        names = _names(len(groups))
        fold = _fold_of(make_folds(names, fr, 5, seed=seed, groups=groups.tolist()), names)
        empties = np.bincount(fold[fr == 0], minlength=5)
        spreads.append(empties.max() - empties.min())
    assert np.mean(spreads) <= 6


def test_too_few_groups_is_an_error_that_says_what_to_do():
    advice = r"only 3 groups for 5 folds: use 3 folds or fewer \(make train: data.n_folds=3; make folds: -"
    with pytest.raises(FoldsError, match=advice):
        make_folds(_names(30), _fractions(30, 0, 0), 5, groups=[i % 3 for i in range(30)])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"names": ["a", "b", "a", "c"]}, r"1 tile names occur more than once \(a\)"),
        ({"masks_fraction": np.array([0.1, 0.2, 0.3])}, r"one value per name \(4\)"),
        (
            {"masks_fraction": np.array([0.1, np.nan, 0.3, 1.5])},
            r"must be in \[0, 1\]; not so for 2 tiles \(b, d\)",
        ),
        ({"groups": ["x", None, "y", "z"]}, r"1 tiles have no group \(b\)"),
        ({"n_folds": 1}, r"n_folds must be >= 2"),
    ],
)
def test_bad_inputs_are_errors_that_name_the_tiles(kwargs, message):
    args = {"names": ["a", "b", "c", "d"], "masks_fraction": np.array([0.0, 0.1, 0.2, 0.3]), "n_folds": 2}
    with pytest.raises(FoldsError, match=message):
        make_folds(**{**args, **kwargs})


# --------------------------------------------------------------------------------------------- load_folds


def _write(path: Path, rows: list[tuple[str, object]]) -> Path:
    pd.DataFrame(rows, columns=["name", "fold"]).to_csv(path, index=False)
    return path


def test_load_folds_returns_folds_in_the_order_of_names(tmp_path):
    path = _write(tmp_path / "folds.csv", [("a.jpg", 1), ("b.jpg", 0), ("c.jpg", 1)])
    df = load_folds(path, ["c.jpg", "a.jpg", "b.jpg"])
    assert df["name"].tolist() == ["c.jpg", "a.jpg", "b.jpg"] and df["fold"].tolist() == [1, 1, 0]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([("a.jpg", 0)], r"lacks 3 training tiles \(b.jpg, c.jpg, d.jpg\)"),
        (
            [("a.jpg", 0), ("b.jpg", 1), ("c.jpg", 0), ("d.jpg", 1), ("a.jpg", 1)],
            r"lists 1 tiles more than once",
        ),
        (
            [("a.jpg", 0), ("b.jpg", 1), ("c.jpg", 0), ("d.jpg", 1), ("x.jpg", 1)],
            r"1 tiles that are not training",
        ),
        (
            [("a.jpg", 0), ("b.jpg", 2), ("c.jpg", 0), ("d.jpg", 2)],
            r"has folds \[0, 2\]; folds must be numbered 0..k-1",
        ),
        (
            [("a.jpg", 0), ("b.jpg", "one"), ("c.jpg", 0), ("d.jpg", 1.5)],
            r"2 tiles have a fold that is not an integer",
        ),
    ],
)
def test_load_folds_errors_say_what_is_wrong_and_how_to_fix_it(tmp_path, rows, message):
    path = _write(tmp_path / "folds.csv", rows)
    with pytest.raises(FoldsError, match=message) as e:
        load_folds(path, ["a.jpg", "b.jpg", "c.jpg", "d.jpg"])
    assert "re-run make folds" in str(e.value)


def test_load_folds_missing_file_and_wrong_columns(tmp_path):
    with pytest.raises(FoldsError, match=r"not found: re-run make folds"):
        load_folds(tmp_path / "folds.csv", ["a.jpg"])
    (tmp_path / "bad.csv").write_text("tile,k\na.jpg,0\n")
    with pytest.raises(FoldsError, match=r"needs columns name,fold"):
        load_folds(tmp_path / "bad.csv", ["a.jpg"])


# --------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("folds") / "demo", n_train=40, n_test=4, size=32, seed=0)


def test_cli_writes_grouped_folds_from_the_manifest_by_default(demo, tmp_path, capsys):
    out = tmp_path / "folds.csv"
    assert main(["--data", str(demo), "--n-folds", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"grouped by {demo / 'manifest.csv'}" in printed and printed.count("  fold ") == 3
    train = pd.read_csv(
        demo / "train_mask.csv",
        sep="\t",
        header=None,
        names=["name", "rle"],
        keep_default_na=False,
        dtype=str,
    )
    folds = load_folds(out, train["name"].tolist())
    assert out.read_text().splitlines()[0] == "name,fold"
    assert pd.read_csv(out)["name"].tolist() == sorted(train["name"])
    manifest = pd.read_csv(demo / "manifest.csv", dtype=str)
    merged = folds.merge(manifest, on="name")
    assert (merged.groupby("group")["fold"].nunique() == 1).all()
    # The printed mean fractions are computed from the CSV.
    masks = rle.decode_many(train["rle"].tolist(), (32, 32))
    fold0 = folds["fold"].to_numpy() == 0
    assert f"mean fraction {masks[fold0].mean():.4f}" in printed


def test_cli_without_groups_and_with_an_explicit_group_csv(demo, tmp_path, capsys):
    assert main(["--data", str(demo), "--no-groups", "--out", str(tmp_path / "a.csv")]) == 0
    assert "not grouped" in capsys.readouterr().out
    groups = tmp_path / "groups.csv"
    names = pd.read_csv(demo / "manifest.csv")["name"]
    pd.DataFrame({"name": names, "group": [n[:-5] for n in names]}).to_csv(groups, index=False)  # 10 groups
    assert main(["--data", str(demo), "--group-csv", str(groups), "--out", str(tmp_path / "b.csv")]) == 0
    assert "groups)" in capsys.readouterr().out


def test_cli_errors_are_messages_not_tracebacks(demo, tmp_path, capsys):
    bad_groups = tmp_path / "g.csv"
    bad_groups.write_text("name,scene\nx,1\n")
    assert main(["--data", str(demo), "--group-csv", str(bad_groups)]) == 2
    assert "needs columns name and group" in capsys.readouterr().err
    assert main(["--data", str(tmp_path)]) == 2
    assert "train_mask.csv not found" in capsys.readouterr().err
    broken = tmp_path / "broken"
    (broken / "train").mkdir(parents=True)
    tile = next((demo / "train").iterdir()).read_bytes()
    for name in ("a.jpg", "b.jpg"):
        (broken / "train" / name).write_bytes(tile)
    (broken / "train_mask.csv").write_text("a.jpg\t0 5\nb.jpg\t1 2 3\n")
    assert main(["--data", str(broken), "--no-groups"]) == 2
    err = capsys.readouterr().err
    assert "row 1 (a.jpg): run 1: start 0 < 1" in err and "row 2 (b.jpg): odd number of tokens" in err


# --------------------------------------------------------------------------------------------- real data


def test_real_data_manifest_groups_never_straddle_folds():
    real = real_data_or_skip("train_mask.csv", "manifest.csv")
    train = read_source(DataConfig(root=str(real)), with_test=False).train
    manifest = pd.read_csv(real / "manifest.csv", dtype=str).set_index("name")
    names = train.names
    fractions = train.foreground_fraction()
    groups = manifest.loc[names, "group"].tolist()
    df = make_folds(names, fractions, 5, seed=42, groups=groups)
    fold = _fold_of(df, names)
    assert (pd.Series(fold).groupby(groups).nunique() == 1).all()
    sizes = np.bincount(fold, minlength=5)
    biggest = pd.Series(groups).value_counts().max()  # 101 tiles in one scene
    assert sizes.min() > 0 and sizes.max() - sizes.min() <= biggest
    means = np.array([fractions[fold == j].mean() for j in range(5)])
    assert means.max() - means.min() < 0.03  # vs ~0.04 on average for random splits of these tiles


def test_saved_folds_load_back_equal_in_either_order(tmp_path):
    folds = pd.DataFrame({"name": ["b.jpg", "a.jpg", "c.jpg"], "fold": [1, 0, 0]})
    save_folds(tmp_path / "folds.csv", folds)
    pd.testing.assert_frame_equal(load_folds(tmp_path / "folds.csv"), folds)  # file order without names
    by_name = load_folds(tmp_path / "folds.csv", ["a.jpg", "b.jpg", "c.jpg"])
    assert by_name["name"].tolist() == ["a.jpg", "b.jpg", "c.jpg"] and by_name["fold"].tolist() == [0, 1, 0]


def test_one_rule_finds_the_group_csv(tmp_path):
    assert group_csv_of(tmp_path) is None  # no manifest.csv: ungrouped
    (tmp_path / "manifest.csv").write_text("name,scene\na.jpg,s1\n")
    assert group_csv_of(tmp_path) == tmp_path / "manifest.csv"  # found whatever its columns...
    assert group_csv_of(tmp_path, no_groups=True) is None
    assert group_csv_of(tmp_path, "other.csv") == Path("other.csv")


def test_a_manifest_without_a_group_column_is_refused_by_make_folds_as_by_make_train(
    demo_root, tmp_path, capsys
):
    """It used to be ignored by make folds, which then wrote a leaky ungrouped split make train used."""
    data = tmp_path / "data"
    shutil.copytree(demo_root, data)
    table = pd.read_csv(data / "manifest.csv").rename(columns={"group": "scene"})
    table.to_csv(data / "manifest.csv", index=False)
    assert main(["--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("error: group CSV") and "needs columns name and group" in err and "--no-groups" in err
    )
    assert not (data / "folds.csv").exists()
    assert main(["--data", str(data), "--no-groups"]) == 0 and (data / "folds.csv").is_file()
