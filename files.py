"""Reading images and writing files safely. No torch here, so build_vocab.py, resize.py and the synthetic package
start fast."""
import os
import re

import numpy as np
from PIL import Image, ImageOps


class CheckpointError(Exception):
    """A checkpoint, weights or output file that cannot be used or written; the message names the file and the fix."""


class ImageError(Exception):
    """An image that cannot be read; the message names the file and the reason."""


class WriteErrors:
    """A file as write functions see it, which remembers the OSError its writes raised. Some writers turn
    that error into another: torch.save reports a full disk as a RuntimeError ("unexpected pos 704 vs 598"),
    so atomic_write raises the OSError itself instead, and save_file can say "No space left on device"."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data):
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise

    def __getattr__(self, name):  # everything else (flush, fileno, tell, ...) is the file's own
        return getattr(self.file, name)


def atomic_write(path, write, sync=True):
    """write(file) into a temporary file beside path, then rename it over path: whatever happens, path
    holds either the old content or the new, never half of it. sync=False skips the fsync, for files
    cheap to make again (resized images): a killed process still leaves no half file, a power cut might.
    A write that fails is an OSError, whatever write() turned it into."""
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    temporary = f'{path}.tmp{os.getpid()}'
    try:
        with open(temporary, 'wb') as f:
            recorded = WriteErrors(f)
            try:
                write(recorded)
            except Exception as err:
                if recorded.error is not None and not isinstance(err, OSError):
                    raise recorded.error from None
                raise
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def save_file(path, write):
    """atomic_write, with a full disk or any other write failure as one CheckpointError line."""
    try:
        atomic_write(path, write)
    except OSError as err:
        raise CheckpointError(f'could not write {path} ({err.strerror or err}); '
                              f'the previous {os.path.basename(path)}, if any, is intact') from None


def remove_stale_temporaries(folder):
    """Delete the NAME.tmpPID files that atomic_write leaves when a process is killed mid-save, if that
    process is gone: each can be as large as a checkpoint. Returns (files removed, bytes freed)."""
    removed, freed = 0, 0
    for entry in os.scandir(folder) if os.path.isdir(folder) else ():
        match = re.fullmatch(r'.+\.tmp(\d+)', entry.name)
        if not match or not entry.is_file(follow_symlinks=False) or process_alive(int(match.group(1))):
            continue
        try:
            size = entry.stat().st_size
            os.remove(entry.path)
        except FileNotFoundError:
            continue  # another run removed it first
        removed, freed = removed + 1, freed + size
    return removed, freed


def process_alive(pid):
    """Whether a process with this id exists (signal 0 checks without sending anything)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # alive but someone else's, or not a real pid: leave the file alone
    return True


def to_rgb(image):
    """RGB whatever the mode; transparent areas become white, not black, and 16-bit greys are scaled
    to 8 bits rather than clipped to white."""
    if image.mode in ('I', 'I;16', 'I;16B', 'I;16L', 'F'):
        grey = np.asarray(image, dtype=np.float32)
        scale = 255.0 / (65535.0 if grey.max() > 255 or image.mode.startswith('I;16') else 255.0)
        image = Image.fromarray(np.clip(grey * scale, 0, 255).astype(np.uint8), 'L')
    if image.mode in ('RGBA', 'LA', 'PA') or (image.mode == 'P' and 'transparency' in image.info):
        image = image.convert('RGBA')
        background = Image.new('RGBA', image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert('RGB')
    return image if image.mode == 'RGB' else image.convert('RGB')  # a needless copy costs ~25% here


def load_image(path):
    """Open an image upright and in RGB, whatever its mode; transparent areas become white."""
    try:
        with Image.open(path) as image:
            return to_rgb(ImageOps.exif_transpose(image))
    except FileNotFoundError:
        raise ImageError(f'{path}: no such file') from None
    except IsADirectoryError:
        raise ImageError(f'{path}: is a directory, not an image') from None
    except Image.DecompressionBombError as err:  # a real image, but opening it could exhaust the memory
        raise ImageError(f'{path}: too many pixels to open safely ({err})') from None
    except (OSError, ValueError, SyntaxError) as err:
        raise ImageError(f'{path}: cannot read image ({err})') from None
