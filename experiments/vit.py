"""Image classification with VeRA, LoRA, full fine-tuning or the head only (the paper's Table 5):
ViT-B/L, 10 images per class of CIFAR100, Food101, Flowers102 or RESISC45.

    python -m experiments.vit --config configs/vit_base_cifar100.py --workdir /tmp/c100
    python -m experiments.vit --config configs/vit_large_resisc45.py:method=lora,seed=2
    python -m experiments.vit --config configs/vit_base_food101.py \
        --config.model.checkpoint=/ckpt/vit-base-patch16-224-in21k --config.data.tfds_data_dir=/data/tfds
    python -m experiments.vit --config configs/vit_small_cifar10_jpeg.py   # CPU, real JPEGs

The checkpoint and the data (tfds, or an image folder under `config.data.dir`) are checked before
anything heavy runs: offline, a Hub id fails within seconds saying how to point at local files.
Prints the test top-1 after every epoch; writes to the workdir the trainer's metrics.jsonl,
checkpoints/, the trained adapter (adapter/) and summary.json (per-epoch test accuracy, best
epoch, the drawn train_indices, parameter counts, wall time). The family is `vera_jax.tasks.image`.
"""

from absl import app, flags
from ml_collections import config_flags

from vera_jax.tasks import cli, image, runner

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "image config file (configs/vit_*.py)", lock_config=False)
flags.DEFINE_string("workdir", None, f"output directory (default: {runner.default_workdir(image.FAMILY)})")


def main(argv) -> None:
    del argv
    runner.main(image.FAMILY, FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
