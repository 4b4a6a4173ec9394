"""MIMIC-CXR and HAM10000 dataset kinds on tiny fixture trees in the published layouts (tests/medical_fixtures.py).

The expected binarised values below are worked out by hand from the fixture rows and the rules of method.md §1.2-1.3
(and the paper's process_data.ipynb); they are not computed with the loaders' own rules.
"""

from __future__ import annotations

import gzip
import tomllib
from pathlib import Path

import numpy as np
import pytest

from backends.base import SPLITS
from backends.datasets import ham10000, mimic_cxr
from backends.errors import DataError
from backends.images import Geometry, ImageFiles, decode
from tests.medical_fixtures import (ISIC_METADATA_NAME, N_FILLERS, dicom_id, filler_subject, write_ham,
                                    write_mimic)

ROOT = Path(__file__).resolve().parent.parent
NAN = float("nan")


def _same(got: float, want: float) -> bool:
    return (np.isnan(got) and np.isnan(want)) if (np.isnan(want) or np.isnan(got)) else got == want


def _all_rows(bundle) -> dict[str, np.ndarray]:
    """Every split's rows concatenated (columns), plus 'split' and 'id'."""
    parts = [bundle.splits[s] for s in SPLITS]
    out = {c: np.concatenate([p.columns[c] for p in parts]) for c in parts[0].columns}
    out["split"] = np.concatenate([np.full(len(p), p.name, dtype=object) for p in parts])
    out["id"] = np.concatenate([p.ids for p in parts])
    return out


# ----------------------------------------------------------------------------------------------------------------
# MIMIC-CXR
# ----------------------------------------------------------------------------------------------------------------

MIMIC_COLUMNS = ("Pleural_Effusion", "ViewPosition_binary", "PatientOrientationCodeSequence_CodeMeaning_binary",
                 "PerformedProcedureStepDescription_binary", "Support_Devices_binary", "Gender_binary",
                 "Insurance_binary", "Language_binary", "Marital_Status_binary", "Race_cat_binary", "Age_binary",
                 "hadm_id", "hadm_by_date")
# Hand-worked: image -> (PE, View, Orient, Proc, SupportDev, Gender, Insurance, Language, Marital, Race, Age, hadm_id,
# linked by date). See tests/medical_fixtures.py for the raw rows.
MIMIC_EXPECTED: dict[str, tuple[float, ...]] = {
    # S1: M, 61; a/b -> A12 (Private, 'ENGLISH', SINGLE, BLACK/AFRICAN AMERICAN); c/d -> A11 by date (Medicare,
    # English, MARRIED, WHITE); e -> A11 as the subject's first admission in the file (no window holds 2150-02-01)
    "a": (1, 1, 1, 0, 1, 1, 1, 0, 0, 0, 1, 20000012, 1),
    "b": (1, 0, NAN, 0, 1, 1, 1, 0, 0, 0, 1, 20000012, 1),
    "c": (0, 1, 1, 1, 0, 1, 0, 1, 1, 1, 1, 20000011, 1),   # Support Devices -1 -> 0
    "d": (0, 0, 0, 0, 0, 1, 0, 1, 1, 1, 1, 20000011, 1),   # PE not mentioned -> 0; LL -> 0; '... PORT' -> 0
    "e": (1, NAN, NAN, 0, 0, 1, 0, 1, 1, 1, 1, 20000011, 0),  # 'PORTABLE ABDOMEN' -> 0
    # S2: F, 60 (Age 0); g/h -> B22, the last of two covering admissions (Other, English, marital empty,
    # PORTUGUESE = White-other); i -> B21 (Medicaid, '?', WIDOWED, 'WHITE - RUSSIAN' = White-other)
    "g": (0, 1, 1, NAN, 1, 0, 0, 1, 0, 1, 0, 20000022, 1),  # 'CHEST (PRE-OP PA & LAT)' -> NaN
    "h": (0, 1, 0, NAN, 1, 0, 0, 1, 0, 1, 0, 20000022, 1),  # no procedure -> NaN
    "i": (1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 0, 20000021, 1),
    # S3: M, 91; C31 (Private, language empty -> NaN, MARRIED, Hispanic)
    "j": (0, 1, 1, 1, 0, 1, 1, NAN, 1, 0, 1, 20000031, 1),
    "k": (0, 0, 1, 1, 0, 1, 1, NAN, 1, 0, 1, 20000031, 1),
    # S4: F, 18; D41 (Medicare, English, SINGLE, Asian)
    "l": (1, 1, 1, 0, 1, 0, 0, 1, 0, 0, 0, 20000041, 1),
    # S5: M, 45; E51 (Other, English, MARRIED, UNKNOWN = Other)
    "n": (0, 1, 1, 1, 0, 1, 0, 1, 1, 0, 0, 20000051, 1),
    # S9: F, 30; I91 (Private, English, MARRIED, BLACK/CAPE VERDEAN = Black)
    "q": (0, 1, 1, 0, 1, 0, 1, 1, 1, 0, 0, 20000091, 1),
}
MIMIC_DROPPED = ("f",   # Pleural Effusion -1 (uncertain)
                 "m",   # linked admission has no race
                 "o",   # linked admission has no insurance
                 "r",   # gender empty
                 "s",   # subject not in patients.csv.gz (no anchor_age)
                 "t",   # subject without admissions (no insurance, race)
                 "p")   # study without CheXpert labels


