"""torch.hub's entry point, for using the captioner from other code without copying this repository's modules:

    import torch
    captioner = torch.hub.load('path/to/this/repository', 'captioner', source='local')  # the shipped shapes model
    captioner = torch.hub.load('path/to/this/repository', 'captioner', source='local', checkpoint='models/coco')
    captions, errors = captioner.caption(['png/example.png'])

Nothing is downloaded: the weights come from the checkpoint named, or from models/shapes in this repository.
"""
import os

from decoding import SHIPPED_MODEL, load_captioner

dependencies = ['torch', 'torchvision', 'safetensors', 'PIL', 'numpy', 'nltk', 'pycocotools', 'tqdm']


def captioner(checkpoint=None, device='cpu'):
    """The TrainedCaptioner that sample.py uses, with its caption(paths, settings, batch_size): of a train.py
    checkpoint or an export.py --format safetensors folder; without one, of the model shipped in models/shapes."""
    return load_captioner(checkpoint or os.path.join(os.path.dirname(os.path.abspath(__file__)), SHIPPED_MODEL), device)
