"""Bad input gets a one-line error and a non-zero exit, and nothing is lost. Every bad file is made here."""
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import train as trainer
import training
from conftest import REPO, run, tiny_args, tutorial_files
from data_loader import CocoDataset, ImageError, collate_fn, load_image
from model import CheckpointError, read_checkpoint
from vocabulary import Vocabulary, tokenize

RED = (220, 30, 30)


# --- images -----------------------------------------------------------------------------------

def saved(image, path, **options):
    image.save(path, **options)
    return path


def test_every_kind_of_image_comes_out_upright_rgb(tmp_path):
    red = Image.new('RGB', (40, 30), RED)
    transparent = Image.new('RGBA', (40, 30), (0, 0, 0, 0))
    transparent.paste((0, 0, 255, 255), (0, 0, 20, 30))
    frames = [Image.new('RGB', (20, 20), colour) for colour in (RED, (0, 0, 255))]
    grey16 = Image.fromarray(np.full((20, 20), 32768, dtype=np.uint16))
    rotated = Image.new('RGB', (40, 20), RED)
    rotated.paste((0, 0, 255), (20, 0, 40, 20))  # blue on the right half
    exif = rotated.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    cases = {
        saved(red.convert('L'), tmp_path / 'grey.png'): (red.convert('L').getpixel((0, 0)),) * 3,
        saved(transparent, tmp_path / 'rgba.png'): (255, 255, 255),  # transparent areas become white
        saved(red.convert('P', palette=Image.Palette.ADAPTIVE), tmp_path / 'palette.png'): RED,
        saved(red.convert('CMYK'), tmp_path / 'cmyk.jpg', quality=95): RED,
        saved(grey16, tmp_path / 'grey16.png'): (128, 128, 128),
        saved(Image.new('RGB', (1, 1), RED), tmp_path / 'tiny.png'): RED,
        saved(frames[0], tmp_path / 'animated.gif', save_all=True, append_images=frames[1:]): RED,
        saved(red, tmp_path / 'photo.webp', quality=95): RED,
    }
    saved(rotated, tmp_path / 'rotated.jpg', exif=exif, quality=95)
    for path, colour in cases.items():
        image = load_image(path)
        assert image.mode == 'RGB', path.name
        np.testing.assert_allclose(image.getpixel((image.width - 1, image.height - 1)), colour, atol=12,
                                   err_msg=path.name)
    upright = load_image(tmp_path / 'rotated.jpg')
    assert upright.size == (20, 40)  # turned upright: the blue half is now at the bottom
    np.testing.assert_allclose(upright.getpixel((10, 35)), (0, 0, 255), atol=20)
    np.testing.assert_allclose(upright.getpixel((10, 5)), RED, atol=20)


