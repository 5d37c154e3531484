"""Read raw rows (plain dicts) from local files, directories or the Hugging Face Hub.

Local files, chosen by extension:

* ``.jsonl`` -- one JSON object per line; blank lines are skipped. Validated line by
  line, so a malformed line is reported as ``file.jsonl:LINE``.
* ``.json``  -- a JSON array of objects, JSON lines, a dict of equal-length columns
  (``{"prompt": [...], "completion": [...]}``) or one key holding the array.
* ``.csv``   -- a header row, then one row per line; every value is a string.
* ``.parquet``

A directory holds files named after their split (``train.jsonl``,
``train-00000-of-00002.parquet``, ``train/part0.csv``) -- or, if no file names a
split, all of its files form the ``train`` split -- or was written by
``datasets.save_to_disk``. A path that does not exist locally and does not look like a
file is treated as a Hub dataset name (``owner/name``) and loaded with
``datasets.load_dataset``.

Each row carries a location for messages: ``file:LINE`` for jsonl/csv,
``file item I`` for JSON arrays, ``file row I`` (0-based, like ``dataset[I]``) otherwise.
"""
from __future__ import annotations

import csv
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import DataError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
SPLIT_NAMES = {"train", "validation", "valid", "val", "test", "eval", "dev"}
OFFLINE_FIX = "download it on a machine with internet and pass the local path, or unset HF_HUB_OFFLINE"
TRUE = {"1", "ON", "YES", "TRUE"}


@dataclass
class Row:
    values: dict
    where: str


def read_rows(path: str, *, name: str | None = None, split: str = "train",
              max_samples: int | None = None, key: str = "data") -> list[Row]:
    """All rows of ``path`` (at most ``max_samples``); raises :class:`DataError`."""
    p = Path(os.path.expanduser(str(path)))
    if p.is_dir():
        rows = _read_dir(p, split, max_samples, key)
    elif p.is_file():
        rows = _read_file(p, max_samples, key)
    elif _looks_local(str(path)):
        raise DataError(f"file not found: {path} (cwd: {os.getcwd()})", where=f"{key}.path",
                        fix=f"check {key}.path; relative paths are resolved from the working directory")
    else:
        rows = _read_hub(str(path), name, split, max_samples, key)
    if not rows:
        raise DataError(f"dataset is empty: no rows in {path}" + (f" (split {split!r})" if p.is_dir() else ""),
                        where=f"{key}.path", fix="check that the file has data rows and the path/split are right")
    return rows


def _looks_local(path: str) -> bool:
    return (path.lower().endswith(SUFFIXES) or path.startswith((".", "/", "~"))
            or "\\" in path or path.count("/") > 1)


# ----------------------------------------------------------------------------- files
def _read_file(p: Path, max_samples: int | None, key: str) -> list[Row]:
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        rows = _read_jsonl(p, max_samples)
    elif suffix == ".json":
        rows = _read_json(p, max_samples)
    elif suffix == ".csv":
        rows = _read_csv(p, max_samples)
    elif suffix == ".parquet":
        rows = _read_parquet(p, max_samples)
    else:
        raise DataError(f"unsupported file type {suffix or '(no extension)'!r}: {p}", where=f"{key}.path",
                        fix=f"use one of {', '.join(SUFFIXES)} (or a directory of them)")
    return rows[:max_samples] if max_samples else rows


def _json_type(obj: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(obj), "number")


def _read_jsonl(p: Path, max_samples: int | None) -> list[Row]:
    rows = []
    with open(p, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"not valid UTF-8 ({e.reason} at byte {e.start})", where=f"{p}:{lineno}",
                                fix="save the file as UTF-8") from None
            line = line.rstrip("\r\n")  # an error at the end of the line is at its last column, not on the next line
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"invalid JSON: {e.msg} (column {e.colno})", where=f"{p}:{lineno}",
                                fix="each non-blank line must be one complete JSON object, "
                                    'e.g. {"prompt": "...", "completion": "..."}') from None
            if not isinstance(obj, dict):
                raise DataError(f"expected a JSON object on each line, got a JSON {_json_type(obj)}",
                                where=f"{p}:{lineno}", fix='write one object per line: {"column": value, ...}')
            rows.append(Row(obj, f"{p}:{lineno}"))
            if max_samples and len(rows) >= max_samples:
                break
    return rows


