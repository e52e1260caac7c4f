"""What a first run on a CUDA GPU needs, checked where there is none: the fake GPU of the test suite itself,
one-line errors for a GPU that cannot run and for torchrun, the device line every script prints first, the
--amp dtype, --no_tf32 kept by --resume, the CUDA random state in checkpoints, each process's own random
numbers, torchrun with one process in DDP, DDP validation in every process, CUDA-graph steps, --compile past
its recompile limit, page-locked batches and their copies (also in extract_features.py and scst.py), TF32
and the backbone left off the GPU with --features.

What only a real GPU can show is not here: that no CUDA graph is recorded twice, that the copies overlap
with computing, the speed of TF32, that NCCL runs (bench/gpu_check.sh runs those). These tests fake the
answers the code asks CUDA for (monkeypatched torch.cuda functions) and check what the code does with them.
"""
import argparse
import datetime
import functools
import json
import os
import shutil
import subprocess
import sys
import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import DIY_LSTM
import extract_features
import runs
import sample
import scst
import train as trainer
import training
from conftest import FAKE_CUDA_DIR, REAL_GPU, REPO, tiny_args, tiny_argv
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
    then picks CUDA, which cannot start without a driver: one line that names the driver and PyTorch's CUDA,
    where a real GPU machine would have used the GPU."""
    seen = 'import runs; print(runs.devices_here()); print(runs.pick_device())'
    result = subprocess.run([sys.executable, '-c', seen], cwd=REPO, env=fake_gpu_env(), capture_output=True,
                            text=True, timeout=120)
    assert result.stdout.splitlines()[0] == "['cuda:0', 'cpu']", result.stderr[-2000:]
    assert result.stdout.splitlines()[1:] == (['cuda'] if REAL_GPU else []), result.stderr[-2000:]
    # Without a real GPU, picking the fake one fails with the CUDA error (a ValueError in this bare probe).
    assert result.returncode == (0 if REAL_GPU else 1), result.stderr[-2000:]
    assert REAL_GPU or 'ValueError: CUDA, picked as the best device here, cannot run' in result.stderr
    result = subprocess.run([sys.executable, '-c', seen], cwd=REPO, env=fake_gpu_env(CUDA_VISIBLE_DEVICES=''),
                            capture_output=True, text=True, timeout=120)
    assert result.stdout == "['cpu']\ncpu\n" and result.returncode == 0, result.stderr[-2000:]
    if REAL_GPU:
        return  # here a run that picks CUDA trains on it
    argv = [str(a) for a in ['train.py', '--image_dir', synthetic_set / 'train', '--caption_path',
                             synthetic_set / 'annotations' / 'captions_train.json', '--vocab_path',
                             synthetic_set / 'vocab.json', '--model_path', tmp_path, '--backbone', 'smallcnn',
                             '--weights', 'none', '--image_size', '32', '--crop_size', '32', '--num_workers', '0',
                             '--embed_size', '16', '--hidden_size', '24', '--num_epochs', '1']]
    result = subprocess.run([sys.executable, *argv], cwd=REPO, env=fake_gpu_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr[-2000:]
    # What CUDA says without a driver; the line's other parts are test_a_gpu_that_cannot_run_is_one_line's.
    reason = 'Found no NVIDIA driver on your system' if torch.version.cuda else 'Torch not compiled with CUDA enabled'
    assert result.stderr.splitlines() == [f'error: {runs.cuda_error("CUDA, picked as the best device here,", reason)}']
    result = subprocess.run([sys.executable, *argv, '--device', 'cpu'], cwd=REPO, env=fake_gpu_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.fixture(scope='module')
def cache(synthetic_set, tmp_path_factory):
    """A feature cache of the usual synthetic set, made once for this file's tests (read only)."""
    folder = tmp_path_factory.mktemp('gpu') / 'cache'
    extract_features.main(['--image_dir', str(synthetic_set / 'train'), '--caption_path',
                           str(synthetic_set / 'annotations' / 'captions_train.json'), '--output_dir', str(folder),
                           '--backbone', 'smallcnn', '--weights', 'none', '--image_size', '32', '--crop_size', '32',
                           '--num_workers', '0', '--device', 'cpu'])
    return folder


