"""Dataset readers on small files written in the exact on-disk formats, downloads, and the augmentation."""
import dataclasses
import gzip
import os
import pathlib
import pickle
import re
import sys
import tarfile

import numpy as np
import pytest
import torch

from effdense.train import data
from effdense.train.data import builtin, cifar
from effdense.train.data import CIFAR, Augment, DataError, Split, load_dataset

N = 6  # images per batch file


def _batch(rng, label_key, n=N, num_classes=10, bytes_keys=False):
    d = {"batch_label": "training batch", "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
         label_key: [int(v) for v in rng.integers(0, num_classes, n)],
         "filenames": [f"img{i}.png" for i in range(n)]}
    if label_key == "fine_labels":
        d["coarse_labels"] = [v // 5 for v in d[label_key]]
    return {k.encode(): v for k, v in d.items()} if bytes_keys else d


def write_cifar(folder, name, bytes_keys=False, seed=0):
    """Write ``name``'s batch files (python-pickle, protocol 2 as the originals) into ``folder``."""
    spec, rng = CIFAR[name], np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    num_classes = 10 if name == "cifar10" else 100
    batches = {}
    for f in (*spec.train_files, *spec.test_files):
        batches[f] = _batch(rng, spec.label_key, num_classes=num_classes, bytes_keys=bytes_keys)
        with open(os.path.join(folder, f), "wb") as fh:
            pickle.dump(batches[f], fh, protocol=2)
    meta = {spec.classes_key: [f"c{i}" for i in range(num_classes)], "num_cases_per_batch": N}
    if name == "cifar100":
        meta["coarse_label_names"] = [f"s{i}" for i in range(20)]
    with open(os.path.join(folder, spec.meta_file), "wb") as fh:
        pickle.dump({k.encode(): v for k, v in meta.items()} if bytes_keys else meta, fh, protocol=2)
    return batches


def _key(d, k):
    return d[k.encode()] if k.encode() in d else d[k]


@pytest.mark.parametrize("name,bytes_keys", [("cifar10", False), ("cifar100", True)])
def test_cifar_reader(tmp_path, name, bytes_keys):
    spec = CIFAR[name]
    batches = write_cifar(tmp_path / spec.folder, name, bytes_keys)
    ds = load_dataset(name, str(tmp_path), val_size=2, allow_download=False)
    n_train = N * len(spec.train_files)
    assert ds.train.images.shape == (n_train - 2, 3, 32, 32) and ds.train.images.dtype == torch.uint8
    assert len(ds.val) == 2 and ds.test.images.shape == (N, 3, 32, 32)
    assert ds.num_classes == (10 if name == "cifar10" else 100) and ds.classes[1] == "c1" and ds.in_channels == 3
    # the test split keeps file order: rows are R, G, B planes of 32x32, row-major
    raw = _key(batches[spec.test_files[0]], "data")
    assert torch.equal(ds.test.images[0].reshape(-1), torch.from_numpy(raw[0]))
    assert ds.test.images[1, 1, 0, 0] == raw[1, 1024] and ds.test.images[1, 2, 31, 31] == raw[1, 3071]
    assert ds.test.labels.tolist() == _key(batches[spec.test_files[0]], spec.label_key)
    # train + val together hold every training image exactly once
    all_train = torch.cat([ds.train.labels, ds.val.labels]).sort().values
    want = sorted(v for f in spec.train_files for v in _key(batches[f], spec.label_key))
    assert all_train.tolist() == want


def test_cifar_files_directly_in_data_dir(tmp_path):
    write_cifar(tmp_path, "cifar10")
    assert len(load_dataset("cifar10", str(tmp_path), allow_download=False).train) == 5 * N


def _tarball(tmp_path, name):
    spec = CIFAR[name]
    src = tmp_path / "src"
    write_cifar(src / spec.folder, name)
    path = tmp_path / "dl" / spec.tarball
    path.parent.mkdir()
    with tarfile.open(path, "w:gz") as tar:
        tar.add(src / spec.folder, arcname=spec.folder)
    return spec, path


def test_tarball_md5_checked_and_extracted(tmp_path, monkeypatch):
    spec, tarball = _tarball(tmp_path, "cifar10")
    root = tmp_path / "cache"
    root.mkdir()
    os.replace(tarball, root / spec.tarball)
    with pytest.raises(DataError, match=f"{spec.tarball}.*md5 is [0-9a-f]{{32}}.*published md5.*{spec.md5}"):
        load_dataset("cifar10", str(root), allow_download=False)
    assert not (root / spec.folder).exists()  # nothing half extracted
    monkeypatch.setitem(CIFAR, "cifar10", dataclasses.replace(spec, md5=cifar.md5sum(str(root / spec.tarball))))
    ds = load_dataset("cifar10", str(root), allow_download=False)
    assert len(ds.train) == 5 * N and (root / spec.folder / "data_batch_5").is_file()
    assert not [p for p in os.listdir(root) if p.startswith(".")]  # no temporary folders left


def test_download_with_md5(tmp_path, monkeypatch):
    spec, tarball = _tarball(tmp_path, "cifar100")
    url = tarball.as_uri()  # urllib reads file:// like https://
    monkeypatch.setitem(CIFAR, "cifar100", dataclasses.replace(spec, url=url, md5="0" * 32))
    root = tmp_path / "cache"
    root.mkdir()  # an explicit data folder must exist (a typo is not created)
    with pytest.raises(DataError, match="md5"):
        load_dataset("cifar100", str(root))
    assert os.listdir(root) == []  # the bad download was not kept
    monkeypatch.setitem(CIFAR, "cifar100", dataclasses.replace(spec, url=url, md5=cifar.md5sum(str(tarball))))
    ds = load_dataset("cifar100", str(root))
    assert len(ds.train) == N and ds.num_classes == 100


def test_offline_error_says_how_to_supply(tmp_path, monkeypatch):
    spec = CIFAR["cifar10"]
    monkeypatch.setitem(CIFAR, "cifar10", dataclasses.replace(spec, url="http://127.0.0.1:9/" + spec.tarball))
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", str(tmp_path))
    msg = str(err.value)
    assert "downloading" in msg and "--data-dir" in msg and spec.md5 in msg and "cifar-10-batches-py" in msg
    assert os.listdir(tmp_path) == []
    with pytest.raises(DataError, match="not found"):
        load_dataset("cifar10", str(tmp_path / "x"), allow_download=False)


def test_corrupt_and_incomplete_files(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder, "cifar10")
    good = (folder / "data_batch_3").read_bytes()
    (folder / "data_batch_3").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=r"data_batch_3 is corrupt.*md5 is [0-9a-f]{32}.*"
                                        + CIFAR["cifar10"].file_md5["data_batch_3"]) as err:
        load_dataset("cifar10", str(tmp_path), allow_download=False)
    # extracted files are read before a tarball: the advice removes them and puts the tarball where it is read
    msg, spec = str(err.value), CIFAR["cifar10"]
    assert f"Extracted files are read before any tarball, so delete the folder {folder}, then supply" in msg
    assert f"copy {spec.tarball} into {tmp_path};" in msg and f"into {folder}" not in msg
    with open(folder / "data_batch_3", "wb") as fh:
        pickle.dump({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}, fh, protocol=2)
    with pytest.raises(DataError, match=r"data_batch_3 is not in the CIFAR batch format.*uint8 \[N, 3072\]"):
        load_dataset("cifar10", str(tmp_path), allow_download=False)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match="incomplete: missing data_batch_3"):
        load_dataset("cifar10", str(tmp_path), allow_download=False)