def _read_json(p: Path, max_samples: int | None) -> list[Row]:
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"not valid UTF-8 ({e.reason} at byte {e.start})", where=str(p),
                        fix="save the file as UTF-8") from None
    if not text.strip():
        return []
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several top-level values: JSON lines in a .json file
            return _read_jsonl(p, max_samples)
        raise DataError(f"invalid JSON: {e.msg} (column {e.colno})", where=f"{p}:{e.lineno}",
                        fix="the file must hold a JSON array of objects (or one object per line)") from None
    if isinstance(obj, dict):
        obj = _unwrap_json_dict(obj, p)
    if not isinstance(obj, list):
        raise DataError(f"expected a JSON array of objects, got a JSON {_json_type(obj)}", where=str(p),
                        fix='write [{"column": value, ...}, ...] or one object per line (.jsonl)')
    rows = []
    for i, item in enumerate(obj[:max_samples] if max_samples else obj):
        if not isinstance(item, dict):
            raise DataError(f"item {i} of the array is a JSON {_json_type(item)}, expected an object",
                            where=str(p), fix='every item must be {"column": value, ...}')
        rows.append(Row(item, f"{p} item {i}"))
    return rows


def _unwrap_json_dict(obj: dict, p: Path) -> list:
    """``{"col": [..], ...}`` (columns) or ``{"data": [{..}, ..]}`` (one key holding rows)."""
    values = list(obj.values())
    if len(values) == 1 and isinstance(values[0], list) and all(isinstance(v, dict) for v in values[0]):
        return values[0]
    if values and all(isinstance(v, list) for v in values):
        lengths = {k: len(v) for k, v in obj.items()}
        if len(set(lengths.values())) != 1:
            raise DataError(f"columns have different lengths: {lengths}", where=str(p),
                            fix="a JSON object of columns needs lists of equal length")
        return [dict(zip(obj, vals)) for vals in zip(*values)]
    raise DataError(f"expected a JSON array of objects, got an object with keys {sorted(obj)[:10]}",
                    where=str(p), fix='write [{"column": value, ...}, ...] or one object per line (.jsonl)')


