"""ViT-B/16 (ImageNet-21k) on RESISC45, 10 images per class (paper, Table 11 rates).
RESISC45 has no test split: it is evaluated on every image not drawn for training."""

from configs import vit_common


def get_config(arg=None):
    return vit_common.vit("base", "resisc45", head=4e-2, full=(8e-5, 4e-3),
                          vera=(7e-2, 5e-3), lora=(4e-3, 4e-3), arg=arg)
