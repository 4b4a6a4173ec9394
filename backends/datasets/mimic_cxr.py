"""MIMIC-CXR-JPG 2.0.0 with MIMIC-IV 2.2 demographics (the paper's MIMIC setting, method.md §1.2) from your own,
credentialed copy. Nothing is shipped: set ``[dataset.options] root`` to the MIMIC-CXR-JPG release folder and
``mimic_iv_root`` to the MIMIC-IV folder that holds ``hosp/``.

Files read (column names as PhysioNet publishes them; other columns are ignored):

- ``<root>/mimic-cxr-2.0.0-metadata.csv.gz``: one row per image (dicom_id, subject_id, study_id, ViewPosition,
  PatientOrientationCodeSequence_CodeMeaning, PerformedProcedureStepDescription, StudyDate as YYYYMMDD);
- ``<root>/mimic-cxr-2.0.0-chexpert.csv.gz``: one row per study (subject_id, study_id and the 14 CheXpert labels,
  1.0 / 0.0 / -1.0 = uncertain / empty = not mentioned);
- ``<mimic_iv_root>/hosp/patients.csv.gz`` (subject_id, gender, anchor_age) and ``hosp/admissions.csv.gz``
  (subject_id, hadm_id, admittime, dischtime, insurance, language, marital_status, race);
- images (read later, by the engine): ``<root>/files/p1X/p<subject_id>/s<study_id>/<dicom_id>.jpg``.

Rows, as the paper's code (``final_notebooks/process_data.ipynb``):

1. every image of the metadata file whose study has CheXpert labels (an inner join on subject_id and study_id);
2. demographics: ``gender`` and ``anchor_age`` from patients; ``insurance``, ``language``, ``marital_status`` and
   ``race`` from the admission the study is linked to: the admission whose admittime–dischtime window holds the
   StudyDate, compared by calendar day with both ends included; when several do, the last one in the admissions
   file; when none does, the subject's first admission in the file (``admission_fallback = "first"``, the paper's
   code; ``"none"`` leaves such studies without admission fields, so the filter below drops them);
3. dropped: rows whose task label is -1 (uncertain), and rows missing gender, anchor_age, race or insurance.

Columns of every split (the paper's names; int64 unless they can be NaN, then float64 with NaN):

- the task, ``Pleural_Effusion`` (or ``Cardiomegaly``): 1 if the CheXpert label is 1, else 0 (0 and not
  mentioned);
- ``ViewPosition_binary``: 1 = AP or PA (frontal), 0 = any other view, NaN = no ViewPosition;
- ``PatientOrientationCodeSequence_CodeMeaning_binary``: 1 = 'Erect', 0 = other, NaN = none given;
- ``PerformedProcedureStepDescription_binary``: 1 = 'CHEST (PA AND LAT)' ("fixed"), 0 = 'CHEST (PORTABLE AP)',
  'PORTABLE ABDOMEN' or 'CHEST (PA AND LAT) PORT' ("portable"), NaN = any other description or none;
- ``Support_Devices_binary``: 1 if the CheXpert 'Support Devices' label is 1, else 0 (also for -1 and empty);
- ``Gender_binary``: 1 = 'M'; ``Insurance_binary``: 1 = 'Private'; ``Marital_Status_binary``: 1 = 'MARRIED'
  (empty = 0); ``Language_binary``: 1 = 'English', 0 = other, NaN = none given;
- ``Race_cat_binary``: 1 = the paper's categories White ('WHITE') or White-other (contains 'WHITE -' or
  'PORTUGUESE'); ``Race_cat`` holds the paper's six categories;
- ``Age_binary``: 1 if anchor_age (as an integer) >= 61, else 0. The paper's code sets ages -1..60 to 0 and then
  ages >= 60 to 1, so 60 ends at 0 (method.md §1.2); ``Age_multi`` is its 4-level age (0-29, 30-49, 50-69, 70+);
- raw: subject_id, study_id, dicom_id, StudyDate, ViewPosition, PatientOrientationCodeSequence_CodeMeaning,
  PerformedProcedureStepDescription, gender, anchor_age, hadm_id (NaN when no admission was linked),
  hadm_by_date (1 = linked by date, 0 = the fallback), insurance, language, marital_status, race, and the CheXpert
  labels under their published names (e.g. 'Pleural Effusion', values 1.0 / 0.0 / -1.0 / NaN).

The text rules compare exact strings, as the paper's code does. Check them against your copy: MIMIC-IV versions
spell some values differently (e.g. upper-case 'ENGLISH', or no 'Private' insurance category); an attribute whose
rule never matches has a single group. The raw columns let a spec write its own rule as an ``expression``.

Item ids are each image's 0-based row number in ``mimic-cxr-2.0.0-metadata.csv.gz`` (stable for a release file,
whatever the subset; the database stores 32-bit ids).

Splits: the paper's recipe, at the PATIENT level everywhere. The unique subject_ids (ascending) are split with
sklearn ``train_test_split(test_size=0.33, random_state=patient_split_seed)`` into the pool's train part and the
rest, which ``train_test_split(test_size=0.66, random_state=patient_split_seed)`` splits into pool_val and a
held-out part (the paper's 67 / 11.2 / 21.8 %). DEVIATION from the paper: the paper then split the held-out
part's IMAGES 60/40 (random_state 42) into pre-training and the test set, so the test set shared patients with the
pre-training set; here its SUBJECTS (ascending) are split (``train_test_split(test_size=0.4,
random_state=pretrain_split_seed)``: 40 % test, 60 % pre-training), and the pre-training subjects (ascending) 5/6
train, 1/6 val (``test_size=1/6``, same seed). No subject is in two splits. With the same kept rows, the pool_train /
pool_val / held-out subjects are the paper's.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from backends.base import SPLITS, DatasetBundle, Split
from backends.errors import DataError
from backends.images import ImageFiles

KIND = "mimic_cxr"
METADATA = "mimic-cxr-2.0.0-metadata.csv.gz"
CHEXPERT = "mimic-cxr-2.0.0-chexpert.csv.gz"
PATIENTS = "hosp/patients.csv.gz"
ADMISSIONS = "hosp/admissions.csv.gz"
CHEXPERT_LABELS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum",
                   "Fracture", "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other",
                   "Pneumonia", "Pneumothorax", "Support Devices")
META_COLUMNS = ("dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
                "StudyDate", "PatientOrientationCodeSequence_CodeMeaning")
PATIENT_COLUMNS = ("subject_id", "gender", "anchor_age")
ADMISSION_COLUMNS = ("subject_id", "hadm_id", "admittime", "dischtime", "insurance", "language", "marital_status",
                     "race")
FIXED = "CHEST (PA AND LAT)"
PORTABLE = ("CHEST (PORTABLE AP)", "PORTABLE ABDOMEN", "CHEST (PA AND LAT) PORT")
AGE_CUTOFF = 61  # Age_binary = 1 from this anchor_age on (the paper's code, see the module docstring)
LAYOUT = (
    f"expected: root = the MIMIC-CXR-JPG 2.0.0 folder holding {METADATA} (columns {', '.join(META_COLUMNS)}), "
    f"{CHEXPERT} (subject_id, study_id and the CheXpert labels, e.g. 'Pleural Effusion', 'Support Devices') and "
    "files/p1X/p<subject_id>/s<study_id>/<dicom_id>.jpg; mimic_iv_root = the MIMIC-IV 2.2 folder holding "
    f"{PATIENTS} ({', '.join(PATIENT_COLUMNS)}) and {ADMISSIONS} ({', '.join(ADMISSION_COLUMNS)})"
)


class Options(BaseModel):
    """``[dataset.options]`` of a MIMIC-CXR spec."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    root: str = Field(description="MIMIC-CXR-JPG 2.0.0 folder (holds the two .csv.gz files and files/).")
    mimic_iv_root: str = Field(description="MIMIC-IV folder that holds hosp/patients.csv.gz and "
                               "hosp/admissions.csv.gz.")
    task: Literal["Pleural Effusion", "Cardiomegaly"] = Field(
        "Pleural Effusion", description="CheXpert label of the task; the column is its name with '_' for ' '.")
    admission_fallback: Literal["first", "none"] = Field(
        "first", description="A study no admission window covers takes the subject's first admission (the "
        "paper's code) or none (then it lacks race/insurance and is dropped).")
    patient_split_seed: int = Field(0, ge=0, description="random_state of the patient-level pool/held-out split "
                                    "(the paper's 0).")
    pretrain_split_seed: int = Field(42, ge=0, description="random_state of the held-out part's pre-training/test "
                                     "split (the paper's 42).")
    limit: int | None = Field(None, ge=20, description="Keep a seeded subset of about this many patients (a quick "
                              "look); None = all.")