def _read_csv(p: Path, max_samples: int | None) -> list[Row]:
    rows = []
    try:
        with open(p, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            for rec in reader:
                where = f"{p}:{reader.line_num}"
                if None in rec:
                    raise DataError(f"row has more fields than the header ({len(reader.fieldnames)} columns)",
                                    where=where, fix="quote values that contain commas")
                missing = [k for k, v in rec.items() if v is None]
                if missing:
                    raise DataError(f"row has fewer fields than the header (missing {missing})", where=where,
                                    fix="give every row one value per header column")
                rows.append(Row(dict(rec), where))
                if max_samples and len(rows) >= max_samples:
                    break
    except UnicodeDecodeError as e:
        raise DataError(f"not valid UTF-8 ({e.reason})", where=str(p), fix="save the file as UTF-8") from None
    except csv.Error as e:
        raise DataError(f"malformed CSV: {e}", where=f"{p}:{reader.line_num}", fix="check quoting") from None
    return rows


def _read_parquet(p: Path, max_samples: int | None) -> list[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(p)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"cannot read parquet file: {e}", where=str(p), fix="check that it is a valid parquet file") from None
    if max_samples:
        table = table.slice(0, max_samples)
    return [Row(r, f"{p} row {i}") for i, r in enumerate(table.to_pylist())]


# ----------------------------------------------------------------------------- directories
def _file_split(f: Path, root: Path) -> str | None:
    stem = f.name.split(".")[0].lower()
    for token in (stem, stem.split("-")[0], stem.split("_")[0], f.parent.name.lower() if f.parent != root else ""):
        if token in SPLIT_NAMES:
            return token
    return None


def _read_dir(d: Path, split: str, max_samples: int | None, key: str) -> list[Row]:
    if (d / "dataset_dict.json").exists() or (d / "state.json").exists():
        return _read_saved(d, split, max_samples, key)
    files = sorted(f for f in d.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES
                   and not any(part.startswith(".") for part in f.relative_to(d).parts))
    if not files:
        raise DataError(f"no {'/'.join(SUFFIXES)} files in directory {d}", where=f"{key}.path",
                        fix="point it at a data file or a directory of them")
    splits = {f: _file_split(f, d) for f in files}
    found = sorted({s for s in splits.values() if s})
    if found:
        files = [f for f in files if splits[f] == split.lower()]
        if not files:
            raise DataError(f"no file for split {split!r} in {d}; splits found: {', '.join(found)}",
                            where=f"{key}.split", fix=f"set {key}.split to one of {found}")
    elif split != "train":
        raise DataError(f"no file in {d} is named after split {split!r}", where=f"{key}.split",
                        fix=f"name files like {split}.jsonl, or set {key}.split=train")
    rows: list[Row] = []
    for f in files:
        rows.extend(_read_file(f, max_samples and max_samples - len(rows), key))
        if max_samples and len(rows) >= max_samples:
            break
    return rows


def _read_saved(d: Path, split: str, max_samples: int | None, key: str) -> list[Row]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(d))
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as e:
        raise DataError(f"cannot load saved dataset: {e}", where=str(d), fix="re-save it with save_to_disk") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"split {split!r} not in {d}; splits: {', '.join(ds)}", where=f"{key}.split",
                            fix=f"set {key}.split to one of {list(ds)}")
        ds = ds[split]
    return _dataset_rows(ds, str(d), max_samples)


def _dataset_rows(ds, label: str, max_samples: int | None) -> list[Row]:
    if max_samples:
        ds = ds.select(range(min(max_samples, len(ds))))
    return [Row(r, f"{label} row {i}") for i, r in enumerate(ds.to_list())]


# ----------------------------------------------------------------------------- hub
def hub_offline() -> bool:
    return any(os.environ.get(v, "").upper() in TRUE for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


@contextmanager
def _offline_mode(enabled: bool):
    """Honour HF_HUB_OFFLINE set after ``datasets`` was imported (its config is read at import)."""
    if not enabled:
        yield
        return
    import datasets.config as dc
    import huggingface_hub.constants as hc

    saved = dc.HF_HUB_OFFLINE, hc.HF_HUB_OFFLINE
    dc.HF_HUB_OFFLINE = hc.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        dc.HF_HUB_OFFLINE, hc.HF_HUB_OFFLINE = saved


def _read_hub(path: str, name: str | None, split: str, max_samples: int | None, key: str) -> list[Row]:
    import datasets

    offline = hub_offline()
    label = f"{path}" + (f" ({name})" if name else "") + f" [{split}]"
    try:
        with _offline_mode(offline):
            ds = datasets.load_dataset(path, name, split=split)
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as e:
        if offline and (isinstance(e, ConnectionError) or "offline" in str(e).lower()):
            raise DataError(f"{path!r} is not a local file or directory, and the Hugging Face Hub is unreachable "
                            "in offline mode (HF_HUB_OFFLINE=1); nor is it in the local Hub cache",
                            where=f"{key}.path", fix=OFFLINE_FIX) from None
        if isinstance(e, ConnectionError):
            raise DataError(f"{path!r} is not a local file or directory, and the Hugging Face Hub could not be "
                            f"reached: {e}", where=f"{key}.path", fix=OFFLINE_FIX) from None
        if isinstance(e, datasets.exceptions.DatasetNotFoundError):
            raise DataError(f"{path!r} is neither a local file nor a dataset on the Hub: {e}", where=f"{key}.path",
                            fix=f"check the spelling of {key}.path (a local path or owner/name)") from None
        raise DataError(f"cannot load Hub dataset {label}: {e}", where=f"{key}",
                        fix=f"check {key}.name (config) and {key}.split") from None
    return _dataset_rows(ds, label, max_samples)
