"""Datasets and checkpoints are written whole or not at all; temporaries of killed writers go away."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from recbole_mm.errors import DataFormatError
from recbole_mm.files import atomic_output, read_jsonl, remove_stale_temps, staged_folder
from recbole_mm.data.atomic_files import write_atomic
from recbole_mm.data.cli import main
from recbole_mm.trainer.checkpoint import atomic_save, safe_load


def killed_while_writing(target, staged=False):
    """Run a writer in a child process and SIGKILL it in the middle: it leaves its temporary behind."""
    code = textwrap.dedent(f"""
        import os, signal
        from recbole_mm.files import atomic_output, staged_folder
        if {staged!r}:
            with staged_folder({str(target)!r}) as tmp:
                (tmp / "half.inter").write_text("user_id:token")
                os.kill(os.getpid(), signal.SIGKILL)
        with atomic_output({str(target)!r}, "wb") as f:
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-c", code], env=env, timeout=60)
    assert proc.returncode == -9


def test_killed_save_leaves_a_part_file_that_the_next_save_removes(tmp_path):
    killed_while_writing(tmp_path / "SASRec-Dec-01-2026_10-00-00.pth")
    left = [p for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].name.startswith(".SASRec-Dec-01-2026_10-00-00.pth.")
    assert left[0].name.endswith(".part") and left[0].stat().st_size == 0
    (tmp_path / "notes.part").write_text("not ours")  # other names are never touched
    with atomic_output(tmp_path / "other.pth", "wb") as held:  # a save in progress keeps its temporary
        held.write(b"x")
        atomic_save({"w": torch.ones(2)}, str(tmp_path / "LRURec-Dec-01-2026_10-05-00.pth"))
        names = sorted(p.name for p in tmp_path.iterdir())
        assert names[0].startswith(".other.pth.") and names[0].endswith(".part")
        assert names[1:] == ["LRURec-Dec-01-2026_10-05-00.pth", "notes.part"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LRURec-Dec-01-2026_10-05-00.pth", "notes.part", "other.pth"]
    assert torch.equal(safe_load(str(tmp_path / "LRURec-Dec-01-2026_10-05-00.pth"))["w"], torch.ones(2))


def test_killed_dataset_build_leaves_a_folder_that_the_next_build_removes(tmp_path):
    killed_while_writing(tmp_path / "shop", staged=True)
    assert [p.name[:6] for p in tmp_path.iterdir()] == [".shop."] and not (tmp_path / "shop").exists()
    with staged_folder(tmp_path / "shop") as tmp:
        assert remove_stale_temps(tmp_path) == 0  # the live one is locked
        (tmp / "shop.inter").write_text("x\n")
    assert [p.name for p in tmp_path.iterdir()] == ["shop"]


def test_staged_folder_is_all_or_nothing(tmp_path):
    target = tmp_path / "shop"
    with pytest.raises(RuntimeError):
        with staged_folder(target) as tmp:
            (tmp / "shop.inter").write_text("new\n")
            raise RuntimeError("side file failed")
    assert list(tmp_path.iterdir()) == []
    with staged_folder(target) as tmp:
        (tmp / "shop.inter").write_text("v1\n")
        (tmp / "shop.meta.json").write_text("{}\n")
    (target / "images").mkdir()
    (target / "images" / "a.jpg").write_bytes(b"downloaded earlier")
    with pytest.raises(KeyboardInterrupt):
        with staged_folder(target) as tmp:
            (tmp / "shop.inter").write_text("v2\n")
            raise KeyboardInterrupt
    assert (target / "shop.inter").read_text() == "v1\n"
    with staged_folder(target) as tmp:
        (tmp / "shop.inter").write_text("v2\n")
    # rebuilt files replaced, others (downloaded images, captions, ...) kept, no temporaries left
    assert (target / "shop.inter").read_text() == "v2\n" and (target / "images" / "a.jpg").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["shop"]


def test_ids_that_sanitise_alike_are_refused_naming_both(tmp_path):
    fields = [("user_id", "token"), ("item_id", "token"), ("timestamp", "float")]
    with pytest.raises(DataFormatError) as e:
        write_atomic(tmp_path / "x.inter", fields, [("A\tB", "i", 1), ("A B", "i", 2)],
                     required=["user_id", "item_id"], source="in.csv")
    assert str(e.value).startswith("in.csv, field 'user_id': two ids, 'A\\tB' and 'A B', both become 'A B'")
    with pytest.raises(DataFormatError, match=r"field 'item_id': two ids, 'x ' and 'x'"):
        write_atomic(tmp_path / "x.inter", fields, [("u", "x ", 1), ("u", "x", 2)], required=["item_id"])
    # the same id many times, and ids that sanitising leaves alone, are fine
    assert write_atomic(tmp_path / "x.inter", fields, [("u", "i", 1), ("u", "i", 2), ("u v", "i", 3)],
                        required=["user_id", "item_id"]) == 3


# --------------------------------------------------------------------------- prepare (generated shared/)
def fake_beauty(shared, users, items_jsonl):
    src = shared / "amazon_beauty_2014" / "derived"
    src.mkdir(parents=True)
    lines = ["reviewer_id\tasin\tposition\trel_time_sec"]
    for u in users:
        lines += [f"{u}\ti{k}\t{k}\t{10 * k}" for k in range(3)]
    (src / "interactions.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (src / "items.jsonl").write_text(items_jsonl, encoding="utf-8")
    return shared


def test_prepare_writes_a_lone_surrogate_title_whole(tmp_path, capsys):
    items = "".join(json.dumps({"asin": f"i{k}", "title": t}) + "\n"
                    for k, t in enumerate(["ok", "lone \ud800 surrogate", "pair \ud83d\ude00"]))
    items += json.dumps({"asin": 'i"3', "title": "quoted id"}) + "\n"
    shared = fake_beauty(tmp_path / "shared", ["u1", "u2"], items)
    assert main(["prepare", "beauty", "--shared", str(shared), "--out", str(tmp_path / "out")]) == 0
    folder = tmp_path / "out" / "beauty"
    assert sorted(p.name for p in folder.iterdir()) == ["beauty.inter", "beauty.item", "beauty.items.jsonl",
                                                         "beauty.meta.json"]
    side = list(read_jsonl(folder / "beauty.items.jsonl"))
    assert [r["title"] for r in side] == ["ok", "lone \ufffd surrogate", "pair \U0001F600", "quoted id"]
    # the side file is keyed by the token RecBole reads (the raw id is kept beside it)
    assert (side[3]["item_id"], side[3]["raw_item_id"]) == ("i'3", 'i"3')
    assert "pair \U0001F600" in (folder / "beauty.item").read_text(encoding="utf-8")


def test_prepare_failure_leaves_the_old_dataset_and_no_temporaries(tmp_path, monkeypatch, capsys):
    items = "".join(json.dumps({"asin": f"i{k}", "title": f"t{k}"}) + "\n" for k in range(3))
    shared = fake_beauty(tmp_path / "shared", ["u1", "u2"], items)
    out = tmp_path / "out"
    assert main(["prepare", "beauty", "--shared", str(shared), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in (out / "beauty").iterdir()}

    import recbole_mm.data.prepare as prep

    def broken(path, obj):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(prep, "write_json", broken)  # the last file of the set fails
    (shared / "amazon_beauty_2014" / "derived" / "interactions.tsv").write_text(
        "reviewer_id\tasin\tposition\trel_time_sec\nu9\ti0\t0\t0\n")
    assert main(["prepare", "beauty", "--shared", str(shared), "--out", str(out)]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["beauty"]
    assert {p.name: p.read_bytes() for p in (out / "beauty").iterdir()} == before


def test_prepare_refuses_ids_that_sanitise_alike(tmp_path, capsys):
    items = "".join(json.dumps({"asin": f"i{k}"}) + "\n" for k in range(3))
    shared = fake_beauty(tmp_path / "shared", ["A B", "A\x0bB"], items)
    assert main(["prepare", "beauty", "--shared", str(shared), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "field 'user_id': two ids, 'A B' and 'A\\x0bB', both become 'A B'" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_prepare_out_naming_a_file(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    shared = fake_beauty(tmp_path / "shared", ["u1"], "")
    assert main(["prepare", "beauty", "--shared", str(shared), "--out", str(tmp_path / "afile")]) == 2
    assert capsys.readouterr().err == (f"error: {tmp_path / 'afile'}: --out names a file, not a folder; "
                                       f"pass a folder (it is created if missing)\n")
