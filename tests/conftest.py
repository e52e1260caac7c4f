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
import json
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
import torchvision
from filelock import FileLock
from torch import nn

import files
import synthetic
import train as trainer
import training
from scoring import score_captions
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


# The files that take longest start first, so that no xdist worker is left with a long one at the end: the
# order of their times summed from `pytest --durations=0` (shared builds counted where they were first asked for).
SLOWEST_FIRST = ('test_scale.py', 'test_evaluate.py', 'test_gpu.py', 'test_pipeline.py', 'test_diy_lstm.py',
                 'test_share.py', 'test_app.py', 'test_real_photos.py', 'test_usability.py', 'test_attention_maps.py')


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order


def run(*args, cwd=REPO, env=None, timeout=300, process=False):
    """A script's command line, run as a user would: python SCRIPT ARGS..., output captured as text, returned
    as a subprocess.CompletedProcess. A script that picks a device gets --device cpu unless the command names
    one: the tests compare with CPU results, and on a machine with a GPU the script would pick CUDA.

    A repository script runs in this process (its main(), see in_process) unless process=True, env is given or
    the command is not a script of this folder: what most tests check is the script's output and exit code,
    and a new Python spends seconds importing torch before it does anything. Each script keeps at least one
    test that starts it as a real process (process=True), as do the signal, torchrun, fake-GPU and server tests."""
    args = list(map(str, args))
    if Path(args[0]).name in DEVICE_SCRIPTS and '--device' not in args:
        args += ['--device', 'cpu']
    script = Path(cwd, args[0])
    if process or env is not None or script.suffix != '.py' or script.resolve().parent != REPO:
        return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)
    return in_process(script, args[1:], cwd)


def in_process(script, argv, cwd=REPO):
    """python SCRIPT ARGV... as a CompletedProcess, run by calling the script's main() here, with sys.argv,
    the working folder and the output streams as the real process would have them. The exit code is what
    Python's would be: 0 when main returns, sys.exit's code (a message printed to stderr and 1), and 1 with the
    traceback on stderr for an exception. torch's thread count is restored afterwards (demo.py sets it)."""
    module = importlib.import_module(script.stem)
    out, err = io.StringIO(), io.StringIO()
    saved = sys.argv, os.getcwd(), torch.get_num_threads()
    try:
        sys.argv = [str(script), *argv]
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                module.main()
                code = 0
            except SystemExit as exit:
                code = 0 if exit.code is None else exit.code
                if not isinstance(code, int):
                    print(code, file=sys.stderr)
                    code = 1
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        sys.argv = saved[0]
        os.chdir(saved[1])
        torch.set_num_threads(saved[2])
    return subprocess.CompletedProcess([sys.executable, str(script), *argv], code, out.getvalue(), err.getvalue())


def same_names(a, b):
    """a and b as dicts of tensors (a module as its state_dict()), asserted to hold some weights under the same
    names, no more, no fewer: comparing tensor by tensor then misses none."""
    a, b = (x.state_dict() if isinstance(x, nn.Module) else x for x in (a, b))
    assert a.keys() == b.keys(), (f'only in the first: {sorted(a.keys() - b.keys())}; '
                                  f'only in the second: {sorted(b.keys() - a.keys())}')
    assert a, 'no weights to compare'
    return a, b


def assert_same_weights(a, b):
    """a and b hold the same weights: the same names, and under each name a tensor of the same dtype and shape
    with every element equal. a and b are modules or dicts of tensors."""
    a, b = same_names(a, b)
    for key, value in a.items():
        assert value.dtype == b[key].dtype and torch.equal(value, b[key]), key


def unchanged_weights(a, b):
    """The names under which a and b (modules or dicts of tensors, with the same names) hold equal tensors:
    after training, the weights it did not move."""
    a, b = same_names(a, b)
    return [key for key, value in a.items() if torch.equal(value, b[key])]


