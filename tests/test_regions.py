"""data_recipes.regions: regions.npz added to existing shards from UNITER npz files, a BUTD TSV, or a timm backbone
with RoI-align; checked against hand-made features and boxes, original members kept byte for byte, resume, errors."""

from __future__ import annotations

import base64
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_recipes import _common as C
from data_recipes import regions as R
from vlp.data.shards import read_index, shard_paths, write_index, write_shard

W, H = 48, 40  # image size of every fixture sample
# id -> objects (xyxy pixels, labels); id 3 has none
OBJECTS = {0: ([[2, 3, 20, 30], [25, 5, 46, 38]], ["circle", "square"]),
           1: ([[0, 0, 24, 20]], ["square"]),
           2: ([[10, 10, 40, 35], [1, 1, 9, 9], [30, 2, 47, 12]], ["circle", "cube", "square"]),
           3: ([], [])}


def jpeg(i: int) -> bytes:
    rng = np.random.default_rng(100 + i)
    arr = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
    arr[: H // 2, : W // 2] = (200, 30, 30)
    arr[H // 2:, W // 2:] = (30, 30, 200 - 40 * i)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def sample(i: int) -> dict:
    boxes, labels = OBJECTS[i]
    s = {"__key__": f"coco-{i}", "jpg": jpeg(i),
         "json": {"image_id": i, "source": "coco", "split": "train", "width": W, "height": H,
                  "captions": [f"caption {i}"], "objects": {"boxes": boxes, "labels": labels}}}
    if i == 0:  # a stale regions.npz of an earlier run: replaced
        s["regions.npz"] = R.npz_bytes({"features": np.ones((1, 3), np.float16), "boxes": np.zeros((1, 4), np.float32)})
    return s


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """root/shards/train: 2 shards (ids 0,1 and 2,3), tokenizer '../tok' (relative), one sample skipped upstream."""
    root = tmp_path_factory.mktemp("regions")
    d = root / "shards" / "train"
    d.mkdir(parents=True)
    (root / "shards" / "tok").mkdir()
    names = []
    for k, ids in enumerate([(0, 1), (2, 3)]):
        name = f"train-{k:06d}.tar"
        write_shard(d / name, [sample(i) for i in ids])
        names.append({"name": name, "samples": 2})
    write_index(d, source="coco", split="train", shards=names, skipped={"missing_image": 1}, tokenizer="../tok",
                meta={"karpathy": "dataset_coco.json"})
    return d


def members(split_dir: Path) -> dict[str, dict[str, bytes]]:
    """key -> {field: raw bytes} over the split's shards (as listed by its index)."""
    out: dict[str, dict[str, bytes]] = {}
    for p in shard_paths(split_dir):
        with tarfile.open(p) as tar:
            for m in tar:
                key, field = m.name.split(".", 1)
                out.setdefault(key, {})[field] = tar.extractfile(m).read()
    return out


def regions_of(split_dir: Path) -> dict[str, dict]:
    """key -> regions.npz arrays, read with plain webdataset (its default npz decoder) through the index."""
    import webdataset as wds

    out = {}
    for s in wds.WebDataset(shard_paths(split_dir), shardshuffle=False).decode("pil"):
        assert isinstance(s["json"], dict) and isinstance(s["jpg"], Image.Image)
        out[s["__key__"]] = s["regions.npz"]
    return out


def assert_originals_kept(in_dir: Path, out_dir: Path, dropped: set[str] = frozenset()) -> None:
    src, dst = members(in_dir), members(out_dir)
    assert set(dst) == set(src) - set(dropped)
    for key, fields in dst.items():
        assert set(fields) == set(src[key]) | {"regions.npz"}
        for f, data in src[key].items():
            if f != "regions.npz":
                assert fields[f] == data, (key, f)


def mtimes(d: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(d.iterdir())}


# -- (a) UNITER npz ---------------------------------------------------------------------------------------------------
NPZ_CLASSES = ["circle", "square", "cube", "ball"]  # + background at 0 -> C = 5


def make_npz(d: Path, i: int, name: str, n: int, dim: int = 16, *, drop: str | None = None) -> dict:
    rng = np.random.default_rng(i)
    x1, y1 = rng.uniform(0, 0.5, n), rng.uniform(0, 0.5, n)
    x2, y2 = x1 + rng.uniform(0.1, 0.5, n), y1 + rng.uniform(0.1, 0.5, n)
    w, h = x2 - x1, y2 - y1
    soft = rng.uniform(0, 0.1, (n, 5))
    soft[:, 0] = 0.9  # background wins the raw argmax everywhere: labels must skip it
    for r in range(n):
        soft[r, 1 + (i + r) % 4] = 0.5  # the best object: NPZ_CLASSES[(i + r) % 4]
    a = {"features": rng.standard_normal((n, dim)).astype(np.float16),
         "norm_bb": np.stack([x1, y1, x2, y2, w, h], 1).astype(np.float16),
         "conf": rng.uniform(0, 1, n).astype(np.float16), "soft_labels": soft.astype(np.float16)}
    if drop:
        del a[drop]
    np.savez(d / name, **a)
    return a


@pytest.fixture
def npz_dir(tmp_path) -> tuple[Path, dict]:
    d = tmp_path / "img_db"
    d.mkdir()
    made = {0: make_npz(d, 0, "0.npz", 3), 1: make_npz(d, 1, "coco_train2014_000000000001.npz", 5),
            3: make_npz(d, 3, "coco_val2014_000000000003.npz", 1)}  # no file for image 2
    (d / "notes.txt").write_text("not an npz")
    return d, made


def test_npz_ingest_boxes_features_labels_and_missing_images_dropped(shards, npz_dir, tmp_path):
    d, made = npz_dir
    classes = tmp_path / "objects_vocab.txt"
    classes.write_text("\n".join(NPZ_CLASSES) + "\n")
    out = tmp_path / "out" / "regions" / "train"
    index = R.build(shards, out, npz_dir=d, classes=classes, progress=False)

    assert index == read_index(out)
    assert index["num_samples"] == 3 and index["shards"] == [{"name": "train-000000.tar", "samples": 2},
                                                             {"name": "train-000001.tar", "samples": 1}]
    assert index["skipped"] == {"missing_image": 1, "missing_regions": 1}  # upstream count kept, image 2 dropped
    spec = index["regions"]
    assert spec == {"dim": 16, "box_format": "xyxy_norm", "num_classes": 5, "classes": ["__background__", *NPZ_CLASSES],
                    "source": "npz", "backbone": R.DETECTOR, "fields": ["boxes", "cls_prob", "conf", "features",
                                                                       "labels"]}
    assert (out / index["tokenizer"]).resolve() == (shards.parent / "tok").resolve()  # "../tok" seen from out
    assert index["meta"]["karpathy"] == "dataset_coco.json"
    built = index["meta"]["regions_build"]
    assert built["regions"] == 9 and built["replaced_regions"] == 1 and built["mean_regions"] == 3

    got = regions_of(out)
    assert set(got) == {"coco-0", "coco-1", "coco-3"}
    for i, a in made.items():
        r = got[f"coco-{i}"]
        assert r["features"].dtype == np.float16 and np.array_equal(r["features"], a["features"])
        assert r["boxes"].dtype == np.float32 and np.array_equal(r["boxes"], a["norm_bb"][:, :4].astype(np.float32))
        assert np.array_equal(r["cls_prob"], a["soft_labels"]) and np.array_equal(r["conf"], a["conf"])
        assert list(r["labels"]) == [NPZ_CLASSES[(i + k) % 4] for k in range(len(a["features"]))]
    assert_originals_kept(shards, out, dropped={"coco-2"})


def test_npz_bad_keys_and_dimension_mismatch_are_errors_naming_the_file(shards, npz_dir, tmp_path, capsys):
    d, _ = npz_dir
    make_npz(d, 2, "2.npz", 2, drop="features")
    with pytest.raises(C.RecipeError, match=r"2\.npz: missing key 'features'; expected .*features \[N, D\]"):
        R.build(shards, tmp_path / "a", npz_dir=d, progress=False)
    make_npz(d, 2, "2.npz", 2, dim=8)
    with pytest.raises(C.RecipeError, match=r"2\.npz.*dimension 8.*0\.npz has 16"):
        R.build(shards, tmp_path / "b", npz_dir=d, progress=False)
    make_npz(d, 2, "2.npz", 2, drop="soft_labels")  # the first file has soft_labels: all must
    assert R.main(["--shards", str(shards), "--out", str(tmp_path / "c"), "--npz-dir", str(d), "--no-progress"]) == 2
    assert "2.npz: missing key 'soft_labels'" in capsys.readouterr().err
    # finished shards stay; the shard that failed left no tar, sidecar or index behind
    assert (tmp_path / "c" / "train-000000.tar.json").exists() and not (tmp_path / "c" / "train-000001.tar").exists()
    assert not (tmp_path / "c" / "index.json").exists()


def test_resume_skips_finished_shards_and_redoes_changed_ones(shards, npz_dir, tmp_path):
    d, _ = npz_dir
    out = tmp_path / "out"
    first = R.build(shards, out, npz_dir=d, progress=False)
    assert first["regions"]["classes"] is None and "labels" not in first["regions"]["fields"]
    t0 = mtimes(out)
    assert R.build(shards, out, npz_dir=d, progress=False) == first
    assert {k: v for k, v in mtimes(out).items() if k != "index.json"} == \
           {k: v for k, v in t0.items() if k != "index.json"}
    (out / "train-000001.tar.json").unlink()  # as if killed between the tar and its sidecar
    assert R.build(shards, out, npz_dir=d, progress=False) == first
    t1 = mtimes(out)
    assert t1["train-000000.tar"] == t0["train-000000.tar"] and t1["train-000001.tar"] != t0["train-000001.tar"]
    classes = tmp_path / "classes.txt"  # other options -> other output: every shard is redone
    classes.write_text("\n".join(["__background__", *NPZ_CLASSES]))
    third = R.build(shards, out, npz_dir=d, classes=classes, progress=False)
    assert third["regions"]["num_classes"] == 5 and "labels" in third["regions"]["fields"]
    assert all(mtimes(out)[f"train-00000{k}.tar"] != t1[f"train-00000{k}.tar"] for k in (0, 1))
    assert all("labels" in r for r in regions_of(out).values())


def test_bad_arguments(shards, tmp_path, capsys):
    assert R.main(["--shards", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), "--extract",
                   "--no-progress"]) == 2
    assert "index.json: not found" in capsys.readouterr().err
    with pytest.raises(C.RecipeError, match="never modified"):
        R.build(shards, shards, mode="extract", progress=False)
    with pytest.raises(C.RecipeError, match="choose one region source"):
        R.build(shards, tmp_path / "o", progress=False)
    with pytest.raises(SystemExit):  # argparse: the sources exclude each other
        R.main(["--shards", str(shards), "--out", str(tmp_path / "o"), "--extract", "--tsv", "x.tsv"])


def test_id_matching():
    assert R.id_key(391895) == R.id_key("391895") == R.id_key("coco_train2014_000000391895.npz") == 391895
    assert R.id_key("COCO_val2014_000000000042") == 42 and R.id_key("abc") == "abc"
    assert R.sample_id("vg-7", {"image_id": "7"}) == 7 and R.sample_id("cc-0012", None) == 12


# -- (a) BUTD TSV -----------------------------------------------------------------------------------------------------
def b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype=np.float32).tobytes()).decode()


