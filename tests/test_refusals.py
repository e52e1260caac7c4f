"""Data that leaves nothing to train on, values out of range and full disks: each is refused with one
`error:` line naming the file or flag and the fix, before any training on nothing. Every bad file is made here."""
import errno
import io
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import build_vocab
import decoding
import demo
import evaluate
import extract_features
import files
import model
import resize
import sample
import synthetic.__main__ as synthetic
import train as trainer
import training
from bench import lstm as bench_lstm
from bench import resize as bench_resize
from bench import sample as bench_sample
from bench import train as bench_train
from conftest import disk_fills_for
from data_loader import CocoDataset, eval_transform, open_cache
from files import load_image
from model import read_checkpoint
from vocabulary import VocabError, load_vocab


@pytest.fixture(scope='module')
def trained(one_epoch_seed7):
    """The synthetic set (24 training images, 120 captions) as data/, its vocabulary and a checkpoint of one epoch
    in models/, trained with train_main's settings."""
    assert read_checkpoint(str(one_epoch_seed7 / 'models' / 'checkpoint.pt'))['epoch'] == 1
    return one_epoch_seed7


def captions_file(trained, tmp_path, change):
    """A copy of the training captions after change(dataset)."""
    dataset = json.loads((trained / 'data' / 'annotations' / 'captions_train.json').read_text())
    change(dataset)
    path = tmp_path / 'captions.json'
    path.write_text(json.dumps(dataset))
    return path


def train_main(trained, tmp_path, *extra, caption_path=None, image_dir=None):
    """train.py's main, as its command line runs it; returns its exit message (None when it succeeded)."""
    argv = ['--image_dir', str(image_dir or trained / 'data' / 'train'),
            '--caption_path', str(caption_path or trained / 'data' / 'annotations' / 'captions_train.json'),
            '--vocab_path', str(trained / 'vocab.json'), '--model_path', str(tmp_path / 'models'),
            '--backbone', 'smallcnn', '--weights', 'none', '--image_size', '32', '--crop_size', '32',
            '--embed_size', '16', '--hidden_size', '24', '--batch_size', '8', '--num_workers', '0', '--device', 'cpu',
            *extra]
    try:
        trainer.main(argv)
    except SystemExit as exit:
        return exit.code
    return None


def assert_one_line(message, *phrases):
    assert isinstance(message, str) and message.startswith('error: ') and '\n' not in message, message
    for phrase in phrases:
        assert phrase in message, (phrase, message)


# --- the annotation file -----------------------------------------------------------------------

@pytest.mark.parametrize('change, phrases', [
    (lambda d: d.pop('annotations'), ['no "annotations" key', 'pass a captions_*.json']),
    (lambda d: d.pop('images'), ['no "images" list']),
    (lambda d: d.update(annotations=[]), ['has no annotations', 'nothing to train on']),
    (lambda d: [a.update(caption=' ,. !') for a in d['annotations']],
     ['none of its 120 captions', '120 with no words']),
    (lambda d: [a.update(caption=[None, 7, ['a']][a['id'] % 3]) for a in d['annotations']],
     ['none of its 120 captions is usable (120 that are not text)']),
])
def test_annotation_files_that_leave_nothing_to_train_on_are_refused(trained, tmp_path, change, phrases):
    path = captions_file(trained, tmp_path, change)
    message = train_main(trained, tmp_path, '--num_epochs', '1', caption_path=path)
    assert_one_line(message, f'error: {path}: ', *phrases)
    assert not (tmp_path / 'models' / 'checkpoint.pt').exists()  # stopped before training, not after 0 steps
    with pytest.raises(VocabError, match=phrases[0].replace('(', r'\(').replace(')', r'\)')):
        build_vocab.build_vocab(str(path), 1)  # build_vocab.py refuses the same files


