"""How training cuts an epoch into batches: every caption once, never a batch of one caption alone (the
encoder's BatchNorm cannot train on one), and a resumed run skips exactly the batches it has done."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import extract_features
import train as trainer
import training
from conftest import REPO, assert_same_weights, tiny_args
from data_loader import ResumableSampler, batch_sizes
from model import Captioner, CaptionerConfig, build_captioner, read_checkpoint


@pytest.fixture(scope='module')
def data(synthetic_sets, tmp_path_factory):
    """The small synthetic set (24 training images, 120 captions; 4 held out, 20 captions), and copies of its
    captions files with rows that usable_captions skips: 113 training captions left, and 17 held out; and
    captions_seven.json, the first 7 training captions only."""
    data = synthetic_sets(num_train=24, num_val=4, seed=7)
    folder = tmp_path_factory.mktemp('spoilt')
    for split, spoilt in (('train', 7), ('val', 3)):
        dataset = json.loads((data / 'annotations' / f'captions_{split}.json').read_text())
        for annotation in dataset['annotations'][:spoilt]:
            annotation['caption'] = ' .' if annotation['id'] % 2 else None
        (folder / f'captions_{split}.json').write_text(json.dumps(dataset))
    dataset = json.loads((data / 'annotations' / 'captions_train.json').read_text())
    dataset['annotations'] = dataset['annotations'][:7]
    (folder / 'captions_seven.json').write_text(json.dumps(dataset))
    return data, folder


@pytest.mark.parametrize('count, batch_size, sizes', [
    (240, 239, [120, 120]),  # as reported: the lone 240th caption used to end the first epoch
    (113, 8, [8] * 13 + [5, 4]),
    (120, 8, [8] * 15), (7, 8, [7]), (9, 8, [5, 4]), (4, 3, [2, 2]),
    (5, 2, [2, 3]), (3, 2, [3]),  # two captions cannot share three: the last batch takes three
    (3, 1, [1, 1, 1]), (1, 8, [1]),  # unavoidable: Captioner trains a batch of one on running statistics
])
def test_batch_sizes_never_leave_one_caption_alone(count, batch_size, sizes):
    assert batch_sizes(count, batch_size) == sizes
    assert sum(sizes) == count and max(sizes) <= max(batch_size, 3)


@pytest.mark.parametrize('world_size', [1, 2])
def test_the_sampler_gives_every_caption_once_and_resumes_after_the_batches_done(world_size):
    dataset = list(range(227))  # 227 = 2 * 113 + 1: each of two processes gets 114 (one repeated), 114 % 113 = 1
    for batch_size in (113, 16, 2):
        samplers = [ResumableSampler(dataset, batch_size, rank, world_size, seed=3) for rank in range(world_size)]
        seen = []
        for sampler in samplers:
            sampler.start(epoch=1, batches_done=0)
            epoch = list(sampler)
            assert len(epoch) == len(sampler) == sampler.batches_per_epoch
            assert min(map(len, epoch)) > 1 and sum(map(len, epoch)) == sampler.num_samples
            seen += [index for batch in epoch for index in batch]
            for done in range(len(epoch) + 1):
                sampler.start(epoch=1, batches_done=done)
                assert list(sampler) == epoch[done:] and len(sampler) == len(epoch) - done
        assert set(seen) == set(dataset)


@pytest.mark.parametrize('train_backbone', [False, True])
def test_a_batch_of_one_trains_on_batch_norms_running_statistics(train_backbone):
    torch.manual_seed(0)
    encoder, decoder = build_captioner(CaptionerConfig(vocab_size=9, embed_size=8, hidden_size=8, backbone='smallcnn',
                                                       train_backbone=train_backbone, crop_size=32))
    model = Captioner(encoder, decoder).train()
    modes = [m.training for m in model.modules()]
    statistics = {name: b.clone() for name, b in model.named_buffers() if 'running' in name}
    assert len(statistics) == 2 * 6  # the head's BatchNorm and the smallcnn's five
    outputs = model(torch.randn(1, 3, 32, 32), torch.tensor([[1, 4, 5, 2]]), [4])  # the smallcnn ends at 1 x 1
    outputs.sum().backward()
    assert outputs.shape == (4, 9) and encoder.linear.weight.grad.abs().sum() > 0
    buffers = dict(model.named_buffers())
    assert_same_weights(statistics, {name: b for name, b in buffers.items() if 'running' in name})  # as they were
    assert [m.training for m in model.modules()] == modes  # and the layers back in training mode
    model(torch.randn(2, 3, 32, 32), torch.tensor([[1, 4, 5, 2]] * 2), [4, 4])
    assert not torch.equal(statistics['encoder.bn.running_mean'], buffers['encoder.bn.running_mean'])


def train_main(data, tmp_path, *extra, caption_path=None, image_dir=None, validate=True):
    data, spoilt = data
    argv = ['--image_dir', str(image_dir or data / 'train'),
            '--caption_path', str(caption_path or data / 'annotations' / 'captions_train.json'),
            '--vocab_path', str(data / 'vocab.json'), '--model_path', str(tmp_path / 'models'),
            '--backbone', 'smallcnn', '--weights', 'none', '--image_size', '32', '--crop_size', '32',
            '--embed_size', '16', '--hidden_size', '24', '--num_workers', '0', '--tensorboard', 'none',
            '--lr_schedule', 'cosine', '--device', 'cpu', *extra]
    if validate:
        argv += ['--val_image_dir', str(data / 'val'), '--val_caption_path', str(spoilt / 'captions_val.json')]
    try:
        trainer.main(argv)
    except SystemExit as exit:
        return exit.code
    return None


def assert_trained(tmp_path, steps, epochs=1):
    checkpoint = read_checkpoint(str(tmp_path / 'models' / 'checkpoint.pt'))
    assert (checkpoint['epoch'], checkpoint['step'], checkpoint['batches_done']) == (epochs, steps, 0)
    # The cosine schedule reaches 0 at the last step only if the steps per epoch were counted right.
    assert checkpoint['scheduler']['_last_lr'] == [0.0]
    return checkpoint


@pytest.mark.parametrize('batch_size, captions, steps, strict', [
    ('119', None, 2, False),  # 120 captions: 60 and 60
    ('119', None, 2, True),
    ('8', 'captions_train.json', 15, False),  # 113 usable: 13 batches of 8, then 5 and 4; 17 held out: 8, 8, 1
    ('2', 'captions_seven.json', 3, True),  # 7 captions: 2, 2 and 3
])
def test_a_caption_count_that_leaves_one_over_trains_every_caption(data, tmp_path, batch_size, captions, steps,
                                                                  strict):
    message = train_main(data, tmp_path, '--num_epochs', '1', '--batch_size', batch_size,
                         *(['--strict'] if strict else []), caption_path=captions and data[1] / captions,
                         validate=captions == 'captions_train.json')
    assert message is None, message
    assert_trained(tmp_path, steps)


def test_a_batch_left_with_one_readable_image_trains(data, tmp_path, monkeypatch, capsys):
    images = tmp_path / 'images'
    images.mkdir()
    for number, path in enumerate(sorted((data[0] / 'train').iterdir())):
        (images / path.name).write_bytes(path.read_bytes() if number % 6 == 0 else b'not an image')
    real_loss, sizes = training.caption_loss, []

    def loss(model, inputs, *args):
        sizes.append(len(inputs))
        return real_loss(model, inputs, *args)
    monkeypatch.setattr(training, 'caption_loss', loss)
    message = train_main(data, tmp_path, '--num_epochs', '1', '--batch_size', '8', image_dir=images, validate=False)
    assert message is None, message
    assert 1 in sizes and sum(sizes) == 20  # 4 readable images of 24, their 20 captions all trained
    assert read_checkpoint(str(tmp_path / 'models' / 'checkpoint.pt'))['step'] == len(sizes)
    assert 'skipped 100 captions of unreadable images' in capsys.readouterr().out


def test_a_feature_cache_with_one_caption_over_trains(data, tmp_path):
    cache = tmp_path / 'features'
    extract_features.main(['--image_dir', str(data[0] / 'train'), '--caption_path',
                           str(data[0] / 'annotations' / 'captions_train.json'), '--output', str(cache),
                           '--backbone', 'smallcnn', '--weights', 'none', '--image_size', '32', '--crop_size', '32',
                           '--num_workers', '0', '--device', 'cpu'])
    message = train_main(data, tmp_path, '--num_epochs', '1', '--batch_size', '8', '--features', str(cache),
                         caption_path=data[1] / 'captions_train.json', validate=False)
    assert message is None, message
    assert_trained(tmp_path, 15)


def test_a_resumed_run_with_one_caption_over_ends_with_the_same_weights(data, tmp_path):
    # 120 captions in batches of 17: six of 17, then 9 and 9; interrupted after the first 9, in the second epoch.
    extra = ['--num_epochs', '2', '--batch_size', '17', '--save_step', '0', '--train_backbone']
    whole = tiny_args(data[0], tmp_path / 'whole', *extra, lr_schedule='cosine', tensorboard='none')
    result = training.train(whole)
    encoder, decoder = result.encoder, result.decoder

    def interrupt(step):
        if step == 8 + 7:
            os.kill(os.getpid(), signal.SIGTERM)

    split = tiny_args(data[0], tmp_path / 'split', *extra, lr_schedule='cosine', tensorboard='none')
    with pytest.raises(training.Interrupted, match='step 15'):
        training.train(split, on_step=interrupt)
    assert read_checkpoint(str(tmp_path / 'split' / 'checkpoint.pt'))['batches_done'] == 7
    result = training.train(tiny_args(data[0], tmp_path / 'split', *extra, '--resume',
                                      tensorboard='none'))
    encoder2, decoder2, history = result.encoder, result.decoder, result.history
    assert_same_weights(encoder, encoder2)
    assert_same_weights(decoder, decoder2)
    assert [e['step'] for e in history['train']] == list(range(1, 17))


@pytest.mark.parametrize('strict', [[], ['--strict']])
def test_torchrun_with_one_caption_over_in_each_process_trains(data, tmp_path, strict):
    data, spoilt = data
    # 113 usable captions: 57 for each of the 2 processes (one repeated), in batches of 8: six, then 5 and 4.
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'train.py',
               '--device', 'cpu',
               '--image_dir', str(data / 'train'), '--caption_path', str(spoilt / 'captions_train.json'),
               '--vocab_path', str(data / 'vocab.json'), '--model_path', str(tmp_path / 'models'),
               '--backbone', 'smallcnn', '--weights', 'none', '--image_size', '32', '--crop_size', '32',
               '--embed_size', '16', '--hidden_size', '24', '--batch_size', '8', '--num_workers', '0',
               '--num_epochs', '1', '--tensorboard', 'none', '--lr_schedule', 'cosine', *strict]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_trained(tmp_path, 8)