def test_tsv_ingest_normalises_pixel_boxes_and_counts_malformed_lines(shards, tmp_path):
    rng = np.random.default_rng(7)
    rows, made = [], {}
    for i, (w, h) in {0: (640, 480), 2: (500, 375), 3: (100, 50)}.items():
        n = 2 + i
        boxes = np.stack([rng.uniform(0, w / 2, n), rng.uniform(0, h / 2, n), rng.uniform(w / 2, w, n),
                          rng.uniform(h / 2, h, n)], 1).astype(np.float32)
        feats, cls = rng.standard_normal((n, 6)).astype(np.float32), rng.dirichlet(np.ones(3), n).astype(np.float32)
        made[i] = (boxes / np.array([w, h, w, h], np.float32), feats, cls)
        img_id = f"COCO_train2014_{i:012d}" if i == 2 else str(i)
        rows.append("\t".join([img_id, str(w), str(h), str(n), b64(boxes), b64(feats), b64(cls)]))
    rows.insert(1, "1\t640\t480\t2\tAAAA")  # too few columns: image 1 has no usable line
    rows.append("2\t640\t480\t2\t" + "\t".join([b64(np.zeros((2, 4)))] * 3))  # a later duplicate: ignored
    rows.append("9\t640\t480\t1\tnot base64!\tx\ty")  # another image's line: never parsed, not counted
    tsv = tmp_path / "feats.tsv"
    tsv.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    index = R.build(shards, out, tsv=tsv, progress=False)
    assert index["skipped"] == {"malformed_line": 1, "missing_image": 1, "missing_regions": 1}
    assert index["regions"]["dim"] == 6 and index["regions"]["num_classes"] == 3
    assert index["meta"]["regions_build"]["tsv_scan"] == {"duplicate_line": 1, "lines": 6, "malformed_line": 1}
    got = regions_of(out)
    assert set(got) == {"coco-0", "coco-2", "coco-3"}
    for i, (boxes, feats, cls) in made.items():
        r = got[f"coco-{i}"]
        np.testing.assert_allclose(r["boxes"], boxes, rtol=1e-6)
        assert r["boxes"].min() >= 0 and r["boxes"].max() <= 1
        assert np.array_equal(r["features"], feats.astype(np.float16))
        assert np.array_equal(r["cls_prob"], cls.astype(np.float16))
    assert_originals_kept(shards, out, dropped={"coco-1"})

    # a malformed payload found when the line is used: counted, and its image dropped
    rows[0] = "0\t640\t480\t2\t" + b64(np.zeros((3, 4))) + "\t" + b64(np.zeros((2, 6))) + "\t" + b64(np.zeros((2, 3)))
    tsv.write_text("\n".join(rows) + "\n")
    index = R.build(shards, tmp_path / "out2", tsv=tsv, progress=False)
    assert index["skipped"] == {"malformed_line": 2, "missing_image": 1, "missing_regions": 2}
    assert index["num_samples"] == 2


