"""What both shapes sets draw with: random picks, boxes that keep shapes apart, backgrounds and shades."""
import numpy as np
from PIL import Image, ImageDraw


def pick(rng, options):
    """A plain Python item (not a numpy scalar), so scenes go straight into JSON."""
    return options[int(rng.integers(len(options)))]


def box(obj):
    """Inclusive pixel bounding box (x0, y0, x1, y1) of an object."""
    x0, y0 = obj['x'] - obj['diameter'] // 2, obj['y'] - obj['diameter'] // 2
    return x0, y0, x0 + obj['diameter'] - 1, y0 + obj['diameter'] - 1


def apart(a, b, gap):
    """True if more than gap pixels separate the two boxes along some axis."""
    return a[2] + gap < b[0] or b[2] + gap < a[0] or a[3] + gap < b[1] or b[3] + gap < a[1]


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
