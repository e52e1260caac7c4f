"""Time resize.py against the tutorial's resize loop on the same synthetic photos.

The tutorial's loop is one process that decodes each JPEG at full size, resizes it with LANCZOS and
saves it. Both methods read the same generated JPEGs and write to a fresh folder of their own each
round; rounds alternate which goes first, so machine noise hits both alike. The table reports the
median images per second, the ratio of the medians, and how far resize.py's pixels are from the
tutorial's (mean absolute difference, 0-255), which shows what the shortcuts cost in quality.

    python bench_resize.py                                          # COCO-sized 640x480 photos
    python bench_resize.py --width 2048 --height 1536 --num_images 50  # big photos, where draft helps
"""
import argparse
import contextlib
import io
import os
import random
import shutil
import statistics
import sys
import tempfile
import time

import PIL
from PIL import Image, ImageChops, ImageStat

from resize import SAVE_OPTIONS, resize_folder


def make_photos(folder, count, size, seed):
    """Smooth random colour fields plus sensor-like noise, so JPEG sizes and decode times look real."""
    rng = random.Random(seed)
    for i in range(count):
        base = Image.frombytes('RGB', (8, 6), rng.randbytes(8 * 6 * 3)).resize(size, Image.Resampling.BICUBIC)
        noise = Image.merge('RGB', [Image.effect_noise(size, 12) for _ in range(3)])
        photo = ImageChops.add(base, noise, offset=-128)
        photo.save(os.path.join(folder, f'COCO_train2014_{i:012d}.jpg'), quality=90)


def tutorial(image_dir, output_dir, size):
    """The tutorial's resize.py loop, with ANTIALIAS spelled LANCZOS and the same JPEG quality as ours."""
    for name in sorted(os.listdir(image_dir)):
        with Image.open(os.path.join(image_dir, name)) as image:
            image = image.resize((size, size), Image.Resampling.LANCZOS)
            image.save(os.path.join(output_dir, name), **SAVE_OPTIONS['JPEG'])


def ours(workers):
    def run(image_dir, output_dir, size):
        with contextlib.redirect_stderr(io.StringIO()):  # no progress bar in the timings' output
            resized, skipped, failed = resize_folder(image_dir, output_dir, size, workers)
        assert not failed and not skipped, failed
    return run


def mean_difference(dir_a, dir_b):
    """Mean absolute pixel difference over all images in two folders of the same names."""
    diffs = []
    for name in os.listdir(dir_a):
        with Image.open(os.path.join(dir_a, name)) as a, Image.open(os.path.join(dir_b, name)) as b:
            diffs.append(statistics.mean(ImageStat.Stat(ImageChops.difference(a, b)).mean))
    return statistics.mean(diffs)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--num_images', type=int, default=200)
    parser.add_argument('--width', type=int, default=640)
    parser.add_argument('--height', type=int, default=480)
    parser.add_argument('--image_size', type=int, default=256)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--workers', type=int, default=os.cpu_count())
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()

    methods = {'tutorial (1 process, full decode)': tutorial,
               f'resize.py ({args.workers} workers, draft)': ours(args.workers)}
    rates = {label: [] for label in methods}
    with tempfile.TemporaryDirectory() as work:
        image_dir = os.path.join(work, 'train2014')
        os.mkdir(image_dir)
        make_photos(image_dir, args.num_images, (args.width, args.height), args.seed)
        megabytes = sum(e.stat().st_size for e in os.scandir(image_dir)) / 1e6
        for round_ in range(args.repeats):
            order = list(methods) if round_ % 2 == 0 else list(methods)[::-1]
            for label in order:
                output_dir = os.path.join(work, f'out_{list(methods).index(label)}')
                shutil.rmtree(output_dir, ignore_errors=True)
                os.mkdir(output_dir)
                start = time.perf_counter()
                methods[label](image_dir, output_dir, args.image_size)
                rates[label].append(args.num_images / (time.perf_counter() - start))
        difference = mean_difference(os.path.join(work, 'out_0'), os.path.join(work, 'out_1'))

    base, fast = (statistics.median(r) for r in rates.values())
    print(f'{args.num_images} JPEGs {args.width}x{args.height} ({megabytes / args.num_images * 1000:.0f} kB each) '
          f'-> {args.image_size}x{args.image_size}, {args.repeats} rounds, {os.cpu_count()} CPUs, '
          f'Pillow {PIL.__version__}, Python {sys.version.split()[0]}\n')
    print('| method | images/s (median) |')
    print('|---|---:|')
    for label, rate in zip(rates, (base, fast)):
        print(f'| {label} | {rate:.0f} |')
    print(f'\nspeed-up: {fast / base:.2f}x; mean pixel difference from the tutorial: {difference:.2f} / 255')
    print(f'command: python bench_resize.py --num_images {args.num_images} --width {args.width} '
          f'--height {args.height} --image_size {args.image_size} --repeats {args.repeats} --workers {args.workers}')


if __name__ == '__main__':
    main()