# -- (b) extraction ---------------------------------------------------------------------------------------------------
EXTRACT = dict(mode="extract", backbone="resnet18", image_size=96, batch_size=3, progress=False)


def test_extract_global_plus_object_regions_deterministic(shards, tmp_path):
    pytest.importorskip("timm")
    a = R.build(shards, tmp_path / "a", **EXTRACT)
    b = R.build(shards, tmp_path / "b", **EXTRACT)
    for name in ("train-000000.tar", "train-000001.tar"):  # byte-equal shards (regions.npz included)
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    spec = a["regions"]
    assert spec["dim"] == 512 and spec["pretrained"] is False and spec["source"] == "extract"
    assert spec["classes"] == ["__background__", "circle", "cube", "square"] and spec["global_region"] is True
    assert a["num_samples"] == 4 and a["skipped"] == {"missing_image": 1}

    got = regions_of(tmp_path / "a")
    for i, (boxes, labels) in OBJECTS.items():
        r = got[f"coco-{i}"]
        n = len(boxes) + 1
        assert r["features"].shape == (n, 512) and r["features"].dtype == np.float16
        assert np.isfinite(r["features"].astype(np.float32)).all()
        want = np.array([[0, 0, 1, 1]] + [[x1 / W, y1 / H, x2 / W, y2 / H] for x1, y1, x2, y2 in boxes], np.float32)
        np.testing.assert_allclose(r["boxes"], want, rtol=1e-6)
        assert list(r["labels"]) == ["__background__", *labels]
        assert np.array_equal(r["cls_prob"].argmax(1), [spec["classes"].index(x) for x in r["labels"]])
        assert np.array_equal(r["cls_prob"].sum(1), np.ones(n))
        f = r["features"].astype(np.float32)
        for p in range(n):  # every region of an image has its own feature
            for q in range(p + 1, n):
                assert np.abs(f[p] - f[q]).max() > 1e-3, (i, p, q)
    # the same box on different images gives different features (the global region)
    assert np.abs(got["coco-0"]["features"][0].astype(np.float32)
                  - got["coco-3"]["features"][0].astype(np.float32)).max() > 1e-3
    assert_originals_kept(shards, tmp_path / "a")


