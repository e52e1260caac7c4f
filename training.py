"""Cross-entropy training of the captioning model, the library behind train.py (which has the command line and
its one-line errors): its flags (parse_args), the run each training holds (Run: its processes, data,
optimization, progress and logs, each built whole by start_run), and the loop (train), with what else uses its
parts: validation_loss, sample_captions, and the dataset, sampler and model a run starts from.

Everything sample.py needs (model sizes, vocabulary, weights) goes into one checkpoint file, and with a
validation set best.pt keeps the epoch of lowest validation loss. Ctrl-C or SIGTERM saves a checkpoint
after the current step, then stops (Interrupted). --resume takes the run's settings from the checkpoint.
"""
import argparse
import contextlib
import logging
import math
import os
import sys
from dataclasses import dataclass, field, replace
from itertools import chain

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import scst
from data_loader import (
    CocoDataset,
    FeatureDataset,
    GroupedSampler,
    ResumableSampler,
    batches,
    collate_groups,
    collate_skipping,
    eval_transform,
    first_images,
    open_cache,
    train_transform,
)
from files import CheckpointError, ImageError
from flags import HelpFormatter, count, nonnegative_float, positive_float, positive_int
from model import (
    Captioner,
    CaptionerConfig,
    add_config_arguments,
    build_captioner,
    caption_loss,
    ids_to_sentence,
    read_checkpoint,
    save_checkpoint,
)
from runs import (
    Optimization,
    Progress,
    RunState,
    StopRequest,
    agree,
    amp_dtype,
    check_paths,
    configure_cuda,
    describe_device,
    pins_memory,
    save_run,
    settle_settings,
    setup_distributed,
    to_device,
)
from vocabulary import load_vocab


def parse_args(argv=None, description=None):
    """train.py's settings, from argv (None: the command line); description heads --help."""
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    parser.add_argument('--model_path', type=str, default='models/',
                        help='folder for checkpoint.pt, best.pt, history.json and TensorBoard logs')
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

    add_config_arguments(parser)  # --embed_size, --hidden_size, ... : one flag per CaptionerConfig field
    parser.add_argument('--weights', type=str, default='DEFAULT',
                        help="backbone weights: DEFAULT (ImageNet: torchvision's, downloaded; efficientnet_lite0's, "
                             'from its installed package), none, or a local .pth file')
    parser.add_argument('--no_flip', action='store_true', help='no random mirroring (when captions say left/right)')

    parser.add_argument('--num_epochs', type=positive_int, default=5, help='passes over the training captions')
    parser.add_argument('--batch_size', type=positive_int, default=128,
                        help='captions per step, per process (so torchrun multiplies it)')
    parser.add_argument('--captions_per_image', type=positive_int, default=1,
                        help='N > 1: batches of --batch_size // N images with up to N of their captions each, so '
                             'the encoder runs once per image, not once per caption; every caption is still '
                             'trained once an epoch (cross-entropy training only)')
    parser.add_argument('--num_workers', type=count, default=2, help='processes that read and decode images')
    parser.add_argument('--cache_images', type=nonnegative_float, default=2, metavar='GB',
                        help='decode the training images once and keep them in memory when they take at most this '
                             'many GB (judged by the first image); 0: read them from their files at every use')
    parser.add_argument('--learning_rate', type=positive_float, default=0.001, help="Adam's learning rate")
    parser.add_argument('--lr_schedule', choices=['constant', 'cosine'], default='constant',
                        help='cosine decays the learning rate to 0 over all steps')
    parser.add_argument('--grad_clip', type=positive_float, default=None, help='clip the gradient norm to this value')
    parser.add_argument('--alpha_c', type=nonnegative_float, default=1.0,
                        help="--decoder attention: weight of the doubly stochastic penalty, which asks every cell to "
                             "get about as much attention over a caption as any other")
    parser.add_argument('--strict', action='store_true',
                        help='stop at a missing or unreadable image instead of skipping it')
    parser.add_argument('--skip_nonfinite', action='store_true',
                        help='skip a batch whose loss is NaN or inf instead of stopping')
    parser.add_argument('--amp', action='store_true', help='mixed precision: bf16 (fp16 on older GPUs) autocast')
    parser.add_argument('--no_amp', dest='amp', action='store_false', default=False,
                        help='full float32: turns off the --amp a resumed run was trained with')
    parser.add_argument('--compile', nargs='?', const='default', choices=['default', 'reduce-overhead'], default=None,
                        help="run the LSTM's time loop through torch.compile (reduce-overhead: as CUDA graphs)")
    parser.add_argument('--no_tf32', action='store_true',
                        help='on a GPU, float32 matrix products and convolutions in full float32, not in TF32 '
                             '(faster, with a 10-bit mantissa)')
    parser.add_argument('--tf32', dest='no_tf32', action='store_false', default=False,
                        help='TF32 again: turns off the --no_tf32 a resumed run was trained with')
    parser.add_argument('--resume', type=str, nargs='?', const='latest', default=None,
                        help="continue a run from a checkpoint, with its settings (no path: checkpoint.pt "
                             "in --model_path)")
    parser.add_argument('--device', type=str, default=None, help='cuda, mps or cpu (None: the best available)')
    parser.add_argument('--seed', type=int, default=0,
                        help='seed of the weights and the shuffle; each process draws its crops, flips and dropout '
                             'from seed + its rank')
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


