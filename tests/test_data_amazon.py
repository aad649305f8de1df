"""Amazon 2014 converter on small files written in the original formats."""

import gzip
import json

import pandas as pd
import pytest

from recbole_mm.data.amazon import convert_amazon, flatten_categories, kcore_filter, read_meta, read_reviews
from recbole_mm.errors import DataFormatError
from recbole_mm.files import read_jsonl
from recbole_mm.data.cli import main


def write_gz(path, lines):
    with gzip.open(path, "wb") as f:
        for line in lines:
            f.write((line if isinstance(line, bytes) else line.encode("utf-8")) + b"\n")
    return path


def review(user, item, t, rating=5.0):
    return json.dumps({"reviewerID": user, "asin": item, "overall": rating, "unixReviewTime": t,
                       "reviewText": "great\tproduct\n", "summary": "ok"})


def meta_line(asin, **kw):
    # the 2014 meta files hold Python dict literals (single quotes), not JSON
    return repr({"asin": asin, **kw})


def grid_reviews():
    """5 users x 5 items (all pairs), plus a user 'u_x' with 5 reviews of which 4 are of item 'i_rare'
    ... reviewed by nobody else: the 5-core removes i_rare, then u_x (left with 1), a cascade."""
    rows = []
    for u in range(5):
        for k, i in enumerate(range(5)):
            # equal times for items 3 and 4 of each user: file order must be kept
            t = 1000 + 10 * min(k, 3) + u
            rows.append((f"u{u}", f"i{i}", t))
    rows += [("u_x", "i0", 1)] + [("u_x", "i_rare", 2 + k) for k in range(4)]
    return rows


def test_kcore_is_iterative():
    pairs = [(u, i) for u, i, _ in grid_reviews()]
    keep = kcore_filter(pairs, 5, 5)
    kept = [p for p, k in zip(pairs, keep) if k]
    assert len(kept) == 25
    assert {u for u, _ in kept} == {f"u{u}" for u in range(5)}
    # one pass only would keep u_x's i0 review: u_x has 5 reviews before i_rare goes
    assert ("u_x", "i0") not in kept
    # a chain: removing the rare item drops a user, which drops another item below 2
    chain = [("a", "x"), ("a", "y"), ("b", "y"), ("b", "z"), ("c", "z"), ("c", "x"), ("d", "w")]
    assert kcore_filter(chain, 2, 2) == [True] * 6 + [False]
    assert kcore_filter([("a", "x"), ("a", "y"), ("b", "y")], 2, 2) == [False, False, False]


def test_convert_reviews_json_gz(tmp_path):
    reviews = write_gz(tmp_path / "reviews_Beauty_5.json.gz", [review(u, i, t) for u, i, t in grid_reviews()])
    meta = write_gz(tmp_path / "meta_Beauty.json.gz", [
        meta_line("i0", title='Lipstick "Red"\tNo. 5', price=7.99, brand="L'Oreal",
                  categories=[["Beauty", "Makeup", "Lips"], ["Beauty", "Gifts"]],
                  imUrl="http://example.com/i0.jpg", salesRank={"Beauty": 1}),
        meta_line("i1", title="Cream", categories=[["Beauty"]], imUrl="http://example.com/i1.jpg"),
        meta_line("i_rare", title="gone"),
        meta_line("unrelated", title="not reviewed"),
    ])
    folder = convert_amazon(reviews, meta, "beautymini", tmp_path / "out")
    inter = pd.read_csv(folder / "beautymini.inter", sep="\t", dtype=str, engine="python")
    assert inter.columns.tolist() == ["user_id:token", "item_id:token", "rating:float", "timestamp:float"]
    assert len(inter) == 25 and inter["user_id:token"].nunique() == 5 and inter["item_id:token"].nunique() == 5
    u0 = inter[inter["user_id:token"] == "u0"]
    assert u0["item_id:token"].tolist() == ["i0", "i1", "i2", "i3", "i4"]  # ties (i3, i4) in file order
    assert u0["timestamp:float"].astype(float).is_monotonic_increasing
    side = {r["item_id"]: r for r in read_jsonl(folder / "beautymini.items.jsonl")}
    assert set(side) == {"i0", "i1", "i2", "i3", "i4"}
    assert side["i0"] == {"item_id": "i0", "title": 'Lipstick "Red"\tNo. 5', "price": 7.99, "brand": "L'Oreal",
                          "categories": "Beauty > Makeup > Lips | Beauty > Gifts",
                          "imUrl": "http://example.com/i0.jpg"}
    assert side["i2"] == {"item_id": "i2"}  # no metadata: no attributes, not an error
    item = pd.read_csv(folder / "beautymini.item", sep="\t", dtype=str, engine="python", index_col=0)
    assert item.loc["i0", "title:token_seq"] == "Lipstick 'Red' No. 5"
    assert item.loc["i0", "price:float"] == "7.99"
    meta_json = json.loads((folder / "beautymini.meta.json").read_text())
    assert (meta_json["n_users"], meta_json["n_items"], meta_json["n_interactions"]) == (5, 5, 25)


