"""Train the captioning model.

    python train.py                                      # COCO, the tutorial's defaults
    python train.py --features data/features_train2014   # from extract_features.py's cache: much faster
    torchrun --nproc_per_node=4 train.py ...             # several GPUs (or CPU processes), one per process
    python train.py --resume                             # continue models/checkpoint.pt where it stopped
    tensorboard --logdir models/tensorboard              # watch the losses and sample captions
    python train.py --scst --init_from models/best.pt    # self-critical fine-tuning for CIDEr-D (scst.py)

Everything sample.py needs (model sizes, vocabulary, weights) goes into one checkpoint file, and with a
validation set best.pt keeps the epoch of lowest validation loss. Ctrl-C or SIGTERM saves a checkpoint
after the current step, then stops. --resume takes the run's settings from the checkpoint.
"""
import argparse
import contextlib
import json
import math
import os
import signal
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils.rnn import pack_padded_sequence
from torch.utils.data import Subset
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

import scst
from build_vocab import VocabError, load_vocab
from data_loader import (CocoDataset, FeatureDataset, ImageError, batches, collate_skipping, eval_transform,
                         open_cache, train_transform)
from model import (CheckpointError, DecoderRNN, EncoderCNN, HelpFormatter, atomic_write, count, ids_to_sentence,
                   nonnegative_float, positive_float, positive_int, read_checkpoint, remove_stale_temporaries,
                   save_checkpoint, save_file)

# What --resume takes from the checkpoint when the flag is not given again. The model's settings must
# match the weights, so contradicting them is an error; the schedule's may change on purpose.
MODEL_SETTINGS = ('embed_size', 'hidden_size', 'num_layers', 'max_seq_length', 'backbone', 'train_backbone',
                  'bn_momentum', 'image_size', 'crop_size')
SCHEDULE_SETTINGS = ('num_epochs', 'batch_size', 'learning_rate', 'lr_schedule', 'grad_clip', 'seed', 'no_flip')