def load(options: Options) -> DatasetBundle:
    """The five patient-level splits with the paper's columns; ``bundle.inputs(split)`` gives the JPEG files.

    Raises:
        DataError: a metadata file is missing or lacks a column (the message gives the expected layout), duplicate
            dicom_ids, or too few patients for the splits.
    """
    root = Path(options.root).expanduser().resolve()
    files = _files(root, Path(options.mimic_iv_root).expanduser().resolve())
    stats = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    table = _table(stats, options.task, options.admission_fallback)
    subjects = np.unique(table["subject_id"])
    if options.limit is not None and options.limit < len(subjects):
        subjects = np.sort(np.random.default_rng(options.patient_split_seed).permutation(subjects)[:options.limit])
    parts = _subject_splits(subjects, options)
    subject = table["subject_id"]
    splits, paths = {}, {}
    for name in SPLITS:
        pos = np.flatnonzero(np.isin(subject, parts[name]))
        splits[name] = Split(name, table["id"][pos], {k: v[pos] for k, v in table.items() if k != "id"})
        paths[name] = _image_paths(root, splits[name].columns)
    return DatasetBundle(kind=KIND, splits=splits, fingerprint=fingerprint(KIND, options, files, ("root",
                         "mimic_iv_root")), load_inputs=functools.partial(_inputs, paths, splits), images=True)


