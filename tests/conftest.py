"""Test-wide settings: no network, deterministic seeds, few threads (CI has 2 cores)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    import random

    import numpy as np

    random.seed(0)
    np.random.seed(0)
    try:
        import torch

        torch.manual_seed(0)
    except ImportError:
        pass
    yield


@pytest.fixture(autouse=True)
def _signal_handlers():
    """Each test gets the process's signal handlers back: a training run in this process installs its own, and
    Lightning leaves Ctrl-C ignored after one; an ignored SIGINT would also be inherited by every later
    subprocess (a ``vlp pretrain`` started with SIGINT ignored never sees Ctrl-C)."""
    import signal

    names = ("SIGINT", "SIGTERM", "SIGUSR1")
    before = {name: signal.getsignal(getattr(signal, name)) for name in names}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    yield
    for name, handler in before.items():
        if handler is not None and signal.getsignal(getattr(signal, name)) is not handler:
            signal.signal(getattr(signal, name), handler)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module of tiny models: they gain nothing from a second thread, and on a shared
    2-core machine OpenMP's spinning threads multiply the wall time. Restored for the other modules. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def shapes_shards(tmp_path_factory):
    """A small shapes world (96/16/24 images at 32 px) through the real recipes: coco, vg, vqa shards + tokenizer,
    with simulated-detector regions.npz in every shard (as `make shapes-regions`) and MVPTR's phrase vocabulary."""
    from data_recipes.shapes import generate
    from data_recipes.shapes_shards import build_shapes

    root = tmp_path_factory.mktemp("shapes")
    generate(root / "raw", seed=0, train=96, val=16, test=24, image_size=32, progress=False)
    build_shapes(root / "raw", root / "shards", progress=False)
    # region features in place (make shapes-regions), so that region models read the same shard directories
    from data_recipes.regions import build_many

    ann = root / "raw" / "coco" / "annotations"
    build_many([root / "shards" / s for s in ("coco/train", "coco/val", "coco/test", "vqa/train", "vqa/val",
                                               "vqa/test", "vg/train")],
               mode="simulate", in_place=True, progress=False,
               objects=[ann / "instances_train2017.json", ann / "instances_val2017.json"])
    # MVPTR's phrase vocabulary beside the tokenizer (make shapes-phrases), from the training captions
    from data_recipes.phrase_vocab import main as phrase_vocab

    assert phrase_vocab(["--shards", str(root / "shards" / "coco" / "train"), "--min-count", "3",
                         "--no-progress"]) == 0
    return root / "shards"