@pytest.fixture(scope='module')
def checkpoint(synthetic_set, cache, tmp_path_factory):
    """A model trained for one epoch from the cache, for the scripts that start from one (read only)."""
    model_path = tmp_path_factory.mktemp('gpu_model')
    training.train(tiny_args(synthetic_set, model_path, '--features', cache, num_epochs=1, tensorboard='none'))
    return model_path / 'checkpoint.pt'


# --- a GPU that cannot run ----------------------------------------------------------------------

def no_driver_found(monkeypatch, tmp_path):
    """No kernel module's version file and no nvidia-smi on the PATH, as on a machine without a driver."""
    monkeypatch.setattr(runs, 'NVIDIA_VERSION_FILE', str(tmp_path / 'no_version_file'))
    monkeypatch.setenv('PATH', str(tmp_path))


def test_the_driver_is_read_from_the_kernel_module_else_from_nvidia_smi(monkeypatch, tmp_path):
    no_driver_found(monkeypatch, tmp_path)
    assert runs.nvidia_driver() is None
    smi = tmp_path / 'nvidia-smi'
    smi.write_text('#!/bin/sh\n[ "$1" = --query-gpu=driver_version ] && echo 535.104.05\n')
    smi.chmod(0o755)
    assert runs.nvidia_driver() == ('535.104.05', 'nvidia-smi')
    version = tmp_path / 'version'
    version.write_text('NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  550.54.15  Release Build  '
                       '(dvs-builder@U16-I3-B03-4-3)  Tue Mar  5 22:15:33 UTC 2024\nGCC version:  gcc version 12.3.0\n')
    monkeypatch.setattr(runs, 'NVIDIA_VERSION_FILE', str(version))
    assert runs.nvidia_driver() == ('550.54.15', str(version))


def test_a_gpu_that_cannot_run_is_one_line_in_every_script(synthetic_set, checkpoint, tmp_path, monkeypatch):
    """A CUDA PyTorch whose driver is too old sees no GPU (torch.cuda.is_available() is False): --device cuda
    names the driver and the CUDA PyTorch was built for, in one line, and nothing runs on the CPU instead."""
    version = tmp_path / 'version'
    version.write_text('NVRM version: NVIDIA UNIX x86_64 Kernel Module  470.82.01  Wed Oct 27 00:52:48 UTC 2021\n')
    monkeypatch.setattr(runs, 'NVIDIA_VERSION_FILE', str(version))
    monkeypatch.setattr(torch.version, 'cuda', '12.4')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    expected = (f'error: --device cuda cannot run: torch.cuda.is_available() is False; NVIDIA driver: 470.82.01 '
                f'(from {version}); this PyTorch ({torch.__version__}) is built for CUDA 12.4: install an NVIDIA '
                'driver that supports CUDA 12.4, or a PyTorch built for the CUDA version of your driver, or pass '
                '--device cpu')
    image = str(sorted((synthetic_set / 'val').iterdir())[0])
    train_argv = tiny_argv(synthetic_set, tmp_path / 'models', device='cuda')
    for main, argv in [(trainer.main, train_argv),
                       (trainer.main, [*train_argv, '--scst', '--init_from', str(checkpoint)]),
                       (extract_features.main, ['--image_dir', str(synthetic_set / 'train'), '--caption_path',
                                                str(synthetic_set / 'annotations' / 'captions_train.json'),
                                                '--output_dir', str(tmp_path / 'cache'), '--device', 'cuda']),
                       (sample.main, ['--image', image, '--checkpoint', str(checkpoint), '--device', 'cuda'])]:
        with pytest.raises(SystemExit) as caught:
            main(argv)
        assert caught.value.code == expected, argv
    assert not (tmp_path / 'models' / 'checkpoint.pt').exists() and not (tmp_path / 'cache').exists()

    # torch's own warning of a driver too old becomes the reason; the driver from nvidia-smi.
    def too_old():
        warnings.warn('CUDA initialization: The NVIDIA driver on your system is too old (found version 11040). '
                      'Please update your GPU driver by downloading and installing a new version from the URL: '
                      'http://www.nvidia.com/Download/index.aspx')
        return False
    monkeypatch.setattr(torch.cuda, 'is_available', too_old)
    no_driver_found(monkeypatch, tmp_path)
    smi = tmp_path / 'nvidia-smi'
    smi.write_text('#!/bin/sh\necho 470.82.01\n')
    smi.chmod(0o755)
    with warnings.catch_warnings(record=True) as shown, pytest.raises(ValueError) as caught:
        warnings.simplefilter('always')
        runs.pick_device('cuda')
    assert str(caught.value).startswith('--device cuda cannot run: CUDA initialization: The NVIDIA driver on your '
                                        'system is too old (found version 11040); NVIDIA driver: 470.82.01 (from '
                                        'nvidia-smi); this PyTorch')
    assert shown == []  # said once, in the error


