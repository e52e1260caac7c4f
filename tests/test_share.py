"""Sharing a model: export.py's safetensors folder, the demo model shipped in models/shapes, and hubconf.py. A folder
captions as its checkpoint does, loads without torch.load or pickle, and a broken one is one line naming the file."""
import json
import os
import pickle
import shutil
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import safetensors.torch
import torch

import export
from conftest import REPO, check_printed_scores, run
from decoding import SHIPPED_MODEL, default_model, load_captioner
from files import CheckpointError, load_image
from model import DecodeSettings, read_checkpoint
from synthetic.easy import content_matches, write_example
from vocabulary import load_vocab

SHIPPED = REPO / SHIPPED_MODEL
FILES = ['README.md', 'config.json', 'model.safetensors', 'vocab.json']


@pytest.fixture(scope='module')
def exported(two_epoch_model, tmp_path_factory):
    """A tiny model trained for two epochs on the synthetic set, and its folder written by export.py's command line."""
    folder = tmp_path_factory.mktemp('share')
    (folder / 'checkpoint.pt').symlink_to(two_epoch_model / 'checkpoint.pt')
    result = run('export.py', '--checkpoint', folder / 'checkpoint.pt', '--format', 'safetensors',
                 '--output_dir', folder / 'shared', '--card_note', 'A note for the card.', process=True)
    assert result.returncode == 0, result.stderr
    return folder


def val_images(synthetic_set):
    return [str(path) for path in sorted((synthetic_set / 'val').iterdir())]


def test_the_folder_holds_the_weights_config_vocabulary_and_card(exported):
    shared = exported / 'shared'
    assert sorted(path.name for path in shared.iterdir()) == FILES  # no temporary files left
    checkpoint = read_checkpoint(str(exported / 'checkpoint.pt'))
    tensors = safetensors.torch.load_file(str(shared / 'model.safetensors'))
    assert tensors.keys() == {f'encoder.{key}' for key in checkpoint['encoder']} | {
        f'decoder.{key}' for key in checkpoint['decoder']}
    assert checkpoint['decoder']  # the loop below checks something
    for key, value in checkpoint['decoder'].items():
        assert torch.equal(tensors[f'decoder.{key}'], value), key
    captioner = load_captioner(str(exported / 'checkpoint.pt'))
    assert json.loads((shared / 'config.json').read_text()) == asdict(captioner.config)
    assert load_vocab(str(shared / 'vocab.json')).word2idx == captioner.vocab.word2idx
    card = (shared / 'README.md').read_text()
    assert 'captions_train.json' in card and 'Epochs trained: 2.' in card and 'A note for the card.' in card
    assert f"checkpoint='{shared}'" in card and 'sample.py' in card


@pytest.mark.parametrize('beam_size', [1, 3])
def test_the_folder_captions_as_its_checkpoint_does(synthetic_set, exported, beam_size):
    settings = DecodeSettings(beam_size=beam_size)
    images = val_images(synthetic_set)
    original, _ = load_captioner(str(exported / 'checkpoint.pt')).caption(images, settings)
    shared, _ = load_captioner(str(exported / 'shared')).caption(images, settings)
    assert len(shared) == 12 and shared == original
    assert len(set(shared.values())) > 1  # a trained model: not one caption for everything


def test_evaluate_scores_the_folder_as_its_checkpoint(synthetic_set, exported, tmp_path):
    caption_path = synthetic_set / 'annotations' / 'captions_val.json'
    results, printed = {}, {}
    for name in ('checkpoint.pt', 'shared'):
        results[name] = tmp_path / f'{name}.json'
        result = run('evaluate.py', '--checkpoint', exported / name, '--image_dir', synthetic_set / 'val',
                     '--caption_path', caption_path, '--results_path', results[name], '--batch_size', '16',
                     '--device', 'cpu')
        assert result.returncode == 0, result.stderr[-2000:]
        printed[name] = check_printed_scores(result.stdout, results[name], caption_path)
    written = json.loads(results['shared'].read_text())
    assert len(written) == 12 and written == json.loads(results['checkpoint.pt'].read_text())
    assert printed['shared'] == printed['checkpoint.pt']


