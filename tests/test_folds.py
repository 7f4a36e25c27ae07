"""Tests of patient-grouped folds (leukflow.evaluate.folds)."""

import logging

import pandas as pd
import pytest

from leukflow.evaluate.folds import (
    RARE_STRATUM,
    TRAIN_ONLY,
    LeakageError,
    assign_folds,
    check_no_leakage,
    fold_strata,
    label_rois,
)

K = 5


def _manifest(n_patients=20, per_patient=3, dataset="demo", labels=("ALL", "normal")):
    rows = []
    for p in range(n_patients):
        label = labels[p % len(labels)]
        for i in range(per_patient):
            rows.append(
                {
                    "image_id": f"{dataset}/p{p:02d}_{i}",
                    "dataset": dataset,
                    "label": label,
                    "patient": f"p{p:02d}",
                    "width": 100,
                }
            )
    return pd.DataFrame(rows)


def test_assign_folds_groups_patients_and_uses_every_fold():
    manifest = _manifest()
    folds = assign_folds(manifest, k=K, seed=0)
    assert list(folds.columns) == [
        "dataset", "image_id", "patient", "group", "label", "fold", "leaky"
    ]  # fmt: skip
    assert not folds["leaky"].any()
    assert len(folds) == len(manifest)
    assert sorted(folds["image_id"]) == sorted(manifest["image_id"])
    assert folds["fold"].dtype.kind == "i"
    assert (folds.groupby("patient")["fold"].nunique() == 1).all()
    assert sorted(folds["fold"].unique()) == list(range(K))
    # 10 patients per label over 5 folds: stratification puts 2 of each label in each fold.
    patients = folds.drop_duplicates("patient")
    per_fold = patients.groupby(["fold", "label"]).size().unstack(fill_value=0)
    assert per_fold.shape == (K, 2)
    assert (per_fold == 2).all().all()
    # Image label and patient are carried over unchanged.
    merged = folds.merge(manifest, on="image_id", suffixes=("", "_m"))
    assert (merged["label"] == merged["label_m"]).all()
    assert (merged["patient"] == merged["patient_m"]).all()


def test_assign_folds_is_deterministic_for_a_seed():
    manifest = _manifest()
    first = assign_folds(manifest, k=K, seed=7)
    pd.testing.assert_frame_equal(first, assign_folds(manifest, k=K, seed=7))
    others = [assign_folds(manifest, k=K, seed=s)["fold"] for s in range(3)]
    assert any(not o.equals(first["fold"]) for o in others)


def test_assign_folds_groups_patients_whatever_the_row_order():
    manifest = _manifest()
    folds = assign_folds(manifest, k=K, seed=3)
    shuffled = assign_folds(manifest.sample(frac=1.0, random_state=1), k=K, seed=3)
    # Each patient's images stay together whatever the row order.
    assert (shuffled.groupby("patient")["fold"].nunique() == 1).all()
    assert sorted(shuffled["image_id"]) == sorted(folds["image_id"])


def test_assign_folds_per_dataset():
    manifest = pd.concat(
        [_manifest(10, 2, "a"), _manifest(6, 1, "b", labels=("ALL", "HEM"))], ignore_index=True
    )
    folds = assign_folds(manifest, k=3, seed=0)
    assert len(folds) == 26
    for _, part in folds.groupby("dataset"):
        assert sorted(part["fold"].unique()) == [0, 1, 2]
        assert (part.groupby("patient")["fold"].nunique() == 1).all()


def test_assign_folds_fewer_patients_than_folds():
    manifest = pd.concat([_manifest(20, 1, "big"), _manifest(4, 3, "small")], ignore_index=True)
    with pytest.raises(ValueError, match=r"dataset 'small' has 4 patient groups, fewer than k=5"):
        assign_folds(manifest, k=5, seed=0)


@pytest.mark.parametrize("k", [1, 0, -2])
def test_assign_folds_needs_two_folds(k):
    with pytest.raises(ValueError, match=rf"k must be >= 2; got {k}"):
        assign_folds(_manifest(), k=k, seed=0)