def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument('--model_path', type=str, default='models/',
                        help='folder for checkpoint.pt, best.pt, history.json and TensorBoard logs')
    parser.add_argument('--crop_size', type=positive_int, default=224, help='size for randomly cropping images')
    parser.add_argument('--image_size', type=positive_int, default=256, help='size resize.py gave the images')
    parser.add_argument('--vocab_path', type=str, default='data/vocab.json', help='vocabulary from build_vocab.py')
    parser.add_argument('--image_dir', type=str, default='data/resized2014', help='resized training images')
    parser.add_argument('--caption_path', type=str, default='data/annotations/captions_train2014.json',
                        help="training captions: COCO format, or Karpathy's dataset_*.json (its val split validates)")
    parser.add_argument('--split', type=str, default='train', choices=['train', 'val', 'test'],
                        help='the part of a Karpathy --caption_path to train on (train includes restval)')
    parser.add_argument('--features', type=str, default=None, help='train from this extract_features.py cache')
    parser.add_argument('--val_image_dir', type=str, default=None, help='resized validation images')
    parser.add_argument('--val_caption_path', type=str, default=None, help='validation captions, for held-out loss')
    parser.add_argument('--val_max_images', type=positive_int, default=None,
                        help='validate on the captions of only the first N validation images (by id)')
    parser.add_argument('--tensorboard', type=str, default=None,
                        help='folder for TensorBoard logs (default: tensorboard/ in --model_path); none: no logs')
    parser.add_argument('--log_step', type=positive_int, default=10, help='steps between logged losses')
    parser.add_argument('--save_step', type=count, default=1000, help='steps between checkpoints (also every epoch)')

    parser.add_argument('--embed_size', type=positive_int, default=256, help='dimension of word embedding vectors')
    parser.add_argument('--hidden_size', type=positive_int, default=512, help='dimension of lstm hidden states')
    parser.add_argument('--num_layers', type=positive_int, default=1, help='number of layers in lstm')
    parser.add_argument('--max_seq_length', type=positive_int, default=20,
                        help='longest caption the model writes, in words')
    parser.add_argument('--backbone', type=str, default='resnet152', help='torchvision ResNet name, or smallcnn')
    parser.add_argument('--weights', type=str, default='DEFAULT',
                        help="backbone weights: DEFAULT (ImageNet, downloaded), none, or a local .pth file")
    parser.add_argument('--train_backbone', action='store_true', help='train the CNN too instead of freezing it')
    parser.add_argument('--bn_momentum', type=nonnegative_float, default=0.01,
                        help="momentum of the encoder head's BatchNorm")
    parser.add_argument('--forget_bias', type=float, default=None, help='initial forget-gate bias (None: random)')
    parser.add_argument('--no_flip', action='store_true', help='no random mirroring (when captions say left/right)')

    parser.add_argument('--num_epochs', type=positive_int, default=5, help='passes over the training captions')
    parser.add_argument('--batch_size', type=positive_int, default=128,
                        help='captions per step, per process (so torchrun multiplies it)')
    parser.add_argument('--num_workers', type=count, default=2, help='processes that read and decode images')
    parser.add_argument('--learning_rate', type=positive_float, default=0.001, help="Adam's learning rate")
    parser.add_argument('--lr_schedule', choices=['constant', 'cosine'], default='constant',
                        help='cosine decays the learning rate to 0 over all steps')
    parser.add_argument('--grad_clip', type=positive_float, default=None, help='clip the gradient norm to this value')
    parser.add_argument('--strict', action='store_true',
                        help='stop at a missing or unreadable image instead of skipping it')
    parser.add_argument('--skip_nonfinite', action='store_true',
                        help='skip a batch whose loss is NaN or inf instead of stopping')
    parser.add_argument('--amp', action='store_true', help='mixed precision: bf16 (fp16 on older GPUs) autocast')
    parser.add_argument('--compile', nargs='?', const='default', choices=['default', 'reduce-overhead'], default=None,
                        help="run the LSTM's time loop through torch.compile (reduce-overhead: as CUDA graphs)")
    parser.add_argument('--resume', type=str, nargs='?', const='latest', default=None,
                        help="continue a run from a checkpoint, with its settings (no path: checkpoint.pt "
                             "in --model_path)")
    parser.add_argument('--device', type=str, default=None, help='cuda, mps or cpu (None: the best available)')
    parser.add_argument('--seed', type=int, default=0, help='seed of the weights, the shuffle and the crops')
    scst.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.weights.lower() == 'none':
        args.weights = None
    # Parsed once more with no defaults, only the flags typed on the command line remain: --resume
    # keeps those and takes the rest from the checkpoint.
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    args.flags_given = sorted(vars(parser.parse_args(argv)))
    return args


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


class Captioner(nn.Module):
    """Encoder and decoder as one module, so that DistributedDataParallel sees a single forward."""

    def __init__(self, encoder, decoder, from_features=False):
        super().__init__()
        self.encoder, self.decoder, self.from_features = encoder, decoder, from_features

    def forward(self, inputs, captions, lengths):
        features = self.encoder.head(inputs) if self.from_features else self.encoder(inputs)
        return self.decoder(features, captions, lengths)


def caption_loss(model, inputs, captions, lengths):
    """Mean cross-entropy over the real (packed) words of the batch, and how many words that was."""
    outputs = model(inputs, captions, lengths)
    targets = pack_padded_sequence(captions, lengths, batch_first=True).data
    return nn.functional.cross_entropy(outputs.float(), targets), targets.numel()


@torch.no_grad()
def validation_loss(model, loader, device, strict=False):
    model.eval()
    total, count = 0.0, 0
    for inputs, captions, lengths, errors in tqdm(loader, desc='validation', leave=False, dynamic_ncols=True):
        if errors and strict:
            raise ImageError(unreadable_message(errors[0]))
        if inputs is None:
            continue
        loss, n = caption_loss(model, inputs.to(device), captions.to(device), lengths)
        total, count = total + loss.item() * n, count + n
    model.train()
    return total / max(count, 1)