def test_bad_captions_and_unknown_image_ids_are_dropped_with_a_count(trained, tmp_path, capsys):
    def spoil(dataset):
        for annotation, bad in zip(dataset['annotations'], [None, 42, ['a', 'list'], {'text': 'a dict'}]):
            annotation['caption'] = bad
        dataset['annotations'][4]['image_id'] = 99
        dataset['annotations'][5]['image_id'] = 'nowhere'
    path = captions_file(trained, tmp_path, spoil)
    vocab = load_vocab(str(trained / 'vocab.json'))
    dataset = CocoDataset(str(trained / 'data' / 'train'), str(path), vocab)
    out = capsys.readouterr().out
    assert 'dropped 4 captions that are not text' in out
    assert 'dropped 2 captions whose image_id is not in "images"' in out
    assert len(dataset) == 120 - 6 and 99 not in [dataset.coco.anns[i]['image_id'] for i in dataset.ids]
    assert all(dataset[i][1][0] == vocab('<start>') for i in range(len(dataset)))  # every kept item loads
    assert len(build_vocab.build_vocab(str(path), 1)) == len(vocab)  # the same rule, the same words


def test_every_image_missing_is_an_error_before_training(trained, tmp_path):
    empty = tmp_path / 'empty'
    empty.mkdir()
    message = train_main(trained, tmp_path, '--num_epochs', '1', image_dir=empty)
    assert_one_line(message, 'none of the 24 images named in', f'is in {empty}', 'resize.py')
    assert not (tmp_path / 'models' / 'checkpoint.pt').exists()


def test_an_epoch_in_which_nothing_could_be_read_stops_training(trained, tmp_path):
    images = tmp_path / 'corrupt'
    images.mkdir()
    for path in (trained / 'data' / 'train').iterdir():
        (images / path.name).write_text('not an image')
    message = train_main(trained, tmp_path, '--num_epochs', '1', image_dir=images)
    assert_one_line(message, 'epoch 1: no image could be read, so nothing was trained', str(images))
    assert not (tmp_path / 'models' / 'checkpoint.pt').exists()


def test_an_epoch_of_only_nonfinite_losses_stops_training(trained, tmp_path, monkeypatch):
    real_loss = training.caption_loss
    monkeypatch.setattr(training, 'caption_loss', lambda *a: (real_loss(*a)[0] * float('nan'), 1))
    message = train_main(trained, tmp_path, '--num_epochs', '1', '--skip_nonfinite')
    assert_one_line(message, 'epoch 1: nothing was trained: 15 of its 15 batches had a NaN or inf loss',
                    '--learning_rate')


# --- values refused while parsing the command line ---------------------------------------------

TRAIN = ['--num_epochs', '--embed_size', '--hidden_size', '--num_layers', '--log_step', '--batch_size',
         '--max_seq_length', '--crop_size', '--image_size']
CASES = ([(trainer, flag, value) for flag in TRAIN for value in ('0', '-1')] +
         [(trainer, flag, value) for flag in ('--learning_rate', '--grad_clip')
          for value in ('0', '-0.1', 'nan', 'inf')] +
         [(trainer, '--save_step', '-1'), (trainer, '--num_workers', '-2'), (trainer, '--bn_momentum', '-0.5'),
          (trainer, '--log_step', '2.5'), (trainer, '--val_max_images', '0')] +
         [(sample, flag, value) for flag in ('--beam_size', '--max_seq_length', '--max_len', '--min_len',
                                             '--batch_size') for value in ('0', '-1')] +
         [(sample, '--embed_size', '0'), (sample, '--length_penalty', 'nan')] +
         [(evaluate, flag, '0') for flag in ('--beam_size', '--max_seq_length', '--max_len', '--min_len',
                                             '--batch_size')] +
         [(extract_features, flag, '0') for flag in ('--image_size', '--crop_size', '--batch_size')] +
         [(extract_features, '--num_workers', '-1'), (build_vocab, '--threshold', '0'), (resize, '--image_size', '0'),
          (resize, '--workers', '0'), (synthetic, '--num_train', '0'), (synthetic, '--num_val', '-1'),
          (demo, '--minutes', '0'), (demo, '--max_epochs', '0'), (demo, '--patience', '-1'),
          (bench_lstm, '--repeats', '0'), (bench_resize, '--workers', '0'), (bench_train, '--batch_size', '0'),
          (bench_sample, '--batch_size', '0')])


