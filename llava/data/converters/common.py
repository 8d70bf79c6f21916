"""What every converter shares: reading inputs record by record, image paths, the report, the atomic writer.

- Reading streams JSON Lines and CSV/TSV row by row; a JSON file is one value and is parsed whole (a list, a
  dict of records such as GQA's question files, or a list / dict under `records_key`, such as TextVQA's
  `{"data": [...]}`). A `.json` file that holds JSON Lines is read as such, as training does.
- Every record carries its index (0-based, in input order) and, where there is one, its line number; a bad
  record raises `Skip` with a kind and a reason, and the report names file, index and line.
- Image paths are judged as training judges them (`llava.train.data.resolve_image`): relative to
  `--image_folder`, lexically, so `../` escapes and a symlinked sub-folder does not.
- Output is written to `OUT.tmp` and moved onto `OUT` at the end, so an interrupted run leaves no half file.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

FIRST_OFFENDERS = 10  # named in the summary


class Skip(Exception):
    """A record that cannot be converted; `kind` is a short name counted in the report."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind


@dataclass
class Item:
    """One input record: its position (index, line), the record and, for a dict of records, its key."""

    index: int
    record: object
    line: int | None = None
    key: str | None = None
    error: str | None = None  # a JSON Lines line that does not parse

    def where(self, path: str) -> str:
        line = f", line {self.line}" if self.line is not None else ""
        return f"{path}, record {self.index}{line}"


def json_object(item: Item) -> dict:
    """The item's record as a JSON object; raises Skip for a line that does not parse or is not an object."""
    if item.error:
        raise Skip("invalid_json", item.error)
    if not isinstance(item.record, dict):
        raise Skip("malformed", f"record is a {type(item.record).__name__}, not a JSON object")
    return item.record


def input_format(path: str, fmt: str = "auto") -> str:
    """json | jsonl | csv | tsv, from `fmt` or the file's extension."""
    if fmt != "auto":
        return fmt
    ext = os.path.splitext(path)[1].lower()
    known = {".json": "json", ".jsonl": "jsonl", ".csv": "csv", ".tsv": "tsv"}
    if ext not in known:
        raise ValueError(f"{path}: cannot tell the format from {ext!r}; give --format json|jsonl|csv|tsv")
    return known[ext]