def _files(root: Path, mimic_iv: Path) -> list[Path]:
    files = [root / METADATA, root / CHEXPERT, mimic_iv / PATIENTS, mimic_iv / ADMISSIONS]
    for f in files:
        if not f.is_file():
            option = "root" if f.parent == root else "mimic_iv_root"
            raise DataError(f"MIMIC-CXR: {f} not found; fix: set dataset.options.{option} to the folder that holds "
                            f"it. {LAYOUT}")
    return files


def _subject_splits(subjects: np.ndarray, options: Options) -> dict[str, np.ndarray]:
    """The paper's patient-level splits (module docstring), then its held-out part split by subject too."""
    pool_train, held = split_keys(subjects, 0.33, options.patient_split_seed, "patients")
    pool_val, held_out = split_keys(held, 0.66, options.patient_split_seed, "held-out patients")  # the paper's order
    pretrain, test = split_keys(np.sort(held_out), 0.4, options.pretrain_split_seed, "held-out test patients")
    pretrain_train, pretrain_val = split_keys(np.sort(pretrain), 1 / 6, options.pretrain_split_seed,
                                              "pre-training patients")
    return {"pretrain_train": pretrain_train, "pretrain_val": pretrain_val, "pool_train": pool_train,
            "pool_val": pool_val, "test": test}


