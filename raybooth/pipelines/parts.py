"""Part files: job output a crash cannot corrupt and a rerun can resume from.

    done = completed_row_ids(parts_uri)             # row ids already written by earlier runs
    table = read_parts(parts_uri, ["row_id", "line"])

Every run appends parquet part files (written by Ray Data's `write_parquet`) to one folder or S3 prefix;
each part holds whole rows, including their `row_id`. A part is trusted only if its parquet footer reads
back: the footer is the last thing a writer puts in the file, so a part cut short by a crash has none
(and on S3 an unfinished upload is never visible at all). Unreadable parts are deleted before a rerun,
and their rows are simply done again. The row ids of the readable parts are what a rerun skips.
"""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.parquet as pq

from raybooth.cluster import storage

PART_SUFFIX = ".parquet"

log = logging.getLogger(__name__)


def list_parts(parts_uri: str) -> list[str]:
    return storage.list_files(parts_uri, [PART_SUFFIX])


def _read_part(uri: str, columns: list[str] | None) -> pa.Table | None:
    """The part's rows, or None if it is not a complete parquet file."""
    fs, path = storage.pyarrow_filesystem(uri)
    try:
        return pq.read_table(path, filesystem=fs, columns=columns)
    except (pa.ArrowInvalid, OSError) as e:
        log.warning("ignoring unreadable part %s (%s); its rows will be done again", uri, e)
        return None


def read_parts(
    parts_uri: str, columns: list[str] | None = None, drop_broken: bool = True, skip: set[str] | None = None
) -> pa.Table | None:
    """All complete parts (but those in `skip`) as one table, None when there are none; broken parts
    are deleted."""
    tables = []
    for uri in list_parts(parts_uri):
        if skip and uri in skip:
            continue
        table = _read_part(uri, columns)
        if table is None:
            if drop_broken:
                storage.delete(uri)
            continue
        tables.append(table)
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return None
    return pa.concat_tables(tables, promote_options="permissive")


def run_counts(table: pa.Table | None) -> dict[str, int]:
    """Rows, failed rows and padded token slots of output rows (the STATS columns every job writes)."""
    if table is None:
        return {"rows": 0, "failed": 0, "padding_tokens": 0, "padded_tokens": 0}
    rows = table.to_pydict()
    batched = [i for i, n in enumerate(rows["batch_rows"]) if n]  # rows that went through a model batch
    # Token slots the model ran (scheduled_generation.py): prompt positions and decode-step row slots.
    padding = sum(rows["padding_tokens"][i] + rows["idle_slot_steps"][i] for i in batched)
    real = sum(rows["prompt_tokens"][i] + rows["decode_steps"][i] for i in batched)
    return {
        "rows": table.num_rows,
        "failed": sum(1 for e in rows["error"] if e is not None),
        "padding_tokens": padding,
        "padded_tokens": padding + real,
    }


SUMMARY_COLUMNS = [
    "error",
    "batch_rows",
    "padding_tokens",
    "prompt_tokens",
    "decode_steps",
    "idle_slot_steps",
]


def completed_row_ids(parts_uri: str, key: str = "row_id") -> set:
    """Row ids in the complete parts under `parts_uri` (broken parts are deleted on the way)."""
    table = read_parts(parts_uri, [key])
    return set() if table is None else set(table.column(key).to_pylist())