def _filler_expected() -> dict[str, tuple[float, ...]]:
    """Filler k: PE 1 for even k; PA image View 1, lateral 0; Erect 1; 'CHEST (PA AND LAT)' 1; devices 0; gender M
    (1) for even k; Medicare 0; English 1; MARRIED 1; WHITE 1; age 40 -> 0 for k % 4 < 2, 70 -> 1 otherwise."""
    out = {}
    for k in range(N_FILLERS):
        pe, gender, age = (1 if k % 2 == 0 else 0), (1 if k % 2 == 0 else 0), (0 if k % 4 < 2 else 1)
        for name, view in ((f"F{k}pa", 1), (f"F{k}lat", 0)):
            out[name] = (pe, view, 1, 1, 0, gender, 0, 1, 1, 1, age, 21000000 + k, 1)
    return out


@pytest.fixture(scope="module")
def mimic_tree(tmp_path_factory) -> tuple[Path, Path]:
    return write_mimic(tmp_path_factory.mktemp("mimic"))


def _mimic(tree: tuple[Path, Path], **kw):
    cxr, iv = tree
    return mimic_cxr.load(mimic_cxr.Options(root=str(cxr), mimic_iv_root=str(iv), **kw))


def test_mimic_binarisation_row_by_row(mimic_tree):
    bundle = _mimic(mimic_tree)
    rows = _all_rows(bundle)
    by_dicom = {d: i for i, d in enumerate(rows["dicom_id"].tolist())}
    expected = {**MIMIC_EXPECTED, **_filler_expected()}
    assert sorted(by_dicom) == sorted(dicom_id(n) for n in expected)  # exactly the kept rows
    for name, want in expected.items():
        i = by_dicom[dicom_id(name)]
        got = tuple(float(rows[c][i]) for c in MIMIC_COLUMNS)
        bad = [(c, g, w) for c, g, w in zip(MIMIC_COLUMNS, got, want) if not _same(g, float(w))]
        assert not bad, f"image {name}: (column, got, expected) {bad}"
    # dtypes: NaN-capable columns are float64, the others int64
    for c in ("Pleural_Effusion", "Support_Devices_binary", "Gender_binary", "Insurance_binary",
              "Marital_Status_binary", "Race_cat_binary", "Age_binary"):
        assert rows[c].dtype == np.int64, c
    for c in ("ViewPosition_binary", "PatientOrientationCodeSequence_CodeMeaning_binary",
              "PerformedProcedureStepDescription_binary", "Language_binary"):
        assert rows[c].dtype == np.float64, c
    race_cat = dict(zip(rows["dicom_id"].tolist(), rows["Race_cat"].tolist()))
    assert [race_cat[dicom_id(n)] for n in "acgijlnq"] == ["Black", "White", "White-other", "White-other", "Hispanic",
                                                            "Asian", "Other", "Black"]
    assert rows["Pleural Effusion"][by_dicom[dicom_id("d")]] != rows["Pleural Effusion"][by_dicom[dicom_id("d")]]