def test_extract_with_a_weights_file_and_class_list(shards, tmp_path):
    timm = pytest.importorskip("timm")
    import torch

    torch.manual_seed(1)
    torch.save(timm.create_model("resnet18").state_dict(), tmp_path / "r18.pth")
    classes = tmp_path / "classes.txt"
    classes.write_text("ball\ncircle\ncube\nsquare\n")
    rng_before = torch.get_rng_state()
    idx = R.build(shards, tmp_path / "w", weights=tmp_path / "r18.pth", classes=classes, **EXTRACT)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the seeded init did not touch the caller's RNG
    spec = idx["regions"]
    assert spec["pretrained"] is True and spec["weights"] == "file:r18.pth"
    assert spec["classes"] == ["__background__", "ball", "circle", "cube", "square"]
    rand = R.build(shards, tmp_path / "r", **EXTRACT)
    w, r = regions_of(tmp_path / "w"), regions_of(tmp_path / "r")
    assert not np.array_equal(w["coco-0"]["features"], r["coco-0"]["features"])
    assert np.array_equal(w["coco-0"]["boxes"], r["coco-0"]["boxes"])
    classes.write_text("ball\ncircle\n")
    with pytest.raises(C.RecipeError, match=r"not in it, e\.g\. 'cube', 'square'"):
        R.build(shards, tmp_path / "x", classes=classes, **EXTRACT)
    assert rand["regions"]["weights"] == "random(seed=0)"


