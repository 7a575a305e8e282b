"""Image classification data: tfds `cifar100`, `food101`, `oxford_flowers102`, `resisc45` (through
`tfds.data_source`, no TensorFlow) or a local folder `<root>/<split>/<class name>/<image>`; a
k-shot train subset drawn by seed; preprocessing as the checkpoint's HF image processor does it.

Images are decoded and preprocessed per example on access, so a 10,000-image eval set never
sits in memory as float arrays.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
from typing import Any, Callable, Optional

import grain
import numpy as np
from PIL import Image

from .common import DataUnavailableError, reachable

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclasses.dataclass(frozen=True)
class TfdsDataset:
    """A tfds image dataset: its splits and where its files come from (None: manual download)."""

    train_split: str
    eval_split: Optional[str]  # None: evaluate on every train image not drawn (RESISC45 has one split)
    download_url: Optional[str]


DATASETS = {
    "cifar100": TfdsDataset("train", "test", "https://www.cs.toronto.edu"),
    "food101": TfdsDataset("train", "validation", "https://data.vision.ee.ethz.ch"),
    "oxford_flowers102": TfdsDataset("train", "test", "https://www.robots.ox.ac.uk"),
    "resisc45": TfdsDataset("train", None, None),
}

# tfds hands over the encoded image bytes (tfds.decode.SkipDecoding): `_to_rgb` decodes them on
# access, and the label scan that draws the k-shot subset decodes no image.
TFDS_SKIP_DECODING = True


class ImageDataError(ValueError):
    """An image folder or split that cannot be used; the message names the path or class."""


@dataclasses.dataclass
class Images:
    """One split: int32 labels, class names (label order), and `image(i)`, decoded on access."""

    labels: np.ndarray
    class_names: tuple[str, ...]
    source: str
    read: Callable[[int], Any]  # i -> encoded bytes, a path or a uint8 array; picklable for grain

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> Image.Image:
        return _to_rgb(self.read(int(i)))


def _to_rgb(value) -> Image.Image:
    if isinstance(value, np.ndarray):
        image = Image.fromarray(value[..., 0] if value.ndim == 3 and value.shape[-1] == 1 else value)
    else:
        image = Image.open(io.BytesIO(value) if isinstance(value, bytes) else value)
    return image.convert("RGB")


def _index(items, i):
    return items[i]


def _tfds_image(source, i):
    return source[i]["image"]


def read_folder(root: str, split: str, class_names: Optional[tuple[str, ...]] = None) -> Images:
    """`<root>/<split>/<class>/<image>` (.jpg/.jpeg/.png): classes sorted by folder name, images by file
    name. With `class_names` (the train split's), the split must use no class outside them."""
    path = os.path.join(root, split)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such directory (expected the layout <root>/{split}/<class name>/<image>)")
    found = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    if not found:
        raise ImageDataError(f"{path}: no class folders (expected {path}/<class name>/<image>)")
    names = tuple(found) if class_names is None else tuple(class_names)
    unknown = sorted(set(found) - set(names))
    if unknown:
        raise ImageDataError(f"{path}: class folders {unknown} are not among the train classes {list(names)}")
    files, labels = [], []
    for name in found:
        images = sorted(f for f in os.listdir(os.path.join(path, name)) if f.lower().endswith(IMAGE_SUFFIXES))
        if not images:
            raise ImageDataError(f"{path}/{name}: no {'/'.join(IMAGE_SUFFIXES)} images")
        files += [os.path.join(path, name, f) for f in images]
        labels += [names.index(name)] * len(images)
    return Images(np.asarray(labels, np.int32), names, path, functools.partial(_index, files))


def read_tfds(name: str, split: str, data_dir: Optional[str] = None, download: bool = True,
              timeout: float = 5.0) -> Images:
    """`split` of tfds `name` through `tfds.data_source` (array_record), downloading and preparing it
    when absent and its host is reachable; offline, fails within `timeout` s saying what to pass."""
    import tensorflow_datasets as tfds

    decoders = {"image": tfds.decode.SkipDecoding()} if TFDS_SKIP_DECODING else None
    kw = dict(split=split, data_dir=data_dir, decoders=decoders)
    try:
        source = tfds.data_source(name, download=False, **kw)
    except Exception as missing:  # tfds raises several types for "not prepared"
        url = DATASETS[name].download_url if name in DATASETS else None
        if not download:
            reason = "download=False"
        elif url is None:
            reason = f"it needs a manual download into {data_dir or '~/tensorflow_datasets'}/downloads/manual"
        else:
            reason = reachable(url, timeout)
        if reason is not None:
            raise DataUnavailableError(
                f"tfds {name} is not prepared in {data_dir or '~/tensorflow_datasets'} and cannot be downloaded "
                f"({reason}). Offline, point config.data.dir at an image folder laid out <root>/train/<class name>/"
                "<image> (and <root>/test/...), e.g. --config.data.dir=../shared/data/cifar10_jpeg, or "
                f"config.data.tfds_data_dir at a tfds data dir holding a prepared {name}"
            ) from missing
        source = tfds.data_source(name, download=True, **kw)
    labels = np.asarray([ex["label"] for ex in source], np.int32)
    where = f"tfds {name}[{split}]"
    if not len(labels):
        raise ImageDataError(f"{where}: no examples")
    names = tuple(source.dataset_info.features["label"].names)
    return Images(labels, names, where, functools.partial(_tfds_image, source))


def kshot_indices(labels: np.ndarray, k: int, seed: int, class_names: tuple[str, ...]) -> np.ndarray:
    """Sorted indices of exactly `k` images per class: for each class, its first `k` images in one
    seeded permutation of the split (so every method at one seed trains on the same images, and a
    larger k keeps the smaller k's images)."""
    if k < 1:
        raise ImageDataError(f"data.k: images per class must be >= 1, got {k}")
    labels = np.asarray(labels)
    counts = np.bincount(labels, minlength=len(class_names))
    short = [(n, int(counts[c])) for c, n in enumerate(class_names) if counts[c] < k]
    if short:
        name, count = short[0]
        raise ImageDataError(f"class {name!r} has {count} train images, fewer than data.k={k}"
                             + (f" ({len(short)} classes are short)" if len(short) > 1 else ""))
    order = np.random.default_rng(seed).permutation(len(labels))
    rank = np.full(len(labels), k)
    for c in range(len(class_names)):
        of_c = order[labels[order] == c]
        rank[of_c] = np.arange(len(of_c))
    return np.flatnonzero(rank < k)


@dataclasses.dataclass(frozen=True)
class ImageProcessing:
    """HF ViTImageProcessor's steps in numpy/PIL: PIL resize to `size` (height, width) with `resample`,
    then `* rescale_factor` (float64, cast to float32), then `(x - mean) / std` in float32. Gives
    float32 (H, W, 3), equal to the PIL backend's output (ViTImageProcessorPil) transposed to HWC;
    None skips a step."""

    size: Optional[tuple[int, int]] = (224, 224)
    resample: int = Image.Resampling.BILINEAR
    rescale_factor: Optional[float] = 1 / 255
    mean: Optional[tuple[float, ...]] = (0.5, 0.5, 0.5)
    std: Optional[tuple[float, ...]] = (0.5, 0.5, 0.5)

    @classmethod
    def from_hf(cls, config: dict, image_size: Optional[int] = None) -> "ImageProcessing":
        """From a `preprocessor_config.json` dict; missing keys take ViTImageProcessor's defaults.
        `image_size` overrides `size` (a model run at another resolution)."""
        d = cls()
        size = config.get("size", {"height": 224, "width": 224})
        if isinstance(size, int):
            size = {"height": size, "width": size}
        if image_size is not None:
            size = {"height": image_size, "width": image_size}
        if set(size) != {"height", "width"}:
            raise ValueError(f"preprocessor_config.json size: {size} is not supported; allowed: an int or "
                             "{'height': H, 'width': W}")
        return cls(
            size=(int(size["height"]), int(size["width"])) if config.get("do_resize", True) else None,
            resample=int(config.get("resample", d.resample)),
            rescale_factor=float(config.get("rescale_factor", d.rescale_factor)) if config.get("do_rescale", True)
            else None,
            mean=tuple(config.get("image_mean", d.mean)) if config.get("do_normalize", True) else None,
            std=tuple(config.get("image_std", d.std)) if config.get("do_normalize", True) else None,
        )

    @classmethod
    def from_pretrained(cls, path: str, image_size: Optional[int] = None) -> "ImageProcessing":
        """From `<path>/preprocessor_config.json`; ViTImageProcessor's defaults when the file is absent."""
        file = os.path.join(path, "preprocessor_config.json")
        if not os.path.isfile(file):
            return cls.from_hf({}, image_size)
        with open(file) as f:
            return cls.from_hf(json.load(f), image_size)

    def __call__(self, image: Image.Image) -> np.ndarray:
        if self.size is not None:
            image = image.resize(self.size[::-1], resample=self.resample)
        x = np.asarray(image, np.float64)
        x = (x if self.rescale_factor is None else x * self.rescale_factor).astype(np.float32)
        if self.mean is not None:
            x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return x


class ImageExamples:
    """Examples {"image": float32 (H, W, 3), "label": int32} of `images` at `indices`, decoded and
    preprocessed on each access (a grain MapDataset source)."""

    def __init__(self, images: Images, indices: np.ndarray, process: Callable):
        self.images, self.indices, self.process = images, np.asarray(indices, np.int64), process

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        j = int(self.indices[i])
        return {"image": self.process(self.images.image(j)), "label": np.int32(self.images.labels[j])}


@dataclasses.dataclass
class ImageData:
    """A k-shot run's data: lazily decoded train and eval sets, the indices they hold (into the train
    split; into the eval split, or the train split when there is none), and where they came from."""

    train: grain.MapDataset
    eval: grain.MapDataset
    class_names: tuple[str, ...]
    train_indices: np.ndarray
    eval_indices: np.ndarray
    info: dict


def load(dataset: str, *, k: Optional[int], seed: int, process: Callable, data_dir: str = "",
         tfds_data_dir: Optional[str] = None, download: bool = True, timeout: float = 5.0) -> ImageData:
    """k images per class of the train split (all of it when k is None), drawn by `seed`, and the
    eval set: the image folder `data_dir` when given (eval on `<data_dir>/test`, or on every train
    image not drawn when there is no test folder), else tfds `dataset` (eval on its test split;
    RESISC45, which has none, on every image not drawn)."""
    if data_dir:
        train = read_folder(data_dir, "train")
        has_test = os.path.isdir(os.path.join(data_dir, "test"))
        evaluation = read_folder(data_dir, "test", train.class_names) if has_test else None
    elif dataset in DATASETS:
        spec = DATASETS[dataset]
        load_kw = dict(data_dir=tfds_data_dir, download=download, timeout=timeout)
        train = read_tfds(dataset, spec.train_split, **load_kw)
        evaluation = read_tfds(dataset, spec.eval_split, **load_kw) if spec.eval_split else None
    else:
        raise ImageDataError(f"data.dataset: {dataset!r} is not a tfds dataset this reads ({sorted(DATASETS)}); "
                         "for any other, set data.dir to an image folder <root>/<split>/<class name>/<image>")
    indices = np.arange(len(train)) if k is None else kshot_indices(train.labels, k, seed, train.class_names)
    if evaluation is None:
        evaluation = train
        eval_indices = np.setdiff1d(np.arange(len(train)), indices)
        eval_source = f"{train.source}, the {len(eval_indices)} images not drawn for training"
        if not len(eval_indices):
            raise ImageDataError(f"{train.source}: no test split and every image is drawn for training (k={k})")
    else:
        eval_indices = np.arange(len(evaluation))
        eval_source = evaluation.source
    info = {"dataset": dataset, "num_classes": len(train.class_names), "k": k, "train_source": train.source,
            "train_examples": len(indices), "eval_source": eval_source, "eval_examples": len(eval_indices)}
    return ImageData(grain.MapDataset.source(ImageExamples(train, indices, process)),
                     grain.MapDataset.source(ImageExamples(evaluation, eval_indices, process)),
                     train.class_names, indices, eval_indices, info)
