"""The attention decoder through every script the fc decoder goes through: train.py (the loss going down, exact
resumption, bf16 autocast, torchrun), the grid feature cache of extract_features.py (float16, memory-mapped,
refused by a model of another kind), scst.py, and export.py's safetensors and ONNX files, whose captions are
PyTorch's."""
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import exporting
import scst
import train as trainer
import training
from conftest import REPO, assert_same_weights, learning_args, run, sample_lines, tiny_args, unchanged_weights
from data_loader import FeatureDataset, collate_fn, eval_transform, load_image, open_cache
from decoding import load_captioner, load_onnx_captioner
from model import AttentionDecoder, DecodeSettings, read_checkpoint
from vocabulary import load_vocab

ATTENTION = ('--decoder', 'attention', '--attention_size', '16')


def extract(data, output, *extra):
    result = run('extract_features.py', '--image_dir', data / 'train',
                 '--caption_path', data / 'annotations' / 'captions_train.json', '--output', output,
                 '--backbone', 'smallcnn', '--weights', 'none', '--image_size', '32', '--crop_size', '32',
                 '--batch_size', '16', '--num_workers', '0', *extra)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.fixture(scope='module')
def caches(synthetic_set, pooled_cache, tmp_path_factory):
    """A cache of smallcnn's grids (2x2 cells of 32-pixel images) and one of its pooled vectors, of the same
    random backbone (--weights none starts from the seed, the same in both runs)."""
    folder = tmp_path_factory.mktemp('caches')
    extract(synthetic_set, folder / 'grid', '--decoder', 'attention')
    (folder / 'pooled').symlink_to(pooled_cache)
    return folder


def train_validated(synthetic_set, folder, *extra, **overrides):
    """(folder, history) of an attention model that learns, validated on the held-out images every epoch. Less
    dropout and penalty than by default: with 4 cells and captions of about 10 words, every cell gets far more than
    the penalty's target of 1 over a caption, and in 3 epochs the defaults leave beam search with one caption for
    every image."""
    args = learning_args(synthetic_set, folder, *ATTENTION, '--num_epochs', '3', '--dropout', '0.1', '--alpha_c', '0.1',
                         *extra, tensorboard='none', **overrides)
    return folder, training.train(args).history


@pytest.fixture(scope='module')
def trained(synthetic_set, tmp_path_factory):
    """An attention model trained from the images, backbone too; (folder, history)."""
    return train_validated(synthetic_set, tmp_path_factory.mktemp('attention'))


@pytest.fixture(scope='module')
def trained_from_cache(synthetic_set, caches, tmp_path_factory):
    """An attention model trained from the grid cache, its backbone the cache's; (folder, history)."""
    return train_validated(synthetic_set, tmp_path_factory.mktemp('from_cache'), '--features', caches / 'grid',
                           train_backbone=False)


def weights(module):
    return {key: value.clone() for key, value in module.state_dict().items()}


@pytest.mark.parametrize('source', ['images', 'cache'])
def test_training_lowers_the_held_out_loss(trained, trained_from_cache, source):
    folder, history = trained if source == 'images' else trained_from_cache
    held_out = [entry['loss'] for entry in history['val']]  # the cross-entropy alone, as for the fc decoder
    assert len(held_out) == 3 and held_out[-1] < 0.8 * held_out[0]
    losses = [entry['loss'] for entry in history['train']]  # with --alpha_c's penalty
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    config = read_checkpoint(str(folder / 'checkpoint.pt'))['model_args']
    assert config['decoder'] == 'attention' and config['backbone'] == 'smallcnn'


def test_an_interrupted_run_resumes_to_the_same_weights(synthetic_sets, tmp_path):
    # Dropout, the penalty's weight, the cosine schedule and the trained backbone must all come back as they were.
    data = synthetic_sets(16, 4)  # 80 captions: 5 steps an epoch
    extra = [*ATTENTION, '--num_epochs', '2', '--alpha_c', '0.5', '--lr_schedule', 'cosine', '--train_backbone',
             '--save_step', '0', '--tensorboard', 'none']
    result = training.train(tiny_args(data, tmp_path / 'whole', *extra))
    encoder, decoder = result.encoder, result.decoder

    def interrupt(step):
        if step == 7:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(training.Interrupted, match='step 7'):
        training.train(tiny_args(data, tmp_path / 'split', *extra), on_step=interrupt)
    args = tiny_args(data, tmp_path / 'split', '--resume', '--tensorboard', 'none')  # no model or schedule flags
    result = training.train(args)
    encoder2, decoder2, history, args = result.encoder, result.decoder, result.history, result.settings
    assert args.decoder == 'attention' and args.alpha_c == 0.5
    assert isinstance(decoder2, AttentionDecoder)
    assert_same_weights(weights(encoder), weights(encoder2))
    assert_same_weights(weights(decoder), weights(decoder2))
    assert [e['step'] for e in history['train']] == list(range(1, 11))


