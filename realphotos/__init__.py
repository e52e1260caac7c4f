"""A small set of real photographs in COCO format, to score any checkpoint on photos rather than shapes:

    python -m realphotos --root data/photos
    python evaluate.py --checkpoint models/checkpoint.pt --image_dir data/photos/images \\
        --caption_path data/photos/annotations/captions_photos.json

The nine photos are not in this repository: they ship inside installed packages (scikit-image's and
scikit-learn's wheels, matplotlib's sample data), and this module finds them there without importing those
packages, resizes them as resize.py does (256x256 by default) into ROOT/images, and writes their captions, four
per photo written for this project, to ROOT/annotations/captions_photos.json. Nothing is downloaded. Every photo
is written as PNG, also those that come as JPEG: a second JPEG compression at 256 pixels turns EfficientNet-Lite0's
class of the rocket from missile into drilling platform (tests/test_real_photos.py checks those classes).

Photos, where they come from, and their licences:

| photo | package (its file) | what | licence |
|---|---|---|---|
| astronaut.png | scikit-image | the astronaut Eileen Collins, NASA | public domain (NASA) |
| chelsea.png | scikit-image | Chelsea the cat, by Stefan van der Walt | CC0 |
| coffee.png | scikit-image | a cup of espresso, by Rachel Michetti (Pikolo Espresso Bar) | CC0 |
| rocket.png | scikit-image (rocket.jpg) | Falcon 9 with DSCOVR on its launch pad, SpaceX | public domain (SpaceX) |
| camera.png | scikit-image | a man with a camera on a tripod, by Lav Varshney | CC0 |
| motorcycle.png | scikit-image (motorcycle_left.png) | a motorcycle, Middlebury 2014 stereo set | none stated* |
| china.png | scikit-learn (china.jpg) | the Summer Palace, Beijing, by danielbuechele on Flickr | CC-BY 2.0 |
| flower.png | scikit-learn (flower.jpg) | a dahlia, by vultilion on Flickr | CC-BY 2.0 |
| grace_hopper.png | matplotlib (grace_hopper.jpg) | Commodore Grace Hopper, US Navy | public domain (US Navy) |

*scikit-image ships motorcycle_left.png downsampled from the Middlebury 2014 stereo set (Scharstein et al., "High-
resolution stereo datasets with subpixel-accurate ground truth", GCPR 2014) and states no licence for it: cite the
paper when using it.

A decoder trained on the synthetic shapes knows only their words, so its scores here are near zero: captioning
photos needs a model trained on COCO (docs/training.md).
"""
import importlib.util
import json
import os
from typing import NamedTuple

from files import atomic_write
from images import resize_image


class Photo(NamedTuple):
    """One photo of the set: its file name in the set, where its package keeps it, its licence, and its captions."""
    name: str
    package: str
    path: str  # inside the package's folder
    licence: str
    captions: tuple