@pytest.mark.parametrize('script, flag, value', CASES)
def test_out_of_range_values_get_argparses_one_line_error(script, flag, value, monkeypatch, capsys):
    argv = [flag, value] + (['--image', 'x.png'] if script is sample else [])
    monkeypatch.setattr(sys, 'argv', [f'{script.__name__}.py', *argv])
    with pytest.raises(SystemExit) as caught:
        trainer.parse_args(argv) if script is trainer else script.main()
    err = capsys.readouterr().err
    assert caught.value.code == 2 and 'Traceback' not in err
    line = err.splitlines()[-1]
    assert line.startswith(f'{script.__name__}.py: error: argument ')
    # A flag with an old name as alias is named by both, e.g. "argument --max_seq_length/--max_len: ".
    assert flag in line.split(': ')[2].removeprefix('argument ').split('/')
    assert 'must be' in err or 'not a whole number' in err


def test_good_values_still_parse():
    args = trainer.parse_args(['--num_epochs', '1', '--learning_rate', '3e-4', '--grad_clip', '5', '--save_step', '0',
                               '--num_workers', '0', '--bn_momentum', '0'])
    assert (args.num_epochs, args.learning_rate, args.grad_clip, args.save_step) == (1, 3e-4, 5.0, 0)


# --- checkpoints -------------------------------------------------------------------------------

def test_a_bare_tensor_is_not_a_checkpoint(trained, tmp_path, capsys):
    bare = tmp_path / 'tensor.pt'
    torch.save(torch.arange(5), bare)
    with pytest.raises(SystemExit) as caught:
        sample.main(['--checkpoint', str(bare), '--image', str(trained / 'data' / 'val' / '000000000001.png'),
                     '--device', 'cpu'])
    assert_one_line(caught.value.code, f'error: {bare}: holds a Tensor, not a checkpoint', 'train.py')
    message = train_main(trained, tmp_path, '--num_epochs', '2', f'--resume={bare}')
    assert_one_line(message, f'error: {bare}: holds a Tensor, not a checkpoint')

    state_dict = tmp_path / 'state_dict.pt'  # a dict, but not one train.py wrote
    torch.save({'weight': torch.ones(2)}, state_dict)
    message = train_main(trained, tmp_path, '--num_epochs', '2', f'--resume={state_dict}')
    assert_one_line(message, f'error: {state_dict}: not a checkpoint written by train.py (it has no model_args')


def test_a_checkpoint_trained_for_zero_words_asks_for_max_len(trained, tmp_path, capsys):
    checkpoint = read_checkpoint(str(trained / 'models' / 'checkpoint.pt'))
    checkpoint['model_args']['max_seq_length'] = 0  # as train.py saved it before --max_seq_length 0 was refused
    path = tmp_path / 'zero.pt'
    torch.save(checkpoint, path)
    image = str(sorted((trained / 'data' / 'val').iterdir())[0])
    with pytest.raises(SystemExit) as caught:
        sample.main(['--checkpoint', str(path), '--image', image, '--device', 'cpu'])
    assert_one_line(caught.value.code, f'error: {path} was trained with --max_seq_length 0', 'pass --max_seq_length N')
    with pytest.raises(SystemExit) as caught:
        evaluate.main(['--checkpoint', str(path), '--image_dir', str(trained / 'data' / 'val'), '--device', 'cpu',
                       '--caption_path', str(trained / 'data' / 'annotations' / 'captions_val.json')])
    assert_one_line(caught.value.code, f'error: {path} was trained with --max_seq_length 0')
    capsys.readouterr()
    sample.main(['--checkpoint', str(path), '--image', image, '--max_len', '3', '--beam_size', '2', '--device', 'cpu'])
    assert 1 <= len(capsys.readouterr().out.split()) <= 3


