"""python -m realphotos [--root data/photos]: write the real-photo set in COCO format (see realphotos/__init__.py)."""
import argparse
import os
import sys

import realphotos
from flags import HelpFormatter, positive_int
from realphotos import PHOTOS, make_real_photos


def main():
    run_as_module = os.path.basename(sys.argv[0]) == '__main__.py'  # else argparse would say "__main__.py"
    parser = argparse.ArgumentParser(prog='python -m realphotos' if run_as_module else None,
                                     description=realphotos.__doc__, formatter_class=HelpFormatter)
    parser.add_argument('--root', default='data/photos', help='where images/ and annotations/ go')
    parser.add_argument('--image_size', type=positive_int, default=256, help="side of the square images (resize.py's)")
    args = parser.parse_args()
    try:
        path = make_real_photos(args.root, args.image_size)
    except OSError as err:  # a photo's package missing (FileNotFoundError), or a folder that cannot be written
        sys.exit(f'error: {err}')
    print(f'{len(PHOTOS)} photos in {os.path.join(args.root, "images")}, captions in {path}')


if __name__ == '__main__':
    main()