PHOTOS = (
    Photo('astronaut.png', 'skimage', 'data/astronaut.png', 'public domain (NASA)', (
        'A smiling woman in an orange space suit poses in front of an American flag.',
        'An astronaut in an orange suit with a black helmet beside her and a model space shuttle behind her.',
        'A portrait of a female astronaut next to her helmet.',
        'A woman with short hair wearing an orange pressure suit smiles at the camera.')),
    Photo('chelsea.png', 'skimage', 'data/chelsea.png', 'CC0 (Stefan van der Walt)', (
        'A close up of a tabby cat with green eyes.',
        'A striped brown cat looks past the camera.',
        'The face of a cat with long white whiskers and a pink nose.',
        "A tabby cat's head fills the picture.")),
    Photo('coffee.png', 'skimage', 'data/coffee.png', 'CC0 (Rachel Michetti)', (
        'A cup of espresso on a red saucer with a spoon.',
        'A small red and white coffee cup sits on a wooden table.',
        'An espresso in a brown cup on a matching saucer.',
        'A cup of coffee with a metal spoon on a wooden counter.')),
    Photo('rocket.png', 'skimage', 'data/rocket.jpg', 'public domain (SpaceX)', (
        'A rocket stands on its launch pad at dusk.',
        'A white rocket between tall metal towers under a dark blue sky.',
        'A rocket waiting to launch, with bright lights at the bottom of the pad.',
        'Tall towers surround a rocket on the launch pad in the evening.')),
    Photo('camera.png', 'skimage', 'data/camera.png', 'CC0 (Lav Varshney)', (
        'A man in a dark coat looks through a camera on a tripod.',
        'A black and white photo of a man filming on a grassy field.',
        'A man bends over a camera on a tripod in a field with buildings behind him.',
        'A photographer uses a camera on a tripod outdoors.')),
    Photo('motorcycle.png', 'skimage', 'data/motorcycle_left.png',
          'Middlebury 2014 stereo set (Scharstein et al., GCPR 2014); no licence stated by scikit-image', (
              'A red motorcycle parked in a garage.',
              'A red and black motorcycle stands on its kickstand in a workshop.',
              'A motorcycle parked in front of shelves full of boxes.',
              'A red motorbike in a garage next to a wooden bench.')),
    Photo('china.png', 'sklearn', 'datasets/images/china.jpg', 'CC-BY 2.0 (danielbuechele, Flickr)', (
        'A tall Chinese pagoda on a hill above a lake.',
        'A red and green tiered tower among trees overlooking the water.',
        'A traditional Chinese temple with a lake in the background.',
        'A colorful pagoda stands among green trees on a hazy day.')),
    Photo('flower.png', 'sklearn', 'datasets/images/flower.jpg', 'CC-BY 2.0 (vultilion, Flickr)', (
        'An orange dahlia in front of dark green leaves.',
        'A close up of a round orange flower.',
        'A ball shaped peach colored flower with a blurred background.',
        'A single orange flower in bloom with another one below it.')),
    Photo('grace_hopper.png', 'matplotlib', 'mpl-data/sample_data/grace_hopper.jpg', 'public domain (US Navy)', (
        'An elderly woman in a navy uniform and cap poses in front of a flag.',
        'A portrait of an old woman wearing glasses and a military uniform.',
        'A woman in a dark uniform with ribbons on her chest and an American flag behind her.',
        'An older naval officer with glasses in an official portrait.')),
)

INSTALL = 'pip install scikit-image scikit-learn matplotlib'


def source_path(photo):
    """Where photo's file is in its installed package, or None. find_spec locates a package without running it,
    so none of their dependencies need to import."""
    spec = importlib.util.find_spec(photo.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], photo.path)
    return path if os.path.isfile(path) else None


def missing_photos():
    """The photos whose package, or whose file in it, is not installed here."""
    return [photo for photo in PHOTOS if source_path(photo) is None]


def make_real_photos(root, image_size=256):
    """Write ROOT/images (each photo resized by resize.py's resize_image) and ROOT/annotations/captions_photos.json;
    return the JSON's path. Refuses, naming what to install, when a photo's package is missing."""
    missing = missing_photos()
    if missing:
        raise FileNotFoundError(f'{", ".join(photo.name for photo in missing)} not found in the installed '
                                f'packages: {INSTALL}')
    os.makedirs(os.path.join(root, 'images'), exist_ok=True)
    os.makedirs(os.path.join(root, 'annotations'), exist_ok=True)
    images, annotations = [], []
    for image_id, photo in enumerate(PHOTOS, 1):
        resize_image(source_path(photo), os.path.join(root, 'images', photo.name), image_size)
        images.append({'id': image_id, 'file_name': photo.name, 'width': image_size, 'height': image_size,
                       'license': image_id})
        annotations += [{'id': len(annotations) + k + 1, 'image_id': image_id, 'caption': caption}
                        for k, caption in enumerate(photo.captions)]
    dataset = {'info': {'description': 'real photographs from installed packages (python -m realphotos)'},
               'licenses': [{'id': image_id, 'name': photo.licence} for image_id, photo in enumerate(PHOTOS, 1)],
               'images': images, 'annotations': annotations}
    path = os.path.join(root, 'annotations', 'captions_photos.json')
    atomic_write(path, lambda f: f.write(json.dumps(dataset, indent=1).encode()))
    return path