def test_mimic_drops_and_tasks(mimic_tree):
    kept = set(_all_rows(_mimic(mimic_tree))["dicom_id"].tolist())
    assert not kept & {dicom_id(n) for n in MIMIC_DROPPED}
    # no date window -> with admission_fallback = "none" the study has no admission and is dropped
    kept_none = set(_all_rows(_mimic(mimic_tree, admission_fallback="none"))["dicom_id"].tolist())
    assert kept - kept_none == {dicom_id("e")}
    # Cardiomegaly: f (Cardiomegaly 1, Pleural Effusion -1) is kept, g and h (Cardiomegaly -1) are dropped
    cardio = _all_rows(_mimic(mimic_tree, task="Cardiomegaly"))
    got = dict(zip(cardio["dicom_id"].tolist(), cardio["Cardiomegaly"].tolist()))
    assert kept ^ set(got) == {dicom_id(n) for n in "fgh"}
    assert got[dicom_id("f")] == 1 and got[dicom_id("a")] == 0 and "Pleural_Effusion" not in cardio


def test_mimic_splits_are_patient_level_and_cover(mimic_tree):
    bundle = _mimic(mimic_tree)
    subjects = {s: set(bundle.splits[s].columns["subject_id"].tolist()) for s in SPLITS}
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1:]:
            assert not subjects[a] & subjects[b], (a, b)
    ids = np.concatenate([bundle.splits[s].ids for s in SPLITS])
    assert ids.dtype == np.int64 and len(np.unique(ids)) == len(ids) == 13 + 2 * N_FILLERS
    kept_subjects = {10000001, 11000002, 12000003, 13000004, 14000005, 18000009} | {filler_subject(k)
                                                                                  for k in range(N_FILLERS)}
    assert set().union(*subjects.values()) == kept_subjects
    # 22 patients: pool 14 (train_test_split 0.33), pool_val 2 (0.66 of the 8), held-out 6 -> test 3 (0.4),
    # pre-training 3 -> val 1 (1/6), train 2
    assert {s: len(v) for s, v in subjects.items()} == {"pool_train": 14, "pool_val": 2, "test": 3,
                                                        "pretrain_train": 2, "pretrain_val": 1}
    # reproducible, and the pool/held-out subjects are sklearn's split of the sorted subject ids with random_state 0
    from sklearn.model_selection import train_test_split

    pool, held = train_test_split(np.array(sorted(kept_subjects)), test_size=0.33, random_state=0)
    assert subjects["pool_train"] == set(pool.tolist())
    again = _mimic(mimic_tree)
    assert all(np.array_equal(again.splits[s].ids, bundle.splits[s].ids) for s in SPLITS)
    assert again.fingerprint == bundle.fingerprint
    assert _mimic(mimic_tree, patient_split_seed=1).fingerprint != bundle.fingerprint


def test_mimic_inputs_are_the_release_paths(mimic_tree):
    bundle = _mimic(mimic_tree)
    assert bundle.images
    cxr, _ = mimic_tree
    for s in SPLITS:
        files = bundle.inputs(s)
        assert isinstance(files, ImageFiles) and np.array_equal(files.ids, bundle.splits[s].ids)
        for path, subject, study, dicom in zip(files.paths, *(bundle.splits[s].columns[c] for c in
                                                               ("subject_id", "study_id", "dicom_id"))):
            assert path == str(cxr / "files" / f"p{str(subject)[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg")
            assert Path(path).is_file()
    images = decode(bundle.inputs("test"), Geometry(resize=(28, 28), channels=3))
    assert images.shape == (len(bundle.splits["test"]), 3, 28, 28) and images.dtype == np.uint8