def test_amp_trains_with_bf16_autocast(synthetic_set, tmp_path, capsys):
    args = tiny_args(synthetic_set, tmp_path, *ATTENTION, '--amp', '--num_epochs', '1', '--tensorboard', 'none')
    result = training.train(args)
    decoder, history = result.decoder, result.history
    assert capsys.readouterr().out.splitlines()[0] == 'device: cpu, dtype: bfloat16 autocast (--amp)'
    assert len(history['train']) == 15 and all(np.isfinite(e['loss']) for e in history['train'])
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in decoder.parameters())


def test_torchrun_trains_two_processes_from_the_grid_cache(synthetic_set, caches, tmp_path):
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'train.py',
               '--device', 'cpu', '--features', str(caches / 'grid'), *ATTENTION,
               '--caption_path', str(synthetic_set / 'annotations' / 'captions_train.json'),
               '--vocab_path', str(synthetic_set / 'vocab.json'), '--model_path', str(tmp_path),
               '--embed_size', '16', '--hidden_size', '24', '--batch_size', '16', '--num_workers', '0',
               '--num_epochs', '1', '--tensorboard', 'none']
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = read_checkpoint(str(tmp_path / 'checkpoint.pt'))
    assert checkpoint['step'] == 8 and checkpoint['model_args']['decoder'] == 'attention'  # 120 captions a process


def test_the_grid_cache_is_float16_memory_mapped_and_gives_the_loss_of_images(synthetic_set, caches,
                                                                                trained_from_cache):
    features, done, meta = open_cache(str(caches / 'grid'))
    assert features.dtype == np.float16 and features.shape == (48, 2, 4, 128)  # 2x2 cells of 128 features
    assert done.all() and meta['grid_size'] == 7 and open_cache(str(caches / 'pooled'))[2]['grid_size'] is None
    vocab = load_vocab(str(synthetic_set / 'vocab.json'))
    cached = FeatureDataset(str(caches / 'grid'), str(synthetic_set / 'annotations' / 'captions_train.json'), vocab,
                            mirror=False, grid_size=7)
    assert isinstance(cached.features, np.memmap)  # read an item at a time, never loaded whole

    # Without augmentation, training from the cache sees what training from the images sees.
    encoder, decoder, _, _ = load_captioner(str(trained_from_cache[0] / 'checkpoint.pt'))
    items = [cached[i] for i in range(16)]
    transform = eval_transform(32, 32)
    images = [transform(load_image(str(synthetic_set / 'train' / cached.coco.imgs[cached.image_id(i)]['file_name'])))
              for i in range(16)]
    grids, captions, lengths = collate_fn(items)
    images, _, _ = collate_fn([(image, caption) for image, (_, caption) in zip(images, items)])
    with torch.no_grad():
        from_cache, _ = training.caption_loss(training.Captioner(encoder, decoder, from_features=True), grids, captions,
                                              lengths)
        from_images, _ = training.caption_loss(training.Captioner(encoder, decoder), images, captions, lengths)
    assert from_cache.item() == pytest.approx(from_images.item(), rel=2e-3)  # float16 rounding of the cache


def test_a_cache_of_another_kind_is_one_line(synthetic_set, caches, tmp_path):
    def train_main(*extra):
        argv = ['--caption_path', str(synthetic_set / 'annotations' / 'captions_train.json'),
                '--vocab_path', str(synthetic_set / 'vocab.json'), '--model_path', str(tmp_path),
                '--embed_size', '16', '--hidden_size', '24', '--num_workers', '0', '--tensorboard', 'none',
                '--device', 'cpu', *map(str, extra)]
        with pytest.raises(SystemExit) as caught:
            trainer.main(argv)
        return caught.value.code

    assert train_main('--features', caches / 'pooled', *ATTENTION) == (
        f'error: {caches / "pooled"} holds pooled features (--decoder fc) but this model reads grids: make a cache '
        'for it with extract_features.py --decoder attention --grid_size 7')
    assert train_main('--features', caches / 'grid') == (
        f'error: {caches / "grid"} holds grids (--decoder attention --grid_size 7) but this model reads pooled '
        'features: make a cache for it with extract_features.py --decoder fc')
    assert train_main('--features', caches / 'grid', *ATTENTION, '--grid_size', '5').startswith(
        f'error: {caches / "grid"} holds grids (--decoder attention --grid_size 7) but this model reads grids: '
        'make a cache for it with extract_features.py --decoder attention --grid_size 5')
    assert train_main(*ATTENTION, '--image_dir', synthetic_set / 'train', '--compile').startswith(
        "error: --compile compiles the fc decoder's LSTM loop")

    # A cache from before grids (no grid_size in its meta.json) holds pooled vectors, and still serves the fc decoder.
    old = tmp_path / 'old'
    shutil.copytree(caches / 'pooled', old)
    meta = json.loads((old / 'meta.json').read_text())
    del meta['grid_size']
    (old / 'meta.json').write_text(json.dumps(meta))
    vocab = load_vocab(str(synthetic_set / 'vocab.json'))
    captions = str(synthetic_set / 'annotations' / 'captions_train.json')
    assert FeatureDataset(str(old), captions, vocab)[0][0].shape == (128,)
    with pytest.raises(ValueError, match='holds pooled features'):
        FeatureDataset(str(old), captions, vocab, grid_size=7)