@torch.no_grad()
def sample_captions(model, dataset, vocab, device, count=4):
    """A Markdown table of greedy captions of the first few images of a dataset, beside a reference caption."""
    model.eval()
    rows, seen = ['| image | caption | a reference |', '|---|---|---|'], set()
    for index in range(len(dataset)):
        image = dataset.coco.imgs[dataset.coco.anns[dataset.ids[index]]['image_id']]
        if image['id'] in seen:
            continue
        inputs, reference = dataset[index]
        if inputs is None:
            continue
        seen.add(image['id'])
        encode = model.encoder.head if model.from_features else model.encoder
        ids = model.decoder.sample(encode(inputs.unsqueeze(0).to(device)))
        caption, reference = ids_to_sentence(ids[0], vocab), ids_to_sentence(reference, vocab)
        rows.append(f"| {image['file_name']} | {caption} | {reference} |")
        if len(seen) == count:
            break
    model.train()
    return '\n'.join(rows)


def unreadable_message(reason):
    return f'{reason} (--strict stops at an unreadable image; without it, the image is skipped)'


def set_forget_bias(lstm, value):
    """Start with the forget gate open so memory survives early training (Gers et al., 2000)."""
    hidden = lstm.hidden_size
    for name, bias in lstm.named_parameters():
        if name.startswith('bias_'):
            with torch.no_grad():
                bias[hidden:2 * hidden] = value if name.startswith('bias_ih') else 0.0


class ResumableSampler(DistributedSampler):
    """Each process's share of a fresh shuffle every epoch (seeded, so reproducible), able to start
    part-way through an epoch: after the batches a resumed run has already done."""

    def __init__(self, dataset, batch_size, rank, world_size, seed):
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        self.batch_size, self.skip = batch_size, 0

    def start(self, epoch, batches_done):
        self.set_epoch(epoch)
        self.skip = batches_done * self.batch_size

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip:])

    def __len__(self):
        return self.num_samples - self.skip


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


class Interrupted(Exception):
    """Training stopped on request, after saving a checkpoint."""


class NonFiniteLoss(Exception):
    """The loss became NaN or inf; training stopped without saving, so the last checkpoint stays good."""


def setup_distributed(args):
    """(rank, world size, device): torchrun's environment variables choose DDP, NCCL on GPU, gloo on CPU."""
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    if world_size == 1:
        return 0, 1, pick_device(args.device)
    local_rank = int(os.environ['LOCAL_RANK'])
    if torch.cuda.is_available() and args.device != 'cpu':
        torch.cuda.set_device(local_rank)
        device, backend = torch.device('cuda', local_rank), 'nccl'
    else:
        device, backend = torch.device('cpu'), 'gloo'
    dist.init_process_group(backend)
    return dist.get_rank(), world_size, device


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


def build_model(args, vocab_size):
    """(encoder, decoder, model_args); from a feature cache, the backbone is the one that made it."""
    if args.features:
        _, _, meta = open_cache(args.features)
        args.backbone, args.image_size, args.crop_size = meta['backbone'], meta['image_size'], meta['crop_size']
        encoder = EncoderCNN(args.embed_size, args.backbone, weights=None, bn_momentum=args.bn_momentum)
        encoder.resnet.load_state_dict(read_checkpoint(os.path.join(args.features, 'backbone.pt')))
    else:
        encoder = EncoderCNN(args.embed_size, args.backbone, args.weights, args.train_backbone, args.bn_momentum)
    decoder = DecoderRNN(args.embed_size, args.hidden_size, vocab_size, args.num_layers, args.max_seq_length)
    if args.forget_bias is not None:
        set_forget_bias(decoder.lstm, args.forget_bias)
    model_args = dict(embed_size=args.embed_size, hidden_size=args.hidden_size, vocab_size=vocab_size,
                      num_layers=args.num_layers, max_seq_length=args.max_seq_length, backbone=args.backbone,
                      train_backbone=args.train_backbone, bn_momentum=args.bn_momentum,
                      image_size=args.image_size, crop_size=args.crop_size)
    return encoder, decoder, model_args


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