@pytest.mark.parametrize("missing", ["mimic-cxr-2.0.0-metadata.csv.gz", "mimic-cxr-2.0.0-chexpert.csv.gz",
                                     "hosp/patients.csv.gz", "hosp/admissions.csv.gz"])
def test_mimic_missing_files(tmp_path, missing):
    cxr, iv = write_mimic(tmp_path)
    target = (iv if missing.startswith("hosp") else cxr) / missing
    target.unlink()
    with pytest.raises(DataError, match="not found") as e:
        mimic_cxr.load(mimic_cxr.Options(root=str(cxr), mimic_iv_root=str(iv)))
    assert str(target) in str(e.value) and "files/p1X/p<subject_id>/s<study_id>/<dicom_id>.jpg" in str(e.value)


def test_mimic_missing_column(tmp_path):
    cxr, iv = write_mimic(tmp_path)
    path = iv / "hosp" / "admissions.csv.gz"
    with gzip.open(path, "rt") as fh:
        text = fh.read()
    with gzip.open(path, "wt") as fh:
        fh.write(text.replace(",race,", ",ethnicity,", 1))
    with pytest.raises(DataError, match=r"admissions\.csv\.gz lacks column\(s\) race") as e:
        mimic_cxr.load(mimic_cxr.Options(root=str(cxr), mimic_iv_root=str(iv)))
    assert "hadm_id, admittime, dischtime, insurance" in str(e.value)


# ----------------------------------------------------------------------------------------------------------------
# HAM10000
# ----------------------------------------------------------------------------------------------------------------

HAM_COLUMNS = ("label", "Sex_binary", "Age_binary", "Dataset_binary", "Localization_binary")
# Hand-worked: image -> (label, Sex, Age, Dataset, Localization)
HAM_EXPECTED: dict[str, tuple[float, ...]] = {
    "ISIC_0024306": (1, 1, 1, 0, 0),      # mel, male, 55, vidir_modern, back
    "ISIC_0024307": (1, 1, 1, 0, 0),
    "ISIC_0024308": (1, 1, 1, 0, 0),
    "ISIC_0024309": (1, 0, 0, 1, 1),      # akiec, female, 50 (not > 50), rosendahl, lower extremity
    "ISIC_0024310": (1, 0, 0, 1, 1),
    "ISIC_0024311": (0, 0, 0, 1, 1),      # nv, female, 45, vidir_molemax, upper extremity
    "ISIC_0024312": (0, 1, 1, 0, 1),      # bkl, male, 80, vienna_dermatology, foot
    "ISIC_0024313": (0, 1, 1, 0, 1),      # bcc, male, 65, vidir_modern, hand
    "ISIC_0024314": (0, 0, 0, 1, 1),      # df, female, 35, rosendahl, acral
    "ISIC_0024315": (0, 1, 1, 1, 1),      # vasc, male, 70, vidir_molemax, unknown (an "extremity" in the paper)
    "ISIC_0024316": (0, 0, 0, 1, 0),      # nv, female, 40, vidir_molemax, trunk
    "ISIC_0024317": (0, 1, 0, 1, 0),      # nv, male, 30, rosendahl, face
    "ISIC_0024318": (0, 0, 1, 0, 0),      # nv, female, 60, vienna_dermatology, scalp
    "ISIC_0024319": (0, 1, 0, 0, 0),      # nv, male, 25, vidir_modern, abdomen
    "ISIC_0024320": (0, 0, 0, 0, 0),      # nv, female, 45, vidir_modern, chest
    "ISIC_0024321": (0, NAN, 0, 0, 0),    # sex 'unknown' -> NaN
    "ISIC_0024322": (0, 1, 0, 0, 0),
    "ISIC_0024323": (1, 1, NAN, 0, 0),    # mel, no age -> NaN
    "ISIC_0024324": (0, 0, 0, 0, 0),      # localization empty -> 0 (the paper's "central")
    "ISIC_0024325": (0, 1, 1, 0, 1),      # dataset empty -> 0
    "ISIC_0024326": (0, NAN, 0, 1, 0),    # sex empty -> NaN
}
ISIC_LABELS = {"ISIC_0034524": 1, "ISIC_0034525": 0, "ISIC_0034526": 0, "ISIC_0034527": 1, "ISIC_0034528": 0,
               "ISIC_0034529": 0, "ISIC_0034530": 0, "ISIC_0034531": 0}