def test_npz_bytes_is_deterministic_and_loadable(monkeypatch):
    import time

    a = {"features": np.arange(6, dtype=np.float16).reshape(2, 3), "labels": np.array(["a", "bb"])}
    data = R.npz_bytes(a)
    real = time.localtime
    monkeypatch.setattr(time, "time", lambda: 2e9)  # another day: no clock in the bytes (np.savez stamps one)
    monkeypatch.setattr(time, "localtime", lambda t=None: real(2e9 if t is None else t))
    assert data == R.npz_bytes(dict(reversed(list(a.items()))))
    z = np.load(io.BytesIO(data), allow_pickle=False)
    assert np.array_equal(z["features"], a["features"]) and list(z["labels"]) == ["a", "bb"]
    assert json.dumps(sorted(z.files)) == '["features", "labels"]'


# -- (c) the embedded default: the simulated detector, in place, on the shapes world -------------------------------
SPLITS = ("coco/train", "coco/val", "coco/test", "vqa/train", "vqa/val", "vqa/test", "vg/train")
SHAPE_CLASSES = ["__background__", "circle", "cross", "diamond", "square", "triangle"]


def simulate(root: Path, **kw) -> list[dict]:
    ann = root / "raw" / "coco" / "annotations"
    return R.build_many([root / "shards" / s for s in SPLITS], mode="simulate", in_place=True, progress=False,
                        objects=[ann / "instances_train2017.json", ann / "instances_val2017.json"], **kw)


@pytest.fixture(scope="module")
def world(shapes_shards, tmp_path_factory) -> tuple[Path, list[dict]]:
    """A copy of the session's small shapes world (raw + shards), its shards given regions in place."""
    import shutil

    root = tmp_path_factory.mktemp("shapes_regions")
    shutil.copytree(shapes_shards.parent / "raw", root / "raw")
    shutil.copytree(shapes_shards, root / "shards")
    return root, simulate(root)


def samples_of(split_dir: Path) -> dict[str, dict]:
    """key -> {"json": dict, "regions": npz arrays} through the index."""
    out = {}
    for key, fields in members(split_dir).items():
        out[key] = {"json": json.loads(fields["json"]), "raw": fields,
                    "regions": dict(np.load(io.BytesIO(fields["regions.npz"]), allow_pickle=False))}
    return out


