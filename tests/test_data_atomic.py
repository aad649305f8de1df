"""Atomic-file writing: sanitising, clear errors for bad rows, no half-written files."""

import json

import pandas as pd
import pytest

from recbole_mm.errors import DataFormatError
from recbole_mm.data.atomic_files import format_cell, read_header, sanitize_text, write_atomic
from recbole_mm.files import read_jsonl, write_jsonl

FIELDS = [("item_id", "token"), ("title", "token_seq"), ("brand", "token"), ("price", "float")]


def read_like_recbole(path):
    """The call RecBole 1.2.1 makes in Dataset._load_feat."""
    return pd.read_csv(path, delimiter="\t", dtype=str, encoding="utf-8", engine="python")


def test_bad_text_is_sanitised_and_recbole_reads_every_row(tmp_path):
    rows = [
        {"item_id": "a1", "title": '"Quoted" start', "brand": "Tab\there", "price": 1.5},
        {"item_id": "a2", "title": "line\nbreak\r\nand\x00nul", "brand": 'say "hi"', "price": None},
        {"item_id": "a3", "title": "caf\u00e9 \ud800 surrogate", "brand": "\u2028sep", "price": "2"},
        {"item_id": "a4", "title": '"', "brand": None, "price": 3},
    ]
    path = tmp_path / "x.item"
    assert write_atomic(path, FIELDS, rows, required=["item_id"]) == 4
    df = read_like_recbole(path)
    assert list(df["item_id:token"]) == ["a1", "a2", "a3", "a4"]
    assert df.loc[0, "title:token_seq"] == "'Quoted' start"
    assert df.loc[0, "brand:token"] == "Tab here"
    assert df.loc[1, "title:token_seq"] == "line break and nul"
    assert df.loc[2, "title:token_seq"] == "caf\u00e9 \ufffd surrogate"
    assert list(df["price:float"].fillna("")) == ["1.5", "", "2", "3"]
    assert read_header(path) == FIELDS


def test_missing_required_field_names_file_row_field(tmp_path):
    rows = [{"item_id": "a1"}, {"title": "no id"}]
    with pytest.raises(DataFormatError) as e:
        write_atomic(tmp_path / "x.item", FIELDS, rows, required=["item_id"], source="input.json")
    msg = str(e.value)
    assert "input.json" in msg and "row 2" in msg and "'item_id'" in msg and "no id" in msg
    assert not (tmp_path / "x.item").exists()
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind


def test_bad_float_and_non_utf8_bytes_are_clear_errors(tmp_path):
    with pytest.raises(DataFormatError, match=r"row 1, field 'price': not a number \(value: 'cheap'\)"):
        write_atomic(tmp_path / "a.item", FIELDS, [("i", "t", "b", "cheap")])
    with pytest.raises(DataFormatError, match="not a finite number"):
        format_cell("inf", "float", field="price")
    with pytest.raises(DataFormatError, match=r"field 'title': bytes that are not UTF-8 at byte 3.*iconv"):
        write_atomic(tmp_path / "b.item", FIELDS, [("i", b"caf\xe9", "b", 1)])
    with pytest.raises(DataFormatError, match="expected 4 values, got 3"):
        write_atomic(tmp_path / "c.item", FIELDS, [("i", "t", "b")])
    assert list(tmp_path.iterdir()) == []


def test_existing_file_survives_a_failed_rewrite(tmp_path):
    path = tmp_path / "x.item"
    write_atomic(path, FIELDS, [("old", "t", "b", 1)])
    before = path.read_bytes()
    with pytest.raises(DataFormatError):
        write_atomic(path, FIELDS, [("new", "t", "b", 1), ("new2", "t", "b", "x")])
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["x.item"]


def test_sequences_and_unknown_type():
    assert format_cell(["a b", "c"], "token_seq") == "a_b c"
    assert format_cell([1, 2.5], "float_seq") == "1 2.5"
    assert sanitize_text("  x\ty  ") == "x y"
    with pytest.raises(DataFormatError, match="unknown RecBole field type 'text'"):
        format_cell("x", "text", field="f")


def test_jsonl_keeps_exact_text_and_reports_bad_lines(tmp_path):
    recs = [{"item_id": "a", "title": '"Quoted"\tTab\nNew line caf\u00e9'}]
    write_jsonl(tmp_path / "s.jsonl", recs)
    assert list(read_jsonl(tmp_path / "s.jsonl")) == recs
    (tmp_path / "bad.jsonl").write_bytes(b'{"item_id": "a"}\n{"item_id": \n')
    with pytest.raises(DataFormatError, match=r"bad.jsonl, row 2: not valid JSON"):
        list(read_jsonl(tmp_path / "bad.jsonl"))
    (tmp_path / "latin.jsonl").write_bytes(json.dumps({"t": "x"}).encode() + b"\n" + b'{"t": "caf\xe9"}\n')
    with pytest.raises(DataFormatError, match=r"latin.jsonl, row 2: bytes that are not UTF-8"):
        list(read_jsonl(tmp_path / "latin.jsonl"))


def test_jsonl_too_deep_or_too_long_numbers_are_clear_errors(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"item_id": "a"}\n{"item_id": "b", "x": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(DataFormatError, match=r"s.jsonl, row 2: nested too deeply for Python's json/ast parsers"):
        list(read_jsonl(path))
    path.write_text('{"item_id": "b", "n": ' + "7" * 5000 + "}\n")
    with pytest.raises(DataFormatError, match=r"s.jsonl, row 1, field 'n': an integer with 5000 digits: more than "
                                              r"the 4300 Python converts from text \(value: '777777777777...'\)"):
        list(read_jsonl(path))