# The ISIC rows with their metadata (HAM layout or a metadata file): (label, Sex, Age, Dataset, Localization)
ISIC_EXPECTED = {
    "ISIC_0034524": (1, 1, 1, 0, 0),      # mel, male, 60, vienna_dermatology, back
    "ISIC_0034525": (0, 0, 0, 1, 1),      # nv, female, 35, vidir_molemax, lower extremity
    "ISIC_0034526": (0, 1, 1, 0, 0),      # bcc, male, 75, vidir_modern, face
    "ISIC_0034527": (1, 0, 1, 1, 1),      # akiec, female, 65, rosendahl, hand
    "ISIC_0034528": (0, 1, 1, 0, 0),      # bkl, male, 55, vidir_modern, trunk
    "ISIC_0034529": (0, 0, 0, 0, 1),      # df, female, 30, vidir_modern, upper extremity
    "ISIC_0034530": (0, 1, 0, 0, 0),      # vasc, male, 45, vidir_modern, chest
    "ISIC_0034531": (0, 1, 0, 0, 0),      # nv, same lesion
}


def _ham_filler_expected() -> dict[str, tuple[float, ...]]:
    """Filler k: mel (1) for k % 4 == 0; male (1) and age 40 (0) for even k, female (0) and 60 (1) for odd k;
    vidir_modern 0; back 0; two images for k % 3 == 0."""
    out, n = {}, 0
    for k in range(20):
        for _ in range(2 if k % 3 == 0 else 1):
            out[f"ISIC_00250{n:02d}"] = (1 if k % 4 == 0 else 0, 1 if k % 2 == 0 else 0, 0 if k % 2 == 0 else 1, 0, 0)
            n += 1
    return out


def _ham(root: Path, **kw):
    return ham10000.load(ham10000.Options(root=str(root), pretrain_images=12, **kw))


def _check_rows(rows: dict[str, np.ndarray], expected: dict[str, tuple[float, ...]]) -> None:
    at = {img: i for i, img in enumerate(rows["image_id"].tolist())}
    for image, want in expected.items():
        got = tuple(float(rows[c][at[image]]) for c in HAM_COLUMNS)
        bad = [(c, g, w) for c, g, w in zip(HAM_COLUMNS, got, want) if not _same(g, float(w))]
        assert not bad, f"{image}: (column, got, expected) {bad}"


def test_ham_binarisation_row_by_row(tmp_path):
    rows = _all_rows(_ham(write_ham(tmp_path)))
    expected = {**HAM_EXPECTED, **_ham_filler_expected()}
    assert sorted(rows["image_id"].tolist()) == sorted(expected)
    _check_rows(rows, expected)
    assert rows["label"].dtype == np.int64 and rows["Localization_binary"].dtype == np.int64
    assert all(rows[c].dtype == np.float64 for c in ("Sex_binary", "Age_binary", "Dataset_binary"))
    assert np.array_equal(rows["id"][np.argsort(rows["image_id"])][:3], [24306, 24307, 24308])