def test_simulate_spec_is_one_for_all_splits_and_the_shards_keep_every_member(world, shapes_shards):
    root, indices = world
    spec = indices[0]["regions"]
    assert all(i["regions"] == spec for i in indices)  # mixable: the data module compares specs
    assert spec["source"] == "simulate" and spec["dim"] == 128 and spec["box_format"] == "xyxy_norm"
    assert spec["classes"] == SHAPE_CLASSES and spec["num_classes"] == 6 and spec["pretrained"] is False
    assert spec["fields"] == ["boxes", "cls_prob", "features", "labels"]
    assert spec["feature_layout"] == [["rgb_grid", 0, 108], ["conv", 108, 128]]
    for split, index in zip(SPLITS, indices):
        before, d = read_index(shapes_shards / split), root / "shards" / split
        assert index == read_index(d)
        assert {k: v for k, v in index.items() if k not in ("regions", "meta")} == \
               {k: v for k, v in before.items() if k not in ("regions", "meta")}  # same shards, counts, tokenizer
        assert {k: v for k, v in index["meta"].items() if k != "regions_build"} == \
               {k: v for k, v in before["meta"].items() if k != "regions_build"}
        assert index["meta"]["regions_build"]["in_place"] is True
        assert_originals_kept(shapes_shards / split, d)
        for s in index["shards"]:  # the writing recipe's sidecar is untouched; ours sits beside it
            assert (d / f"{s['name']}.json").read_bytes() == (shapes_shards / split / f"{s['name']}.json").read_bytes()
            assert json.loads((d / f"{s['name']}.regions.json").read_text())["samples"] == s["samples"]


def test_simulate_boxes_labels_and_soft_class_distributions(world):
    root, _ = world
    n_regions, hits, rows, peaked, extra = [], [], 0, 0, 0
    coco_objects = {}
    for split in SPLITS:  # coco first: the VQA samples' objects are those of the same COCO images
        for key, s in samples_of(root / "shards" / split).items():
            js, r = s["json"], s["regions"]
            n = len(r["boxes"])
            assert r["features"].shape == (n, 128) and r["features"].dtype == np.float16
            assert r["boxes"].dtype == np.float32 and r["boxes"].min() >= 0 and r["boxes"].max() <= 1
            assert np.all(r["boxes"][:, 2] > r["boxes"][:, 0]) and np.all(r["boxes"][:, 3] > r["boxes"][:, 1])
            assert r["cls_prob"].shape == (n, 6) and r["cls_prob"].dtype == np.float16 and r["labels"].shape == (n,)
            p = r["cls_prob"].astype(np.float32)
            np.testing.assert_allclose(p.sum(1), 1.0, atol=3e-3)
            rows += n
            peaked += int((p.max(1) > 0.995).sum())
            if "objects" in js:
                objs = js["objects"]
            else:  # VQA shards carry no objects: they came from the instances file (the COCO sample's)
                objs = coco_objects[js["image_id"]]
            want = np.asarray(objs["boxes"], np.float32).reshape(-1, 4) / np.float32(js["width"])
            for b, name in zip(want, objs["labels"]):  # every object is a region, under its name
                j = int(np.abs(r["boxes"] - b).max(1).argmin())
                np.testing.assert_allclose(r["boxes"][j], b, atol=1e-6)
                assert r["labels"][j] == name
                hits.append(SHAPE_CLASSES[int(p[j].argmax())] == name)
            n_regions.append(n)
            extra += n - len(want)
            assert set(r["labels"]) <= set(SHAPE_CLASSES) and set(objs["labels"]) <= set(r["labels"])
            if split.startswith("coco"):
                coco_objects[js["image_id"]] = objs
    assert 0.85 <= np.mean(hits) < 1.0  # a detector that is mostly right
    assert peaked / rows < 0.1  # soft, not one-hot
    assert len(set(n_regions)) >= 4 and extra > 0 and min(n_regions) >= 1  # counts differ across images



def test_same_image_same_regions_across_sources(world):
    root, _ = world
    coco = {s["json"]["image_id"]: s["raw"]["regions.npz"] for s in samples_of(root / "shards" / "coco" / "val").values()}
    vqa = {s["json"]["image_id"]: s["raw"]["regions.npz"] for s in samples_of(root / "shards" / "vqa" / "val").values()}
    assert set(vqa) <= set(coco) and all(vqa[i] == coco[i] for i in vqa)  # same image bytes + same boxes


