"""Where the work runs and what a training run needs besides the model and the data.

The device (for every script) and the processes torchrun starts; then what cross-entropy training
(train.py) and self-critical training (scst.py) share: checking the paths before any time is spent, the
checkpoint a run writes, resuming from it with the run's own settings and state, and stopping cleanly on
Ctrl-C."""
import json
import os
import signal
from dataclasses import asdict

import torch
import torch.distributed as dist

from files import CheckpointError, atomic_write, remove_stale_temporaries, save_file
from model import CaptionerConfig, read_checkpoint, save_checkpoint


def devices_here():
    return [f'cuda:{i}' for i in range(torch.cuda.device_count())] + \
        (['mps'] if torch.backends.mps.is_available() else []) + ['cpu']


def pick_device(name=None):
    """The device named, if this machine has it (else a ValueError that lists those it has), or the best one."""
    if not name:
        return torch.device('cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available()
                            else 'cpu')
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f'--device {name}: not a device name; the devices here are: '
                         f'{", ".join(devices_here())}') from None
    missing = {'cuda': device.type == 'cuda' and (device.index or 0) >= torch.cuda.device_count(),
               'mps': device.type == 'mps' and not torch.backends.mps.is_available()}
    if any(missing.values()):
        kind = 'CUDA device' if device.type == 'cuda' else 'MPS (Apple GPU) device'
        if device.index:
            kind = f'{kind} {device.index}'
        raise ValueError(f'--device {name}: there is no {kind} here; the devices here are: {", ".join(devices_here())}')
    return device


def setup_distributed(device_name=None):
    """(rank, world size, device): torchrun's environment variables choose DDP, NCCL on GPU, gloo on CPU."""
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    if world_size == 1:
        return 0, 1, pick_device(device_name)
    local_rank = int(os.environ['LOCAL_RANK'])
    if torch.cuda.is_available() and device_name != 'cpu':
        torch.cuda.set_device(local_rank)
        device, backend = torch.device('cuda', local_rank), 'nccl'
    else:
        device, backend = torch.device('cpu'), 'gloo'
    dist.init_process_group(backend)
    return dist.get_rank(), world_size, device


def any_process(flag, device, world_size):
    """Whether flag is true in any process, so that all of them take the same branch at the same step."""
    if world_size == 1:
        return flag
    tensor = torch.tensor(float(flag), device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


# What --resume takes from the checkpoint when the flag is not given again. The model's settings (every
# CaptionerConfig field) describe the weights it holds, so contradicting them is an error; the schedule's
# may change on purpose.
MODEL_SETTINGS = tuple(f.name for f in CaptionerConfig.flags())
SCHEDULE_SETTINGS = ('num_epochs', 'batch_size', 'learning_rate', 'lr_schedule', 'grad_clip', 'seed', 'no_flip')


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
    if args.features is None and args.crop_size > args.image_size:
        raise ValueError(f'--crop_size {args.crop_size} is larger than --image_size {args.image_size}: '
                         'give a crop no larger than the resized images')


def resume_path(args):
    """The checkpoint --resume names: checkpoint.pt in --model_path when it names none; None without --resume."""
    return os.path.join(args.model_path, 'checkpoint.pt') if args.resume == 'latest' else args.resume


def checkpoint_state(run, **extra):
    """Everything sample.py needs (config, vocabulary, weights) and everything --resume needs (optimizer,
    position, history, random state, settings) of a run, as one dict; extra: what only one trainer has."""
    vocab = run.vocab
    return {'model_args': asdict(run.config), 'vocab': [vocab.idx2word[i] for i in range(len(vocab))],
            'encoder': run.encoder.state_dict(), 'decoder': run.decoder.state_dict(),
            'optimizer': run.optimizer.state_dict(), **extra, 'epoch': run.epoch, 'batches_done': run.batches_done,
            'step': run.step, 'history': run.history, 'rng': torch.get_rng_state(), 'args': vars(run.args)}


def save_run(checkpoint, model_path):
    """checkpoint.pt and history.json in model_path, each written whole or not at all."""
    save_checkpoint(os.path.join(model_path, 'checkpoint.pt'), checkpoint)
    history = json.dumps(checkpoint['history']).encode()
    save_file(os.path.join(model_path, 'history.json'), lambda f: f.write(history))


def restore_settings(args, path):
    """The checkpoint at path, after copying the run's settings from it into args, except those given as
    flags: a given model flag that contradicts the checkpoint is an error, a given schedule flag wins."""
    checkpoint = read_checkpoint(path)
    lacking = [key for key in ('model_args', 'encoder', 'decoder', 'optimizer', 'scheduler', 'scaler', 'rng', 'epoch',
                               'batches_done', 'step', 'history') if key not in checkpoint]
    if not lacking and not isinstance(checkpoint['model_args'], dict):
        lacking = ['model settings']
    if lacking:
        raise CheckpointError(f'{path}: not a checkpoint written by train.py (it has no {", ".join(lacking)}); '
                              'resume from the checkpoint.pt in a --model_path')
    given = set(getattr(args, 'flags_given', vars(args)))
    saved = dict(checkpoint.get('args') or {}, **checkpoint['model_args'])
    contradicted = []
    for name in MODEL_SETTINGS + SCHEDULE_SETTINGS:
        if name not in saved:
            continue
        if name not in given:
            setattr(args, name, saved[name])
        elif name in MODEL_SETTINGS and getattr(args, name) != saved[name]:
            contradicted.append(f'--{name} {saved[name]} (not {getattr(args, name)})')
    if contradicted:
        raise CheckpointError(f'{path} was trained with ' + ', '.join(contradicted) + ': leave these flags out '
                              'to resume with its settings, or start a new run in another --model_path')
    return checkpoint


def resume(checkpoint, path, vocab_path, config, stateful):
    """Load a checkpoint into (encoder, decoder, optimizer, scheduler, scaler) and the random-number
    generator; returns the position (epoch, batches done in it, step) and the history."""
    trained_with = checkpoint['model_args']
    if trained_with.get('vocab_size', config.vocab_size) != config.vocab_size:
        raise CheckpointError(f'{path} was trained with a vocabulary of {trained_with["vocab_size"]} words '
                              f'but {vocab_path} has {config.vocab_size}: pass the vocabulary it was trained with')
    changed = [f'{k} {trained_with[k]} (now {v})' for k, v in asdict(config).items()
               if k in trained_with and k != 'vocab_size' and trained_with[k] != v]
    if changed:
        raise CheckpointError(f'{path} was trained with ' + ', '.join(changed) +
                              ': resume with the settings it was trained with')
    try:
        for name, thing in zip(('encoder', 'decoder', 'optimizer', 'scheduler', 'scaler'), stateful):
            thing.load_state_dict(checkpoint[name])
        torch.set_rng_state(checkpoint['rng'])
        return checkpoint['epoch'], checkpoint['batches_done'], checkpoint['step'], checkpoint['history']
    except (KeyError, RuntimeError, ValueError) as err:
        raise CheckpointError(f'{path}: cannot resume with these settings ({str(err).splitlines()[0]})') from None


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
