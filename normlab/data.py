"""The book's datasets, offline-first and checksummed: Fashion-MNIST, CIFAR-10, Tiny Shakespeare.

Each loader looks, in this order, in

1. `$NORMLAB_DATA/<name>/` (a shared read-only copy; CI points it at `../shared/data`),
2. the user cache `<cache>/<name>/`, where `<cache>` is `$NORMLAB_CACHE`, else
   `$XDG_CACHE_HOME/normlab`, else `~/.cache/normlab`,
3. `/usr/share/datasets/fashion-mnist` (Debian's `dataset-fashion-mnist`; Fashion-MNIST only),
4. the official URL, downloaded into the user cache (temp file + rename, md5 checked) — only when
   nothing local was found; `NORMLAB_OFFLINE=1` turns downloads off.

Names: `fashion-mnist`, `cifar10` and `cifar10-jpeg`, `tinyshakespeare`. Files with an official name
are md5-checked (IDX files on their uncompressed bytes, so any gzip re-encoding of the same data
passes: Debian's `.gz` files differ from the official ones, their contents do not). CIFAR-10 is
decoded once into a uint8 `.npz` in `<cache>/cifar10/`, re-decoded when the source's size or mtime
changes. Images come back as uint8 `[N, C, H, W]` tensors, labels as int64 `[N]`.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import pickle
import shutil
import struct
import tarfile
import tempfile
import urllib.request
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

__all__ = ["Split", "fashion_mnist", "cifar10", "tiny_shakespeare", "cache_dir", "load", "subset", "resize",
           "char_split", "CIFAR10_CLASSES", "FASHION_MNIST_CLASSES"]

#: Label order of CIFAR-10 (Krizhevsky, 2009); image folders are matched by these names.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                   "truck")
#: Label order of Fashion-MNIST (Xiao et al., 2017).
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
TINY_SHAKESPEARE_URL = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
                        "tinyshakespeare/input.txt")
_IDX = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_CACHE_FORMAT = 1  # bump when the decoded arrays change meaning: old caches are then rebuilt

#: md5 of files with an official name. IDX entries are of the *uncompressed* file.
MD5 = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
    "cifar10-jpeg.tar.gz": "587c2bd60e14ddb5b58d97471a72f6d6",
    "input.txt": "6fb458f1232090904fb40fe944165e91",
}


class Split(NamedTuple):
    """A dataset as tensors: uint8 images `[N, C, H, W]`, int64 labels `[N]`, and its copy."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    source: str  # e.g. "... at $NORMLAB_DATA/cifar10-jpeg": never an absolute path


# ---------------------------------------------------------------- locations, checksums, downloads

