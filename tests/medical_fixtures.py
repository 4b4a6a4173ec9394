"""Tiny fixture trees in the exact published layouts of MIMIC-CXR-JPG 2.0.0 + MIMIC-IV 2.2 and HAM10000 (+ ISIC 2018
Task 3 test ground truth): file names, column names and folders as released, synthetic 16×16 JPEG pixels.

The rows are written by hand so that every rule branch of ``backends.datasets.mimic_cxr`` and
``backends.datasets.ham10000`` is hit; ``tests/test_medical_datasets.py`` holds the hand-worked expected values.
Besides the hand-written "special" rows, filler patients / lesions (a fixed, simple pattern, documented below) give the
splits enough patients.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
from pathlib import Path
from typing import Any

import numpy as np

# ---------------------------------------------------------------------------------------------------------------
# MIMIC-CXR-JPG 2.0.0 + MIMIC-IV 2.2
# ---------------------------------------------------------------------------------------------------------------

META_HEADER = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
               "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
               "PatientOrientationCodeSequence_CodeMeaning"]
CHEXPERT_HEADER = ["subject_id", "study_id", "Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
                   "Enlarged Cardiomediastinum", "Fracture", "Lung Lesion", "Lung Opacity", "No Finding",
                   "Pleural Effusion", "Pleural Other", "Pneumonia", "Pneumothorax", "Support Devices"]
PATIENTS_HEADER = ["subject_id", "gender", "anchor_age", "anchor_year", "anchor_year_group", "dod"]
ADMISSIONS_HEADER = ["subject_id", "hadm_id", "admittime", "dischtime", "deathtime", "admission_type",
                     "admit_provider_id", "admission_location", "discharge_location", "insurance", "language",
                     "marital_status", "race", "edregtime", "edouttime", "hospital_expire_flag"]

# Images: dicom name -> (subject, study, ViewPosition, PatientOrientation, PerformedProcedureStepDescription).
# "" = an empty cell. The dicom names stand for the release's dicom_id (dicom_id() below makes the real-looking id).
MIMIC_IMAGES: list[tuple[str, int, int, str, str, str]] = [
    # S1 10000001 (M, 61): admissions A11 (2150-03-01..03-05, first in the file) and A12 (2150-01-01..01-10)
    ("a", 10000001, 50000011, "AP", "Erect", "CHEST (PORTABLE AP)"),      # 2150-01-05 -> A12 by date
    ("b", 10000001, 50000011, "LATERAL", "", "CHEST (PORTABLE AP)"),
    ("c", 10000001, 50000012, "PA", "Erect", "CHEST (PA AND LAT)"),       # 2150-03-01 = A11's admit day
    ("d", 10000001, 50000013, "LL", "Recumbent", "CHEST (PA AND LAT) PORT"),  # 2150-03-05 = A11's discharge day
    ("e", 10000001, 50000014, "", "", "PORTABLE ABDOMEN"),                # 2150-02-01: no window -> first (A11)
    ("f", 10000001, 50000015, "PA", "Erect", "CHEST (PA AND LAT)"),       # Pleural Effusion -1 (Cardiomegaly 1)
    # S2 11000002 (F, 60): B21 (2160-01-01..01-20) then B22 (2160-01-10..01-12) in the file
    ("g", 11000002, 50000021, "AP", "Erect", "CHEST (PRE-OP PA & LAT)"),  # 2160-01-11: both -> the last, B22
    ("h", 11000002, 50000021, "PA", "Recumbent", ""),
    ("i", 11000002, 50000022, "AP", "Erect", "CHEST (PORTABLE AP)"),      # 2160-01-15 -> B21 only
    # S3 12000003 (M, 91): C31 (language empty)
    ("j", 12000003, 50000031, "PA", "Erect", "CHEST (PA AND LAT)"),
    ("k", 12000003, 50000031, "LATERAL", "Erect", "CHEST (PA AND LAT)"),
    # S4 13000004 (F, 18): D41, and D42 whose race is empty
    ("l", 13000004, 50000041, "AP", "Erect", "CHEST (PORTABLE AP)"),
    ("m", 13000004, 50000042, "AP", "Erect", "CHEST (PORTABLE AP)"),      # -> D42: no race: dropped
    # S5 14000005 (M, 45): E51, and E52 whose insurance is empty
    ("n", 14000005, 50000051, "PA", "Erect", "CHEST (PA AND LAT)"),
    ("o", 14000005, 50000052, "PA", "Erect", "CHEST (PA AND LAT)"),       # -> E52: no insurance: dropped
    # S6 15000006: gender empty in patients -> dropped
    ("r", 15000006, 50000061, "PA", "Erect", "CHEST (PA AND LAT)"),
    # S7 16000007: not in patients (no anchor_age) -> dropped
    ("s", 16000007, 50000071, "PA", "Erect", "CHEST (PA AND LAT)"),
    # S8 17000008: no admissions at all -> no insurance/race: dropped
    ("t", 17000008, 50000081, "PA", "Erect", "CHEST (PA AND LAT)"),
    # S9 18000009 (F, 30): study 50000091 has no CheXpert row (dropped by the inner join); 50000092 is kept
    ("p", 18000009, 50000091, "PA", "Erect", "CHEST (PA AND LAT)"),
    ("q", 18000009, 50000092, "AP", "Erect", "CHEST (PORTABLE AP)"),
]
STUDY_DATES = {50000011: 21500105, 50000012: 21500301, 50000013: 21500305, 50000014: 21500201, 50000015: 21500102,
               50000021: 21600111, 50000022: 21600115, 50000031: 21700502, 50000041: 21800101, 50000042: 21800601,
               50000051: 21900103, 50000052: 21900201, 50000061: 21500601, 50000071: 21500601, 50000081: 21500601,
               50000091: 21500110, 50000092: 21500110}
# study -> (Pleural Effusion, Cardiomegaly, Support Devices); "" = not mentioned
CHEXPERT: dict[int, tuple[str, str, str]] = {
    50000011: ("1.0", "", "1.0"), 50000012: ("0.0", "", "-1.0"), 50000013: ("", "", ""),
    50000014: ("1.0", "", "0.0"), 50000015: ("-1.0", "1.0", ""),
    50000021: ("0.0", "-1.0", "1.0"), 50000022: ("1.0", "", ""),
    50000031: ("0.0", "", "0.0"), 50000041: ("1.0", "", "1.0"), 50000042: ("1.0", "", ""),
    50000051: ("0.0", "", "0.0"), 50000052: ("0.0", "", ""),
    50000061: ("1.0", "", ""), 50000071: ("1.0", "", ""), 50000081: ("1.0", "", ""),
    50000092: ("0.0", "", "1.0"),  # 50000091: no row
}
PATIENTS: list[tuple[int, str, str]] = [  # subject, gender, anchor_age ("" = empty); 16000007 is absent
    (10000001, "M", "61"), (11000002, "F", "60"), (12000003, "M", "91"), (13000004, "F", "18"),
    (14000005, "M", "45"), (15000006, "", "50"), (17000008, "M", "70"), (18000009, "F", "30"),
]
# hadm_id -> (subject, admittime, dischtime, insurance, language, marital_status, race), in FILE order
ADMISSIONS: list[tuple[int, int, str, str, str, str, str, str]] = [
    (20000011, 10000001, "2150-03-01 08:00:00", "2150-03-05 12:00:00", "Medicare", "English", "MARRIED", "WHITE"),
    (20000021, 11000002, "2160-01-01 09:30:00", "2160-01-20 14:00:00", "Medicaid", "?", "WIDOWED",
     "WHITE - RUSSIAN"),
    (20000031, 12000003, "2170-05-01 00:10:00", "2170-05-03 16:00:00", "Private", "", "MARRIED",
     "HISPANIC/LATINO - PUERTO RICAN"),
    (20000041, 13000004, "2180-01-01 07:00:00", "2180-01-02 07:00:00", "Medicare", "English", "SINGLE",
     "ASIAN - CHINESE"),
    (20000042, 13000004, "2180-06-01 07:00:00", "2180-06-02 07:00:00", "Private", "English", "MARRIED", ""),
    (20000051, 14000005, "2190-01-01 07:00:00", "2190-01-05 07:00:00", "Other", "English", "MARRIED", "UNKNOWN"),
    (20000052, 14000005, "2190-02-01 07:00:00", "2190-02-02 07:00:00", "", "English", "MARRIED", "WHITE"),
    (20000061, 15000006, "2150-06-01 07:00:00", "2150-06-02 07:00:00", "Medicare", "English", "MARRIED", "WHITE"),
    (20000071, 16000007, "2150-06-01 07:00:00", "2150-06-02 07:00:00", "Medicare", "English", "MARRIED", "WHITE"),
    (20000091, 18000009, "2150-01-01 07:00:00", "2150-01-31 07:00:00", "Private", "English", "MARRIED",
     "BLACK/CAPE VERDEAN"),
    # filler admissions are written here (see FILLERS), then:
    (20000012, 10000001, "2150-01-01 10:00:00", "2150-01-10 11:00:00", "Private", "ENGLISH", "SINGLE",
     "BLACK/AFRICAN AMERICAN"),
    (20000022, 11000002, "2160-01-10 08:00:00", "2160-01-12 08:00:00", "Other", "English", "", "PORTUGUESE"),
]
N_FILLERS = 16
# Filler k (0..15): subject 10100001 + k, gender M for even k else F, anchor_age 40 if k % 4 < 2 else 70, one
# admission 21000000 + k (2150-01-01 .. 2150-12-31, Medicare, English, MARRIED, WHITE), one study 51000000 + k on
# 2150-06-01 with Pleural Effusion 1.0 for even k else 0.0 (Support Devices 0.0, Cardiomegaly empty) and two
# images: "F<k>pa" (PA, Erect, CHEST (PA AND LAT)) and "F<k>lat" (LATERAL, Erect, CHEST (PA AND LAT)).


def dicom_id(name: str) -> str:
    """A dicom_id shaped like the release's (five dash-separated hex groups) for a fixture image name."""
    h = hashlib.sha1(name.encode()).hexdigest()
    return "-".join(h[i:i + 8] for i in range(0, 40, 8))