def test_check_no_leakage_accepts_clean_folds():
    folds = assign_folds(_manifest(), k=K, seed=0)
    check_no_leakage(folds)  # no exception
    # The same patient name in two datasets is two patients.
    two = pd.DataFrame(
        {"dataset": ["a", "b"], "image_id": ["a/1", "b/1"], "patient": ["p", "p"], "fold": [0, 1]}
    )
    check_no_leakage(two)


def test_check_no_leakage_catches_a_patient_in_two_folds():
    folds = assign_folds(_manifest(), k=K, seed=0)
    row = folds.index[folds["patient"] == "p03"][0]
    folds.loc[row, "fold"] = (folds.loc[row, "fold"] + 1) % K
    with pytest.raises(
        LeakageError, match=r"1 patient\(s\) have images in several folds.*: demo/p03$"
    ):
        check_no_leakage(folds)


def test_check_no_leakage_other_group_column():
    folds = pd.DataFrame({"dataset": ["d"] * 3, "slide": ["s1", "s1", "s2"], "fold": [0, 1, 1]})
    with pytest.raises(LeakageError, match=r"slide\(s\) .*d/s1"):
        check_no_leakage(folds, group="slide")
    assert issubclass(LeakageError, ValueError)


def test_label_rois_adds_label_and_fold_in_row_order():
    folds = assign_folds(_manifest(), k=K, seed=0)
    image_ids = list(folds["image_id"])
    picks = [image_ids[5], image_ids[0], image_ids[5], image_ids[40]]
    rois = pd.DataFrame(
        {
            "roi_id": [f"{img}#{k}" for k, img in enumerate(picks)],
            "image_id": picks,
            "area_px": [10, 20, 30, 40],
        }
    )
    out = label_rois(rois, folds)
    assert list(out.columns) == ["roi_id", "image_id", "area_px", "label", "fold"]
    assert list(out["roi_id"]) == list(rois["roi_id"])
    assert out["fold"].dtype.kind == "i"
    lookup = folds.set_index("image_id")
    assert list(out["label"]) == [lookup.loc[i, "label"] for i in picks]
    assert list(out["fold"]) == [lookup.loc[i, "fold"] for i in picks]


def test_label_rois_rejects_orphan_rois():
    folds = assign_folds(_manifest(), k=K, seed=0)
    rois = pd.DataFrame(
        {"roi_id": ["x#0", "y#0"], "image_id": [folds["image_id"][0], "demo/unknown"]}
    )
    with pytest.raises(ValueError, match=r"1 ROIs belong to images missing.*'demo/unknown'"):
        label_rois(rois, folds)


def test_duplicate_images_join_their_patients_into_one_fold():
    rows = [
        {"image_id": f"d/p{p}_{i}", "dataset": "d", "patient": f"p{p}", "label": "AB"[p % 2]}
        for p in range(10)
        for i in range(2)
    ]
    manifest = pd.DataFrame(rows)
    # p0 and p3 share a copied image, p3 and p5 another: one group of three patients
    duplicates = pd.DataFrame(
        {"image_id_a": ["d/p0_1", "d/p3_0"], "image_id_b": ["d/p3_1", "d/p5_0"]}
    )
    folds = assign_folds(manifest, k=3, seed=0, duplicates=duplicates)
    joined = folds[folds["patient"].isin(["p0", "p3", "p5"])]
    assert joined["group"].nunique() == 1
    assert joined["fold"].nunique() == 1
    assert folds["group"].nunique() == 8
    alone = assign_folds(manifest, k=3, seed=0)
    assert alone["group"].nunique() == 10


# --------------------------------------------------------------- random protocol


def test_random_protocol_splits_images_and_marks_leaky(caplog):
    manifest = _manifest(n_patients=20, per_patient=5)
    with caplog.at_level(logging.WARNING, logger="leukflow.evaluate.folds"):
        folds = assign_folds(manifest, k=K, seed=0, protocol="random")
    assert "results are marked leaky=True" in caplog.text
    assert folds["leaky"].all()
    assert sorted(folds["fold"].unique()) == list(range(K))
    # images, not patients, are split: some patients end up on both sides
    assert (folds.groupby("patient")["fold"].nunique() > 1).any()
    # stratified over images: 50 images of each label, 10 per fold
    per_fold = folds.groupby(["fold", "label"]).size().unstack()
    assert (per_fold == 10).all().all()
    # the leakage check leaves the leaky rows alone ...
    check_no_leakage(folds)
    # ... but not the same folds presented as grouped
    with pytest.raises(LeakageError):
        check_no_leakage(folds.assign(leaky=False))
    grouped = assign_folds(manifest, k=K, seed=0, protocol="grouped")
    assert not grouped["leaky"].any()
    assert (grouped.groupby("patient")["fold"].nunique() == 1).all()


