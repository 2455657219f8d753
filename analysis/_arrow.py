"""Values between Python, numpy and Arrow without pyarrow's pandas shim, and grouping by sorting.

pyarrow imports pandas (if installed; about 0.4 s, more than a whole first load of a sweep) the
first time it builds an array from Python or numpy values (`pa.array`, `pa.scalar`, a Python
number given to a compute function), converts an array to numpy (`to_numpy`) or groups a table
(`group_by`). The loader and `analysis.metrics` go through these helpers instead, so that
`analysis.load` never imports pandas: numbers cross by their buffers, Python rows through
pyarrow's JSON reader, and groups come from a stable sort.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson


def _dtype(kind: pa.DataType) -> np.dtype:
    if pa.types.is_floating(kind):
        return np.dtype(f"f{kind.bit_width // 8}")
    if pa.types.is_signed_integer(kind):
        return np.dtype(f"i{kind.bit_width // 8}")
    if pa.types.is_unsigned_integer(kind):
        return np.dtype(f"u{kind.bit_width // 8}")
    raise TypeError(f"no numpy view of Arrow type {kind}")


def _bits(buffer: pa.Buffer, offset: int, length: int) -> np.ndarray:
    packed = np.frombuffer(buffer, np.uint8)
    return np.unpackbits(packed, bitorder="little")[offset : offset + length].astype(bool)


def valid(array: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Where `array` holds a value (not null), as a numpy bool array."""
    if isinstance(array, pa.ChunkedArray):
        return np.concatenate([valid(c) for c in array.chunks] or [np.zeros(0, bool)])
    if pa.types.is_null(array.type):
        return np.zeros(len(array), bool)
    bitmap = array.buffers()[0]
    if bitmap is None:
        return np.ones(len(array), bool)
    return _bits(bitmap, array.offset, len(array))


def to_numpy(array: pa.Array | pa.ChunkedArray, fill: Any) -> np.ndarray:
    """A numeric or boolean Arrow array as a numpy array, with `fill` where it is null.

    An all-null column of Arrow's null type comes out as `fill` everywhere."""
    if isinstance(array, pa.ChunkedArray):
        parts = [to_numpy(c, fill) for c in array.chunks]
        return np.concatenate(parts) if parts else np.asarray([], np.asarray(fill).dtype)
    if pa.types.is_null(array.type):
        return np.full(len(array), fill)
    data = array.buffers()[1]
    if pa.types.is_boolean(array.type):
        values = _bits(data, array.offset, len(array))
    else:
        kind = _dtype(array.type)
        values = np.frombuffer(data, kind, count=len(array), offset=array.offset * kind.itemsize)
    if array.null_count:
        values = np.where(valid(array), values, fill)
    return values


def from_numpy(values: np.ndarray, mask: np.ndarray | None = None) -> pa.Array:
    """A 1-d numeric or boolean numpy array as an Arrow array, null where `mask` is False."""
    values = np.ascontiguousarray(values)
    bitmap = None
    nulls = 0
    if mask is not None and not mask.all():
        bitmap = pa.py_buffer(np.packbits(mask, bitorder="little"))
        nulls = int(len(mask) - mask.sum())
    if values.dtype == bool:
        kind, data = pa.bool_(), pa.py_buffer(np.packbits(values, bitorder="little"))
    else:
        kind, data = pa.from_numpy_dtype(values.dtype), pa.py_buffer(values)
    return pa.Array.from_buffers(kind, len(values), [bitmap, data], null_count=nulls)


def filled(array: pa.Array | pa.ChunkedArray, value: Any) -> pa.Array:
    """`array` with `value` where it is null (numeric or boolean)."""
    return from_numpy(to_numpy(array, value))


def empty(schema: pa.Schema) -> pa.Table:
    """A table of no rows with `schema`."""
    return pa.Table.from_arrays([pa.nulls(0, f.type) for f in schema], schema=schema)


def rows_to_table(rows: Sequence[dict[str, Any]], schema: pa.Schema | None = None) -> pa.Table:
    """Rows of JSON values as a table by pyarrow's JSON reader: a column per key in order of
    first appearance, a key missing from a row is null there, nested objects become struct
    columns; the fields of `schema` get its types, the others are inferred (ints and floats
    together make floats). Raises pa.ArrowInvalid where a key holds both text and numbers."""
    if not rows:
        return empty(schema or pa.schema([]))
    text = "".join(json.dumps(row) + "\n" for row in rows).encode()
    options = pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="infer")
    return pajson.read_json(pa.BufferReader(text), parse_options=options)


def strings(values: Sequence[str | None]) -> pa.Array:
    """Python strings (or None) as an Arrow string array."""
    return rows_to_table([{"v": v} for v in values], pa.schema([("v", pa.string())]))[
        "v"
    ].combine_chunks()


def groups(table: pa.Table, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Rows of `table` grouped by the values of `keys`: (order, starts), where `order` lists the
    rows sorted by the keys (ascending, nulls last, rows of one group in table order) and
    `starts` the positions in `order` at which each group begins. No keys: one group."""
    n = table.num_rows
    if not keys:
        return np.arange(n), np.zeros(min(n, 1), np.int64)
    # Arrow's sort is stable and puts nulls last.
    order = to_numpy(pc.sort_indices(table, sort_keys=[(k, "ascending") for k in keys]), 0)
    order = order.astype(np.int64)
    change = np.zeros(n, bool)
    change[:1] = True
    for key in keys:
        column = table[key]
        # Codes of equal values are equal, nulls included: adjacent rows of one group match.
        codes = to_numpy(pc.index_in(column, value_set=pc.unique(column)), -1)[order]
        change[1:] |= codes[1:] != codes[:-1]
    return order, np.flatnonzero(change)


def group_ids(starts: np.ndarray, n: int) -> np.ndarray:
    """For each of `n` sorted rows, the number of its group (groups begin at `starts`)."""
    ids = np.zeros(n, np.int64)
    ids[starts[1:]] = 1
    return np.cumsum(ids)
