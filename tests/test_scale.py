"""Training at scale: the feature cache, mixed precision, DistributedDataParallel, resumable runs."""
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import training
from conftest import REPO, assert_same_weights, run, tiny_args
from data_loader import FeatureDataset, collate_fn, eval_transform, load_image, open_cache
from decoding import load_captioner
from DIY_LSTM import LSTM
from model import read_checkpoint
from vocabulary import load_vocab


def extract(synthetic_set, output):
    result = run('extract_features.py', '--image_dir', synthetic_set / 'train',
                 '--caption_path', synthetic_set / 'annotations' / 'captions_train.json', '--output', output,
                 '--backbone', 'smallcnn', '--weights', 'none', '--image_size', '32', '--crop_size', '32',
                 '--batch_size', '10', '--num_workers', '0')
    assert result.returncode == 0, result.stderr[-2000:]
    return result


@pytest.fixture(scope='module')
def cache(pooled_cache):
    return pooled_cache


def test_feature_cache_holds_centre_and_mirror_features(cache):
    features, done, meta = open_cache(str(cache))
    assert features.dtype == np.float16 and features.shape == (48, 2, 128)
    assert done.all() and meta['image_ids'] == list(range(1, 49)) and meta['backbone'] == 'smallcnn'
    assert not np.allclose(features[:, 0], features[:, 1])  # the mirror image is a different view
    assert np.abs(features).sum(axis=2).min() > 0


def test_interrupted_extraction_resumes(cache, synthetic_set, tmp_path):
    copy = tmp_path / 'features'
    copy.mkdir()
    for name in os.listdir(cache):
        (copy / name).write_bytes((cache / name).read_bytes())
    done = np.load(copy / 'done.npy')
    done[20:] = False  # as if killed after two batches
    np.save(copy / 'done.npy', done)
    features = np.load(copy / 'features.npy', mmap_mode='r+')
    features[20:] = 0
    features.flush()
    del features
    result = extract(synthetic_set, copy)
    assert '48 of 48 images cached' in result.stdout
    np.testing.assert_array_equal(np.load(copy / 'features.npy'), np.load(cache / 'features.npy'))


def test_unreadable_images_are_skipped_and_counted_or_stop_with_strict(synthetic_set, tmp_path):
    images = tmp_path / 'train'
    images.mkdir()
    for path in (synthetic_set / 'train').iterdir():
        (images / path.name).write_bytes(path.read_bytes())
    broken = images / '000000000007.png'
    broken.write_text('not a png')
    command = ['extract_features.py', '--image_dir', str(images),
               '--caption_path', str(synthetic_set / 'annotations' / 'captions_train.json'), '--backbone', 'smallcnn',
               '--weights', 'none', '--image_size', '32', '--crop_size', '32', '--batch_size', '10',  # 2 workers
               '--device', 'cpu']
    result = run(*command, '--output_dir', tmp_path / 'strict', '--strict')
    errors = [line for line in result.stderr.replace('\r', '\n').splitlines() if line.startswith('error')]
    assert result.returncode == 1 and 'Traceback' not in result.stderr and 'Caught' not in result.stderr
    assert len(errors) == 1 and errors[0].startswith(f'error: {broken}: cannot read image')

    result = run(*command, '--output_dir', tmp_path / 'features')
    assert result.returncode == 0, result.stderr[-2000:]
    assert '47 of 48 images cached' in result.stdout and 'skipped 1 images that could not be read' in result.stdout
    assert f'skipped: {broken}: cannot read image' in result.stderr
    _, done, meta = open_cache(str(tmp_path / 'features'))
    assert list(meta['unreadable']) == [7] and not done[6] and done.sum() == 47
    vocab = load_vocab(str(synthetic_set / 'vocab.json'))
    captions = FeatureDataset(str(tmp_path / 'features'), str(synthetic_set / 'annotations' / 'captions_train.json'),
                              vocab)
    assert len(captions) == 240 - 5  # the unreadable image's five captions are left out

    broken.write_bytes((synthetic_set / 'train' / broken.name).read_bytes())  # repaired: a second run reads it
    result = run(*command, '--output_dir', tmp_path / 'features')
    assert result.returncode == 0 and '48 of 48 images cached' in result.stdout
    assert open_cache(str(tmp_path / 'features'))[2]['unreadable'] == {}


