"""Where the work runs and what a training run needs besides the model and the data.

The device (for every script) and the processes torchrun starts; then what cross-entropy training
(training.py) and self-critical training (scst.py) share: checking the paths before any time is spent,
settling the run's settings (with --resume, from its checkpoint), the state a run checkpoints and restores
(RunState: its Optimization and Progress), stopping cleanly on Ctrl-C, and what a run returns
(TrainingResult)."""
import argparse
import json
import os
import re
import signal
import subprocess
import warnings
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from files import CheckpointError, atomic_write, remove_stale_temporaries, save_file
from model import CaptionerConfig, read_checkpoint, save_checkpoint
from vocabulary import Vocabulary


def devices_here():
    return [f'cuda:{i}' for i in range(torch.cuda.device_count())] + \
        (['mps'] if torch.backends.mps.is_available() else []) + ['cpu']


def pick_device(name=None):
    """The device named, if this machine has it (else a ValueError that lists those it has), or the best one.

    A CUDA device is started here, so that a GPU that cannot run (no driver, or one too old for the CUDA
    this PyTorch was built for) is one line that says so, before any work, and never a run on the CPU
    instead of the GPU asked for."""
    if not name:
        if torch.cuda.is_available():
            start_cuda('CUDA, picked as the best device here,')
            return torch.device('cuda')
        return torch.device('mps' if torch.backends.mps.is_available() else 'cpu')
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f'--device {name}: not a device name; the devices here are: '
                         f'{", ".join(devices_here())}') from None
    if device.type == 'cuda':
        available, reason = cuda_available()
        if not available:
            raise cuda_error(f'--device {name}', reason)
    missing = {'cuda': device.type == 'cuda' and (device.index or 0) >= torch.cuda.device_count(),
               'mps': device.type == 'mps' and not torch.backends.mps.is_available()}
    if any(missing.values()):
        kind = 'CUDA device' if device.type == 'cuda' else 'MPS (Apple GPU) device'
        if device.index:
            kind = f'{kind} {device.index}'
        raise ValueError(f'--device {name}: there is no {kind} here; the devices here are: {", ".join(devices_here())}')
    if device.type == 'cuda':
        start_cuda(f'--device {name}')
    return device


def cuda_available():
    """(whether torch.cuda.is_available(), and if not, why, as far as PyTorch says): a driver too old for
    this PyTorch's CUDA is a warning of torch's, taken here into the reason instead of printed."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        available = torch.cuda.is_available()
    reasons = [first_sentence(str(warning.message)) for warning in caught if 'CUDA' in str(warning.message)]
    return available, (reasons[0] if reasons else 'torch.cuda.is_available() is False')


def start_cuda(label):
    """Initialise CUDA, which raises where the driver cannot run this PyTorch's CUDA; that is one line here."""
    try:
        torch.cuda.init()
    except (RuntimeError, AssertionError) as err:  # AssertionError: a PyTorch built without CUDA
        raise cuda_error(label, first_sentence(str(err))) from None


def first_sentence(text):
    """The first sentence of CUDA's message: what went wrong; the rest is advice the one line gives itself."""
    return re.split(r'(?<=[.!])\s', text.strip(), maxsplit=1)[0].rstrip('.')


NVIDIA_VERSION_FILE = '/proc/driver/nvidia/version'  # the kernel module's version, on Linux


