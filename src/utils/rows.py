"""CSV rows: the one place tables are read and written (caption/score tables, histories, per-sample metrics).

Conventions (docs/formats.md):

* An image is identified by ``(shard, key)``; both are strings. Every CSV is read with ``dtype=str``
  and no NA parsing, so ``"000010000"`` stays ``"000010000"`` and an empty cell stays ``""``.
* A score cell is *filled* when it is non-empty: ``""`` means "not computed yet", ``"nan"`` means
  "computed, undefined" (empty caption, unreadable image, no reference). Resume logic relies on this:
  a row whose score columns are all filled is never scored again.
* Files are rewritten atomically (temp file + ``os.replace``); rows are unique by ``(shard, key)``
  (``upsert_rows`` replaces a row with the same id instead of appending a duplicate).
* ``read_rows`` / ``write_rows``: plain ``list[dict]`` rows with a fixed header (training histories,
  per-sample reconstruction metrics), written with the ``csv`` module as given.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vlmc.utils.cli import UsageError
from vlmc.utils.io import atomic_open, atomic_write_text

log = logging.getLogger(__name__)

ID_COLS = ("shard", "key")
NAN_TEXT = "nan"


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read a CSV with every column as ``str`` (empty cells → ``""``, never NaN)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    try:
        return pd.read_csv(p, dtype=str, keep_default_na=False, na_filter=False)
    except pd.errors.EmptyDataError:
        return pd.DataFrame(columns=list(ID_COLS))
    except pd.errors.ParserError as e:
        raise UsageError(f"{p}: not a readable CSV ({str(e).splitlines()[0]})") from None


def read_rows(path: str | os.PathLike) -> list[dict[str, str]]:
    """CSV rows as dicts of strings (keys like ``"000010000"`` stay strings); ``[]`` when the file does not exist."""
    if not Path(path).exists():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def write_rows(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]], fields: Sequence[str]) -> None:
    """Rewrite a CSV atomically: one header ``fields``, then each row's ``fields`` (missing ones empty)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k, "") for k in fields})
    atomic_write_text(path, buf.getvalue())


def write_table(path: str | os.PathLike, df: pd.DataFrame) -> None:
    """Write ``df`` atomically; float NaN is written as ``nan`` (a filled, undefined score)."""
    with atomic_open(path, "w", encoding="utf-8", newline="") as f:
        df.to_csv(f, index=False, na_rep=NAN_TEXT)


def require_columns(df: pd.DataFrame, cols: Iterable[str], path: str | os.PathLike) -> None:
    """``UsageError`` naming the missing columns of ``path``."""
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise UsageError(f"{path}: missing column(s) {', '.join(missing)} (has: {', '.join(df.columns)})")


def ensure_shard(df: pd.DataFrame, path: str | os.PathLike) -> pd.DataFrame:
    """Add a ``shard`` column to an old CSV that lacks one: the image folder's name (``image_path``'s parent)."""
    if "shard" in df.columns:
        return df
    if "image_path" not in df.columns:
        raise UsageError(f"{path}: no 'shard' column and no 'image_path' to derive it from")
    log.warning("%s: no 'shard' column; using each image's folder name as its shard", path)
    df = df.copy()
    df.insert(0, "shard", [Path(p).parent.name if p else "" for p in df["image_path"]])
    return df


def row_ids(df: pd.DataFrame) -> list[tuple[str, str]]:
    """``(shard, key)`` of each row, as strings."""
    return list(zip(df["shard"].astype(str), df["key"].astype(str), strict=True))


def dedupe_rows(df: pd.DataFrame, path: str | os.PathLike | None = None) -> pd.DataFrame:
    """Keep the last version of each ``(shard, key)`` row, placed where the id first appeared; warns on duplicates."""
    dup = df.duplicated(list(ID_COLS), keep="last")
    if not dup.any():
        return df.reset_index(drop=True)
    log.warning(
        "%s: %d duplicate (shard, key) rows; keeping the last of each", path or "table", int(dup.sum())
    )
    ids = row_ids(df)
    first: dict[tuple[str, str], int] = {}
    for pos, i in enumerate(ids):
        first.setdefault(i, pos)
    keep = np.flatnonzero(~dup.to_numpy())
    order = sorted(keep, key=lambda pos: first[ids[pos]])  # last version, at the first occurrence's place
    return df.iloc[order].reset_index(drop=True)


