"""resize.py: output size, mode and format, EXIF rotation, draft quality, skipping, bad files, command line."""
import os
import stat
from pathlib import Path

import pytest
from PIL import Image, ImageChops, ImageStat, JpegImagePlugin, features

from conftest import run
from images import resize_folder, resize_image

SCRIPT = Path(__file__).resolve().parents[1] / 'resize.py'
SIZE = 32
RED, BLUE = (220, 20, 20), (20, 20, 220)


def smooth_image(size, seed=0):
    """A photo-like image: random colours blurred by upscaling, so JPEG behaves as on real photos."""
    small = Image.frombytes('RGB', (4, 3), bytes((seed * 37 + i * 53) % 256 for i in range(36)))
    return small.resize(size, Image.Resampling.BICUBIC)


def make_folder(folder, count=3):
    folder.mkdir()
    for i in range(count):
        smooth_image((60, 40), seed=i).save(folder / f'img{i}.jpg', quality=90)
    return folder


def run_cli(*args, process=False):
    return run(SCRIPT, *args, process=process)


def two_halves():
    """60x40: left half red, right half blue."""
    image = Image.new('RGB', (60, 40), BLUE)
    image.paste(RED, (0, 0, 30, 40))
    return image


def close(pixel, colour, tolerance=40):
    assert len(pixel) == len(colour) == 3, pixel
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, colour))


SOURCES = {
    'rgb.jpg': lambda: smooth_image((60, 40)),
    'grey.jpg': lambda: smooth_image((60, 40)).convert('L'),
    'rgb.png': lambda: smooth_image((60, 40)),
    'rgba.png': lambda: smooth_image((60, 40)).convert('RGBA'),
    'palette.png': lambda: smooth_image((60, 40)).convert('P'),
    'palette.gif': lambda: smooth_image((60, 40)).convert('P'),
    'rgb.bmp': lambda: smooth_image((60, 40)),
    'rgb.webp': lambda: smooth_image((60, 40)),
}


@pytest.mark.parametrize('name', SOURCES)
def test_output_is_square_rgb_in_source_format(tmp_path, name):
    if name.endswith('.webp') and not features.check('webp'):
        pytest.skip('Pillow built without WebP')
    src, dst = tmp_path / name, tmp_path / f'out_{name}'
    SOURCES[name]().save(src)
    resize_image(src, dst, SIZE)
    with Image.open(src) as before, Image.open(dst) as after:
        assert after.size == (SIZE, SIZE)
        assert after.format == before.format
        # GIF can only store a palette, so its pixels are checked after conversion.
        assert after.mode == ('P' if name.endswith('.gif') else 'RGB')
        assert after.convert('RGB').getpixel((0, 0)) != (0, 0, 0)


def test_transparent_areas_become_white(tmp_path):
    Image.new('RGBA', (40, 40), (255, 0, 0, 0)).save(tmp_path / 'clear.png')
    resize_image(tmp_path / 'clear.png', tmp_path / 'out.png', SIZE)
    with Image.open(tmp_path / 'out.png') as out:
        assert out.getextrema() == ((255, 255),) * 3


def test_large_jpeg_is_drafted_and_keeps_its_colours(tmp_path, monkeypatch):
    source = smooth_image((2000, 1500), seed=5)
    source.save(tmp_path / 'big.jpg', quality=90)
    decoded = []
    draft = JpegImagePlugin.JpegImageFile.draft

    def spy(image, mode, size):
        result = draft(image, mode, size)
        decoded.append(image.size)
        return result
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, 'draft', spy)

    resize_image(tmp_path / 'big.jpg', tmp_path / 'out.jpg', 64)

    assert decoded == [(250, 188)]  # 1/8 scale: still at least twice the 64 pixel target
    with Image.open(tmp_path / 'out.jpg') as out:
        reference = source.resize((64, 64), Image.Resampling.LANCZOS)
        for got, want in zip(ImageStat.Stat(out).mean, ImageStat.Stat(source).mean):
            assert abs(got - want) < 2
        assert max(ImageStat.Stat(ImageChops.difference(out, reference)).mean) < 3