def bad_images(folder):
    """name -> a file that is not a usable image, and a phrase its error should contain."""
    jpeg = io.BytesIO()
    Image.new('RGB', (200, 200), RED).save(jpeg, 'JPEG')
    (folder / 'empty.jpg').write_bytes(b'')
    (folder / 'truncated.jpg').write_bytes(jpeg.getvalue()[:len(jpeg.getvalue()) // 2])
    (folder / 'text.jpg').write_text('this is not an image\n')
    (folder / 'a_folder.jpg').mkdir()
    return {'empty.jpg': 'cannot read', 'truncated.jpg': 'truncated', 'text.jpg': 'cannot read',
            'a_folder.jpg': 'directory', 'missing.jpg': 'no such file'}


def test_unusable_images_get_one_line_errors_naming_the_file(tmp_path):
    for name, phrase in bad_images(tmp_path).items():
        with pytest.raises(ImageError) as caught:
            load_image(tmp_path / name)
        message = str(caught.value)
        assert name in message and phrase in message and '\n' not in message


def test_decompression_bombs_stay_refused(tmp_path, monkeypatch):
    path = saved(Image.new('RGB', (100, 100), RED), tmp_path / 'bomb.png')
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 1000)  # 10,000 pixels is over twice the limit
    with pytest.raises(ImageError, match='bomb.png: too many pixels to open safely'):
        load_image(path)


@pytest.fixture(scope='module')
def trained(one_epoch_seed7):
    """The synthetic set of 24 training images (120 captions) as data/, its vocab.json, and a model of one
    epoch of train_args in models/."""
    return one_epoch_seed7


def train_args(root, model_path, *extra, caption_path=None):
    return tiny_args(root / 'data', model_path, *extra, batch_size=8, learning_rate=None,
                     vocab_path=root / 'vocab.json',
                     caption_path=caption_path or root / 'data' / 'annotations' / 'captions_train.json')


def test_sample_captions_the_good_images_and_names_the_bad_ones(trained, tmp_path):
    phrases = bad_images(tmp_path)
    good = [saved(Image.new('RGB', (50, 40), RED), tmp_path / 'good.png'),
            saved(Image.new('LA', (50, 40), (90, 128)), tmp_path / 'grey_alpha.png')]
    result = run('sample.py', '--checkpoint', trained / 'models' / 'checkpoint.pt', '--image', *good,
                 *(tmp_path / name for name in phrases))
    assert result.returncode == 1
    assert [line.split(':')[0] for line in result.stdout.splitlines()] == [str(p) for p in good]
    device, *errors = result.stderr.strip().splitlines()
    assert device == 'device: cpu, dtype: float32'
    assert len(errors) == len(phrases) and 'Traceback' not in result.stderr
    for line, (name, phrase) in zip(errors, phrases.items()):
        assert line.startswith('error: ') and name in line and phrase in line


# --- training ---------------------------------------------------------------------------------

def with_broken_images(root, tmp_path):
    """A copy of the training images with one file missing and one corrupt."""
    images = tmp_path / 'train'
    images.mkdir()
    for path in (root / 'data' / 'train').iterdir():
        (images / path.name).write_bytes(path.read_bytes())
    (images / '000000000003.png').unlink()
    (images / '000000000005.png').write_text('corrupt')
    return images


def test_training_skips_unreadable_images_with_a_count(trained, tmp_path, capsys):
    images = with_broken_images(trained, tmp_path)
    args = train_args(trained, tmp_path / 'models', '--num_epochs', '2')
    args.image_dir = str(images)
    history = training.train(args).history
    out, err = capsys.readouterr()
    assert '1 of the 24 images named in' in out and 'are missing' in out
    assert err.count('skipped: ') == 1 and '000000000005.png' in err  # reported once, not every epoch
    assert 'epoch 1: skipped 5 captions of unreadable images' in out
    assert 'epoch 2: skipped 5 captions of unreadable images' in out
    assert len(history['train']) == 2 * 15  # 115 readable captions in batches of 8

    args.strict = True
    with pytest.raises(ImageError, match='1 of the 24 images'):
        training.train(args)
    (images / '000000000003.png').write_bytes((trained / 'data' / 'train' / '000000000003.png').read_bytes())
    with pytest.raises(ImageError, match='000000000005.png'):
        training.train(args)


def test_captions_without_words_are_dropped_and_long_ones_cut(trained, tmp_path, capsys):
    dataset = json.loads((trained / 'data' / 'annotations' / 'captions_train.json').read_text())
    dataset['annotations'][0]['caption'] = ''
    dataset['annotations'][1]['caption'] = ' ... !? '
    dataset['annotations'][2]['caption'] = 'a ' + 'very ' * 80 + 'long caption'
    dataset['annotations'][3]['caption'] = 'Ein grüner Kreis, très joli'
    path = tmp_path / 'captions.json'
    path.write_text(json.dumps(dataset))
    vocab = Vocabulary.from_words(['<pad>', '<start>', '<end>', '<unk>', 'a', 'very', 'grüner', 'très'])
    captions = CocoDataset(str(trained / 'data' / 'train'), str(path), vocab)
    assert 'dropped 2 captions with no words' in capsys.readouterr().out
    assert len(captions) == 120 - 2
    long = captions.caption(0).tolist()
    assert len(long) == 52 and long[0] == 1 and long[-1] == 2 and long[1:4] == [4, 5, 5]
    assert captions.caption(1).tolist()[1:4] == [vocab('ein'), vocab('grüner'), vocab('kreis')]
    assert tokenize('Ein grüner Kreis, très joli') == ['ein', 'grüner', 'kreis', ',', 'très', 'joli']


def test_malformed_annotations_name_the_file(trained, tmp_path):
    bad = tmp_path / 'captions.json'
    bad.write_text('{"images": [1, 2], "annotations": ')
    result = run('train.py', '--image_dir', trained / 'data' / 'train', '--caption_path', bad,
                 '--vocab_path', trained / 'vocab.json', '--model_path', tmp_path / 'models', '--backbone', 'smallcnn',
                 '--weights', 'none')
    assert result.returncode == 1
    assert result.stderr.strip().startswith(f'error: {bad}: not a readable COCO captions file')
    assert 'Traceback' not in result.stderr


def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(trained, tmp_path, monkeypatch):
    real_loss, calls = training.caption_loss, []

    def poisoned(*args):
        loss, n = real_loss(*args)
        calls.append(1)
        return (loss * float('nan') if len(calls) == 5 else loss), n

    monkeypatch.setattr(training, 'caption_loss', poisoned)
    with pytest.raises(training.NonFiniteLoss, match='step 5'):
        training.train(train_args(trained, tmp_path, '--num_epochs', '2', '--save_step', '2'))
    checkpoint = read_checkpoint(str(tmp_path / 'checkpoint.pt'))
    assert checkpoint['step'] == 4
    assert all(torch.isfinite(v).all() for v in checkpoint['decoder'].values())

    calls.clear()
    result = training.train(train_args(trained, tmp_path, '--num_epochs', '1', '--skip_nonfinite'))
    decoder, history = result.decoder, result.history
    assert len(history['train']) == 15 - 1
    assert all(torch.isfinite(p).all() for p in decoder.parameters())


def test_out_of_memory_suggests_a_smaller_batch(trained, tmp_path, monkeypatch, capsys):
    def out_of_memory(*args):
        raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')

    monkeypatch.setattr(training, 'caption_loss', out_of_memory)
    argv = ['--image_dir', str(trained / 'data' / 'train'),
            '--caption_path', str(trained / 'data' / 'annotations' / 'captions_train.json'),
            '--vocab_path', str(trained / 'vocab.json'), '--model_path', str(tmp_path), '--backbone', 'smallcnn',
            '--weights', 'none', '--num_workers', '0', '--batch_size', '64', '--image_size', '32', '--crop_size', '32',
            '--device', 'cpu']
    with pytest.raises(SystemExit) as caught:
        trainer.main(argv)
    assert 'out of GPU memory with --batch_size 64; try a smaller --batch_size' in str(caught.value.code)


# --- checkpoints and vocabularies -------------------------------------------------------------

def test_an_unwritable_model_path_fails_before_training(trained, tmp_path):
    blocker = tmp_path / 'a_file'
    blocker.write_text('not a folder')
    result = run('train.py', '--image_dir', trained / 'data' / 'train',
                 '--caption_path', trained / 'data' / 'annotations' / 'captions_train.json',
                 '--vocab_path', trained / 'vocab.json', '--model_path', blocker / 'models')
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert result.stderr.strip().startswith(f'error: cannot write checkpoints to {blocker / "models"}')


def test_a_full_disk_keeps_the_previous_checkpoint(trained, tmp_path, monkeypatch):
    training.train(train_args(trained, tmp_path, '--num_epochs', '1'))
    before = (tmp_path / 'checkpoint.pt').read_bytes()
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        f.write(b'partial bytes')
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(torch, 'save', disk_full)
    with pytest.raises(CheckpointError, match='No space left on device.*previous checkpoint'):
        training.train(train_args(trained, tmp_path, '--num_epochs', '2', '--resume'))
    monkeypatch.setattr(torch, 'save', real_save)
    assert (tmp_path / 'checkpoint.pt').read_bytes() == before
    assert [name for name in os.listdir(tmp_path) if '.tmp' in name] == []


def test_resuming_with_another_vocabulary_names_the_problem(trained, tmp_path):
    training.train(train_args(trained, tmp_path, '--num_epochs', '1'))
    words = json.loads((trained / 'vocab.json').read_text())['words']
    (tmp_path / 'vocab.json').write_text(json.dumps({'words': words[:-1]}))
    args = train_args(trained, tmp_path, '--num_epochs', '2', '--resume')
    args.vocab_path = str(tmp_path / 'vocab.json')
    with pytest.raises(CheckpointError, match=f'{len(words)} words.*{len(words) - 1}'):
        training.train(args)


def test_tutorial_size_flags_are_checked_against_the_weights(tutorial_encoder_file, tmp_path):
    words = ['<pad>', '<start>', '<end>', '<unk>', 'a', 'giraffe']
    tutorial_files(tmp_path, words, tutorial_encoder_file)
    image = saved(Image.new('RGB', (60, 60), RED), tmp_path / 'photo.png')
    common = ['sample.py', '--image', image, '--encoder_path', tmp_path / 'encoder-5-3000.pkl',
              '--decoder_path', tmp_path / 'decoder-5-3000.pkl', '--vocab_path', tmp_path / 'vocab.pkl']
    result = run(*common, '--embed_size', '256', '--hidden_size', '48')
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert 'has embed_size 32 but --embed_size 256 was given' in result.stderr
    assert run(*common, '--embed_size', '32', '--hidden_size', '48').returncode == 0


def test_killing_training_while_it_saves_never_corrupts_the_checkpoint(trained, tmp_path):
    command = ['train.py', '--image_dir', trained / 'data' / 'train',
               '--caption_path', trained / 'data' / 'annotations' / 'captions_train.json',
               '--vocab_path', trained / 'vocab.json', '--model_path', tmp_path, '--backbone', 'smallcnn',
               '--weights', 'none', '--image_size', '32', '--crop_size', '32', '--embed_size', '16',
               '--hidden_size', '24', '--batch_size', '8', '--num_workers', '0', '--save_step', '1',
               '--device', 'cpu', '--num_epochs', '1000']
    steps, path = [], tmp_path / 'checkpoint.pt'
    for delay in (0.3, 0.7, 1.1):
        before = path.stat().st_mtime_ns if path.exists() else None
        process = subprocess.Popen([sys.executable, *map(str, command + (['--resume'] if steps else []))], cwd=REPO,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while (not path.exists() or path.stat().st_mtime_ns == before) and time.time() < deadline:
            time.sleep(0.05)  # until this process has saved at least once
        time.sleep(delay)  # it saves after every step, so the kill lands in or near a save
        process.send_signal(signal.SIGKILL)
        assert process.wait() == -signal.SIGKILL  # still training when killed, not ended on an error of its own
        checkpoint = read_checkpoint(str(tmp_path / 'checkpoint.pt'))  # complete, whatever the moment
        steps.append(checkpoint['step'])
    assert steps == sorted(steps) and steps[-1] > steps[0]
    result = run(*command[:-2], '--num_epochs', str(checkpoint['epoch'] + 1), '--resume')
    assert result.returncode == 0, result.stderr[-2000:]
    assert read_checkpoint(str(tmp_path / 'checkpoint.pt'))['epoch'] == checkpoint['epoch'] + 1


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(1, 30), min_size=1, max_size=12))
def test_collate_sorts_and_pads_any_lengths(lengths):
    batch = [(torch.full((3, 2, 2), float(i)), torch.arange(1, n + 1)) for i, n in enumerate(lengths)]
    images, targets, got = collate_fn(list(batch))
    assert got == sorted(lengths, reverse=True)
    assert targets.shape == (len(lengths), max(lengths))
    for row, image, n in zip(targets, images, got):
        assert row[:n].tolist() == list(range(1, n + 1)) and (row[n:] == 0).all()
        assert len(batch[int(image[0, 0, 0])][1]) == n  # each image stays with its own caption


