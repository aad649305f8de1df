"""Statistics (PRIME Table 1 columns) and the synthetic fixture generator."""

import hashlib
import json

from recbole_mm.files import write_jsonl
from recbole_mm.data.cli import main
from recbole_mm.data.fixtures import COLOURS, FixtureSpec, make_fixture
from recbole_mm.data.stats import dataset_stats, format_stats


def test_stats_of_a_small_dataset(tmp_path):
    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "tiny.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\n"
                                       "u1\ta\t1\nu1\tb\t2\nu2\ta\t1\n")
    (folder / "images").mkdir()
    (folder / "images" / "a.png").write_bytes(b"not an image")
    write_jsonl(folder / "tiny.items.jsonl", [{"item_id": "a", "image": "images/a.png"},
                                              {"item_id": "b", "image": "images/b.png"}])
    s = dataset_stats(folder)
    assert s == {"dataset": "tiny", "users": 2, "items": 2, "images": 1, "inter": 3, "density": 0.75}
    assert dataset_stats(folder, verify_images=True)["images"] == 0  # the file does not decode
    assert format_stats([s]).splitlines()[-1] == "| tiny | 2 | 2 | 1 | 3 | 75.0000% |"


def test_stats_cli_by_name_and_errors(tmp_path, capsys):
    make_fixture(tmp_path, spec=FixtureSpec(n_users=10, n_items=8))
    assert main(["stats", "mmfix", "--data-path", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| dataset | #users | #items | #images | #inter | density |" in out
    assert "| mmfix | 10 | 8 | 8 |" in out
    assert main(["stats", str(tmp_path / "missing")]) == 2
    assert "dataset folder not found" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "bad.inter").write_text("user_id:token\titem_id:token\nu1\ta\textra\n")
    assert main(["stats", str(bad)]) == 2
    assert "bad.inter, row 2: expected 2 tab-separated values, got 3" in capsys.readouterr().err


def digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_fixture_is_deterministic_and_colour_predicts_next_item(tmp_path):
    spec = FixtureSpec(n_users=20, n_items=12, seed=3)
    a = make_fixture(tmp_path / "a", spec=spec)
    b = make_fixture(tmp_path / "b", spec=spec)
    assert digest(a) == digest(b)
    assert digest(make_fixture(tmp_path / "c", spec=FixtureSpec(n_users=20, n_items=12, seed=4))) != digest(a)

    from PIL import Image

    items = {r["item_id"]: r for r in map(json.loads, open(a / "mmfix.items.jsonl"))}
    names = list(COLOURS)

    def colour(token):
        with Image.open(a / items[token]["image"]) as im:
            px = im.convert("RGB").getpixel((im.width // 2, im.height * 2 // 3))
        return next(c for c, rgb in COLOURS.items() if rgb == px)

    for rec in items.values():
        assert not any(c in json.dumps(rec).lower() for c in names)  # colour only in the image
    lines = (a / "mmfix.inter").read_text().splitlines()[1:]
    seqs = {}
    for line in lines:
        u, i, _ = line.split("\t")
        seqs.setdefault(u, []).append(i)
    pairs = [(s[k], s[k + 1]) for s in seqs.values() for k in range(len(s) - 1)]
    assert pairs and all(names.index(colour(y)) == (names.index(colour(x)) + 1) % len(names) for x, y in pairs)
