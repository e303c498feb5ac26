"""Data recipes on tiny fixtures in the public raw formats (tests/recipe_fixtures.py): shard layout, keys, json
fields and skip counts against hand-written expectations, reading back with plain webdataset, re-runs that skip
finished shards, clear errors for a wrong layout, and the VQA answer vocabulary, normalisation and soft scores."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import recipe_fixtures as F
from PIL import Image

from data_recipes import _common as C
from data_recipes import cc, coco, flickr30k, nlvr2, sbu, vg, vqa
from vlp.data.shards import read_index, shard_paths

ROOT = Path(__file__).resolve().parents[1]


def read_back(split_dir: Path) -> dict[str, dict]:
    """All samples of a split, read with plain webdataset through the index (json decoded, images as bytes)."""
    import webdataset as wds

    urls = shard_paths(split_dir)
    if not urls:
        return {}
    out = {}
    for s in wds.WebDataset(urls, shardshuffle=False):
        s = dict(s)
        s["json"] = json.loads(s["json"])
        assert s["__key__"] not in out
        out[s["__key__"]] = s
    return out


def mtimes(d: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(d.iterdir()) if p.name != "index.json"}


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """All fixtures, built once (read-only for the tests: they write into their own tmp_path)."""
    root = tmp_path_factory.mktemp("raw")
    return {"root": root, "coco": F.make_coco(root / "coco"), "flickr30k": F.make_flickr30k(root / "flickr30k"),
            "vg": F.make_vg(root / "vg"), "cc": F.make_img2dataset(root / "cc", "webdataset"),
            "sbu": F.make_img2dataset(root / "sbu", "files"), "vqa": F.make_vqa(root / "vqa"),
            "nlvr2": F.make_nlvr2(root / "nlvr2")}


# -- images -----------------------------------------------------------------------------------------------------------
def test_load_image_keeps_bytes_detects_format_and_rejects_bad_files(tmp_path):
    j, p = F.jpeg(33, 21), F.png(7, 5)
    assert C.load_image(j) == (j, "jpg", 33, 21)  # the original bytes, not a re-encoding
    assert C.load_image(p) == (p, "png", 7, 5)
    gif = io.BytesIO()
    Image.new("P", (4, 3)).save(gif, "GIF")
    data, ext, w, h = C.load_image(gif.getvalue())  # neither jpg/png/webp: converted losslessly to PNG
    assert (ext, w, h) == ("png", 4, 3) and Image.open(io.BytesIO(data)).format == "PNG"
    for bad in (F.truncated_jpeg(), j[:-200], b"", b"not an image at all"):
        with pytest.raises(C.Skip) as e:
            C.load_image(bad)
        assert e.value.reason == "corrupt_image"
    with pytest.raises(C.Skip) as e:
        C.load_image(str(tmp_path / "nope.jpg"))
    assert e.value.reason == "missing_image"
    F.write(tmp_path / "b.jpg", j)
    assert C.load_image([str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")])[0] == j  # first candidate that exists
    F.write(tmp_path / "blob", b"xx" + j + b"yy")
    assert C.load_image({"file": str(tmp_path / "blob"), "offset": 2, "size": len(j)})[0] == j  # a tar member
    assert C.key_safe("a.b/c d-1_2") == "a_b_c_d-1_2"


# -- COCO -------------------------------------------------------------------------------------------------------------
def test_coco_official_splits_fields_objects_phrases_and_skips(raw, tmp_path):
    files = raw["coco"]["files"]
    idx = coco.build(raw["root"] / "coco", tmp_path, shard_size=2, progress=False,
                     phrases=str(raw["root"] / "coco" / "phrases_{split}.json"))
    assert sorted(idx) == ["train", "val"]
    tr = read_index(tmp_path / "train")
    assert tr == idx["train"] and (tr["source"], tr["split"], tr["num_samples"]) == ("coco", "train", 3)
    # records 1,2 | 3,4 | 6 (5 has no caption): the missing 2 and truncated 3 leave one sample in each shard
    assert tr["shards"] == [{"name": f"train-00000{i}.tar", "samples": 1} for i in range(3)]
    assert tr["skipped"] == {"missing_image": 1, "corrupt_image": 1, "empty_caption": 3, "no_caption": 1}
    assert tr["meta"]["phrase_stats"] == {"phrases_missing": 3, "phrases_mismatch": 1}
    s = read_back(tmp_path / "train")
    assert sorted(s) == ["coco-1", "coco-4", "coco-6"]
    one = s["coco-1"]
    assert one["jpg"] == files[1] and "png" not in one
    assert one["json"] == {
        "image_id": 1, "source": "coco", "split": "train", "width": 33, "height": 24,
        "captions": ["A red circle.", "a circle on the left"],
        "phrases": [[["circle"], ["circle", "red"]], [["circle", "left of", "x"]]],
        "objects": {"boxes": [[1, 2, 11, 22]], "labels": ["circle"]}}  # xywh -> xyxy; the crowd box is dropped
    four = s["coco-4"]["json"]  # its empty first caption is dropped with its phrases
    assert four["captions"] == ["a blue square"] and four["phrases"] == [[["square", "blue"]]]
    assert four["objects"] == {"boxes": [[2.5, 3, 6.5, 8]], "labels": ["square"]}
    six = s["coco-6"]
    assert six["png"] == files[6] and "jpg" not in six and "phrases" not in six["json"]
    assert (six["json"]["width"], six["json"]["height"]) == (20, 16)
    v = read_back(tmp_path / "val")
    assert sorted(v) == ["coco-11", "coco-12"]
    assert v["coco-12"]["json"]["captions"] == ["val two", "val two again"]
    assert v["coco-12"]["json"]["objects"] == {"boxes": [], "labels": []}
    assert read_index(tmp_path / "val")["skipped"] == {}


def test_coco_karpathy_splits_restval_and_image_lookup(raw, tmp_path):
    files, kfile = raw["coco"]["files"], raw["root"] / "coco" / "dataset_coco.json"
    idx = coco.build(raw["root"] / "coco", tmp_path / "a", karpathy=kfile, progress=False)
    assert sorted(idx) == ["test", "train", "val"]
    tr = read_back(tmp_path / "a" / "train")
    # restval (4, 6) merged into train; 2 missing, 5 without captions. The Karpathy file names 2014 files
    # (train2014/COCO_train2014_...), which are found as the 2017 file of the same cocoid.
    assert sorted(tr) == ["coco-1", "coco-4", "coco-6"] and tr["coco-1"]["jpg"] == files[1]
    assert tr["coco-6"]["png"] == files[6]  # found by its filepath/filename
    assert idx["train"]["skipped"] == {"missing_image": 1, "empty_caption": 3, "no_caption": 1}
    assert sorted(read_back(tmp_path / "a" / "val")) == ["coco-11"]
    assert sorted(read_back(tmp_path / "a" / "test")) == ["coco-12"]  # and 3, the truncated JPEG
    assert idx["test"]["skipped"] == {"corrupt_image": 1}
    assert tr["coco-1"]["json"]["split"] == "train" and tr["coco-1"]["json"]["captions"][0] == "A red circle."

    idx = coco.build(raw["root"] / "coco", tmp_path / "b", split="train,restval", karpathy=kfile,
                     keep_restval=True, progress=False)
    assert sorted(idx) == ["restval", "train"] and not (tmp_path / "b" / "val").exists()
    assert sorted(read_back(tmp_path / "b" / "restval")) == ["coco-4", "coco-6"]
    assert sorted(read_back(tmp_path / "b" / "train")) == ["coco-1"]


def test_rerun_skips_finished_shards_and_rebuilds_only_what_is_missing(raw, tmp_path, monkeypatch):
    root = raw["root"] / "coco"
    first = coco.build(root, tmp_path, split="train", shard_size=2, progress=False)
    before = mtimes(tmp_path / "train")
    assert sorted(before) == [f"train-00000{i}.tar{x}" for i in range(3) for x in ("", ".json")]

    opened = []
    real = C.load_image
    monkeypatch.setattr(C, "load_image", lambda ref: opened.append(ref) or real(ref))
    again = coco.build(root, tmp_path, split="train", shard_size=2, progress=False)
    assert again == first and opened == [] and mtimes(tmp_path / "train") == before

    # the index is rebuilt from the per-shard sidecars, still without touching an image
    (tmp_path / "train" / "index.json").unlink()
    assert coco.build(root, tmp_path, split="train", shard_size=2, progress=False) == first and opened == []

    # what later steps add to the index (tokenizer, region features) survives a re-run that rewrites nothing
    C.set_index_tokenizer(tmp_path / "train", "../tok")
    index_file = tmp_path / "train" / "index.json"
    index_file.write_text(json.dumps(dict(json.loads(index_file.read_text()), regions={"dim": 8})))
    again = coco.build(root, tmp_path, split="train", shard_size=2, progress=False)["train"]
    assert again == dict(first["train"], tokenizer="../tok", regions={"dim": 8}) and opened == []

    # a lost shard (or one whose sidecar is missing: e.g. killed between the two) is rebuilt, and only it;
    # the rebuilt shards have no region features, so the index no longer claims them
    (tmp_path / "train" / "train-000001.tar").unlink()
    (tmp_path / "train" / "train-000002.tar.json").unlink()
    again = coco.build(root, tmp_path, split="train", shard_size=2, progress=False)["train"]
    assert again == dict(first["train"], tokenizer="../tok", regions=None)
    assert len(opened) == 3  # records 3, 4 of shard 1 and 6 of shard 2
    after = mtimes(tmp_path / "train")
    assert after["train-000000.tar"] == before["train-000000.tar"]
    assert after["train-000001.tar"] != before["train-000001.tar"]

    # another shard size: every shard's records change, so all are rebuilt and the surplus shard is removed
    idx = coco.build(root, tmp_path, split="train", shard_size=3, progress=False)["train"]
    assert [s["name"] for s in idx["shards"]] == ["train-000000.tar", "train-000001.tar"]
    assert not (tmp_path / "train" / "train-000002.tar").exists()
    assert idx["num_samples"] == 3 and idx["skipped"] == first["train"]["skipped"]


def test_workers_write_the_same_bytes_as_one_process(raw, tmp_path):
    a = coco.build(raw["root"] / "coco", tmp_path / "a", split="train", shard_size=1, progress=False)
    b = coco.build(raw["root"] / "coco", tmp_path / "b", split="train", shard_size=1, workers=2, progress=False)
    assert [s["name"] for s in a["train"]["shards"]] == [s["name"] for s in b["train"]["shards"]]
    assert a["train"]["skipped"] == b["train"]["skipped"]
    for name in mtimes(tmp_path / "a" / "train"):
        assert (tmp_path / "a" / "train" / name).read_bytes() == (tmp_path / "b" / "train" / name).read_bytes()


# -- missing files and the command line -------------------------------------------------------------------------------
@pytest.mark.parametrize("module, expected", [
    (coco, "annotations/captions_train2017.json"), (flickr30k, "dataset_flickr30k.json"),
    (vg, "image_data.json"), (cc, "00000.tar"), (sbu, "00000.tar"),
    (vqa, "v2_OpenEnded_mscoco_train2014_questions.json"), (nlvr2, "train.json")])
def test_missing_top_level_file_is_an_error_naming_the_path(module, expected, tmp_path, capsys):
    (tmp_path / "raw").mkdir()
    with pytest.raises(C.RecipeError) as e:
        module.build(tmp_path / "raw", tmp_path / "out", progress=False)
    assert str(tmp_path / "raw") in str(e.value) and expected in str(e.value)
    assert module.main(["--root", str(tmp_path / "raw"), "--out", str(tmp_path / "out")]) == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing written


def test_missing_image_folder_is_a_layout_error(raw, tmp_path):
    F.write_json(tmp_path / "annotations" / "captions_val2017.json", {"images": [], "annotations": []})
    with pytest.raises(C.RecipeError, match="val2017"):
        coco.build(tmp_path, tmp_path / "out", progress=False)
    with pytest.raises(C.RecipeError, match="'test' is not available"):
        coco.build(raw["root"] / "coco", tmp_path / "out", split="test", progress=False)


def test_cli_main_and_python_m(raw, tmp_path, capsys):
    rc = coco.main(["--root", str(raw["root"] / "coco"), "--out", str(tmp_path / "o"), "--split", "val",
                    "--shard-size", "1", "--workers", "1"])
    cap = capsys.readouterr()
    assert rc == 0 and "coco/val: 2 samples in 2 shards (2 written" in cap.out
    assert "coco" in cap.err  # the progress bar
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["val"]
    from vlp.cli import main as vlp_main

    assert vlp_main(["data", "nlvr2", "--root", str(raw["root"] / "nlvr2"), "--out", str(tmp_path / "n"),
                     "--no-progress"]) == 0
    assert read_index(tmp_path / "n" / "dev")["num_samples"] == 1
    r = subprocess.run([sys.executable, "-m", "data_recipes.vg", "--root", str(tmp_path / "none"), "--out",
                        str(tmp_path / "x")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "image_data.json" in r.stderr and "Traceback" not in r.stderr


# -- Flickr30k, VG, CC/SBU --------------------------------------------------------------------------------------------
def test_flickr30k(raw, tmp_path):
    idx = flickr30k.build(raw["root"] / "flickr30k", tmp_path, progress=False)
    assert {s: i["num_samples"] for s, i in idx.items()} == {"train": 1, "val": 1, "test": 0}
    assert idx["train"]["skipped"] == {"empty_caption": 1} and idx["test"]["skipped"] == {"missing_image": 1}
    assert idx["val"]["skipped"] == {"malformed_record": 1}
    assert idx["test"]["shards"] == []
    s = read_back(tmp_path / "train")["flickr30k-100"]
    assert s["jpg"] == raw["flickr30k"]["files"]["100"]
    assert s["json"] == {"image_id": "100", "source": "flickr30k", "split": "train", "width": 40, "height": 30,
                         "captions": ["A dog runs.", "two dogs"]}  # no raw: the tokens, joined


def test_vg_regions_objects_rescale_and_coco_exclusion(raw, tmp_path):
    idx = vg.build(raw["root"] / "vg", tmp_path / "a", progress=False)["train"]
    assert idx["num_samples"] == 2
    assert idx["skipped"] == {"empty_caption": 2, "missing_image": 1, "no_caption": 1}
    s = read_back(tmp_path / "a" / "train")
    one = s["vg-1"]["json"]
    assert one["captions"] == ["red circle", "sky"] and one["region_boxes"] == [[1, 2, 11, 7], [0, 0, 40, 10]]
    assert one["objects"] == {"boxes": [[1, 2, 11, 7]], "labels": ["circle"]} and one["coco_id"] == 12
    two = s["vg-2"]["json"]  # the file is 80x60, image_data.json says 40x30: boxes follow the file
    assert (two["width"], two["height"]) == (80, 60)
    assert two["region_boxes"] == [[8, 8, 24, 24]] and two["objects"] == {"boxes": [[0, 0, 8, 8]],
                                                                         "labels": ["square"]}
    idx = vg.build(raw["root"] / "vg", tmp_path / "b", exclude_coco=raw["root"] / "coco" / "dataset_coco.json",
                   progress=False)["train"]
    # coco 12 (Karpathy test) and 11 (val) are excluded; coco 1 (train) is not
    assert idx["skipped"] == {"coco_eval_overlap": 2, "missing_image": 1}
    assert sorted(read_back(tmp_path / "b" / "train")) == ["vg-2"]


@pytest.mark.parametrize("module, source", [(cc, "cc"), (sbu, "sbu")])  # cc: tar shards, sbu: files folders
def test_img2dataset_output(raw, tmp_path, module, source):
    idx = module.build(raw["root"] / source, tmp_path, shard_size=2, progress=False)["train"]
    assert idx["meta"]["input_format"] == {"cc": "webdataset", "sbu": "files"}[source]
    assert idx["skipped"] == {"download_failed": 1, "empty_caption": 1, "corrupt_image": 1}
    assert idx["meta"]["img2dataset_stats"] == {"count": 8, "successes": 5, "failed_to_download": 2,
                                                "failed_to_resize": 1}
    s = read_back(tmp_path / "train")
    assert sorted(s) == [f"{source}-000000000", f"{source}-000000002", f"{source}-000010000"]
    files = raw[source]["files"]
    a = s[f"{source}-000000000"]
    assert a["jpg"] == files["000000000"]["jpg"]
    assert a["json"] == {"image_id": "000000000", "source": source, "split": "train", "width": 20, "height": 10,
                         "captions": ["a photo of a cat"], "url": "http://x/000000000.jpg"}
    assert s[f"{source}-000000002"]["png"] == files["000000002"]["png"]
    assert s[f"{source}-000010000"]["json"]["captions"] == ["second shard"]


# -- VQA --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw_answer, expected", [
    ("Yes", "yes"), ("two", "2"), ("none", "0"), ("a dog", "dog"), ("The Man's hat.", "man's hat"),
    ("dont", "don't"), ("isnt it", "isn't it"), ("1,000", "1000"), ("red, white", "red white"),
    ("black/white", "black white"), ("3.5", "3.5"), ("t-shirt", "t shirt"), ("yes!", "yes"),
    ("  ten\tfeet ", "10 feet"), ("well", "well"), ("its", "its"), ("couldnt've", "couldn't've")])
def test_answer_normalisation(raw_answer, expected):
    assert vqa.normalize_answer(raw_answer) == expected


def test_soft_score_rules():
    assert [vqa.soft_score(k, "min1") for k in range(6)] == [0, 1 / 3, 2 / 3, 1, 1, 1]
    assert [vqa.soft_score(k, "vilt") for k in range(6)] == [0, 0.3, 0.6, 0.9, 1, 1]
    with pytest.raises(ValueError):
        vqa.soft_score(1, "nope")


def _questions(split_dir: Path) -> dict[int, dict]:
    return {q["question_id"]: q for s in read_back(split_dir).values() for q in s["json"]["questions"]}


def test_vqa_vocabulary_labels_and_scores(raw, tmp_path):
    idx = vqa.build(raw["root"] / "vqa", tmp_path / "a", num_answers=4, progress=False)
    # multiple_choice_answer over train: yes x2; 2, 3, no, red x1 each (ties alphabetical); val's answers not used
    vocab = ["yes", "2", "3", "no"]
    assert json.loads((tmp_path / "a" / "answers.json").read_text()) == vocab
    for i in idx.values():
        assert i["meta"]["answers"] == vocab and i["meta"]["answers_file"] == "../answers.json"
    assert idx["train"]["skipped"] == {"empty_question": 1, "missing_image": 1}
    assert {s: i["num_samples"] for s, i in idx.items()} == {"train": 2, "val": 3, "test": 1}
    assert _questions(tmp_path / "a" / "test") == {210: {"question_id": 210, "question": "Any answer?",
                                                         "answers": [], "labels": [], "scores": []}}
    q = _questions(tmp_path / "a" / "train")
    assert sorted(q) == [10, 11, 20, 21, 22]
    assert q[10]["answers"] == [{"answer": "orange", "count": 4}, {"answer": "red", "count": 4},
                                {"answer": "dark red", "count": 2}]  # "Red." is "red"
    assert (q[10]["labels"], q[10]["scores"]) == ([], [])
    assert q[11]["answers"] == [{"answer": "3", "count": 5}, {"answer": "2", "count": 3},
                                {"answer": "1", "count": 2}]  # "two" is "2"
    assert (q[11]["labels"], q[11]["scores"]) == ([2, 1], [1.0, 1.0])
    assert (q[21]["labels"], q[21]["scores"]) == ([3, 0], [1.0, 0.3333])
    assert q[22]["answers"][0] == {"answer": "0", "count": 7}  # none / zero / 0
    assert (q[22]["labels"], q[22]["scores"]) == ([1, 2], [0.6667, 0.3333])
    assert q[22]["question"] == "How many circles?" and q[22]["answer_type"] == "other"
    assert idx["train"]["meta"]["questions_without_label"] == 1

    vilt = vqa.build(raw["root"] / "vqa", tmp_path / "b", num_answers=4, score_rule="vilt", split="train",
                     progress=False)
    assert vilt["train"]["meta"]["score_rule"] == "vilt"
    q = _questions(tmp_path / "b" / "train")
    assert q[11]["scores"] == [1.0, 0.9] and q[21]["scores"] == [1.0, 0.3] and q[22]["scores"] == [0.6, 0.3]


def test_vqa_karpathy_resplit(raw, tmp_path):
    idx = vqa.build(raw["root"] / "vqa", tmp_path, num_answers=10, progress=False,
                    karpathy=raw["root"] / "vqa" / "dataset_coco.json")
    assert sorted(idx) == ["test", "train", "val"]
    tr = read_back(tmp_path / "train")
    assert sorted(tr) == ["vqa-1", "vqa-11", "vqa-2"]  # 11 is Karpathy restval: train (and 3 is missing)
    assert tr["vqa-11"]["json"]["split"] == "train"
    assert sorted(read_back(tmp_path / "val")) == ["vqa-13"] and sorted(read_back(tmp_path / "test")) == ["vqa-12"]
    # the vocabulary comes from the train split only: "yes" x3 now (11 moved in), "circle" (val) is not in it
    assert json.loads((tmp_path / "answers.json").read_text()) == ["yes", "2", "3", "no", "red"]


# -- NLVR2 ------------------------------------------------------------------------------------------------------------
def test_nlvr2_pairs(raw, tmp_path):
    import webdataset as wds

    idx = nlvr2.build(raw["root"] / "nlvr2", tmp_path, progress=False)
    assert sorted(idx) == ["dev", "train"]
    assert idx["train"]["skipped"] == {"malformed_line": 2, "empty_caption": 1, "missing_image": 1}
    s = read_back(tmp_path / "train")
    assert sorted(s) == ["nlvr2-train-1-0-0", "nlvr2-train-1-0-1"]
    files = raw["nlvr2"]["files"]
    a = s["nlvr2-train-1-0-0"]
    assert a["img0.png"] == files["train-1-0-img0"] and a["img1.png"] == files["train-1-0-img1"]
    assert a["json"] == {"image_id": "train-1-0-0", "identifier": "train-1-0-0", "source": "nlvr2",
                         "split": "train", "sentence": "The left image has a red circle.",
                         "captions": ["The left image has a red circle."], "label": True,
                         "width": [30, 25], "height": [20, 20]}
    assert s["nlvr2-train-1-0-1"]["json"]["label"] is False
    d = read_back(tmp_path / "dev")["nlvr2-dev-5-1-0"]  # images in RAW/dev/, not RAW/images/dev/
    assert d["img1.png"] == files["dev-5-1-img1"] and d["json"]["width"] == [10, 12]
    # a plain webdataset PIL decode reads both fields, the JPEG-in-.png included
    pairs = [(x["img0.png"].size, x["img1.png"].size)
             for x in wds.WebDataset(shard_paths(tmp_path / "train"), shardshuffle=False).decode("pil")]
    assert pairs == [((30, 20), (25, 20))] * 2


# -- the shapes world, end to end -------------------------------------------------------------------------------------
def test_shapes_world_to_shards_and_tokenizer(tmp_path):
    from data_recipes import shapes, shapes_shards
    from vlp.data.tokenizer import load_tokenizer

    shapes.generate(tmp_path / "world", seed=0, train=12, val=4, test=4, image_size=32, progress=False)
    out = tmp_path / "shards"
    built = shapes_shards.build_shapes(tmp_path / "world", out, shard_size=5, progress=False)
    counts = {src: {s: i["num_samples"] for s, i in d.items()} for src, d in built.items()}
    assert counts == {"coco": {"train": 12, "val": 4, "test": 4}, "vg": {"train": 12},
                      "vqa": {"train": 12, "val": 4, "test": 4}}
    for src, d in built.items():
        for split, i in d.items():
            assert i["skipped"] == {} and read_index(out / src / split)["tokenizer"] == "../../tokenizer"
    coco_train = read_back(out / "coco" / "train")
    scenes = json.loads((tmp_path / "world" / "scenes_train.json").read_text())
    for key, s in coco_train.items():
        js = s["json"]
        assert js["captions"] == scenes[str(js["image_id"])]["captions"]
        assert len(js["phrases"]) == len(js["captions"]) and js["objects"]["labels"]
    vocab = json.loads((out / "vqa" / "answers.json").read_text())
    q = next(iter(read_back(out / "vqa" / "val").values()))["json"]["questions"][0]
    assert q["scores"] == [1.0] and vocab[q["labels"][0]] == q["answers"][0]["answer"]  # ten identical answers
    tok = load_tokenizer(out / "coco" / "train" / "../../tokenizer")
    assert 100 < len(tok) <= 400 and "[UNK]" not in tok.tokenize(js["captions"][0])

    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "index.json"}
    again = shapes_shards.build_shapes(tmp_path / "world", out, shard_size=5, progress=False)
    assert again == built
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "index.json"} == stamp
