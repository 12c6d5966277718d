"""Streaming readers the standard library lacks, for prepare.py's converters (published.py):

- `open_zip`: a zip given whole or as byte pieces (`..._partaa` + `..._partab`), read in place as one seekable
  stream: zipfile needs to seek in the whole archive, and no stdlib reader joins files.
- `CsvIndex`: a CSV too large to hold (OpenVid-1M's 1M captions) as a compact index from one column to the
  byte offset of its row; rows are re-read on demand with the csv module (quoted newlines included).
- `parquet_rows`: rows from a given row on, by row group, the groups before it unread.
- `json_array`: the elements of a large JSON array (LLaVA-Video's annotation files) one at a time, with the
  byte span of each, so that an element can be re-read later without holding the file; neither the stdlib's
  json nor ijson gives those offsets.
"""

import bisect
import codecs
import csv
import io
import itertools
import json
import os
import re
import zipfile
from array import array

import numpy as np
import pyarrow.parquet as pq


class Concat(io.RawIOBase):
    """Files read as one seekable stream (the byte pieces of a split zip are its concatenation)."""

    def __init__(self, paths):
        super().__init__()
        self.parts = [open(p, "rb") for p in paths]
        self.starts = list(itertools.accumulate([os.path.getsize(p) for p in paths], initial=0))
        self.pos = 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, offset, whence=io.SEEK_SET):
        self.pos = (offset, self.pos + offset, self.starts[-1] + offset)[whence]
        return self.pos

    def readinto(self, b):
        i = bisect.bisect_right(self.starts, self.pos) - 1
        if i >= len(self.parts):
            return 0
        self.parts[i].seek(self.pos - self.starts[i])
        n = self.parts[i].readinto(memoryview(b)[:self.starts[i + 1] - self.pos])
        self.pos += n
        return n

    def close(self):
        for p in self.parts:
            p.close()
        super().close()


def open_zip(pieces):
    """A ZipFile over one .zip or over the byte pieces of one (in order)."""
    if len(pieces) == 1:
        return zipfile.ZipFile(pieces[0])
    return zipfile.ZipFile(io.BufferedReader(Concat(pieces), 1 << 20))


def csv_header(path):
    """The column names of a CSV file (a UTF-8 byte-order mark and surrounding spaces removed)."""
    with open(path, "rb") as f:
        return [h.strip() for h in next(csv.reader([f.readline().decode("utf-8-sig")]), [])]


class CsvIndex:
    """A CSV as a compact index from the values of `column` to rows: per row a 64-bit hash of the value, the
    row's byte offset and its number, sorted by hash (20 bytes a row), and a `seen` flag by row number (1 byte).
    `find` re-reads the candidate rows from their offsets, which also settles hash collisions."""

    def __init__(self, path, column):
        self.header = csv_header(path)
        if column not in self.header:
            raise ValueError(f"{path}: no column {column!r} (columns: {self.header})")
        self.file, self.column = open(path, "rb"), column
        self.file.readline()
        self.start, col = self.file.tell(), self.header.index(column)
        hashes, offsets, rows, n = array("q"), array("q"), array("i"), 0
        for r, offset, fields in self.records():
            n += 1
            if len(fields) == len(self.header):
                hashes.append(hash(fields[col]))
                offsets.append(offset)
                rows.append(r)
        order = np.argsort(np.frombuffer(hashes, np.int64), kind="stable")
        self.hashes = np.frombuffer(hashes, np.int64)[order]
        self.offsets, self.rows = np.frombuffer(offsets, np.int64)[order], np.frombuffer(rows, np.int32)[order]
        self.seen = np.zeros(n, dtype=bool)

    def records(self):
        """(row number, byte offset, fields) of each non-blank record after the header."""
        self.file.seek(self.start)
        pos = self.start

        def lines():
            nonlocal pos
            for line in self.file:
                pos += len(line)
                yield line.decode("utf-8", errors="replace")

        reader, r = csv.reader(lines()), 0
        while True:
            offset = pos
            fields = next(reader, None)
            if fields is None:
                return
            if fields:
                yield r, offset, fields
                r += 1

    def find(self, value):
        """(row number, {column: value}) of the first row whose `column` is `value`, or None."""
        h = hash(value)
        for i in range(np.searchsorted(self.hashes, h), np.searchsorted(self.hashes, h, "right")):
            self.file.seek(self.offsets[i])
            fields = next(csv.reader(line.decode("utf-8", "replace") for line in self.file))
            row = dict(zip(self.header, fields))
            if row[self.column] == value:
                return int(self.rows[i]), row
        return None

    def close(self):
        self.file.close()


JSON_SEPARATORS = re.compile(r"[ \t\n\r,]*")


def json_array(path, chunk=1 << 22):
    """(byte offset, byte length, element) for each element of the JSON array in `path`, read chunk by chunk."""
    decoder, utf8 = json.JSONDecoder(), codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as f:
        buf, i, at, eof, opened = "", 0, 0, False, False  # at: the byte offset of buf[i]
        while True:
            j = JSON_SEPARATORS.match(buf, i).end()  # JSON whitespace and commas: one byte each
            i, at = j, at + j - i
            if i < len(buf) and not opened:
                if buf[i] == "\ufeff":  # a byte-order mark (3 bytes in UTF-8), as some editors write
                    i, at = i + 1, at + 3
                    continue
                if buf[i] != "[":
                    raise ValueError(f"{path} is not a JSON array")
                i, at, opened = i + 1, at + 1, True
                continue
            if i < len(buf) and buf[i] == "]":
                return
            if i < len(buf):
                try:
                    element, j = decoder.raw_decode(buf, i)
                    whole = j < len(buf) or eof or isinstance(element, (dict, list))  # not a number cut short
                except json.JSONDecodeError:
                    if eof:
                        raise
                    whole = False
                if whole:
                    n = len(buf[i:j].encode())
                    yield at, n, element
                    i, at = j, at + n
                    continue
            if eof:
                raise ValueError(f"{path}: the JSON array is not closed")
            data = f.read(chunk)
            eof = not data
            buf, i = buf[i:] + utf8.decode(data, final=eof), 0


def read_span(f, offset, length):
    """The JSON value at a byte span of an open file (see json_array)."""
    f.seek(offset)
    return json.loads(f.read(length))


def parquet_rows(path, first, columns, batch_size=64):
    """(row number, {column: value}) from row `first` on, read by row group (those before `first` are skipped
    unread) in batches; `columns` the file lacks are absent from the dicts."""
    pf = pq.ParquetFile(path)
    groups, row = [], 0
    for g in range(pf.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if groups or row + n > first:
            groups.append(g)
        else:
            row += n
    names = [c for c in columns if c in pf.schema_arrow.names]
    for batch in pf.iter_batches(batch_size=batch_size, row_groups=groups, columns=names):
        for values in batch.to_pylist():
            if row >= first:
                yield row, values
            row += 1