def resume(checkpoint, path, vocab_path, model_args, stateful):
    """Load a checkpoint into (encoder, decoder, optimizer, scheduler, scaler) and the random-number
    generator; returns the position (epoch, batches done in it, step) and the history."""
    trained_with = checkpoint['model_args']
    if trained_with.get('vocab_size', model_args['vocab_size']) != model_args['vocab_size']:
        raise CheckpointError(f'{path} was trained with a vocabulary of {trained_with["vocab_size"]} words '
                              f'but {vocab_path} has {model_args["vocab_size"]}: pass the vocabulary it was trained with')
    changed = [f'{k} {trained_with[k]} (now {v})' for k, v in model_args.items()
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


def train(args, on_epoch_end=None, on_step=None):
    """Train, writing checkpoint.pt and history.json; returns (encoder, decoder, vocab, history).

    on_epoch_end(epoch, encoder, decoder, checkpoint) runs after each epoch; returning False stops
    training. on_step(step) runs after each optimizer step.
    """
    checkpoint_path = os.path.join(args.model_path, 'checkpoint.pt')
    resume_path = checkpoint_path if args.resume == 'latest' else args.resume
    resumed = restore_settings(args, resume_path) if args.resume else None
    check_paths(args)
    rank, world_size, device = setup_distributed(args)
    main_process = rank == 0
    torch.manual_seed(args.seed)
    vocab = load_vocab(args.vocab_path)
    encoder, decoder, model_args = build_model(args, len(vocab))
    if args.features:
        dataset = FeatureDataset(args.features, args.caption_path, vocab, mirror=not args.no_flip, split=args.split)
    else:
        dataset = CocoDataset(args.image_dir, args.caption_path, vocab,
                              train_transform(args.crop_size, not args.no_flip), skip_unreadable=not args.strict,
                              return_errors=True, split=args.split)
    sampler = ResumableSampler(dataset, args.batch_size, rank, world_size, args.seed)
    loader = batches(dataset, args.batch_size, shuffle=False, num_workers=args.num_workers, sampler=sampler,
                     collate=collate_skipping)
    val_set = val_loader = None
    if args.val_caption_path and main_process:
        val_set = CocoDataset(args.val_image_dir, args.val_caption_path, vocab,
                              eval_transform(args.image_size, args.crop_size), skip_unreadable=not args.strict,
                              return_errors=True, split='val')
        val_loader = batches(first_images(val_set, args.val_max_images), args.batch_size, shuffle=False,
                             num_workers=args.num_workers, collate=collate_skipping)

    model = Captioner(encoder, decoder, from_features=bool(args.features)).to(device)
    if args.compile:
        decoder.lstm.compile_loop(mode=args.compile)
    trained = [encoder.linear, encoder.bn, decoder] + ([encoder.resnet] if args.train_backbone else [])
    params = [p for module in trained for p in module.parameters()]
    optimizer = torch.optim.Adam(params, lr=args.learning_rate)
    steps_per_epoch = math.ceil(sampler.num_samples / args.batch_size)
    total_steps = steps_per_epoch * args.num_epochs

    def schedule(step):
        """Factor on the learning rate: constant, or a cosine from 1 down to 0 at the last step."""
        if args.lr_schedule == 'constant':
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(step / total_steps, 1.0)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    amp_dtype = None
    if args.amp:
        amp_dtype = torch.float16 if device.type == 'cuda' and not torch.cuda.is_bf16_supported() else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    history = {'train': [], 'val': []}
    epoch, batches_done, step, skipped = 0, 0, 0, 0
    unreadable, unreadable_this_epoch = set(), 0  # each unreadable image is reported once
    if resumed:
        epoch, batches_done, step, history = resume(resumed, resume_path, args.vocab_path, model_args,
                                                    (encoder, decoder, optimizer, scheduler, scaler))
        del resumed  # the weights now live in the model; the optimizer state may be large
        if main_process and epoch >= args.num_epochs:
            print(f'{resume_path} has already finished its run of {epoch} epochs. To train longer, resume with '
                  f'--num_epochs N, for N more than {epoch}', flush=True)
        elif main_process:
            print(f'resuming from {resume_path}: epoch {epoch + 1}, step {step}')
    writer, log_dir = None, args.tensorboard or os.path.join(args.model_path, 'tensorboard')
    if main_process and args.tensorboard != 'none':
        # Imported here: sample.py and evaluate.py import this module, and only training logs.
        from torch.utils.tensorboard import SummaryWriter
        # purge_step drops what a run that stopped after its last checkpoint logged past it.
        writer = tensorboard(lambda: SummaryWriter(log_dir, purge_step=step if args.resume else None), log_dir)

    def save(completed_epochs, batches):
        checkpoint = {'model_args': model_args, 'vocab': [vocab.idx2word[i] for i in range(len(vocab))],
                      'encoder': encoder.state_dict(), 'decoder': decoder.state_dict(),
                      'optimizer': optimizer.state_dict(), 'scheduler': scheduler.state_dict(),
                      'scaler': scaler.state_dict(), 'epoch': completed_epochs, 'batches_done': batches,
                      'step': step, 'history': history, 'rng': torch.get_rng_state(), 'args': vars(args)}
        if main_process:
            save_checkpoint(checkpoint_path, checkpoint)
            save_file(os.path.join(args.model_path, 'history.json'), lambda f: f.write(json.dumps(history).encode()))
        return checkpoint

    ddp_model = model
    if world_size > 1:
        ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)
    stop = StopRequest()
    try:
        model.train()
        while epoch < args.num_epochs:
            sampler.start(epoch, batches_done)
            epoch_start_step, epoch_start_batches = step, batches_done
            bar = tqdm(loader, desc=f'epoch {epoch + 1}/{args.num_epochs}', dynamic_ncols=True,
                       initial=batches_done, total=steps_per_epoch, disable=not main_process)
            for inputs, captions, lengths, errors in bar:
                if args.compile == 'reduce-overhead':
                    torch.compiler.cudagraph_mark_step_begin()  # a skipped batch leaves a backward pending
                for reason in errors:
                    if args.strict:
                        raise ImageError(unreadable_message(reason))
                    if reason not in unreadable:
                        unreadable.add(reason)
                        tqdm.write(f'skipped: {reason}', file=sys.stderr)
                unreadable_this_epoch += len(errors)
                # Under DDP every process must skip the same steps, or the others wait for it forever.
                if any_process(inputs is None, device, world_size):
                    batches_done += 1
                    continue
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    loss, _ = caption_loss(ddp_model, inputs.to(device), captions.to(device), lengths)
                nonfinite = not torch.isfinite(loss)
                if any_process(nonfinite, device, world_size):
                    if not args.skip_nonfinite:
                        value = loss.item() if nonfinite else 'NaN or inf in another process'
                        raise NonFiniteLoss(f'the loss became {value} at epoch {epoch + 1}, step {step + 1}; '
                                            f'{checkpoint_path} is the last good checkpoint. Try a lower '
                                            '--learning_rate, --grad_clip, or --skip_nonfinite')
                    skipped += 1
                    batches_done += 1
                    continue
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if args.grad_clip:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(params, args.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                step, batches_done = step + 1, batches_done + 1
                if step % args.log_step == 0:
                    value = loss.item()
                    history['train'].append({'epoch': epoch, 'step': step, 'loss': value, 'perplexity': math.exp(value)})
                    bar.set_postfix(loss=f'{value:.4f}', perplexity=f'{math.exp(value):.2f}')
                    if writer is not None:
                        writer.add_scalar('train/loss', value, step)
                        writer.add_scalar('train/perplexity', math.exp(value), step)
                        writer.add_scalar('train/learning_rate', scheduler.get_last_lr()[0], step)
                if on_step is not None:
                    on_step(step)
                if any_process(stop.requested, device, world_size):
                    save(epoch, batches_done)
                    raise Interrupted(f'stopped at epoch {epoch + 1}, step {step}; checkpoint saved to '
                                      f'{checkpoint_path}; continue with --resume')
                if args.save_step and step % args.save_step == 0:
                    save(epoch, batches_done)
            seen = batches_done - epoch_start_batches  # step, batches_done and skipped agree in every process
            if seen and step == epoch_start_step and not skipped:
                raise ImageError(f'epoch {epoch + 1}: no image could be read, so nothing was trained; check the '
                                 f'images in {args.image_dir}')
            if seen and step == epoch_start_step:
                raise NonFiniteLoss(f'epoch {epoch + 1}: nothing was trained: {skipped} of its {seen} batches had a '
                                    'NaN or inf loss (the others no readable image); try a lower --learning_rate '
                                    'or --grad_clip')
            epoch, batches_done = epoch + 1, 0
            if skipped and main_process:
                print(f'epoch {epoch}: skipped {skipped} batches whose loss was NaN or inf', flush=True)
            if unreadable_this_epoch and main_process:
                print(f'epoch {epoch}: skipped {unreadable_this_epoch} captions of unreadable images', flush=True)
            skipped = unreadable_this_epoch = 0
            improved = False
            if val_loader is not None:
                value = validation_loss(model, val_loader, device, args.strict)
                improved = value < min((entry['loss'] for entry in history['val']), default=math.inf)
                history['val'].append({'epoch': epoch - 1, 'step': step, 'loss': value, 'perplexity': math.exp(value)})
                print(f'epoch {epoch}: validation loss {value:.4f}, perplexity {math.exp(value):.2f}', flush=True)
                if writer is not None:
                    writer.add_scalar('val/loss', value, step)
                    writer.add_scalar('val/perplexity', math.exp(value), step)
            if writer is not None:
                writer.add_text('captions', sample_captions(model, val_set or dataset, vocab, device), step)
                tensorboard(writer.flush, log_dir)
            checkpoint = save(epoch, 0)
            if improved and main_process:
                save_checkpoint(os.path.join(args.model_path, 'best.pt'), checkpoint)
            if on_epoch_end is not None and on_epoch_end(epoch - 1, encoder, decoder, checkpoint) is False:
                break
        if writer is not None:
            tensorboard(writer.close, log_dir)
            writer = None
    finally:
        stop.restore()
        if writer is not None:  # an error is on its way out already: it, not this, is what the user sees
            with contextlib.suppress(OSError):
                writer.close()
        if world_size > 1:
            dist.destroy_process_group()
    return encoder, decoder, vocab, history


def tensorboard(action, folder):
    """action() on the TensorBoard writer; a full disk or an unwritable folder is the same one-line error
    as for any other file training writes."""
    try:
        return action()
    except OSError as err:
        raise CheckpointError(f'could not write TensorBoard logs to {folder} ({err.strerror or err}); '
                              'free some space, or pass --tensorboard none') from None


def first_images(dataset, count=None):
    """The captions of the first `count` images of a dataset, by image id: a fixed subset (all with None)."""
    if count is None:
        return dataset
    image_of = {index: dataset.coco.anns[ann_id]['image_id'] for index, ann_id in enumerate(dataset.ids)}
    kept = set(sorted(set(image_of.values()))[:count])
    return Subset(dataset, [index for index, image_id in image_of.items() if image_id in kept])


def any_process(flag, device, world_size):
    """Whether flag is true in any process, so that all of them take the same branch at the same step."""
    if world_size == 1:
        return flag
    tensor = torch.tensor(float(flag), device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def main(argv=None):
    args = parse_args(argv)
    try:
        (scst.train if args.scst else train)(args)
    except (Interrupted, scst.Stopped) as err:
        print(err, file=sys.stderr)
        sys.exit(130)
    except (VocabError, ImageError, CheckpointError, NonFiniteLoss, FileNotFoundError, ValueError) as err:
        sys.exit(f'error: {err}')
    except torch.OutOfMemoryError:
        sys.exit(f'error: out of GPU memory with --batch_size {args.batch_size}; try a smaller --batch_size '
                 '(or --amp, or --features to leave the backbone out of training)')


if __name__ == '__main__':
    main()