class Interrupted(Exception):
    """Training stopped on request, after saving a checkpoint."""


class NonFiniteLoss(Exception):
    """The loss became NaN or inf; training stopped without saving, so the last checkpoint stays good."""


class RecompileLimit(Exception):
    """--compile: torch.compile passed its recompile limit where it is set to fail there; training stopped
    without saving, so the last checkpoint stays good."""


@dataclass(frozen=True)
class Data:
    """The training batches and the validation set, each process with its own share of both."""
    sampler: ResumableSampler  # which captions each batch of each epoch holds; a resumed run starts mid-epoch
    loader: torch.utils.data.DataLoader
    val_set: CocoDataset | None  # None without --val_caption_path
    val_loader: torch.utils.data.DataLoader | None

    @property
    def steps_per_epoch(self):
        return self.sampler.batches_per_epoch  # of each process's share: see data_loader.batch_sizes


@dataclass(frozen=True)
class Logs:
    """The TensorBoard writer, None where nothing is logged (--tensorboard none, or a process other than the
    main one), and the folder it writes to."""
    writer: object  # a SummaryWriter, or None
    folder: str


@dataclass
class Skips:
    """What a run skipped: each unreadable image is reported once, and each epoch's counts at its end."""
    nonfinite: int = 0  # batches of this epoch with a NaN or inf loss
    unreadable: set = field(default_factory=set)  # the reasons already reported
    unreadable_this_epoch: int = 0  # captions of unreadable images


@dataclass(kw_only=True)
class Run(RunState):
    """Everything one training run holds besides what every run does (RunState): the model as one module
    (and wrapped for DDP), its data, its logs and what it skipped."""
    model: Captioner  # the encoder and the decoder as one module
    ddp_model: nn.Module  # model, or under torchrun model wrapped in DistributedDataParallel
    data: Data
    logs: Logs
    skips: Skips = field(default_factory=Skips)


def build_model(args, vocab_size):
    """(encoder, decoder, config); from a feature cache, the backbone and image sizes are the cache's."""
    config = CaptionerConfig.from_args(args, vocab_size)
    if not args.features:
        return (*build_captioner(config, args.weights), config)
    _, _, meta = open_cache(args.features)
    config = replace(config, backbone=meta['backbone'], image_size=meta['image_size'], crop_size=meta['crop_size'])
    encoder, decoder = build_captioner(replace(config, train_backbone=False))  # cached features: nothing to train
    encoder.resnet.load_state_dict(read_checkpoint(os.path.join(args.features, 'backbone.pt')))
    return encoder, decoder, config


