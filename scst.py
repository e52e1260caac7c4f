"""Self-critical sequence training (SCST; Rennie et al., "Self-critical Sequence Training for Image
Captioning", CVPR 2017): fine-tune a cross-entropy model for the metric it is judged by, CIDEr-D.

    python train.py --scst --init_from models/demo_hard/best.pt --model_path models/scst \\
        --image_dir data/synthetic_hard/train --caption_path data/synthetic_hard/annotations/captions_train.json \\
        --learning_rate 5e-5 --no_flip --scst_minutes 10

For every image, --scst_samples captions are sampled from the model. Each earns a reward r, its CIDEr-D
against the image's references, and is measured against a baseline b: the reward of the model's own
greedy caption (--scst_baseline greedy, the paper's choice) or the mean reward of the image's other
samples (mean). Minimising -(r - b) log p over the sampled words makes the captions that beat the
baseline more likely and the others less likely. The reward is pycocoevalcap's CIDEr-D code with the
document frequencies of all training references, computed once.

The model sizes and the vocabulary come from the checkpoint; --init_from takes only its weights (a
fresh optimizer, from the first epoch), so an export.py --format safetensors folder serves as well. The
encoder stays in eval mode, so its BatchNorm statistics stay those of cross-entropy training; its layers are
trained as cross-entropy training trained them.
"""
import argparse
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from pycocoevalcap.cider.cider_scorer import CiderScorer, cook_refs, cook_test
from torch import nn
from tqdm import tqdm

import decoding
from data_loader import CocoDataset, FeatureDataset, ResumableSampler, batches, eval_transform, train_transform
from files import CheckpointError
from flags import positive_float, positive_int
from model import DecodeSettings, ids_to_sentence, read_checkpoint
from runs import (
    Optimization,
    Processes,
    Progress,
    RunState,
    StopRequest,
    check_paths,
    configure_cuda,
    describe_device,
    pick_device,
    pins_memory,
    save_run,
    settle_settings,
    to_device,
)
from vocabulary import plain_words


class Stopped(Exception):
    """SCST stopped on Ctrl-C or SIGTERM, after saving a checkpoint."""


def add_arguments(parser):
    group = parser.add_argument_group('self-critical training (scst.py)')
    group.add_argument('--scst', action='store_true', help='fine-tune for CIDEr-D with self-critical training')
    group.add_argument('--init_from', type=str, default=None,
                       help='with --scst: the cross-entropy checkpoint to start from (its weights only), or '
                            'its export.py --format safetensors folder')
    group.add_argument('--scst_baseline', choices=['greedy', 'mean'], default='greedy',
                       help="the reward to beat: the greedy caption's, or the mean of the image's other samples")
    group.add_argument('--scst_samples', type=positive_int, default=5, help='captions sampled per image')
    group.add_argument('--scst_minutes', type=positive_float, default=None,
                       help='stop after this many minutes, with a checkpoint (default: after --num_epochs)')


class _CorpusSized(list):
    """A batch's cooked references that give the number of training images as their length:
    pycocoevalcap's compute_cider takes the document count of its idf from len(crefs)."""

    def __init__(self, refs, corpus_size):
        super().__init__(refs)
        self.corpus_size = corpus_size

    def __len__(self):
        return self.corpus_size


class CiderD:
    """CIDEr-D of captions against their images' references, with the document frequencies of a fixed
    corpus: pycocoevalcap's n-gram counts, document frequencies and CIDEr-D, with the idf of the corpus."""

    def __init__(self, references):
        """references: {image_id: [caption, ...]}, the corpus whose n-gram document frequencies are used."""
        self.refs = {image_id: cook_refs([plain_words(c) for c in captions])
                     for image_id, captions in references.items()}
        self.scorer = CiderScorer(n=4, sigma=6.0)
        self.scorer.crefs = list(self.refs.values())
        self.scorer.compute_doc_freq()

    def __call__(self, captions, image_ids):
        """CIDEr-D of each caption against the references of the image id at the same position."""
        self.scorer.ctest = [cook_test(plain_words(caption)) for caption in captions]
        self.scorer.crefs = _CorpusSized([self.refs[image_id] for image_id in image_ids], len(self.refs))
        return np.array(self.scorer.compute_cider())