def filled(series: pd.Series) -> np.ndarray:
    """Boolean mask: cells holding a value (a number, ``nan`` text or any non-empty string)."""
    return series.map(lambda v: not (v is None or (isinstance(v, str) and v.strip() == ""))).to_numpy(bool)


def rows_done(df: pd.DataFrame, cols: Sequence[str]) -> np.ndarray:
    """Boolean mask of rows whose ``cols`` all exist and are filled."""
    done = np.ones(len(df), dtype=bool)
    for c in cols:
        done &= filled(df[c]) if c in df.columns else False
    return done


def done_ids(path: str | os.PathLike, cols: Sequence[str] = ()) -> set[tuple[str, str]]:
    """Ids of rows already in ``path`` (with ``cols`` filled); empty set when the file does not exist.

    Generation stages call this to resume: skip an image whose id is returned.
    """
    if not Path(path).exists():
        return set()
    df = read_table(path)
    if df.empty or not set(ID_COLS) <= set(df.columns):
        return set()
    mask = rows_done(df, cols)
    return set(row_ids(df.loc[mask]))


def upsert_rows(path: str | os.PathLike, rows: pd.DataFrame | Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Merge ``rows`` into the CSV at ``path`` (created if needed) and rewrite it atomically.

    A row whose ``(shard, key)`` is already present replaces the old one in place; new rows are
    appended in the order given. Columns are the union (old order first). Values are stored as given;
    ``shard``/``key`` are cast to ``str``.

    Returns:
        The table as written.
    """
    new = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    if new.empty:
        return read_table(path) if Path(path).exists() else new
    require_columns(new, ID_COLS, "rows to write")
    new = new.astype({c: str for c in ID_COLS})
    new = dedupe_rows(new, "rows to write")
    old = read_table(path) if Path(path).exists() else pd.DataFrame(columns=list(new.columns))
    old = dedupe_rows(ensure_shard(old, path), path) if not old.empty else old
    cols = list(old.columns) + [c for c in new.columns if c not in old.columns]
    merged = _stable_upsert(old, new, cols)
    write_table(path, merged)
    return merged


def _stable_upsert(old: pd.DataFrame, new: pd.DataFrame, cols: list[str]) -> pd.DataFrame:
    """Old rows in their order (replaced ones swapped for the new version), then the genuinely new rows."""
    if old.empty:
        return new.reindex(columns=cols, fill_value="").reset_index(drop=True)
    new_by_id = {i: r for i, r in zip(row_ids(new), new.to_dict("records"), strict=True)}
    out: list[dict[str, Any]] = []
    for i, rec in zip(row_ids(old), old.to_dict("records"), strict=True):
        out.append(new_by_id.pop(i, rec))
    out += list(new_by_id.values())
    return pd.DataFrame(out).reindex(columns=cols, fill_value="").fillna("")


def carry_scores(
    base: pd.DataFrame, prev: pd.DataFrame, score_cols: Sequence[str], match_cols: Sequence[str]
) -> pd.DataFrame:
    """Copy ``score_cols`` from ``prev`` into ``base`` for rows with the same id and identical ``match_cols``.

    Used to resume scoring into a separate output file: a row is carried over only when the texts it
    was scored on are unchanged, so a regenerated caption is scored again.
    """
    cols = [c for c in score_cols if c in prev.columns]
    if prev.empty or not cols:
        return base
    match = [c for c in match_cols if c in prev.columns and c in base.columns]
    prev = dedupe_rows(prev, "previous scores")
    index = {
        tuple(r[c] for c in (*ID_COLS, *match)): r for r in prev[[*ID_COLS, *match, *cols]].to_dict("records")
    }
    out = base.copy()
    for c in cols:
        if c not in out.columns:
            out[c] = ""
    values = {c: out[c].astype(object).tolist() for c in cols}
    have = {c: filled(out[c]) for c in cols}
    for pos, r in enumerate(out[[*ID_COLS, *match]].to_dict("records")):
        hit = index.get(tuple(r[c] for c in (*ID_COLS, *match)))
        if hit is not None:
            for c in cols:
                if not have[c][pos]:
                    values[c][pos] = hit[c]
    for c in cols:
        out[c] = values[c]
    return out