def training_set(args, config, vocab):
    """The training captions with their images, or with their cached features (--features)."""
    if args.features:
        return FeatureDataset(args.features, args.caption_path, vocab, mirror=not args.no_flip, split=args.split,
                              grid_size=config.feature_grid)
    return CocoDataset(args.image_dir, args.caption_path, vocab,
                       train_transform(config.crop_size, not args.no_flip, config.normalization),
                       skip_unreadable=not args.strict, return_errors=True, split=args.split)


def cache_training_images(dataset, args, report=True):
    """--cache_images: the training images decoded once into memory when they fit, else read from their files
    at every use, as the tutorial reads them; report: say in one line which."""
    if not args.cache_images:
        line = 'images: read from their files at every use (--cache_images 0)'
    else:
        cached, size = dataset.cache_images(int(args.cache_images * 1e9), progress=report)
        line = (f'images: decoded once into memory ({size / 1e6:.0f} MB), cropped from there every epoch' if cached
                else 'images: read from their files at every use: decoded, they would take more than '
                     f'--cache_images {args.cache_images:g} GB' + (f' (about {size / 1e9:.1f})' if size else ''))
    if report:
        print(line, flush=True)


def training_sampler(dataset, args, rank, world_size):
    """(batch sampler, collate function) of the training batches: captions one by one, or in groups per
    image with --captions_per_image."""
    if args.captions_per_image == 1:
        return ResumableSampler(dataset, args.batch_size, rank, world_size, args.seed), collate_skipping
    image_ids = [dataset.image_id(index) for index in range(len(dataset))]
    return (GroupedSampler(image_ids, args.batch_size, args.captions_per_image, rank, world_size, args.seed),
            collate_groups)


def build_loaders(args, config, vocab, processes):
    """The Data of a run: the training and validation loaders, each process with its own share of both. On a
    GPU, in page-locked memory, so that batches copy to it while it computes. The training loader's workers
    draw their crops and flips from seed + rank, as the process itself does."""
    pin_memory = pins_memory(processes.device)
    dataset = training_set(args, config, vocab)
    sampler, collate = training_sampler(dataset, args, processes.rank, processes.world_size)  # may refuse: first
    if not args.features:
        cache_training_images(dataset, args, report=processes.main)
    loader = batches(dataset, args.batch_size, shuffle=False, num_workers=args.num_workers, sampler=sampler,
                     collate=collate, pin_memory=pin_memory, seed=args.seed + processes.rank)
    if not args.val_caption_path:
        return Data(sampler, loader, val_set=None, val_loader=None)
    val_set = CocoDataset(args.val_image_dir, args.val_caption_path, vocab,
                          eval_transform(config.image_size, config.crop_size, config.normalization),
                          skip_unreadable=not args.strict,
                          return_errors=True, split='val')
    validated = first_images(val_set, args.val_max_images)
    # Every process validates every world_size-th caption: no caption twice, so the sums of all the
    # shares are those of the whole set.
    share = range(processes.rank, len(validated), processes.world_size)
    val_loader = batches(validated, args.batch_size, shuffle=False, num_workers=args.num_workers, sampler=share,
                         collate=collate_skipping, pin_memory=pin_memory)
    return Data(sampler, loader, val_set, val_loader)


def lr_factor(step, schedule, total_steps):
    """Factor on the learning rate: constant, or a cosine from 1 down to 0 at the last step."""
    if schedule == 'constant':
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * min(step / total_steps, 1.0)))


