"""Image data: tfds (mock) and image folders, the k-shot draw, HF-equal preprocessing, and ViT
position-embedding interpolation against transformers."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from vera_jax.data import DataUnavailableError, images
from vera_jax.models import from_pretrained, vit

SHARED_CIFAR10 = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cifar10_jpeg")
SMALL = images.ImageProcessing(size=(8, 8))


def _write_folder(root, counts: dict, split="train", seed=0):
    """`root/split/<class>/<i>.png|jpg` with counts[class] random images of varied sizes."""
    rs = np.random.RandomState(seed)
    for name, n in counts.items():
        os.makedirs(os.path.join(root, split, name))
        for i in range(n):
            pixels = rs.randint(0, 256, (rs.randint(6, 20), rs.randint(6, 20), 3), np.uint8)
            Image.fromarray(pixels).save(os.path.join(root, split, name, f"{i:03d}.{'png' if i % 2 else 'jpg'}"))
    return str(root)


def test_kshot_draws_exactly_k_per_class_deterministically():
    labels = np.random.RandomState(0).randint(0, 5, 300)
    names = tuple("abcde")
    a = images.kshot_indices(labels, 4, seed=0, class_names=names)
    assert np.array_equal(a, images.kshot_indices(labels, 4, seed=0, class_names=names))
    assert np.array_equal(np.bincount(labels[a]), [4] * 5) and np.array_equal(a, np.sort(a))
    assert not np.array_equal(a, images.kshot_indices(labels, 4, seed=1, class_names=names))
    assert set(a) <= set(images.kshot_indices(labels, 6, seed=0, class_names=names))  # larger k keeps these


def test_kshot_names_the_short_class():
    labels = np.array([0, 0, 0, 1, 2, 2, 2])
    with pytest.raises(images.ImageDataError, match=r"class 'dog' has 1 train images, fewer than data.k=2"):
        images.kshot_indices(labels, 2, 0, ("cat", "dog", "emu"))


def test_folder_gives_lazy_kshot_train_and_test_examples(tmp_path):
    root = _write_folder(tmp_path, {"zebra": 4, "ant": 3, "cat": 5})
    _write_folder(tmp_path, {"ant": 2, "zebra": 1}, split="test", seed=1)
    data = images.load("mine", k=2, seed=3, process=SMALL, data_dir=root)
    assert data.class_names == ("ant", "cat", "zebra")
    assert len(data.train) == 6 and len(data.eval) == 3 and len(data.train_indices) == 6
    ex = data.train[0]
    assert ex["image"].shape == (8, 8, 3) and ex["image"].dtype == np.float32 and ex["label"].dtype == np.int32
    assert sorted(int(data.train[i]["label"]) for i in range(6)) == [0, 0, 1, 1, 2, 2]
    assert [int(data.eval[i]["label"]) for i in range(3)] == [0, 0, 2]
    file = images.read_folder(root, "train").read(int(data.train_indices[0]))
    assert file.startswith(os.path.join(root, "train", "ant"))
    np.testing.assert_array_equal(ex["image"], SMALL(Image.open(file).convert("RGB")))
    assert data.info["eval_examples"] == 3 and data.info["train_examples"] == 6

    os.makedirs(tmp_path / "test" / "yak")
    with pytest.raises(images.ImageDataError, match=r"class folders \['yak'\] are not among the train classes"):
        images.load("mine", k=2, seed=3, process=SMALL, data_dir=root)


def test_folder_without_test_split_evaluates_on_the_undrawn_images(tmp_path):
    root = _write_folder(tmp_path, {"a": 3, "b": 4})
    data = images.load("mine", k=2, seed=0, process=SMALL, data_dir=root)
    assert len(data.eval) == 3 and "not drawn" in data.info["eval_source"]
    assert not set(data.eval_indices) & set(data.train_indices)


@pytest.fixture
def mock_tfds(monkeypatch):
    import tensorflow_datasets as tfds

    # tfds' mock cannot encode images without TensorFlow, so it serves decoded arrays
    monkeypatch.setattr(images, "TFDS_SKIP_DECODING", False)
    return tfds.testing.mock_data


def test_tfds_cifar100_kshot_and_test_split(mock_tfds):
    with mock_tfds(num_examples=1500):
        data = images.load("cifar100", k=1, seed=0, process=SMALL)
        ex = data.eval[0]
    assert len(data.class_names) == 100 and len(data.train) == 100 and len(data.eval) == 1500
    assert ex["image"].shape == (8, 8, 3) and ex["label"].dtype == np.int32
    assert data.info["eval_source"] == "tfds cifar100[test]"


def test_tfds_resisc45_evaluates_on_every_image_not_drawn(mock_tfds):
    with mock_tfds(num_examples=400):
        data = images.load("resisc45", k=2, seed=0, process=SMALL)
        first = data.eval[0]
    drawn, held_out = set(data.train_indices), set(data.eval_indices)
    assert len(drawn) == 90 and not drawn & held_out and len(drawn | held_out) == 400
    assert data.class_names[0] == "airplane" and first["image"].shape == (8, 8, 3)


def test_tfds_prepared_dataset_hands_encoded_images_through(tmp_path):
    """A prepared array_record resisc45 (written here, as `download_and_prepare` would) read with no
    TensorFlow: images stay encoded until an example is accessed."""
    import tensorflow_datasets as tfds

    writer = pytest.importorskip("array_record.python.array_record_module").ArrayRecordWriter
    builder = tfds.builder("resisc45", data_dir=str(tmp_path / "tfds"), file_format="array_record")
    os.makedirs(builder.data_dir)
    files = _write_folder(tmp_path / "jpegs", {"x": 6})
    files = [os.path.join(files, "train", "x", f"{i:03d}.{'png' if i % 2 else 'jpg'}") for i in range(6)]
    out = writer(os.path.join(builder.data_dir, "resisc45-train.array_record-00000-of-00001"), "group_size:1")
    for i in range(90):  # two images in each of the 45 classes
        out.write(builder.info.features.serialize_example({"image": files[i % 6], "label": i % 45, "filename": ""}))
    out.close()
    template = tfds.core.ShardedFileTemplate(data_dir=builder.data_dir, dataset_name="resisc45",
                                             filetype_suffix="array_record", split="train")
    builder.info.set_splits(tfds.core.SplitDict([tfds.core.SplitInfo(name="train", shard_lengths=[90], num_bytes=0,
                                                                     filename_template=template)]))
    builder.info.write_to_directory(builder.data_dir)

    data = images.load("resisc45", k=1, seed=0, process=SMALL, tfds_data_dir=str(tmp_path / "tfds"))
    assert sorted(data.train_indices % 45) == list(range(45)) and len(data.eval) == 45
    i = int(data.train_indices[7])
    np.testing.assert_array_equal(data.train[7]["image"], SMALL(Image.open(files[i % 6]).convert("RGB")))


def test_tfds_offline_fails_fast_naming_folder_and_data_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "reachable", lambda url, timeout: "no network")
    with pytest.raises(DataUnavailableError, match=r"no network.*config.data.dir.*<root>/train/<class name>/<image>"
                                                   r".*config.data.tfds_data_dir"):
        images.load("cifar100", k=1, seed=0, process=SMALL, tfds_data_dir=str(tmp_path))
    with pytest.raises(DataUnavailableError, match="manual download"):
        images.load("resisc45", k=1, seed=0, process=SMALL, tfds_data_dir=str(tmp_path))
    with pytest.raises(images.ImageDataError, match="data.dataset: 'svhn'.*data.dir"):
        images.load("svhn", k=1, seed=0, process=SMALL)


@pytest.mark.parametrize("config", [
    {"do_normalize": True, "do_resize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "resample": 2,
     "size": 224},  # google/vit-base-patch16-224-in21k's file
    {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "resample": 3,
     "size": {"height": 40, "width": 56}, "rescale_factor": 0.5 ** 8},
    {"do_normalize": False, "size": 24},
])
def test_preprocessing_equals_hf_image_processor(tmp_path, config):
    rs = np.random.RandomState(0)
    pictures = [Image.fromarray(rs.randint(0, 256, (h, w, 3), np.uint8)) for h, w in ((32, 32), (300, 241))]
    pictures.append(Image.fromarray(rs.randint(0, 256, (20, 30), np.uint8)).convert("RGB"))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    ours = images.ImageProcessing.from_pretrained(str(tmp_path))
    # the PIL backend, which is transformers.ViTImageProcessor without torchvision
    reference = transformers.ViTImageProcessorPil(**config)
    for picture in pictures:
        expected = reference(picture, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        np.testing.assert_allclose(ours(picture), expected, rtol=0, atol=1e-6)
        assert ours(picture).dtype == np.float32


def test_preprocessing_size_override_and_unsupported_size():
    assert images.ImageProcessing.from_hf({"size": 224}, image_size=384).size == (384, 384)
    assert images.ImageProcessing.from_pretrained("/nonexistent") == images.ImageProcessing()
    with pytest.raises(ValueError, match="size: {'shortest_edge': 224} is not supported"):
        images.ImageProcessing.from_hf({"size": {"shortest_edge": 224}})


@pytest.mark.parametrize("image_size", [24, 8])
def test_position_interpolation_equals_transformers(tmp_path, image_size):
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=37)
    hf_model = transformers.ViTModel(config).eval()
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    _, params, _ = from_pretrained(str(tmp_path))
    params, hf_config = vit.interpolate_position_embeddings(params, json.loads((tmp_path / "config.json").read_text()),
                                                            image_size)
    assert hf_config["image_size"] == image_size
    pixels = np.random.RandomState(0).randn(2, 3, image_size, image_size).astype(np.float32)
    hidden = vit.build(hf_config).apply({"params": params}, jnp.asarray(pixels.transpose(0, 2, 3, 1)))
    with torch.no_grad():
        expected = hf_model(torch.tensor(pixels), interpolate_pos_encoding=True).last_hidden_state.numpy()
    np.testing.assert_allclose(np.asarray(hidden), expected, rtol=0, atol=1e-5)


@pytest.mark.skipif(not os.path.isdir(SHARED_CIFAR10), reason="../shared/data/cifar10_jpeg is absent")
def test_shared_cifar10_jpeg_folder():
    data = images.load("cifar10_jpeg", k=2, seed=0, process=images.ImageProcessing(), data_dir=SHARED_CIFAR10)
    assert len(data.class_names) == 10 and data.class_names[0] == "airplane"
    assert len(data.train) == 20 and len(data.eval) == 10000
    for i in (0, 19):
        assert data.train[i]["image"].shape == (224, 224, 3)
    assert int(data.eval[9999]["label"]) == 9