def test_sample_never_prints_an_empty_caption(trained, tmp_path, capsys):
    """A decoder whose best first word is <end> (and then <start> and <pad>) still writes a word."""
    checkpoint = read_checkpoint(str(trained / 'models' / 'checkpoint.pt'))
    bias = checkpoint['decoder']['linear.bias']
    bias[2], bias[1], bias[0] = 100.0, 90.0, 80.0  # <end>, <start>, <pad>
    path = tmp_path / 'terse.pt'
    torch.save(checkpoint, path)
    image = str(sorted((trained / 'data' / 'val').iterdir())[0])
    encoder, decoder, vocab, config = decoding.load_captioner(str(path))
    features = encoder(eval_transform(32, 32)(load_image(image)).unsqueeze(0))
    no_rule = model.DecodeSettings(min_len=0)
    assert decoder.sample(features, no_rule)[0, 0] == 2  # without the rule: just <end>, an empty caption
    for beam_size in ('1', '3'):
        sample.main(['--checkpoint', str(path), '--image', image, '--beam_size', beam_size, '--device', 'cpu'])
        words = capsys.readouterr().out.split()
        assert len(words) >= 1 and not any(w.startswith('<') for w in words)


# --- full disks and leftover temporary files ---------------------------------------------------

class FullDisk(io.FileIO):
    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def disk_full_for(monkeypatch, name):
    """Every atomic write of a file called name fails as a full disk does; other files are written."""
    def fake_open(path, mode='r', *args, **kwargs):
        if os.path.basename(str(path)).startswith(f'{name}.tmp'):
            return FullDisk(path, 'w')
        return open(path, mode, *args, **kwargs)
    monkeypatch.setattr(files, 'open', fake_open, raising=False)


def test_a_full_disk_while_writing_history_is_one_line(trained, tmp_path, monkeypatch):
    disk_full_for(monkeypatch, 'history.json')
    message = train_main(trained, tmp_path, '--num_epochs', '1')
    assert_one_line(message, f'could not write {tmp_path / "models" / "history.json"} (No space left on device)',
                    'the previous history.json, if any, is intact')
    assert read_checkpoint(str(tmp_path / 'models' / 'checkpoint.pt'))['step'] == 15  # the checkpoint fitted
    assert sorted(os.listdir(tmp_path / 'models')) == ['checkpoint.pt', 'tensorboard']  # no temporary file left


def test_a_tensorboard_folder_that_cannot_be_written_is_one_line(trained, tmp_path):
    blocked = tmp_path / 'logs'
    blocked.write_text('a file where the log folder should go')
    message = train_main(trained, tmp_path, '--num_epochs', '1', '--tensorboard', str(blocked))
    assert_one_line(message, f'could not write TensorBoard logs to {blocked}', '--tensorboard none')


def test_a_full_disk_while_flushing_tensorboard_logs_is_one_line(trained, tmp_path, monkeypatch):
    from torch.utils.tensorboard import SummaryWriter

    def full(self):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(SummaryWriter, 'flush', full)
    message = train_main(trained, tmp_path, '--num_epochs', '1')
    assert_one_line(message, f'could not write TensorBoard logs to {tmp_path / "models" / "tensorboard"} '
                    '(No space left on device)')


@pytest.mark.parametrize('output', ['--json', '--grid', '--output_dir'])
def test_a_full_disk_while_sample_py_writes_its_outputs_is_one_line(trained, tmp_path, monkeypatch, capsys, output):
    image = sorted((trained / 'data' / 'val').iterdir())[0]
    target = {'--json': tmp_path / 'captions.json', '--grid': tmp_path / 'grid.png', '--output_dir': tmp_path / 'out'}
    disk_full_for(monkeypatch, 'captions.json' if output == '--json' else 'grid.png' if output == '--grid'
                  else f'{image.stem}_captioned.png')
    with pytest.raises(SystemExit) as caught:
        sample.main(['--checkpoint', str(trained / 'models' / 'checkpoint.pt'), '--image', str(image),
                     output, str(target[output]), '--device', 'cpu'])
    assert_one_line(caught.value.code, 'error: could not write', 'No space left on device')
    assert [path for path in tmp_path.rglob('*') if path.is_file()] == []  # no half file, no temporary