def filler_subject(k: int) -> int:
    return 10100001 + k


def write_mimic(tmp: Path, n_fillers: int = N_FILLERS) -> tuple[Path, Path]:
    """Write the MIMIC fixture under ``tmp`` (``n_fillers`` filler patients); returns (MIMIC-CXR-JPG root,
    MIMIC-IV root)."""
    cxr, iv = tmp / "mimic-cxr-jpg" / "2.0.0", tmp / "mimiciv" / "2.2"
    images = list(MIMIC_IMAGES)
    dates, chex = dict(STUDY_DATES), dict(CHEXPERT)
    patients = list(PATIENTS)
    admissions = list(ADMISSIONS[:-2])
    for k in range(n_fillers):
        subject, study = filler_subject(k), 51000000 + k
        images += [(f"F{k}pa", subject, study, "PA", "Erect", "CHEST (PA AND LAT)"),
                   (f"F{k}lat", subject, study, "LATERAL", "Erect", "CHEST (PA AND LAT)")]
        dates[study] = 21500601
        chex[study] = ("1.0" if k % 2 == 0 else "0.0", "", "0.0")
        patients.append((subject, "M" if k % 2 == 0 else "F", "40" if k % 4 < 2 else "70"))
        admissions.append((21000000 + k, subject, "2150-01-01 00:00:00", "2150-12-31 00:00:00", "Medicare", "English",
                           "MARRIED", "WHITE"))
    admissions += ADMISSIONS[-2:]

    meta_rows = []
    for name, subject, study, view, orient, proc in images:
        meta_rows.append([dicom_id(name), subject, study, proc, view, 16, 16, dates[study], "123015.390", proc,
                          {"AP": "antero-posterior", "PA": "postero-anterior"}.get(view, "lateral"), orient])
        _jpeg(cxr / "files" / f"p{str(subject)[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom_id(name)}.jpg",
              "L", sum(name.encode()) % 200)
    _write_gz(cxr / "mimic-cxr-2.0.0-metadata.csv.gz", META_HEADER, meta_rows)
    chex_rows = []
    studies = sorted({(s, st) for _, s, st, *_ in images})
    for subject, study in studies:
        if study not in chex:
            continue
        effusion, cardio, devices = chex[study]
        values = {c: "" for c in CHEXPERT_HEADER[2:]}
        values.update({"Pleural Effusion": effusion, "Cardiomegaly": cardio, "Support Devices": devices,
                       "Edema": "0.0"})
        chex_rows.append([subject, study] + [values[c] for c in CHEXPERT_HEADER[2:]])
    _write_gz(cxr / "mimic-cxr-2.0.0-chexpert.csv.gz", CHEXPERT_HEADER, chex_rows)
    _write_gz(iv / "hosp" / "patients.csv.gz", PATIENTS_HEADER,
              [[s, g, a, 2150, "2014 - 2016", ""] for s, g, a in patients])
    _write_gz(iv / "hosp" / "admissions.csv.gz", ADMISSIONS_HEADER,
              [[subj, hadm, admit, disch, "", "EW EMER.", "P12345", "EMERGENCY ROOM", "HOME", ins, lang, mar, race,
                "", "", 0] for hadm, subj, admit, disch, ins, lang, mar, race in admissions])
    return cxr, iv