def test_cuda_that_fails_to_start_is_one_line_with_or_without_torchrun(synthetic_set, tmp_path, monkeypatch):
    """CUDA that PyTorch reports but cannot start (torch.cuda.init raises): one line too, also in a torchrun
    process, before it waits for the others; here also with no driver at all, and a PyTorch without CUDA."""
    no_driver_found(monkeypatch, tmp_path)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    monkeypatch.setattr(dist, 'is_nccl_available', lambda: True)
    monkeypatch.setattr(dist, 'init_process_group', lambda *args, **kwargs: pytest.fail('waited for the others'))

    def fails(error):
        def init():
            raise error
        monkeypatch.setattr(torch.cuda, 'init', init)
    fails(AssertionError('Torch not compiled with CUDA enabled'))
    monkeypatch.setattr(torch.version, 'cuda', None)
    with pytest.raises(SystemExit) as caught:
        trainer.main(tiny_argv(synthetic_set, tmp_path / 'models', device='cuda'))
    assert caught.value.code == (f'error: --device cuda cannot run: Torch not compiled with CUDA enabled; NVIDIA '
                                 f'driver: none found; this PyTorch ({torch.__version__}) is built without CUDA '
                                 '(torch.version.cuda is None): install a CUDA build of PyTorch, or pass --device cpu')
    fails(RuntimeError('The NVIDIA driver on your system is too old (found version 11040). Please update your GPU '
                       'driver by downloading and installing a new version from the URL: '
                       'http://www.nvidia.com/Download/index.aspx'))
    monkeypatch.setattr(torch.version, 'cuda', '12.4')
    torchrun_process(monkeypatch, 0, world_size=1)
    with pytest.raises(ValueError, match=r'^--device cuda \(LOCAL_RANK 0\) cannot run: The NVIDIA driver on your '
                                         r'system is too old \(found version 11040\); NVIDIA driver: none found; '
                                         r'this PyTorch \(.*\) is built for CUDA 12.4: '):
        runs.setup_distributed('cuda')


# --- the line every script prints first -------------------------------------------------------

def test_extract_features_scst_and_sample_say_their_device_first_and_extract_and_scst_set_cuda_up_as_training_does(
        synthetic_set, cache, checkpoint, tmp_path, capsys, monkeypatch):
    """extract_features.py and scst.py take train.py's CUDA settings (TF32, cuDNN's search), page-locked
    batches and their copies from the functions training uses: each call of those is recorded here, with
    the device (and TF32) asked for. What each makes of a GPU is test_on_a_gpu_batches_are_page_locked_....
    sample.py says its line on stderr, where it does not mix with the captions."""
    calls = []

    def recorded(name, function):
        def call(*args, **kwargs):
            calls.append((name, *[str(a) for a in args if not isinstance(a, torch.Tensor)], *kwargs.values()))
            return function(*args, **kwargs)
        return call
    for module in (extract_features, scst):
        for name in ('configure_cuda', 'pins_memory', 'to_device'):
            monkeypatch.setattr(module, name, recorded(name, getattr(runs, name)))

    extract_features.main(['--image_dir', str(synthetic_set / 'train'), '--caption_path',
                           str(synthetic_set / 'annotations' / 'captions_train.json'), '--output_dir',
                           str(tmp_path / 'cache'), '--backbone', 'smallcnn', '--weights', 'none', '--image_size', '32',
                           '--crop_size', '32', '--num_workers', '0', '--batch_size', '16', '--no_tf32',
                           '--device', 'cpu'])
    assert capsys.readouterr().out.splitlines()[0] == 'device: cpu, dtype: float32, stored as float16'
    assert calls == [('configure_cuda', 'cpu', False), ('pins_memory', 'cpu')] + [('to_device', 'cpu')] * 3
    calls.clear()

    # 48 training images in batches of 16, then the 12 held-out images in one batch.
    scst.train(tiny_args(synthetic_set, tmp_path / 'scst', '--scst', '--init_from', checkpoint, '--features', cache,
                         validate=True, num_epochs=1, no_tf32=True, tensorboard='none'))
    assert capsys.readouterr().out.splitlines()[0] == 'device: cpu, dtype: float32'
    assert calls == [('configure_cuda', 'cpu', False), ('pins_memory', 'cpu'), ('pins_memory', 'cpu')] + \
        [('to_device', 'cpu')] * 4

    sample.main(['--image', str(sorted((synthetic_set / 'val').iterdir())[0]), '--checkpoint', str(checkpoint),
                 '--device', 'cpu'])
    printed = capsys.readouterr()
    assert printed.err.splitlines()[0] == 'device: cpu, dtype: float32' and len(printed.out.splitlines()) == 1


