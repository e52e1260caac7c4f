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
from build_vocab import VocabError, load_vocab
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
    RunState,
    StopRequest,
    agree,
    amp_dtype,
    check_paths,
    configure_cuda,
    save_run,
    settle_settings,
    setup_distributed,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
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


class Interrupted(Exception):
    """Training stopped on request, after saving a checkpoint."""


class NonFiniteLoss(Exception):
    """The loss became NaN or inf; training stopped without saving, so the last checkpoint stays good."""


@dataclass(kw_only=True)
class Run(RunState):
    """Everything one training run holds besides what every run does (RunState): its processes, data,
    learning-rate schedule, gradient scaler, logs and skipped batches."""
    rank: int
    world_size: int
    model: nn.Module = None  # encoder and decoder as one Captioner; ddp_model is it, or it wrapped for DDP
    ddp_model: nn.Module = None
    sampler: ResumableSampler = None
    loader: object = None
    val_set: object = None
    val_loader: object = None
    scheduler: object = None
    scaler: object = None
    amp_dtype: torch.dtype = None
    writer: object = None
    history: dict = field(default_factory=lambda: {'train': [], 'val': []})
    skipped: int = 0  # batches of this epoch with a NaN or inf loss
    unreadable: set = field(default_factory=set)  # every unreadable image is reported once
    unreadable_this_epoch: int = 0

    def stateful(self):
        """The learning-rate schedule and the gradient scaler are checkpointed too."""
        return {**super().stateful(), 'scheduler': self.scheduler, 'scaler': self.scaler}

    @property
    def main_process(self):
        return self.rank == 0

    @property
    def steps_per_epoch(self):
        return self.sampler.batches_per_epoch  # of each process's share: see data_loader.batch_sizes

    @property
    def log_dir(self):
        return self.args.tensorboard or os.path.join(self.args.model_path, 'tensorboard')


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


def build_loaders(run):
    """The training and validation loaders, each process with its own share of both. On a GPU, in
    page-locked memory, so that batches copy to it while it computes."""
    args, config, vocab = run.args, run.config, run.vocab
    pin_memory = run.device.type == 'cuda'
    dataset = training_set(args, config, vocab)
    run.sampler, collate = training_sampler(dataset, args, run.rank, run.world_size)  # may refuse: before decoding
    if not args.features:
        cache_training_images(dataset, args, report=run.main_process)
    run.loader = batches(dataset, args.batch_size, shuffle=False, num_workers=args.num_workers, sampler=run.sampler,
                         collate=collate, pin_memory=pin_memory)
    if args.val_caption_path:
        run.val_set = CocoDataset(args.val_image_dir, args.val_caption_path, vocab,
                                  eval_transform(config.image_size, config.crop_size, config.normalization),
                                  skip_unreadable=not args.strict, return_errors=True, split='val')
        validated = first_images(run.val_set, args.val_max_images)
        # Every process validates every world_size-th caption: no caption twice, so the sums of all the
        # shares are those of the whole set.
        share = range(run.rank, len(validated), run.world_size)
        run.val_loader = batches(validated, args.batch_size, shuffle=False, num_workers=args.num_workers,
                                 sampler=share, collate=collate_skipping, pin_memory=pin_memory)


def lr_factor(step, schedule, total_steps):
    """Factor on the learning rate: constant, or a cosine from 1 down to 0 at the last step."""
    if schedule == 'constant':
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * min(step / total_steps, 1.0)))


def build_optimizer(run):
    """Adam over what trains (the encoder's head and the decoder, the backbone too with --train_backbone),
    the learning-rate schedule, and the gradient scaler that fp16 autocast needs."""
    args, encoder, device = run.args, run.encoder, run.device
    trained = [encoder.linear, encoder.bn, run.decoder] + ([encoder.resnet] if args.train_backbone else [])
    run.params = [p for module in trained for p in module.parameters()]
    run.optimizer = torch.optim.Adam(run.params, lr=args.learning_rate)
    total_steps = run.steps_per_epoch * args.num_epochs
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(
        run.optimizer, lambda step: lr_factor(step, args.lr_schedule, total_steps))
    if args.amp:
        run.amp_dtype = amp_dtype(device)
        if run.main_process:
            print(f'--amp: bfloat16 autocast on {device}' if run.amp_dtype == torch.bfloat16 else
                  f'--amp: float16 autocast with gradient scaling on {device}, which has no native bfloat16')
    run.scaler = torch.amp.GradScaler(device.type, enabled=run.amp_dtype == torch.float16)