@pytest.mark.parametrize('source', ['images', 'cache'])
def test_scst_trains_an_attention_model(synthetic_set, caches, trained, trained_from_cache, tmp_path, source):
    """From images, or from the cache of the backbone the model was trained with."""
    if source == 'images':
        checkpoint, flags = trained[0] / 'checkpoint.pt', ['--image_dir', synthetic_set / 'train']
    else:
        checkpoint, flags = trained_from_cache[0] / 'checkpoint.pt', ['--features', caches / 'grid']
    before = weights(load_captioner(str(checkpoint)).decoder)
    args = tiny_args(synthetic_set, tmp_path, '--scst', '--init_from', str(checkpoint), '--num_epochs', '1',
                     '--scst_samples', '2', '--no_flip', *map(str, flags), image_dir=None)
    result = scst.train(args)
    decoder, history = result.decoder, result.history
    assert len(history['scst']) == 3 and all(np.isfinite(e['reward']) for e in history['scst'])
    assert isinstance(decoder, AttentionDecoder)
    assert len(unchanged_weights(before, decoder)) < len(before)  # SCST moved some weights
    assert read_checkpoint(str(tmp_path / 'checkpoint.pt'))['scst']


def validation_images(synthetic_set):
    return [str(path) for path in sorted((synthetic_set / 'val').iterdir())]


def test_the_safetensors_folder_captions_as_its_checkpoint(synthetic_set, trained, tmp_path):
    checkpoint = str(trained[0] / 'checkpoint.pt')
    exporting.export_safetensors(checkpoint, str(tmp_path / 'shared'))
    assert json.loads((tmp_path / 'shared' / 'config.json').read_text())['decoder'] == 'attention'
    images = validation_images(synthetic_set)
    for beam_size in (1, 3):
        settings = DecodeSettings(beam_size=beam_size)
        assert load_captioner(str(tmp_path / 'shared')).caption(images, settings) == \
            load_captioner(checkpoint).caption(images, settings)


@pytest.fixture(scope='module')
def onnx_folder(trained):
    pytest.importorskip('onnxruntime')
    pytest.importorskip('onnxscript')
    if not hasattr(torch.export.Dim, 'DYNAMIC'):
        pytest.skip('export.py needs torch.export.Dim.DYNAMIC (newer than torch 2.5)')
    folder = trained[0] / 'onnx'
    result = run('export.py', '--checkpoint', trained[0] / 'checkpoint.pt', '--output_dir', folder, timeout=600)
    assert result.returncode == 0, result.stderr
    return folder


@pytest.mark.parametrize('beam_size', ['1', '3'])
def test_onnx_captions_equal_pytorch_captions_on_the_validation_images(synthetic_set, trained, onnx_folder,
                                                                       beam_size):
    images = validation_images(synthetic_set)
    pytorch = sample_lines('--image', *images, '--checkpoint', trained[0] / 'checkpoint.pt', '--beam_size', beam_size)
    onnx = sample_lines('--image', *images, '--onnx', onnx_folder, '--beam_size', beam_size)
    assert len(pytorch) == 12 and onnx == pytorch
    assert len({line.split(': ', 1)[1] for line in onnx}) > 1  # a trained model: not one caption for everything


def test_the_onnx_step_gives_the_log_probabilities_state_and_attention_of_pytorch(trained, onnx_folder):
    encoder, decoder, _, _ = load_captioner(str(trained[0] / 'checkpoint.pt'))
    onnx_encoder, onnx_decoder, _, onnx_config = load_onnx_captioner(str(onnx_folder))
    assert onnx_config.decoder == 'attention'
    torch.manual_seed(0)
    for batch in (1, 5):
        images = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            grid = encoder(images)
            torch.testing.assert_close(onnx_encoder(images), grid, rtol=1e-4, atol=1e-5)
            (inputs, state), (onnx_inputs, onnx_state) = decoder.start(grid), onnx_decoder.start(grid)
            for _ in range(3):
                log_probs, state = decoder.step(inputs, state)
                onnx_log_probs, onnx_state = onnx_decoder.step(onnx_inputs, onnx_state)
                torch.testing.assert_close(onnx_log_probs, log_probs, rtol=1e-4, atol=1e-4)
                for name in ('h', 's', 'alpha'):
                    torch.testing.assert_close(getattr(onnx_state, name), getattr(state, name), rtol=1e-4, atol=1e-5)
                words = log_probs.argmax(1)
                inputs, onnx_inputs = decoder.embed(words), onnx_decoder.embed(words)