CUDA_SETTINGS = [(torch.backends.cuda.matmul, 'allow_tf32'), (torch.backends.cudnn, 'allow_tf32'),
                 (torch.backends.cudnn, 'benchmark')]


@pytest.fixture
def cuda_settings_restored():
    """configure_cuda's settings as they were before the test (monkeypatch cannot: the first is no attribute,
    but a property of the module that holds it)."""
    before = [getattr(module, name) for module, name in CUDA_SETTINGS]
    yield
    for (module, name), value in zip(CUDA_SETTINGS, before):
        setattr(module, name, value)


def test_on_a_gpu_batches_are_page_locked_and_copied_without_waiting_and_the_line_names_the_gpu(
        monkeypatch, cuda_settings_restored):
    class Batch:
        def to(self, device, **kwargs):
            self.copied = (device, kwargs)
            return self

    gpu = torch.device('cuda', 1)
    assert runs.pins_memory(gpu) and not runs.pins_memory(torch.device('cpu'))
    assert runs.to_device(Batch(), gpu).copied == (gpu, {'non_blocking': True})
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device=None: f'NVIDIA H100 80GB HBM3 ({device})')
    torch.backends.cuda.matmul.allow_tf32 = True
    assert runs.describe_device(gpu) == ('device: cuda:1 (NVIDIA H100 80GB HBM3 (cuda:1)), dtype: float32; float32 '
                                         'matrix products in TF32')
    torch.backends.cuda.matmul.allow_tf32 = False
    assert runs.describe_device(gpu, training.precision(torch.float16)) == (
        'device: cuda:1 (NVIDIA H100 80GB HBM3 (cuda:1)), dtype: float16 autocast with gradient scaling (--amp; this '
        'GPU has no native bfloat16); float32 matrix products in full float32')


# --- torchrun on a machine with too few GPUs, or no NCCL --------------------------------------

@pytest.fixture
def one_gpu(monkeypatch):
    """A machine with one CUDA GPU, as far as the code asks; set_device and init_process_group are recorded,
    not run, and CUDA starts."""
    calls = []
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    monkeypatch.setattr(torch.cuda, 'init', lambda: None)
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
    assert runs.setup_distributed() == (0, 2, torch.device('cuda', 0), True)
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
    assert runs.setup_distributed('cpu') == (1, 2, torch.device('cpu'), True)  # CPU processes need no GPU
    assert one_gpu == [('init', 'gloo')]


