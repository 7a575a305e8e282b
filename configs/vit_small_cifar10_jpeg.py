"""A small ViT drawn from its config (no pretrained weights exist on our machines) on the real
CIFAR-10 JPEGs of ../shared/data/cifar10_jpeg (1,000 train images, all used; 10,000 test), sized
to run in minutes on 2 CPU cores. Its numbers show the machinery (data, preprocessing, methods,
per-epoch eval), not the paper's: a random-init body gives adapters little to adapt.

    python -m experiments.vit --config configs/vit_small_cifar10_jpeg.py:method=head
"""

from configs import vit_common


def get_config(arg=None):
    c = vit_common.base_config("cifar10_jpeg", arg)
    c.model.checkpoint = "vit-base-patch16-224-in21k"  # the config shipped with vera_jax: ViT defaults, no files
    c.model.random_init = True  # weights drawn from `seed`
    c.model.overrides = {"hidden_size": 96, "num_hidden_layers": 4, "num_attention_heads": 4,  # 32x32, 64 patches
                         "intermediate_size": 192, "image_size": 32, "patch_size": 4}
    c.data.dir = "../shared/data/cifar10_jpeg"  # <root>/{train,test}/<class>/<image>.jpg
    c.data.k = 100  # every train image (100 per class)
    c.data.image_size = 32  # CIFAR's own size: the model above is built at it, no interpolation
    c.num_epochs = 5.0  # CPU-sized (the paper's 10 on a TPU)
    c.lr.head = {m: 4e-3 for m in vit_common.METHODS}  # ViT-B CIFAR100's rates (Table 11)
    c.lr.vera, c.lr.lora, c.lr.full = 2e-2, 4e-3, 4e-5
    c.eval_batch_size = 500  # images per eval step
    c.checkpoint_every_steps = 10_000  # only the final checkpoint
    c.progress_bar = False  # the per-epoch top-1 lines are the output
    c.tensorboard = False  # metrics.jsonl only
    return c