def sample_lines(*args):
    """The lines sample.py prints for args, which must succeed."""
    result = run('sample.py', *args)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def printed_scores(stdout):
    """evaluate.py's score table, {metric: number}: a row of names, its alignment row and a row of numbers, so
    that tests compare the numbers rather than the text."""
    lines = stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith('|---'))
    names, values = (lines[i].removeprefix('| ').removesuffix(' |').split(' | ') for i in (at - 1, at + 1))
    assert len(names) == len(values) and lines[at] == '|' + '---:|' * len(names), lines[at - 1:at + 2]
    return dict(zip(names, map(float, values)))


def scores_of_results(results_path, caption_path):
    """100 x score_captions of the captions in a results file (as evaluate.py writes it) against the references
    of a COCO captions file, as evaluate.py prints them; and the notes."""
    written = json.loads(Path(results_path).read_text())
    annotations = json.loads(Path(caption_path).read_text())['annotations']
    references = {item['image_id']: [] for item in written}
    for annotation in annotations:
        if annotation['image_id'] in references:
            references[annotation['image_id']].append(annotation['caption'])
    assert written and all(references.values())
    scores, notes = score_captions(references, {item['image_id']: item['caption'] for item in written})
    return {metric: 100 * value for metric, value in scores.items()}, notes


def check_printed_scores(stdout, results_path, caption_path):
    """The table evaluate.py printed holds 100 x the scores of the captions it wrote, to its 0.1, in the order
    score_captions gives them, and its notes follow; returns the table."""
    printed = printed_scores(stdout)
    expected, notes = scores_of_results(results_path, caption_path)
    assert list(printed) == list(expected)
    assert printed == pytest.approx(expected, abs=0.0501)
    assert notes and all(f'note: {note}' in stdout.splitlines() for note in notes)
    return printed


@pytest.fixture(scope='session')
def built_once(tmp_path_factory):
    """build(name, make): the folder that make(folder) fills, made once per test run however many xdist workers
    ask for it. The first to ask makes it under a file lock while the others wait; all then read the same files
    (so a model is trained once, not once per worker). Shared by every test that asks: copy before changing
    anything. A build that failed is made again by the next test that asks, and fails there too."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get('PYTEST_XDIST_WORKER'):
        root = root.parent  # the run's folder, which holds each worker's own
    (root / 'built').mkdir(exist_ok=True)

    def build(name, make):
        folder, done = root / 'built' / name, root / 'built' / f'{name}.done'
        with FileLock(str(root / 'built' / f'{name}.lock')):
            if not done.exists():
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir()
                make(folder)
                done.touch()
        return folder
    return build


@pytest.fixture(scope='session', autouse=True)
def inductor_cache(built_once):
    """One torch.compile cache for the whole run, shared by every worker and every script the tests start: a
    kernel is compiled once and loaded by every later test that needs it, and each run starts empty, as on a
    new machine. (Every compiled loop in the tests runs the same steps_per_call, 3, for the same reason.)"""
    os.environ['TORCHINDUCTOR_CACHE_DIR'] = str(built_once('inductor', lambda folder: None))


@pytest.fixture(scope='session')
def synthetic_sets(built_once):
    """make(num_train, num_val, seed): a synthetic set of 32-pixel images in COCO format, with its vocab.json,
    made once per run for each size."""
    def make_set(root, num_train, num_val, seed):
        synthetic.make_synthetic_coco(str(root), num_train, num_val, image_size=32, seed=seed, progress=False)
        save_vocab(build_vocab(str(root / 'annotations' / 'captions_train.json'), threshold=1),
                   str(root / 'vocab.json'))

    def make(num_train=48, num_val=12, seed=1):
        return built_once(f'synthetic_{num_train}_{num_val}_{seed}',
                          lambda root: make_set(root, num_train, num_val, seed))
    return make


@pytest.fixture(scope='session')
def synthetic_set(synthetic_sets):
    """The usual set: 48 training images (240 captions) and 12 held out."""
    return synthetic_sets()


@pytest.fixture(scope='session')
def two_epoch_model(built_once, synthetic_set):
    """The folder of learning_args' run of two epochs on synthetic_set: checkpoint.pt, history.json, best.pt."""
    return built_once('two_epochs',
                      lambda folder: training.train(learning_args(synthetic_set, folder, '--num_epochs', '2')))


