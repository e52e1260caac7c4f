"""Training faster on a CPU: the training images decoded once into memory (--cache_images), one
CNN pass per image for several of its captions (--captions_per_image), and bf16 autocast only where the CPU
has it (demo.py --amp auto)."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import data_loader
import demo
import shapes_demo
import train as trainer
import training
from conftest import REPO, tiny_args, unchanged_weights
from data_loader import CocoDataset, GroupedSampler, ImageGroups, batches, collate_groups, eval_transform
from files import ImageError, load_image
from model import Captioner, CaptionerConfig, build_captioner, caption_loss, read_checkpoint
from vocabulary import load_vocab


def dataset_of(data, transform=None, **kwargs):
    return CocoDataset(str(data / 'train'), str(data / 'annotations' / 'captions_train.json'),
                       load_vocab(str(data / 'vocab.json')), transform, **kwargs)


def weights_equal(a, b):
    return all(torch.equal(x, y) for (_, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()))


def count_reads(monkeypatch):
    """A list that grows by one for every image data_loader reads from a file."""
    reads, real = [], data_loader.load_image

    def counted(path):
        reads.append(path)
        return real(path)
    monkeypatch.setattr(data_loader, 'load_image', counted)
    return reads


# --- the image cache --------------------------------------------------------------------------------

def test_the_cache_holds_the_files_pixels_and_is_read_instead_of_them(synthetic_set, monkeypatch):
    files = dataset_of(synthetic_set, data_loader.train_transform(28))
    cached = dataset_of(synthetic_set, data_loader.train_transform(28))
    assert cached.cache_images(10**9) == (True, 48 * 32 * 32 * 3)
    for image_id in range(1, 49):
        image = cached.cache.image(image_id)
        expected = np.asarray(load_image(str(synthetic_set / 'train' / f'{image_id:012d}.png')))
        assert image.dtype == torch.uint8 and np.array_equal(image.permute(1, 2, 0).numpy(), expected)
    torch.manual_seed(3)
    from_files = [files[i] for i in range(0, 240, 7)]
    reads = count_reads(monkeypatch)
    torch.manual_seed(3)
    from_cache = [cached[i] for i in range(0, 240, 7)]
    assert not reads  # not one file opened
    for (a, caption_a), (b, caption_b) in zip(from_files, from_cache):  # the same random crops from the same draws
        assert torch.equal(a, b) and torch.equal(caption_a, caption_b)


def test_too_large_a_set_is_read_from_its_files(synthetic_set, monkeypatch):
    dataset = dataset_of(synthetic_set)
    assert dataset.cache_images(40 * 32 * 32 * 3) == (False, 48 * 32 * 32 * 3)  # the estimate says no
    assert dataset.cache is None
    def decoded(path):  # image 30 larger than the first, which the estimate goes by: found out as it is read
        return np.zeros((64, 64, 3) if path.endswith('30.png') else (32, 32, 3), np.uint8)
    monkeypatch.setattr(data_loader, 'decoded', decoded)
    assert dataset.cache_images(48 * 32 * 32 * 3 + 1000) == (False, None) and dataset.cache is None
    assert dataset.cache_images(48 * 32 * 32 * 3 + 3 * 32 * 32 * 3) == (True, 47 * 32 * 32 * 3 + 64 * 64 * 3)
    assert dataset.cache.image(30).shape == (3, 64, 64) and dataset.cache.image(31).shape == (3, 32, 32)


@pytest.mark.parametrize('captions_per_image', [1, 5])
def test_training_from_the_cache_is_bit_identical_to_reading_the_files(synthetic_set, tmp_path, monkeypatch, capsys,
                                                                      captions_per_image):
    # Random 28-pixel crops and flips of the 32-pixel images: the same draws must give the same crops.
    extra = ['--num_epochs', '1', '--crop_size', '28', '--train_backbone', '--tensorboard', 'none',
             '--captions_per_image', str(captions_per_image)]
    reads = count_reads(monkeypatch)
    files = training.train(tiny_args(synthetic_set, tmp_path / 'files', *extra, '--cache_images', '0'))
    assert len(reads) == (240 if captions_per_image == 1 else 48)  # once per caption, or once per group
    assert 'images: read from their files at every use (--cache_images 0)' in capsys.readouterr().out
    reads.clear()
    cached = training.train(tiny_args(synthetic_set, tmp_path / 'cached', *extra))
    assert len(reads) == 48 + 1  # each image once, and the first once more to judge their size
    assert 'images: decoded once into memory (0 MB), cropped from there every epoch\n' in capsys.readouterr().out
    assert weights_equal(files.encoder, cached.encoder) and weights_equal(files.decoder, cached.decoder)
    assert files.history['train'] == cached.history['train']


def test_data_loading_workers_read_the_cache_too(synthetic_set, tmp_path, monkeypatch):
    """Workers forked after the cache is filled share it: with every file unreadable from then on, --strict
    training still finds every image."""
    real, real_load = CocoDataset.cache_images, data_loader.load_image

    def unreadable(path):
        raise ImageError(f'{path}: read from its file')

    def then_no_files(self, *args, **kwargs):
        monkeypatch.setattr(data_loader, 'load_image', real_load)
        result = real(self, *args, **kwargs)
        monkeypatch.setattr(data_loader, 'load_image', unreadable)
        return result
    monkeypatch.setattr(CocoDataset, 'cache_images', then_no_files)
    for n in (1, 5):
        history = training.train(tiny_args(synthetic_set, tmp_path / str(n), '--num_workers', '2', '--strict',
                                           '--num_epochs', '1',
                                           '--captions_per_image', str(n), tensorboard='none')).history
        assert len(history['train']) == (15 if n == 1 else 16)  # 240 captions by 16; 48 groups by 3


def test_unreadable_images_are_skipped_or_stop_with_strict_when_cached_and_grouped(synthetic_set, tmp_path, capsys,
                                                                                   monkeypatch):
    images = tmp_path / 'images'
    images.mkdir()
    for number, path in enumerate(sorted((synthetic_set / 'train').iterdir())):
        (images / path.name).write_bytes(path.read_bytes() if number % 6 == 0 else b'not an image')
    real_loss, trained = training.caption_loss, []

    def loss(model, inputs, captions, lengths, alpha_c=0.0):
        trained.append((len(inputs.images), len(captions)))
        return real_loss(model, inputs, captions, lengths, alpha_c)
    monkeypatch.setattr(training, 'caption_loss', loss)
    extra = ['--num_epochs', '1', '--captions_per_image', '5', '--tensorboard', 'none']
    training.train(tiny_args(synthetic_set, tmp_path / 'skip', *extra, image_dir=images))
    out, err = capsys.readouterr()
    assert 'images: decoded once into memory' in out
    assert 'skipped 200 captions of unreadable images' in out  # 40 of 48 images unreadable, 5 captions each
    assert err.count('skipped: ') == 40 and 'cannot read image' in err  # each image named once
    assert [sum(column) for column in zip(*trained)] == [8, 40]  # the 8 readable images, all their captions
    with pytest.raises(ImageError, match='cannot read image'):
        training.train(tiny_args(synthetic_set, tmp_path / 'strict', *extra, '--strict', image_dir=images))


# --- one CNN pass per image ---------------------------------------------------------------------------

def test_a_grouped_batch_runs_the_encoder_once_per_image_with_the_ungrouped_loss(synthetic_set):
    dataset = dataset_of(synthetic_set, eval_transform(32, 32))
    sampler = GroupedSampler([dataset.image_id(i) for i in range(len(dataset))], 16, 5, 0, 1, seed=1)
    sampler.start(0, 0)
    first = next(iter(sampler))
    groups, captions, lengths, errors = next(iter(batches(dataset, 16, False, 0, sampler, collate_groups)))
    assert isinstance(groups, ImageGroups) and len(groups.images) == 3 and len(captions) == 15 and not errors
    assert sorted(lengths, reverse=True) == lengths

    def pair(image, caption):
        return image.numpy().tobytes(), tuple(caption[caption > 0].tolist())
    expected = [pair(dataset[group][0], dataset.caption(i)) for group in first for i in group]
    got = [pair(groups.images[row], caption) for row, caption in zip(groups.image_of, captions)]
    assert sorted(got) == sorted(expected)  # each caption with its own image
    torch.manual_seed(0)
    encoder, decoder = build_captioner(CaptionerConfig(vocab_size=len(dataset.vocab), embed_size=16, hidden_size=24,
                                                       backbone='smallcnn', train_backbone=True, crop_size=32))
    model = Captioner(encoder, decoder).eval()  # BatchNorm as at inference: each image's features on its own
    seen = []
    encoder.register_forward_hook(lambda module, inputs, output: seen.append(len(inputs[0])))
    grouped, _ = caption_loss(model, groups, captions, lengths)
    grouped.backward()
    grouped_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    repeated, _ = caption_loss(model, groups.images[groups.image_of], captions, lengths)
    repeated.backward()
    assert seen == [3, 15]  # once per image, against once per caption
    torch.testing.assert_close(grouped, repeated, rtol=1e-6, atol=0)
    for a, p in zip(grouped_grads, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)


def test_a_grouped_batch_of_one_image_trains_on_running_statistics():
    torch.manual_seed(0)
    encoder, decoder = build_captioner(CaptionerConfig(vocab_size=9, embed_size=8, hidden_size=8, backbone='smallcnn',
                                                       train_backbone=True, crop_size=32))
    model = Captioner(encoder, decoder).train()
    before = encoder.bn.running_mean.clone()
    groups = ImageGroups(torch.randn(1, 3, 32, 32), torch.zeros(3, dtype=torch.long))
    outputs = model(groups, torch.tensor([[1, 4, 5, 2]] * 3), [4, 4, 4])
    assert outputs.shape == (12, 9) and torch.equal(before, encoder.bn.running_mean)


def epoch_of(samplers, epoch=0):
    shares = []
    for sampler in samplers:
        sampler.start(epoch, 0)
        shares.append(list(sampler))
    return shares


@pytest.mark.parametrize('world_size', [1, 2])
def test_grouping_gives_every_caption_once_an_epoch_and_resumes_after_the_batches_done(world_size):
    # 40 images with 1 to 7 captions (160 in all); caption indices of one image need not be adjacent.
    counts = [1 + i % 7 for i in range(40)]
    image_ids = [image for image, count in enumerate(counts) for _ in range(count)]
    image_ids = image_ids[1::2] + image_ids[::2]
    image_of, total = dict(enumerate(image_ids)), len(image_ids)
    samplers = [GroupedSampler(image_ids, 16, 5, rank, world_size, seed=4) for rank in range(world_size)]
    shares = epoch_of(samplers)
    groups = [group for share in shares for batch in share for group in batch]
    assert all(len(share) == samplers[0].batches_per_epoch for share in shares)  # processes in lockstep
    assert sum(-(-count // 5) for count in counts) == 50 == len(groups)  # 7 captions: two groups, 4 and 3
    assert sorted(index for group in groups for index in group) == list(range(total))  # every caption once
    for group in groups:
        assert len({image_of[i] for i in group}) == 1  # one image's captions
        count = counts[image_of[group[0]]]
        parts = -(-count // 5)
        assert len(group) in (count // parts, -(-count // parts))  # as few groups as hold them, as even as can be
    if world_size == 2:  # each process its own images: only those with two groups can have captions in both
        images = [{image_of[i] for batch in share for group in batch for i in group} for share in shares]
        assert images[0] | images[1] == set(range(40)) and all(counts[i] > 5 for i in images[0] & images[1])
    for sampler, share in zip(samplers, shares):
        assert all(len(batch) in (2, 3) for batch in share)  # 16 // 5 = 3 images a batch, never one alone
        assert all(sum(map(len, batch)) <= 16 for batch in share)
        for done in range(len(share) + 1):
            sampler.start(0, done)
            assert list(sampler) == share[done:] and len(sampler) == len(share) - done
    later = [group for share in epoch_of(samplers, epoch=1) for batch in share for group in batch]
    assert sorted(index for group in later for index in group) == list(range(total))
    assert set(later) != set(groups)  # each epoch shuffles each image's captions anew


def test_uneven_shares_repeat_groups_so_that_every_process_takes_as_many_steps():
    image_ids = [image for image in range(7) for _ in range(5)]  # 7 groups for 2 processes: one repeated
    shares = epoch_of([GroupedSampler(image_ids, 10, 5, rank, 2, seed=0) for rank in range(2)])
    groups = [group for share in shares for batch in share for group in batch]
    assert [len(share) for share in shares] == [2, 2] and len(groups) == 8 and len(set(groups)) == 7


def test_too_small_a_batch_for_two_images_is_refused_in_one_line(synthetic_set, tmp_path):
    with pytest.raises(SystemExit) as exit:
        trainer.main([str(flag) for flag in ['--image_dir', synthetic_set / 'train', '--caption_path',
                                             synthetic_set / 'annotations' / 'captions_train.json',
                                             '--vocab_path', synthetic_set / 'vocab.json', '--model_path', tmp_path,
                                             '--backbone', 'smallcnn', '--weights', 'none', '--image_size', '32',
                                             '--crop_size', '32', '--num_workers', '0', '--batch_size', '9',
                                             '--device', 'cpu',
                                             '--captions_per_image', '5']])
    assert str(exit.value.code).startswith('error: --batch_size 9 holds fewer than two images of '
                                           '--captions_per_image 5 captions')
    assert 'at least 10' in str(exit.value.code)


def test_a_resumed_grouped_run_ends_with_the_same_weights_and_keeps_its_grouping(synthetic_set, tmp_path):
    extra = ['--num_epochs', '2', '--captions_per_image', '3', '--save_step', '0', '--train_backbone',
             '--lr_schedule', 'cosine', '--tensorboard', 'none']
    whole = training.train(tiny_args(synthetic_set, tmp_path / 'whole', *extra, crop_size=28))  # random crops

    def interrupt(step):
        if step == 27:
            os.kill(os.getpid(), signal.SIGTERM)
    with pytest.raises(training.Interrupted, match='step 27'):
        training.train(tiny_args(synthetic_set, tmp_path / 'split', *extra, crop_size=28), on_step=interrupt)
    # 48 images with 5 captions: groups of 3 and 2, 96 of them, 5 a batch (16 // 3): 20 batches an epoch.
    assert read_checkpoint(str(tmp_path / 'split' / 'checkpoint.pt'))['batches_done'] == 7
    resumed = training.train(tiny_args(synthetic_set, tmp_path / 'split', '--resume', crop_size=None,
                                       tensorboard='none'))
    assert weights_equal(whole.encoder, resumed.encoder) and weights_equal(whole.decoder, resumed.decoder)
    assert [e['step'] for e in resumed.history['train']] == list(range(1, 41))
    assert read_checkpoint(str(tmp_path / 'split' / 'checkpoint.pt'))['args']['captions_per_image'] == 3


def test_grouping_from_the_feature_cache_trains(synthetic_set, pooled_cache, tmp_path):
    args = tiny_args(synthetic_set, tmp_path / 'models', '--features', pooled_cache, '--captions_per_image', '5',
                     '--num_epochs', '3', tensorboard='none')
    history = training.train(args).history['train']
    assert len(history) == 3 * 16
    assert np.mean([e['loss'] for e in history[-3:]]) < np.mean([e['loss'] for e in history[:3]])


def test_torchrun_trains_grouped_batches_in_lockstep(synthetic_set, tmp_path):
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'train.py',
               '--device', 'cpu',
               '--image_dir', str(synthetic_set / 'train'),
               '--caption_path', str(synthetic_set / 'annotations' / 'captions_train.json'),
               '--vocab_path', str(synthetic_set / 'vocab.json'), '--model_path', str(tmp_path),
               '--backbone', 'smallcnn', '--weights', 'none', '--image_size', '32', '--crop_size', '32',
               '--embed_size', '16', '--hidden_size', '24', '--batch_size', '16', '--num_workers', '0',
               '--num_epochs', '1', '--captions_per_image', '5', '--lr_schedule', 'cosine', '--tensorboard', 'none']
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count('images: decoded once into memory') == 1  # said by the main process only
    checkpoint = read_checkpoint(str(tmp_path / 'checkpoint.pt'))
    # 48 groups, 24 a process, 3 a batch: 8 steps; the cosine schedule ends at 0 only if both counted them so.
    assert (checkpoint['epoch'], checkpoint['step']) == (1, 8) and checkpoint['scheduler']['_last_lr'] == [0.0]


# --- bf16 where the CPU has it ---------------------------------------------------------------------

@pytest.mark.parametrize('onednn, avx512_bf16, amx, machine, native', [
    (True, True, False, 'x86_64', True),  # AVX512-BF16 (AMD Zen 4, Intel Cooper Lake)
    (True, False, True, 'x86_64', True),  # AMX (Intel Sapphire Rapids)
    (True, False, False, 'x86_64', False),  # AVX-512 without bf16 instructions: oneDNN would emulate it
    (False, False, False, 'x86_64', False),  # AVX2, as here
    (True, False, False, 'aarch64', True),  # Arm with the BF16 extension: oneDNN's check is enough
    (None, True, True, 'x86_64', False),  # a torch without the check
])
def test_demo_turns_bf16_on_only_where_the_cpu_has_it(monkeypatch, onednn, avx512_bf16, amx, machine, native):
    def check():
        if onednn is None:
            raise AttributeError("'_OpNamespace' 'mkldnn' object has no attribute '_is_mkldnn_bf16_supported'")
        return onednn
    monkeypatch.setattr(torch.ops.mkldnn, '_is_mkldnn_bf16_supported', check)
    monkeypatch.setattr(torch.cpu, '_is_avx512_bf16_supported', lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, '_is_amx_tile_supported', lambda: amx)
    monkeypatch.setattr(shapes_demo.platform, 'machine', lambda: machine)
    assert shapes_demo.cpu_runs_bf16_natively() is native
    amp, line = shapes_demo.choose_amp('auto')
    assert amp is native and line.startswith(f'bf16 autocast: {"on" if native else "off"}, since this CPU')
    assert shapes_demo.choose_amp('on') == (True, 'bf16 autocast: on (--amp on)')
    assert shapes_demo.choose_amp('off') == (False, 'bf16 autocast: off (--amp off)')


def test_this_avx2_cpu_keeps_bf16_off_and_the_demo_trains_from_the_cache(monkeypatch, tmp_path):
    if torch.backends.cpu.get_cpu_capability() in ('AVX2', 'DEFAULT', 'NO AVX'):
        assert not shapes_demo.cpu_runs_bf16_natively()
    monkeypatch.setattr(sys, 'argv', ['demo.py'])
    args = shapes_demo.parse_args()
    flags = vars(demo.train_args(args, 'vocab.json', amp=False))
    assert (flags['captions_per_image'], flags['cache_images'], flags['amp'], flags['batch_size']) == (1, 2, False, 64)
    assert demo.train_args(args, 'vocab.json', amp=True).amp and args.amp == 'auto'

    # The demo's training on a tiny set: each training image decoded once, into the cache, and training from it
    # moves every decoder weight away from where it started and lowers the held-out loss.
    root, models = tmp_path / 'data', tmp_path / 'models'
    monkeypatch.setattr(sys, 'argv', ['demo.py', '--root', str(root), '--model_path', str(models), '--num_train', '32',
                                      '--num_val', '8', '--max_epochs', '2', '--hidden_size', '16'])
    args = shapes_demo.parse_args()
    demo.make_set(args)
    flags = demo.train_args(args, str(root / 'vocab.json'), amp=False)
    flags.device = 'cpu'  # demo.py has no --device; train.py's own choice would be a GPU where there is one
    reads, initial, train_dir = [], {}, os.path.join(args.root, 'train')
    load_image = data_loader.load_image
    monkeypatch.setattr(data_loader, 'load_image', lambda path: reads.append(path) or load_image(path))
    build_optimizer = training.build_optimizer

    def snapshot(options, model, *rest):
        """After the data is ready and before the first step: the decoder as drawn, and no reads so far."""
        initial.update({key: value.clone() for key, value in model.decoder.state_dict().items()})
        assert len({path for path in reads if os.path.dirname(path) == train_dir}) == 32
        reads.clear()
        return build_optimizer(options, model, *rest)
    monkeypatch.setattr(training, 'build_optimizer', snapshot)
    training.train(flags)
    assert not [path for path in reads if os.path.dirname(path) == train_dir]
    trained = read_checkpoint(models / 'checkpoint.pt')['decoder']
    assert initial and list(trained) == list(initial)
    assert not unchanged_weights(trained, initial)
    with open(models / 'history.json') as f:
        val = [entry['loss'] for entry in json.load(f)['val']]
    assert len(val) == 2 and val[1] < val[0], val
