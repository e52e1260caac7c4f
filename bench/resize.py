"""Time resize.py against the tutorial's resize loop on the same synthetic photos.

The tutorial's loop is one process that decodes each JPEG at full size, resizes it with LANCZOS and
saves it. resize.py runs with 1 worker (what draft decoding and its per-image extras alone give) and
with --workers. All read the same generated JPEGs and write to a fresh folder of their own each
round; rounds alternate their order, so machine noise hits all alike. The table reports the median
images per second and its ratio to the tutorial's; below it, how far resize.py's pixels are from the
tutorial's (mean absolute difference, 0-255), i.e. what draft decoding costs in quality. The
process speed-up needs idle cores: on a shared machine, check the load first.

    python -m bench.resize                                             # COCO-sized 640x480 photos
    python -m bench.resize --width 2048 --height 1536 --num_images 50  # big photos, where draft helps
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

from flags import HelpFormatter, positive_int
from images import SAVE_OPTIONS, resize_folder


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
    """resize_folder as a method like tutorial(); the pool's start-up is part of what is timed."""
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument('--num_images', type=positive_int, default=200, help='JPEGs to generate and resize')
    parser.add_argument('--width', type=positive_int, default=640, help='width of the generated photos')
    parser.add_argument('--height', type=positive_int, default=480, help='height of the generated photos')
    parser.add_argument('--image_size', type=positive_int, default=256, help='side of the square output images')
    parser.add_argument('--repeats', type=positive_int, default=3, help='rounds; the table reports their median')
    parser.add_argument('--workers', type=positive_int, default=os.cpu_count(),
                        help="resize.py's processes in the last row; the default is every core here")
    parser.add_argument('--seed', type=int, default=0, help='seed of the generated photos')
    args = parser.parse_args()

    methods = [('tutorial (1 process, full decode)', tutorial), ('resize.py, 1 worker', ours(1))]
    if args.workers > 1:
        methods.append((f'resize.py, {args.workers} workers', ours(args.workers)))
    rates = [[] for _ in methods]
    with tempfile.TemporaryDirectory() as work:
        image_dir = os.path.join(work, 'train2014')
        os.mkdir(image_dir)
        make_photos(image_dir, args.num_images, (args.width, args.height), args.seed)
        kilobytes = sum(e.stat().st_size for e in os.scandir(image_dir)) / 1000 / args.num_images
        outputs = [os.path.join(work, f'out{i}') for i in range(len(methods))]
        for round_ in range(args.repeats):
            order = range(len(methods)) if round_ % 2 == 0 else reversed(range(len(methods)))
            for i in order:
                shutil.rmtree(outputs[i], ignore_errors=True)
                os.mkdir(outputs[i])
                start = time.perf_counter()
                methods[i][1](image_dir, outputs[i], args.image_size)
                rates[i].append(args.num_images / (time.perf_counter() - start))
        difference = mean_difference(outputs[0], outputs[-1])

    medians = [statistics.median(r) for r in rates]
    print(f'{args.num_images} JPEGs {args.width}x{args.height} ({kilobytes:.0f} kB each) '
          f'-> {args.image_size}x{args.image_size}, {args.repeats} rounds, {os.cpu_count()} CPUs, '
          f'Pillow {PIL.__version__}, Python {sys.version.split()[0]}\n')
    print('| method | images/s (median) | speed-up |')
    print('|---|---:|---:|')
    for (label, _), rate in zip(methods, medians):
        print(f'| {label} | {rate:.0f} | {rate / medians[0]:.2f}x |')
    print(f'\nmean pixel difference, resize.py vs tutorial: {difference:.2f} / 255')
    print(f'command: python -m bench.resize --num_images {args.num_images} --width {args.width} '
          f'--height {args.height} --image_size {args.image_size} --repeats {args.repeats} --workers {args.workers}')


if __name__ == '__main__':
    main()