def test_torchrun_without_nccl_or_with_one_named_gpu_is_one_line(one_gpu, monkeypatch):
    torchrun_process(monkeypatch, 0)
    monkeypatch.setattr(dist, 'is_nccl_available', lambda: False)
    with pytest.raises(ValueError, match='^this PyTorch has no NCCL, which training on GPUs under torchrun needs: '
                                         'install .*, or pass --device cpu to train in CPU processes$'):
        runs.setup_distributed('cuda')
    with pytest.raises(ValueError, match=r'^--device cuda:0: under torchrun each process takes the GPU of its '
                                         'LOCAL_RANK; pass --device cuda, --device cpu, or none$'):
        runs.setup_distributed('cuda:0')
    torchrun_process(monkeypatch, 0, world_size=1)  # torchrun --nproc_per_node=1: the same rules, and NCCL
    with pytest.raises(ValueError, match='^this PyTorch has no NCCL'):
        runs.setup_distributed('cuda')
    with pytest.raises(ValueError, match='under torchrun each process takes the GPU of its LOCAL_RANK'):
        runs.setup_distributed('cuda:1')
    assert one_gpu == []
    monkeypatch.delenv('LOCAL_RANK')  # python train.py: one process, and --device must exist
    with pytest.raises(ValueError, match='there is no CUDA device 1 here'):
        runs.setup_distributed('cuda:1')
    assert runs.setup_distributed('cuda:0') == (0, 1, torch.device('cuda', 0), False) and one_gpu == []


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


def test_resume_keeps_amp_and_no_tf32_and_the_first_line_says_which(synthetic_set, tmp_path, capsys, monkeypatch,
                                                                     cuda_settings_restored):
    """--resume keeps --amp and --no_tf32 unless --no_amp or --tf32 is given. The TF32 setting is what
    configure_cuda makes of it for a GPU: the run's own device is the CPU, where nothing changes."""
    real_configure, made = runs.configure_cuda, []

    def configure_as_for_a_gpu(device, tf32=True):
        real_configure(torch.device('cuda', 0), tf32)
        made.append([getattr(module, name) for module, name in CUDA_SETTINGS[:2]])
    monkeypatch.setattr(training, 'configure_cuda', configure_as_for_a_gpu)

    training.train(tiny_args(synthetic_set, tmp_path, '--amp', '--no_tf32', num_epochs=1, tensorboard='none'))
    assert capsys.readouterr().out.splitlines()[0] == 'device: cpu, dtype: bfloat16 autocast (--amp)'
    args = tiny_args(synthetic_set, tmp_path, '--resume', num_epochs=2, tensorboard='none')  # no --amp, --no_tf32
    args = training.train(args).settings
    out = capsys.readouterr().out
    assert args.amp and args.no_tf32 and out.count('device: cpu, dtype: bfloat16 autocast (--amp)') == 1
    assert read_checkpoint(str(tmp_path / 'checkpoint.pt'))['args']['no_tf32']
    assert made == [[False, False], [False, False]]
    args = tiny_args(synthetic_set, tmp_path, '--resume', '--no_amp', '--tf32', num_epochs=3, tensorboard='none')
    args = training.train(args).settings
    assert not args.amp and capsys.readouterr().out.splitlines()[0] == 'device: cpu, dtype: float32'
    assert not read_checkpoint(str(tmp_path / 'checkpoint.pt'))['args']['amp']
    assert not args.no_tf32 and made[-1] == [True, True]


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