# ---------------------------------------------------------------------------------------------------------------
# HAM10000 (+ ISIC 2018 Task 3 test ground truth)
# ---------------------------------------------------------------------------------------------------------------

HAM_HEADER = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization", "dataset"]
# (lesion_id, image_id, dx, dx_type, age, sex, localization, dataset); "" = an empty cell
HAM_ROWS: list[tuple[str, ...]] = [
    ("HAM_0000001", "ISIC_0024306", "mel", "histo", "55.0", "male", "back", "vidir_modern"),
    ("HAM_0000001", "ISIC_0024307", "mel", "histo", "55.0", "male", "back", "vidir_modern"),
    ("HAM_0000001", "ISIC_0024308", "mel", "histo", "55.0", "male", "back", "vidir_modern"),
    ("HAM_0000002", "ISIC_0024309", "akiec", "histo", "50.0", "female", "lower extremity", "rosendahl"),
    ("HAM_0000002", "ISIC_0024310", "akiec", "histo", "50.0", "female", "lower extremity", "rosendahl"),
    ("HAM_0000003", "ISIC_0024311", "nv", "follow_up", "45.0", "female", "upper extremity", "vidir_molemax"),
    ("HAM_0000004", "ISIC_0024312", "bkl", "confocal", "80.0", "male", "foot", "vienna_dermatology"),
    ("HAM_0000005", "ISIC_0024313", "bcc", "histo", "65.0", "male", "hand", "vidir_modern"),
    ("HAM_0000006", "ISIC_0024314", "df", "consensus", "35.0", "female", "acral", "rosendahl"),
    ("HAM_0000007", "ISIC_0024315", "vasc", "histo", "70.0", "male", "unknown", "vidir_molemax"),
    ("HAM_0000008", "ISIC_0024316", "nv", "follow_up", "40.0", "female", "trunk", "vidir_molemax"),
    ("HAM_0000009", "ISIC_0024317", "nv", "histo", "30.0", "male", "face", "rosendahl"),
    ("HAM_0000010", "ISIC_0024318", "nv", "histo", "60.0", "female", "scalp", "vienna_dermatology"),
    ("HAM_0000011", "ISIC_0024319", "nv", "histo", "25.0", "male", "abdomen", "vidir_modern"),
    ("HAM_0000012", "ISIC_0024320", "nv", "histo", "45.0", "female", "chest", "vidir_modern"),
    # incomplete lesions (a NaN somewhere): all their images go to pre-training
    ("HAM_0000013", "ISIC_0024321", "nv", "histo", "40.0", "unknown", "back", "vidir_modern"),
    ("HAM_0000013", "ISIC_0024322", "nv", "histo", "40.0", "male", "back", "vidir_modern"),
    ("HAM_0000014", "ISIC_0024323", "mel", "histo", "", "male", "back", "vidir_modern"),
    ("HAM_0000015", "ISIC_0024324", "nv", "histo", "50.0", "female", "", "vidir_modern"),
    ("HAM_0000016", "ISIC_0024325", "nv", "histo", "55.0", "male", "hand", ""),
    ("HAM_0000017", "ISIC_0024326", "nv", "histo", "40.0", "", "face", "rosendahl"),
]
INCOMPLETE_LESIONS = ("HAM_0000013", "HAM_0000014", "HAM_0000015", "HAM_0000016", "HAM_0000017")
N_HAM_FILLERS = 20
# Filler lesion k (0..19): lesion_id HAM_00001<kk>, dx 'mel' if k % 4 == 0 else 'nv', dx_type histo, age 40.0 for
# even k else 60.0, sex male for even k else female, localization back, dataset vidir_modern; two images for
# k % 3 == 0, else one; image ids ISIC_00250<nn> numbered in order.

