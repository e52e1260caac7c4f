"""Writes a shapes set in COCO format: images in root/{train,val}, captions in root/annotations.

The kind of set (synthetic.easy or synthetic.hard) is passed in; each kind draws a random scene,
renders it and words its captions, and this module only writes the files.
"""
import json
import os
from multiprocessing import Pool

import numpy as np
from tqdm import tqdm

from files import atomic_write
from synthetic import easy, hard

KINDS = {kind.__name__: kind for kind in (easy, hard)}  # worker processes get the kind by name


def _make_one(job):
    """Render and save one image; its own seed makes the result independent of worker scheduling."""
    kind_name, seed, image_id, size, captions_per_image, folder = job
    kind = KINDS[kind_name]
    rng = np.random.default_rng([seed, image_id])
    objects = kind.random_scene(rng, size)
    image = kind.render_image(objects, rng, size)
    file_name = f'{image_id:012d}.png'
    image.save(os.path.join(folder, file_name), optimize=False)
    return ({'id': image_id, 'file_name': file_name, 'width': size, 'height': size, 'objects': objects},
            kind.captions_for(objects, rng, captions_per_image))


def _parameters_of(path):
    """The generation parameters recorded in an annotation file, or None if there is no usable file."""
    try:
        with open(path) as f:
            return json.load(f)['info']['parameters']
    except (OSError, ValueError, KeyError, TypeError):
        return None


def make_synthetic_coco(root, num_train=3000, num_val=300, image_size=64, seed=0, captions_per_image=5,
                        progress=True, kind=easy):
    """Write root/{train,val}/*.png and root/annotations/captions_{train,val}.json; return the JSON paths.

    Does nothing if both JSON files already record the same parameters. Val ids follow the train ids,
    so ids are unique across splits; the same seed gives the same bytes.
    """
    parameters = {**kind.PARAMETERS, 'num_train': num_train, 'num_val': num_val, 'image_size': image_size,
                  'seed': seed, 'captions_per_image': captions_per_image}
    paths = tuple(os.path.join(root, 'annotations', f'captions_{split}.json') for split in ('train', 'val'))
    if all(_parameters_of(path) == parameters for path in paths):
        return paths
    os.makedirs(os.path.join(root, 'annotations'), exist_ok=True)
    splits = (('train', range(1, num_train + 1)), ('val', range(num_train + 1, num_train + num_val + 1)))
    with Pool(min(os.cpu_count() or 1, 4)) as pool:
        for (split, ids), path in zip(splits, paths):
            folder = os.path.join(root, split)
            os.makedirs(folder, exist_ok=True)
            jobs = [(kind.__name__, seed, image_id, image_size, captions_per_image, folder) for image_id in ids]
            images, annotations = [], []
            for image, captions in tqdm(pool.imap(_make_one, jobs, chunksize=64), total=len(jobs),
                                        desc=f'synthetic {split}', disable=not progress):
                images.append(image)
                for k, caption in enumerate(captions):
                    annotations.append({'id': (image['id'] - 1) * captions_per_image + k + 1,
                                        'image_id': image['id'], 'caption': caption})
            dataset = {'info': {'description': f'{kind.DESCRIPTION}, {split} split (python -m synthetic)',
                                'parameters': parameters},
                       'licenses': [], 'images': images, 'annotations': annotations}
            # Written last, atomically: a JSON file means a finished split.
            atomic_write(path, lambda f: f.write(json.dumps(dataset).encode()))
    return paths
