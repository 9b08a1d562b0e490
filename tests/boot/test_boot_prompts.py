"""Prompt files of text-to-image BOOT: every format, encodings, empty entries and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vkd.boot.data import PromptFile, read_prompts
from vkd.errors import DataError, UserError


def _write(path: Path, data: str | bytes) -> Path:
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)
    return path


def _error(path: Path, column: str | None = None) -> str:
    with pytest.raises(DataError) as info:
        read_prompts(path, column)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message, f"not one line: {message!r}"
    assert isinstance(info.value, UserError)
    return message


# --- plain text ---------------------------------------------------------------------------------------------


def test_text_one_prompt_per_line_stripped_in_order(tmp_path):
    path = _write(tmp_path / "prompts.txt", "  a handwritten seven \nan oil painting of a fox\n\ta red bicycle\n")
    pf = read_prompts(path)
    assert pf == PromptFile(prompts=("a handwritten seven", "an oil painting of a fox", "a red bicycle"),
                            source=str(path), skipped_empty=0, format="text", column=None)


def test_text_empty_lines_are_counted_and_final_newline_is_not(tmp_path):
    path = _write(tmp_path / "p.txt", "\none\n\n   \ntwo\n\t\nthree")
    pf = read_prompts(path)
    assert pf.prompts == ("one", "two", "three")
    assert pf.skipped_empty == 4  # the leading, two middle and the tab-only line
    assert read_prompts(_write(tmp_path / "q.txt", "one\ntwo\n")).skipped_empty == 0
    assert read_prompts(_write(tmp_path / "r.txt", "one\ntwo\n\n")).skipped_empty == 1


def test_text_crlf_and_bom(tmp_path):
    path = _write(tmp_path / "win.txt", b"\xef\xbb\xbfa cat\r\n\r\na dog\r\nold mac line\rlast\r\n")
    pf = read_prompts(path)
    assert pf.prompts == ("a cat", "a dog", "old mac line", "last")
    assert pf.skipped_empty == 1
    assert not pf.prompts[0].startswith("\ufeff")


def test_unknown_extension_is_plain_text_and_source_is_path_as_given(tmp_path):
    path = _write(tmp_path / "prompts.list", "x\ny\n")
    pf = read_prompts(str(path))
    assert pf.format == "text" and pf.prompts == ("x", "y") and pf.source == str(path)
    assert read_prompts(_write(tmp_path / "P.JSON", '["upper"]')).format == "json"  # extensions case-insensitive


def test_unicode_prompts_survive(tmp_path):
    path = _write(tmp_path / "u.txt", "un café à Paris\n東京の夜景 🌃\n")
    assert read_prompts(path).prompts == ("un café à Paris", "東京の夜景 🌃")


# --- JSON / JSON Lines ---------------------------------------------------------------------------------------


def test_json_list_of_strings(tmp_path):
    path = _write(tmp_path / "p.json", json.dumps(["a", "  b  ", "", "two\nlines", "   "]))
    pf = read_prompts(path)
    assert pf.prompts == ("a", "b", "two lines")
    assert pf.skipped_empty == 2 and pf.format == "json" and pf.column is None


def test_json_list_of_objects_default_keys(tmp_path):
    path = _write(tmp_path / "p.json", json.dumps([{"id": 1, "caption": "x"}, {"id": 2, "caption": "y\r\nz"}]))
    pf = read_prompts(path)
    assert pf.prompts == ("x", "y z") and pf.column == "caption"
    # "prompt" wins over "caption" and "text"
    path = _write(tmp_path / "q.json", json.dumps([{"text": "t", "prompt": "p", "caption": "c"}]))
    assert read_prompts(path).prompts == ("p",)


def test_json_object_with_prompts_key_and_column(tmp_path):
    path = _write(tmp_path / "p.json", json.dumps({"name": "set", "prompts": ["a", "b"]}))
    pf = read_prompts(path)
    assert pf.prompts == ("a", "b") and pf.column == "prompts"
    path = _write(tmp_path / "q.json", json.dumps({"prompts": ["not me"], "negatives": ["blurry", "dark"]}))
    pf = read_prompts(path, column="negatives")
    assert pf.prompts == ("blurry", "dark") and pf.column == "negatives"
    path = _write(tmp_path / "r.json", json.dumps({"prompts": [{"prompt": "p", "alt": "a"}]}))
    assert read_prompts(path, column="alt").prompts == ("a",)


def test_json_column_honoured_for_objects(tmp_path):
    rows = [{"prompt": "p1", "negative": "n1"}, {"prompt": "p2", "negative": "n2"}]
    path = _write(tmp_path / "p.json", json.dumps(rows))
    assert read_prompts(path).prompts == ("p1", "p2")
    pf = read_prompts(path, column="negative")
    assert pf.prompts == ("n1", "n2") and pf.column == "negative"


@pytest.mark.parametrize("entry, kind", [(7, "number"), (None, "null"), (True, "boolean"), (["x"], "list")])
def test_json_non_string_entry_names_index(tmp_path, entry, kind):
    path = _write(tmp_path / "p.json", json.dumps(["fine", "also fine", entry]))
    message = _error(path)
    assert "entry 2" in message and kind in message and str(path) in message


def test_json_non_string_value_under_key_names_index(tmp_path):
    path = _write(tmp_path / "p.json", json.dumps([{"prompt": "ok"}, {"prompt": None}]))
    message = _error(path)
    assert "entry 1" in message and "null" in message


def test_json_object_without_key_lists_keys(tmp_path):
    message = _error(_write(tmp_path / "p.json", json.dumps([{"id": 1, "title": "x"}])))
    assert "entry 0" in message and "'id'" in message and "'title'" in message
    message = _error(_write(tmp_path / "q.json", json.dumps({"items": ["a"]})))
    assert "'prompts'" in message and "'items'" in message
    message = _error(_write(tmp_path / "r.json", json.dumps("just a string")))
    assert "not a list" in message


def test_json_malformed_reports_line_and_column(tmp_path):
    message = _error(_write(tmp_path / "p.json", '[\n  "a",\n  "b"\n  "c"\n]'))
    assert "not valid JSON" in message and "line 4, column 3" in message


def test_json_empty_list_has_no_prompts(tmp_path):
    message = _error(_write(tmp_path / "p.json", '["", "  "]'))
    assert message == f"{tmp_path / 'p.json'} has no prompts (2 empty entries skipped)"


def test_jsonl_strings_and_objects(tmp_path):
    lines = ['"a plain string"', "", '{"prompt": "an object"}', "   ", '{"prompt": "  "}', '{"prompt": "x\\ny"}']
    path = _write(tmp_path / "p.jsonl", "\r\n".join(lines) + "\r\n")
    pf = read_prompts(path)
    assert pf.prompts == ("a plain string", "an object", "x y")
    assert pf.skipped_empty == 3 and pf.format == "jsonl" and pf.column == "prompt"


def test_jsonl_errors_name_the_line(tmp_path):
    message = _error(_write(tmp_path / "p.jsonl", '"a"\n{"prompt": "b"\n'))
    assert "not valid JSON" in message and "line 2" in message
    message = _error(_write(tmp_path / "q.jsonl", '"a"\n\n42\n'))
    assert "line 3" in message and "number" in message


# --- CSV / TSV -----------------------------------------------------------------------------------------------


def test_csv_default_column_case_insensitive_quoted_newlines(tmp_path):
    text = 'id,Caption,score\r\n1,"a cat, sitting",0.5\r\n2,"two\r\nlines",0.1\r\n3,,0.2\r\n4,  spaced  ,0\r\n'
    pf = read_prompts(_write(tmp_path / "c.csv", text))
    assert pf.prompts == ("a cat, sitting", "two lines", "spaced")
    assert pf.skipped_empty == 1 and pf.format == "csv" and pf.column == "Caption"


def test_csv_prefers_prompt_then_caption_then_text(tmp_path):
    pf = read_prompts(_write(tmp_path / "c.csv", "text,caption,prompt\nt,c,p\n"))
    assert pf.prompts == ("p",) and pf.column == "prompt"
    pf = read_prompts(_write(tmp_path / "d.csv", "TEXT,caption\nt,c\n"))
    assert pf.prompts == ("c",) and pf.column == "caption"


def test_csv_column_argument_honoured(tmp_path):
    path = _write(tmp_path / "c.csv", "prompt,negative\np1,n1\np2,n2\n")
    pf = read_prompts(path, column="negative")
    assert pf.prompts == ("n1", "n2") and pf.column == "negative"


def test_csv_unknown_column_lists_columns(tmp_path):
    path = _write(tmp_path / "c.csv", "id,title,url\n1,x,y\n")
    message = _error(path)
    assert all(name in message for name in ("'id'", "'title'", "'url'")) and "prompt" in message
    message = _error(path, column="description")
    assert "'description'" in message and "'title'" in message


def test_csv_blank_and_short_rows_are_empty(tmp_path):
    pf = read_prompts(_write(tmp_path / "c.csv", "id,prompt\n1,a\n\n2\n3,b\n"))
    assert pf.prompts == ("a", "b") and pf.skipped_empty == 2


def test_tsv(tmp_path):
    path = _write(tmp_path / "c.TSV", b"\xef\xbb\xbfprompt\tseed\r\na photo, of a dog\t1\r\n\t2\r\nsecond\t3\r\n")
    pf = read_prompts(path)
    assert pf.prompts == ("a photo, of a dog", "second")
    assert pf.format == "tsv" and pf.column == "prompt" and pf.skipped_empty == 1


def test_csv_header_only_has_no_prompts(tmp_path):
    message = _error(_write(tmp_path / "c.csv", "prompt\n"))
    assert "has no prompts" in message


# --- unreadable files ----------------------------------------------------------------------------------------


def test_non_utf8_bytes(tmp_path):
    path = _write(tmp_path / "bad.txt", b"\xff\xfe\x00a")
    message = _error(path)
    assert message.startswith(f"{path} is not a UTF-8 text file (") and "offset 0" in message


def test_invalid_byte_offset_is_reported(tmp_path):
    message = _error(_write(tmp_path / "latin1.txt", "a café\n".encode("latin-1")))
    assert "0xe9" in message and "offset 5" in message  # "a caf" is 5 bytes


def test_png_header(tmp_path):
    png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x02\x00\x00\x00"
    for name in ("image.png", "image.txt", "image.csv", "image.json"):
        message = _error(_write(tmp_path / name, png))
        assert "is not a UTF-8 text file" in message and "offset 0" in message


def test_nul_bytes_in_valid_utf8(tmp_path):
    message = _error(_write(tmp_path / "nul.txt", b"fine\nbad\x00line\n"))
    assert "is not a UTF-8 text file" in message and "NUL byte at offset 8" in message
    message = _error(_write(tmp_path / "utf16.txt", "hello\n".encode("utf-16-le")))
    assert "NUL byte at offset 1" in message


@pytest.mark.parametrize("content", [b"", b"   \n\n\t\n", b"\xef\xbb\xbf", b"\r\n\r\n"])
def test_empty_and_whitespace_only_files(tmp_path, content):
    path = _write(tmp_path / "empty.txt", content)
    message = _error(path)
    assert message.startswith(f"{path} has no prompts (") and "empty lines skipped" in message
    skipped = {b"": 0, b"   \n\n\t\n": 3, b"\xef\xbb\xbf": 0, b"\r\n\r\n": 2}[content]
    assert f"({skipped} empty lines skipped)" in message


@pytest.mark.parametrize("name", ["empty.json", "empty.jsonl", "empty.csv", "empty.tsv"])
def test_empty_structured_files(tmp_path, name):
    message = _error(_write(tmp_path / name, b""))
    assert "has no prompts" in message or "not valid JSON" in message


def test_missing_file_and_directory(tmp_path):
    message = _error(tmp_path / "nope.txt")
    assert "does not exist" in message and "nope.txt" in message
    message = _error(tmp_path)
    assert "directory" in message