def test_corrupt_file_directly_in_data_dir_advice(tmp_path):
    write_cifar(tmp_path, "cifar10")
    (tmp_path / "test_batch").write_bytes(b"garbage")
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", str(tmp_path), allow_download=False)
    assert f"delete the extracted files in {tmp_path} (data_batch_1, " in str(err.value)


def test_data_dir_typo_is_neither_created_nor_downloaded_into(tmp_path, monkeypatch):
    monkeypatch.setattr(cifar, "download", lambda *a: pytest.fail("a download was attempted"))
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", str(tmp_path / "typo" / "cifar"))
    assert str(err.value).startswith(f"data folder {tmp_path / 'typo' / 'cifar'} not found (--data-dir must be an "
                                     "existing folder; create it to download CIFAR-10 into it")
    assert os.listdir(tmp_path) == []


def test_digits_without_scikit_learn_names_the_extra(monkeypatch):
    """The message's extra is the one setup.py's extras_require gives scikit-learn under."""
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import fails
    with pytest.raises(DataError, match=re.escape(f"pip install 'effdense[{builtin.SKLEARN_EXTRA}]'")):
        load_dataset("digits")
    setup_py = (pathlib.Path(__file__).parents[2] / "setup.py").read_text()
    assert re.search(rf'"{builtin.SKLEARN_EXTRA}"\s*:\s*\[[^\]]*"scikit-learn', setup_py)