def test_ham_splits_are_lesion_level(tmp_path):
    bundle = _ham(write_ham(tmp_path))
    lesions = {s: set(bundle.splits[s].columns["lesion_id"].tolist()) for s in SPLITS}
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1:]:
            assert not lesions[a] & lesions[b], (a, b)
    images = {s: set(bundle.splits[s].columns["image_id"].tolist()) for s in SPLITS}
    assert sum(len(v) for v in images.values()) == len(set().union(*images.values())) == 21 + 27
    # every incomplete lesion is in pre-training; the pool and the test set have no NaN attribute
    pre = lesions["pretrain_train"] | lesions["pretrain_val"]
    assert {"HAM_0000013", "HAM_0000014", "HAM_0000015", "HAM_0000016", "HAM_0000017"} <= pre
    for s in ("pool_train", "pool_val", "test"):
        for c in ("Sex_binary", "Age_binary", "Dataset_binary"):
            assert not np.isnan(bundle.splits[s].columns[c]).any(), (s, c)
    # pre-training: the 6 incomplete images, then whole complete lesions until >= 12 images
    n_pre = len(bundle.splits["pretrain_train"]) + len(bundle.splits["pretrain_val"])
    assert 12 <= n_pre <= 13
    # 37 lesions: 5 incomplete + k complete in pre-training; the rest: test = ceil(0.11 n), pool_val = ceil(0.15 m)
    n_rest = 37 - len(pre)
    n_test = int(np.ceil(0.11 * n_rest))
    assert len(lesions["test"]) == n_test
    assert len(lesions["pool_val"]) == int(np.ceil(0.15 * (n_rest - n_test)))
    assert len(lesions["pretrain_val"]) == int(np.ceil(0.2 * len(pre)))
    again = _ham(write_ham(tmp_path / "again"))
    assert all(np.array_equal(again.splits[s].ids, bundle.splits[s].ids) for s in SPLITS)


@pytest.mark.parametrize("layout", ["onehot", "onehot+metadata", "ham"])
def test_ham_isic_test_concatenated(tmp_path, layout):
    root = write_ham(tmp_path, isic=layout.split("+")[0], isic_metadata=layout.endswith("metadata"))
    extra = {"isic2018_test_metadata": ISIC_METADATA_NAME} if layout.endswith("metadata") else {}
    bundle = _ham(root, **extra)
    rows = _all_rows(bundle)
    assert len(rows["id"]) == 21 + 27 + 8
    isic = rows["source"] == "ISIC2018_test"
    assert sorted(rows["image_id"][isic].tolist()) == sorted(ISIC_LABELS)
    _check_rows(rows, {**HAM_EXPECTED, **_ham_filler_expected()})
    got = dict(zip(rows["image_id"][isic].tolist(), rows["label"][isic].tolist()))
    assert got == ISIC_LABELS
    if layout == "onehot":  # no demographics: NaN sex/age; the rows (own lesions) all go to pre-training
        assert np.isnan(rows["Sex_binary"][isic]).all() and np.isnan(rows["Age_binary"][isic]).all()
        assert set(rows["split"][isic].tolist()) <= {"pretrain_train", "pretrain_val"}
    else:
        _check_rows(rows, ISIC_EXPECTED)
        both = rows["image_id"] == "ISIC_0034530"
        same = rows["image_id"] == "ISIC_0034531"
        assert rows["split"][both][0] == rows["split"][same][0]  # one lesion, one split
    for s in SPLITS:
        for path, image in zip(bundle.inputs(s).paths, bundle.splits[s].columns["image_id"]):
            folder = Path(path).parent.name
            assert Path(path).name == f"{image}.jpg" and Path(path).is_file()
            assert folder == ("ISIC2018_Task3_Test_Images" if image.startswith("ISIC_0034") else
                              "HAM10000_images_part_1" if image <= "ISIC_0025008" else "HAM10000_images_part_2")
    skipped = _all_rows(_ham(root, isic2018_test="skip", **extra))
    assert len(skipped["id"]) == 21 + 27