def start_run(args):
    """A run from scratch, or where its checkpoint left it (--resume): model, data, optimizer and logs."""
    check_paths(args)
    vocab = load_vocab(args.vocab_path)
    resumed = settle_settings(args, vocab)
    if args.compile and args.decoder == 'attention':
        raise ValueError("--compile compiles the fc decoder's LSTM loop over whole sequences; the attention decoder "
                         'steps its cell one word at a time: leave out --compile')
    rank, world_size, device = setup_distributed(args.device)
    configure_cuda(device, tf32=not args.no_tf32)
    torch.manual_seed(args.seed)
    encoder, decoder, config = build_model(args, len(vocab))
    if resumed:
        resumed.check_config(config)  # a feature cache decides the backbone and image sizes
    run = Run(args=args, rank=rank, world_size=world_size, device=device, vocab=vocab, config=config,
              encoder=encoder, decoder=decoder)
    build_loaders(run)
    run.model = run.ddp_model = Captioner(encoder, decoder, from_features=bool(args.features))
    for part in on_device(run):
        part.to(device)
    if args.compile:
        decoder.lstm.compile_loop(mode=args.compile)
    build_optimizer(run)
    if resumed:
        run.restore(resumed)
        report_resumed(run, resumed.path)
        del resumed  # the weights now live in the model; the optimizer state may be large
    if run.main_process and args.tensorboard != 'none':
        # Imported here: only training logs, and TensorBoard takes a while to import.
        from torch.utils.tensorboard import SummaryWriter
        # purge_step drops what a run that stopped after its last checkpoint logged past it.
        run.writer = tensorboard(lambda: SummaryWriter(run.log_dir, purge_step=run.step if args.resume else None),
                                 run.log_dir)
    if world_size > 1:
        if args.features:  # the backbone on the CPU, frozen and the same everywhere: nothing for DDP to sync
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                run.model, [f'encoder.resnet.{name}' for name, _ in chain(encoder.resnet.named_parameters(),
                                                                          encoder.resnet.named_buffers())])
        run.ddp_model = DistributedDataParallel(run.model, device_ids=[device.index] if device.type == 'cuda' else None)
    return run


def on_device(run):
    """The parts of the model that live on the device. From a feature cache (--features) all but the
    backbone: training never runs it, so it waits on the CPU, out of the GPU's memory, until validation
    and the logged captions need it for images (backbone_on_device)."""
    encoder = run.encoder
    return [encoder.linear, encoder.bn, run.decoder] if run.args.features else [run.model]


@contextlib.contextmanager
def backbone_on_device(run):
    """The backbone on the device while images are captioned; with --features, back on the CPU afterwards."""
    if run.args.features:
        run.encoder.resnet.to(run.device)
    try:
        yield
    finally:
        if run.args.features:
            run.encoder.resnet.to('cpu')


def report_resumed(run, resume_path):
    if run.main_process and run.epoch >= run.args.num_epochs:
        print(f'{resume_path} has already finished its run of {run.epoch} epochs. To train longer, resume with '
              f'--num_epochs N, for N more than {run.epoch}', flush=True)
    elif run.main_process:
        print(f'resuming from {resume_path}: epoch {run.epoch + 1}, step {run.step}')


def save(run):
    """checkpoint.pt and history.json, written by the main process only; returns the checkpoint."""
    checkpoint = run.to_checkpoint()
    if run.main_process:
        save_run(checkpoint, run.args.model_path)
    return checkpoint


