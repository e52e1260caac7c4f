"""Resize every image in a folder to a square, so training does not decode full-size photos each epoch.

    python resize.py --image_dir ./data/train2014/ --output_dir ./data/resized2014/ --image_size 256

Like the tutorial the images are squashed, not cropped, to image_size x image_size. Unlike it, this
uses every core, lets the JPEG decoder shrink big photos while decoding, turns rotated phone photos
upright, skips images a previous run already wrote, and reports unreadable files instead of stopping.
"""
import argparse
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image, ImageOps
from tqdm import tqdm

from files import atomic_write, to_rgb
from flags import HelpFormatter, positive_int

# File extension -> the format it is saved in, so an output's name always matches its content.
FORMATS = {'.jpg': 'JPEG', '.jpeg': 'JPEG', '.png': 'PNG', '.bmp': 'BMP', '.gif': 'GIF', '.webp': 'WEBP'}
SAVE_OPTIONS = {'JPEG': {'quality': 90}, 'WEBP': {'quality': 90}}


def resize_image(src_path, dst_path, size):
    """Write src_path as a size x size RGB image at dst_path, in the format its extension names.

    Written atomically, so dst_path is either complete or absent: a killed run never leaves a
    half-written file that the next run would skip.
    """
    fmt = FORMATS[os.path.splitext(dst_path)[1].lower()]
    with Image.open(src_path) as image:
        # JPEG only (a no-op otherwise): decode at 1/2, 1/4 or 1/8 scale, as long as both sides stay
        # at least twice the target, which keeps the final resize's quality while skipping most work.
        image.draft('RGB', (2 * size, 2 * size))
        ImageOps.exif_transpose(image, in_place=True)
        # LANCZOS rather than BICUBIC: it is the sharpest filter for shrinking, and the extra cost is
        # small next to decoding.
        image = to_rgb(image).resize((size, size), Image.Resampling.LANCZOS)
    atomic_write(dst_path, lambda f: image.save(f, fmt, **SAVE_OPTIONS.get(fmt, {})), sync=False)


def try_resize(job):
    """Run in a worker: None on success, else why the image failed, so one bad file cannot stop the run."""
    try:
        resize_image(*job)
    except Exception as err:  # Pillow's decoders raise many kinds; each is one failed image
        return str(err) or type(err).__name__
    return None


def check_folders(image_dir, output_dir):
    """Refuse a missing source, and any output folder that would write into the source folder."""
    if not os.path.isdir(image_dir):
        raise FileNotFoundError(f'image_dir {image_dir} is not a folder')
    source, output = Path(image_dir).resolve(), Path(output_dir).resolve()
    if output == source or source in output.parents:
        raise ValueError(f'output_dir {output_dir} must not be image_dir {image_dir} or inside it')


def resize_folder(image_dir, output_dir, size, workers=None):
    """Resize the images in image_dir into output_dir; return (resized, skipped, [(name, reason)])."""
    workers = workers if workers is not None else os.cpu_count() or 1
    if size < 1 or workers < 1:
        raise ValueError('image_size and workers must be at least 1')
    check_folders(image_dir, output_dir)
    os.makedirs(output_dir, exist_ok=True)
    names = sorted(entry.name for entry in os.scandir(image_dir)
                   if entry.is_file() and os.path.splitext(entry.name)[1].lower() in FORMATS)

    def done(name):
        path = os.path.join(output_dir, name)
        return os.path.isfile(path) and os.path.getsize(path) > 0

    todo = [name for name in names if not done(name)]
    failed = []
    if todo:
        jobs = [(os.path.join(image_dir, name), os.path.join(output_dir, name), size) for name in todo]
        # Chunks amortise the hand-over between processes; several per worker keep the load even.
        chunksize = max(1, min(64, len(jobs) // (4 * workers)))
        with ProcessPoolExecutor(min(workers, len(jobs))) as pool:
            results = pool.map(try_resize, jobs, chunksize=chunksize)
            for name, reason in zip(todo, tqdm(results, total=len(jobs), unit='img', desc='resizing')):
                if reason is not None:
                    failed.append((name, reason))
                    tqdm.write(f'cannot resize {name}: {reason}', file=sys.stderr)
    return len(todo) - len(failed), len(names) - len(todo), failed


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