def validating_worker(rank, world_size, port, data, model_path, out):
    """One of two DDP processes that train two epochs with a validation in lockstep: before its n-th validation
    batch each process leaves a marker file and waits for the other's n-th marker. If either validated more
    than its share (one process the whole set, the other waiting in a collective), its extra batch would wait
    for a marker that never comes and fail. No sleeps: it holds on a loaded machine."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group = functools.partial(dist.init_process_group, timeout=datetime.timedelta(seconds=10))
    real_loss, real_all_reduce, all_reduces, batches_seen = training.caption_loss, dist.all_reduce, [], []

    def validation_in_lockstep(*args):
        if not torch.is_grad_enabled():
            n = len(batches_seen)
            batches_seen.append(n)
            (out / f'val-{rank}-{n}').touch()
            partner, deadline = out / f'val-{1 - rank}-{n}', time.monotonic() + 60
            while not partner.exists():
                if time.monotonic() > deadline:
                    raise RuntimeError(f'rank {rank}: validation batch {n} without the other process')
                time.sleep(0.01)
        return real_loss(*args)

    def counted(*args, **kwargs):
        all_reduces.append(1)
        return real_all_reduce(*args, **kwargs)

    training.caption_loss, dist.all_reduce = validation_in_lockstep, counted
    # A BatchNorm that follows each batch closely: each process's own statistics differ from the main one's.
    history = training.train(tiny_args(data, model_path, validate=True, num_epochs=2, tensorboard='none',
                                       bn_momentum=0.9)).history
    torch.save({'val': history['val'], 'all_reduces': len(all_reduces), 'val_batches': len(batches_seen)},
               out / f'rank{rank}.pt')


def test_every_ddp_process_validates_its_share_and_none_waits_for_a_whole_validation(synthetic_sets, tmp_path):
    """240 held-out captions, 15 batches: shared, each process validates 8 of them at the same time, batch n
    of one alongside batch n of the other (validating_worker's markers), 16 in two epochs. The loss is the
    one a single process computes for the checkpoint's model over the whole set."""
    data = synthetic_sets(48, 48)
    processes = mp.spawn(validating_worker, args=(2, free_port(), data, tmp_path / 'models', tmp_path),
                         nprocs=2, join=False)
    deadline = time.monotonic() + 300
    while not processes.join(timeout=1):
        if time.monotonic() > deadline:
            for process in processes.processes:
                process.kill()
            pytest.fail('the two processes did not finish in 300 s')
    ranks = [torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in range(2)]
    assert ranks[0]['val'] == ranks[1]['val'] and len(ranks[0]['val']) == 2
    assert ranks[0]['val_batches'] == ranks[1]['val_batches'] == 2 * 8
    # Two all-reduces per step (8 steps an epoch), not three: whether to skip the batch, then whether its loss
    # was NaN or inf together with whether to stop; and one for each validation.
    assert ranks[0]['all_reduces'] == ranks[1]['all_reduces'] == 2 * (8 * 2 + 1)

    encoder, decoder, vocab, config = load_captioner(str(tmp_path / 'models' / 'checkpoint.pt'))
    val_set = CocoDataset(data / 'val', data / 'annotations' / 'captions_val.json', vocab,
                          eval_transform(config.image_size, config.crop_size), split='val')
    loader = batches(val_set, 16, False, 0, collate=collate_skipping)
    whole = training.validation_loss(Captioner(encoder, decoder), loader, torch.device('cpu'))
    assert ranks[0]['val'][-1]['loss'] == pytest.approx(whole, rel=1e-6)


# --- torchrun with one process, and each process's own random numbers -----------------------

def test_torchrun_with_one_process_trains_in_ddp_as_python_train_py_does(synthetic_set, cache, tmp_path):
    """torchrun --nproc_per_node=1 joins a process group (gloo on the CPU, NCCL on a GPU) and trains the model
    wrapped in DistributedDataParallel, with the cache's backbone left out of it, so that one GPU runs what
    several do; it says so, and its losses are those of the same run without torchrun."""
    argv = tiny_argv(synthetic_set, None, '--features', cache, validate=True, num_epochs=1, tensorboard='none')
    env = dict(os.environ, OMP_NUM_THREADS='1')  # the same threads, so the same sums, in both
    plain = subprocess.run([sys.executable, 'train.py', *argv, '--model_path', str(tmp_path / 'plain')], cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stderr[-2000:]
    ddp = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=1',
                          'train.py', *argv, '--model_path', str(tmp_path / 'ddp')], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    lines = ddp.stdout.splitlines()
    assert lines[0] == 'device: cpu, dtype: float32'
    assert 'torchrun: 1 process, the model in DistributedDataParallel over gloo' in lines
    assert plain.stdout.splitlines()[0] == 'device: cpu, dtype: float32' and 'torchrun' not in plain.stdout
    histories = [json.loads((tmp_path / name / 'history.json').read_text()) for name in ('plain', 'ddp')]
    losses = [[entry['loss'] for entry in history['train'] + history['val']] for history in histories]
    assert len(losses[0]) == 15 + 1 and losses[0] == losses[1]


def one_image_set(data, folder):
    """The set at data with every caption on the same image: what its batches then differ in is the crops
    and flips alone."""
    coco = json.loads((data / 'annotations' / 'captions_train.json').read_text())
    first = coco['images'][0]['file_name']
    for image in coco['images']:
        image['file_name'] = first
    (folder / 'train').mkdir(parents=True)
    (folder / 'annotations').mkdir()
    shutil.copy(data / 'train' / first, folder / 'train' / first)
    shutil.copy(data / 'vocab.json', folder / 'vocab.json')
    (folder / 'annotations' / 'captions_train.json').write_text(json.dumps(coco))
    return folder


def drawing_worker(rank, world_size, ports, data, model_path, out):
    """One of two DDP processes: runs of --seed 0, 0 and 1 (a process group each, on its own port), each from
    start_run to its first batch, cropped (24 of 32 pixels) and flipped in a DataLoader worker, and to a
    dropout mask, drawn where dropout and the crops of --num_workers 0 draw (the process's own generator);
    with that generator's state in every process."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR='127.0.0.1')
    torch.set_num_threads(1)
    mp.set_start_method('fork', force=True)  # the DataLoader worker forked: started afresh, it imports for seconds
    draws = []
    for seed, port in zip((0, 0, 1), ports):
        os.environ['MASTER_PORT'] = str(port)
        run = training.start_run(tiny_args(data, model_path, seed=seed, num_workers=1, crop_size=24,
                                           tensorboard='none'))
        images = next(iter(run.data.loader))[0]
        state = torch.get_rng_state()
        draws.append({'crops': images, 'state': state, 'states': runs.by_rank(state),
                      'dropout': nn.functional.dropout(torch.ones(256), 0.5)})
        del run
        dist.destroy_process_group()
    torch.save(draws, out / f'draws{rank}.pt')


def test_each_process_draws_its_own_crops_and_dropout_and_the_same_seed_draws_the_same(synthetic_set, tmp_path):
    data = one_image_set(synthetic_set, tmp_path / 'one_image')
    ports = [free_port() for _ in range(3)]
    processes = mp.spawn(drawing_worker, args=(2, ports, data, tmp_path / 'models', tmp_path), nprocs=2, join=False)
    deadline = time.monotonic() + 300
    while not processes.join(timeout=1):
        if time.monotonic() > deadline:
            for process in processes.processes:
                process.kill()
            pytest.fail('the two processes did not finish in 300 s')
    draws = [torch.load(tmp_path / f'draws{rank}.pt', weights_only=True) for rank in range(2)]

    def crops(rank, run):  # as a set: the batch's order is that of its captions' lengths, which differ by rank
        rows, counts = torch.unique(draws[rank][run]['crops'].flatten(1), dim=0, return_counts=True)
        return rows, counts

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a, b)) and len(a[0]) == len(b[0])

    for rank in range(2):
        assert same(crops(rank, 0), crops(rank, 1)), rank  # --seed 0 again: the same
        assert torch.equal(draws[rank][0]['dropout'], draws[rank][1]['dropout'])
        assert not same(crops(rank, 0), crops(rank, 2)), rank  # --seed 1: others
        assert not torch.equal(draws[rank][0]['dropout'], draws[rank][2]['dropout'])
    assert not same(crops(0, 0), crops(1, 0))  # the two processes: others
    assert not torch.equal(draws[0][0]['dropout'], draws[1][0]['dropout'])
    for rank in range(2):  # what a checkpoint keeps: every process's own generator
        assert all(torch.equal(state, draws[r][0]['state']) for r, state in enumerate(draws[rank][0]['states']))


def test_each_process_resumes_its_own_random_state(monkeypatch):
    before = torch.get_rng_state()
    try:
        checkpoint = small_run(torch.device('cpu')).to_checkpoint()
        assert len(checkpoint['cpu_rng']) == 1 and torch.equal(checkpoint['cpu_rng'][0], checkpoint['rng'])
        states = [torch.Generator().manual_seed(seed).get_state() for seed in (1, 2)]
        checkpoint['cpu_rng'] = states
        monkeypatch.setattr(dist, 'is_initialized', lambda: True)
        # A process beyond those the checkpoint knows (a resumed run with more of them) takes rank 0's.
        for rank, state in ((1, states[1]), (0, states[0]), (2, checkpoint['rng'])):
            monkeypatch.setattr(dist, 'get_rank', lambda rank=rank: rank)
            restore(small_run(torch.device('cpu')), runs.Resumed('checkpoint.pt', checkpoint))
            assert torch.equal(torch.get_rng_state(), state), rank
        del checkpoint['cpu_rng']  # a checkpoint from before every process's was kept: rank 0's
        restore(small_run(torch.device('cpu')), runs.Resumed('checkpoint.pt', checkpoint))
        assert torch.equal(torch.get_rng_state(), checkpoint['rng'])
    finally:
        torch.set_rng_state(before)


# --- --compile past torch.compile's recompile limit -------------------------------------------

@pytest.fixture
def recompiles_past_the_limit(monkeypatch):
    """--compile's loop traced by Dynamo without Inductor's code generation (backend='eager': seconds instead of
    minutes on a CPU), under a recompile limit of 1: validation, without gradients, recompiles it once past it."""
    real_compile = DIY_LSTM.LSTM.compile_loop
    monkeypatch.setattr(DIY_LSTM.LSTM, 'compile_loop',
                        lambda self, mode=None, **kwargs: real_compile(self, backend='eager', **kwargs))
    config = torch._dynamo.config
    name = 'recompile_limit' if hasattr(config, 'recompile_limit') else 'cache_size_limit'
    torch._dynamo.reset()
    with config.patch(**{name: 1}):
        yield name
    torch._dynamo.reset()


def test_compile_past_its_recompile_limit_is_one_warning_line(synthetic_set, tmp_path, recompiles_past_the_limit,
                                                               capsys):
    history = training.train(tiny_args(synthetic_set, tmp_path, '--compile', validate=True, num_epochs=1,
                                       tensorboard='none')).history
    assert len(history['train']) == 15 and len(history['val']) == 1  # the run goes on, uncompiled
    err = capsys.readouterr().err.replace('\r', '\n')
    assert [line for line in err.splitlines() if 'recompile' in line] == [
        f'warning: --compile: torch.compile hit torch._dynamo.config.{recompiles_past_the_limit} (1) and runs the '
        'LSTM loop uncompiled from here on (slower, with the same results); run with TORCH_LOGS=recompiles to see '
        'why it recompiles, or leave out --compile (--resume without it continues from the last checkpoint)']


def test_compile_told_to_fail_at_its_recompile_limit_is_one_error_line(synthetic_set, tmp_path,
                                                                       recompiles_past_the_limit, compiled_for_real,
                                                                       capsys):
    if not any(getattr(torch._dynamo.config, name, False)
               for name in ('fail_on_recompile_limit_hit', 'fail_on_cache_limit_hit')):
        pytest.skip('this torch cannot fail at its recompile limit')
    with pytest.raises(SystemExit) as caught:
        trainer.main(tiny_argv(synthetic_set, tmp_path, '--compile', validate=True, num_epochs=1, tensorboard='none'))
    assert caught.value.code == (
        'error: --compile: torch.compile passed its recompile limit, and '
        'torch._dynamo.config.fail_on_recompile_limit_hit is set; run with TORCH_LOGS=recompiles to see why it '
        'recompiles, or leave out --compile (--resume without it continues from the last checkpoint)')
    assert 'recompile' not in capsys.readouterr().err  # Dynamo's own warning is not printed too


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


def test_tf32_and_cudnn_search_on_a_gpu_only(cuda_settings_restored):
    before = [getattr(module, name) for module, name in CUDA_SETTINGS]
    runs.configure_cuda(torch.device('cpu'))
    assert [getattr(module, name) for module, name in CUDA_SETTINGS] == before
    runs.configure_cuda(torch.device('cuda', 0))
    assert [getattr(module, name) for module, name in CUDA_SETTINGS] == [True, True, True]
    runs.configure_cuda(torch.device('cuda', 0), tf32=not trainer.parse_args(['--no_tf32']).no_tf32)
    assert [getattr(module, name) for module, name in CUDA_SETTINGS] == [False, False, True]


def test_with_features_the_backbone_moves_to_the_device_only_to_validate(synthetic_set, cache, tmp_path,
                                                                         monkeypatch):
    """Training from a feature cache never runs the backbone: it stays where it was built (the CPU) and comes
    to the device only for validation and the TensorBoard captions of the validation images, which work now."""
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