class PerImage(torch.utils.data.Dataset):
    """One item per image of a CocoDataset or FeatureDataset: (image or features, image id), or
    (None, reason) for an unreadable image."""

    def __init__(self, captions):
        first = {}
        for index, ann_id in enumerate(captions.ids):
            first.setdefault(captions.coco.anns[ann_id]['image_id'], index)
        self.captions, self.image_ids, self.indices = captions, list(first), list(first.values())

    def references(self):
        return {i: [ann['caption'] for ann in self.captions.coco.imgToAnns[i]] for i in self.image_ids}

    def __getitem__(self, i):
        image, caption = self.captions[self.indices[i]]
        return (image, self.image_ids[i]) if image is not None else (None, caption)  # caption: why it failed

    def __len__(self):
        return len(self.image_ids)


def collate(batch):
    """(inputs, image ids, errors); inputs is None when no image of the batch could be read."""
    readable = [(image, image_id) for image, image_id in batch if image is not None]
    errors = [reason for image, reason in batch if image is None]
    if not readable:
        return None, [], errors
    images, image_ids = zip(*readable)
    return torch.stack(images), list(image_ids), errors


def captions_of(ids, vocab):
    return [ids_to_sentence(row, vocab) for row in ids.cpu()]


def scst_loss(decoder, features, image_ids, cider, vocab, samples, baseline):
    """-(r - b) log p averaged over the sampled words, and the mean rewards of samples and greedy captions."""
    settings = DecodeSettings(samples=samples).for_vocab(vocab)  # the rules sample.py decodes by
    words, log_probs, mask = decoder.draw(features, settings)
    rewards = cider(captions_of(words, vocab), np.repeat(image_ids, samples))
    greedy = cider(captions_of(decoder.sample(features.detach(), settings), vocab), image_ids)
    if baseline == 'greedy':
        baselines = np.repeat(greedy, samples)
    else:
        per_image = rewards.reshape(-1, samples)
        baselines = ((per_image.sum(1, keepdims=True) - per_image) / (samples - 1)).reshape(-1)
    advantage = torch.tensor(rewards - baselines, dtype=log_probs.dtype, device=log_probs.device)
    loss = -(advantage.unsqueeze(1) * log_probs * mask).sum() / mask.sum()
    return loss, rewards.mean(), greedy.mean()


@torch.no_grad()
def greedy_cider(encoder, decoder, vocab, loader, cider, device):
    """Mean CIDEr-D of the greedy captions of a loader's images."""
    scores = []
    for images, image_ids, _ in loader:
        if images is not None:
            ids = decoder.sample(encoder(to_device(images, device)), DecodeSettings().for_vocab(vocab))
            scores.extend(cider(captions_of(ids, vocab), image_ids))
    return float(np.mean(scores)) if scores else float('nan')


def check_arguments(args):
    """Refuse what self-critical training cannot do; returns its settings: args without --vocab_path, since the
    checkpoint carries its vocabulary."""
    if not (args.init_from or args.resume):
        raise ValueError('--scst needs --init_from CHECKPOINT (a cross-entropy model from train.py) or --resume')
    if args.scst_baseline == 'mean' and args.scst_samples < 2:
        raise ValueError('--scst_baseline mean needs --scst_samples 2 or more: the baseline is the other samples')
    if int(os.environ.get('WORLD_SIZE', '1')) > 1:
        raise ValueError('--scst runs in one process: start it with python, not torchrun')
    settings = argparse.Namespace(**{**vars(args), 'vocab_path': None})
    check_paths(settings)
    return settings


