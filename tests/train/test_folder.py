"""``--dataset folder``: a user's image folders streamed through torchvision (layout, splits, transforms, sampling
over processes, exact resume inside an epoch, bad data), on small generated JPEG and PNG files.

Most tests need torchvision and pillow (the ``effdense[vision]`` extra, absent beside CI's CPU torch): they are
skipped there and run in the GPU-stack venv."""
import json
import os
import sys

import pytest
import torch

from effdense import train
from effdense.train import checkpoints as checkpoint_io
from effdense.train import eval as eval_cli
from effdense.train.data import DataError, load_dataset
from effdense.train.data import folder as F

SIZE = 16  # --image-size of these tests
OPTS = {"workers": 0, "image_size": SIZE}  # load_folder's options
TINY = ["--dataset", "folder", "--device", "cpu", "--depth", "10", "--growth-rate", "4", "--no-progress",
        "--backend", "naive", "--image-size", str(SIZE), "--batch-size", "4"]


@pytest.fixture
def vision():
    pytest.importorskip("torchvision")
    from PIL import Image
    return Image


def color(label: int, i: int) -> tuple[int, int, int]:
    return (40 + 60 * label, (37 * i) % 256, 200 - 50 * label)


def write(Image, path, rgb=(10, 20, 30), size=(24, 20), mode="RGB", exif=None, texture=False):
    """An image of one colour, or (``texture``) that colour plus a ramp, so that each crop and flip differs."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = Image.new("RGB", size, rgb)
    if texture:
        import numpy as np
        ramp = np.add.outer(np.arange(size[1]) * 3, np.arange(size[0]) ** 2)[..., None] + np.array(rgb)
        img = Image.fromarray((ramp % 256).astype(np.uint8), "RGB")
    img = img.convert(mode) if mode != "RGB" else img
    img.save(path, **({"exif": exif} if exif is not None else {}))
    return path


def make_folder(Image, root, counts=None, val=True, ext=(".jpg", ".png")):
    """``root/train/<class>/`` with ``counts[class]`` images (JPEG and PNG in turn), ``root/val`` with 2 a class."""
    counts = counts or {"cat": 6, "dog": 6}
    for split, per in [("train", counts), ("val", {c: 2 for c in counts})] if val else [("train", counts)]:
        for label, (c, n) in enumerate(sorted(per.items())):
            for i in range(n):
                write(Image, os.path.join(root, split, c, f"{i}{ext[i % len(ext)]}"), color(label, i), texture=True)
    return str(root)


def test_missing_torchvision_fails_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(DataError, match=r"pip install 'effdense\[vision\]'") as err:
        load_dataset("folder", str(tmp_path))
    assert "\n" not in str(err.value)
    with pytest.raises(SystemExit, match=r"^effdense-train: --dataset folder needs torchvision.*effdense\[vision\]"):
        train.main([*TINY, "--data-dir", str(tmp_path), "--output-dir", str(tmp_path / "out")])


@pytest.mark.parametrize("argv,message", [
    (["--dataset", "synthetic", "--image-size", "64"], "--image-size applies to --dataset folder only"),
    (["--dataset", "cifar10", "--workers", "2", "--skip-bad-images"], "--workers, --skip-bad-images apply to"),
    (["--dataset", "folder"], "--dataset folder needs --data-dir ROOT"),
])
def test_folder_arguments_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        train.main(argv)
    assert message in capsys.readouterr().err


def test_layout_classes_and_ignored_files(vision, tmp_path):
    root = make_folder(vision, tmp_path)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / "cat" / ".hidden.jpg").write_bytes(b"junk")
    write(vision, str(tmp_path / "train" / "dog" / "nested" / "deep.JPEG"), color(1, 9))
    data = load_dataset("folder", root, folder=OPTS)
    assert data.classes == ["cat", "dog"] and data.num_classes == 2 and data.in_channels == 3
    assert len(data.train) == 13 and data.val is None and len(data.test) == 4
    assert data.train.labels.tolist() == [0] * 6 + [1] * 7
    assert any(p.endswith("deep.JPEG") for p, _ in data.train.samples)
    assert (data.mean, data.std) == (F.IMAGENET_MEAN, F.IMAGENET_STD)


def test_test_folder_beside_val(vision, tmp_path):
    import shutil
    root = make_folder(vision, tmp_path, {"a": 3, "b": 3})
    shutil.copytree(tmp_path / "val", tmp_path / "test")
    write(vision, str(tmp_path / "test" / "a" / "extra.png"), color(0, 5))
    data = load_dataset("folder", root, folder=OPTS)
    assert len(data.test) == 5 and len(data.val) == 4
    assert all(p.startswith(str(tmp_path / "test")) for p, _ in data.test.samples)
    held = load_dataset("folder", root, val_size=2, folder=OPTS)  # --val-size: validation from train/
    assert len(held.train) == len(held.val) * 2 == 4 and len(held.test) == 5


def test_stratified_split(vision, tmp_path):
    counts = {"a": 10, "b": 20, "c": 30}
    root = make_folder(vision, tmp_path, counts, val=False)
    data = load_dataset("folder", root, val_size=12, folder=OPTS)
    assert data.test is data.val  # no val/ or test/: the held-out images are the test split too
    assert torch.bincount(data.val.labels).tolist() == [12 * n // 60 for n in counts.values()]
    train_files, val_files = {p for p, _ in data.train.samples}, {p for p, _ in data.val.samples}
    assert not train_files & val_files and len(train_files | val_files) == 60
    again = load_dataset("folder", root, val_size=12, folder=OPTS)
    assert again.val.samples == data.val.samples
    other = load_dataset("folder", root, val_size=12, split_seed=1, folder=OPTS)
    assert other.val.samples != data.val.samples
    train_part, val_part = F.stratified_split([0, 1, 1, 1, 1], 2)
    assert [0, 1, 1, 1, 1][train_part[0]] == 0 and len(val_part) == 2  # a class of one image keeps it
    with pytest.raises(ValueError, match="--val-size 60 must be in"):
        F.stratified_split([0] * 60, 60)
    with pytest.raises(DataError, match="no val/ .* pass --val-size N"):
        load_dataset("folder", root, folder=OPTS)


def test_transforms(vision, tmp_path):
    rgb = (200, 100, 50)
    path = write(vision, str(tmp_path / "x.png"), rgb, size=(40, 30))
    image = F.load_image(path)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    expect = torch.tensor([(v / 255 - m) / s for v, m, s in zip(rgb, mean, std)]).view(3, 1, 1)
    for is_train in (True, False):
        x = F.transform(SIZE, mean, std, is_train)(image)
        assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.float32
        torch.testing.assert_close(x, expect.expand(3, SIZE, SIZE), atol=1e-5, rtol=0)
    from torchvision.transforms import v2
    resize = F.transform(SIZE, mean, std, False).transforms[0]
    assert isinstance(resize, v2.Resize) and resize.size == [round(SIZE / F.EVAL_CROP)]


def test_sampler_each_image_once_per_epoch_over_two_ranks():
    n, b, world = 23, 4, 2
    ranks = [F.EpochBatches(n, b, world, r, seed=3) for r in range(world)]
    orders = []
    for epoch in range(2):
        steps = []
        for s in ranks:
            s.set_epoch(epoch)
            steps.append(list(s))
        assert all(len(x) == n // (b * world) == len(s) for x, s in zip(steps, ranks))
        seen = [i for rank_steps in steps for batch in rank_steps for i, _ in batch]
        assert len(seen) == len(set(seen)) == n // (b * world) * b * world
        orders.append(seen)
        ranks[0].set_epoch(epoch, start=1)
        assert list(ranks[0]) == steps[0][1:]
    assert orders[0] != orders[1]
    evals = [list(F.EpochBatches(n, b, world, r, shuffle=False)) for r in range(world)]
    assert sorted(i for e in evals for batch in e for i, seed in batch) == list(range(n))
    assert all(len(e) == len(F.EpochBatches(n, b, world, r, shuffle=False)) for r, e in enumerate(evals))


def test_stream_same_batches_with_workers_and_from_a_step(vision, tmp_path):
    data = load_dataset("folder", make_folder(vision, tmp_path, {"a": 9, "b": 8}), folder=OPTS)
    stream = lambda split, **kw: [(x.clone(), y) for x, y in split.stream(4, torch.device("cpu"), seed=5,  # noqa
                                                                         shuffle=True, epoch=1, **kw)]
    whole = stream(data.train)
    assert len(whole) == 17 // 4 and whole[0][0].shape == (4, 3, SIZE, SIZE)
    workers = data.train.subset(range(len(data.train)))
    workers.workers = 2
    for (x, y), (x2, y2) in zip(whole, stream(workers)):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    for (x, y), (x2, y2) in zip(whole[2:], stream(data.train, start=2), strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)


@pytest.mark.parametrize("bad", ["garbage", "truncated"])
def test_unreadable_image_stops_or_is_skipped(vision, tmp_path, bad):
    root = make_folder(vision, tmp_path, {"a": 4, "b": 4})
    path = tmp_path / "train" / "a" / "1.png"
    path.write_bytes(b"not an image at all" if bad == "garbage" else path.read_bytes()[:60])
    data = load_dataset("folder", root, folder=OPTS)
    with pytest.raises(DataError, match=f"cannot read image {path} .*--skip-bad-images"):
        list(data.train.stream(8, torch.device("cpu")))
    data = load_dataset("folder", root, folder=dict(OPTS, skip_bad=True))
    batches = list(data.train.stream(8, torch.device("cpu")))
    assert [len(y) for _, y in batches] == [7] and data.train.skipped == [str(path)]


def test_class_folders_must_match(vision, tmp_path):
    root = make_folder(vision, tmp_path, {"cat": 2, "dog": 2})
    os.rename(tmp_path / "val" / "dog", tmp_path / "val" / "dogs")
    with pytest.raises(DataError, match=r"differ: only in train/: dog; only in val/: dogs"):
        load_dataset("folder", root, folder=OPTS)


def test_empty_class_and_no_images(vision, tmp_path):
    root = make_folder(vision, tmp_path, {"cat": 2, "dog": 2})
    for f in (tmp_path / "val" / "dog").iterdir():
        f.unlink()
    assert len(load_dataset("folder", root, folder=OPTS).test) == 2  # an empty val/ class is fine
    os.makedirs(tmp_path / "train" / "emu")
    os.makedirs(tmp_path / "val" / "emu")
    with pytest.raises(DataError, match=r"class folder\(s\) with no images: emu"):
        load_dataset("folder", root, folder=OPTS)
    empty = tmp_path / "empty"
    os.makedirs(empty / "train" / "a")
    (empty / "train" / "a" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="holds no images"):
        load_dataset("folder", str(empty), folder=OPTS)
    with pytest.raises(DataError, match="has no train/ folder"):
        load_dataset("folder", str(tmp_path / "nowhere"), folder=OPTS)


def test_modes_converted_to_rgb(vision, tmp_path):
    import numpy as np
    grey = F.load_image(write(vision, str(tmp_path / "g.png"), (90, 90, 90), mode="L"))
    rgba = F.load_image(write(vision, str(tmp_path / "a.png"), (1, 2, 3), mode="RGBA"))
    wide = np.full((5, 7), 40000, dtype=np.uint16)
    vision.fromarray(wide).save(tmp_path / "w.png")  # a 16-bit greyscale PNG
    deep = F.load_image(str(tmp_path / "w.png"))
    for img in (grey, rgba, deep):
        assert img.mode == "RGB"
    assert grey.getpixel((0, 0)) == (90, 90, 90) and rgba.getpixel((0, 0)) == (1, 2, 3)
    assert deep.getpixel((0, 0)) == (round(40000 / 257),) * 3


def test_exif_rotation_applied(vision, tmp_path):
    exif = vision.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    path = write(vision, str(tmp_path / "r.jpg"), size=(40, 20), exif=exif)
    assert vision.open(path).size == (40, 20) and F.load_image(path).size == (20, 40)


def test_train_resume_inside_epoch_exact(vision, tmp_path, capsys):
    """...and effdense-eval reads the run's folder dataset again, with the run's options."""
    root = make_folder(vision, tmp_path / "data", {"a": 7, "b": 6})  # 13 images, batch 4: 3 steps an epoch
    common = [*TINY, "--data-dir", root, "--epochs", "2", "--workers", "0"]
    train.main([*common, "--output-dir", str(tmp_path / "whole")])
    train.main([*common, "--output-dir", str(tmp_path / "cut"), "--max-steps", "4", "--workers", "1"])
    assert checkpoint_io.load(str(tmp_path / "cut" / "last.pt"))["step"] == 1
    train.main([*common, "--output-dir", str(tmp_path / "cut"), "--resume", "--workers", "2"])
    a, b = (checkpoint_io.load(str(tmp_path / d / "last.pt"))["model"] for d in ("whole", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    results = json.loads((tmp_path / "whole" / "results.json").read_text())
    assert results["epochs_done"] == 2 and 0 <= results["test_acc"] <= 1
    capsys.readouterr()
    eval_cli.main([str(tmp_path / "whole" / "last.pt"), "--device", "cpu", "--backend", "naive", "--json"])
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["images"] == 4 and evaluated["accuracy"] == results["test_acc"]


def test_train_skips_bad_images_and_counts_them(vision, tmp_path, capsys):
    root = make_folder(vision, tmp_path / "data", {"a": 5, "b": 4})
    bad = tmp_path / "data" / "train" / "b" / "0.jpg"
    bad.write_bytes(b"\xff\xd8\xff broken")
    common = [*TINY, "--data-dir", root, "--epochs", "1", "--workers", "0", "--batch-size", "9"]
    with pytest.raises(SystemExit, match=f"cannot read image {bad}"):
        train.main([*common, "--output-dir", str(tmp_path / "stop")])
    train.main([*common, "--output-dir", str(tmp_path / "skip"), "--skip-bad-images"])
    log = json.loads((tmp_path / "skip" / "log.json").read_text())
    assert log["epochs"][-1]["skipped_images"] == 1
    assert "1 unreadable images skipped" in capsys.readouterr().out


def test_real_photographs(vision, tmp_path):
    """scikit-learn's two sample photographs (427x640 JPEGs), one class each."""
    import shutil
    sk = pytest.importorskip("sklearn.datasets")
    for split in ("train", "val"):
        for i, path in enumerate(sk.load_sample_images().filenames):
            os.makedirs(tmp_path / split / f"c{i}")
            shutil.copy(path, tmp_path / split / f"c{i}")
    data = load_dataset("folder", str(tmp_path), folder=OPTS)
    (x, y), = data.train.stream(2, torch.device("cpu"), shuffle=True)
    (xt, yt), = data.test.stream(2, torch.device("cpu"))
    assert x.shape == xt.shape == (2, 3, SIZE, SIZE) and bool(x.isfinite().all() and xt.isfinite().all())
    assert sorted(y.tolist()) == yt.tolist() == [0, 1] and x.std() > 0.1


def test_two_processes_with_sync_bn_equal_one(vision, tmp_path):
    """torchrun, 2 gloo processes: each takes its half of every global batch, augmented from the same per-image
    seeds, so with --sync-bn the run equals one process on the whole batch."""
    from test_train_ddp import launch, max_diff
    root = make_folder(vision, tmp_path / "data", {"a": 10, "b": 10})  # 20 images, batch 8: into epoch 2
    args = ["--dataset", "folder", "--data-dir", root, "--image-size", str(SIZE), "--batch-size", "8"]
    stdout, synced = launch(tmp_path / "sync", *args, "--sync-bn", "--workers", "1")
    assert "2 process(es)" in stdout
    _, single = launch(tmp_path / "single", *args, "--workers", "0", nproc=1)
    assert max_diff(synced, single) < 1e-3