def nvidia_driver():
    """(the NVIDIA driver's version, where it was read), or None where no driver is found: from the kernel
    module (Linux), else from nvidia-smi. Not from torch.cuda, which is what failed."""
    try:
        with open(NVIDIA_VERSION_FILE) as f:
            match = re.search(r'Kernel Module.*?\s(\d+\.\d+(?:\.\d+)*)\s', f.read())
        if match:
            return match.group(1), NVIDIA_VERSION_FILE
    except OSError:
        pass
    try:
        smi = subprocess.run(['nvidia-smi', '--query-gpu=driver_version', '--format=csv,noheader'],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    versions = smi.stdout.split()
    return (versions[0], 'nvidia-smi') if smi.returncode == 0 and versions else None


def cuda_error(label, reason):
    """The one-line ValueError of a CUDA device that cannot run (label: what asked for it): why, the NVIDIA
    driver (or that none was found) and the CUDA this PyTorch was built for, the two that must agree."""
    driver = nvidia_driver()
    found = f'{driver[0]} (from {driver[1]})' if driver else 'none found'
    if torch.version.cuda:
        built = f'built for CUDA {torch.version.cuda}'
        fix = (f'install an NVIDIA driver that supports CUDA {torch.version.cuda}, or a PyTorch built for the CUDA '
               'version of your driver')
    else:
        built = 'built without CUDA (torch.version.cuda is None)'
        fix = 'install a CUDA build of PyTorch'
    return ValueError(f'{label} cannot run: {reason}; NVIDIA driver: {found}; this PyTorch ({torch.__version__}) '
                      f'is {built}: {fix}, or pass --device cpu')


def describe_device(device, dtype='float32', runtime=None):
    """The line every script prints first: the device it computes on (a GPU's name; runtime, where not
    PyTorch) and the precision, dtype, with, on a GPU, whether float32 matrix products run in TF32."""
    where = f'{device} ({torch.cuda.get_device_name(device)})' if device.type == 'cuda' else str(device)
    if runtime:
        where += f' ({runtime})'
    line = f'device: {where}, dtype: {dtype}'
    if device.type == 'cuda':
        line += '; float32 matrix products in TF32' if torch.backends.cuda.matmul.allow_tf32 else \
            '; float32 matrix products in full float32'
    return line


class Processes(NamedTuple):
    """The processes a run trains in: this one's rank, how many there are (1 without torchrun), this one's
    device, and whether torchrun started them (distributed: a process group and DistributedDataParallel,
    also for a single process)."""
    rank: int
    world_size: int
    device: torch.device
    distributed: bool = False

    @property
    def main(self):
        """Whether this is the process that prints, logs and writes the checkpoints."""
        return self.rank == 0


def setup_distributed(device_name=None):
    """The Processes of the run: torchrun's environment variables choose DDP, NCCL on GPU, gloo on CPU.

    Every process torchrun starts joins the process group, one alone included
    (torchrun --nproc_per_node=1): so one GPU runs NCCL and DistributedDataParallel as several do. Each
    process takes the GPU of its LOCAL_RANK (--device cuda, or none where there is a GPU), or runs on the
    CPU (--device cpu, or none where there is no GPU). What cannot work is a ValueError of one line, before
    any process waits for the others: a GPU that cannot run, more processes on this machine than GPUs, a
    PyTorch without NCCL, a --device that names one GPU for every process.
    """
    if 'LOCAL_RANK' not in os.environ:  # python train.py: one process, no process group
        return Processes(0, 1, pick_device(device_name))
    world_size, local_rank = int(os.environ['WORLD_SIZE']), int(os.environ['LOCAL_RANK'])
    if device_name not in (None, 'cuda', 'cpu'):
        raise ValueError(f'--device {device_name}: under torchrun each process takes the GPU of its LOCAL_RANK; '
                         'pass --device cuda, --device cpu, or none')
    if device_name == 'cpu' or (device_name is None and not torch.cuda.is_available()):
        device, backend = torch.device('cpu'), 'gloo'
    else:
        available, reason = cuda_available()
        if not available:
            raise cuda_error('--device cuda', reason)
        gpus = torch.cuda.device_count()
        if local_rank >= gpus:
            raise ValueError(f'the process of LOCAL_RANK {local_rank} has no GPU: this machine has {gpus} CUDA '
                             f'GPU{"" if gpus == 1 else "s"}, one for each process; start torchrun with '
                             f'--nproc_per_node={gpus} at most, or pass --device cpu')
        if not dist.is_nccl_available():
            raise ValueError('this PyTorch has no NCCL, which training on GPUs under torchrun needs: install a CUDA '
                             'build of PyTorch with NCCL, or pass --device cpu to train in CPU processes')
        start_cuda(f'--device cuda (LOCAL_RANK {local_rank})')
        torch.cuda.set_device(local_rank)
        device, backend = torch.device('cuda', local_rank), 'nccl'
    dist.init_process_group(backend)
    return Processes(dist.get_rank(), world_size, device, distributed=True)


def agree(flags, device, world_size):
    """Whether each of the flags (bools, or one-element tensors on the device) is true in any process, as a
    list of bools: every process takes the same branch at the same step. Under DDP one tensor and one
    all-reduce however many flags, and one wait for the device: the flags are written into the tensor on
    the device, so nothing before the end waits for it. In one process, one wait for each tensor flag."""
    if world_size == 1:
        return [bool(flag) for flag in flags]
    values = torch.zeros(len(flags), device=device)
    for i, flag in enumerate(flags):
        values[i] = flag
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [value > 0 for value in values.tolist()]


def amp_dtype(device):
    """The autocast dtype of --amp on this device: bfloat16 where it computes in bfloat16 natively (GPUs of
    compute capability 8.0 and later, ROCm, the CPU), else float16, which needs a GradScaler.

    The capability is that of the device in use, not the current one. torch.cuda.is_bf16_supported()
    answers for the current device, and by default it also counts emulated bfloat16, which is slow.
    """
    if device.type != 'cuda' or torch.version.hip:
        return torch.bfloat16
    return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16


def pins_memory(device):
    """Whether batches for the device are to be made in page-locked memory (a DataLoader's pin_memory): a
    CUDA GPU copies from it while it computes (to_device)."""
    return device.type == 'cuda'


def to_device(batch, device):
    """A batch (a tensor, or data_loader.ImageGroups) on the device, copied without waiting for the device:
    from page-locked memory (pins_memory), the copy runs while the GPU computes what came before."""
    return batch.to(device, non_blocking=True)


def configure_cuda(device, tf32=True):
    """Let training on a GPU take CUDA's fast paths: TF32 in float32 matrix multiplies and cuDNN
    convolutions (tf32=False: full float32), and cuDNN's search for the fastest convolution algorithm,
    which pays because the images train.py feeds have one size (the crop), so it searches once per batch
    size. Nothing changes on other devices."""
    if device.type != 'cuda':
        return
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = True


# What --resume takes from the checkpoint when the flag is not given again. The model's settings (every
# CaptionerConfig field) describe the weights it holds, so contradicting them is an error; the schedule's
# may change on purpose.
MODEL_SETTINGS = tuple(f.name for f in CaptionerConfig.flags())
SCHEDULE_SETTINGS = ('num_epochs', 'batch_size', 'learning_rate', 'lr_schedule', 'grad_clip', 'seed', 'no_flip',
                     'amp', 'no_tf32', 'captions_per_image', 'alpha_c')
# What every checkpoint either trainer writes holds (scst.py's has None for the scheduler and the scaler).
CHECKPOINT_KEYS = ('model_args', 'encoder', 'decoder', 'optimizer', 'scheduler', 'scaler', 'rng', 'epoch',
                   'batches_done', 'step', 'history')


def check_paths(args):
    """Missing inputs and an unwritable --model_path fail here, before any time is spent."""
    probe = os.path.join(args.model_path, f'.write_test{os.getpid()}')
    try:
        atomic_write(probe, lambda f: f.write(b'ok'))
        os.remove(probe)
    except OSError as err:
        raise CheckpointError(f'cannot write checkpoints to {args.model_path} ({err.strerror or err})') from None
    removed, freed = remove_stale_temporaries(args.model_path)
    if removed:
        print(f'removed {removed} temporary files ({freed / 2**20:.1f} MiB) that killed runs left in {args.model_path}')
    inputs = [(args.vocab_path, 'run build_vocab.py first, or pass --vocab_path'),
              (args.caption_path, 'run download.sh first, or pass --caption_path'),
              (args.features, 'run extract_features.py first, or pass another --features folder'),
              (args.val_caption_path, 'pass another --val_caption_path'),
              (args.val_image_dir, 'run resize.py on the validation images, or pass another --val_image_dir')]
    if args.features is None:
        inputs.append((args.image_dir, 'run resize.py first, or pass --image_dir'))
    for path, fix in inputs:
        if path is not None and not os.path.exists(path):
            raise FileNotFoundError(f'not found: {path}: {fix}')
    if (args.val_caption_path is None) != (args.val_image_dir is None):
        raise ValueError('give both --val_caption_path and --val_image_dir, or neither')


def resume_path(args):
    """The checkpoint --resume names: checkpoint.pt in --model_path when it names none; None without --resume."""
    return os.path.join(args.model_path, 'checkpoint.pt') if args.resume == 'latest' else args.resume


@dataclass(frozen=True)
class Optimization:
    """What a run trains and how: the parameters, the optimizer over them, and, where the trainer has them
    (training.py does, scst.py does not), the learning-rate schedule, the gradient scaler that fp16 autocast
    needs, and the autocast dtype (None: float32)."""
    params: list
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    scaler: torch.amp.GradScaler | None = None
    amp_dtype: torch.dtype | None = None


@dataclass
class Progress:
    """How far a run has come and what it has measured: what a checkpoint records and --resume continues from."""
    history: dict  # a list of entries for each kind of measurement
    epoch: int = 0  # epochs completed
    batches_done: int = 0  # batches of the current epoch, trained or skipped
    step: int = 0  # optimizer steps


def checkpointed(encoder, decoder, optimization):
    """What a checkpoint holds the state_dict of, by key, in the checkpoint's order; None for what the run has
    none of (scst.py has no schedule and no scaler, and its checkpoints have None there)."""
    return {'encoder': encoder, 'decoder': decoder, 'optimizer': optimization.optimizer,
            'scheduler': optimization.scheduler, 'scaler': optimization.scaler}


@dataclass
class Resumed:
    """The checkpoint a --resume run continues from, read once by settle_settings: where it is, and what it
    holds (restore loads it)."""
    path: str
    checkpoint: dict

    def check_config(self, config):
        """Refuse a run whose model is not the one the checkpoint holds. The settings came from the checkpoint,
        so only what they do not decide can differ: the backbone and image sizes of a feature cache."""
        trained_with = self.checkpoint['model_args']
        changed = [f'{k} {trained_with[k]} (now {v})' for k, v in asdict(config).items()
                   if k in trained_with and k != 'vocab_size' and trained_with[k] != v]
        if changed:
            raise CheckpointError(f'{self.path} was trained with ' + ', '.join(changed) +
                                  ': resume with the settings it was trained with')

    def restore(self, encoder, decoder, optimization, device):
        """Load the checkpoint into the modules, the optimizer (and the schedule and the scaler, where the run
        has them) and the random-number generators; returns the Progress it records, for the run to continue.

        Each process takes its own rank's generators back. A checkpoint from before the CUDA states were kept,
        or from a run on another device, leaves the GPU's generator as the seed set it; one from before each
        rank's CPU state was kept, or from fewer processes, gives a process without its own rank 0's. A state
        a GradScaler saved while disabled is empty: a run whose --amp now needs float16 (on an older GPU)
        starts its scaler afresh instead of failing.
        """
        checkpoint = self.checkpoint
        rank = dist.get_rank() if dist.is_initialized() else 0
        try:
            for key, thing in checkpointed(encoder, decoder, optimization).items():
                if thing is not None and checkpoint[key] != {}:
                    thing.load_state_dict(checkpoint[key])
            cpu_states = checkpoint.get('cpu_rng') or []
            torch.set_rng_state(cpu_states[rank] if rank < len(cpu_states) else checkpoint['rng'])
            cuda_states = checkpoint.get('cuda_rng')
            if cuda_states and device.type == 'cuda':
                torch.cuda.set_rng_state(cuda_states[rank if rank < len(cuda_states) else 0], device)
        except (KeyError, RuntimeError, ValueError) as err:
            raise CheckpointError(f'{self.path}: cannot resume with these settings ({str(err).splitlines()[0]})') \
                from None
        return Progress(history=checkpoint['history'], epoch=checkpoint['epoch'],
                        batches_done=checkpoint['batches_done'], step=checkpoint['step'])


def settle_settings(args, vocab=None):
    """The run's settings, settled here and nowhere else, and the Resumed checkpoint (None for a new run).

    With --resume, the checkpoint is read once and must be one train.py (or scst.py) wrote. Every setting it
    holds that is not given as a flag again is taken from it: a given model flag that contradicts it is an
    error, a given schedule flag wins. vocab, the vocabulary the run will train with (None: the checkpoint's
    own), must be as large as the one it was trained with. The settled settings are a new Namespace, args
    and what was taken, in one go: what the caller reads from it, and what the run's checkpoints record, is
    what the run used. Last, the crop must fit in the images, with the settings settled.
    """
    path = resume_path(args)
    resumed = Resumed(path, read_run_checkpoint(path)) if path else None
    settings = argparse.Namespace(**{**vars(args), **(settings_to_take(resumed, args) if resumed else {})})
    if resumed:
        trained_with = resumed.checkpoint['model_args']
        if vocab is not None and trained_with.get('vocab_size', len(vocab)) != len(vocab):
            raise CheckpointError(f'{path} was trained with a vocabulary of {trained_with["vocab_size"]} words '
                                  f'but {args.vocab_path} has {len(vocab)}: pass the vocabulary it was trained with')
    if settings.features is None and settings.crop_size > settings.image_size:
        raise ValueError(f'--crop_size {settings.crop_size} is larger than --image_size {settings.image_size}: '
                         'give a crop no larger than the resized images')
    return settings, resumed


def read_run_checkpoint(path):
    """The checkpoint at path, if it holds everything --resume needs."""
    checkpoint = read_checkpoint(path)
    lacking = [key for key in CHECKPOINT_KEYS if key not in checkpoint]
    if not lacking and not isinstance(checkpoint['model_args'], dict):
        lacking = ['model settings']
    if lacking:
        raise CheckpointError(f'{path}: not a checkpoint written by train.py (it has no {", ".join(lacking)}); '
                              'resume from the checkpoint.pt in a --model_path')
    return checkpoint


def settings_to_take(resumed, args):
    """{name: value} of the settings resumed's checkpoint holds that args were not given as flags; a given
    model flag that contradicts the checkpoint is an error."""
    given = set(getattr(args, 'flags_given', vars(args)))
    # Checkpoints from before the config kept some model settings only among the run's flags.
    saved = dict(resumed.checkpoint.get('args') or {}, **resumed.checkpoint['model_args'])
    taken, contradicted = {}, []
    for name in MODEL_SETTINGS + SCHEDULE_SETTINGS:
        if name not in saved:
            continue
        if name not in given:
            taken[name] = saved[name]
        elif name in MODEL_SETTINGS and getattr(args, name) != saved[name]:
            contradicted.append(f'--{name} {saved[name]} (not {getattr(args, name)})')
    if contradicted:
        raise CheckpointError(f'{resumed.path} was trained with ' + ', '.join(contradicted) + ': leave these flags '
                              'out to resume with its settings, or start a new run in another --model_path')
    return taken


@dataclass(kw_only=True)
class RunState:
    """What both trainers hold and checkpoint, each part built whole before the run starts: the settled
    settings, the processes, the model and its vocabulary, the optimization and the progress. training.Run
    and scst.Run add what is theirs: their data, and training.py's logs."""
    args: argparse.Namespace  # the settings the run uses, as settle_settings settled them
    processes: Processes
    vocab: Vocabulary
    config: CaptionerConfig
    encoder: nn.Module
    decoder: nn.Module
    optimization: Optimization
    progress: Progress

    @property
    def checkpoint_path(self):
        return os.path.join(self.args.model_path, 'checkpoint.pt')

    def checkpoint_marks(self):
        """Keys of this trainer's checkpoints that hold no state, after the states."""
        return {}

    def to_checkpoint(self):
        """Everything sample.py needs (config, vocabulary, weights) and everything --resume needs (optimizer,
        position, history, random state, settings), as one dict."""
        vocab, progress = self.vocab, self.progress
        states = {key: None if thing is None else thing.state_dict()
                  for key, thing in checkpointed(self.encoder, self.decoder, self.optimization).items()}
        return {'model_args': asdict(self.config), 'vocab': [vocab.idx2word[i] for i in range(len(vocab))],
                **states, **self.checkpoint_marks(), 'epoch': progress.epoch, 'batches_done': progress.batches_done,
                'step': progress.step, 'history': progress.history, 'rng': torch.get_rng_state(),
                'cpu_rng': by_rank(torch.get_rng_state()), 'cuda_rng': cuda_rng_states(self.processes.device),
                'args': vars(self.args)}

    def result(self):
        return TrainingResult(encoder=self.encoder, decoder=self.decoder, vocab=self.vocab,
                              history=self.progress.history, settings=self.args)


def cuda_rng_states(device):
    """The CUDA random state of each process's GPU, by rank (None for a run on another device): dropout
    and SCST's sampling draw from it, so without it a resumed run on a GPU draws other numbers.

    Only the GPU each process uses: torch.cuda.get_rng_state_all() would open a CUDA context on every GPU
    of the machine in every process. Under DDP every process must call this at the same time.
    """
    if device.type != 'cuda':
        return None
    return by_rank(torch.cuda.get_rng_state(device))


def by_rank(state):
    """A list of every process's state, by rank: [state] in one process. Each process draws its own random
    numbers (training.start_run), so a checkpoint keeps each one's generators. Under DDP every process must
    call this at the same time."""
    if not dist.is_initialized():
        return [state]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


@dataclass(frozen=True)
class TrainingResult:
    """What training (either trainer) returns: the trained encoder and decoder, their vocabulary, the history
    of the measurements (as history.json holds it), and the settings the run used (with --resume, the
    checkpoint's where no flag was given)."""
    encoder: nn.Module
    decoder: nn.Module
    vocab: Vocabulary
    history: dict
    settings: argparse.Namespace


def save_run(checkpoint, model_path):
    """checkpoint.pt and history.json in model_path, each written whole or not at all."""
    save_checkpoint(os.path.join(model_path, 'checkpoint.pt'), checkpoint)
    history = json.dumps(checkpoint['history']).encode()
    save_file(os.path.join(model_path, 'history.json'), lambda f: f.write(history))


class StopRequest:
    """Ctrl-C and SIGTERM set a flag; training saves a checkpoint after the current step and stops."""

    def __init__(self):
        self.requested = False
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        self.requested = True

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
