"""Prompt files of text-to-image BOOT distillation: plain text, JSON, JSON Lines, CSV and TSV.

The format follows the extension (case-insensitive):

* ``.json``: a list of strings; or a list of objects holding the prompt under ``column`` (by default the first of
  ``prompt``, ``caption``, ``text`` the first object has); or an object whose ``column`` key (``prompts`` by
  default) holds such a list.
* ``.jsonl``: one JSON string or object per line (objects as in ``.json``).
* ``.csv`` / ``.tsv``: a header row, then one prompt per row in the column named ``column``, by default the first
  of ``prompt``, ``caption``, ``text`` the header has (case-insensitive).
* anything else: plain text, one prompt per line.

Every prompt is stripped, and line breaks inside a JSON or CSV value become one space (a prompt is one line, as in
the plain-text format and in the sample sets written from it). Empty and whitespace-only entries are skipped and
counted. A file that is missing, not UTF-8 text (a UTF-8 BOM is fine), malformed, or left with no prompt raises a
one-line :class:`~vkd.errors.DataError`.

Examples:
    >>> pf = read_prompts("prompts.txt")  # doctest: +SKIP
    >>> pf.prompts[:2], pf.format, pf.skipped_empty  # doctest: +SKIP
    (('a handwritten seven', 'a red bicycle'), 'text', 1)
    >>> read_prompts("captions.csv", column="caption").column  # doctest: +SKIP
    'caption'
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vkd.data.digits import DIGIT_NAMES
from vkd.errors import DataError, UserError

__all__ = ["PromptFile", "read_prompts", "clean_captions", "DEFAULT_COLUMNS", "FORMATS", "DIGIT_CAPTION_TEMPLATES", "digit_captions",
           "digit_named_in"]

DEFAULT_COLUMNS = ("prompt", "caption", "text")  # tried in this order when no column is given
FORMATS = {".json": "json", ".jsonl": "jsonl", ".csv": "csv", ".tsv": "tsv"}  # any other extension: "text"

_BOM = b"\xef\xbb\xbf"
# Any run of line breaks (with the blanks around it) inside one value: the prompt stays one line.
_LINE_BREAKS = re.compile(r"\s*[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]+\s*")


@dataclass(frozen=True)
class PromptFile:
    """The prompts read from one prompt file.

    Attributes:
        prompts: stripped, non-empty prompts, in file order.
        source: the path as given.
        skipped_empty: empty or whitespace-only entries skipped.
        format: ``"text"``, ``"json"``, ``"jsonl"``, ``"csv"`` or ``"tsv"``.
        column: the column or key the prompts were read from; ``None`` for plain text and lists of strings.
    """

    prompts: tuple[str, ...]
    source: str
    skipped_empty: int
    format: str
    column: str | None


def read_prompts(path: str | Path, column: str | None = None) -> PromptFile:
    """Read the prompts of a text, JSON, JSON Lines, CSV or TSV file (the format follows the extension).

    Args:
        path: the prompt file.
        column: the CSV/TSV column, or the JSON key, holding the prompts; ``None`` tries ``prompt``, ``caption``
            and ``text`` (and ``prompts`` for a JSON object at the top level). Plain-text files and JSON lists of
            strings have no columns and ignore it.

    Returns:
        The prompts, how many empty entries were skipped, the format and the column read.

    Raises:
        DataError: the file is missing, a directory, not UTF-8 text, malformed, has no such column, holds a
            non-string entry, or has no prompt left.
    """
    source = str(path)
    fmt = FORMATS.get(Path(source).suffix.lower(), "text")
    text = _read_text(source)
    if fmt == "json":
        raw, col = _json_prompts(source, text, column)
    elif fmt == "jsonl":
        raw, col = _jsonl_prompts(source, text, column)
    elif fmt in ("csv", "tsv"):
        raw, col = _csv_prompts(source, text, column, "\t" if fmt == "tsv" else ",")
    else:
        raw, col = _lines(text), None
    prompts, skipped = _clean(raw)
    if not prompts:
        what = "lines" if fmt in ("text", "jsonl") else "entries"
        raise DataError(f"{source} has no prompts ({skipped} empty {what} skipped)")
    return PromptFile(prompts=prompts, source=source, skipped_empty=skipped, format=fmt, column=col)


def clean_captions(prompts: Sequence[str]) -> list[str]:
    """DeepFloyd IF's caption cleaning, as its pipeline applies it by default (``clean_caption=True``).

    Uses diffusers' own ``IFPipeline`` preprocessing (lower case; URLs, HTML, @names, CJK, ids and file names
    removed; dashes and quotes normalised; ``ftfy``), so prompts reach an IF teacher as they do in diffusers.

    Args:
        prompts: raw prompts.

    Returns:
        The cleaned prompts, same order (a prompt may become empty).

    Raises:
        UserError: ``beautifulsoup4`` or ``ftfy`` is not installed (``pip install 'vkd[if]'``).
    """
    import importlib.util

    missing = [mod for mod, name in (("bs4", "beautifulsoup4"), ("ftfy", "ftfy")) if importlib.util.find_spec(mod) is None]
    if missing:
        raise UserError(f"IF caption cleaning needs {' and '.join(missing)}: pip install 'vkd[if]' (or set "
                        "teacher.clean_captions=false and pass cleaned prompts)")
    from diffusers import IFPipeline

    pipe = IFPipeline.__new__(IFPipeline)  # the preprocessing reads class attributes only; no weights
    return list(pipe._text_preprocessing(list(prompts), clean_caption=True))


def _read_text(source: str) -> str:
    path = Path(source)
    if not path.exists():
        raise DataError(f"prompt file {source} does not exist")
    if path.is_dir():
        raise DataError(f"prompt file {source} is a directory, not a file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read prompt file {source}: {e.strerror or e}") from e
    bom = len(_BOM) if data.startswith(_BOM) else 0
    nul = data.find(b"\x00")
    try:
        text = data[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = bom + e.start
        if 0 <= nul < offset:  # report the first fault of the file
            raise DataError(f"{source} is not a UTF-8 text file (NUL byte at offset {nul})") from None
        raise DataError(f"{source} is not a UTF-8 text file (byte 0x{data[offset]:02x} at offset {offset}: "
                        f"{e.reason})") from None
    if nul >= 0:  # valid UTF-8, but binary (or UTF-16/32) all the same
        raise DataError(f"{source} is not a UTF-8 text file (NUL byte at offset {nul})")
    return text


def _lines(text: str) -> list[str]:
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if lines[-1] == "":  # the file's final newline ends the last line; it is no empty line
        lines.pop()
    return lines


def _clean(raw: Iterable[str]) -> tuple[tuple[str, ...], int]:
    prompts, skipped = [], 0
    for entry in raw:
        prompt = _LINE_BREAKS.sub(" ", entry).strip()
        if prompt:
            prompts.append(prompt)
        else:
            skipped += 1
    return tuple(prompts), skipped


def _find_key(keys: Iterable[str], wanted: Iterable[str]) -> str | None:
    """The first of ``wanted`` among ``keys``: an exact match, else a case-insensitive one."""
    keys = list(keys)
    for name in wanted:
        if name in keys:
            return name
        for key in keys:
            if key.strip().lower() == name.strip().lower():
                return key
    return None


def _names(keys: Iterable[Any], limit: int = 12) -> str:
    keys = [str(k) for k in keys]
    shown = ", ".join(repr(k) for k in keys[:limit])
    return (shown + f", … ({len(keys)} in all)" if len(keys) > limit else shown) or "none"


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, list):
        return "a list"
    return "an object" if isinstance(value, dict) else type(value).__name__


def _json_error(source: str, e: json.JSONDecodeError, line: int | None = None) -> DataError:
    where = f"line {line}, column {e.colno}" if line is not None else f"line {e.lineno}, column {e.colno}"
    return DataError(f"{source} is not valid JSON: {e.msg} ({where})")


class _Entries:
    """Turns JSON values into prompt strings; the key of objects is chosen once, from the first object."""

    def __init__(self, source: str, column: str | None):
        self.source, self.column, self.key = source, column, None

    def prompt(self, value: Any, where: str) -> str:
        if isinstance(value, str):
            return value
        if not isinstance(value, dict):
            raise DataError(f"{self.source}: {where} is {_json_type(value)}, not a prompt string or an object")
        if self.key is None:
            wanted = [self.column] if self.column is not None else list(DEFAULT_COLUMNS)
            self.key = _find_key(value.keys(), wanted)
            if self.key is None:
                looked = repr(self.column) if self.column is not None else "'prompt', 'caption' or 'text'"
                raise DataError(f"{self.source}: {where} has no key {looked} (keys: {_names(value.keys())}); "
                                "pass the key to read as the prompt column")
        if self.key not in value:
            raise DataError(f"{self.source}: {where} has no key {self.key!r} (keys: {_names(value.keys())})")
        prompt = value[self.key]
        if not isinstance(prompt, str):
            raise DataError(f"{self.source}: {where} has {_json_type(prompt)} under {self.key!r}, not a prompt string")
        return prompt


def _json_prompts(source: str, text: str, column: str | None) -> tuple[list[str], str | None]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise _json_error(source, e) from None
    list_key = None
    if isinstance(data, dict):
        # The given column names the list (or the key of its objects, when the list is under "prompts").
        list_key = _find_key(data.keys(), [column] if column is not None else []) or _find_key(data.keys(), ["prompts"])
        if list_key is None:
            looked = f"{column!r} or 'prompts'" if column is not None else "'prompts'"
            raise DataError(f"{source}: the JSON object has no key {looked} holding the prompt list "
                            f"(keys: {_names(data.keys())})")
        data = data[list_key]
    if not isinstance(data, list):
        where = f"the value of {list_key!r}" if list_key is not None else "the file"
        raise DataError(f"{source}: {where} is {_json_type(data)}, not a list of prompts")
    entries = _Entries(source, column)
    raw = [entries.prompt(value, f"entry {i}") for i, value in enumerate(data)]
    return raw, entries.key or list_key


def _jsonl_prompts(source: str, text: str, column: str | None) -> tuple[list[str], str | None]:
    entries = _Entries(source, column)
    raw = []
    for number, line in enumerate(_lines(text), start=1):
        if not line.strip():
            raw.append("")  # counted as an empty line
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise _json_error(source, e, line=number) from None
        raw.append(entries.prompt(value, f"line {number}"))
    return raw, entries.key


def _csv_prompts(source: str, text: str, column: str | None, delimiter: str) -> tuple[list[str], str | None]:
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    try:
        header = next(reader, None)
        if header is None:  # an empty file: no header, no prompts
            return [], column
        header = [name.strip() for name in header]
        wanted = [column] if column is not None else list(DEFAULT_COLUMNS)
        name = _find_key(header, wanted)
        if name is None:
            looked = f"column {column!r}" if column is not None else "column 'prompt', 'caption' or 'text'"
            raise DataError(f"{source} has no {looked} (columns: {_names(header)}); pass the column to read")
        index = header.index(name)
        # A short row (a blank line, a ragged row) has no value in the column: an empty entry.
        raw = [row[index] if index < len(row) else "" for row in reader]
    except csv.Error as e:
        kind = "TSV" if delimiter == "\t" else "CSV"
        raise DataError(f"{source} is not valid {kind}: {e} (line {reader.line_num})") from None
    return raw, name


# ----------------------------------------------------------------------------------------------
# captions of the embedded text-to-image teacher (digits)
# ----------------------------------------------------------------------------------------------

# {word}: the digit's English name ("seven"), {d}: its numeral ("7"). Each template is a different way of asking
# for the same digit, so the teacher must read the digit out of varied wording, as a text-to-image model does.
DIGIT_CAPTION_TEMPLATES = (
    "a handwritten {word}",
    "the digit {d}",
    "the number {word}, thick strokes",
    "a small grey picture of a {word}",
    "digit {d}, written by hand",
    "a sketch of the numeral {d}",
    "{word}",
    "a blurry {word} on a dark background",
    "the handwritten number {d}",
    "an image of the digit {word}",
)
_NUMERAL = re.compile(r"(?<![0-9])[0-9](?![0-9])")


def digit_captions(digit: int, names: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """Every caption of one digit, in :data:`DIGIT_CAPTION_TEMPLATES` order (``"a handwritten seven"``, ...)."""
    names = names or DIGIT_NAMES
    return tuple(t.format(word=names[digit], d=digit) for t in DIGIT_CAPTION_TEMPLATES)


def digit_named_in(prompt: str) -> int | None:
    """The one digit a prompt names, as a word (``seven``) or a lone numeral (``7``); ``None`` for none or several.

    Examples:
        >>> digit_named_in("a handwritten seven"), digit_named_in("the digit 7"), digit_named_in("a red bicycle")
        (7, 7, None)
    """
    words = re.findall(r"[a-z]+", prompt.lower())
    found = {DIGIT_NAMES.index(w) for w in words if w in DIGIT_NAMES}
    found |= {int(m) for m in _NUMERAL.findall(prompt)}
    return found.pop() if len(found) == 1 else None
