"""Pictures made from image files: square copies of a folder of images, resized on every core (resize.py),
and an image with its caption written beneath (sample.py, demo.py). No torch here, so resize.py starts fast.
"""
import os
import sys
import textwrap
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps
from tqdm import tqdm

from files import atomic_write, load_image, to_rgb

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


def captioned_picture(path, caption, min_width=320):
    """The image with its caption written beneath, wrapped to the picture's width."""
    image = load_image(path)
    if image.width < min_width:
        image = image.resize((min_width, round(image.height * min_width / image.width)), Image.Resampling.NEAREST)
    font_size = max(16, image.width // 24)
    font = ImageFont.load_default(size=font_size)
    chars_per_line = max(10, int(image.width / (0.55 * font_size)))
    lines = textwrap.wrap(caption, chars_per_line) or ['']
    line_height = int(font_size * 1.3)
    canvas = Image.new('RGB', (image.width, image.height + line_height * len(lines) + font_size), 'white')
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((font_size // 2, image.height + font_size // 2 + i * line_height), line, fill='black', font=font)
    return canvas