def test_a_failed_write_never_leaves_half_a_done_file(synthetic_set, tmp_path, monkeypatch):
    import extract_features
    real_save, calls = np.save, []

    def disk_full_on_third_save(file, array, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            file.write(b'\x93NUMPY partial')
            raise OSError(28, 'No space left on device')
        return real_save(file, array, *args, **kwargs)

    argv = ['--image_dir', str(synthetic_set / 'train'),
            '--caption_path', str(synthetic_set / 'annotations' / 'captions_train.json'),
            '--output_dir', str(tmp_path / 'features'), '--backbone', 'smallcnn', '--weights', 'none',
            '--image_size', '32', '--crop_size', '32', '--batch_size', '10', '--num_workers', '0', '--device', 'cpu']
    monkeypatch.setattr(np, 'save', disk_full_on_third_save)
    with pytest.raises(SystemExit) as caught:  # one line naming the file, no traceback
        extract_features.main(argv)
    assert caught.value.code.startswith(f'error: could not write {tmp_path / "features" / "done.npy"} '
                                        '(No space left on device)')
    monkeypatch.setattr(np, 'save', real_save)
    _, done, meta = open_cache(str(tmp_path / 'features'))  # the last complete version of each file
    assert done.sum() == 10 and meta['image_ids'] == list(range(1, 49))
    assert not [name for name in os.listdir(tmp_path / 'features') if '.tmp' in name]
    extract_features.main(argv)
    assert open_cache(str(tmp_path / 'features'))[1].all()


def test_cached_features_give_the_same_loss_as_images(cache, synthetic_set, tmp_path):
    """Without augmentation, training from the cache sees exactly what on-the-fly training sees."""
    args = tiny_args(synthetic_set, tmp_path, '--features', str(cache))
    vocab = load_vocab(args.vocab_path)
    encoder, decoder, _ = training.build_model(args, len(vocab))
    cached = FeatureDataset(str(cache), args.caption_path, vocab, mirror=False)
    transform = eval_transform(32, 32)
    items = [cached[i] for i in range(16)]
    image_items = []
    for i in range(16):
        image_id = cached.coco.anns[cached.ids[i]]['image_id']
        image = load_image(str(synthetic_set / 'train' / cached.coco.imgs[image_id]['file_name']))
        image_items.append((transform(image), items[i][1]))
    features, captions, lengths = collate_fn(items)
    images, captions2, lengths2 = collate_fn(image_items)
    assert torch.equal(captions, captions2) and lengths == lengths2
    encoder.eval(), decoder.eval()
    from_cache, _ = training.caption_loss(training.Captioner(encoder, decoder, from_features=True), features, captions,
                                          lengths)
    from_images, _ = training.caption_loss(training.Captioner(encoder, decoder), images, captions, lengths)
    assert from_cache.item() == pytest.approx(from_images.item(), rel=2e-3)  # float16 rounding of the cache
    encoder.train(), decoder.train()
    torch.manual_seed(0)
    a, _ = training.caption_loss(training.Captioner(encoder, decoder, from_features=True), features, captions, lengths)
    torch.manual_seed(0)
    b, _ = training.caption_loss(training.Captioner(encoder, decoder), images, captions, lengths)
    assert a.item() == pytest.approx(b.item(), rel=2e-3)


def test_training_from_the_cache_keeps_the_whole_encoder(cache, synthetic_set, tmp_path):
    args = tiny_args(synthetic_set, tmp_path, '--features', str(cache), '--num_epochs', '3')
    history = training.train(args).history
    losses = [e['loss'] for e in history['train']]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    checkpoint = read_checkpoint(str(tmp_path / 'checkpoint.pt'))
    backbone = read_checkpoint(str(cache / 'backbone.pt'))
    assert_same_weights(backbone, {key.removeprefix('resnet.'): value for key, value in checkpoint['encoder'].items()
                                   if key.startswith('resnet.')})
    encoder, decoder, vocab, config = load_captioner(str(tmp_path / 'checkpoint.pt'))
    image = load_image(str(synthetic_set / 'train' / '000000000001.png'))
    features = encoder(eval_transform(config.image_size, config.crop_size)(image).unsqueeze(0))
    assert decoder.sample(features).shape[0] == 1


@pytest.mark.parametrize('loop', ['plain', 'compiled'])
def test_diy_lstm_under_cpu_bf16_autocast(loop):
    torch.manual_seed(0)
    reference, diy = nn.LSTM(8, 16, batch_first=True), LSTM(8, 16, batch_first=True)
    diy.load_state_dict(reference.state_dict())
    if loop == 'compiled':
        diy.compile_loop(steps_per_call=3)
    x = torch.randn(4, 6, 8)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out, (h, c) = diy(x)
    assert out.dtype == torch.bfloat16
    expected = reference(x)[0]
    torch.testing.assert_close(out.float(), expected, atol=3e-2, rtol=0)
    out.float().pow(2).sum().backward()
    assert diy.weight_hh_l0.grad.dtype == torch.float32 and diy.weight_hh_l0.grad.abs().sum() > 0


def test_compiled_lstm_trains_like_the_plain_loop(synthetic_set, tmp_path, compiled_for_real):
    plain = training.train(tiny_args(synthetic_set, tmp_path / 'plain', '--num_epochs', '2')).history['train']
    compiled = training.train(tiny_args(synthetic_set, tmp_path / 'compiled', '--num_epochs', '2',
                                        '--compile')).history['train']
    assert len(plain) == len(compiled) > 10
    for a, b in zip(plain, compiled):
        assert b['loss'] == pytest.approx(a['loss'], rel=1e-4)
    assert np.mean([e['loss'] for e in compiled[-3:]]) < np.mean([e['loss'] for e in compiled[:3]])


def test_amp_training_on_cpu_lowers_the_loss(synthetic_set, tmp_path):
    history = training.train(tiny_args(synthetic_set, tmp_path, '--amp', '--num_epochs', '4',
                                       '--train_backbone')).history
    losses = [e['loss'] for e in history['train']]
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def ddp_worker(rank, world_size, port, synthetic_set, model_path, out, nan_on_rank1_at=None):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    extra = []
    if nan_on_rank1_at is not None:
        extra = ['--skip_nonfinite']
        real_loss, calls = training.caption_loss, []

        def poisoned(*args):
            loss, n = real_loss(*args)
            calls.append(1)
            return (loss * float('nan') if rank == 1 and len(calls) == nan_on_rank1_at else loss), n
        training.caption_loss = poisoned
    # Different seeds on purpose: DDP must still start both ranks from rank 0's weights.
    result = training.train(tiny_args(synthetic_set, model_path, '--num_epochs', '3',
                                      '--seed', str(rank), '--train_backbone', *extra))
    encoder, decoder, history = result.encoder, result.decoder, result.history
    # Parameters, not BatchNorm running statistics: each rank updates those from its own last batch.
    torch.save({'decoder': dict(decoder.named_parameters()), 'encoder': dict(encoder.named_parameters()),
                'losses': [e['loss'] for e in history['train']]}, out / f'rank{rank}.pt')


def run_two_ranks(*args, timeout=240):
    """Run ddp_worker in 2 processes; a hang (one rank waiting for the other forever) fails the test."""
    processes = mp.spawn(ddp_worker, args=(2, free_port(), *args), nprocs=2, join=False)
    deadline = time.monotonic() + timeout
    while not processes.join(timeout=1):
        if time.monotonic() > deadline:
            for process in processes.processes:
                process.kill()
            pytest.fail(f'the two ranks did not finish in {timeout} s')


def test_two_cpu_processes_train_in_lockstep(synthetic_set, tmp_path):
    run_two_ranks(synthetic_set, tmp_path / 'models', tmp_path)
    ranks = [torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in range(2)]
    for part in ('decoder', 'encoder'):
        assert len(ranks[0][part]) > 5
        assert_same_weights(ranks[0][part], ranks[1][part])
    losses = ranks[0]['losses']
    assert len(losses) == 3 * 8  # 240 captions, 120 per rank, batches of 16: 8 steps per epoch
    assert np.mean(losses[-2:]) < np.mean(losses[:2])
    assert (tmp_path / 'models' / 'checkpoint.pt').exists()  # written by rank 0 only


def test_a_nan_loss_on_one_rank_is_skipped_by_both(synthetic_set, tmp_path):
    run_two_ranks(synthetic_set, tmp_path / 'models', tmp_path, 3)
    ranks = [torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in range(2)]
    assert_same_weights(ranks[0]['decoder'], ranks[1]['decoder'])
    assert all(torch.isfinite(value).all() for value in ranks[0]['decoder'].values())
    assert len(ranks[0]['losses']) == len(ranks[1]['losses']) == 3 * 8 - 1


def test_interrupted_run_resumes_to_the_same_weights(synthetic_sets, tmp_path):
    data = synthetic_sets(num_train=24, num_val=4, seed=7)  # 120 captions in batches of 16: 8 steps an epoch
    extra = ['--num_epochs', '3', '--lr_schedule', 'cosine', '--grad_clip', '1', '--train_backbone', '--save_step', '0']
    result = training.train(tiny_args(data, tmp_path / 'whole', *extra))
    encoder, decoder = result.encoder, result.decoder

    def interrupt(step):
        if step == 12:  # halfway through the second epoch
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(training.Interrupted, match='step 12'):
        training.train(tiny_args(data, tmp_path / 'split', *extra), on_step=interrupt)
    assert read_checkpoint(str(tmp_path / 'split' / 'checkpoint.pt'))['step'] == 12
    result = training.train(tiny_args(data, tmp_path / 'split', *extra, '--resume'))
    encoder2, decoder2, history = result.encoder, result.decoder, result.history
    assert_same_weights(encoder, encoder2)
    assert_same_weights(decoder, decoder2)
    assert [e['step'] for e in history['train']] == list(range(1, 25))


def test_sigterm_saves_a_checkpoint_and_resume_finishes(synthetic_sets, tmp_path):
    synthetic_set = synthetic_sets(num_train=24, num_val=4, seed=7)  # 120 captions: 30 steps an epoch
    command = [sys.executable, 'train.py', '--image_dir', str(synthetic_set / 'train'),
               '--caption_path', str(synthetic_set / 'annotations' / 'captions_train.json'),
               '--vocab_path', str(synthetic_set / 'vocab.json'), '--model_path', str(tmp_path),
               '--backbone', 'smallcnn', '--weights', 'none', '--image_size', '32', '--crop_size', '32',
               '--embed_size', '16', '--hidden_size', '24', '--batch_size', '4', '--num_workers', '0',
               '--device', 'cpu', '--num_epochs', '50', '--save_step', '0']
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / 'history.json').exists() and time.time() < deadline:  # the first epoch has ended
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert 'checkpoint saved' in stderr and 'Traceback' not in stderr
    checkpoint = read_checkpoint(str(tmp_path / 'checkpoint.pt'))
    assert checkpoint['step'] > 30 and checkpoint['epoch'] < 50
    result = subprocess.run(command[:-4] + ['--num_epochs', str(checkpoint['epoch'] + 1), '--resume'], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f'step {checkpoint["step"]}' in result.stdout
    assert read_checkpoint(str(tmp_path / 'checkpoint.pt'))['epoch'] == checkpoint['epoch'] + 1


def test_torchrun_launches_distributed_training(synthetic_set, tmp_path):
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'train.py',
               '--image_dir', str(synthetic_set / 'train'),
               '--caption_path', str(synthetic_set / 'annotations' / 'captions_train.json'),
               '--vocab_path', str(synthetic_set / 'vocab.json'), '--model_path', str(tmp_path),
               '--backbone', 'smallcnn',
               '--weights', 'none', '--image_size', '32', '--crop_size', '32', '--embed_size', '16',
               '--hidden_size', '24', '--batch_size', '16', '--num_workers', '0', '--num_epochs', '1',
               '--device', 'cpu']
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = read_checkpoint(str(tmp_path / 'checkpoint.pt'))
    assert checkpoint['step'] == 8  # 240 captions split over 2 ranks, batches of 16
