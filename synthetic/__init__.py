"""Captioning sets the project makes itself: coloured shapes on light backgrounds, in COCO format.

    python -m synthetic --root data/synthetic
    python -m synthetic --root data/synthetic_hard --hard

- draw.py: what both sets draw with (random picks, boxes, backgrounds, shades);
- easy.py: one or two shapes, named left to right, as "<size> <colour> <shape>";
- hard.py: one to four shapes with fills, counts and relations, in varied wording;
- writer.py: make_synthetic_coco writes either kind as images plus COCO caption files.

Each kind can parse a caption back into the objects it names, so content_matches scores a caption.
"""
from synthetic.writer import make_synthetic_coco

__all__ = ['make_synthetic_coco']
