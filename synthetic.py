"""A captioning set the project makes itself: coloured shapes on light backgrounds, in COCO format.

    python synthetic.py --root data/synthetic
    python synthetic.py --root data/synthetic_hard --hard     # the harder set of synthetic_hard.py

Each image holds one or two non-overlapping shapes; every caption names each shape as
"<size> <colour> <shape>", always from left to right, so a caption's content can be checked by
parsing it (parse_caption, content_matches). The ground truth is kept in each image's "objects".
"""
import argparse
import json
import os
from multiprocessing import Pool

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from files import atomic_write
from flags import HelpFormatter, count, positive_int

SHAPES = ('circle', 'square', 'triangle')
COLOURS = {'red': (220, 40, 40), 'green': (40, 160, 60), 'blue': (40, 80, 220),
           'yellow': (235, 200, 20), 'purple': (140, 50, 170)}
SIZES = {'small': (14, 18), 'large': (26, 32)}  # diameter range in pixels at 64 x 64
VERSION = 1  # bump when the images or captions change, so cached sets are regenerated

ONE = ('a {} .', 'there is a {} in the picture .', 'an image of a {} .', 'a picture with a {} .',
       'a single {} .', 'one shape : a {} .')
TWO = ('a {} and a {} .', 'a {} to the left of a {} .', 'a picture with a {} and a {} .',
       'two shapes : a {} and a {} .', 'there is a {} next to a {} .', 'an image of a {} and a {} .')


def _pick(rng, options):
    """A plain Python item (not a numpy scalar), so scenes go straight into JSON."""
    return options[int(rng.integers(len(options)))]


def _box(obj):
    """Inclusive pixel bounding box (x0, y0, x1, y1) of an object."""
    x0, y0 = obj['x'] - obj['diameter'] // 2, obj['y'] - obj['diameter'] // 2
    return x0, y0, x0 + obj['diameter'] - 1, y0 + obj['diameter'] - 1


def _apart(a, b, gap):
    """True if more than gap pixels separate the two boxes along some axis."""
    return a[2] + gap < b[0] or b[2] + gap < a[0] or a[3] + gap < b[1] or b[3] + gap < a[1]


def _random_attributes(rng):
    return _pick(rng, list(SIZES)), _pick(rng, list(COLOURS)), _pick(rng, SHAPES)


def random_scene(rng, size=64):
    """One or two objects, sorted left to right, inside the image and apart from each other.

    Two objects never share all of (size, colour, shape), so every caption names two distinct
    things; their centres are at least 12 px apart horizontally (at 64 px) so left/right is clear.
    """
    scale = size / 64
    attributes = [_random_attributes(rng)]
    if rng.random() < 0.5:
        second = _random_attributes(rng)
        while second == attributes[0]:
            second = _random_attributes(rng)
        attributes.append(second)
    while True:  # rejection sampling: two large objects take a few dozen tries
        objects = []
        for size_name, colour, shape in attributes:
            diameter = int(round(rng.uniform(*SIZES[size_name]) * scale))
            low, high = diameter // 2 + 1, size - 1 - diameter + diameter // 2  # 1 px margin to the edges
            objects.append({'shape': shape, 'colour': colour, 'size': size_name, 'diameter': diameter,
                            'x': int(rng.integers(low, high + 1)), 'y': int(rng.integers(low, high + 1))})
        if len(objects) == 1 or (abs(objects[0]['x'] - objects[1]['x']) >= 12 * scale
                                 and _apart(_box(objects[0]), _box(objects[1]), 2 * scale)):
            return sorted(objects, key=lambda obj: obj['x'])