@dataclass(frozen=True)
class Data:
    """Each training image once with its references, and the CIDEr-D scorer of their n-grams; the validation
    images and theirs (both None without a validation set)."""
    images: PerImage
    cider: CiderD
    val_loader: torch.utils.data.DataLoader | None
    val_cider: CiderD | None


@dataclass(kw_only=True)
class Run(RunState):
    """What self-critical training holds besides what every run does (RunState): its images, each with its
    references, and the CIDEr-D scorers."""
    data: Data

    @property
    def from_images(self):
        return self.args.features is None

    def checkpoint_marks(self):
        return {'scst': True}  # besides None for the schedule and the scaler, which it has not


def load_data(args, config, vocab, encoder, device):
    """The run's Data: each training image once with its references (from images, or from the feature cache
    the checkpoint's backbone made), and the validation images, if any, in batches for the device."""
    if args.features is None:
        transform = train_transform(config.crop_size, not args.no_flip, config.normalization)
        captions = CocoDataset(args.image_dir, args.caption_path, vocab, transform, skip_unreadable=not args.strict,
                               split=args.split)
    else:
        cached = read_checkpoint(os.path.join(args.features, 'backbone.pt'))
        if any(not torch.equal(cached[k], v) for k, v in encoder.resnet.state_dict().items()):
            raise CheckpointError(f'{args.features} was made with another backbone than {args.init_from} has: '
                                  'train from images, or from a cache of the backbone the checkpoint was trained with')
        captions = FeatureDataset(args.features, args.caption_path, vocab, mirror=not args.no_flip, split=args.split,
                                  grid_size=config.feature_grid)
    images = PerImage(captions)
    cider = CiderD(images.references())
    if not args.val_caption_path:
        return Data(images, cider, val_loader=None, val_cider=None)
    val_set = PerImage(CocoDataset(args.val_image_dir, args.val_caption_path, vocab, skip_unreadable=True,
                                   transform=eval_transform(config.image_size, config.crop_size,
                                                            config.normalization), split='val'))
    val_loader = batches(val_set, args.batch_size, False, args.num_workers, collate=collate,
                         pin_memory=pins_memory(device))
    return Data(images, cider, val_loader, CiderD(val_set.references()))


def build_optimizer(args, config, encoder, decoder, device):
    """The run's Optimization: Adam over what cross-entropy training trained; the encoder stays in eval mode,
    so its BatchNorm keeps the statistics of cross-entropy training."""
    encoder.to(device).eval()
    decoder.to(device).train()
    trained = [encoder.linear, encoder.bn, decoder]
    if config.train_backbone and args.features is None:
        trained.append(encoder.resnet)
        encoder.resnet.requires_grad_(True)
        encoder.train_backbone = True
    params = [p for module in trained for p in module.parameters()]
    return Optimization(params, torch.optim.Adam(params, lr=args.learning_rate))


def start_run(args):
    """A run from --init_from's weights, or where --resume's checkpoint left it, on the device with
    cross-entropy training's CUDA settings (configure_cuda)."""
    args = check_arguments(args)
    args, resumed = settle_settings(args)  # the vocabulary is the checkpoint's own
    processes = Processes(rank=0, world_size=1, device=pick_device(args.device))  # one process: check_arguments
    configure_cuda(processes.device, tf32=not args.no_tf32)
    print(describe_device(processes.device), flush=True)
    encoder, decoder, vocab, config = decoding.load_captioner(resumed.path if resumed else args.init_from)
    torch.manual_seed(args.seed)
    data = load_data(args, config, vocab, encoder, processes.device)
    optimization = build_optimizer(args, config, encoder, decoder, processes.device)
    progress = Progress(history={'scst': [], 'val': []})
    if resumed:
        progress = resumed.restore(encoder, decoder, optimization, processes.device)
        print(f'resuming from {resumed.path}: epoch {progress.epoch + 1}, step {progress.step}')
    return Run(args=args, processes=processes, vocab=vocab, config=config, encoder=encoder, decoder=decoder,
               optimization=optimization, progress=progress, data=data)


