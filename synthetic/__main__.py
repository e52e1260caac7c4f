"""python -m synthetic [--hard]: write a shapes set in COCO format (see synthetic/__init__.py)."""
import argparse
import os
import sys

import synthetic
from flags import HelpFormatter, count, positive_int
from synthetic import easy, hard, make_synthetic_coco


def main():
    run_as_module = os.path.basename(sys.argv[0]) == '__main__.py'  # else argparse would say "__main__.py"
    parser = argparse.ArgumentParser(prog='python -m synthetic' if run_as_module else None,
                                     description=synthetic.__doc__, formatter_class=HelpFormatter)
    parser.add_argument('--root', default='data/synthetic', help='where images and annotations go')
    parser.add_argument('--num_train', type=positive_int, default=3000, help='training images')
    parser.add_argument('--num_val', type=count, default=300, help='held-out images')
    parser.add_argument('--image_size', type=positive_int, default=64, help='side of the square images')
    parser.add_argument('--seed', type=int, default=0, help='the same seed makes the same files')
    parser.add_argument('--hard', action='store_true',
                        help='the hard set: 1-4 objects, fills, relations, counts (synthetic/hard.py)')
    args = parser.parse_args()
    paths = make_synthetic_coco(args.root, args.num_train, args.num_val, args.image_size, args.seed,
                                kind=hard if args.hard else easy)
    print(f'images in {os.path.join(args.root, "train")} and {os.path.join(args.root, "val")}')
    print(f'captions in {paths[0]} and {paths[1]}')


if __name__ == '__main__':
    main()