@pytest.fixture(scope='session')
def one_epoch_seed7(built_once, synthetic_sets):
    """A folder with the small synthetic set (24 training images, 120 captions; seed 7) as data/, its vocab.json,
    and models/checkpoint.pt: one epoch of tiny_args in batches of 8, at train.py's own learning rate."""
    def make(root):
        data = synthetic_sets(num_train=24, num_val=4, seed=7)
        (root / 'data').symlink_to(data)
        (root / 'vocab.json').symlink_to(data / 'vocab.json')
        training.train(tiny_args(root / 'data', root / 'models', '--num_epochs', '1', batch_size=8,
                                 learning_rate=None, vocab_path=root / 'vocab.json'))
    return built_once('seed7_one_epoch', make)


@pytest.fixture(scope='session')
def pooled_cache(built_once, synthetic_set):
    """extract_features.py's cache of synthetic_set's training images: a random smallcnn's pooled vectors (the
    seed makes it the backbone of every --weights none run on 32-pixel images)."""
    def make(folder):
        result = run('extract_features.py', '--image_dir', synthetic_set / 'train',
                     '--caption_path', synthetic_set / 'annotations' / 'captions_train.json', '--output', folder,
                     '--backbone', 'smallcnn', '--weights', 'none', '--image_size', '32', '--crop_size', '32',
                     '--batch_size', '16', '--num_workers', '0', process=True)
        assert result.returncode == 0, result.stderr[-2000:]
    return built_once('pooled_cache', make)


class TutorialEncoder(nn.Module):
    """The tutorial's encoder layout, written out here to check names against ours."""

    def __init__(self, embed_size):
        super().__init__()
        resnet = torchvision.models.resnet152(weights=None)
        self.resnet = nn.Sequential(*list(resnet.children())[:-1])
        self.linear = nn.Linear(resnet.fc.in_features, embed_size)
        self.bn = nn.BatchNorm1d(embed_size, momentum=0.01)


class TutorialDecoder(nn.Module):
    def __init__(self, embed_size, hidden_size, vocab_size, num_layers):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_size)
        self.lstm = nn.LSTM(embed_size, hidden_size, num_layers, batch_first=True)
        self.linear = nn.Linear(hidden_size, vocab_size)


@pytest.fixture(scope='session')
def tutorial_encoder_file(built_once):
    """encoder-5-3000.pkl as the tutorial's train.py saved it: a ResNet-152 (random, seed 0) with embed size 32."""
    def make(folder):
        torch.manual_seed(0)
        torch.save(TutorialEncoder(32).state_dict(), folder / 'encoder-5-3000.pkl')
    return built_once('tutorial_encoder', make) / 'encoder-5-3000.pkl'


def tutorial_files(folder, vocab_words, encoder_file, hidden=48):
    """The tutorial's three files in folder, as its scripts saved them: encoder_file (embed size 32) linked in,
    a decoder-5-3000.pkl of vocab_words (seed 0; also returned) and a protocol-0 vocab.pkl, written by a Python
    in which the pickled Vocabulary class belongs to __main__, as in the tutorial's build_vocab.py."""
    if not (folder / 'encoder-5-3000.pkl').exists():
        (folder / 'encoder-5-3000.pkl').symlink_to(encoder_file)
    torch.manual_seed(0)
    decoder = TutorialDecoder(32, hidden, len(vocab_words), 1)
    torch.save(decoder.state_dict(), folder / 'decoder-5-3000.pkl')
    script = ('import pickle, sys\n'
              'class Vocabulary(object):\n    pass\n'
              'v = Vocabulary()\n'
              f'words = {vocab_words!r}\n'
              'v.word2idx = {w: i for i, w in enumerate(words)}\n'
              'v.idx2word = {i: w for i, w in enumerate(words)}\n'
              'v.idx = len(words)\n'
              f'pickle.dump(v, open({str(folder / "vocab.pkl")!r}, "wb"), protocol=0)\n')
    subprocess.run([sys.executable, '-c', script], check=True)
    return decoder


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
