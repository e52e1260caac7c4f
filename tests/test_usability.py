"""What a new user meets: one-line errors that name the next step, resuming without repeating flags,
captioning folders in batches, best.pt and TensorBoard logs, and --help."""
import argparse
import importlib
import json
import math
import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import runs as devices
import shapes_demo
import synthetic
import train as trainer
import training
from conftest import REPO, run
from data_loader import CocoDataset, eval_transform, read_coco
from decoding import load_captioner
from model import CheckpointError, read_checkpoint
from vocabulary import build_vocab, save_vocab


def error_lines(result):
    """The lines of stderr that are errors (tqdm's bars write to stderr too)."""
    return [line for line in result.stderr.replace('\r', '\n').splitlines() if line.startswith('error')]


def assert_one_error(result, *phrases):
    assert result.returncode == 1, result.stderr[-2000:]
    assert 'Traceback' not in result.stderr and 'Caught' not in result.stderr, result.stderr[-2000:]
    errors = error_lines(result)
    assert len(errors) == 1, result.stderr[-2000:]
    for phrase in phrases:
        assert phrase in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A tiny synthetic set and a model trained on it for two epochs with a validation set."""
    root = tmp_path_factory.mktemp('usability')
    synthetic.make_synthetic_coco(str(root / 'data'), num_train=24, num_val=6, image_size=32, seed=11, progress=False)
    save_vocab(build_vocab(str(root / 'data' / 'annotations' / 'captions_train.json'), 1), str(root / 'vocab.json'))
    history = training.train(train_args(root, root / 'models', '--num_epochs', '2', '--hidden_size', '24',
                                        '--embed_size', '16')).history
    return root, history


def data_flags(root):
    return ['--image_dir', root / 'data' / 'train',
            '--caption_path', root / 'data' / 'annotations' / 'captions_train.json',
            '--vocab_path', root / 'vocab.json',
            '--weights', 'none', '--num_workers', '0', '--device', 'cpu']


def train_args(root, model_path, *extra):
    return trainer.parse_args([str(a) for a in [
        *data_flags(root), '--val_image_dir', root / 'data' / 'val',
        '--val_caption_path', root / 'data' / 'annotations' / 'captions_val.json', '--model_path', model_path,
        '--backbone', 'smallcnn', '--image_size', '32', '--crop_size', '32', '--batch_size', '8', '--log_step', '1',
        *extra]])


# --- one line that names the next step --------------------------------------------------------

def test_train_before_building_a_vocabulary_says_to_build_one(tmp_path):
    result = run(REPO / 'train.py', cwd=tmp_path, process=True)  # a new user's first command, in an empty folder
    assert_one_error(result, 'data/vocab.json', 'run build_vocab.py', '--vocab_path')


def test_sample_before_training_says_to_train_first(tmp_path):
    Image.new('RGB', (32, 32), 'red').save(tmp_path / 'x.png')
    result = run(REPO / 'sample.py', '--image', 'x.png', cwd=tmp_path)
    assert_one_error(result, 'models/checkpoint.pt', 'train a model first', '--checkpoint')


def test_pick_device_refuses_devices_this_machine_lacks(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 0)  # a machine without a GPU, even on one with
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert devices.pick_device('cpu') == torch.device('cpu')
    with pytest.raises(ValueError, match='not a device name; the devices here are: .*cpu'):
        devices.pick_device('gpu')
    for name in ('cuda', 'cuda:99'):  # a GPU that cannot run: tests/test_gpu.py
        with pytest.raises(ValueError, match=rf'^--device {name} cannot run: torch.cuda.is_available\(\) is False; '):
            devices.pick_device(name)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)  # one GPU, which starts
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'init', lambda: None)
    assert devices.pick_device('cuda:0') == torch.device('cuda', 0)
    with pytest.raises(ValueError, match=r'^--device cuda:1: there is no CUDA device 1 here; the devices here are: '
                                         'cuda:0, .*cpu$'):
        devices.pick_device('cuda:1')


def test_device_cuda_without_a_gpu_is_one_line_in_every_script(trained, tmp_path):
    root, _ = trained
    checkpoint = root / 'models' / 'checkpoint.pt'
    val_captions = root / 'data' / 'annotations' / 'captions_val.json'
    image = sorted((root / 'data' / 'val').iterdir())[0]
    commands = [
        ['train.py', *data_flags(root), '--backbone', 'smallcnn', '--model_path', tmp_path / 'models'],
        ['sample.py', '--checkpoint', checkpoint, '--image', image],
        ['evaluate.py', '--checkpoint', checkpoint, '--image_dir', root / 'data' / 'val',
         '--caption_path', val_captions, '--results_path', tmp_path / 'results.json'],
        ['extract_features.py', '--image_dir', root / 'data' / 'val', '--caption_path', val_captions,
         '--output_dir', tmp_path / 'features', '--backbone', 'smallcnn', '--weights', 'none']]
    no_gpu = dict(os.environ, CUDA_VISIBLE_DEVICES='')  # what a machine without a GPU has, even on one with
    reason = 'torch.cuda.is_available() is False'  # hidden GPUs raise no warning of a driver
    for command in commands:
        line = assert_one_error(run(*command, '--device', 'cuda', env=no_gpu))
        assert line == f'error: {devices.cuda_error("--device cuda", reason)}', command[0]


def test_an_unsupported_backbone_names_those_that_work(trained, tmp_path):
    root, _ = trained
    result = run('train.py', *data_flags(root), '--model_path', tmp_path, '--backbone', 'vit_b_16')
    assert_one_error(result, '--backbone vit_b_16 is not supported', 'smallcnn', 'resnet152', 'resnet50')


def copy_with_a_corrupt_image(source, folder):
    folder.mkdir()
    for path in source.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / '000000000004.png').write_text('not a png')
    return folder


def test_strict_with_workers_names_the_unreadable_image_in_one_line(trained, tmp_path):
    root, _ = trained
    images = copy_with_a_corrupt_image(root / 'data' / 'train', tmp_path / 'train')
    flags = [str(a) for a in data_flags(root)]
    flags[1] = str(images)
    flags[flags.index('--num_workers') + 1] = '2'  # the default: errors happen in worker processes
    result = run('train.py', *flags, '--backbone', 'smallcnn', '--image_size', '32', '--crop_size', '32',
                 '--batch_size', '4', '--model_path', tmp_path / 'models', '--strict', '--tensorboard', 'none')
    line = assert_one_error(result, str(images / '000000000004.png'), 'cannot read image', '--strict')
    assert line.startswith(f'error: {images / "000000000004.png"}: cannot read image')


def test_evaluate_names_a_malformed_captions_file(trained, tmp_path):
    root, _ = trained
    bad = tmp_path / 'captions.json'
    bad.write_text('{"images": [],\n')
    result = run('evaluate.py', '--checkpoint', root / 'models' / 'checkpoint.pt', '--image_dir', root / 'data' / 'val',
                 '--caption_path', bad, '--results_path', tmp_path / 'results.json')
    assert_one_error(result, f'error: {bad}: not a readable COCO captions file')
    assert not (tmp_path / 'results.json').exists()


def test_pycocotools_chatter_stays_out_of_the_output(trained, capsys):
    root, _ = trained
    captions = root / 'data' / 'annotations' / 'captions_val.json'
    assert len(read_coco(str(captions)).anns) == 30
    build_vocab(str(captions), 1)
    out = capsys.readouterr().out
    assert 'loading annotations' not in out and 'index created' not in out and 'Done' not in out


def fake_offline_tools(folder):
    """wget and curl that fail as they do on a machine without internet."""
    folder.mkdir()
    for name, status in (('wget', 4), ('curl', 6)):
        tool = folder / name
        tool.write_text(f'#!/bin/sh\necho "{name}: unable to resolve host address images.cocodataset.org" >&2\n'
                        f'exit {status}\n')
        tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    return dict(os.environ, PATH=f'{folder}:{os.environ["PATH"]}')


def test_download_without_internet_says_where_to_put_the_files(tmp_path):
    env = fake_offline_tools(tmp_path / 'bin')
    work = tmp_path / 'work'
    work.mkdir()
    result = subprocess.run(['bash', REPO / 'download.sh'], cwd=work, capture_output=True, text=True, env=env)
    assert result.returncode == 1 and result.stdout == ''
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: cannot reach http://images.cocodataset.org/zips/train2014.zip')
    assert 'needs internet' in lines[0] and f'{work / "data"}/' in lines[0]
    assert 'annotations_trainval2014.zip' in lines[0]

    # Fetched elsewhere and put where the message says, the zips are unzipped without any network.
    for name, inside in (('train2014.zip', 'train2014/a.jpg'), ('val2014.zip', 'val2014/b.jpg'),
                         ('annotations_trainval2014.zip', 'annotations/captions_train2014.json')):
        with zipfile.ZipFile(work / 'data' / name, 'w') as archive:
            archive.writestr(inside, 'content')
    result = subprocess.run(['bash', REPO / 'download.sh'], cwd=work, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert (work / 'data' / 'annotations' / 'captions_train2014.json').read_text() == 'content'
    assert (work / 'data' / 'val2014' / 'b.jpg').exists()


# --- resuming ---------------------------------------------------------------------------------

def test_resume_takes_the_model_settings_from_the_checkpoint(trained, tmp_path, capsys):
    root, _ = trained
    first = train_args(root, tmp_path, '--num_epochs', '1', '--hidden_size', '20', '--embed_size', '12',
                       '--max_seq_length', '9', '--bn_momentum', '0.2', '--train_backbone', '--learning_rate', '0.01')
    training.train(first)
    # Only the data and --resume: every model setting, and the learning rate, come from the checkpoint.
    args = trainer.parse_args([str(a) for a in [*data_flags(root), '--model_path', tmp_path, '--resume',
                                                '--num_epochs', '2', '--image_size', '32', '--crop_size', '32']])
    result = training.train(args)
    encoder, decoder, args = result.encoder, result.decoder, result.settings
    assert (decoder.lstm.hidden_size, decoder.embed.embedding_dim, decoder.max_seq_length) == (20, 12, 9)
    assert encoder.bn.momentum == 0.2 and encoder.train_backbone and args.learning_rate == 0.01
    checkpoint = read_checkpoint(str(tmp_path / 'checkpoint.pt'))
    assert checkpoint['epoch'] == 2 and checkpoint['model_args']['hidden_size'] == 20
    assert 'resuming from' in capsys.readouterr().out

    # A flag given again that contradicts the checkpoint is refused, naming both values.
    args = trainer.parse_args([str(a) for a in [*data_flags(root), '--model_path', tmp_path, '--resume',
                                                '--num_epochs', '3', '--hidden_size', '32']])
    with pytest.raises(CheckpointError, match=r'trained with --hidden_size 20 \(not 32\): leave these flags out'):
        training.train(args)

    # A finished run says so, and how to train longer; nothing changes.
    before = (tmp_path / 'checkpoint.pt').read_bytes()
    training.train(trainer.parse_args([str(a) for a in [*data_flags(root), '--model_path', tmp_path, '--resume',
                                                        '--num_epochs', '2']]))
    out = capsys.readouterr().out
    assert 'has already finished its run of 2 epochs' in out and '--num_epochs N, for N more than 2' in out
    assert (tmp_path / 'checkpoint.pt').read_bytes() == before


# --- captioning many images ---------------------------------------------------------------------

def test_captions_are_made_in_batches_with_the_same_result(trained):
    root, _ = trained
    captioner = load_captioner(str(root / 'models' / 'checkpoint.pt'))
    paths = [str(p) for p in sorted((root / 'data' / 'train').iterdir())[:10]]
    sizes = []
    captioner.encoder.register_forward_hook(lambda module, inputs, output: sizes.append(len(inputs[0])))
    batches = list(captioner.caption_batches(paths, batch_size=4))
    assert sizes == [4, 4, 2] and [batch for batch, _, _ in batches] == [paths[:4], paths[4:8], paths[8:]]
    sizes.clear()
    whole, _ = captioner.caption(paths, batch_size=len(paths))
    assert sizes == [10]
    assert {path: c for _, captions, _ in batches for path, c in captions.items()} == whole


def test_sample_captions_a_folder_into_json_and_pngs(trained, tmp_path):
    root, _ = trained
    folder = tmp_path / 'photos'
    folder.mkdir()
    for path in sorted((root / 'data' / 'val').iterdir())[:3]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / 'broken.png').write_text('not an image')
    (folder / 'notes.txt').write_text('not an image either, and not named like one')
    result = run('sample.py', '--checkpoint', root / 'models' / 'checkpoint.pt', '--image', folder,
                 '--json', tmp_path / 'captions.json', '--output_dir', tmp_path / 'out', '--batch_size', '2')
    assert result.returncode == 1  # one image could not be read
    assert error_lines(result) == [f'error: {folder / "broken.png"}: cannot read image (cannot identify image file '
                                   f"'{folder / 'broken.png'}')"]
    written = json.loads((tmp_path / 'captions.json').read_text())
    names = sorted(str(p) for p in folder.iterdir() if p.name.startswith('0'))
    assert [entry['file_name'] for entry in written] == names
    lines = [line for line in result.stdout.splitlines() if '  ->  ' in line]
    assert len(lines) == 3
    for entry, line in zip(written, lines):
        shown, png = line.split('  ->  ')
        assert shown == f'{entry["file_name"]}: {entry["caption"]}' and isinstance(entry['caption'], str)
        assert png == str(tmp_path / 'out' / (Path(entry['file_name']).stem + '_captioned.png')) and Path(png).exists()
    assert f'captions of 3 images: {tmp_path / "captions.json"}' in result.stdout


# --- best.pt, TensorBoard, validation subset ----------------------------------------------------

def test_best_checkpoint_and_tensorboard_logs(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    root, history = trained
    losses = [entry['loss'] for entry in history['val']]
    best = read_checkpoint(str(root / 'models' / 'best.pt'))
    assert len(losses) == 2 and best['epoch'] == losses.index(min(losses)) + 1
    assert best['history']['val'][-1]['loss'] == min(losses)

    events = EventAccumulator(str(root / 'models' / 'tensorboard'), size_guidance={'scalars': 0, 'tensors': 0})
    events.Reload()
    logged = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()['scalars']}
    assert [step for step, _ in logged['train/loss']] == [entry['step'] for entry in history['train']]
    np.testing.assert_allclose([v for _, v in logged['train/loss']], [e['loss'] for e in history['train']], rtol=1e-6)
    np.testing.assert_allclose([v for _, v in logged['train/perplexity']],
                               [math.exp(e['loss']) for e in history['train']], rtol=1e-5)
    np.testing.assert_allclose([v for _, v in logged['val/loss']], losses, rtol=1e-6)
    np.testing.assert_allclose([v for _, v in logged['train/learning_rate']], 0.001, rtol=1e-6)
    texts = events.Tensors('captions/text_summary')
    assert len(texts) == 2
    table = texts[-1].tensor_proto.string_val[0].decode()
    val_images = sorted(p.name for p in (root / 'data' / 'val').iterdir())
    assert len(val_images) >= 4 and table.count('\n') == 4 + 1 and all(name in table for name in val_images[:4])


def test_val_max_images_validates_on_a_fixed_subset(trained):
    root, _ = trained
    vocab = training.load_vocab(str(root / 'vocab.json'))
    val = CocoDataset(str(root / 'data' / 'val'), str(root / 'data' / 'annotations' / 'captions_val.json'), vocab,
                      eval_transform(32, 32))
    subset = training.first_images(val, 2)
    images = {val.coco.anns[val.ids[i]]['image_id'] for i in subset.indices}
    assert images == set(sorted(val.coco.getImgIds())[:2]) and len(subset) == 2 * 5
    assert training.first_images(val, None) is val


# --- --help, and the demo's stopping rule -------------------------------------------------------

SCRIPTS = ['train', 'sample', 'evaluate', 'extract_features', 'build_vocab', 'resize', 'synthetic.__main__',
           'plot_history', 'demo', 'export', 'gate_units', 'app',
           'bench.lstm', 'bench.resize', 'bench.train', 'bench.sample', 'bench.onnx']


def test_every_script_shows_defaults_and_explains_every_flag(monkeypatch):
    class Parsed(Exception):
        pass

    def capture(parser, *args, **kwargs):
        raise Parsed(parser)

    monkeypatch.setattr(argparse.ArgumentParser, 'parse_args', capture)
    for name in SCRIPTS:
        with pytest.raises(Parsed) as caught:
            importlib.import_module(name).main()
        parser = caught.value.args[0]
        assert issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter), name
        undocumented = [action.option_strings[0] for action in parser._actions if not action.help]
        assert undocumented == [], name


def test_output_flags_and_caption_length_have_one_name(monkeypatch, capsys):
    # In this process, as `python NAME.py --help` would print it (80 columns, as through a pipe): a new Python
    # for each script would spend seconds importing torch to print the same text.
    monkeypatch.setenv('COLUMNS', '80')
    help_text = {}
    for name in ('sample', 'evaluate', 'extract_features', 'plot_history', 'resize', 'train'):
        monkeypatch.setattr(sys, 'argv', [f'{name}.py', '--help'])
        with pytest.raises(SystemExit) as caught:
            importlib.import_module(name).main()
        assert caught.value.code in (0, None)
        out, _ = capsys.readouterr()
        assert out.startswith(f'usage: {name}.py ')
        help_text[name] = ' '.join(out.split())
    for name in ('sample', 'extract_features', 'resize'):
        assert '--output_dir' in help_text[name], name
    for name in ('sample', 'evaluate', 'train'):
        assert '--max_seq_length' in help_text[name], name
    assert '--output_dir OUTPUT_DIR, --output OUTPUT_DIR' in help_text['extract_features']  # the old name still works
    assert 'longest caption the model writes, in words (default: 20)' in help_text['train']
    assert 'so torchrun multiplies it) (default: 128)' in help_text['train']


@pytest.mark.parametrize('accuracies, stop', [
    ([0.5, 0.9, 0.94, 0.93, 0.92, 0.91], False),  # never passed the target
    ([0.5, 0.96, 0.97, 0.96], False),             # improved one epoch ago
    ([0.5, 0.96, 0.97, 0.96, 0.95], True),        # two epochs since the best
    ([0.96, 0.95, 0.97, 0.96, 0.97], True),       # a tie is no improvement
    ([0.96, 0.97, 0.95, 0.98], False),
])
def test_demo_stops_once_accuracy_stops_improving(accuracies, stop):
    assert shapes_demo.learned_enough(accuracies, target=0.95, patience=2) is stop
