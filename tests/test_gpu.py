"""What a first run on a CUDA GPU needs, checked where there is none: the fake GPU of the test suite itself,
one-line errors for torchrun, the --amp dtype, the CUDA random state in checkpoints, DDP validation in every
process, CUDA-graph steps, page-locked batches, TF32 and the backbone left off the GPU with --features.

What only a real GPU can show is not here: that no CUDA graph is recorded twice, that the copies overlap
with computing, the speed of TF32, that NCCL runs. These tests fake the answers the code asks CUDA for
(monkeypatched torch.cuda functions) and check what the code does with them.
"""
import argparse
import datetime
import functools
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import DIY_LSTM
import extract_features
import runs
import train as trainer
import training
from conftest import FAKE_CUDA_DIR, REAL_GPU, REPO, tiny_args
from data_loader import CocoDataset, batches, collate_skipping, eval_transform
from decoding import load_captioner
from model import Captioner, CaptionerConfig, read_checkpoint
from vocabulary import SPECIAL_TOKENS, Vocabulary, load_vocab

# --- the fake GPU of the test suite -----------------------------------------------------------

def fake_gpu_env(**extra):
    return dict(os.environ, CAPTIONING_FAKE_CUDA='1', PYTHONPATH=str(FAKE_CUDA_DIR), **extra)