def background(rng, size):
    """A light background that is either a flat tint or a noisy texture, and a pen to draw on it."""
    tint = rng.integers(205, 250, size=3)
    pixels = np.broadcast_to(tint, (size, size, 3)).astype(np.float32)
    if rng.random() < 0.5:
        pixels = pixels + rng.normal(0, 10, (size, size, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return image, ImageDraw.Draw(image)


def shade(rgb, rng):
    """A colour varied a little, so that no two objects of one colour are exactly alike."""
    return tuple(int(c) for c in np.clip(np.array(rgb) + rng.integers(-12, 13, 3), 0, 255))


def render_image(objects, rng, size=64):
    """Draw the objects over a light background."""
    image, draw = background(rng, size)
    for obj in objects:
        colour = shade(COLOURS[obj['colour']], rng)
        x0, y0, x1, y1 = _box(obj)
        if obj['shape'] == 'circle':
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif obj['shape'] == 'square':
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=colour)
    return image


def captions_for(objects, rng, n=5):
    """n captions, from different templates where there are enough, naming the objects left to right."""
    phrases = [f"{obj['size']} {obj['colour']} {obj['shape']}" for obj in sorted(objects, key=lambda o: o['x'])]
    templates = ONE if len(phrases) == 1 else TWO
    order = rng.permutation(len(templates))
    return [templates[order[i % len(templates)]].format(*phrases) for i in range(n)]


def parse_caption(caption):
    """Every "<size> <colour> <shape>" in a caption (string or tokens), in the order mentioned."""
    words = caption.split() if isinstance(caption, str) else list(caption)
    words = [word.lower().strip('.,;:!?') for word in words]
    found, i = [], 0
    while i + 2 < len(words):
        if words[i] in SIZES and words[i + 1] in COLOURS and words[i + 2] in SHAPES:
            found.append(tuple(words[i:i + 3]))
            i += 3
        else:
            i += 1
    return tuple(found)


def content_matches(caption, objects):
    """True if the caption names exactly the objects, in any order; extra or missing ones fail."""
    return sorted(parse_caption(caption)) == sorted((obj['size'], obj['colour'], obj['shape']) for obj in objects)


def _make_one(job):
    """Render and save one image; its own seed makes the result independent of worker scheduling."""
    import synthetic_hard  # here, not at the top: it builds on this module
    seed, image_id, size, captions_per_image, folder, hard = job
    rng = np.random.default_rng([seed, image_id])
    if hard:
        objects = synthetic_hard.random_scene(rng, size)
        image, captions = synthetic_hard.render_image(objects, rng, size), synthetic_hard.captions_for
    else:
        objects = random_scene(rng, size)
        image, captions = render_image(objects, rng, size), captions_for
    file_name = f'{image_id:012d}.png'
    image.save(os.path.join(folder, file_name), optimize=False)
    return ({'id': image_id, 'file_name': file_name, 'width': size, 'height': size, 'objects': objects},
            captions(objects, rng, captions_per_image))


def _parameters_of(path):
    """The generation parameters recorded in an annotation file, or None if there is no usable file."""
    try:
        with open(path) as f:
            return json.load(f)['info']['parameters']
    except (OSError, ValueError, KeyError, TypeError):
        return None


def make_synthetic_coco(root, num_train=3000, num_val=300, image_size=64, seed=0, captions_per_image=5,
                        progress=True, hard=False):
    """Write root/{train,val}/*.png and root/annotations/captions_{train,val}.json; return the JSON paths.
    hard=True makes the harder set of synthetic_hard.py instead.

    Does nothing if both JSON files already record the same parameters. Val ids follow the train ids,
    so ids are unique across splits; the same seed gives the same bytes.
    """
    parameters = {'version': VERSION, 'num_train': num_train, 'num_val': num_val, 'image_size': image_size,
                  'seed': seed, 'captions_per_image': captions_per_image}
    if hard:
        import synthetic_hard
        parameters['hard'] = synthetic_hard.VERSION
    paths = tuple(os.path.join(root, 'annotations', f'captions_{split}.json') for split in ('train', 'val'))
    if all(_parameters_of(path) == parameters for path in paths):
        return paths
    os.makedirs(os.path.join(root, 'annotations'), exist_ok=True)
    splits = (('train', range(1, num_train + 1)), ('val', range(num_train + 1, num_train + num_val + 1)))
    with Pool(min(os.cpu_count() or 1, 4)) as pool:
        for (split, ids), path in zip(splits, paths):
            folder = os.path.join(root, split)
            os.makedirs(folder, exist_ok=True)
            jobs = [(seed, image_id, image_size, captions_per_image, folder, hard) for image_id in ids]
            images, annotations = [], []
            for image, captions in tqdm(pool.imap(_make_one, jobs, chunksize=64), total=len(jobs),
                                        desc=f'synthetic {split}', disable=not progress):
                images.append(image)
                for k, caption in enumerate(captions):
                    annotations.append({'id': (image['id'] - 1) * captions_per_image + k + 1,
                                        'image_id': image['id'], 'caption': caption})
            kind = 'synthetic shapes, hard' if hard else 'synthetic shapes'
            dataset = {'info': {'description': f'{kind}, {split} split (synthetic.py)',
                                'parameters': parameters},
                       'licenses': [], 'images': images, 'annotations': annotations}
            # Written last, atomically: a JSON file means a finished split.
            atomic_write(path, lambda f: f.write(json.dumps(dataset).encode()))
    return paths


def write_example(path, seed=0):
    """Save the fixed example scene (a large red circle left of a small blue triangle) as a 64 x 64 PNG."""
    objects = [{'shape': 'circle', 'colour': 'red', 'size': 'large', 'diameter': 28, 'x': 19, 'y': 28},
               {'shape': 'triangle', 'colour': 'blue', 'size': 'small', 'diameter': 16, 'x': 47, 'y': 40}]
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    render_image(objects, np.random.default_rng(seed)).save(path)
    return objects




def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument('--root', default='data/synthetic', help='where images and annotations go')
    parser.add_argument('--num_train', type=positive_int, default=3000, help='training images')
    parser.add_argument('--num_val', type=count, default=300, help='held-out images')
    parser.add_argument('--image_size', type=positive_int, default=64, help='side of the square images')
    parser.add_argument('--seed', type=int, default=0, help='the same seed makes the same files')
    parser.add_argument('--hard', action='store_true',
                        help='1-4 objects, fills, relations, counts (synthetic_hard.py)')
    args = parser.parse_args()
    paths = make_synthetic_coco(args.root, args.num_train, args.num_val, args.image_size, args.seed, hard=args.hard)
    print(f'images in {os.path.join(args.root, "train")} and {os.path.join(args.root, "val")}')
    print(f'captions in {paths[0]} and {paths[1]}')


if __name__ == '__main__':
    main()