def test_simulated_features_carry_colour_shape_and_size(world):
    """A linear probe fitted on the train objects' features reads colour, shape and size off the test objects."""
    root, _ = world
    truth = {}  # image id -> its scene's objects (colour, shape, size, bbox in pixels)
    for split in ("train", "test"):
        for scene in json.loads((root / "raw" / f"scenes_{split}.json").read_text()).values():
            truth[scene["image_id"]] = scene["objects"]
    data = {}
    for split in ("train", "test"):
        xs, ys = [], []
        for s in samples_of(root / "shards" / "coco" / split).values():
            js, r = s["json"], s["regions"]
            for b in js["objects"]["boxes"]:
                objs = truth[js["image_id"]]
                o = objs[int(np.argmin([np.abs(np.subtract(x["bbox"], b)).max() for x in objs]))]
                j = int(np.abs(r["boxes"] - np.float32(b) / js["width"]).max(1).argmin())
                xs.append(r["features"][j].astype(np.float64))
                ys.append((o["colour"], o["shape"], o["size"]))
        data[split] = (np.stack(xs), ys)
    (xtr, ytr), (xte, yte) = data["train"], data["test"]
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    ftr, fte = (xtr - mu) / sd, (xte - mu) / sd
    for k, least in ((0, 0.95), (1, 0.9), (2, 0.85)):  # colour, shape, size (measured: 1.0, 1.0, 0.96)
        names = sorted({y[k] for y in ytr})
        t = np.eye(len(names))[[names.index(y[k]) for y in ytr]]
        w = np.linalg.solve(ftr.T @ ftr + 10.0 * np.eye(ftr.shape[1]), ftr.T @ t)  # ridge regression probe
        acc = np.mean([names[i] == y[k] for i, y in zip((fte @ w).argmax(1), yte)])
        assert acc >= least, (k, acc)


def test_region_only_batches_from_the_data_module(world, shards):
    import torch
    from torch.utils.data import DataLoader

    from vlp.data.config import ShardsDataConfig, SourceConfig
    from vlp.data.datamodule import ShardDataModule
    from vlp.data.shards import ShardFormatError
    from vlp.data.visual import Visual

    root, _ = world
    for split, extra in (("coco", {}), ("vqa", {"task": "vqa"})):
        d = root / "shards" / split
        cfg = ShardsDataConfig(train=[SourceConfig(str(d / "train"))], batch_size=8, images=False, regions=True,
                               test=str(d / "test"), eval_batch_size=8, **extra)
        dm = ShardDataModule(cfg)
        stream = dm.build_train_stream()
        stream.set_epoch(0)
        batches = list(DataLoader(stream, batch_size=None, num_workers=0))[:3]
        for b in batches + [next(iter(dm.test_dataloader()))]:
            assert "image" not in b and "image_aug" not in b
            f, m = b["region_features"], b["region_mask"]
            assert f.dtype == torch.float32 and f.shape[0] == 8 and f.shape[2] == 128
            assert b["region_boxes"].shape == (*f.shape[:2], 4) and b["region_cls_prob"].shape == (*f.shape[:2], 6)
            assert m.shape == f.shape[:2] and len(set(m.sum(1).tolist())) > 1  # region counts differ
            assert [len(x) for x in b["region_labels"]] == m.sum(1).tolist()
            assert (f[~m] == 0).all() and (b["region_cls_prob"][m].sum(-1) - 1).abs().max() < 3e-3
            v = Visual.from_batch(b)
            assert not v.has_pixels and v.has_regions and v.batch_size == 8 and v.labels == b["region_labels"]
            v.require("features", "boxes", "mask", "cls_prob", "labels", model="UNITER")
    # a directory without the spec (regions null in its index): refused
    with pytest.raises(ShardFormatError, match="'regions' is null but data.regions=true"):
        ShardDataModule(ShardsDataConfig(train=[SourceConfig(str(shards))], regions=True,
                                         images=False)).build_train_stream()