def test_the_fake_gpu_reaches_scripts_and_a_run_that_forgets_its_device_fails(synthetic_set, tmp_path):
    """CAPTIONING_FAKE_CUDA=1 (as .ci/run runs the suite) makes every Python the tests start see one GPU,
    as a GPU machine would; CUDA_VISIBLE_DEVICES='' hides it, as there. A run that does not pin its device
    then picks CUDA and fails at its first CUDA call, where a real GPU machine would have used the GPU."""
    seen = 'import runs; print(runs.pick_device(), runs.devices_here())'
    result = subprocess.run([sys.executable, '-c', seen], cwd=REPO, env=fake_gpu_env(), capture_output=True,
                            text=True, timeout=120)
    assert result.stdout.split(None, 1) == ['cuda', "['cuda:0', 'cpu']\n"], result.stderr[-2000:]
    result = subprocess.run([sys.executable, '-c', seen], cwd=REPO, env=fake_gpu_env(CUDA_VISIBLE_DEVICES=''),
                            capture_output=True, text=True, timeout=120)
    assert result.stdout.split(None, 1) == ['cpu', "['cpu']\n"], result.stderr[-2000:]
    if REAL_GPU:
        return  # here a run that picks CUDA trains on it
    argv = [str(a) for a in ['train.py', '--image_dir', synthetic_set / 'train', '--caption_path',
                             synthetic_set / 'annotations' / 'captions_train.json', '--vocab_path',
                             synthetic_set / 'vocab.json', '--model_path', tmp_path, '--backbone', 'smallcnn',
                             '--weights', 'none', '--image_size', '32', '--crop_size', '32', '--num_workers', '0',
                             '--embed_size', '16', '--hidden_size', '24', '--num_epochs', '1']]
    result = subprocess.run([sys.executable, *argv], cwd=REPO, env=fake_gpu_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0 and 'NVIDIA driver' in result.stderr, result.stderr[-2000:]
    result = subprocess.run([sys.executable, *argv, '--device', 'cpu'], cwd=REPO, env=fake_gpu_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


# --- torchrun on a machine with too few GPUs, or no NCCL --------------------------------------

@pytest.fixture
def one_gpu(monkeypatch):
    """A machine with one CUDA GPU, as far as the code asks; set_device and init_process_group are recorded,
    not run."""
    calls = []
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    monkeypatch.setattr(torch.cuda, 'set_device', lambda device: calls.append(('set_device', device)))
    monkeypatch.setattr(dist, 'init_process_group', lambda backend, **kwargs: calls.append(('init', backend)))
    monkeypatch.setattr(dist, 'get_rank', lambda: int(os.environ['RANK']))
    return calls


def torchrun_process(monkeypatch, local_rank, world_size=2):
    monkeypatch.setenv('WORLD_SIZE', str(world_size))
    monkeypatch.setenv('RANK', str(local_rank))
    monkeypatch.setenv('LOCAL_RANK', str(local_rank))


def test_torchrun_with_more_processes_than_gpus_is_one_line(one_gpu, monkeypatch, synthetic_set, tmp_path):
    torchrun_process(monkeypatch, 0)
    assert runs.setup_distributed() == (0, 2, torch.device('cuda', 0))
    assert one_gpu == [('set_device', 0), ('init', 'nccl')]
    one_gpu.clear()
    torchrun_process(monkeypatch, 1)
    argv = ['--image_dir', synthetic_set / 'train', '--caption_path', synthetic_set / 'annotations' /
            'captions_train.json', '--vocab_path', synthetic_set / 'vocab.json', '--model_path', tmp_path]
    with pytest.raises(SystemExit) as caught:
        trainer.main([str(a) for a in argv])
    assert caught.value.code == ('error: the process of LOCAL_RANK 1 has no GPU: this machine has 1 CUDA GPU, one '
                                 'for each process; start torchrun with --nproc_per_node=1 at most, or pass '
                                 '--device cpu')
    assert one_gpu == []  # refused before touching the GPU or waiting for the other processes
    assert runs.setup_distributed('cpu') == (1, 2, torch.device('cpu'))  # CPU processes need no GPU
    assert one_gpu == [('init', 'gloo')]


def test_torchrun_without_nccl_or_with_one_named_gpu_is_one_line(one_gpu, monkeypatch):
    torchrun_process(monkeypatch, 0)
    monkeypatch.setattr(dist, 'is_nccl_available', lambda: False)
    with pytest.raises(ValueError, match='^this PyTorch has no NCCL, which training on several GPUs needs: '
                                         'install .*, or pass --device cpu to train in CPU processes$'):
        runs.setup_distributed('cuda')
    with pytest.raises(ValueError, match=r'^--device cuda:0: under torchrun each process takes the GPU of its '
                                         'LOCAL_RANK; pass --device cuda, --device cpu, or none$'):
        runs.setup_distributed('cuda:0')
    assert one_gpu == []
    torchrun_process(monkeypatch, 0, world_size=1)
    with pytest.raises(ValueError, match='there is no CUDA device 1 here'):  # one process: --device must exist
        runs.setup_distributed('cuda:1')


# --- mixed precision --------------------------------------------------------------------------

@pytest.mark.parametrize('capability, dtype', [((7, 0), torch.float16), ((7, 5), torch.float16),
                                               ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_amp_takes_bf16_only_where_the_gpu_in_use_has_it(monkeypatch, capability, dtype):
    asked = []
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: asked.append(device) or capability)
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *args, **kwargs: True)  # emulation counts there
    assert runs.amp_dtype(torch.device('cuda', 1)) == dtype
    assert asked == [torch.device('cuda', 1)]  # the device in use, not the current one
    assert runs.amp_dtype(torch.device('cpu')) == torch.bfloat16
    monkeypatch.setattr(torch.version, 'hip', '6.2')
    assert runs.amp_dtype(torch.device('cuda', 1)) == torch.bfloat16  # ROCm computes bfloat16


def test_resume_keeps_amp_and_says_which_autocast(synthetic_set, tmp_path, capsys):
    training.train(tiny_args(synthetic_set, tmp_path, '--amp', num_epochs=1, tensorboard='none'))
    assert capsys.readouterr().out.count('--amp: bfloat16 autocast on cpu') == 1
    args = tiny_args(synthetic_set, tmp_path, '--resume', num_epochs=2, tensorboard='none')  # no --amp
    args = training.train(args).settings
    assert args.amp and capsys.readouterr().out.count('--amp: bfloat16 autocast on cpu') == 1
    assert read_checkpoint(str(tmp_path / 'checkpoint.pt'))['args']['amp']
    args = tiny_args(synthetic_set, tmp_path, '--resume', '--no_amp', num_epochs=3, tensorboard='none')
    args = training.train(args).settings
    assert not args.amp and '--amp:' not in capsys.readouterr().out
    assert not read_checkpoint(str(tmp_path / 'checkpoint.pt'))['args']['amp']


# --- the CUDA random state in checkpoints -----------------------------------------------------

def small_run(device, scaler_enabled=False):
    """What a training run of two linear layers on a device checkpoints (its RunState), enough for
    to_checkpoint and restore."""
    args = argparse.Namespace(model_path='unused', amp=scaler_enabled)
    encoder, decoder = nn.Linear(2, 3), nn.Linear(3, 4)
    params = [*encoder.parameters(), *decoder.parameters()]
    optimizer = torch.optim.Adam(params)
    optimization = runs.Optimization(params, optimizer,
                                     scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
                                     scaler=torch.amp.GradScaler('cpu', enabled=scaler_enabled))
    return runs.RunState(args=args, processes=runs.Processes(0, 1, device), vocab=Vocabulary.from_words(SPECIAL_TOKENS),
                         config=CaptionerConfig(vocab_size=4), encoder=encoder, decoder=decoder,
                         optimization=optimization, progress=runs.Progress(history={}))


def restore(run, resumed):
    """Load the Resumed checkpoint into the run's modules, optimizer, schedule and scaler, as start_run does."""
    return resumed.restore(run.encoder, run.decoder, run.optimization, run.processes.device)


def test_checkpoints_keep_the_cuda_random_state_and_old_ones_still_resume(monkeypatch, tmp_path):
    """Dropout and SCST's sampling draw from the GPU's generator: --resume on a GPU must restore it."""
    generator = {'cuda:1': torch.arange(16, dtype=torch.uint8)}  # the GPU's random state, as a ByteTensor
    calls = []

    def get_rng_state(device='cuda'):
        calls.append(('get', str(device)))
        return generator[str(device)].clone()

    def set_rng_state(state, device='cuda'):
        calls.append(('set', str(device)))
        generator[str(device)] = state.clone()

    monkeypatch.setattr(torch.cuda, 'get_rng_state', get_rng_state)
    monkeypatch.setattr(torch.cuda, 'set_rng_state', set_rng_state)
    gpu = torch.device('cuda', 1)
    runs.save_run(small_run(gpu).to_checkpoint(), str(tmp_path))
    assert calls == [('get', 'cuda:1')]  # the GPU in use only, not every GPU of the machine
    path = str(tmp_path / 'checkpoint.pt')
    checkpoint = runs.read_run_checkpoint(path)
    assert torch.equal(checkpoint['cuda_rng'][0], torch.arange(16, dtype=torch.uint8))

    generator['cuda:1'] = torch.zeros(16, dtype=torch.uint8)  # a new process, seeded afresh
    restore(small_run(gpu), runs.Resumed(path, checkpoint))
    assert calls[1:] == [('set', 'cuda:1')] and torch.equal(generator['cuda:1'], torch.arange(16, dtype=torch.uint8))

    # A checkpoint from before the CUDA state was kept, or from a CPU run, resumes and leaves the GPU's
    # generator as the seed set it; a CPU run writes None.
    del checkpoint['cuda_rng']
    restore(small_run(gpu), runs.Resumed(path, checkpoint))
    assert small_run(torch.device('cpu')).to_checkpoint()['cuda_rng'] is None
    checkpoint['cuda_rng'] = None
    restore(small_run(gpu), runs.Resumed(path, checkpoint))
    assert len(calls) == 2

    # --amp from bfloat16 (a disabled scaler, an empty state) on to float16 on an older GPU: a fresh scaler.
    with_scaler = small_run(gpu, scaler_enabled=True)
    restore(with_scaler, runs.Resumed(path, checkpoint))
    scaler = with_scaler.optimization.scaler
    assert scaler.is_enabled() and scaler.get_scale() == 2.0 ** 16


# --- DDP validation ---------------------------------------------------------------------------

def free_port():
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def validating_worker(rank, world_size, port, data, model_path, out, delay):
    """One of two DDP processes that train two epochs with a validation that takes `delay` seconds per batch
    of each process, under a collective timeout shorter than a whole validation in one process."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group = functools.partial(dist.init_process_group, timeout=datetime.timedelta(seconds=10))
    real_loss, real_all_reduce, all_reduces = training.caption_loss, dist.all_reduce, []

    def slow_validation(*args):
        if not torch.is_grad_enabled():
            time.sleep(delay)
        return real_loss(*args)

    def counted(*args, **kwargs):
        all_reduces.append(1)
        return real_all_reduce(*args, **kwargs)

    training.caption_loss, dist.all_reduce = slow_validation, counted
    # A BatchNorm that follows each batch closely: each process's own statistics differ from the main one's.
    history = training.train(tiny_args(data, model_path, validate=True, num_epochs=2, tensorboard='none',
                                       bn_momentum=0.9)).history
    torch.save({'val': history['val'], 'all_reduces': len(all_reduces)}, out / f'rank{rank}.pt')


def test_every_ddp_process_validates_its_share_and_none_waits_for_a_whole_validation(synthetic_sets, tmp_path):
    """240 held-out captions, 15 batches, 1.5 s each in one process: 22 s, past the 10 s the other process
    may wait in a collective. Shared, each process validates 8 batches at the same time. The loss is the
    one a single process computes for the checkpoint's model over the whole set."""
    data = synthetic_sets(48, 48)
    processes = mp.spawn(validating_worker, args=(2, free_port(), data, tmp_path / 'models', tmp_path, 1.5),
                         nprocs=2, join=False)
    deadline = time.monotonic() + 300
    while not processes.join(timeout=1):
        if time.monotonic() > deadline:
            for process in processes.processes:
                process.kill()
            pytest.fail('the two processes did not finish in 300 s')
    ranks = [torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in range(2)]
    assert ranks[0]['val'] == ranks[1]['val'] and len(ranks[0]['val']) == 2
    # Two all-reduces per step (8 steps an epoch), not three: whether to skip the batch, then whether its loss
    # was NaN or inf together with whether to stop; and one for each validation.
    assert ranks[0]['all_reduces'] == ranks[1]['all_reduces'] == 2 * (8 * 2 + 1)

    encoder, decoder, vocab, config = load_captioner(str(tmp_path / 'models' / 'checkpoint.pt'))
    val_set = CocoDataset(data / 'val', data / 'annotations' / 'captions_val.json', vocab,
                          eval_transform(config.image_size, config.crop_size), split='val')
    loader = batches(val_set, 16, False, 0, collate=collate_skipping)
    whole = training.validation_loss(Captioner(encoder, decoder), loader, torch.device('cpu'))
    assert ranks[0]['val'][-1]['loss'] == pytest.approx(whole, rel=1e-6)


# --- CUDA graphs, page-locked batches, TF32, the backbone with --features ---------------------

def test_with_reduce_overhead_every_forward_begins_a_cuda_graph_step(synthetic_set, tmp_path, monkeypatch):
    """Training, validation and the logged captions each mark a new CUDA-graph step before a forward, so that
    graphs recorded in training replay in validation. (Compiling is left out: it changes nothing here.)"""
    events = []
    real_loss = training.caption_loss

    def loss(*args):
        events.append('train' if torch.is_grad_enabled() else 'validate')
        return real_loss(*args)

    monkeypatch.setattr(DIY_LSTM.LSTM, 'compile_loop', lambda self, **kwargs: None)
    monkeypatch.setattr(torch.compiler, 'cudagraph_mark_step_begin', lambda: events.append('mark'))
    monkeypatch.setattr(training, 'caption_loss', loss)
    training.train(tiny_args(synthetic_set, tmp_path, '--compile', 'reduce-overhead', validate=True, num_epochs=1))
    assert events.count('train') == 15 and events.count('validate') == 4
    for i, event in enumerate(events):
        if event != 'mark':
            assert events[i - 1] == 'mark', events[max(i - 3, 0):i + 1]
    assert events.count('mark') == 15 + 4 + 4  # and one before each of the 4 captions logged to TensorBoard


@pytest.mark.parametrize('device, pinned', [('cuda', True), ('cpu', False)])
def test_batches_are_page_locked_for_a_gpu_and_each_process_validates_its_share(synthetic_set, tmp_path, device,
                                                                                pinned):
    args = tiny_args(synthetic_set, tmp_path, validate=True)
    vocab = load_vocab(args.vocab_path)
    data = training.build_loaders(args, CaptionerConfig.from_args(args, len(vocab)), vocab,
                                  runs.Processes(rank=1, world_size=2, device=torch.device(device)))
    assert data.loader.pin_memory == data.val_loader.pin_memory == pinned
    assert list(data.val_loader.sampler) == list(range(1, 60, 2))  # 12 images, 60 captions: every second one


def test_tf32_and_cudnn_search_on_a_gpu_only():
    flags = [(torch.backends.cuda.matmul, 'allow_tf32'), (torch.backends.cudnn, 'allow_tf32'),
             (torch.backends.cudnn, 'benchmark')]
    before = [getattr(module, name) for module, name in flags]
    try:
        runs.configure_cuda(torch.device('cpu'))
        assert [getattr(module, name) for module, name in flags] == before
        runs.configure_cuda(torch.device('cuda', 0))
        assert [getattr(module, name) for module, name in flags] == [True, True, True]
        runs.configure_cuda(torch.device('cuda', 0), tf32=not trainer.parse_args(['--no_tf32']).no_tf32)
        assert [getattr(module, name) for module, name in flags] == [False, False, True]
    finally:
        for (module, name), value in zip(flags, before):
            setattr(module, name, value)


def test_with_features_the_backbone_moves_to_the_device_only_to_validate(synthetic_set, tmp_path, monkeypatch):
    """Training from a feature cache never runs the backbone: it stays where it was built (the CPU) and comes
    to the device only for validation and the TensorBoard captions of the validation images, which work now."""
    cache = tmp_path / 'cache'
    extract_features.main(['--image_dir', str(synthetic_set / 'train'), '--caption_path',
                           str(synthetic_set / 'annotations' / 'captions_train.json'), '--output_dir', str(cache),
                           '--backbone', 'smallcnn', '--weights', 'none', '--image_size', '32', '--crop_size', '32',
                           '--num_workers', '0', '--device', 'cpu'])
    moves, real_to = [], nn.Module.to

    def to(module, *args, **kwargs):
        moves.append((type(module).__name__, str(args[0]) if args else None))
        return real_to(module, *args, **kwargs)

    monkeypatch.setattr(nn.Module, 'to', to)
    history = training.train(tiny_args(synthetic_set, tmp_path / 'models', '--features', cache,
                                       validate=True, num_epochs=2)).history
    assert len(history['val']) == 2
    # The head and the decoder once; the backbone (a Sequential) there and back around each validation and
    # each table of captions.
    assert moves == [('Linear', 'cpu'), ('BatchNorm1d', 'cpu'), ('DecoderRNN', 'cpu')] + [('Sequential', 'cpu')] * 8