def test_a_full_disk_while_writing_a_vocabulary_is_one_line(trained, tmp_path, monkeypatch, capsys):
    vocab_path = tmp_path / 'vocab.json'
    vocab_path.write_bytes((trained / 'vocab.json').read_bytes())
    before = vocab_path.read_bytes()
    disk_full_for(monkeypatch, 'vocab.json')
    monkeypatch.setattr(sys, 'argv', ['build_vocab.py', '--caption_path', str(trained / 'data' / 'annotations' /
                                      'captions_val.json'), '--vocab_path', str(vocab_path), '--threshold', '1'])
    with pytest.raises(SystemExit) as caught:
        build_vocab.main()
    err = capsys.readouterr().err.splitlines()[-1]  # after tqdm's progress bar
    assert caught.value.code == 1 and 'Traceback' not in err
    assert err.startswith(f'error: could not write {vocab_path} (No space left on device)')
    assert vocab_path.read_bytes() == before and os.listdir(tmp_path) == ['vocab.json']


@pytest.mark.parametrize('name', ['meta.json', 'done.npy', 'unreadable.json'])
def test_a_full_disk_while_writing_feature_cache_metadata_is_one_line(trained, tmp_path, monkeypatch, name):
    disk_full_for(monkeypatch, name)
    output = tmp_path / 'features'
    argv = ['--image_dir', str(trained / 'data' / 'val'), '--caption_path',
            str(trained / 'data' / 'annotations' / 'captions_val.json'), '--output', str(output),
            '--backbone', 'smallcnn', '--weights', 'none', '--image_size', '32', '--crop_size', '32',
            '--num_workers', '0', '--device', 'cpu']
    with pytest.raises(SystemExit) as caught:
        extract_features.main(argv)
    assert_one_line(caught.value.code, f'could not write {output / name} (No space left on device)')
    assert not [f for f in os.listdir(output) if '.tmp' in f]
    monkeypatch.undo()
    extract_features.main(argv)  # a second run finishes the cache
    images = json.loads((trained / 'data' / 'annotations' / 'captions_val.json').read_text())['images']
    assert json.loads((output / 'meta.json').read_text())['image_ids'] == sorted(image['id'] for image in images)


@pytest.mark.parametrize('writer', ['torch.save', 'np.save', 'PIL', 'bytes'])
def test_a_disk_that_fills_during_any_save_is_one_error_and_keeps_the_previous_file(tmp_path, monkeypatch, writer):
    path = tmp_path / 'saved'
    path.write_bytes(b'the previous version')
    state_dict = {f'layer{i}.weight': torch.zeros(4) for i in range(1000)}  # a pickle larger than open()'s buffer
    write = {'torch.save': lambda f: torch.save(state_dict, f),
             'np.save': lambda f: np.save(f, np.zeros(10000)),
             'PIL': lambda f: Image.effect_noise((256, 256), 64).save(f, format='PNG'),
             'bytes': lambda f: f.write(bytes(10000))}[writer]
    disk_fills_for(monkeypatch, 'saved')
    with pytest.raises(files.CheckpointError) as caught:
        files.save_file(str(path), write)
    assert str(caught.value) == (f'could not write {path} (No space left on device); '
                                 'the previous saved, if any, is intact')
    assert path.read_bytes() == b'the previous version' and os.listdir(tmp_path) == ['saved']


def test_a_disk_that_fills_during_the_first_checkpoint_is_one_line(trained, tmp_path, monkeypatch):
    disk_fills_for(monkeypatch, 'checkpoint.pt')  # torch.save used to end in a 36-line RuntimeError traceback
    message = train_main(trained, tmp_path, '--num_epochs', '1', '--tensorboard', 'none')
    assert_one_line(message, f'could not write {tmp_path / "models" / "checkpoint.pt"} (No space left on device)',
                    'the previous checkpoint.pt, if any, is intact')
    assert os.listdir(tmp_path / 'models') == []  # no half checkpoint, no temporary file