def test_exif_rotated_photo_comes_out_upright(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: turn 90 degrees clockwise to view, so the left half ends on top
    two_halves().save(tmp_path / 'phone.jpg', quality=95, exif=exif)
    resize_image(tmp_path / 'phone.jpg', tmp_path / 'out.jpg', SIZE)
    with Image.open(tmp_path / 'out.jpg') as out:
        assert close(out.getpixel((SIZE // 2, 2)), RED)
        assert close(out.getpixel((SIZE // 2, SIZE - 3)), BLUE)
        assert out.getexif().get(0x0112, 1) == 1  # viewers must not rotate it a second time


def test_read_only_source_is_left_untouched(tmp_path):
    source = make_folder(tmp_path / 'src')
    before = {p.name: p.stat().st_mtime_ns for p in source.iterdir()}
    source.chmod(0o555)  # as root this does not block writes, so the listing below is what checks
    try:
        resized, skipped, failed = resize_folder(source, tmp_path / 'out', SIZE, workers=2)
    finally:
        source.chmod(0o755)
    assert (resized, skipped, failed) == (3, 0, [])
    assert {p.name: p.stat().st_mtime_ns for p in source.iterdir()} == before
    assert stat.S_IMODE(source.stat().st_mode) == 0o755


def test_second_run_skips_what_is_done(tmp_path):
    source, out = make_folder(tmp_path / 'src'), tmp_path / 'out'
    assert resize_folder(source, out, SIZE, workers=1) == (3, 0, [])
    assert resize_folder(source, out, SIZE, workers=1) == (0, 3, [])
    (out / 'img1.jpg').write_bytes(b'')  # an empty output counts as not done
    assert resize_folder(source, out, SIZE, workers=1) == (1, 2, [])
    assert sorted(os.listdir(out)) == ['img0.jpg', 'img1.jpg', 'img2.jpg']  # no temporary files left


def test_bad_files_are_reported_and_the_rest_resized(tmp_path, capsys):
    source = make_folder(tmp_path / 'src', count=2)
    (source / 'text.jpg').write_text('not an image')
    (source / 'empty.jpg').write_bytes(b'')
    good = (source / 'img0.jpg').read_bytes()
    (source / 'truncated.jpg').write_bytes(good[:len(good) // 2])
    (source / 'notes.txt').write_text('ignored: not an image extension')

    resized, skipped, failed = resize_folder(source, tmp_path / 'out', SIZE, workers=2)

    assert (resized, skipped) == (2, 0)
    assert sorted(name for name, _ in failed) == ['empty.jpg', 'text.jpg', 'truncated.jpg']
    assert all(reason for _, reason in failed)
    assert 'truncated' in dict(failed)['truncated.jpg'].lower()
    assert sorted(os.listdir(tmp_path / 'out')) == ['img0.jpg', 'img1.jpg']
    err = capsys.readouterr().err
    assert all(f'cannot resize {name}' in err for name, _ in failed)


def test_command_line_success_and_failure_exit_codes(tmp_path):
    source, out = make_folder(tmp_path / 'src'), tmp_path / 'out'
    ok = run_cli('--image_dir', source, '--output_dir', out, '--image_size', SIZE, '--workers', 1, process=True)
    assert ok.returncode == 0, ok.stderr
    assert 'resized 3, skipped 0 already done, failed 0' in ok.stdout

    (source / 'text.jpg').write_text('not an image')
    bad = run_cli('--image_dir', source, '--output_dir', out, '--image_size', SIZE, '--workers', 1)
    assert bad.returncode == 1
    assert 'resized 0, skipped 3 already done, failed 1' in bad.stdout
    assert 'cannot resize text.jpg' in bad.stderr


def test_command_line_missing_folder(tmp_path):
    result = run_cli('--image_dir', tmp_path / 'nowhere', '--output_dir', tmp_path / 'out')
    assert result.returncode == 1
    assert result.stderr.startswith('error:') and 'Traceback' not in result.stderr
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('output', ['.', './', 'resized'])
def test_command_line_refuses_output_in_source(tmp_path, output):
    source = make_folder(tmp_path / 'src')
    before = sorted(os.listdir(source))
    result = run_cli('--image_dir', source, '--output_dir', source / output)
    assert result.returncode == 1
    assert result.stderr.startswith('error:') and 'Traceback' not in result.stderr
    assert sorted(os.listdir(source)) == before
