"""The image classification family (the paper's Table 5): a ViT with k training images per class
of tfds `cifar100`, `food101`, `oxford_flowers102`, `resisc45`, or of any image folder.

Data, the k-shot draw and preprocessing (the checkpoint's `preprocessor_config.json`, on the host
per example) are `vera_jax.data.images`; loss, eval and accuracy are `classification`'s, shared
with GLUE. At a `data.image_size` other than the checkpoint's, the position embeddings are
interpolated as HF's `interpolate_pos_encoding` does. One eval, "test", runs every epoch and prints
a line with its top-1.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Optional

from vera_jax.data import images
from vera_jax.models import vit
from vera_jax.train import Eval

from . import runner
from .classification import classifier_fns

ADVICE = ("and the images with --config.data.dir=/path/to/folder (<root>/train/<class name>/<image>, "
          "<root>/test/...) or --config.data.tfds_data_dir=DIR holding the prepared tfds dataset")


def image_size(config) -> Optional[int]:
    """The side the model sees: data.image_size, else a random_init model's overrides.image_size,
    else None (the checkpoint's own)."""
    return config.data.image_size or config.model.overrides.get("image_size") or None


def processing(config) -> images.ImageProcessing:
    """The checkpoint's preprocessor_config.json at `image_size(config)`; ViTImageProcessor's
    defaults for a config shipped with vera_jax (random_init), which has no such file."""
    path = runner.checkpoint_path(config)  # already resolved by the runner: a local lookup
    if path is None:
        return images.ImageProcessing.from_hf({}, image_size(config))
    return images.ImageProcessing.from_pretrained(path, image_size(config))


def load_data(config) -> images.ImageData:
    d = config.data
    return images.load(d.dataset, k=d.k or None, seed=config.seed, process=processing(config), data_dir=d.dir,
                       tfds_data_dir=d.tfds_data_dir or None, download=d.download, timeout=config.network_timeout)


def adapt_model(config, model: runner.Model) -> runner.Model:
    """The model at data.image_size: position embeddings interpolated when it differs from the
    checkpoint's (a random_init model changes size with model.overrides.image_size instead)."""
    size, hf = config.data.image_size, model.hf_config
    if not size or size == hf.get("image_size"):
        return model
    if hf["model_type"] != "vit" or size % hf["patch_size"]:
        raise runner.ConfigError(f"data.image_size: {size} needs a ViT whose patch_size divides it; the model is "
                                 f"{hf['model_type']} with patch_size {hf.get('patch_size')}")
    params, hf = vit.interpolate_position_embeddings(model.params, hf, size)
    return dataclasses.replace(model, module=model.module.clone(config=vit.ViTConfig.from_hf(hf)), params=params,
                               hf_config=hf)


def print_top1(steps_per_epoch: int):
    """An Eval.write_fn printing one line per eval: epoch, top-1, and the wall time since the last."""
    last = [time.time()]

    def write(workdir, step, outputs, metrics):
        now, n = time.time(), len(outputs["label"])
        print(f"epoch {step / steps_per_epoch:g} (step {step}): test top-1 {metrics['accuracy']:.4f} on {n} images; "
              f"{now - last[0]:.1f} s since the previous eval", flush=True)
        last[0] = now

    return write


def make_parts(config, model: runner.Model, data: images.ImageData) -> runner.Parts:
    def forward(params, batch, deterministic, rng):
        return model.module.apply({"params": params}, batch["image"], deterministic=deterministic,
                                  rngs=None if rng is None else {"dropout": rng})

    loss_fn, eval_fn, metrics_fn = classifier_fns(forward, metrics=("accuracy",))
    test = Eval(data.eval, eval_fn, metrics_fn, every="epoch",
                write_fn=print_top1(max(1, len(data.train) // config.batch_size)))
    info = {**data.info, "image_size": model.hf_config["image_size"], "train_indices": data.train_indices.tolist()}
    return runner.Parts(train=data.train, loss_fn=loss_fn, evals={"test": test}, best_metric="test/accuracy",
                        info=info)


FAMILY = runner.Family(name="image", load_data=load_data, make_parts=make_parts, adapt_model=adapt_model,
                       model_options=lambda config, data: {"num_labels": len(data.class_names)},
                       user_errors=(images.ImageDataError,), advice=ADVICE,
                       run_name=lambda c: f"{c.data.dataset}-{c.method}-s{c.seed}")