def test_digits():
    ds = load_dataset("digits", val_size=100)
    assert ds.train.images.shape == (1797 - 360 - 100, 3, 32, 32) and len(ds.test) == 360 and len(ds.val) == 100
    assert ds.num_classes == 10 and not ds.flip
    assert torch.equal(ds.train.images[:, 0], ds.train.images[:, 2])
    assert ds.train.images.max() > 200 and ds.train.images.min() == 0


def _idx(path, array, magic):
    raw = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape) + array.tobytes()
    if str(path).endswith(".gz"):
        raw = gzip.compress(raw)
    path.write_bytes(raw)


def test_fashion_mnist_idx(tmp_path):
    rng = np.random.default_rng(0)
    images = {p: rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for p, n in (("train", 12), ("t10k", 5))}
    for prefix, ext in (("train", ".gz"), ("t10k", "")):
        _idx(tmp_path / f"{prefix}-images-idx3-ubyte{ext}", images[prefix], 3)
        _idx(tmp_path / f"{prefix}-labels-idx1-ubyte{ext}", rng.integers(0, 10, len(images[prefix]),
                                                                         dtype=np.uint8), 1)
    ds = load_dataset("fashion-mnist", str(tmp_path), val_size=2)
    assert ds.train.images.shape == (10, 1, 32, 32) and ds.test.images.shape == (5, 1, 32, 32)
    assert torch.equal(ds.test.images[:, 0, 2:30, 2:30], torch.from_numpy(images["t10k"]))
    assert ds.test.images[:, :, :2].sum() == 0 and ds.classes[9] == "Ankle boot"
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x09abc")
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte is not a valid idx file"):
        load_dataset("fashion-mnist", str(tmp_path))
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", str(tmp_path / "missing"))


def test_validation_split():
    train = Split(torch.zeros(10, 3, 4, 4, dtype=torch.uint8), torch.arange(10))
    tr, val = data.split_validation(train, 3, seed=1)
    assert len(tr) == 7 and len(val) == 3
    assert sorted(tr.labels.tolist() + val.labels.tolist()) == list(range(10))
    assert torch.equal(val.labels, data.split_validation(train, 3, seed=1)[1].labels)
    assert data.split_validation(train, 0)[1] is None
    with pytest.raises(ValueError, match=r"--val-size 10 leaves no training images.*\[0, 9\]"):
        data.split_validation(train, 10)


def _devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _devices())
def test_augment_shapes_determinism_and_geometry(device):
    ds = load_dataset("synthetic")
    aug = Augment(ds.mean, ds.std)
    images = ds.train.images[:16].to(device)
    params = aug.draw(16, torch.Generator().manual_seed(3))
    out = aug(images, params)
    assert out.shape == (16, 3, 32, 32) and out.dtype == torch.float32 and out.device.type == device
    assert torch.equal(out, aug(images, aug.draw(16, torch.Generator().manual_seed(3))))
    assert not torch.equal(out, aug(images, aug.draw(16, torch.Generator().manual_seed(4))))
    assert params[:, :2].min() >= 0 and params[:, :2].max() <= 8 and set(params[:, 2].tolist()) <= {0, 1}
    norm = aug(images)
    # offsets (4, 4) without flip: identity; (0, 0): shifted down-right with zero (then normalized) padding
    p = torch.tensor([[4, 4, 0], [0, 0, 0], [4, 4, 1]]).repeat(6, 1)[:16]
    out = aug(images, p)
    assert torch.equal(out[0], norm[0]) and torch.equal(out[2], norm[2].flip(-1))
    assert torch.equal(out[1, :, 4:, 4:], norm[1, :, :-4, :-4])
    pad_value = aug.normalize(torch.zeros(1, 3, 1, 1, dtype=torch.uint8, device=device))[0, :, 0, 0]
    assert torch.allclose(out[1, :, :4, :], pad_value.view(3, 1, 1).expand(3, 4, 32))
    assert (aug.draw(100, torch.Generator())[:, 2] == 0).all() == (not aug.flip)
    assert (Augment(ds.mean, ds.std, flip=False).draw(50, torch.Generator())[:, 2] == 0).all()


def test_normalization_statistics():
    ds = load_dataset("synthetic")
    x = Augment(ds.mean, ds.std)(ds.train.images)
    assert torch.allclose(x.mean((0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(x.std((0, 2, 3)), torch.ones(3), atol=1e-3)