def split_keys(keys: np.ndarray, test_size: float, seed: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """sklearn ``train_test_split`` of the (sorted, unique) ``keys``; DataError when there are too few."""
    from sklearn.model_selection import train_test_split

    try:
        first, second = train_test_split(keys, test_size=test_size, random_state=seed)
    except ValueError as e:
        raise DataError(f"too few {what} ({len(keys)}) to split off {test_size:.3g} of them ({e}); fix: use more "
                        "data (a larger limit)") from None
    return np.asarray(first), np.asarray(second)


@functools.lru_cache(maxsize=2)
def _table(stats: tuple[tuple[str, int, int], ...], task: str, fallback: str) -> dict[str, np.ndarray]:
    """The kept rows (one per image) with every column; cached per file version (size and mtime are in the key)."""
    meta_path, chex_path, pat_path, adm_path = (Path(s[0]) for s in stats)
    meta = read_csv(meta_path, META_COLUMNS, (), {"subject_id": "int64", "study_id": "int64", "StudyDate": "float64"},
                    "MIMIC-CXR", LAYOUT)
    chex = read_csv(chex_path, ("subject_id", "study_id", task, "Support Devices"), CHEXPERT_LABELS,
                    {"subject_id": "int64", "study_id": "int64", **{c: "float64" for c in CHEXPERT_LABELS}},
                    "MIMIC-CXR", LAYOUT)
    pat = read_csv(pat_path, PATIENT_COLUMNS, (), {"subject_id": "int64", "anchor_age": "float64"}, "MIMIC-IV",
                   LAYOUT)
    adm = read_csv(adm_path, ADMISSION_COLUMNS, (), {"subject_id": "int64", "hadm_id": "int64"}, "MIMIC-IV", LAYOUT)

    meta["metadata_row"] = np.arange(len(meta["dicom_id"]), dtype=np.int64)  # the item id (see item_ids)
    rows = _join_chexpert(meta, chex, meta_path, chex_path)
    pat_row = _lookup(pat["subject_id"], rows["subject_id"], pat_path, "subject_id")
    for c in ("gender", "anchor_age"):
        rows[c] = _take(pat[c], pat_row)
    link, by_date = link_admissions(rows["subject_id"], rows["StudyDate"], adm, fallback == "first")
    rows["hadm_id"] = _take(adm["hadm_id"].astype(np.float64), link)
    rows["hadm_by_date"] = by_date.astype(np.int64)
    for c in ("insurance", "language", "marital_status", "race"):
        rows[c] = _take(adm[c], link)

    keep = rows[task] != -1  # NaN != -1: a label not mentioned is kept (and is 0)
    for c in ("gender", "anchor_age", "race", "insurance"):
        keep &= ~_missing(rows[c])
    rows = {k: v[keep] for k, v in rows.items()}
    table = {"id": item_ids(rows["dicom_id"], rows["metadata_row"], meta_path), **rows, **binarise(rows, task)}
    for array in table.values():
        array.setflags(write=False)
    return table


def _join_chexpert(meta: dict[str, np.ndarray], chex: dict[str, np.ndarray], meta_path: Path, chex_path: Path
                   ) -> dict[str, np.ndarray]:
    """Metadata rows whose study has CheXpert labels, with those labels (an inner join, as the paper)."""
    index: dict[tuple[int, int], int] = {}
    for i, key in enumerate(zip(chex["subject_id"].tolist(), chex["study_id"].tolist())):
        if key in index:
            raise DataError(f"MIMIC-CXR: {chex_path} has study {key[1]} of subject {key[0]} twice; each study needs "
                            "one row of labels")
        index[key] = i
    found = np.array([index.get(k, -1) for k in zip(meta["subject_id"].tolist(), meta["study_id"].tolist())],
                     dtype=np.int64)
    has = found >= 0
    rows = {k: v[has] for k, v in meta.items()}
    date = rows.pop("StudyDate")
    rows["StudyDate"] = np.where(np.isnan(date), -1, date).astype(np.int64)  # -1: no date (links by fallback only)
    for c in chex:
        if c not in ("subject_id", "study_id"):
            rows[c] = chex[c][found[has]]
    return rows


def link_admissions(subject: np.ndarray, study_date: np.ndarray, adm: dict[str, np.ndarray], fallback: bool
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Row of ``adm`` linked to each study (-1 = none) and whether the link is by date.

    A study links to the admission whose admittime..dischtime holds its StudyDate (calendar days, ends included;
    the last such admission in file order, as the paper's loop); else, with ``fallback``, to the subject's first
    admission in file order. Vectorised over (subject, date) pairs.
    """
    admit, disch = _day(adm["admittime"]), _day(adm["dischtime"])
    order = np.lexsort((np.arange(len(admit)), adm["subject_id"]))  # by subject, then file order
    adm_subject = adm["subject_id"][order]
    pairs, inverse = np.unique(np.stack([subject, study_date], axis=1), axis=0, return_inverse=True)
    p_subject, p_date = pairs[:, 0], pairs[:, 1]
    lo = np.searchsorted(adm_subject, p_subject, side="left")
    count = np.searchsorted(adm_subject, p_subject, side="right") - lo
    pair = np.repeat(np.arange(len(pairs)), count)
    within = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)
    cand = order[lo[pair] + within]
    date = p_date[pair]
    hit = (date >= 0) & (admit[cand] >= 0) & (disch[cand] >= 0) & (admit[cand] <= date) & (date <= disch[cand])
    best = np.full(len(pairs), -1, dtype=np.int64)
    np.maximum.at(best, pair[hit], cand[hit])
    by_date = best >= 0
    if fallback and len(order):
        first = np.where(count > 0, order[np.minimum(lo, len(order) - 1)], -1)
        best = np.where(by_date, best, first)
    inverse = inverse.reshape(-1)
    return best[inverse], by_date[inverse]


def _day(times: np.ndarray) -> np.ndarray:
    """YYYYMMDD int of 'YYYY-MM-DD HH:MM:SS' texts (the paper's ``str(x)[:10].replace('-', '')``); -1 if none."""
    out = np.full(len(times), -1, dtype=np.int64)
    for i, t in enumerate(times.tolist()):
        if t:
            try:
                out[i] = int(str(t)[:10].replace("-", ""))
            except ValueError:
                pass
    return out


def binarise(rows: dict[str, np.ndarray], task: str) -> dict[str, np.ndarray]:
    """The paper's binarised columns (module docstring) from the kept rows' raw columns."""
    view, orient, proc = rows["ViewPosition"], rows["PatientOrientationCodeSequence_CodeMeaning"], \
        rows["PerformedProcedureStepDescription"]
    race = rows["race"]
    age = rows["anchor_age"].astype(np.int64)
    out = {
        task.replace(" ", "_"): (rows[task] == 1).astype(np.int64),
        "ViewPosition_binary": _with_nan(_is_in(view, ("AP", "PA")), _missing(view)),
        "PatientOrientationCodeSequence_CodeMeaning_binary": _with_nan(orient == "Erect", _missing(orient)),
        "PerformedProcedureStepDescription_binary": _with_nan(proc == FIXED, ~_is_in(proc, (FIXED, *PORTABLE))),
        "Support_Devices_binary": (rows["Support Devices"] == 1).astype(np.int64),
        "Gender_binary": (rows["gender"] == "M").astype(np.int64),
        "Insurance_binary": (rows["insurance"] == "Private").astype(np.int64),
        "Language_binary": _with_nan(rows["language"] == "English", _missing(rows["language"])),
        "Marital_Status_binary": (rows["marital_status"] == "MARRIED").astype(np.int64),
        "Race_cat": np.array([race_category(r) for r in race.tolist()], dtype=object),
        "Age_binary": (age >= AGE_CUTOFF).astype(np.int64),
        "Age_multi": np.select([age <= 29, age <= 49, age <= 69], [0, 1, 2], 3).astype(np.int64),
    }
    out["Race_cat_binary"] = _is_in(out["Race_cat"], ("White", "White-other")).astype(np.int64)
    return out


def race_category(race: str) -> str:
    """The paper's six race categories (its code's order of tests)."""
    def has(*words: str) -> bool:
        return any(w in race for w in words)

    if race == "WHITE":
        return "White"
    if has("WHITE -", "PORTUGUESE"):
        return "White-other"
    if has("HISPANIC", "LATINO", "MEXICAN", "CENTRAL AMERICAN", "CUBAN", "SALVADORAN", "GUATEMALAN", "DOMINICAN",
           "COLOMBIAN", "HONDURAN", "SOUTH AMERICAN"):
        return "Hispanic"
    if has("ASIAN", "CHINESE", "KOREAN", "SOUTH EAST ASIAN", "ASIAN INDIAN"):
        return "Asian"
    if has("BLACK", "AFRICAN AMERICAN", "CARIBBEAN ISLAND", "CAPE VERDEAN"):
        return "Black"
    return "Other"


def _is_in(values: np.ndarray, wanted: tuple[str, ...]) -> np.ndarray:
    """Elementwise ``value in wanted`` for an object array that may hold None (np.isin would sort it)."""
    return np.array([v in wanted for v in values.tolist()], dtype=bool)


def _with_nan(one: np.ndarray, nan: np.ndarray) -> np.ndarray:
    return np.where(nan, np.nan, np.asarray(one, dtype=np.float64))


def _missing(values: np.ndarray) -> np.ndarray:
    if values.dtype.kind == "f":
        return np.isnan(values)
    return np.array([v is None or (isinstance(v, str) and not v.strip()) for v in values.tolist()], dtype=bool)


def _lookup(keys: np.ndarray, wanted: np.ndarray, path: Path, column: str) -> np.ndarray:
    """Row of ``keys`` holding each wanted key (-1 = none); DataError on duplicate keys."""
    uniq, first = np.unique(keys, return_index=True)
    if len(uniq) < len(keys):
        raise DataError(f"MIMIC-IV: {path} has duplicate {column} values; each subject needs one row")
    if not len(uniq):
        return np.full(len(wanted), -1, dtype=np.int64)
    pos = np.minimum(np.searchsorted(uniq, wanted), len(uniq) - 1)
    return np.where(uniq[pos] == wanted, first[pos], -1)


def _take(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``values[rows]`` with -1 meaning missing (NaN for numbers, None for texts)."""
    if len(values) == 0:
        return np.full(len(rows), np.nan) if values.dtype.kind == "f" else np.full(len(rows), None, dtype=object)
    out = values[np.maximum(rows, 0)]
    if out.dtype.kind == "f":
        return np.where(rows >= 0, out, np.nan)
    out = out.astype(object)
    out[rows < 0] = None
    return out


def item_ids(keys: np.ndarray, rows: np.ndarray, path: Path) -> np.ndarray:
    """Item ids: each image's 0-based row in the metadata file (stable for a release file whatever the subset;
    they fit the database's 32-bit ids, which 377,110 hashed ids could not without collisions). DataError on a
    dicom_id that appears twice among the kept rows."""
    uniq, counts = np.unique(keys.astype(str), return_counts=True)
    if len(uniq) < len(keys):
        dup = uniq[counts > 1].tolist()
        raise DataError(f"MIMIC-CXR: {path}: dicom_id {', '.join(dup[:3])} appears more than once among the kept "
                        "rows; each image needs one row")
    return rows.astype(np.int64)


def _image_paths(root: Path, columns: dict[str, np.ndarray]) -> np.ndarray:
    out = np.empty(len(columns["dicom_id"]), dtype=object)
    for i, (subject, study, dicom) in enumerate(zip(columns["subject_id"].tolist(), columns["study_id"].tolist(),
                                                    columns["dicom_id"].tolist())):
        out[i] = str(root / "files" / f"p{str(subject)[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg")
    return out


def _inputs(paths: dict[str, np.ndarray], splits: dict[str, Split], split: str) -> ImageFiles:
    if split not in paths:
        raise DataError(f"{KIND} has no split '{split}'; known splits are: {', '.join(paths)}")
    return ImageFiles(paths[split], splits[split].ids)


# --- shared with backends.datasets.ham10000 ---------------------------------------------------------------------

def read_csv(path: Path, required: tuple[str, ...], optional: tuple[str, ...], types: dict[str, str], dataset: str,
             layout: str) -> dict[str, np.ndarray]:
    """The ``required`` and present ``optional`` columns of a CSV (``.gz`` too; comma or tab separated).

    Texts come as object arrays (None for an empty cell); ``types`` names numeric columns ('int64', 'float64':
    empty cells are NaN). DataError naming the file, the missing columns and ``layout`` otherwise.
    """
    import pyarrow as pa
    from pyarrow import csv as pacsv

    header, delimiter = csv_header(path, dataset, layout)
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(f"{dataset}: {path} lacks column(s) {', '.join(missing)} (it has: {', '.join(header)}); "
                        f"{layout}")
    wanted = list(required) + [c for c in optional if c in header and c not in required]
    column_types = {c: (pa.float64() if types.get(c) == "int64" else getattr(pa, types[c])()) if c in types
                    else pa.string() for c in wanted}
    try:
        table = pacsv.read_csv(path, parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
                               convert_options=pacsv.ConvertOptions(include_columns=wanted, column_types=column_types,
                                                                    strings_can_be_null=True))
    except (pa.ArrowInvalid, OSError, EOFError) as e:
        raise DataError(f"{dataset}: cannot read {path} ({e}); {layout}") from e
    out: dict[str, np.ndarray] = {}
    for c in wanted:
        column = table.column(c)
        if c in types:
            values = column.to_numpy(zero_copy_only=False).astype(np.float64)
            if types[c] == "int64":
                if np.isnan(values).any():
                    raise DataError(f"{dataset}: {path}: column {c} has {int(np.isnan(values).sum())} empty "
                                    f"cell(s); every row needs an integer {c}")
                values = values.astype(np.int64)
            out[c] = values
        else:
            out[c] = np.asarray(column.to_pylist(), dtype=object)
    return out


def csv_header(path: Path, dataset: str, layout: str) -> tuple[list[str], str]:
    """Column names of the first line and the delimiter (tab when the line has tabs and no commas)."""
    opener: Any = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8", newline="") as fh:
            first = fh.readline()
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise DataError(f"{dataset}: cannot read {path} ({e}); {layout}") from e
    line = first.lstrip("\ufeff").rstrip("\r\n")
    delimiter = "\t" if "\t" in line and "," not in line else ","
    return [c.strip().strip('"') for c in line.split(delimiter)], delimiter


def fingerprint(kind: str, options: BaseModel, files: list[Path], path_options: tuple[str, ...]) -> str:
    """sha256 of the options (without the folders: moving the data keeps finished work) and of the files' bytes."""
    digest = hashlib.sha256(json.dumps({"kind": kind, "options": options.model_dump(exclude=set(path_options))},
                                       sort_keys=True).encode())
    for f in files:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
        digest.update(f"{f.name}\0{h.hexdigest()}\n".encode())
    return digest.hexdigest()