def save(run):
    """checkpoint.pt, in train.py's format (so sample.py, evaluate.py and --resume read it), and history.json."""
    save_run(run.to_checkpoint(), run.args.model_path)


def scst_step(run, inputs, image_ids):
    """One optimizer step on a batch of images; returns the mean rewards of the samples and greedy captions."""
    args, progress, optimization = run.args, run.progress, run.optimization
    inputs = to_device(inputs, run.processes.device)
    features = run.encoder(inputs) if run.from_images else run.encoder.head(inputs)
    loss, reward, greedy = scst_loss(run.decoder, features, image_ids, run.data.cider, run.vocab, args.scst_samples,
                                     args.scst_baseline)
    if not torch.isfinite(loss):
        raise ValueError(f'the SCST loss became {loss.item()} at step {progress.step + 1}; {run.checkpoint_path} '
                         'is the last good checkpoint. Try a lower --learning_rate or --grad_clip')
    optimization.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if args.grad_clip:
        nn.utils.clip_grad_norm_(optimization.params, args.grad_clip)
    optimization.optimizer.step()
    progress.step += 1
    if progress.step % args.log_step == 0:
        progress.history['scst'].append({'epoch': progress.epoch, 'step': progress.step, 'reward': float(reward),
                                         'greedy_reward': float(greedy), 'loss': loss.item()})
    return reward, greedy


def scst_epoch(run, loader, stop, deadline):
    """The rest of the current epoch; returns False when --scst_minutes ran out (after saving)."""
    args, progress = run.args, run.progress
    bar = tqdm(loader, desc=f'scst epoch {progress.epoch + 1}/{args.num_epochs}', dynamic_ncols=True,
               initial=progress.batches_done, total=loader.batch_sampler.batches_per_epoch)
    for inputs, image_ids, errors in bar:
        for reason in errors:
            tqdm.write(f'skipped: {reason}', file=sys.stderr)
        progress.batches_done += 1
        if inputs is None:
            continue
        reward, greedy = scst_step(run, inputs, image_ids)
        bar.set_postfix(reward=f'{reward:.3f}', greedy=f'{greedy:.3f}')
        out_of_time = deadline is not None and time.time() > deadline
        if stop.requested or out_of_time:
            save(run)
            message = (f'stopped at epoch {progress.epoch + 1}, step {progress.step}; checkpoint saved to '
                       f'{run.checkpoint_path}')
            if stop.requested:
                raise Stopped(message + '; continue with --resume')
            print(f'{message} after {args.scst_minutes:g} minutes', flush=True)
            return False
        if args.save_step and progress.step % args.save_step == 0:
            save(run)
    return True


def train(args):
    """Self-critical training from --init_from (or --resume); writes checkpoint.pt and history.json in
    --model_path, like cross-entropy training. Returns the TrainingResult."""
    run = start_run(args)
    args, progress, data = run.args, run.progress, run.data  # the settings settled
    sampler = ResumableSampler(data.images, args.batch_size, 0, 1, args.seed)
    loader = batches(data.images, args.batch_size, False, args.num_workers, sampler=sampler, collate=collate,
                     pin_memory=pins_memory(run.processes.device), seed=args.seed)
    deadline = time.time() + 60 * args.scst_minutes if args.scst_minutes is not None else None
    stop = StopRequest()
    try:
        while progress.epoch < args.num_epochs:
            sampler.start(progress.epoch, progress.batches_done)
            if not scst_epoch(run, loader, stop, deadline):
                break
            progress.epoch, progress.batches_done = progress.epoch + 1, 0
            if data.val_loader is not None:
                value = greedy_cider(run.encoder, run.decoder, run.vocab, data.val_loader, data.val_cider,
                                     run.processes.device)
                progress.history['val'].append({'epoch': progress.epoch - 1, 'step': progress.step, 'cider': value})
                print(f'epoch {progress.epoch}: validation CIDEr-D of greedy captions {value:.3f}', flush=True)
            save(run)
    finally:
        stop.restore()
    return run.result()