def build_optimizer(args, model, device, steps_per_epoch, autocast_dtype):
    """The Optimization of a run: Adam over what trains (the encoder's head and the decoder, the backbone too
    with --train_backbone), the learning-rate schedule, and the gradient scaler that fp16 autocast
    (autocast_dtype float16) needs."""
    encoder = model.encoder
    trained = [encoder.linear, encoder.bn, model.decoder] + ([encoder.resnet] if args.train_backbone else [])
    params = [p for module in trained for p in module.parameters()]
    optimizer = torch.optim.Adam(params, lr=args.learning_rate)
    total_steps = steps_per_epoch * args.num_epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                  lambda step: lr_factor(step, args.lr_schedule, total_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
    return Optimization(params, optimizer, scheduler, scaler, autocast_dtype)


def open_logs(args, processes, step):
    """The run's Logs: a TensorBoard writer in the main process, unless --tensorboard none."""
    folder = args.tensorboard or os.path.join(args.model_path, 'tensorboard')
    if not processes.main or args.tensorboard == 'none':
        return Logs(writer=None, folder=folder)
    # Imported here: only training logs, and TensorBoard takes a while to import.
    from torch.utils.tensorboard import SummaryWriter
    # purge_step drops what a run that stopped after its last checkpoint logged past it.
    return Logs(tensorboard(lambda: SummaryWriter(folder, purge_step=step if args.resume else None), folder), folder)


def for_ddp(model, args, processes):
    """The model that trains: the model itself in one process; under torchrun, however many processes it
    started, the model wrapped in DistributedDataParallel, which averages the gradients of all of them."""
    if not processes.distributed:
        return model
    if args.features:  # the backbone on the CPU, frozen and the same everywhere: nothing for DDP to sync
        resnet = model.encoder.resnet
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            model, [f'encoder.resnet.{name}' for name, _ in chain(resnet.named_parameters(), resnet.named_buffers())])
    device = processes.device
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)


def start_run(args):
    """A run from scratch, or where its checkpoint left it (--resume): model, data, optimizer and logs."""
    check_paths(args)
    vocab = load_vocab(args.vocab_path)
    args, resumed = settle_settings(args, vocab)
    if args.compile and args.decoder == 'attention':
        raise ValueError("--compile compiles the fc decoder's LSTM loop over whole sequences; the attention decoder "
                         'steps its cell one word at a time: leave out --compile')
    processes = setup_distributed(args.device)
    configure_cuda(processes.device, tf32=not args.no_tf32)
    autocast_dtype = amp_dtype(processes.device) if args.amp else None
    if processes.main:
        print(describe_device(processes.device, precision(autocast_dtype)), flush=True)
    torch.manual_seed(args.seed)  # the same weights in every process
    encoder, decoder, config = build_model(args, len(vocab))
    if processes.rank:  # each other process draws its own crops, flips and dropout; rank 0 draws on from seed
        torch.manual_seed(args.seed + processes.rank)
    if resumed:
        resumed.check_config(config)  # a feature cache decides the backbone and image sizes
    data = build_loaders(args, config, vocab, processes)
    model = Captioner(encoder, decoder, from_features=bool(args.features))
    for part in on_device(model):
        part.to(processes.device)
    if args.compile:
        decoder.lstm.compile_loop(mode=args.compile)
    optimization = build_optimizer(args, model, processes.device, data.steps_per_epoch, autocast_dtype)
    progress = Progress(history={'train': [], 'val': []})
    if resumed:
        progress = resumed.restore(encoder, decoder, optimization, processes.device)
        report_resumed(args, processes, progress, resumed.path)
        del resumed  # the weights now live in the model; the optimizer state may be large
    logs = open_logs(args, processes, progress.step)
    ddp_model = for_ddp(model, args, processes)
    if processes.main and isinstance(ddp_model, DistributedDataParallel):
        print(f'torchrun: {processes.world_size} process{"" if processes.world_size == 1 else "es"}, the model in '
              f'DistributedDataParallel over {dist.get_backend()}', flush=True)
    return Run(args=args, processes=processes, vocab=vocab, config=config, encoder=encoder, decoder=decoder,
               optimization=optimization, progress=progress, model=model, ddp_model=ddp_model, data=data, logs=logs)