def test_convert_ratings_csv(tmp_path):
    csv = tmp_path / "ratings_Beauty.csv"
    csv.write_text("".join(f"{u},{i},4.0,{t}\n" for u, i, t in grid_reviews()))
    meta = write_gz(tmp_path / "meta_Beauty.json.gz", [meta_line("i0", title="x")])
    folder = convert_amazon(csv, meta, "r", tmp_path)
    assert len(pd.read_csv(folder / "r.inter", sep="\t")) == 25
    assert read_reviews(csv)[0] == ("u0", "i0", 4.0, 1000)


def test_meta_is_parsed_as_literal_never_evaluated(tmp_path):
    meta = write_gz(tmp_path / "m.json.gz", [
        meta_line("a", title="ok"),
        "{'asin': 'b', 'title': __import__('os').getcwd()}",
    ])
    with pytest.raises(DataFormatError, match=r"m.json.gz, row 2: not a Python dict literal"):
        read_meta(meta)
    assert flatten_categories([["A", "B"], ["A", "B"], ["C"]]) == "A > B | C"
    assert flatten_categories([]) is None


@pytest.mark.parametrize("line, expected", [
    (b'{"reviewerID": "u1", "unixReviewTime": 5}', r"row 1, field 'asin': missing field"),
    (b'{"reviewerID": "u1", "asin": "i", "unixReviewTime": "soon"}', r"field 'unixReviewTime': not a Unix time"),
    (b'{"reviewerID": "u1", "asin": "caf\xe9", "unixReviewTime": 5}', r"row 1: bytes that are not UTF-8.*iconv"),
    (b'{"reviewerID": "u1", ', r"row 1: not valid JSON"),
])
def test_bad_review_rows(tmp_path, line, expected):
    path = write_gz(tmp_path / "reviews_X_5.json.gz", [line])
    with pytest.raises(DataFormatError, match=expected):
        read_reviews(path)


