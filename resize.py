"""Resize every image in a folder to a square, so training does not decode full-size photos each epoch.

    python resize.py --image_dir ./data/train2014/ --output_dir ./data/resized2014/ --image_size 256

Like the tutorial the images are squashed, not cropped, to image_size x image_size. Unlike it, this
uses every core, lets the JPEG decoder shrink big photos while decoding, turns rotated phone photos
upright, skips images a previous run already wrote, and reports unreadable files instead of stopping.
"""
import argparse
import os
import sys

from flags import HelpFormatter, positive_int
from images import resize_folder


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument('--image_dir', default='./data/train2014/', help='folder of images to resize (only read)')
    parser.add_argument('--output_dir', default='./data/resized2014/', help='folder for the resized images')
    parser.add_argument('--image_size', type=positive_int, default=256, help='side of the square output images')
    parser.add_argument('--workers', type=positive_int, default=os.cpu_count(),
                        help='processes to use; the default is every core here')
    args = parser.parse_args()
    try:
        resized, skipped, failed = resize_folder(args.image_dir, args.output_dir, args.image_size, args.workers)
    except (OSError, ValueError) as err:
        sys.exit(f'error: {err}')
    print(f'resized {resized}, skipped {skipped} already done, failed {len(failed)}')
    sys.exit(1 if failed else 0)


if __name__ == '__main__':
    main()