def test_loading_a_folder_never_unpickles(exported, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError('a safetensors folder must load without unpickling')

    for module, name in ((torch, 'load'), (pickle, 'load'), (pickle, 'loads')):
        monkeypatch.setattr(module, name, refuse)
    captioner = load_captioner(str(exported / 'shared'))
    assert captioner.config.hidden_size == 48 and len(captioner.vocab) == captioner.config.vocab_size


def break_weights(folder, how):
    """Spoil a copy of an exported folder as `how` says; returns the file at fault."""
    weights, config = folder / 'model.safetensors', folder / 'config.json'
    data = bytearray(weights.read_bytes())
    if how == 'tampered':  # one number changed: the header still fits, only the digest tells
        data[-3] ^= 0x40
        weights.write_bytes(bytes(data))
    elif how == 'garbled':
        weights.write_bytes(b'\x80\x02not safetensors at all' + bytes(data[24:]))
    elif how == 'truncated':
        weights.write_bytes(bytes(data[:len(data) // 2]))
    elif how == 'no config':
        config.unlink()
        return config
    elif how == 'wrong shape':
        config.write_text(json.dumps({**json.loads(config.read_text()), 'hidden_size': 64}))
    elif how == 'wrong keys':  # rewritten by another tool: no digest, one weight missing and one too many
        tensors = safetensors.torch.load_file(str(weights))
        tensors['decoder.extra'] = tensors.pop('decoder.linear.bias')
        safetensors.torch.save_file(tensors, str(weights))
    return weights


BROKEN = {'tampered': 'sha256', 'garbled': 'not a readable safetensors file',
          'truncated': 'not a readable safetensors file', 'no config': 'no such file',
          'wrong shape': 'does not fit', 'wrong keys': 'no decoder.linear.bias; unexpected decoder.extra'}


@pytest.mark.parametrize('how', list(BROKEN))
def test_a_broken_folder_is_one_line_naming_the_file(exported, tmp_path, how):
    folder = tmp_path / 'shared'
    shutil.copytree(exported / 'shared', folder)
    at_fault = break_weights(folder, how)
    with pytest.raises(CheckpointError, match=BROKEN[how]) as raised:
        load_captioner(str(folder))
    assert str(at_fault) in str(raised.value)
    result = run('sample.py', '--image', 'png/example.png', '--checkpoint', folder, timeout=120)
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert result.stderr.startswith('error: ') and result.stderr.count('\n') == 1, result.stderr
    assert str(at_fault) in result.stderr and BROKEN[how] in result.stderr
    assert result.stdout == ''


def test_resume_refuses_a_folder_in_one_line(exported):
    with pytest.raises(CheckpointError, match='a folder, not a checkpoint file.*--resume needs the train.py'):
        read_checkpoint(str(exported / 'shared'))


def test_torch_hub_loads_a_checkpoint_or_a_folder(synthetic_set, exported):
    images = val_images(synthetic_set)
    expected, _ = load_captioner(str(exported / 'checkpoint.pt')).caption(images)
    assert len(expected) == 12
    for path in (exported / 'checkpoint.pt', exported / 'shared'):
        captioner = torch.hub.load(str(REPO), 'captioner', source='local', checkpoint=str(path))
        assert captioner.caption(images)[0] == expected


# --- the shipped model ---

def test_the_shipped_model_is_small_and_captions_the_example_rightly(tmp_path):
    assert sorted(path.name for path in SHIPPED.iterdir()) == FILES
    assert sum(path.stat().st_size for path in SHIPPED.iterdir()) < 4 * 2**20  # weights only, no optimizer
    assert '97.6%' in (SHIPPED / 'README.md').read_text()
    objects = write_example(str(tmp_path / 'example.png'))
    example = str(REPO / 'png' / 'example.png')
    assert np.array_equal(np.asarray(load_image(example)), np.asarray(load_image(str(tmp_path / 'example.png'))))
    captioner = load_captioner(str(SHIPPED))
    for settings in (DecodeSettings(), DecodeSettings(beam_size=3)):
        captions, errors = captioner.caption([example], settings)
        assert not errors and content_matches(captions[example], objects), captions


def test_sample_without_a_checkpoint_in_a_clean_copy_uses_the_shipped_model(tmp_path):
    """A fresh clone: the scripts, the shipped model and the example picture, nothing trained."""
    for name in os.listdir(REPO):
        if name.endswith('.py'):
            shutil.copy(REPO / name, tmp_path / name)
    shutil.copytree(SHIPPED, tmp_path / SHIPPED_MODEL)
    (tmp_path / 'png').mkdir()
    shutil.copy(REPO / 'png' / 'example.png', tmp_path / 'png')
    result = run(tmp_path / 'sample.py', '--image', 'png/example.png', cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == 'a large red circle and a small blue triangle.\n'
    assert result.stderr.startswith(f'model: {SHIPPED_MODEL} (') and 'COCO' in result.stderr
    assert result.stderr.count('\n') == 2 and result.stderr.endswith('\ndevice: cpu, dtype: float32\n')


def test_a_checkpoint_named_or_trained_comes_before_the_shipped_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sample_order, app_order = ['models/checkpoint.pt'], ['models/checkpoint.pt', 'models/demo/most_accurate.pt']
    assert default_model(*sample_order) == ('models/checkpoint.pt', None)  # nothing here: the caller says so
    (tmp_path / SHIPPED_MODEL).mkdir(parents=True)
    path, line = default_model(*sample_order)
    assert path == SHIPPED_MODEL and line.startswith(f'model: {SHIPPED_MODEL} (') and 'COCO' in line
    (tmp_path / 'models' / 'demo').mkdir()
    (tmp_path / 'models' / 'demo' / 'most_accurate.pt').touch()
    assert default_model(*sample_order)[0] == SHIPPED_MODEL
    assert default_model(*app_order) == ('models/demo/most_accurate.pt', 'model: models/demo/most_accurate.pt')
    (tmp_path / 'models' / 'checkpoint.pt').touch()
    assert default_model(*sample_order) == default_model(*app_order) == ('models/checkpoint.pt',
                                                                         'model: models/checkpoint.pt')


def test_torch_hub_without_a_checkpoint_gives_the_shipped_model_offline(tmp_path):
    """In a new process, from another folder, with no network: hubconf.py imports the repository's modules itself."""
    code = (f'import torch; captioner = torch.hub.load({str(REPO)!r}, "captioner", source="local"); '
            f'print(captioner.caption([{str(REPO / "png" / "example.png")!r}])[0])')
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'no_proxy': '', 'https_proxy': 'http://127.0.0.1:9',
           'http_proxy': 'http://127.0.0.1:9'}
    result = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert 'a large red circle and a small blue triangle.' in result.stdout


def test_export_keeps_onnx_as_the_default_format(monkeypatch):
    calls = []
    monkeypatch.setattr(export, 'export', lambda checkpoint, out: calls.append((checkpoint, out)))
    export.main(['--checkpoint', 'x.pt'])
    assert calls == [('x.pt', 'models/onnx')]
