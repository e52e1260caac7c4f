"""What many test files share: synthetic sets made once per session, tiny training runs, and the scripts'
command lines, all on the CPU whether or not the machine has a GPU.

CAPTIONING_FAKE_CUDA=1 python -m pytest runs the suite as a machine with one CUDA GPU would (see
tests/fake_cuda/sitecustomize.py): a test that does not pin its device then fails here, loudly. .ci/run
runs the suite that way.
"""
import contextlib
import errno
import importlib.util
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import files
import synthetic
import train as trainer
from vocabulary import build_vocab, save_vocab

REPO = Path(__file__).resolve().parents[1]
FAKE_CUDA_DIR = REPO / 'tests' / 'fake_cuda'
FAKE_CUDA = os.environ.get('CAPTIONING_FAKE_CUDA') == '1'
if FAKE_CUDA:  # in this process, and (through PYTHONPATH) in every Python the tests start
    os.environ['PYTHONPATH'] = os.pathsep.join(filter(None, [str(FAKE_CUDA_DIR), os.environ.get('PYTHONPATH')]))
    _spec = importlib.util.spec_from_file_location('fake_cuda', FAKE_CUDA_DIR / 'sitecustomize.py')
    _spec.loader.exec_module(importlib.util.module_from_spec(_spec))
CPUS = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
WORKERS = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1'))
if WORKERS > 1:  # pytest-xdist's workers share the cores: each computes on its share, as does every script it starts
    THREADS = max(1, CPUS // WORKERS)
    os.environ['OMP_NUM_THREADS'] = str(THREADS)
    torch.set_num_threads(THREADS)
REAL_GPU = getattr(torch.cuda, 'really_available', torch.cuda.is_available)()  # whatever the fake says
needs_gpu = pytest.mark.skipif(not REAL_GPU, reason='needs a CUDA GPU')
# The scripts that pick the best device when --device is not given.
DEVICE_SCRIPTS = {'train.py', 'sample.py', 'evaluate.py', 'extract_features.py'}


def pytest_xdist_auto_num_workers(config):
    """-n auto: one worker per CPU this process may use (pytest-xdist's own count is of physical cores, one on
    many 2-vCPU machines)."""
    return CPUS


# The files that take longest start first, so that no xdist worker is left with a long one at the end.
SLOWEST_FIRST = ('test_diy_lstm.py', 'test_scale.py', 'test_evaluate.py', 'test_gpu.py', 'test_attention_run.py',
                 'test_robustness.py', 'test_scst.py', 'test_app.py')


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order


def run(*args, cwd=REPO, env=None, timeout=300):
    """A script's command line, run as a user would: python SCRIPT ARGS..., output captured as text. A script
    that picks a device gets --device cpu unless the command names one: the tests compare with CPU results,
    and on a machine with a GPU the script would pick CUDA."""
    args = list(map(str, args))
    if Path(args[0]).name in DEVICE_SCRIPTS and '--device' not in args:
        args += ['--device', 'cpu']
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def sample_lines(*args):
    """The lines sample.py prints for args, which must succeed."""
    result = run('sample.py', *args)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


@pytest.fixture(scope='session')
def synthetic_sets(tmp_path_factory):
    """make(num_train, num_val, seed): a synthetic set of 32-pixel images in COCO format, with its vocab.json,
    made once per session for each size. Shared by every test that asks for it: copy before changing anything."""
    made = {}

    def make(num_train=48, num_val=12, seed=1):
        if (num_train, num_val, seed) not in made:
            root = tmp_path_factory.mktemp(f'synthetic_{num_train}_{num_val}_{seed}')
            synthetic.make_synthetic_coco(str(root), num_train, num_val, image_size=32, seed=seed, progress=False)
            save_vocab(build_vocab(str(root / 'annotations' / 'captions_train.json'), threshold=1),
                       str(root / 'vocab.json'))
            made[num_train, num_val, seed] = root
        return made[num_train, num_val, seed]
    return make


@pytest.fixture(scope='session')
def synthetic_set(synthetic_sets):
    """The usual set: 48 training images (240 captions) and 12 held out."""
    return synthetic_sets()


def tiny_args(data, model_path, *extra, validate=False, **overrides):
    """train.py's arguments for a small, fast run on the synthetic set at data: a small CNN and decoder on
    32-pixel images, on the CPU. overrides replace a flag's value (True: a switch on; None: the flag left out);
    extra flags go last, as on a command line; validate=True adds the held-out images."""
    return trainer.parse_args(tiny_argv(data, model_path, *extra, validate=validate, **overrides))


def tiny_argv(data, model_path, *extra, validate=False, **overrides):
    """tiny_args' command line, as strings, for train.main or a train.py process."""
    flags = dict(image_dir=data / 'train', caption_path=data / 'annotations' / 'captions_train.json',
                 vocab_path=data / 'vocab.json', model_path=model_path, backbone='smallcnn', weights='none',
                 image_size=32, crop_size=32, embed_size=16, hidden_size=24, batch_size=16, num_workers=0,
                 log_step=1, learning_rate=3e-3, device='cpu')
    if validate:
        flags.update(val_image_dir=data / 'val', val_caption_path=data / 'annotations' / 'captions_val.json')
    flags.update(overrides)
    argv = []
    for name, value in flags.items():
        if value is True:
            argv.append(f'--{name}')
        elif value is not None and value is not False:
            argv += [f'--{name}', str(value)]
    return argv + [str(flag) for flag in extra]


def learning_args(data, model_path, *extra, **overrides):
    """tiny_args for a run that learns something: the backbone trains too, captions keep left and right,
    and the held-out loss is reported every epoch."""
    settings = dict(validate=True, train_backbone=True, no_flip=True, embed_size=32, hidden_size=48)
    return tiny_args(data, model_path, *extra, **{**settings, **overrides})


@pytest.fixture
def compiled_for_real():
    """Past torch.compile's recompile limit the plain loop would run instead: make that an error.

    torch 2.7 renamed the option; torch 2.5 has neither, and there the check is left out.
    """
    config = torch._dynamo.config
    names = [name for name in ('fail_on_recompile_limit_hit', 'fail_on_cache_limit_hit') if hasattr(config, name)]
    with config.patch(**{names[0]: True}) if names else contextlib.nullcontext():
        yield


def disk_fills_for(monkeypatch, name, room=64):
    """Every atomic write of a file called name finds only `room` bytes free, as on a disk that fills up
    during the save: the write that reaches the end is cut short and the next one fails with ENOSPC, under
    the buffer that open() puts in between. (torch.save reports that as a RuntimeError, 'unexpected pos'.)"""
    class FillingDisk(io.FileIO):
        def write(self, data):
            left = room - self.tell()
            if left <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return super().write(bytes(data)[:left])

    def fake_open(path, mode='r', *args, **kwargs):
        if os.path.basename(str(path)).startswith(f'{name}.tmp'):
            return io.BufferedWriter(FillingDisk(path, 'w'))
        return open(path, mode, *args, **kwargs)
    monkeypatch.setattr(files, 'open', fake_open, raising=False)