@pytest.mark.parametrize('name', ['checkpoint.pt', 'history.json', 'best.pt'])
def test_a_disk_that_fills_while_resuming_keeps_the_previous_files(trained, tmp_path, monkeypatch, name):
    models = tmp_path / 'models'
    models.mkdir()
    for kept in ('checkpoint.pt', 'history.json'):
        (models / kept).write_bytes((trained / 'models' / kept).read_bytes())
    (models / 'best.pt').write_bytes((trained / 'models' / 'checkpoint.pt').read_bytes())
    before = (models / name).read_bytes()
    disk_fills_for(monkeypatch, name)
    message = train_main(trained, tmp_path, '--num_epochs', '2', '--resume', '--tensorboard', 'none',
                         '--val_image_dir', str(trained / 'data' / 'val'),
                         '--val_caption_path', str(trained / 'data' / 'annotations' / 'captions_val.json'))
    assert_one_line(message, f'could not write {models / name} (No space left on device)',
                    f'the previous {name}, if any, is intact')
    assert (models / name).read_bytes() == before
    assert sorted(os.listdir(models)) == ['best.pt', 'checkpoint.pt', 'history.json']  # no temporary file


def test_a_disk_that_fills_while_caching_features_is_one_line(trained, tmp_path, monkeypatch):
    output = tmp_path / 'features'
    argv = ['--image_dir', str(trained / 'data' / 'val'), '--caption_path',
            str(trained / 'data' / 'annotations' / 'captions_val.json'), '--output', str(output),
            '--backbone', 'smallcnn', '--weights', 'none', '--image_size', '32', '--crop_size', '32',
            '--num_workers', '0', '--device', 'cpu']
    disk_fills_for(monkeypatch, 'backbone.pt')  # torch.save, as for checkpoints
    with pytest.raises(SystemExit) as caught:
        extract_features.main(argv)
    assert_one_line(caught.value.code, f'could not write {output / "backbone.pt"} (No space left on device)')
    assert os.listdir(output) == []
    monkeypatch.undo()
    if hasattr(os, 'posix_fallocate'):  # features.npy is a memory map: its space is claimed before it is written
        def full(fd, offset, length):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(os, 'posix_fallocate', full)
        with pytest.raises(SystemExit) as caught:
            extract_features.main(argv)
        assert_one_line(caught.value.code, f'could not write {output / "features.npy"} (No space left on device)',
                        'run again to go on')
        assert 'features.npy' not in os.listdir(output) and not [f for f in os.listdir(output) if '.tmp' in f]
        monkeypatch.undo()
    extract_features.main(argv)  # a run with room finishes the cache
    assert open_cache(str(output))[1].all()


def test_stale_temporary_files_of_dead_processes_are_removed(trained, tmp_path, capsys):
    models = tmp_path / 'models'
    models.mkdir()
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    assert dead.wait() == 0  # it ran and ended: its pid now names no process of ours
    alive = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])
    try:
        (models / f'checkpoint.pt.tmp{dead.pid}').write_bytes(b'x' * 3 * 2**20)
        (models / f'history.json.tmp{dead.pid}').write_bytes(b'{')
        (models / f'checkpoint.pt.tmp{alive.pid}').write_bytes(b'a save in progress')
        (models / 'notes.tmp').write_text('not ours')
        assert train_main(trained, tmp_path, '--num_epochs', '1') is None
        assert sorted(os.listdir(models)) == sorted(['checkpoint.pt', 'history.json', 'tensorboard',
                                                     f'checkpoint.pt.tmp{alive.pid}', 'notes.tmp'])
        lines = [line for line in capsys.readouterr().out.splitlines() if 'temporary' in line]
        assert lines == [f'removed 2 temporary files (3.0 MiB) that killed runs left in {models}']
    finally:
        alive.kill()
        assert alive.wait() == -signal.SIGKILL  # it was still running when killed