def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys):
    csv = tmp_path / "ratings_X.csv"
    csv.write_text("u1,i1,5.0,100\nu1,i2,five,101\n")
    meta = write_gz(tmp_path / "meta_X.json.gz", [meta_line("i1")])
    code = main(["convert-amazon", "--reviews", str(csv), "--meta", str(meta), "--name", "x",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "ratings_X.csv, row 2, field 'rating': not a number (value: 'five')" in err
    assert not (tmp_path / "out").exists()


def test_cli_truncated_gzip_is_a_clear_error(tmp_path, capsys):
    csv = tmp_path / "ratings_X.csv"
    csv.write_text("".join(f"{u},{i},4.0,{t}\n" for u, i, t in grid_reviews()))
    truncated = tmp_path / "meta_T.json.gz"
    truncated.write_bytes(gzip.compress(b"{'asin': 'i1'}\n" * 1000)[:40])
    code = main(["convert-amazon", "--reviews", str(csv), "--meta", str(truncated), "--name", "x",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "meta_T.json.gz: cannot read file" in err and "re-download" in err


def cli_error(capsys, tmp_path, reviews, meta, out=None, name="x"):
    out = out or tmp_path / "out"
    code = main(["convert-amazon", "--reviews", str(reviews), "--meta", str(meta), "--name", name, "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 2, captured
    err = captured.err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    return err


GRID = [review(u, i, t) for u, i, t in grid_reviews()]
BIG = "1" * 5000
DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("line, expected", [
    ('{"reviewerID": "u", "asin": "i", "unixReviewTime": Infinity}',
     "row 31, field 'unixReviewTime': not a Unix time (whole seconds since 1970, within +-2**53) (value: inf)"),
    ('{"reviewerID": "u", "asin": "i", "unixReviewTime": -Infinity}', "field 'unixReviewTime': not a Unix time"),
    ('{"reviewerID": "u", "asin": "i", "unixReviewTime": 1e400}', "row 31, field 'unixReviewTime': not a Unix time"),
    ('{"reviewerID": "u", "asin": "i", "unixReviewTime": 1e300}', "row 31, field 'unixReviewTime': not a Unix time"),
    ('{"reviewerID": "u", "asin": "i", "unixReviewTime": %s}' % BIG,
     "row 31, field 'unixReviewTime': an integer with 5000 digits: more than the 4300 Python converts from text "
     "(value: '111111111111...'); fix or remove the value"),
    ('{"reviewerID": "u", "asin": "i", "unixReviewTime": 5, "x": %s}' % DEEP,
     "row 31: nested too deeply for Python's json/ast parsers (their recursion limit)"),
    ('{"reviewerID": "u", "asin": "i", "unixReviewTime": 5, "overall": NaN}',
     "row 31, field 'overall': not a finite number (value: nan); fix the value or remove the row"),
    ('{"reviewerID": "u", "asin": "i", "unixReviewTime": 5, "overall": Infinity}',
     "row 31, field 'overall': not a finite number (value: inf)"),
    ('{"reviewerID": ["u"], "asin": "i", "unixReviewTime": 5}', "field 'reviewerID': not a string id"),
])
def test_cli_bad_review_values(tmp_path, capsys, line, expected):
    reviews = write_gz(tmp_path / "reviews_X_5.json.gz", GRID + [line])
    meta = write_gz(tmp_path / "meta_X.json.gz", [meta_line("i0")])
    err = cli_error(capsys, tmp_path, reviews, meta)
    assert "reviews_X_5.json.gz, " in err and expected in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("row, expected", [
    ("u,i,5,inf", "row 1, field 'timestamp': not a Unix time (whole seconds since 1970, within +-2**53) (value: 'inf')"),
    ("u,i,5,Infinity", "row 1, field 'timestamp': not a Unix time"),
    ("u,i,5,1e400", "row 1, field 'timestamp': not a Unix time"),
    (f"u,i,5,{BIG}", "row 1, field 'timestamp': not a Unix time"),
    ("u,i,nan,5", "row 1, field 'rating': not a finite number (value: 'nan'); fix the value or remove the row"),
    ("u,i,inf,5", "row 1, field 'rating': not a finite number (value: 'inf'); fix the value or remove the row"),
    (f"u,i,{BIG},5", "row 1, field 'rating': not a finite number"),
])
def test_cli_bad_ratings_csv_values(tmp_path, capsys, row, expected):
    reviews = tmp_path / "ratings_X.csv"
    reviews.write_text(row + "\n")
    meta = write_gz(tmp_path / "meta_X.json.gz", [meta_line("i0")])
    assert expected in cli_error(capsys, tmp_path, reviews, meta)


@pytest.mark.parametrize("line, expected", [
    (meta_line("i0", categories=5), "row 1, field 'categories': expected a list of category paths (value: 5); "
                                    "write categories as [['Beauty', 'Makeup'], ...] or remove them"),
    (meta_line("i0", categories=[["Beauty", {"x": 1}]]), "row 1, field 'categories': expected a list"),
    ("{'asin': 'i0', 'price': %s}" % BIG, "row 1, field 'price': an integer with 5000 digits: more than the 4300"),
    ("{'asin': 'i0', 'price': 1%s}" % ("0" * 400), "row 1, field 'price': not a number"),
    (meta_line("i0", price=float("nan")).replace("nan", "float('nan')"), "row 1: not a Python dict literal"),
    ('{"asin": "i0", "price": NaN}', "row 1, field 'price': not a finite number (value: nan); fix the value or "
                                     "remove the price"),
    ("{'asin': 'i0', 'related': %s}" % DEEP, "row 1: nested too deeply for Python's json/ast parsers"),
])
def test_cli_bad_meta_values(tmp_path, capsys, line, expected):
    reviews = write_gz(tmp_path / "reviews_X_5.json.gz", GRID)
    meta = write_gz(tmp_path / "meta_X.json.gz", [line])
    err = cli_error(capsys, tmp_path, reviews, meta)
    assert "meta_X.json.gz, " in err and expected in err


def test_cli_out_naming_a_file(tmp_path, capsys):
    reviews = write_gz(tmp_path / "reviews_X_5.json.gz", GRID)
    meta = write_gz(tmp_path / "meta_X.json.gz", [meta_line("i0")])
    (tmp_path / "afile").write_text("keep me")
    for out in (tmp_path / "afile", tmp_path / "afile" / "below"):
        assert cli_error(capsys, tmp_path, reviews, meta, out=out) == (
            f"error: {tmp_path / 'afile'}: --out names a file, not a folder; pass a folder (it is created if missing)\n")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("a file where the dataset folder goes")
    assert "d/x: the dataset path exists and is not a folder" in cli_error(capsys, tmp_path, reviews, meta,
                                                                         out=tmp_path / "d")
    assert "bad dataset name 'a/b'" in cli_error(capsys, tmp_path, reviews, meta, name="a/b")
    assert (tmp_path / "afile").read_text() == "keep me"


def test_ids_that_sanitise_alike_are_refused(tmp_path, capsys):
    rows = [review(u, f"i{k}", k) for u in ("A\tB", "A B", "u1", "u2", "u3") for k in range(5)]
    reviews = write_gz(tmp_path / "reviews_X_5.json.gz", rows)
    meta = write_gz(tmp_path / "meta_X.json.gz", [meta_line("i0")])
    err = cli_error(capsys, tmp_path, reviews, meta)
    assert "reviews_X_5.json.gz, field 'user_id': two ids, 'A\\tB' and 'A B', both become 'A B'" in err
    rows = [review(f"u{u}", i, k) for u in range(5) for k, i in enumerate(["x\ny", "x y", "i2", "i3", "i4"])]
    reviews = write_gz(tmp_path / "reviews_X_5.json.gz", rows)
    assert "field 'item_id': two ids, 'x\\ny' and 'x y'" in cli_error(capsys, tmp_path, reviews, meta)
    assert not (tmp_path / "out").exists()
    # ids that differ only in outer spaces were merged by an earlier strip(): refused as well
    rows = [review(u, f"i{k}", k) for u in ("A", " A", "u1", "u2", "u3") for k in range(5)]
    reviews = write_gz(tmp_path / "reviews_X_5.json.gz", rows)
    assert "two ids, ' A' and 'A'" in cli_error(capsys, tmp_path, reviews, meta)


def test_side_file_uses_the_token_recbole_reads(tmp_path):
    rows = [review(f"u{u}", i, k) for u in range(5) for k, i in enumerate(['a"b', "i1", "i2", "i3", "i4"])]
    reviews = write_gz(tmp_path / "reviews_X_5.json.gz", rows)
    meta = write_gz(tmp_path / "meta_X.json.gz", [meta_line('a"b', title="quoted")])
    folder = convert_amazon(reviews, meta, "q", tmp_path / "out")
    side = {r["item_id"]: r for r in read_jsonl(folder / "q.items.jsonl")}
    assert side["a'b"] == {"item_id": "a'b", "raw_item_id": 'a"b', "title": "quoted"}
    inter = pd.read_csv(folder / "q.inter", sep="\t", dtype=str, engine="python")
    assert "a'b" in set(inter["item_id:token"])


def test_exact_duplicates_are_dropped_and_counted(tmp_path, capsys):
    reviews = write_gz(tmp_path / "reviews_X_5.json.gz", GRID + GRID[:5] + GRID[:1])
    # same user and item at another time, or with another rating: a real repeat, kept
    again = [review("u0", "i0", 5000), review("u0", "i0", 1000, rating=1.0)]
    reviews = write_gz(tmp_path / "reviews_X_5.json.gz", GRID + GRID[:5] + GRID[:1] + again)
    meta = write_gz(tmp_path / "meta_X.json.gz", [meta_line("i0")])
    out = tmp_path / "out"
    assert main(["convert-amazon", "--reviews", str(reviews), "--meta", str(meta), "--name", "d",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "dropped 6 exact duplicate rows (same user, item, rating and time)" in printed
    assert "| d | 5 | 5 | 0 | 27 | 108.0000% |" in printed  # 25 + 2 genuine repeats
    meta_json = json.loads((out / "d" / "d.meta.json").read_text())
    assert meta_json["duplicates_dropped"] == 6 and meta_json["n_interactions"] == 27


def test_lone_surrogate_title_is_written_whole(tmp_path):
    reviews = write_gz(tmp_path / "reviews_X_5.json.gz", GRID)
    # Python 2 wrote astral characters as surrogate pairs in its literals; a lone one is invalid
    meta = write_gz(tmp_path / "meta_X.json.gz", [r"{'asin': 'i0', 'title': u'lone \ud800 and pair \ud83d\ude00'}",
                                                  r"{'asin': 'i1', 'brand': '\udcff', 'categories': [['\ud800']]}"])
    folder = convert_amazon(reviews, meta, "s", tmp_path / "out")
    side = {r["item_id"]: r for r in read_jsonl(folder / "s.items.jsonl")}
    assert side["i0"]["title"] == "lone \ufffd and pair \U0001F600"
    assert side["i1"] == {"item_id": "i1", "brand": "\ufffd", "categories": "\ufffd"}
    item = pd.read_csv(folder / "s.item", sep="\t", dtype=str, engine="python", index_col=0)
    assert item.loc["i0", "title:token_seq"] == "lone \ufffd and pair \U0001F600"
    assert sorted(p.name for p in folder.iterdir()) == ["s.inter", "s.item", "s.items.jsonl", "s.meta.json"]


def test_failed_conversion_writes_nothing(tmp_path, monkeypatch):
    import recbole_mm.data.amazon as amazon

    reviews = write_gz(tmp_path / "reviews_X_5.json.gz", GRID)
    meta = write_gz(tmp_path / "meta_X.json.gz", [meta_line("i0", title="t")])
    calls = []

    def side_file_fails(path, records):
        calls.append(path)
        raise DataFormatError("cannot write", file=path)

    monkeypatch.setattr(amazon, "write_jsonl", side_file_fails)
    with pytest.raises(DataFormatError):
        convert_amazon(reviews, meta, "w", tmp_path / "out")
    assert calls and not (tmp_path / "out").exists()  # no .inter/.item without their side file
    monkeypatch.undo()
    folder = convert_amazon(reviews, meta, "w", tmp_path / "out")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    monkeypatch.setattr(amazon, "write_jsonl", side_file_fails)
    reviews2 = write_gz(tmp_path / "reviews_Y_5.json.gz", GRID[:20] + [review("u9", "i0", 1)])
    with pytest.raises(DataFormatError):
        convert_amazon(reviews2, meta, "w", tmp_path / "out")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["w"]
