"""The easy shapes set: one or two coloured shapes on a light background.

Every caption names each shape as "<size> <colour> <shape>", always from left to right, so a caption's
content can be checked by parsing it (parse_caption, content_matches). The ground truth is kept in each
image's "objects".
"""
import os

import numpy as np

from synthetic.draw import apart, background, box, pick, shade

SHAPES = ('circle', 'square', 'triangle')
COLOURS = {'red': (220, 40, 40), 'green': (40, 160, 60), 'blue': (40, 80, 220),
           'yellow': (235, 200, 20), 'purple': (140, 50, 170)}
SIZES = {'small': (14, 18), 'large': (26, 32)}  # diameter range in pixels at 64 x 64
VERSION = 1  # bump when the images or captions change, so cached sets are made again
PARAMETERS = {'version': VERSION}  # what its annotation files record of the kind of set
DESCRIPTION = 'synthetic shapes'

ONE = ('a {} .', 'there is a {} in the picture .', 'an image of a {} .', 'a picture with a {} .',
       'a single {} .', 'one shape : a {} .')
TWO = ('a {} and a {} .', 'a {} to the left of a {} .', 'a picture with a {} and a {} .',
       'two shapes : a {} and a {} .', 'there is a {} next to a {} .', 'an image of a {} and a {} .')


def _random_attributes(rng):
    return pick(rng, list(SIZES)), pick(rng, list(COLOURS)), pick(rng, SHAPES)


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
                                 and apart(box(objects[0]), box(objects[1]), 2 * scale)):
            return sorted(objects, key=lambda obj: obj['x'])


def render_image(objects, rng, size=64):
    """Draw the objects over a light background."""
    image, draw = background(rng, size)
    for obj in objects:
        colour = shade(COLOURS[obj['colour']], rng)
        x0, y0, x1, y1 = box(obj)
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


def write_example(path, seed=0):
    """Save the fixed example scene (a large red circle left of a small blue triangle) as a 64 x 64 PNG."""
    objects = [{'shape': 'circle', 'colour': 'red', 'size': 'large', 'diameter': 28, 'x': 19, 'y': 28},
               {'shape': 'triangle', 'colour': 'blue', 'size': 'small', 'diameter': 16, 'x': 47, 'y': 40}]
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    render_image(objects, np.random.default_rng(seed)).save(path)
    return objects
