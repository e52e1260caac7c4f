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
fresh optimizer, from the first epoch). The encoder stays in eval mode, so its BatchNorm statistics
stay those of cross-entropy training; its layers are trained as cross-entropy training trained them.
"""
import json
import os
import sys
import time

import numpy as np
import torch
from pycocoevalcap.cider.cider_scorer import CiderScorer, cook_refs, cook_test
from torch import nn
from tqdm import tqdm

import decoding
import train as trainer
from build_vocab import plain_words
from data_loader import CocoDataset, FeatureDataset, batches, eval_transform, train_transform
from model import (
    CheckpointError,
    atomic_write,
    decode_options,
    ids_to_sentence,
    load_captioner,
    positive_float,
    positive_int,
    read_checkpoint,
    save_checkpoint,
)


class Stopped(Exception):
    """SCST stopped on Ctrl-C or SIGTERM, after saving a checkpoint."""


def add_arguments(parser):
    group = parser.add_argument_group('self-critical training (scst.py)')
    group.add_argument('--scst', action='store_true', help='fine-tune for CIDEr-D with self-critical training')
    group.add_argument('--init_from', type=str, default=None,
                       help='with --scst: the cross-entropy checkpoint to start from (its weights only)')
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
    special = decode_options(vocab)  # the rules sample.py decodes by
    words, log_probs, mask = decoding.sample(decoder, features, samples, **special)
    rewards = cider(captions_of(words, vocab), np.repeat(image_ids, samples))
    greedy = cider(captions_of(decoder.sample(features.detach(), **special), vocab), image_ids)
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
            ids = decoder.sample(encoder(images.to(device)), **decode_options(vocab))
            scores.extend(cider(captions_of(ids, vocab), image_ids))
    return float(np.mean(scores)) if scores else float('nan')


def check_arguments(args):
    if not (args.init_from or args.resume):
        raise ValueError('--scst needs --init_from CHECKPOINT (a cross-entropy model from train.py) or --resume')
    if args.scst_baseline == 'mean' and args.scst_samples < 2:
        raise ValueError('--scst_baseline mean needs --scst_samples 2 or more: the baseline is the other samples')
    if int(os.environ.get('WORLD_SIZE', '1')) > 1:
        raise ValueError('--scst runs in one process: start it with python, not torchrun')
    args.vocab_path = None  # the checkpoint carries its vocabulary
    trainer.check_paths(args)


def train(args):
    """Self-critical training from --init_from (or --resume); writes checkpoint.pt and history.json in
    --model_path, like cross-entropy training. Returns (encoder, decoder, vocab, history)."""
    check_arguments(args)
    checkpoint_path = os.path.join(args.model_path, 'checkpoint.pt')
    resume_path = (checkpoint_path if args.resume == 'latest' else args.resume) if args.resume else None
    resumed = trainer.restore_settings(args, resume_path) if resume_path else None  # the run's own settings
    encoder, decoder, vocab, model_args = load_captioner(resume_path or args.init_from)
    device = trainer.pick_device(args.device)
    torch.manual_seed(args.seed)
    from_images = args.features is None
    if from_images:
        transform = train_transform(model_args['crop_size'], not args.no_flip)
        captions = CocoDataset(args.image_dir, args.caption_path, vocab, transform, skip_unreadable=not args.strict,
                               split=args.split)
    else:
        cached = read_checkpoint(os.path.join(args.features, 'backbone.pt'))
        if any(not torch.equal(cached[k], v) for k, v in encoder.resnet.state_dict().items()):
            raise CheckpointError(f'{args.features} was made with another backbone than {args.init_from} has: '
                                  'train from images, or from a cache of the backbone the checkpoint was trained with')
        captions = FeatureDataset(args.features, args.caption_path, vocab, mirror=not args.no_flip, split=args.split)
    dataset = PerImage(captions)
    cider = CiderD(dataset.references())
    val_loader = None
    if args.val_caption_path:
        val_set = PerImage(CocoDataset(args.val_image_dir, args.val_caption_path, vocab, skip_unreadable=True,
                                       transform=eval_transform(model_args['image_size'], model_args['crop_size']),
                                       split='val'))
        val_loader, val_cider = batches(val_set, args.batch_size, False, args.num_workers, collate=collate), \
            CiderD(val_set.references())

    encoder.to(device).eval()  # BatchNorm keeps the statistics of cross-entropy training
    decoder.to(device).train()
    trained = [encoder.linear, encoder.bn, decoder]
    if model_args['train_backbone'] and from_images:
        trained.append(encoder.resnet)
        encoder.resnet.requires_grad_(True)
        encoder.train_backbone = True
    params = [p for module in trained for p in module.parameters()]
    optimizer = torch.optim.Adam(params, lr=args.learning_rate)
    sampler = trainer.ResumableSampler(dataset, args.batch_size, 0, 1, args.seed)
    loader = batches(dataset, args.batch_size, False, args.num_workers, sampler=sampler, collate=collate)

    epoch, batches_done, step, history = 0, 0, 0, {'scst': [], 'val': []}
    if resume_path:
        stateful = (encoder, decoder, optimizer)
        epoch, batches_done, step, history = trainer.resume(resumed, resume_path, None, model_args, stateful)
        print(f'resuming from {resume_path}: epoch {epoch + 1}, step {step}')

    def save(completed_epochs, batches):
        checkpoint = {'model_args': model_args, 'vocab': [vocab.idx2word[i] for i in range(len(vocab))],
                      'encoder': encoder.state_dict(), 'decoder': decoder.state_dict(),
                      'optimizer': optimizer.state_dict(), 'scheduler': None, 'scaler': None,  # SCST has neither
                      'epoch': completed_epochs, 'batches_done': batches,
                      'step': step, 'history': history, 'rng': torch.get_rng_state(), 'args': vars(args), 'scst': True}
        save_checkpoint(checkpoint_path, checkpoint)
        atomic_write(os.path.join(args.model_path, 'history.json'), lambda f: f.write(json.dumps(history).encode()))

    start, stop = time.time(), trainer.StopRequest()
    steps_per_epoch = -(-len(dataset) // args.batch_size)
    try:
        while epoch < args.num_epochs:
            sampler.start(epoch, batches_done)
            bar = tqdm(loader, desc=f'scst epoch {epoch + 1}/{args.num_epochs}', dynamic_ncols=True,
                       initial=batches_done, total=steps_per_epoch)
            for inputs, image_ids, errors in bar:
                for reason in errors:
                    tqdm.write(f'skipped: {reason}', file=sys.stderr)
                batches_done += 1
                if inputs is None:
                    continue
                inputs = inputs.to(device)
                features = encoder(inputs) if from_images else encoder.head(inputs)
                loss, reward, greedy = scst_loss(decoder, features, image_ids, cider, vocab, args.scst_samples,
                                                 args.scst_baseline)
                if not torch.isfinite(loss):
                    raise ValueError(f'the SCST loss became {loss.item()} at step {step + 1}; {checkpoint_path} '
                                     'is the last good checkpoint. Try a lower --learning_rate or --grad_clip')
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if args.grad_clip:
                    nn.utils.clip_grad_norm_(params, args.grad_clip)
                optimizer.step()
                step += 1
                bar.set_postfix(reward=f'{reward:.3f}', greedy=f'{greedy:.3f}')
                if step % args.log_step == 0:
                    history['scst'].append({'epoch': epoch, 'step': step, 'reward': float(reward),
                                            'greedy_reward': float(greedy), 'loss': loss.item()})
                out_of_time = args.scst_minutes is not None and time.time() - start > 60 * args.scst_minutes
                if stop.requested or out_of_time:
                    save(epoch, batches_done)
                    message = f'stopped at epoch {epoch + 1}, step {step}; checkpoint saved to {checkpoint_path}'
                    if stop.requested:
                        raise Stopped(message + '; continue with --resume')
                    print(f'{message} after {args.scst_minutes:g} minutes', flush=True)
                    return encoder, decoder, vocab, history
                if args.save_step and step % args.save_step == 0:
                    save(epoch, batches_done)
            epoch, batches_done = epoch + 1, 0
            if val_loader is not None:
                value = greedy_cider(encoder, decoder, vocab, val_loader, val_cider, device)
                history['val'].append({'epoch': epoch - 1, 'step': step, 'cider': value})
                print(f'epoch {epoch}: validation CIDEr-D of greedy captions {value:.3f}', flush=True)
            save(epoch, 0)
    finally:
        stop.restore()
    return encoder, decoder, vocab, history