def test_random_protocol_needs_k_images_and_a_known_protocol():
    with pytest.raises(ValueError, match=r"dataset 'demo' has 4 images, fewer than k=5"):
        assign_folds(_manifest(4, 1), k=5, seed=0, protocol="random")
    with pytest.raises(ValueError, match=r"protocol must be one of .*got 'leaky'"):
        assign_folds(_manifest(), k=5, seed=0, protocol="leaky")


# ------------------------------------------------------------ holdout splits


@pytest.mark.parametrize(("fraction", "n_test"), [(0.2, 20), (0.1, 10)])
def test_random_holdout_is_the_seeds_leaky_80_20_and_80_10_10(fraction, n_test):
    manifest = _manifest(n_patients=20, per_patient=5)  # 100 images, 50 per label
    folds = assign_folds(manifest, k=K, seed=0, protocol="random", holdout_fraction=fraction)
    assert folds["leaky"].all()
    assert sorted(folds["fold"].unique()) == [TRAIN_ONLY, 0]
    test = folds[folds["fold"] == 0]
    assert len(test) == n_test
    assert (test["label"].value_counts() == n_test // 2).all()  # stratified
    # images, not patients: test patients have training images too
    assert test["patient"].isin(folds.loc[folds["fold"] == TRAIN_ONLY, "patient"]).any()


def test_grouped_holdout_is_the_honest_twin():
    manifest = _manifest(n_patients=20, per_patient=5)
    folds = assign_folds(manifest, k=K, seed=0, holdout_fraction=0.2)
    assert not folds["leaky"].any()
    assert sorted(folds["fold"].unique()) == [TRAIN_ONLY, 0]
    assert (folds.groupby("patient")["fold"].nunique() == 1).all()
    test = folds[folds["fold"] == 0]
    assert test["patient"].nunique() == 4  # 20 patients / 5
    assert (test.groupby("label")["patient"].nunique() == 2).all()
    check_no_leakage(folds)


def test_holdout_fraction_is_checked_and_rare_labels_warn(caplog):
    with pytest.raises(ValueError, match=r"holdout_fraction must be 0 \(k-fold\)"):
        assign_folds(_manifest(), k=K, seed=0, holdout_fraction=0.7)
    with caplog.at_level(logging.WARNING, logger="leukflow.evaluate.folds"):
        folds = assign_folds(_with_rare(1), k=K, seed=0, holdout_fraction=0.1)
    assert "'basophil' (1)" in caplog.text
    assert "fewer members than k=10" in caplog.text
    assert set(folds["fold"]) == {TRAIN_ONLY, 0}


def test_protocol_per_dataset_makes_a_leaky_twin():
    a = _manifest(dataset="clinic", per_patient=4)
    twin = a.assign(
        dataset="clinic_random", image_id=a["image_id"].str.replace("clinic/", "clinic_random/")
    )
    folds = assign_folds(
        pd.concat([a, twin], ignore_index=True),
        k=K,
        seed=0,
        protocol={"clinic": "grouped", "clinic_random": "random"},
    )
    by = folds.groupby("dataset")
    assert by["leaky"].all().to_dict() == {"clinic": False, "clinic_random": True}
    spread = folds.groupby(["dataset", "patient"])["fold"].nunique().groupby("dataset").max()
    assert spread["clinic"] == 1
    assert spread["clinic_random"] > 1
    with pytest.raises(ValueError, match="protocol must be one of"):
        assign_folds(a, k=K, seed=0, protocol={"clinic": "leaky"})


# -------------------------------------------------- labels rarer than the folds


def _with_rare(n_rare, per_patient=1):
    manifest = _manifest(n_patients=20, per_patient=per_patient)
    rare = _manifest(n_patients=n_rare, per_patient=per_patient, labels=("basophil",))
    rare["image_id"] = rare["image_id"].str.replace("/p", "/r")
    rare["patient"] = rare["patient"].str.replace("p", "r")
    return pd.concat([manifest, rare], ignore_index=True)


@pytest.mark.parametrize("protocol", ["grouped", "random"])
def test_a_one_member_label_warns_and_does_not_crash(caplog, protocol):
    manifest = _with_rare(1)  # like zheng Dataset 1's single basophil
    with caplog.at_level(logging.WARNING, logger="leukflow.evaluate.folds"):
        folds = assign_folds(manifest, k=K, seed=0, protocol=protocol)
    warning = [r for r in caplog.records if "fewer members than k=5" in r.message]
    assert len(warning) == 1
    assert warning[0].levelno == logging.WARNING
    assert "'basophil' (1)" in warning[0].message
    assert "rare stratum" in warning[0].message
    assert len(folds) == len(manifest)
    assert set(folds["label"]) == {"ALL", "normal", "basophil"}  # the label is kept
    assert folds.loc[folds["label"] == "basophil", "fold"].nunique() == 1
    # the common labels are still stratified: 2 patients of each per fold
    per_fold = folds[folds["label"] != "basophil"].groupby(["fold", "label"]).size().unstack()
    assert (per_fold == 2).all().all()


def test_rare_labels_are_stratified_together():
    # two rare labels with 3 + 2 = 5 patients: as one stratum they fill the 5 folds
    manifest = _with_rare(3)
    extra = manifest[manifest["label"] == "basophil"].head(2).copy()
    extra["label"] = "eosinophil"
    extra["image_id"] = extra["image_id"] + "e"
    extra["patient"] = extra["patient"] + "e"
    manifest = pd.concat([manifest, extra], ignore_index=True)
    strata = fold_strata(manifest["label"], manifest["patient"], k=K)
    assert set(strata) == {"ALL", "normal", RARE_STRATUM}
    assert (strata[manifest["label"] == "eosinophil"] == RARE_STRATUM).all()
    folds = assign_folds(manifest, k=K, seed=0)
    rare = folds[folds["label"].isin(["basophil", "eosinophil"])]
    assert sorted(rare["fold"]) == list(range(K))  # one rare patient per fold


def test_fold_strata_leaves_common_labels_alone(caplog):
    labels = pd.Series(["a"] * 10 + ["b"] * 10)
    with caplog.at_level(logging.WARNING, logger="leukflow.evaluate.folds"):
        strata = fold_strata(labels, pd.Series(range(20)), k=5)
    assert strata.equals(labels)
    assert caplog.text == ""


def test_duplicates_across_datasets_join_groups_and_split_per_dataset():
    manifest = pd.concat(
        [_manifest(10, 2, "a"), _manifest(10, 2, "b", labels=("ALL", "HEM"))], ignore_index=True
    )
    duplicates = pd.DataFrame({"image_id_a": ["a/p01_0"], "image_id_b": ["b/p04_1"]})
    folds = assign_folds(manifest, k=3, seed=0, duplicates=duplicates)
    joined = folds[folds["image_id"].str.match(r"a/p01_|b/p04_")]
    assert joined["group"].nunique() == 1  # one group, named after its first patient
    assert (joined["group"] == "a/p01").all()
    for _, part in folds.groupby("dataset"):
        assert (part.groupby("group")["fold"].nunique() == 1).all()


def test_a_changed_labelled_set_is_reported(tmp_path):
    from leukflow.evaluate.folds import compare_labelled_sets

    state = tmp_path / "cache" / "labelled_set.json"
    manifest = pd.DataFrame(
        {"image_id": ["d/a", "d/b", "d/c"], "label": ["ALL", "hem", "ALL"], "patient": list("pqr")}
    )
    assert compare_labelled_sets(manifest, state) == ""  # first run
    assert compare_labelled_sets(manifest, state) == ""  # nothing changed
    grown = pd.concat([manifest, manifest.head(1).assign(image_id="d/z")], ignore_index=True)
    grown.loc[1, "label"] = "ALL"
    assert compare_labelled_sets(grown.iloc[1:], state) == (
        "the labelled set changed since the last fold assignment: 3 -> 3 images "
        "(1 new, 1 gone, 1 relabelled or regrouped)"
    )