def precision(autocast_dtype):
    """What the device line says of the dtype: float32, or --amp's autocast."""
    if autocast_dtype is None:
        return 'float32'
    if autocast_dtype == torch.bfloat16:
        return 'bfloat16 autocast (--amp)'
    return 'float16 autocast with gradient scaling (--amp; this GPU has no native bfloat16)'


def on_device(model):
    """The parts of the model that live on the device. From a feature cache (--features) all but the
    backbone: training never runs it, so it waits on the CPU, out of the GPU's memory, until validation
    and the logged captions need it for images (backbone_on_device)."""
    encoder = model.encoder
    return [encoder.linear, encoder.bn, model.decoder] if model.from_features else [model]


@contextlib.contextmanager
def backbone_on_device(run):
    """The backbone on the device while images are captioned; with --features, back on the CPU afterwards."""
    if run.args.features:
        run.encoder.resnet.to(run.processes.device)
    try:
        yield
    finally:
        if run.args.features:
            run.encoder.resnet.to('cpu')


def report_resumed(args, processes, progress, resume_path):
    if processes.main and progress.epoch >= args.num_epochs:
        print(f'{resume_path} has already finished its run of {progress.epoch} epochs. To train longer, resume with '
              f'--num_epochs N, for N more than {progress.epoch}', flush=True)
    elif processes.main:
        print(f'resuming from {resume_path}: epoch {progress.epoch + 1}, step {progress.step}')


def save(run):
    """checkpoint.pt and history.json, written by the main process only; returns the checkpoint."""
    checkpoint = run.to_checkpoint()
    if run.processes.main:
        save_run(checkpoint, run.args.model_path)
    return checkpoint


def report_unreadable(run, errors):
    """Each unreadable image once, or with --strict the first as an error."""
    skips = run.skips
    for reason in errors:
        if run.args.strict:
            raise ImageError(unreadable_message(reason))
        if reason not in skips.unreadable:
            skips.unreadable.add(reason)
            tqdm.write(f'skipped: {reason}', file=sys.stderr)
    skips.unreadable_this_epoch += len(errors)


def batch_loss(run, inputs, captions, lengths):
    """A batch's loss, its tensors copied to the device without waiting for it (from page-locked memory on a GPU)."""
    device, autocast_dtype = run.processes.device, run.optimization.amp_dtype
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        loss, _ = caption_loss(run.ddp_model, to_device(inputs, device), to_device(captions, device), lengths,
                               run.args.alpha_c)
    return loss


