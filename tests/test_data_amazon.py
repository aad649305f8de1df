"""Amazon 2014 converter on small files written in the original formats."""

import gzip
import json

import pandas as pd
import pytest

from recbole_mm.data.amazon import convert_amazon, flatten_categories, kcore_filter, read_meta, read_reviews
from recbole_mm.data.atomic import DataFormatError, read_jsonl
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
    (b'{"reviewerID": "u1", "asin": "i", "unixReviewTime": "soon"}', r"field 'unixReviewTime': not an integer"),
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
