"""ViT-L/16 (ImageNet-21k) on CIFAR100, 10 images per class (paper, Table 11 rates)."""

from configs import vit_common


def get_config(arg=None):
    return vit_common.vit("large", "cifar100", head=4e-4, full=(4e-5, 4e-3),
                          vera=(4e-2, 2e-3), lora=(4e-3, 4e-3), arg=arg)