def test_a_vocabulary_that_does_not_match_the_checkpoint_is_named(trained, tmp_path):
    words = json.loads((trained / 'vocab.json').read_text())['words']
    (tmp_path / 'vocab.json').write_text(json.dumps({'words': words + ['zebra']}))
    image = saved(Image.new('RGB', (32, 32), RED), tmp_path / 'photo.png')
    result = run('sample.py', '--checkpoint', trained / 'models' / 'checkpoint.pt', '--image', image,
                 '--vocab_path', tmp_path / 'vocab.json')
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert f'trained with {len(words)} words but' in result.stderr and f'has {len(words) + 1}' in result.stderr


def test_the_exercise_photos_are_captioned(trained):
    """The original exercise's two photos, from ../shared when this checkout has it."""
    folder = REPO.parent / 'shared' / 'data' / 'tutorial'
    photos = [folder / 'example.png', folder / 'ext.jpg']
    if not all(photo.exists() for photo in photos):
        pytest.skip('the exercise photos are not in ../shared/data/tutorial')
    assert load_image(photos[0]).size == (331, 247) and load_image(photos[1]).size == (800, 534)
    result = run('sample.py', '--checkpoint', trained / 'models' / 'checkpoint.pt', '--image', *photos)
    assert result.returncode == 0, result.stderr[-2000:]
    assert [line.split(': ')[0] for line in result.stdout.splitlines()] == [str(p) for p in photos]


def test_evaluate_scores_the_readable_images_and_names_the_rest(trained, tmp_path):
    images = tmp_path / 'val'
    images.mkdir()
    for path in (trained / 'data' / 'val').iterdir():
        (images / path.name).write_bytes(path.read_bytes())
    broken = sorted(images.iterdir())[0]
    broken.write_bytes(broken.read_bytes()[:100])  # a truncated PNG
    result = run('evaluate.py', '--checkpoint', trained / 'models' / 'checkpoint.pt', '--image_dir', images,
                 '--caption_path', trained / 'data' / 'annotations' / 'captions_val.json',
                 '--results_path', tmp_path / 'results.json')
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert len(json.loads((tmp_path / 'results.json').read_text())) == 3 and 'CIDEr' in result.stdout
    errors = [line for line in result.stderr.replace('\r', '\n').splitlines() if line.startswith('error:')]
    assert errors[0].startswith(f'error: {broken}: cannot read image')
    assert errors[-1] == 'error: 1 images could not be read'
