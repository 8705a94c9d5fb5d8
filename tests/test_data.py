"""normlab.data: each accepted format round-trips exactly; lookup order, checksums, caching, errors.

Fixtures are small fakes generated in `tmp_path`. Each test gets its own cache (`NORMLAB_CACHE`), no
`NORMLAB_DATA`, an empty Debian path, no known md5s (fakes carry official names) and a network that
fails; the real-data tests put the shared copy and the official md5s back.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import normlab.data as data

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NORMLAB_DATA") or REPO.parent / "shared" / "data")
USER_CACHE = os.environ.get("NORMLAB_CACHE")
OFFICIAL_MD5 = dict(data.MD5)


@pytest.fixture(autouse=True)
def fetches(monkeypatch, tmp_path):
    """Isolate each test; returns the list of URLs a (failing) download was attempted for."""
    monkeypatch.setenv("NORMLAB_CACHE", str(tmp_path / "cache"))
    for var in ("NORMLAB_DATA", "NORMLAB_OFFLINE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "debian")
    monkeypatch.setattr(data, "MD5", {})
    urls = []

    def offline(url, dest):
        urls.append(url)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(data, "_fetch", offline)
    return urls


def md5(b: bytes) -> str:
    return data._md5(b)


# ---------------------------------------------------------------- fake Fashion-MNIST (IDX)

def idx(a: np.ndarray) -> bytes:
    return bytes([0, 0, 8, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()


def fake_fashion(folder: Path, seed=0, gz=True, n=(7, 3)) -> dict[str, np.ndarray]:
    """Write the four IDX files; return their arrays by stem."""
    rng = np.random.default_rng(seed)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n[0], 28, 28), dtype=np.uint8),
              "train-labels-idx1-ubyte": rng.integers(0, 10, n[0], dtype=np.uint8),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n[1], 28, 28), dtype=np.uint8),
              "t10k-labels-idx1-ubyte": rng.integers(0, 10, n[1], dtype=np.uint8)}
    folder.mkdir(parents=True, exist_ok=True)
    for stem, a in arrays.items():
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(idx(a)))
        else:
            (folder / stem).write_bytes(idx(a))
    return arrays


def assert_fashion(split, arrays):
    assert split.train_images.dtype == torch.uint8 and split.train_labels.dtype == torch.int64
    assert split.train_images.shape == (len(arrays["train-labels-idx1-ubyte"]), 1, 28, 28)
    for images, labels, stem in ((split.train_images, split.train_labels, "train"),
                                 (split.test_images, split.test_labels, "t10k")):
        assert torch.equal(images[:, 0], torch.from_numpy(arrays[f"{stem}-images-idx3-ubyte"]))
        assert torch.equal(labels, torch.from_numpy(arrays[f"{stem}-labels-idx1-ubyte"]).long())


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_idx_round_trip(tmp_path, monkeypatch, fetches, gz):
    arrays = fake_fashion(tmp_path / "d" / "fashion-mnist", gz=gz)
    monkeypatch.setenv("NORMLAB_DATA", str(tmp_path / "d"))
    split = data.fashion_mnist()
    assert_fashion(split, arrays)
    kind = "gzipped" if gz else "uncompressed"
    assert split.source == f"Fashion-MNIST IDX files ({kind}) at $NORMLAB_DATA/fashion-mnist"
    assert str(tmp_path) not in split.source and fetches == []  # found locally: no download


def test_fashion_root_argument(tmp_path):
    arrays = fake_fashion(tmp_path / "mine", gz=False)
    assert_fashion(data.fashion_mnist(root=tmp_path / "mine"), arrays)
    with pytest.raises(FileNotFoundError, match="Nothing downloaded: a root was given"):
        data.fashion_mnist(root=tmp_path / "elsewhere")


def test_lookup_order_data_then_cache_then_debian(tmp_path, monkeypatch):
    shared = fake_fashion(tmp_path / "d" / "fashion-mnist", seed=1)
    cached = fake_fashion(tmp_path / "cache" / "fashion-mnist", seed=2)
    debian = fake_fashion(tmp_path / "debian", seed=3)
    monkeypatch.setenv("NORMLAB_DATA", str(tmp_path / "d"))
    assert_fashion(split := data.fashion_mnist(), shared)
    assert split.source.endswith("at $NORMLAB_DATA/fashion-mnist")
    monkeypatch.setenv("NORMLAB_DATA", str(tmp_path / "nothing-here"))
    assert_fashion(split := data.fashion_mnist(), cached)
    assert split.source.endswith("at $NORMLAB_CACHE/fashion-mnist")
    (tmp_path / "cache" / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz").unlink()  # incomplete
    assert_fashion(split := data.fashion_mnist(), debian)
    assert split.source.endswith("at Debian's dataset-fashion-mnist")


def test_cache_dir_respects_xdg_and_home(tmp_path, monkeypatch):
    monkeypatch.delenv("NORMLAB_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.cache_dir() == tmp_path / "home" / ".cache" / "normlab"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.cache_dir() == tmp_path / "xdg" / "normlab"
    arrays = fake_fashion(tmp_path / "xdg" / "normlab" / "fashion-mnist")
    assert_fashion(split := data.fashion_mnist(), arrays)
    assert split.source.endswith("at $XDG_CACHE_HOME/normlab/fashion-mnist")


def test_fashion_offline_and_missing_names_every_fix(tmp_path, fetches):
    fake_fashion(tmp_path / "cache" / "fashion-mnist").pop("t10k-images-idx3-ubyte")
    (tmp_path / "cache" / "fashion-mnist" / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError) as err:
        data.fashion_mnist()
    msg = str(err.value)
    for needle in (str(tmp_path / "cache" / "fashion-mnist"), "missing t10k-images-idx3-ubyte.gz",
                   str(tmp_path / "debian"), "NORMLAB_DATA", "dataset-fashion-mnist",
                   data.FASHION_MNIST_URL, "network disabled in tests"):
        assert needle in msg
    assert fetches == [data.FASHION_MNIST_URL + "t10k-images-idx3-ubyte.gz"]  # only what's missing


def test_offline_env_var_skips_the_network(monkeypatch, fetches):
    monkeypatch.setenv("NORMLAB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="NORMLAB_OFFLINE"):
        data.fashion_mnist()
    assert fetches == []


def test_fashion_download_checks_then_renames(tmp_path, monkeypatch):
    source = fake_fashion(tmp_path / "server")
    for stem, a in source.items():
        monkeypatch.setitem(data.MD5, stem, md5(idx(a)))
    urls = []

    def fetch(url, dest):
        urls.append(url)
        assert dest.name.endswith(".part")  # never written under its final name
        dest.write_bytes((tmp_path / "server" / url.rsplit("/", 1)[1]).read_bytes())

    monkeypatch.setattr(data, "_fetch", fetch)
    split = data.fashion_mnist()
    assert_fashion(split, source)
    assert split.source.endswith("at $NORMLAB_CACHE/fashion-mnist") and len(urls) == 4
    assert sorted(p.name for p in (tmp_path / "cache" / "fashion-mnist").iterdir()) == sorted(
        f"{s}.gz" for s in source)
    data.fashion_mnist()
    assert len(urls) == 4  # the second call finds the cache

    # A download with the wrong content is refused and leaves nothing behind.
    for p in (tmp_path / "cache" / "fashion-mnist").iterdir():
        p.unlink()
    monkeypatch.setitem(data.MD5, "train-images-idx3-ubyte", "0" * 32)
    with pytest.raises(ValueError, match="checksum mismatch .*expected md5 0{32}"):
        data.fashion_mnist()
    assert not list((tmp_path / "cache" / "fashion-mnist").glob("*"))


def test_fashion_corrupt_files(tmp_path, monkeypatch):
    folder = tmp_path / "f"
    arrays = fake_fashion(folder, gz=False)
    path = folder / "train-images-idx3-ubyte"
    good = path.read_bytes()
    monkeypatch.setitem(data.MD5, path.name, md5(good))
    data.fashion_mnist(root=folder)  # the registered md5 passes

    path.write_bytes(good[:100] + bytes([good[100] ^ 1]) + good[101:])  # one flipped bit
    with pytest.raises(ValueError, match=r"checksum mismatch for .*train-images-idx3-ubyte: "
                                         r"expected md5 [0-9a-f]{32}, got .*delete it"):
        data.fashion_mnist(root=folder)

    monkeypatch.setattr(data, "MD5", {})  # unknown checksum: the IDX header still catches damage
    path.write_bytes(good[:-5])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte: the IDX header promises"):
        data.fashion_mnist(root=folder)
    path.write_bytes(b"\x00\x00\x0d\x03" + good[4:])  # float IDX, not unsigned bytes
    with pytest.raises(ValueError, match="train-images-idx3-ubyte is not an IDX file"):
        data.fashion_mnist(root=folder)

    path.unlink()
    gz = folder / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gzip.compress(good)[:-10])  # truncated download
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz is not a complete gzip"):
        data.fashion_mnist(root=folder)
    labels = folder / "t10k-labels-idx1-ubyte"
    gz.write_bytes(gzip.compress(good))
    labels.write_bytes(idx(arrays["t10k-labels-idx1-ubyte"][:-1]))  # one label short
    with pytest.raises(ValueError, match="are not N images and N labels"):
        data.fashion_mnist(root=folder)


# ---------------------------------------------------------------- fake CIFAR-10: python batches

def fake_batches(seed=0, n=4, n_test=3):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 256, (k, 3072), dtype=np.uint8), rng.integers(0, 10, k).tolist())
            for k in [n] * 5 + [n_test]]


def write_batches(folder: Path, batches):
    folder.mkdir(parents=True, exist_ok=True)
    for name, (x, y) in zip(data._BATCHES, batches):
        blob = pickle.dumps({b"batch_label": name.encode(), b"data": x, b"labels": y,
                             b"filenames": [b"f.png"] * len(y)}, protocol=2)
        # Like the official (Python 2) files: protocol 2, arrays rebuilt by numpy.core.multiarray.
        (folder / name).write_bytes(blob.replace(b"numpy._core.", b"numpy.core."))


def assert_batches(split, batches):
    x = np.concatenate([x for x, _ in batches[:5]]).reshape(-1, 3, 32, 32)
    assert split.train_images.dtype == torch.uint8 and split.train_labels.dtype == torch.int64
    assert torch.equal(split.train_images, torch.from_numpy(x))
    assert split.train_labels.tolist() == sum((y for _, y in batches[:5]), [])
    assert torch.equal(split.test_images, torch.from_numpy(batches[5][0].reshape(-1, 3, 32, 32)))
    assert split.test_labels.tolist() == batches[5][1]


def make_tar(tar_path: Path, folder: Path, arcname: str | None):
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(folder, arcname=arcname if arcname is not None else ".")


def test_cifar_batches_folder_and_tarball(tmp_path, monkeypatch, fetches):
    batches = fake_batches()
    write_batches(tmp_path / "src" / "cifar-10-batches-py", batches)
    monkeypatch.setenv("NORMLAB_DATA", str(tmp_path / "src"))
    (tmp_path / "src" / "cifar10").mkdir()
    (tmp_path / "src" / "cifar10" / "cifar-10-batches-py").symlink_to(
        tmp_path / "src" / "cifar-10-batches-py")
    split = data.cifar10(expected_counts=None)
    assert_batches(split, batches)
    assert split.source == ("official CIFAR-10 python batches (cifar-10-batches-py/) at "
                            "$NORMLAB_DATA/cifar10")

    tar = tmp_path / "src" / "cifar10-jpeg" / "cifar-10-python.tar.gz"
    tar.parent.mkdir()
    make_tar(tar, tmp_path / "src" / "cifar-10-batches-py", "cifar-10-batches-py")
    monkeypatch.setitem(data.MD5, tar.name, md5(tar.read_bytes()))
    (tmp_path / "src" / "cifar10" / "cifar-10-batches-py").unlink()
    split = data.cifar10(expected_counts=(20, 3))
    assert_batches(split, batches)
    assert split.source == ("official CIFAR-10 python batches (cifar-10-python.tar.gz) at "
                            "$NORMLAB_DATA/cifar10-jpeg") and fetches == []


def test_cifar_batches_errors(tmp_path, monkeypatch):
    folder = tmp_path / "b"
    write_batches(folder, fake_batches())
    with pytest.raises(ValueError, match="holds 20 train / 3 test images, expected 50000 / 10000"):
        data.cifar10(root=folder)  # a subset needs expected_counts=None

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(ValueError, match="test_batch is not a CIFAR-10 python batch.*refusing"):
        data.cifar10(root=folder, expected_counts=None)
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 3071), np.uint8),
                                                      b"labels": [0, 1]}))
    with pytest.raises(ValueError, match=r"test_batch: data uint8\(2, 3071\)"):
        data.cifar10(root=folder, expected_counts=None)
    (folder / "test_batch").unlink()
    (folder / "data_batch_1").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"lacks the CIFAR-10 batches \['test_batch'\]"):
        data.cifar10(root=folder, expected_counts=None)

    tar = tmp_path / "t" / "cifar-10-python.tar.gz"
    tar.parent.mkdir()
    write_batches(tmp_path / "good", fake_batches())
    make_tar(tar, tmp_path / "good", "cifar-10-batches-py")
    monkeypatch.setitem(data.MD5, tar.name, md5(tar.read_bytes()))
    raw = bytearray(tar.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    tar.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum mismatch for .*cifar-10-python.tar.gz"):
        data.cifar10(root=tar.parent, expected_counts=None)


# ---------------------------------------------------------------- fake CIFAR-10: image folders

def fake_image_folder(folder: Path, seed=0, suffix=".png", classes=("truck", "airplane", "cat")):
    """train/<class>/*.png (3 each) and test/<class>/*.png (2 each); returns the expected arrays in
    split/class/file-name order."""
    rng = np.random.default_rng(seed)
    expected = {}
    for split, n in (("train", 3), ("test", 2)):
        xs, ys = [], []
        for cls in sorted(classes):
            for i in range(n):
                a = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                (folder / split / cls).mkdir(parents=True, exist_ok=True)
                Image.fromarray(a).save(folder / split / cls / f"{i:04d}{suffix}")
                xs.append(a.transpose(2, 0, 1))
                ys.append(data.CIFAR10_CLASSES.index(cls) if cls in data.CIFAR10_CLASSES else -1)
        expected[split] = np.stack(xs), np.array(ys)
    (folder / "train" / classes[0] / "notes.txt").write_text("not an image")  # ignored
    return expected


def assert_images(split, expected):
    for images, labels, key in ((split.train_images, split.train_labels, "train"),
                                (split.test_images, split.test_labels, "test")):
        assert images.dtype == torch.uint8 and labels.dtype == torch.int64
        assert torch.equal(images, torch.from_numpy(expected[key][0]))  # PNG: exact pixels
        assert labels.tolist() == expected[key][1].tolist()


def test_cifar_png_folder(tmp_path, monkeypatch, fetches):
    expected = fake_image_folder(tmp_path / "d" / "cifar10" / "fake-png")
    monkeypatch.setenv("NORMLAB_DATA", str(tmp_path / "d"))
    split = data.cifar10(expected_counts=(9, 6))
    assert_images(split, expected)
    assert split.train_labels.tolist() == [0] * 3 + [3] * 3 + [9] * 3  # CIFAR-10 class order
    assert split.source == "fake-png image folder (PNG images) at $NORMLAB_DATA/cifar10"
    assert fetches == []


@pytest.mark.parametrize("top", ["fake-png", None])
def test_cifar_png_tarball_streamed(tmp_path, monkeypatch, top):
    expected = fake_image_folder(tmp_path / "pics")
    tar = tmp_path / "d" / "cifar10-jpeg" / "fake-png.tar.gz"
    tar.parent.mkdir(parents=True)
    make_tar(tar, tmp_path / "pics", top)
    monkeypatch.setenv("NORMLAB_DATA", str(tmp_path / "d"))
    split = data.cifar10(expected_counts=None)
    assert_images(split, expected)
    assert split.source == ("fake-png image folder (PNG images, fake-png.tar.gz) at "
                            "$NORMLAB_DATA/cifar10-jpeg")
    assert not (tmp_path / "d" / "cifar10-jpeg" / "train").exists()  # nothing extracted


def test_cifar_pil_fallback_decoder(tmp_path, monkeypatch):
    expected = fake_image_folder(tmp_path / "p")
    monkeypatch.setattr(data, "_image_decoder", lambda: data._decode_pil)
    assert_images(data.cifar10(root=tmp_path / "p", expected_counts=None), expected)


def test_cifar_jpeg_folder_matches_pil(tmp_path):
    fake_image_folder(tmp_path / "j", suffix=".jpg", classes=("dog",))
    split = data.cifar10(root=tmp_path / "j", expected_counts=None)
    ref = np.stack([np.asarray(Image.open(tmp_path / "j" / "test" / "dog" / f"{i:04d}.jpg"))
                    for i in range(2)]).transpose(0, 3, 1, 2)
    assert np.abs(split.test_images.numpy().astype(int) - ref).max() <= 2  # same libjpeg, ~exact
    assert split.source.startswith("j image folder (JPEG re-encoding)")


def test_cifar_image_folder_errors(tmp_path):
    fake_image_folder(tmp_path / "u", classes=("cat", "kitten"))
    with pytest.raises(ValueError, match=r"unknown class folders \['kitten'\].*airplane"):
        data.cifar10(root=tmp_path / "u", expected_counts=None)
    fake_image_folder(tmp_path / "s", classes=("cat",))
    Image.new("RGB", (28, 28)).save(tmp_path / "s" / "test" / "cat" / "big.png")
    with pytest.raises(ValueError, match=r"test/cat/big.png is \(3, 28, 28\), not 3x32x32"):
        data.cifar10(root=tmp_path / "s", expected_counts=None)
    (tmp_path / "s" / "test" / "cat" / "big.png").write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="cannot decode test/cat/big.png"):
        data.cifar10(root=tmp_path / "s", expected_counts=None)
    tar = tmp_path / "t" / "mine.tar.gz"
    tar.parent.mkdir()
    make_tar(tar, tmp_path / "u", "mine")
    tar.write_bytes(tar.read_bytes()[:-300])  # an interrupted copy
    with pytest.raises(ValueError, match="mine.tar.gz is not a complete tar archive"):
        data.cifar10(root=tar.parent, expected_counts=None)
    for p in (tmp_path / "s" / "test" / "cat").iterdir():
        p.unlink()
    with pytest.raises(ValueError, match=r"no images in test/<class>/"):
        data.cifar10(root=tmp_path / "s", expected_counts=None)


def test_cifar_offline_and_missing(tmp_path, monkeypatch, fetches):
    monkeypatch.setenv("NORMLAB_DATA", str(tmp_path / "d"))
    (tmp_path / "d" / "cifar10").mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as err:
        data.cifar10()
    msg = str(err.value)
    for needle in (f"{tmp_path / 'd' / 'cifar10'} ($NORMLAB_DATA/cifar10): no CIFAR-10 copy",
                   str(tmp_path / "d" / "cifar10-jpeg"), str(tmp_path / "cache" / "cifar10"),
                   "NORMLAB_DATA", data.CIFAR10_URL, "cifar-10-python.tar.gz"):
        assert needle in msg
    assert fetches == [data.CIFAR10_URL]
    assert not (tmp_path / "cache" / "cifar10").exists()  # a failed download leaves no empty folder


def test_cifar_cache_reuse_and_invalidation(tmp_path, monkeypatch):
    tar = tmp_path / "d" / "cifar10-jpeg" / "fake.tar.gz"
    tar.parent.mkdir(parents=True)
    expected = fake_image_folder(tmp_path / "pics", seed=0)
    make_tar(tar, tmp_path / "pics", "fake")
    monkeypatch.setenv("NORMLAB_DATA", str(tmp_path / "d"))
    decodes = []
    real = data._read_cifar_source

    def counting(kind, path):
        decodes.append(path)
        return real(kind, path)

    monkeypatch.setattr(data, "_read_cifar_source", counting)
    first = data.cifar10(expected_counts=None)
    assert len(decodes) == 1 and len(list((tmp_path / "cache" / "cifar10").glob("*.npz"))) == 1
    assert not list((tmp_path / "cache" / "cifar10").glob(".*"))  # no temp file left over
    second = data.cifar10(expected_counts=None)
    assert len(decodes) == 1, "the second call must load the cache, not decode again"
    assert_images(second, expected)
    assert second.source == first.source

    # A changed source (new size/mtime) is decoded again.
    expected = fake_image_folder(tmp_path / "pics2", seed=1)
    make_tar(tar, tmp_path / "pics2", "fake")
    os.utime(tar, ns=(1, 1))
    assert_images(data.cifar10(expected_counts=None), expected)
    assert len(decodes) == 2

    # A plain folder's signature covers every file in it.
    folder = tmp_path / "d" / "cifar10" / "plain"
    fake_image_folder(folder, seed=2)
    assert data.cifar10(expected_counts=None).train_images.shape[0] == 9 and len(decodes) == 3
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "train" / "cat" / "new.png")
    assert data.cifar10(expected_counts=None).train_images.shape[0] == 10 and len(decodes) == 4


def test_cifar_unreadable_cache_is_rebuilt(tmp_path):
    expected = fake_image_folder(tmp_path / "p")
    data.cifar10(root=tmp_path / "p", expected_counts=None)
    (cache,) = (tmp_path / "cache" / "cifar10").glob("*.npz")
    good = cache.read_bytes()
    for broken in (b"not an npz", good[: len(good) // 2]):  # garbage; an interrupted copy
        cache.write_bytes(broken)
        assert_images(data.cifar10(root=tmp_path / "p", expected_counts=None), expected)


# ---------------------------------------------------------------- Tiny Shakespeare

def test_tiny_shakespeare_local_corrupt_and_offline(tmp_path, monkeypatch, fetches):
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
    (tmp_path / "d" / "tinyshakespeare").mkdir(parents=True)
    (tmp_path / "d" / "tinyshakespeare" / "input.txt").write_text(text)
    monkeypatch.setenv("NORMLAB_DATA", str(tmp_path / "d"))
    monkeypatch.setitem(data.MD5, "input.txt", md5(text.encode()))
    assert data.tiny_shakespeare() == text and fetches == []
    (tmp_path / "d" / "tinyshakespeare" / "input.txt").write_text(text.replace("F", "f"))
    with pytest.raises(ValueError, match="checksum mismatch for .*input.txt"):
        data.tiny_shakespeare()
    monkeypatch.delenv("NORMLAB_DATA")
    with pytest.raises(FileNotFoundError) as err:
        data.tiny_shakespeare()
    for needle in (str(tmp_path / "cache" / "tinyshakespeare"), "NORMLAB_DATA",
                   data.TINY_SHAKESPEARE_URL):
        assert needle in str(err.value)
    assert fetches == [data.TINY_SHAKESPEARE_URL]


def test_tiny_shakespeare_download(tmp_path, monkeypatch):
    monkeypatch.setitem(data.MD5, "input.txt", md5(b"to be"))
    monkeypatch.setattr(data, "_fetch", lambda url, dest: dest.write_bytes(b"to be"))
    assert data.tiny_shakespeare() == "to be"
    assert (tmp_path / "cache" / "tinyshakespeare" / "input.txt").read_bytes() == b"to be"


# ---------------------------------------------------------------- the shared real copies

def real_data(monkeypatch, name: str) -> None:
    if not (SHARED / name).is_dir():
        pytest.skip(f"no shared copy of {name} (set NORMLAB_DATA)")
    monkeypatch.setenv("NORMLAB_DATA", str(SHARED))
    monkeypatch.setattr(data, "MD5", OFFICIAL_MD5)


def test_real_fashion_mnist(monkeypatch):
    real_data(monkeypatch, "fashion-mnist")
    s = data.fashion_mnist()
    assert s.train_images.shape == (60000, 1, 28, 28) and s.test_images.shape == (10000, 1, 28, 28)
    assert s.train_images.dtype == torch.uint8 and s.train_labels.dtype == torch.int64
    assert torch.bincount(s.train_labels).tolist() == [6000] * 10
    assert torch.bincount(s.test_labels).tolist() == [1000] * 10
    # Known means of Fashion-MNIST's pixels in [0, 1]: 0.2860 (train), 0.2868 (test).
    assert s.train_images.float().mean().item() / 255 == pytest.approx(0.2860, abs=5e-4)
    assert s.test_images.float().mean().item() / 255 == pytest.approx(0.2868, abs=5e-4)
    assert s.source == "Fashion-MNIST IDX files (gzipped) at $NORMLAB_DATA/fashion-mnist"
    assert len(data.FASHION_MNIST_CLASSES) == 10


def test_real_tiny_shakespeare(monkeypatch):
    real_data(monkeypatch, "tinyshakespeare")
    text = data.tiny_shakespeare()
    assert len(text) == 1115394 and len(set(text)) == 65 and text.startswith("First Citizen:")


@pytest.mark.slow
def test_real_cifar10(monkeypatch):
    """Decodes the shared JPEG copy once (~10-30 s on one core) into the real user cache."""
    real_data(monkeypatch, "cifar10-jpeg")
    if USER_CACHE:
        monkeypatch.setenv("NORMLAB_CACHE", USER_CACHE)
    else:
        monkeypatch.delenv("NORMLAB_CACHE")
    s = data.cifar10()
    assert s.train_images.shape == (50000, 3, 32, 32) and s.test_images.shape == (10000, 3, 32, 32)
    assert s.train_images.dtype == torch.uint8 and s.test_labels.dtype == torch.int64
    assert torch.bincount(s.train_labels).tolist() == [5000] * 10
    assert torch.bincount(s.test_labels).tolist() == [1000] * 10
    means = s.train_images.float().mean((0, 2, 3)) / 255  # README: 0.4913, 0.4821, 0.4465
    assert means.tolist() == pytest.approx([0.4913, 0.4821, 0.4465], abs=5e-4)
    assert s.source == ("cifar10-jpeg image folder (JPEG re-encoding, cifar10-jpeg.tar.gz) at "
                        "$NORMLAB_DATA/cifar10-jpeg")


# ---------------------------------------------------------------- subsets, resolution, tokens

def _split(n_train=20, n_test=10, size=32, channels=3):
    g = torch.Generator().manual_seed(0)
    return data.Split(torch.randint(0, 256, (n_train, channels, size, size), dtype=torch.uint8, generator=g),
                      torch.arange(n_train), torch.randint(0, 256, (n_test, channels, size, size), dtype=torch.uint8,
                                                           generator=g), torch.arange(n_test), "test copy")


def test_subset_is_seeded_and_draws_test_after_train():
    s = _split()
    a, b = data.subset(s, 5, 4, seed=1), data.subset(s, 5, 4, seed=1)
    assert torch.equal(a.train_labels, b.train_labels) and torch.equal(a.test_labels, b.test_labels)
    g = torch.Generator().manual_seed(1)
    assert a.train_labels.tolist() == torch.randperm(20, generator=g)[:5].tolist()
    assert a.test_labels.tolist() == torch.randperm(10, generator=g)[:4].tolist()  # the same generator, continued
    torch.testing.assert_close(a.train_images, s.train_images[a.train_labels])
    c = data.subset(s, 5, 4, seed=1, test_seed=7)
    assert c.test_labels.tolist() == torch.randperm(10, generator=torch.Generator().manual_seed(7))[:4].tolist()
    full = data.subset(s, None, 99, seed=3)
    assert full.train_images is s.train_images and full.test_images is s.test_images


def test_resize_is_a_box_filter_and_pads_28px_first():
    s = _split(size=32)
    r = data.resize(s, 16)
    expect = s.train_images.float().unflatten(2, (16, 2)).unflatten(4, (16, 2)).mean((3, 5)).round()
    assert torch.equal(r.train_images, expect.to(torch.uint8)) and r.source == "test copy, downsampled to 16x16"
    f = data.resize(_split(size=28, channels=1), 32)
    assert f.train_images.shape[-1] == 32 and f.train_images[..., :2, :].sum() == 0
    with pytest.raises(ValueError, match="image_size 12 must divide"):
        data.resize(s, 12)
    with pytest.raises(ValueError, match="dataset must be one of"):
        data.load("mnist")