def read_items(path: str, fmt: str = "auto", records_key: str | None = None) -> Iterator[Item]:
    """The records of `path` in order; JSON Lines and CSV/TSV are streamed. Errors that make the whole file
    unreadable (missing, not UTF-8, not JSON, wrong top-level type) raise ValueError / OSError naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    fmt = input_format(path, fmt)
    if fmt == "jsonl":
        yield from _jsonl_items(path)
    elif fmt in ("csv", "tsv"):
        yield from _table_items(path, "\t" if fmt == "tsv" else ",")
    else:
        yield from _json_items(path, records_key)


def _jsonl_items(path: str) -> Iterator[Item]:
    index = 0
    with open(path, encoding="utf-8-sig", newline="\n") as f:  # "\n" only: U+2028 may sit inside a JSON string
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield Item(index, json.loads(line), line=lineno)
            except json.JSONDecodeError as err:
                yield Item(index, None, line=lineno, error=f"not valid JSON ({err.msg}, column {err.colno})")
            index += 1


def _table_items(path: str, delimiter: str) -> Iterator[Item]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        if reader.fieldnames is None:
            return
        for index, row in enumerate(reader):
            yield Item(index, row, line=reader.line_num)


JSON_LINES = object()  # load_json's answer for a .json file that holds JSON Lines


def load_json(path: str):
    """The JSON value of `path`, or JSON_LINES when it holds one JSON object per line; ValueError naming it."""
    with open(path, encoding="utf-8-sig") as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        first = next((line for line in text.split("\n") if line.strip()), "")
        if err.msg == "Extra data" and first.lstrip().startswith("{"):
            return JSON_LINES
        raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from err


def _json_items(path: str, records_key: str | None) -> Iterator[Item]:
    value = load_json(path)
    if value is JSON_LINES:
        yield from _jsonl_items(path)
    else:
        yield from json_value_items(value, path, records_key)


def json_value_items(value, path: str, records_key: str | None = None) -> Iterator[Item]:
    """The records of a parsed JSON value: a list, an object of records, or either under `records_key`."""
    if records_key is not None:
        if not isinstance(value, dict) or records_key not in value:
            raise ValueError(f"{path}: --records_key {records_key!r} is not a key of the top-level JSON object")
        value = value[records_key]
    if isinstance(value, list):
        for index, record in enumerate(value):
            yield Item(index, record)
    elif isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
        for index, (key, record) in enumerate(value.items()):  # {question_id: record} (GQA)
            yield Item(index, record, key=str(key))
    else:
        keys = f" with keys {sorted(value)[:8]}" if isinstance(value, dict) else ""
        raise ValueError(f"{path}: expected a JSON list of records or an object of records, got "
                         f"{type(value).__name__}{keys} (name the list with --records_key)")


@dataclass
class Report:
    """Counts of one conversion: written records, skips by kind with the first offenders, fixes, groups."""

    path: str
    read: int = 0
    written: int = 0
    skipped: Counter = field(default_factory=Counter)
    fixes: Counter = field(default_factory=Counter)  # records changed but kept, by what was changed
    groups: Counter = field(default_factory=Counter)  # e.g. (image folder prefix, outcome)
    offenders: list = field(default_factory=list)
    skipped_log: object = None  # an open file: every skip as one JSON line

    def skip(self, item: Item, err: Skip) -> None:
        self.skipped[err.kind] += 1
        entry = {"index": item.index, "line": item.line, "kind": err.kind, "reason": str(err)}
        if len(self.offenders) < FIRST_OFFENDERS:
            self.offenders.append(f"{item.where(self.path)}: {err}")
        if self.skipped_log is not None:
            self.skipped_log.write(json.dumps(entry, ensure_ascii=False) + "\n")

    def summary(self, output: str | None, kept: str = "written") -> str:
        dest = "" if kept != "written" else f" to {output}" if output else " (dry run, nothing written)"
        lines = [f"{self.path}: {self.read} records read, {self.written} {kept}{dest}, "
                 f"{sum(self.skipped.values())} skipped"]
        lines += [f"  skipped {kind}: {n}" for kind, n in sorted(self.skipped.items())]
        lines += [f"  fixed ({what}): {n}" for what, n in sorted(self.fixes.items())]
        if self.groups:
            lines.append("  by image folder:")
            for group in sorted({g for g, _ in self.groups}):
                counts = ", ".join(f"{outcome} {n}" for (g, outcome), n in sorted(self.groups.items()) if g == group)
                lines.append(f"    {group}: {counts}")
        if self.offenders:
            lines.append(f"  first {len(self.offenders)} skipped:")
            lines += [f"    {o}" for o in self.offenders]
        return "\n".join(lines)


@dataclass
class ImagePaths:
    """Turns an image reference of the input into the path training reads: relative to `image_folder`.

    `fmt` (a `str.format` pattern, "{}" = as is) builds a path from a column value; `maps` replaces a leading
    folder (`coco/train2017` -> `/data/coco2017/train`); a relative result starts from `input_root` (default:
    `image_folder`). With `image_folder`, the file is checked by stat unless `check` is off; a missing file
    skips the record unless `keep_missing`."""

    image_folder: str | None = None
    input_root: str | None = None
    fmt: str = "{}"
    maps: list = field(default_factory=list)  # [(prefix, replacement)], longest prefix first
    check: bool = True
    keep_missing: bool = False

    def __post_init__(self):
        self.image_folder = os.path.abspath(self.image_folder) if self.image_folder else None
        self.input_root = os.path.abspath(self.input_root) if self.input_root else self.image_folder
        self.maps = sorted(((p.strip("/"), r) for p, r in self.maps), key=lambda m: -len(m[0]))

    def format(self, value) -> str:
        """The column value through `fmt` ("{:012d}" works on digit strings too)."""
        if value is None or value == "":
            raise Skip("missing_field", "no image")
        try:
            return self.fmt.format(value)
        except (ValueError, TypeError, IndexError, KeyError) as err:
            if isinstance(value, str) and value.isdigit():
                return self.fmt.format(int(value))
            raise Skip("malformed", f"--image_format {self.fmt!r} does not apply to {value!r}: {err}") from err

    def resolve(self, path: str, report: Report | None = None) -> str:
        """Input path -> output path (POSIX, relative to image_folder when given); raises Skip."""
        if not isinstance(path, str) or not path:
            raise Skip("malformed", f"'image' must be a non-empty path string, got {path!r}")
        for prefix, replacement in self.maps:
            if path == prefix or path.startswith(prefix + "/"):
                path = os.path.join(replacement, path[len(prefix):].lstrip("/"))
                break
        if self.image_folder is None:
            rel = os.path.normpath(path)
            if os.path.isabs(rel) or rel == ".." or rel.startswith("../"):
                raise Skip("escaping_image", f"image path {path!r} is absolute or leaves its folder; "
                                             "give --image_folder to make it relative")
            return rel.replace(os.sep, "/")
        full = os.path.normpath(os.path.join(self.input_root, path))
        if not full.startswith(os.path.join(self.image_folder, "")):
            raise Skip("escaping_image", f"image {full} is outside --image_folder {self.image_folder}")
        if self.check and not os.path.isfile(full):
            if not self.keep_missing:
                raise Skip("missing_image", f"image file not found: {full}")
            if report is not None:
                report.fixes["kept with missing image (--keep_missing)"] += 1
        return os.path.relpath(full, self.image_folder).replace(os.sep, "/")


class RecordWriter:
    """Writes records to `path` (`.jsonl`: one per line; otherwise a JSON list, one record per line) through
    `path.tmp`, moved onto `path` by `close()`; `path=None` writes nothing (dry run)."""

    def __init__(self, path: str | None):
        self.path, self.count = path, 0
        self.jsonl = bool(path) and path.lower().endswith(".jsonl")
        self.f = None
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.f = open(path + ".tmp", "w", encoding="utf-8")  # closed by close() or abort()
            if not self.jsonl:
                self.f.write("[")

    def write(self, record: dict) -> None:
        if self.f is not None:
            text = json.dumps(record, ensure_ascii=False)
            self.f.write(text + "\n" if self.jsonl else ("\n" if self.count == 0 else ",\n") + text)
        self.count += 1

    def close(self) -> None:
        if self.f is not None:
            if not self.jsonl:
                self.f.write("\n]\n")
            self.f.close()
            os.replace(self.path + ".tmp", self.path)

    def abort(self) -> None:
        if self.f is not None:
            self.f.close()
            os.remove(self.path + ".tmp")


def say(text: str) -> None:
    """Progress and summaries go to stderr, so stdout stays free."""
    sys.stderr.write(text + "\n")