def test_in_place_rerun_skips_finished_shards_and_redoes_replaced_ones(world, shapes_shards):
    from data_recipes.shapes_shards import build_shapes

    root, first = world
    d = root / "shards"
    before = {s: mtimes(d / s) for s in SPLITS}
    assert simulate(root) == first  # nothing to do: no shard rewritten (the same indices)
    assert all({k: v for k, v in mtimes(d / s).items() if k != "index.json"} ==
               {k: v for k, v in before[s].items() if k != "index.json"} for s in SPLITS)
    # the writing recipes re-run: their sidecars find every shard finished, so the spec survives
    built = build_shapes(root / "raw", d, progress=False)
    assert built["coco"]["train"]["regions"] == first[0]["regions"]
    assert all(mtimes(d / s)[n] == before[s][n] for s in SPLITS for n in before[s] if n.endswith(".tar"))
    # a shard replaced by another writer (here: the same samples without regions.npz) is redone, and only it
    name = first[0]["shards"][0]["name"]
    write_shard(d / "coco" / "train" / name, [{"__key__": k, **{f: v for f, v in m.items() if f != "regions.npz"}}
                                              for k, m in R.iter_tar_samples(shapes_shards / "coco" / "train" / name)])
    t0 = mtimes(d / "coco" / "train")
    again = simulate(root)
    assert [i["regions"] for i in again] == [i["regions"] for i in first]
    assert [i["shards"] for i in again] == [i["shards"] for i in first]
    t1 = mtimes(d / "coco" / "train")
    assert [n for n in t1 if n.endswith(".tar") and t1[n] != t0[n]] == [name]
    assert "regions.npz" in members(d / "coco" / "train")["coco-1"]


def test_in_place_never_drops_a_sample(shards, tmp_path, npz_dir):
    import shutil

    d, _ = npz_dir  # no npz for image 2
    work = tmp_path / "train"
    shutil.copytree(shards, work)
    before = {p.name: p.read_bytes() for p in work.iterdir()}
    with pytest.raises(C.RecipeError, match=r"coco-2 gets no regions .*--in-place never drops a sample"):
        R.build(work, npz_dir=d, in_place=True, progress=False)
    after = {p.name: p.read_bytes() for p in work.iterdir() if not p.name.endswith(".regions.json")}
    assert after["train-000001.tar"] == before["train-000001.tar"]  # the failing shard is untouched
    assert read_index(work)["regions"] is None
    with pytest.raises(C.RecipeError, match="one --out per --shards"):
        R.build(work, npz_dir=d, progress=False)
    with pytest.raises(C.RecipeError, match="only with --extract or --simulate"):
        R.build(work, tmp_path / "o", npz_dir=d, objects=[tmp_path / "x.json"], progress=False)


def test_simulate_command_line_and_missing_objects(world, tmp_path, capsys):
    import shutil

    root, _ = world
    work = tmp_path / "vqa_test"
    shutil.copytree(root / "shards" / "vqa" / "test", work)
    # VQA shards carry no objects: with the wrong instances file (train2017; the test images are in val2017) every
    # sample is missing_objects, which in place is an error; meanwhile the index stays readable, without a spec
    ann = root / "raw" / "coco" / "annotations"
    argv = ["--shards", str(work), "--in-place", "--simulate", "--no-progress"]
    assert R.main(argv + ["--objects", str(ann / "instances_train2017.json")]) == 2
    assert "missing_objects: vqa-" in capsys.readouterr().err
    assert read_index(work)["regions"] is None and read_index(work)["num_samples"] > 0
    assert R.main(argv + ["--objects", str(ann / "instances_val2017.json")]) == 0
    assert read_index(work)["regions"]["dim"] == 128
    # a re-run rewrites nothing; --force rewrites every shard, into the same bytes (the detector is deterministic)
    t0, regions0 = mtimes(work), regions_of(work)
    assert R.main(argv + ["--objects", str(ann / "instances_val2017.json")]) == 0
    tars = [n for n in t0 if n.endswith(".tar")]
    assert tars and all(mtimes(work)[n] == t0[n] for n in tars)
    assert R.main(argv + ["--objects", str(ann / "instances_val2017.json"), "--force"]) == 0
    assert all(mtimes(work)[n] != t0[n] for n in tars)
    def as_bytes(regions):
        return {k: {f: np.asarray(a).tobytes() for f, a in v.items()} for k, v in regions.items()}

    assert as_bytes(regions_of(work)) == as_bytes(regions0) and regions0
    with pytest.raises(SystemExit):  # several directories only in place
        R.main(["--shards", str(work), str(work), "--out", str(tmp_path / "o"), "--simulate"])
