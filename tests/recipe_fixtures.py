"""Tiny raw datasets in their PUBLIC layouts (COCO, Karpathy, Visual Genome, img2dataset, VQA v2, NLVR2) for the
recipe tests. Each builder writes into a root folder and returns what a correct recipe must produce from it; bad
inputs are planted on purpose (a missing image, a truncated JPEG, empty captions, a malformed line, a failed
download), and the expected counts are written out by hand next to them.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from PIL import Image


def jpeg(w: int = 32, h: int = 24, color=(200, 30, 30), quality: int = 90) -> bytes:
    b = io.BytesIO()
    Image.new("RGB", (w, h), color).save(b, "JPEG", quality=quality)
    return b.getvalue()


def png(w: int = 32, h: int = 24, color=(30, 30, 200)) -> bytes:
    b = io.BytesIO()
    Image.new("RGB", (w, h), color).save(b, "PNG")
    return b.getvalue()


def truncated_jpeg() -> bytes:
    import numpy as np

    rng = np.random.default_rng(0)
    b = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(b, "JPEG", quality=95)
    data = b.getvalue()
    return data[: len(data) // 2]


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def write_json(path: Path, obj) -> Path:
    return write(path, json.dumps(obj).encode())


# -- COCO (+ Karpathy + phrases) --------------------------------------------------------------------------------------
COCO_TRAIN = {  # id -> (captions, image bytes or None for a missing file, file name)
    1: (["A red circle.", "a circle on the left"], "jpg", "000000000001.jpg"),
    2: (["a missing image"], None, "000000000002.jpg"),
    3: (["a truncated image"], "truncated", "000000000003.jpg"),
    4: (["", "a blue square"], "jpg", "000000000004.jpg"),
    5: (["  ", ""], "jpg", "000000000005.jpg"),
    6: (["a png image"], "png", "000000000006.png"),
}
COCO_VAL = {11: (["val one"], "jpg", "000000000011.jpg"), 12: (["val two", "val two again"], "jpg",
                                                               "000000000012.jpg")}
COCO_KARPATHY = {1: "train", 2: "train", 3: "test", 4: "restval", 5: "restval", 6: "restval", 11: "val", 12: "test"}


def _bytes(kind, i):
    return {"jpg": jpeg(32 + i, 24, (10 * i, 100, 50)), "png": png(20, 10 + i), "truncated": truncated_jpeg()}[kind]


def make_coco(root: Path, *, instances: bool = True) -> dict:
    """COCO 2017 layout + a 2014-style Karpathy file (images found by cocoid) + phrases side files."""
    files = {}
    for split, table in (("train", COCO_TRAIN), ("val", COCO_VAL)):
        images, anns = [], []
        for i, (caps, kind, name) in table.items():
            images.append({"id": i, "file_name": name, "width": 1, "height": 1})
            anns += [{"id": 100 * i + j, "image_id": i, "caption": c} for j, c in enumerate(caps)]
            if kind is not None:
                files[i] = write(root / f"{split}2017" / name, _bytes(kind, i)).read_bytes()
        write_json(root / "annotations" / f"captions_{split}2017.json", {"images": images, "annotations": anns})
    if instances:
        cats = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}]
        write_json(root / "annotations" / "instances_train2017.json", {
            "categories": cats, "images": [{"id": i} for i in COCO_TRAIN],
            "annotations": [
                {"id": 1, "image_id": 1, "bbox": [1, 2, 10, 20], "category_id": 1, "iscrowd": 0},
                {"id": 2, "image_id": 1, "bbox": [0, 0, 30, 20], "category_id": 2, "iscrowd": 1},  # crowd: dropped
                {"id": 3, "image_id": 4, "bbox": [2.5, 3, 4, 5], "category_id": 2, "iscrowd": 0}]})
        write_json(root / "annotations" / "instances_val2017.json",
                   {"categories": cats, "images": [{"id": 11}, {"id": 12}], "annotations": []})
    kimages = []
    for i, split in COCO_KARPATHY.items():
        caps, _, _ = COCO_TRAIN.get(i) or COCO_VAL[i]
        origin = "train2014" if i in COCO_TRAIN else "val2014"
        fp, fn = (origin, f"COCO_{origin}_{i:012d}.jpg") if i != 6 else ("train2017", "000000000006.png")
        kimages.append({"filepath": fp, "filename": fn, "cocoid": i, "split": split,
                        "sentences": [{"raw": c, "tokens": c.lower().split()} for c in caps]})
    write_json(root / "dataset_coco.json", {"images": kimages, "dataset": "coco"})
    # per caption, its concept tuples (object / object-attribute / subject-relation-object), as the shapes world
    # and MVPTR's SPICE parses write them; image 6 has two phrase lists for its one caption (a mismatch)
    write_json(root / "phrases_train.json", {"1": [[["circle"], ["circle", "red"]], [["circle", "left of", "x"]]],
                                             "4": [[["x"]], [["square", "blue"]]], "6": [[["a"]], [["b"]]]})
    write_json(root / "phrases_val.json", {"11": [[["val"]]]})
    return {"files": files}


# -- Flickr30k --------------------------------------------------------------------------------------------------------
def make_flickr30k(root: Path) -> dict:
    files = {"100": write(root / "flickr30k-images" / "100.jpg", jpeg(40, 30)).read_bytes(),
             "200": write(root / "flickr30k-images" / "200.jpg", jpeg(30, 40)).read_bytes()}
    write_json(root / "dataset_flickr30k.json", {"dataset": "flickr30k", "images": [
        {"filename": "100.jpg", "imgid": 0, "split": "train",
         "sentences": [{"raw": "A dog runs."}, {"raw": ""}, {"tokens": ["two", "dogs"]}]},
        {"filename": "200.jpg", "imgid": 1, "split": "val", "sentences": [{"raw": "a cat"}]},
        {"filename": "300.jpg", "imgid": 2, "split": "test", "sentences": [{"raw": "missing"}]},
        {"imgid": 3, "split": "val", "sentences": [{"raw": "no file name"}]},  # malformed
    ]})
    return {"files": files}


# -- Visual Genome ----------------------------------------------------------------------------------------------------
def make_vg(root: Path) -> dict:
    write(root / "VG_100K" / "1.jpg", jpeg(40, 30))
    write(root / "VG_100K_2" / "2.jpg", jpeg(80, 60))  # twice the size image_data.json says: boxes rescale
    write(root / "VG_100K" / "4.jpg", jpeg(40, 30))
    url = "https://cs.stanford.edu/people/rak248/{}/{}.jpg"
    write_json(root / "image_data.json", [
        {"image_id": 1, "url": url.format("VG_100K", 1), "width": 40, "height": 30, "coco_id": 12, "flickr_id": None},
        {"image_id": 2, "url": url.format("VG_100K_2", 2), "width": 40, "height": 30, "coco_id": None},
        {"image_id": 3, "url": url.format("VG_100K", 3), "width": 40, "height": 30, "coco_id": 1},  # no file
        {"image_id": 4, "url": url.format("VG_100K", 4), "width": 40, "height": 30, "coco_id": 11},  # no regions
    ])
    reg = lambda i, p, x, y, w, h: {"region_id": 10 * i + x, "image_id": i, "phrase": p, "x": x, "y": y,  # noqa
                                    "width": w, "height": h}
    write_json(root / "region_descriptions.json", [
        {"id": 1, "regions": [reg(1, "red circle", 1, 2, 10, 5), reg(1, "", 0, 0, 3, 3), reg(1, "sky", 0, 0, 40, 10)]},
        {"id": 2, "regions": [reg(2, "blue square", 4, 4, 8, 8)]},
        {"id": 3, "regions": [reg(3, "gone", 0, 0, 1, 1)]},
        {"id": 4, "regions": [reg(4, " ", 0, 0, 1, 1)]},
    ])
    write_json(root / "objects.json", [
        {"image_id": 1, "objects": [{"object_id": 1, "x": 1, "y": 2, "w": 10, "h": 5, "names": ["circle"]}]},
        {"image_id": 2, "objects": [{"object_id": 2, "x": 0, "y": 0, "w": 4, "h": 4, "name": "square"}]},  # v1.0
    ])
    return {}


# -- img2dataset (CC / SBU) -------------------------------------------------------------------------------------------
def _i2d_samples():
    ok = lambda k, cap, w, h: {"status": "success", "url": f"http://x/{k}.jpg", "caption": cap, "key": k,  # noqa
                               "width": w, "height": h}
    return [  # (key, {ext: bytes})
        ("000000000", {"jpg": jpeg(20, 10), "txt": b"a photo of a cat",
                       "json": json.dumps(ok("000000000", "a photo of a cat", 20, 10)).encode()}),
        ("000000001", {"json": json.dumps({"status": "failed_to_download", "url": "http://x/1.jpg", "key":
                                           "000000001", "error_message": "404"}).encode()}),
        ("000000002", {"png": png(12, 8), "txt": b"a drawing",
                       "json": json.dumps(ok("000000002", "a drawing", 12, 8)).encode()}),
        ("000000003", {"jpg": jpeg(10, 10), "txt": b"  ", "json": json.dumps(ok("000000003", "", 10, 10)).encode()}),
        ("000000004", {"jpg": truncated_jpeg(), "txt": b"broken",
                       "json": json.dumps(ok("000000004", "broken", 64, 48)).encode()}),
    ]


def make_img2dataset(root: Path, fmt: str = "webdataset") -> dict:
    """Two img2dataset shards/folders: 00000 with 5 samples (1 failed, 1 png, 1 empty caption, 1 truncated),
    00001 with one good sample."""
    groups = {"00000": _i2d_samples(),
              "00001": [("000010000", {"jpg": jpeg(16, 16), "txt": b"second shard",
                                       "json": json.dumps({"status": "success", "key": "000010000"}).encode()})]}
    root.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, samples in groups.items():
        if fmt == "webdataset":
            with tarfile.open(root / f"{name}.tar", "w") as tar:
                for key, parts in samples:
                    for ext, data in parts.items():
                        info = tarfile.TarInfo(f"{key}.{ext}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
        else:
            for key, parts in samples:
                for ext, data in parts.items():
                    write(root / name / f"{key}.{ext}", data)
        for key, parts in samples:
            files[key] = parts
    # img2dataset writes these beside the shards (failed downloads are usually only counted here)
    write_json(root / "00000_stats.json", {"count": 7, "successes": 4, "failed_to_download": 2, "failed_to_resize": 1,
                                           "status_dict": {"success": 4}, "start_time": 1.5})
    write_json(root / "00001_stats.json", {"count": 1, "successes": 1, "failed_to_download": 0,
                                           "failed_to_resize": 0})
    return {"files": files}


# -- VQA v2 -----------------------------------------------------------------------------------------------------------
def _answers(*pairs):
    out = []
    for text, n in pairs:
        out += [text] * n
    return [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(out)]


VQA_TRAIN = [  # (question_id, image_id, question, answers, multiple_choice_answer)
    (10, 1, "What color is the circle?", _answers(("red", 3), ("Red.", 1), ("dark red", 2), ("orange", 4)), "red"),
    (11, 1, "How many shapes?", _answers(("two", 2), ("2", 1), ("3", 5), ("1", 2)), "3"),
    (20, 2, "Is there a dog?", _answers(("yes", 10)), "yes"),
    (21, 2, "Is there a square?", _answers(("yes", 1), ("no", 9)), "no"),
    (22, 2, "How many circles?", _answers(("2", 2), ("3", 1), ("none", 3), ("zero", 1), ("0", 3)), "2"),
    (30, 3, "Is it missing?", _answers(("yes", 10)), "yes"),
    (31, 2, "", _answers(("yes", 10)), "yes"),  # empty question
]
VQA_VAL = [
    (110, 11, "Is this val?", _answers(("yes", 10)), "yes"),
    (120, 12, "Is this test?", _answers(("no", 10)), "no"),
    (130, 13, "What is it?", _answers(("circle", 10)), "circle"),
]
VQA_KARPATHY = {1: "train", 2: "restval", 3: "train", 11: "restval", 12: "test", 13: "val"}


def make_vqa(root: Path) -> dict:
    for sub, table in (("train2014", VQA_TRAIN), ("val2014", VQA_VAL)):
        qs = [{"question_id": q, "image_id": i, "question": t} for q, i, t, _, _ in table]
        anns = [{"question_id": q, "image_id": i, "answers": a, "multiple_choice_answer": m, "answer_type": "other",
                 "question_type": "what"} for q, i, _, a, m in table]
        write_json(root / f"v2_OpenEnded_mscoco_{sub}_questions.json", {"questions": qs, "data_subtype": sub})
        write_json(root / f"v2_mscoco_{sub}_annotations.json", {"annotations": anns, "data_subtype": sub})
        for image_id in sorted({i for _, i, _, _, _ in table}):
            if image_id != 3:  # image 3 is missing
                write(root / sub / f"COCO_{sub}_{image_id:012d}.jpg", jpeg(20 + image_id, 20))
    # the test-std questions come without annotations
    write_json(root / "v2_OpenEnded_mscoco_test2015_questions.json",
               {"questions": [{"question_id": 210, "image_id": 21, "question": "Any answer?"}]})
    write(root / "test2015" / f"COCO_test2015_{21:012d}.jpg", jpeg(21, 21))
    write_json(root / "dataset_coco.json", {"images": [
        {"filepath": "train2017" if i < 10 else "val2017", "filename": f"{i:012d}.jpg", "cocoid": i, "split": s,
         "sentences": [{"raw": "x"}]} for i, s in VQA_KARPATHY.items()]})
    return {}


# -- NLVR2 ------------------------------------------------------------------------------------------------------------
def make_nlvr2(root: Path) -> dict:
    lines = [
        {"identifier": "train-1-0-0", "sentence": "The left image has a red circle.", "label": "True",
         "directory": 1, "left_url": "http://x/l.jpg", "right_url": "http://x/r.jpg"},
        {"identifier": "train-1-0-1", "sentence": "Both images are empty.", "label": "False", "directory": 1},
        "this line is not json",
        {"identifier": "train-2-0-0", "sentence": "", "label": "True", "directory": 2},
        {"identifier": "train-3-0-0", "sentence": "Its images are missing.", "label": "True", "directory": 3},
        {"identifier": "train-4-0-0", "sentence": "A bad label.", "label": "maybe", "directory": 4},
    ]
    (root).mkdir(parents=True, exist_ok=True)
    (root / "train.json").write_text("\n".join(ln if isinstance(ln, str) else json.dumps(ln) for ln in lines) + "\n")
    (root / "dev.json").write_text(json.dumps({"identifier": "dev-5-1-0", "sentence": "dev sentence",
                                               "label": "False"}) + "\n")
    files = {
        "train-1-0-img0": write(root / "images" / "train" / "1" / "train-1-0-img0.png", png(30, 20)).read_bytes(),
        # as in the real data, a JPEG under a .png name: kept byte for byte
        "train-1-0-img1": write(root / "images" / "train" / "1" / "train-1-0-img1.png", jpeg(25, 20)).read_bytes(),
        "train-2-0-img0": write(root / "images" / "train" / "2" / "train-2-0-img0.png", png()).read_bytes(),
        "train-2-0-img1": write(root / "images" / "train" / "2" / "train-2-0-img1.png", png()).read_bytes(),
        "dev-5-1-img0": write(root / "dev" / "dev-5-1-img0.png", png(10, 12)).read_bytes(),
        "dev-5-1-img1": write(root / "dev" / "dev-5-1-img1.png", png(12, 10)).read_bytes(),
    }
    return {"files": files}