# ISIC 2018 Task 3 test: (image, dx) and, for the HAM-layout / metadata file, the other columns
ISIC_ROWS: list[tuple[str, ...]] = [
    ("HAMTEST_0000001", "ISIC_0034524", "mel", "histo", "60.0", "male", "back", "vienna_dermatology"),
    ("HAMTEST_0000002", "ISIC_0034525", "nv", "follow_up", "35.0", "female", "lower extremity", "vidir_molemax"),
    ("HAMTEST_0000003", "ISIC_0034526", "bcc", "histo", "75.0", "male", "face", "vidir_modern"),
    ("HAMTEST_0000004", "ISIC_0034527", "akiec", "histo", "65.0", "female", "hand", "rosendahl"),
    ("HAMTEST_0000005", "ISIC_0034528", "bkl", "histo", "55.0", "male", "trunk", "vidir_modern"),
    ("HAMTEST_0000006", "ISIC_0034529", "df", "consensus", "30.0", "female", "upper extremity", "vidir_modern"),
    ("HAMTEST_0000007", "ISIC_0034530", "vasc", "histo", "45.0", "male", "chest", "vidir_modern"),
    ("HAMTEST_0000007", "ISIC_0034531", "nv", "histo", "45.0", "male", "chest", "vidir_modern"),
]
ONE_HOT = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
ISIC_METADATA_NAME = "ISIC2018_Task3_Test_metadata_in_HAM_layout.csv"  # any name: given as an option