def report_unreadable(run, errors):
    """Each unreadable image once, or with --strict the first as an error."""
    for reason in errors:
        if run.args.strict:
            raise ImageError(unreadable_message(reason))
        if reason not in run.unreadable:
            run.unreadable.add(reason)
            tqdm.write(f'skipped: {reason}', file=sys.stderr)
    run.unreadable_this_epoch += len(errors)


def batch_loss(run, inputs, captions, lengths):
    """A batch's loss, its tensors copied to the device without waiting for it (from page-locked memory on a GPU)."""
    device = run.device
    with torch.autocast(device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
        loss, _ = caption_loss(run.ddp_model, inputs.to(device, non_blocking=True),
                               captions.to(device, non_blocking=True), lengths, run.args.alpha_c)
    return loss


def train_step(run, loss, nonfinite):
    """One optimizer step from a batch's loss; False when the loss was NaN or inf in some process
    (nonfinite) and --skip_nonfinite skips the batch, as every process does."""
    args = run.args
    if nonfinite:
        if not args.skip_nonfinite:
            value = loss.item() if not torch.isfinite(loss) else 'NaN or inf in another process'
            raise NonFiniteLoss(f'the loss became {value} at epoch {run.epoch + 1}, step {run.step + 1}; '
                                f'{run.checkpoint_path} is the last good checkpoint. Try a lower '
                                '--learning_rate, --grad_clip, or --skip_nonfinite')
        run.skipped += 1
        return False
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if args.grad_clip:
        run.scaler.unscale_(run.optimizer)
        nn.utils.clip_grad_norm_(run.params, args.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    run.step += 1
    return True


def log_loss(run, loss, bar):
    value = loss.item()
    run.history['train'].append({'epoch': run.epoch, 'step': run.step, 'loss': value, 'perplexity': math.exp(value)})
    bar.set_postfix(loss=f'{value:.4f}', perplexity=f'{math.exp(value):.2f}')
    if run.writer is not None:
        run.writer.add_scalar('train/loss', value, run.step)
        run.writer.add_scalar('train/perplexity', math.exp(value), run.step)
        run.writer.add_scalar('train/learning_rate', run.scheduler.get_last_lr()[0], run.step)


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
    args = run.args
    run.sampler.start(run.epoch, run.batches_done)
    start_step, start_batches = run.step, run.batches_done
    bar = tqdm(run.loader, desc=f'epoch {run.epoch + 1}/{args.num_epochs}', dynamic_ncols=True,
               initial=run.batches_done, total=run.steps_per_epoch,
               disable=not run.main_process)
    for inputs, captions, lengths, errors in bar:
        if args.compile == 'reduce-overhead':
            torch.compiler.cudagraph_mark_step_begin()  # a skipped batch leaves a backward pending
        report_unreadable(run, errors)
        run.batches_done += 1
        [unreadable] = agree([inputs is None], run.device, run.world_size)
        if unreadable:
            continue
        loss = batch_loss(run, inputs, captions, lengths)
        nonfinite, stopping = agree([~torch.isfinite(loss), stop.requested], run.device, run.world_size)
        trained = train_step(run, loss, nonfinite)
        if trained and run.step % args.log_step == 0:
            log_loss(run, loss, bar)
        if trained and on_step is not None:
            on_step(run.step)
        if run.world_size == 1:  # one process's own flag is the agreed one, and it may have changed since
            stopping = stop.requested
        if stopping:
            save(run)
            raise Interrupted(f'stopped at epoch {run.epoch + 1}, step {run.step}; checkpoint saved to '
                              f'{run.checkpoint_path}; continue with --resume')
        if trained and args.save_step and run.step % args.save_step == 0:
            save(run)
    check_something_trained(run, run.batches_done - start_batches, run.step > start_step)


def check_something_trained(run, seen, trained):
    """An epoch that saw batches but trained on none of them is an error. step, batches_done and skipped
    agree in every process, so all of them stop together."""
    if not seen or trained:
        return
    if not run.skipped:
        raise ImageError(f'epoch {run.epoch + 1}: no image could be read, so nothing was trained; check the '
                         f'images in {run.args.image_dir}')
    raise NonFiniteLoss(f'epoch {run.epoch + 1}: nothing was trained: {run.skipped} of its {seen} batches had a '
                        'NaN or inf loss (the others no readable image); try a lower --learning_rate or --grad_clip')


def end_epoch(run):
    """Count the epoch done, report its skips, validate, log and save; returns the checkpoint."""
    run.epoch, run.batches_done = run.epoch + 1, 0
    if run.skipped and run.main_process:
        print(f'epoch {run.epoch}: skipped {run.skipped} batches whose loss was NaN or inf', flush=True)
    if run.unreadable_this_epoch and run.main_process:
        print(f'epoch {run.epoch}: skipped {run.unreadable_this_epoch} captions of unreadable images', flush=True)
    run.skipped = run.unreadable_this_epoch = 0
    improved = validate(run) if run.val_loader is not None else False
    if run.writer is not None:
        shown = run.val_set or run.loader.dataset
        with contextlib.nullcontext() if isinstance(shown, FeatureDataset) else backbone_on_device(run):
            captions = sample_captions(run.model, shown, run.vocab, run.device,
                                       cudagraphs=run.args.compile == 'reduce-overhead')
        run.writer.add_text('captions', captions, run.step)
        tensorboard(run.writer.flush, run.log_dir)
    checkpoint = save(run)
    if improved and run.main_process:
        save_checkpoint(os.path.join(run.args.model_path, 'best.pt'), checkpoint)
    return checkpoint


def validate(run):
    """The held-out loss, into the history and the logs; returns whether it is the lowest so far.

    Under DDP every process validates its share at the same time (the shares' sums make the loss), so none
    waits for another longer than a share takes, however large the validation set. They validate the main
    process's model, the one the checkpoint holds: its BatchNorm statistics are sent to the others, which
    each updated their own in their last training step.
    """
    if run.world_size > 1:
        for buffer in (buffer for part in on_device(run) for buffer in part.buffers()):
            dist.broadcast(buffer, 0)
    with backbone_on_device(run):  # the validation set is images, also when training from a feature cache
        value = validation_loss(Captioner(run.encoder, run.decoder), run.val_loader, run.device, run.args.strict,
                                run.world_size, cudagraphs=run.args.compile == 'reduce-overhead')
    improved = value < min((entry['loss'] for entry in run.history['val']), default=math.inf)
    run.history['val'].append({'epoch': run.epoch - 1, 'step': run.step, 'loss': value, 'perplexity': math.exp(value)})
    if run.main_process:
        print(f'epoch {run.epoch}: validation loss {value:.4f}, perplexity {math.exp(value):.2f}', flush=True)
    if run.writer is not None:
        run.writer.add_scalar('val/loss', value, run.step)
        run.writer.add_scalar('val/perplexity', math.exp(value), run.step)
    return improved


def train(args, on_epoch_end=None, on_step=None):
    """Train, writing checkpoint.pt and history.json; returns (encoder, decoder, vocab, history).

    on_epoch_end(epoch, encoder, decoder, checkpoint) runs after each epoch; returning False stops
    training. on_step(step) runs after each optimizer step.
    """
    run = start_run(args)
    stop = StopRequest()
    try:
        run.model.train()
        while run.epoch < args.num_epochs:
            train_epoch(run, stop, on_step)
            checkpoint = end_epoch(run)
            if on_epoch_end is not None and on_epoch_end(run.epoch - 1, run.encoder, run.decoder, checkpoint) is False:
                break
        if run.writer is not None:
            tensorboard(run.writer.close, run.log_dir)
            run.writer = None
    finally:
        stop.restore()
        if run.writer is not None:  # an error is on its way out already: it, not this, is what the user sees
            with contextlib.suppress(OSError):
                run.writer.close()
        if run.world_size > 1:
            dist.destroy_process_group()
    return run.encoder, run.decoder, run.vocab, run.history


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
        loss, n = caption_loss(model, inputs.to(device, non_blocking=True), captions.to(device, non_blocking=True),
                               lengths)
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