def test_ham_variants(tmp_path):
    # older release without 'dataset': Dataset_binary is NaN everywhere and incompleteness ignores it (the lesions
    # with a NaN sex or age, or an empty localization, still go to pre-training)
    rows = _all_rows(_ham(write_ham(tmp_path / "old", with_dataset=False)))
    assert np.isnan(rows["Dataset_binary"]).all()
    at = dict(zip(rows["image_id"].tolist(), rows["split"].tolist()))
    assert all(at[i] in ("pretrain_train", "pretrain_val") for i in ("ISIC_0024321", "ISIC_0024323", "ISIC_0024324",
                                                                      "ISIC_0024326"))
    # Dataverse: tab-separated HAM10000_metadata without extension; one image folder
    bundle = _ham(write_ham(tmp_path / "dv", tab=True, one_folder=True))
    assert sum(len(s) for s in bundle.splits.values()) == 48
    assert {Path(p).parent.name for s in SPLITS for p in bundle.inputs(s).paths} == {"HAM10000_images"}
    images = decode(bundle.inputs("test"), Geometry(resize=(28, 28), channels=3))
    assert images.shape == (len(bundle.splits["test"]), 3, 28, 28) and images.dtype == np.uint8
    # limit: a seeded subset of lesions
    small = _ham(write_ham(tmp_path / "lim"), limit=20)
    assert len({x for s in SPLITS for x in small.splits[s].columns["lesion_id"].tolist()}) == 20


def test_ham_errors(tmp_path):
    with pytest.raises(DataError, match=r"HAM10000_metadata\.csv not found.*lesion_id, image_id, dx"):
        _ham(tmp_path / "nothing")
    root = write_ham(tmp_path / "a")
    with pytest.raises(DataError, match=r"ISIC2018_Task3_Test_GroundTruth\.csv not found"):
        _ham(root, isic2018_test="require")
    (root / "HAM10000_metadata.csv").write_text("lesion_id,image_id,dx,age,sex,localization\nHAM_1,ISIC_1,nv,5,male,"
                                                "back\n")
    with pytest.raises(DataError, match=r"lacks column\(s\) dx_type"):
        _ham(root)
    root = write_ham(tmp_path / "b", isic="onehot")
    gt = root / "ISIC2018_Task3_Test_GroundTruth.csv"
    gt.write_text(gt.read_text().replace("ISIC_0034525,0.0,1.0", "ISIC_0034525,1.0,1.0"))
    with pytest.raises(DataError, match="ISIC_0034525"):
        _ham(root)


# ----------------------------------------------------------------------------------------------------------------
# The specs read these columns
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec_name", ["mimic_cxr_pleural_effusion.toml", "ham10000.toml"])
def test_specs_prepare_on_fixtures(tmp_path, spec_name, mimic_tree):
    from engine.data import prepare
    from engine.spec import parse_spec

    path = ROOT / "specs" / spec_name
    raw = tomllib.loads(path.read_text())
    if spec_name.startswith("mimic"):
        raw["dataset"]["options"].update(root=str(mimic_tree[0]), mimic_iv_root=str(mimic_tree[1]))
    else:
        raw["dataset"]["options"].update(root=str(write_ham(tmp_path)), pretrain_images=12)
    spec = parse_spec(raw, path)[0]
    prep = prepare(spec, path)
    n = sum(len(prep.splits[s].ids) for s in SPLITS)
    no_group = {a: sum(int((prep.splits[s].groups[a] == -1).sum()) for s in SPLITS) for a in prep.splits["test"].groups}
    assert prep.dropped == {}  # missing = "exclude": every kept image stays, without a group of that attribute
    if spec_name.startswith("mimic"):  # NaN in view (e), orientation (b, e), procedure (g, h), language (j, k)
        assert n == 13 + 2 * N_FILLERS
        assert (no_group["view"], no_group["orientation"], no_group["procedure"], no_group["language"]) == (1, 2, 2, 2)
    else:  # the sex/age NaN rows (3) stay in pre-training
        assert n == 48 and no_group["sex"] + no_group["age"] == 3