def cache_dir() -> Path:
    """The user cache: `$NORMLAB_CACHE`, else `$XDG_CACHE_HOME/normlab`, else `~/.cache/normlab`."""
    if os.environ.get("NORMLAB_CACHE"):
        return Path(os.environ["NORMLAB_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "normlab"


def _cache_label() -> str:
    if os.environ.get("NORMLAB_CACHE"):
        return "$NORMLAB_CACHE"
    return "$XDG_CACHE_HOME/normlab" if os.environ.get("XDG_CACHE_HOME") else "~/.cache/normlab"


def _locations(names, root, debian: Path | None = None) -> list[tuple[Path, str]]:
    """(folder, label for `Split.source`) in lookup order; `root` replaces the whole search."""
    if root is not None:
        return [(Path(root), "the given root")] + [(Path(root) / n, f"<root>/{n}") for n in names]
    data = os.environ.get("NORMLAB_DATA")
    places = [(Path(data) / n, f"$NORMLAB_DATA/{n}") for n in names] if data else []
    places += [(cache_dir() / n, f"{_cache_label()}/{n}") for n in names]
    return places + ([(debian, "Debian's dataset-fashion-mnist")] if debian else [])


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _check_md5(path: Path, data: bytes, name: str | None = None) -> None:
    """Raise if `data` (the content of `path`) has an official name but not the official md5."""
    expected = MD5.get(name or path.name)
    if expected is not None and (got := _md5(data)) != expected:
        raise ValueError(f"checksum mismatch for {path}: expected md5 {expected}, got {got}; "
                         "delete it and run again (it is found elsewhere or downloaded again)")


def _fetch(url: str, dest: Path) -> None:
    """Copy `url` to `dest`: the only function that touches the network (tests replace it)."""
    with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as f:
        shutil.copyfileobj(response, f, 1 << 20)


def _download(url: str, dest: Path, check) -> None:
    """Download to a temp file, `check(tmp)` it, then rename: `dest` is never a partial file."""
    if os.environ.get("NORMLAB_OFFLINE"):
        raise OSError("downloads are off ($NORMLAB_OFFLINE is set)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    try:
        _fetch(url, tmp)
        check(tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
        if not dest.exists():  # a failed download leaves no empty folder behind
            with contextlib.suppress(OSError):
                dest.parent.rmdir()


def _not_found(what: str, searched: list[str], download: str, fixes: list[str],
               root) -> FileNotFoundError:
    if root is None and not os.environ.get("NORMLAB_DATA"):
        searched = ["$NORMLAB_DATA: not set"] + searched
    return FileNotFoundError("\n".join(
        [f"{what} not found. Looked in:"] + [f"  - {s}" for s in searched] + [download, "Fix:"]
        + [f"  - {f}" for f in fixes]))


# ---------------------------------------------------------------- Fashion-MNIST

def _read_idx(path: Path, name: str | None = None) -> np.ndarray:
    """Parse an IDX file of unsigned bytes (gzipped or not): magic 0x0000080D, D big-endian dims."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic (an IDX file starts with two zero bytes)
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path} is not a complete gzip file ({e}); delete it and run "
                             "again") from e
    _check_md5(path, raw, name or path.name.removesuffix(".gz"))
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path} is not an IDX file of unsigned bytes: magic {raw[:4].hex()}, "
                         "expected 0000080N")
    start = 4 + 4 * raw[3]
    dims = struct.unpack(f">{raw[3]}I", raw[4:start]) if len(raw) >= start else ()
    if not dims or len(raw) - start != int(np.prod(dims)):
        raise ValueError(f"{path}: the IDX header promises {dims} = {int(np.prod(dims))} bytes, "
                         f"the file holds {len(raw) - start}: truncated or corrupt, replace it")
    return np.frombuffer(raw, np.uint8, offset=start).reshape(dims).copy()


def _idx_files(folder: Path) -> tuple[list[Path], list[str]]:
    """The four IDX files in `folder` (raw preferred to `.gz`), and the names missing."""
    found, missing = [], []
    for stem in _IDX:
        path = next((p for p in (folder / stem, folder / f"{stem}.gz") if p.is_file()), None)
        (found.append(path) if path else missing.append(f"{stem}.gz"))
    return found, missing


def _load_fashion(files: list[Path], label: str) -> Split:
    x_train, y_train, x_test, y_test = (_read_idx(p) for p in files)
    for x, y, px, py in ((x_train, y_train, *files[:2]), (x_test, y_test, *files[2:])):
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y) or (y.size and y.max() >= 10):
            raise ValueError(f"{px.name} {x.shape} and {py.name} {y.shape} are not N images and N "
                             "labels in 0..9; replace them with the official files")
    kind = "gzipped" if files[0].suffix == ".gz" else "uncompressed"
    return Split(torch.from_numpy(x_train).unsqueeze(1), torch.from_numpy(y_train).long(),
                 torch.from_numpy(x_test).unsqueeze(1), torch.from_numpy(y_test).long(),
                 f"Fashion-MNIST IDX files ({kind}) at {label}")


def fashion_mnist(root: str | os.PathLike | None = None) -> Split:
    """Fashion-MNIST (Xiao et al., 2017): 60,000 + 10,000 images `[N, 1, 28, 28]`, 10 classes.

    `root`: a folder holding the four IDX files (or `fashion-mnist/` with them); no other place is
    searched and nothing is downloaded then.
    """
    searched = []
    for folder, label in _locations(["fashion-mnist"], root, DEBIAN_FASHION_MNIST):
        files, missing = _idx_files(folder)
        if not missing:
            return _load_fashion(files, label)
        searched.append(f"{folder} ({label}): " + ("missing " + ", ".join(missing)
                                                   if folder.is_dir() else "no such folder"))
    download = "Nothing downloaded: a root was given."
    if root is None:
        folder = cache_dir() / "fashion-mnist"
        try:
            for name in _idx_files(folder)[1]:
                _download(FASHION_MNIST_URL + name, folder / name,
                          lambda tmp, stem=name[:-3]: _read_idx(tmp, stem))
            return _load_fashion(_idx_files(folder)[0], f"{_cache_label()}/fashion-mnist")
        except OSError as e:
            download = f"Downloading from {FASHION_MNIST_URL} into {folder} failed: {e}"
    raise _not_found("Fashion-MNIST", searched, download, [
        "export NORMLAB_DATA=/path/to/data with the files in /path/to/data/fashion-mnist/",
        f"or copy {', '.join(s + '.gz' for s in _IDX)} (gzipped or not) into "
        f"{cache_dir() / 'fashion-mnist'}",
        "or install the Debian package: sudo apt install dataset-fashion-mnist",
        "or run once with internet access (downloads into the user cache)"], root)


# ---------------------------------------------------------------- CIFAR-10

class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles NumPy arrays, lists and dicts only: a CIFAR batch cannot run code on load."""

    _ALLOWED = {(f"numpy{core}.{module}", name) for core in ("._core", ".core")
                for module, name in (("multiarray", "_reconstruct"), ("numeric", "_frombuffer"))}
    _ALLOWED |= {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}  # py3 protocol 2

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _unpickle_batch(blob: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """One official batch: dict with b"data" uint8 `[n, 3072]` (R, G, B planes) and b"labels"."""
    try:
        batch = _ArrayUnpickler(io.BytesIO(blob), encoding="bytes").load()
        x, y = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"], np.int64)
    except Exception as e:  # a corrupt pickle can raise almost anything
        raise ValueError(f"{where} is not a CIFAR-10 python batch ({e!r}); replace it") from e
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072 or y.shape != (len(x),):
        raise ValueError(f"{where}: data {x.dtype}{x.shape} and labels {y.shape} are not "
                         "uint8 [n, 3072] and [n]; replace it")
    return x.reshape(-1, 3, 32, 32), y


def _decode_pickles(path: Path) -> tuple[tuple[np.ndarray, ...], str]:
    if path.is_dir():
        blobs = {n: (path / n).read_bytes() for n in _BATCHES if (path / n).is_file()}
    else:
        with tarfile.open(path) as tar:
            blobs = {os.path.basename(m.name): tar.extractfile(m).read() for m in tar
                     if m.isfile() and os.path.basename(m.name) in _BATCHES}
    if missing := [n for n in _BATCHES if n not in blobs]:
        raise ValueError(f"{path} lacks the CIFAR-10 batches {missing}; replace it")
    parts = [_unpickle_batch(blobs[n], f"{path}: {n}") for n in _BATCHES]
    x_train, y_train = (np.concatenate(a) for a in zip(*parts[:5]))
    return (x_train, y_train, *parts[5]), "the original pixels"


def _decode_torchvision(blob: bytes) -> np.ndarray:
    from torchvision.io import ImageReadMode, decode_image
    return decode_image(torch.frombuffer(bytearray(blob), dtype=torch.uint8),
                        mode=ImageReadMode.RGB).numpy()


def _decode_pil(blob: bytes) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(blob)).convert("RGB")).transpose(2, 0, 1)


def _image_decoder():
    """bytes -> uint8 `[3, H, W]`. torchvision's decoder is 4x faster than PIL on 32x32 JPEGs (the
    same libjpeg-turbo pixels here); PIL is the fallback where torchvision's image I/O is gone."""
    try:
        from torchvision.io import ImageReadMode, decode_image  # noqa: F401
        return _decode_torchvision
    except ImportError:
        return _decode_pil


def _decode_images(path: Path) -> tuple[tuple[np.ndarray, ...], str]:
    """`train/<class>/*` and `test/<class>/*` images (a folder or a tarball, streamed) as arrays."""
    items = []  # (split, class, file name, bytes)
    if path.is_dir():
        for split in ("train", "test"):
            for f in sorted((path / split).glob("*/*")):
                if f.suffix.lower() in _IMAGE_SUFFIXES:
                    items.append((split, f.parent.name, f.name, f.read_bytes()))
    else:
        with tarfile.open(path) as tar:  # streamed: nothing is extracted to disk
            for m in tar:
                parts = [p for p in m.name.split("/") if p not in ("", ".")]
                if (m.isfile() and len(parts) in (3, 4) and parts[-3] in ("train", "test")
                        and Path(parts[-1]).suffix.lower() in _IMAGE_SUFFIXES):
                    items.append((*parts[-3:], tar.extractfile(m).read()))
    if unknown := sorted({c for _, c, _, _ in items} - set(CIFAR10_CLASSES)):
        raise ValueError(f"{path}: unknown class folders {unknown}; class folders must be named "
                         f"{', '.join(CIFAR10_CLASSES)}")
    items.sort(key=lambda item: item[:3])  # deterministic: split, class, file name
    out, decode = {}, _image_decoder()
    for split in ("train", "test"):
        chosen = [item for item in items if item[0] == split]
        if not chosen:
            raise ValueError(f"{path}: no images in {split}/<class>/ (.jpg, .jpeg or .png)")
        x = np.empty((len(chosen), 3, 32, 32), np.uint8)
        with warnings.catch_warnings():  # torchvision 0.29+ points to TorchCodec on every call
            warnings.simplefilter("ignore", DeprecationWarning)
            for i, (_, cls, name, blob) in enumerate(chosen):
                try:
                    img = decode(blob)
                except (RuntimeError, OSError) as e:
                    raise ValueError(f"{path}: cannot decode {split}/{cls}/{name} ({e})") from e
                if img.shape != (3, 32, 32):
                    raise ValueError(f"{path}: {split}/{cls}/{name} is {tuple(img.shape)}, "
                                     "not 3x32x32")
                x[i] = img
        out[split] = x, np.array([CIFAR10_CLASSES.index(c) for _, c, _, _ in chosen], np.int64)
    jpeg = any(Path(name).suffix.lower() != ".png" for _, _, name, _ in items)
    return (*out["train"], *out["test"]), "JPEG re-encoding" if jpeg else "PNG images"


def _read_cifar_source(kind: str, path: Path) -> tuple[tuple[np.ndarray, ...], str]:
    """Decode a CIFAR-10 copy (a known tarball's md5 checked first): arrays and a note on pixels."""
    if path.is_file() and path.name in MD5:
        _check_md5(path, path.read_bytes())
    try:
        return _decode_pickles(path) if kind == "pickles" else _decode_images(path)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:  # truncated, corrupt
        raise ValueError(f"{path} is not a complete tar archive ({e}); replace it") from e


def _find_cifar(folder: Path) -> tuple[str, Path, str] | None:
    """(kind, path, description with a {note} slot) of the first CIFAR-10 copy in `folder`."""
    if not folder.is_dir():
        return None
    for d in (folder / "cifar-10-batches-py", folder):
        if (d / "data_batch_1").is_file():
            return "pickles", d, f"official CIFAR-10 python batches ({d.name}/)"
    if (tar := folder / "cifar-10-python.tar.gz").is_file():
        return "pickles", tar, "official CIFAR-10 python batches (cifar-10-python.tar.gz)"
    for d in [folder] + sorted(p for p in folder.iterdir() if p.is_dir()):
        if (d / "train").is_dir() and (d / "test").is_dir():
            return "images", d, d.name + " image folder ({note})"
    for tar in sorted(p for p in folder.iterdir()
                      if p.name.endswith((".tar.gz", ".tgz", ".tar")) and p.name[0] != "."):
        stem = tar.name.split(".")[0]
        return "images", tar, f"{stem} image folder ({{note}}, {tar.name})"
    return None


def _signature(kind: str, path: Path) -> str:
    """md5 of the source files' names, sizes and mtimes: a changed source gets decoded again."""
    if path.is_file():
        files = [path]
    elif kind == "pickles":
        files = [path / n for n in _BATCHES if (path / n).is_file()]
    else:
        files = sorted(p for split in ("train", "test") for p in (path / split).rglob("*"))
    return _md5("\n".join([f"cache format {_CACHE_FORMAT}"] + [
        f"{p.relative_to(path.parent)} {p.stat().st_size} {p.stat().st_mtime_ns}"
        for p in files if p.is_file()]).encode())


def _save_npz(path: Path, **arrays) -> None:
    """Write to a temp file in the same folder, then rename: readers never see half a cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache may be shared
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _load_cifar(kind: str, path: Path, description: str, label: str, expected_counts) -> Split:
    keys = ("x_train", "y_train", "x_test", "y_test")
    cache = cache_dir() / "cifar10" / (f"cifar10-{path.name.split('.')[0]}-"
                                       f"{_md5(str(path.resolve()).encode())[:8]}.npz")
    signature, arrays = _signature(kind, path), None
    try:  # our own handle: np.load leaks it when the file is not an npz
        with open(cache, "rb") as f, np.load(f) as z:
            if str(z["signature"]) == signature:
                arrays, description = [z[k] for k in keys], str(z["description"])
    except (OSError, ValueError, KeyError, EOFError, TypeError, AttributeError,
            zipfile.BadZipFile):  # no cache yet, or an unreadable one: decode again
        pass
    decoded = arrays is None
    if decoded:
        arrays, note = _read_cifar_source(kind, path)
        description = description.replace("{note}", note)
    counts = (len(arrays[0]), len(arrays[2]))
    if expected_counts is not None and counts != tuple(expected_counts):
        raise ValueError(f"{path} holds {counts[0]} train / {counts[1]} test images, expected "
                         f"{expected_counts[0]} / {expected_counts[1]}; the copy is incomplete, "
                         "replace it (or pass expected_counts=None for a deliberate subset)")
    if decoded:
        try:  # an unwritable cache only costs speed
            _save_npz(cache, **dict(zip(keys, arrays)), signature=np.array(signature),
                      description=np.array(description))
        except OSError:
            pass
    x_train, y_train, x_test, y_test = (torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)
    return Split(x_train, y_train.long(), x_test, y_test.long(), f"{description} at {label}")


def cifar10(root: str | os.PathLike | None = None,
            expected_counts: tuple[int, int] | None = (50_000, 10_000)) -> Split:
    """CIFAR-10 (Krizhevsky, 2009): 50,000 + 10,000 images `[N, 3, 32, 32]`, 10 classes.

    Accepts the official `cifar-10-python.tar.gz` or `cifar-10-batches-py/`, or an image-folder
    copy `train/<class>/*.jpg|png`, `test/<class>/...` (possibly inside a `.tar.gz`, with one
    top-level folder), labelled by `CIFAR10_CLASSES`. `expected_counts` (train, test) guards
    against incomplete copies; pass None for a deliberate subset. `root`: search only there.
    """
    searched = []
    for folder, label in _locations(["cifar10", "cifar10-jpeg"], root):
        if found := _find_cifar(folder):
            return _load_cifar(*found, label, expected_counts)
        searched.append(f"{folder} ({label}): " + ("no CIFAR-10 copy" if folder.is_dir()
                                                   else "no such folder"))
    download = "Nothing downloaded: a root was given."
    if root is None:
        dest = cache_dir() / "cifar10" / "cifar-10-python.tar.gz"
        try:
            _download(CIFAR10_URL, dest, lambda tmp: _check_md5(tmp, tmp.read_bytes(), dest.name))
            return _load_cifar(*_find_cifar(dest.parent), f"{_cache_label()}/cifar10",
                               expected_counts)
        except OSError as e:
            download = f"Downloading {CIFAR10_URL} into {dest.parent} failed: {e}"
    raise _not_found("CIFAR-10", searched, download, [
        "export NORMLAB_DATA=/path/to/data with cifar-10-python.tar.gz in /path/to/data/cifar10/ "
        "(or an image-folder copy such as cifar10-jpeg.tar.gz in /path/to/data/cifar10-jpeg/)",
        f"or put cifar-10-python.tar.gz from {CIFAR10_URL} into {cache_dir() / 'cifar10'}",
        "or run once with internet access (downloads into the user cache)"], root)


# ---------------------------------------------------------------- Tiny Shakespeare

def tiny_shakespeare(root: str | os.PathLike | None = None) -> str:
    """Tiny Shakespeare (Karpathy, 2015): char-rnn's `input.txt`, 1,115,394 characters."""
    searched = []
    for folder, label in _locations(["tinyshakespeare"], root):
        if (path := folder / "input.txt").is_file():
            data = path.read_bytes()
            _check_md5(path, data)
            return data.decode("utf-8")
        searched.append(f"{folder} ({label}): no input.txt")
    download = "Nothing downloaded: a root was given."
    if root is None:
        dest = cache_dir() / "tinyshakespeare" / "input.txt"
        try:
            _download(TINY_SHAKESPEARE_URL, dest,
                      lambda tmp: _check_md5(tmp, tmp.read_bytes(), dest.name))
            return dest.read_text(encoding="utf-8")
        except OSError as e:
            download = f"Downloading {TINY_SHAKESPEARE_URL} into {dest.parent} failed: {e}"
    raise _not_found("Tiny Shakespeare", searched, download, [
        "export NORMLAB_DATA=/path/to/data with input.txt in /path/to/data/tinyshakespeare/",
        f"or save {TINY_SHAKESPEARE_URL} as {cache_dir() / 'tinyshakespeare' / 'input.txt'}",
        "or run once with internet access (downloads into the user cache)"], root)


# ---------------------------------------------------------------- by name, subsets, resolution, tokens

def load(name: str) -> Split:
    """A split by the name the experiments' configs use: `"cifar10"` or `"fashion_mnist"`."""
    loaders = {"cifar10": cifar10, "fashion_mnist": fashion_mnist}
    if name not in loaders:
        raise ValueError(f"dataset must be one of {sorted(loaders)}, got {name!r}")
    return loaders[name]()


def subset(split: Split, n_train: int | None, n_test: int | None, seed: int,
           test_seed: int | None = None) -> Split:
    """Random subsets of `n_train` training and `n_test` test images (None or too many: all of them).

    Drawn with `torch.randperm` from a generator seeded with `seed` (training first, then test from the
    same generator, or from one seeded with `test_seed` if given), so a seed fixes the subset.
    """
    g = torch.Generator().manual_seed(seed)
    g_test = g if test_seed is None else torch.Generator().manual_seed(test_seed)

    def pick(x, y, n, gen):
        if n is None or n >= len(x):
            return x, y
        idx = torch.randperm(len(x), generator=gen)[:n]
        return x[idx], y[idx]

    trx, try_ = pick(split.train_images, split.train_labels, n_train, g)
    tex, tey = pick(split.test_images, split.test_labels, n_test, g_test)
    return Split(trx, try_, tex, tey, split.source)


def holdout(split: Split, n_val: int, seed: int, n_train: int | None = None,
            names: tuple[str, str] = ("n_val", "n_train")) -> tuple[Split, torch.Tensor, torch.Tensor]:
    """`(split, val_images, val_labels)`: `n_val` training images held out as a validation set, drawn by a
    `torch.randperm` seeded with `seed` (the same images for every network, lr and run seed), and `split`
    with the rest of the training images (the next `n_train` of the permutation, None: all of them) in
    their original order; the test set is unchanged. Learning rates are chosen on the held-out images,
    never on the test set. `names`: what the caller's configuration calls `n_val` and `n_train`, for the
    error messages."""
    n, (val_name, train_name) = len(split.train_labels), names
    if not 0 < n_val < n:
        raise ValueError(f"{val_name} must be between 1 and {n - 1} (there are {n} training images), got {n_val}")
    if n_train is not None and n_val + n_train > n:
        raise ValueError(f"{val_name} {n_val} + {train_name} {n_train} exceed the {n} training images: "
                         f"lower {val_name} or {train_name}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val = perm[:n_val]
    train = (perm[n_val:] if n_train is None else perm[n_val: n_val + n_train]).sort().values
    return (Split(split.train_images[train], split.train_labels[train], split.test_images, split.test_labels,
                  split.source), split.train_images[val], split.train_labels[val])


def resize(split: Split, size: int) -> Split:
    """Images at `size` x `size`: 28-px Fashion-MNIST zero-padded to 32 first (so CIFAR ResNets' stages
    line up), then a box filter ("area") down to `size`, rounded back to uint8."""
    images = [split.train_images, split.test_images]
    if images[0].shape[-1] == 28:
        images = [torch.nn.functional.pad(t, (2,) * 4) for t in images]
    full = images[0].shape[-1]
    if size != full:
        if full % size:
            raise ValueError(f"image_size {size} must divide the image size {full}")
        images = [torch.nn.functional.interpolate(t.float(), size=(size, size), mode="area")
                  .round().clamp(0, 255).to(torch.uint8) for t in images]
    source = split.source + (f", downsampled to {size}x{size}" if size != split.train_images.shape[-1] else "")
    return Split(images[0], split.train_labels, images[1], split.test_labels, source)


def char_split(val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Tiny Shakespeare as int64 character ids: (train, validation, vocabulary).

    The vocabulary is every character of the whole text, sorted (65 for the standard file); the split
    is contiguous — the first `1 - val_fraction` of the text trains, the rest validates — so no
    validation window overlaps a training window.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    text = tiny_shakespeare()
    vocab = "".join(sorted(set(text)))
    lookup = torch.zeros(max(map(ord, vocab)) + 1, dtype=torch.int64)
    lookup[torch.tensor([ord(c) for c in vocab])] = torch.arange(len(vocab))
    ids = lookup[torch.tensor([ord(c) for c in text])]
    n_train = int(len(ids) * (1 - val_fraction))
    return ids[:n_train], ids[n_train:], vocab