def ham_fillers(n_fillers: int = N_HAM_FILLERS) -> list[tuple[str, ...]]:
    rows, n = [], 0
    for k in range(n_fillers):
        for _ in range(2 if k % 3 == 0 else 1):
            if k < N_HAM_FILLERS:
                rows.append((f"HAM_00001{k:02d}", f"ISIC_00250{n:02d}", "mel" if k % 4 == 0 else "nv", "histo",
                             "40.0" if k % 2 == 0 else "60.0", "male" if k % 2 == 0 else "female", "back",
                             "vidir_modern"))
            else:  # extra fillers (end-to-end runs): label, sex and age vary independently (periods 3, 2, 4)
                rows.append((f"HAM_00001{k:02d}", f"ISIC_00250{n:02d}", "mel" if k % 3 == 0 else "nv", "histo",
                             "40.0" if k % 4 < 2 else "60.0", "male" if k % 2 == 0 else "female", "back",
                             "vidir_modern"))
            n += 1
    return rows


def write_ham(tmp: Path, *, isic: str | None = None, isic_metadata: bool = False, with_dataset: bool = True,
              one_folder: bool = False, tab: bool = False, n_fillers: int = N_HAM_FILLERS) -> Path:
    """Write the HAM10000 fixture under ``tmp``; returns its root.

    Args:
        isic: None (no ISIC file), 'onehot' (the challenge's image + one-hot layout) or 'ham' (the Dataverse layout).
        isic_metadata: with 'onehot', also write :data:`ISIC_METADATA_NAME` (HAM layout, no dx column).
        with_dataset: HAM10000_metadata.csv has the newer 'dataset' column.
        one_folder: all HAM images in HAM10000_images (else the first 30 in part_1, the rest in part_2).
        tab: write HAM10000_metadata tab-separated without extension (as Harvard Dataverse ships it).
    """
    root = tmp / "ham10000"
    rows = HAM_ROWS + ham_fillers(n_fillers)
    header = HAM_HEADER if with_dataset else HAM_HEADER[:-1]
    body = [list(r) if with_dataset else list(r[:-1]) for r in rows]
    if tab:
        _write(root / "HAM10000_metadata", header, body, delimiter="\t")
    else:
        _write(root / "HAM10000_metadata.csv", header, body)
    for i, r in enumerate(rows):
        folder = "HAM10000_images" if one_folder else ("HAM10000_images_part_1" if i < 30 else "HAM10000_images_part_2")
        _jpeg(root / folder / f"{r[1]}.jpg", "RGB", i * 7 % 250)
    if isic is not None:
        for i, r in enumerate(ISIC_ROWS):
            _jpeg(root / "ISIC2018_Task3_Test_Images" / f"{r[1]}.jpg", "RGB", 100 + i)
        if isic == "ham":
            _write(root / "ISIC2018_Task3_Test_GroundTruth.csv", HAM_HEADER, [list(r) for r in ISIC_ROWS])
        else:
            _write(root / "ISIC2018_Task3_Test_GroundTruth.csv", ["image"] + ONE_HOT,
                   [[r[1]] + ["1.0" if c.lower() == r[2] else "0.0" for c in ONE_HOT] for r in ISIC_ROWS])
            if isic_metadata:
                _write(root / ISIC_METADATA_NAME, [c for c in HAM_HEADER if c != "dx"],
                       [[v for c, v in zip(HAM_HEADER, r) if c != "dx"] for r in ISIC_ROWS])
    return root


# ---------------------------------------------------------------------------------------------------------------

def _jpeg(path: Path, mode: str, shade: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(shade)
    shape = (16, 16) if mode == "L" else (16, 16, 3)
    pixels = np.clip(rng.normal(shade, 30, size=shape), 0, 255).astype(np.uint8)
    Image.fromarray(pixels, mode=mode).save(path, format="JPEG", quality=90)


def _csv_text(header: list[str], rows: list[list[Any]], delimiter: str = ",") -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter=delimiter, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def _write(path: Path, header: list[str], rows: list[list[Any]], delimiter: str = ",") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_csv_text(header, rows, delimiter), encoding="utf-8")


def _write_gz(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8", newline="") as fh:
        fh.write(_csv_text(header, rows))