def train_step(run, loss, nonfinite):
    """One optimizer step from a batch's loss; False when the loss was NaN or inf in some process
    (nonfinite) and --skip_nonfinite skips the batch, as every process does."""
    args, progress, optimization = run.args, run.progress, run.optimization
    if nonfinite:
        if not args.skip_nonfinite:
            value = loss.item() if not torch.isfinite(loss) else 'NaN or inf in another process'
            raise NonFiniteLoss(f'the loss became {value} at epoch {progress.epoch + 1}, step {progress.step + 1}; '
                                f'{run.checkpoint_path} is the last good checkpoint. Try a lower '
                                '--learning_rate, --grad_clip, or --skip_nonfinite')
        run.skips.nonfinite += 1
        return False
    optimizer, scaler = optimization.optimizer, optimization.scaler
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if args.grad_clip:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(optimization.params, args.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimization.scheduler.step()
    progress.step += 1
    return True


def log_loss(run, loss, bar):
    value, progress, writer = loss.item(), run.progress, run.logs.writer
    progress.history['train'].append({'epoch': progress.epoch, 'step': progress.step, 'loss': value,
                                      'perplexity': math.exp(value)})
    bar.set_postfix(loss=f'{value:.4f}', perplexity=f'{math.exp(value):.2f}')
    if writer is not None:
        writer.add_scalar('train/loss', value, progress.step)
        writer.add_scalar('train/perplexity', math.exp(value), progress.step)
        writer.add_scalar('train/learning_rate', run.optimization.scheduler.get_last_lr()[0], progress.step)


def train_epoch(run, stop, on_step=None):
    """The rest of the current epoch, from the batch a resumed run stopped at.

    Under DDP every process must take the same branch at every step, or the others wait for it forever:
    skip a batch with no readable image in some process, skip (or stop at) a NaN or inf loss in some
    process, stop after the step when some process was asked to. The last two travel together (agree):
    one all-reduce after the forward pass, the step's one wait for the device in a single process. The
    first needs its own, before the forward pass. It cannot join them by fetching the next batch early:
    with --num_workers 0 its random crops draw from the generator the checkpoint saves, so a run resumed
    after this step would crop that batch differently.
    """
    args, progress, processes, data = run.args, run.progress, run.processes, run.data
    device, world_size = processes.device, processes.world_size
    data.sampler.start(progress.epoch, progress.batches_done)
    start_step, start_batches = progress.step, progress.batches_done
    bar = tqdm(data.loader, desc=f'epoch {progress.epoch + 1}/{args.num_epochs}', dynamic_ncols=True,
               initial=progress.batches_done, total=data.steps_per_epoch, disable=not processes.main)
    for inputs, captions, lengths, errors in bar:
        if args.compile == 'reduce-overhead':
            torch.compiler.cudagraph_mark_step_begin()  # a skipped batch leaves a backward pending
        report_unreadable(run, errors)
        progress.batches_done += 1
        [unreadable] = agree([inputs is None], device, world_size)
        if unreadable:
            continue
        loss = batch_loss(run, inputs, captions, lengths)
        nonfinite, stopping = agree([~torch.isfinite(loss), stop.requested], device, world_size)
        trained = train_step(run, loss, nonfinite)
        if trained and progress.step % args.log_step == 0:
            log_loss(run, loss, bar)
        if trained and on_step is not None:
            on_step(progress.step)
        if world_size == 1:  # one process's own flag is the agreed one, and it may have changed since
            stopping = stop.requested
        if stopping:
            save(run)
            raise Interrupted(f'stopped at epoch {progress.epoch + 1}, step {progress.step}; checkpoint saved to '
                              f'{run.checkpoint_path}; continue with --resume')
        if trained and args.save_step and progress.step % args.save_step == 0:
            save(run)
    check_something_trained(run, progress.batches_done - start_batches, progress.step > start_step)


def check_something_trained(run, seen, trained):
    """An epoch that saw batches but trained on none of them is an error. step, batches_done and the skips
    agree in every process, so all of them stop together."""
    if not seen or trained:
        return
    epoch, nonfinite = run.progress.epoch, run.skips.nonfinite
    if not nonfinite:
        raise ImageError(f'epoch {epoch + 1}: no image could be read, so nothing was trained; check the '
                         f'images in {run.args.image_dir}')
    raise NonFiniteLoss(f'epoch {epoch + 1}: nothing was trained: {nonfinite} of its {seen} batches had a '
                        'NaN or inf loss (the others no readable image); try a lower --learning_rate or --grad_clip')


def end_epoch(run):
    """Count the epoch done, report its skips, validate, log and save; returns the checkpoint."""
    progress, skips, main_process, writer = run.progress, run.skips, run.processes.main, run.logs.writer
    progress.epoch, progress.batches_done = progress.epoch + 1, 0
    if skips.nonfinite and main_process:
        print(f'epoch {progress.epoch}: skipped {skips.nonfinite} batches whose loss was NaN or inf', flush=True)
    if skips.unreadable_this_epoch and main_process:
        print(f'epoch {progress.epoch}: skipped {skips.unreadable_this_epoch} captions of unreadable images',
              flush=True)
    skips.nonfinite = skips.unreadable_this_epoch = 0
    improved = validate(run) if run.data.val_loader is not None else False
    if writer is not None:
        shown = run.data.val_set or run.data.loader.dataset
        with contextlib.nullcontext() if isinstance(shown, FeatureDataset) else backbone_on_device(run):
            captions = sample_captions(run.model, shown, run.vocab, run.processes.device,
                                       cudagraphs=run.args.compile == 'reduce-overhead')
        writer.add_text('captions', captions, progress.step)
        tensorboard(writer.flush, run.logs.folder)
    checkpoint = save(run)
    if improved and main_process:
        save_checkpoint(os.path.join(run.args.model_path, 'best.pt'), checkpoint)
    return checkpoint


def validate(run):
    """The held-out loss, into the history and the logs; returns whether it is the lowest so far.

    Under DDP every process validates its share at the same time (the shares' sums make the loss), so none
    waits for another longer than a share takes, however large the validation set. They validate the main
    process's model, the one the checkpoint holds: its BatchNorm statistics are sent to the others, which
    each updated their own in their last training step.
    """
    progress, processes, writer = run.progress, run.processes, run.logs.writer
    if processes.world_size > 1:
        for buffer in (buffer for part in on_device(run.model) for buffer in part.buffers()):
            dist.broadcast(buffer, 0)
    with backbone_on_device(run):  # the validation set is images, also when training from a feature cache
        value = validation_loss(Captioner(run.encoder, run.decoder), run.data.val_loader, processes.device,
                                run.args.strict, processes.world_size, cudagraphs=run.args.compile == 'reduce-overhead')
    improved = value < min((entry['loss'] for entry in progress.history['val']), default=math.inf)
    progress.history['val'].append({'epoch': progress.epoch - 1, 'step': progress.step, 'loss': value,
                                    'perplexity': math.exp(value)})
    if processes.main:
        print(f'epoch {progress.epoch}: validation loss {value:.4f}, perplexity {math.exp(value):.2f}', flush=True)
    if writer is not None:
        writer.add_scalar('val/loss', value, progress.step)
        writer.add_scalar('val/perplexity', math.exp(value), progress.step)
    return improved


def train(args, on_epoch_end=None, on_step=None):
    """Train, writing checkpoint.pt and history.json; returns the TrainingResult.

    on_epoch_end(epoch, encoder, decoder, checkpoint) runs after each epoch; returning False stops
    training. on_step(step) runs after each optimizer step.
    """
    run = start_run(args)
    stop = StopRequest()
    writer = run.logs.writer
    try:
        with recompile_limit_reported(run.args.compile):
            run.model.train()
            while run.progress.epoch < run.args.num_epochs:
                train_epoch(run, stop, on_step)
                checkpoint = end_epoch(run)
                if on_epoch_end is not None and on_epoch_end(run.progress.epoch - 1, run.encoder, run.decoder,
                                                             checkpoint) is False:
                    break
        if writer is not None:
            tensorboard(writer.close, run.logs.folder)
    except BaseException:
        if writer is not None:  # an error is on its way out already: it, not this, is what the user sees
            with contextlib.suppress(OSError):
                writer.close()
        raise
    finally:
        stop.restore()
        if run.processes.distributed:
            dist.destroy_process_group()
    return run.result()


RECOMPILES_ADVICE = ('run with TORCH_LOGS=recompiles to see why it recompiles, or leave out --compile (--resume '
                     'without it continues from the last checkpoint)')


@contextlib.contextmanager
def recompile_limit_reported(compiling):
    """With --compile, torch.compile's recompile limit reported in one line that names --compile and what to do.

    Past the limit (torch._dynamo.config.recompile_limit, 8 by default) Dynamo stops compiling the LSTM loop
    and runs it uncompiled for the rest of the run, slower with the same results, after a warning of many
    lines that names no flag: that warning becomes one warning: line. Where the config says to fail there
    (fail_on_recompile_limit_hit, as the tests set it), Dynamo raises instead: that becomes RecompileLimit,
    which train.py prints as one error: line.
    """
    if not compiling:
        yield
        return
    import torch._dynamo  # --compile has imported it already
    config, errors = torch._dynamo.config, torch._dynamo.exc
    fails = any(getattr(config, name, False) for name in ('fail_on_recompile_limit_hit', 'fail_on_cache_limit_hit'))
    limit_errors = tuple(getattr(errors, name) for name in ('FailOnRecompileLimitHit', 'FailOnCacheLimitHit')
                         if hasattr(errors, name))
    warning = RecompileWarning(report=not fails)
    logger = logging.getLogger('torch._dynamo.convert_frame')
    logger.addFilter(warning)
    try:
        yield
    except limit_errors:
        raise RecompileLimit(f'--compile: torch.compile passed its recompile limit, and '
                             f'torch._dynamo.config.fail_on_recompile_limit_hit is set; {RECOMPILES_ADVICE}') from None
    finally:
        logger.removeFilter(warning)


class RecompileWarning(logging.Filter):
    """Takes Dynamo's warning that it hit its recompile limit out of its log and, once a run, if report,
    prints one warning: line in its place (recompile_limit_reported)."""

    def __init__(self, report):
        super().__init__()
        self.report, self.reported = report, False

    def filter(self, record):
        message = record.getMessage()
        if not message.startswith('torch._dynamo hit config.'):
            return True
        if self.report and not self.reported:
            limit = message.split('\n')[0][len('torch._dynamo hit config.'):]  # 'recompile_limit (8)'
            tqdm.write(f'warning: --compile: torch.compile hit torch._dynamo.config.{limit} and runs the LSTM loop '
                       f'uncompiled from here on (slower, with the same results); {RECOMPILES_ADVICE}', file=sys.stderr)
            self.reported = True
        return False


@torch.no_grad()
def validation_loss(model, loader, device, strict=False, world_size=1, cudagraphs=False):
    """The mean loss per word of the loader's captions. Under DDP (world_size > 1) each process passes its
    share and gets the mean of all the shares' captions together, as one process over the whole set.

    The batches' losses stay on the device until the end, so the loop never waits for it. cudagraphs
    (--compile reduce-overhead): each forward begins a new CUDA-graph step, as each training step does,
    so that the graphs recorded for training replay here instead of being recorded again.
    """
    model.eval()
    losses, counts = [], []
    for inputs, captions, lengths, errors in tqdm(loader, desc='validation', leave=False, dynamic_ncols=True):
        if errors and strict:
            raise ImageError(unreadable_message(errors[0]))
        if inputs is None:
            continue
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        loss, n = caption_loss(model, to_device(inputs, device), to_device(captions, device), lengths)
        losses.append(loss.detach())
        counts.append(n)
    model.train()
    total = sum(loss * n for loss, n in zip(torch.stack(losses).cpu().tolist(), counts)) if losses else 0.0
    count = sum(counts)
    if world_size > 1:
        sums = torch.tensor([total, count], dtype=torch.float64, device=device)
        dist.all_reduce(sums)
        total, count = sums.tolist()
    return total / max(count, 1)


@torch.no_grad()
def sample_captions(model, dataset, vocab, device, count=4, cudagraphs=False):
    """A Markdown table of greedy captions of the first few images of a dataset, beside a reference caption.
    The dataset holds images, or cached features (a FeatureDataset); cudagraphs as for validation_loss."""
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
        encode = model.encoder.head if isinstance(dataset, FeatureDataset) else model.encoder
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        ids = model.decoder.sample(encode(inputs.unsqueeze(0).to(device)))
        caption, reference = ids_to_sentence(ids[0], vocab), ids_to_sentence(reference, vocab)
        rows.append(f"| {image['file_name']} | {caption} | {reference} |")
        if len(seen) == count:
            break
    model.train()
    return '\n'.join(rows)


def unreadable_message(reason):
    return f'{reason} (--strict stops at an unreadable image; without it, the image is skipped)'


def tensorboard(action, folder):
    """action() on the TensorBoard writer; a full disk or an unwritable folder is the same one-line error
    as for any other file training writes."""
    try:
        return action()
    except OSError as err:
        raise CheckpointError(f'could not write TensorBoard logs to {folder} ({err.strerror or err}); '
                              'free some space, or pass --tensorboard none') from None
