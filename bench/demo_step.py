"""One training step of the demo (python demo.py), split into its parts, for each way of loading, in one run.

    python -m bench.demo_step                 # easy and hard sets, float32 and bf16, a couple of minutes
    python -m bench.demo_step --no_bf16 --repeats 15

The demo's settings (smallcnn on 64x64 images, hidden 256, batch 64, --num_workers 0), through training.py's
own dataset, sampler and collate functions, on a synthetic set made for the run:

- plain: one image per caption, read from its PNG file at every use (--captions_per_image 1
  --cache_images 0, the tutorial's way);
- cached: one image per caption, the images decoded once into memory (--cache_images, the demo's way);
- grouped: cached, and batches of 12 images with 5 captions each, the CNN run once per image
  (--captions_per_image 5). Faster steps, but it learns less per epoch (docs/training.md).

Every caption is tokenized before timing: train.py tokenizes each on first use, so only a run's first
epoch pays for it, and the figures are those of the epochs after.

Each in float32 and under bf16 autocast (--amp); bf16 is marked "emulated" where the CPU has no bf16
instructions (demo.py leaves it off there), and there its steps can take ten times as long, so that
--no_bf16 is what keeps the run to a couple of minutes. A step is split into loading (the DataLoader's next batch:
decode or copy, crop, collate), encoder (forward, with each image's features copied to its captions),
decoder (forward and the loss) and backward + Adam (with the demo's gradient clipping). The cases take
turns, a few steps each, in rotating order; every figure is the median over all their steps, and
"x plain fp32" is the captions per second over those of the plain float32 path on the same set.
"""
import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import shapes_demo
import training
from data_loader import batches
from flags import HelpFormatter, positive_int
from model import Captioner, CaptionerConfig
from synthetic import easy, hard, make_synthetic_coco
from vocabulary import build_vocab, load_vocab, save_vocab

PARTS = ('loading', 'encoder', 'decoder', 'backward + Adam')
PATHS = {'plain': ['--captions_per_image', '1', '--cache_images', '0'],
         'cached': ['--captions_per_image', '1', '--cache_images', '2'],
         'grouped': ['--captions_per_image', '5', '--cache_images', '2']}


@dataclass
class Case:
    """One row of the table: a set, a path and a precision, with its own model, optimizer and batches."""
    setting: str
    path: str
    amp: bool
    model: nn.Module
    optimizer: torch.optim.Optimizer
    batches: object
    steps: list = field(default_factory=list)  # (captions, seconds of each part)


def endless(loader):
    """The loader's batches, epoch after epoch, as train.py starts each epoch."""
    epoch = 0
    while True:
        loader.batch_sampler.start(epoch, 0)
        yield from loader
        epoch += 1


def make_set(folder, kind, num_images):
    """A synthetic set of the demo's image size, with its vocabulary; returns the vocabulary's path."""
    make_synthetic_coco(folder, num_images, 1, image_size=64, seed=0, progress=False, kind=kind)
    vocab_path = os.path.join(folder, 'vocab.json')
    save_vocab(build_vocab(os.path.join(folder, 'annotations', 'captions_train.json'), threshold=1), vocab_path)
    return vocab_path


def cases_of(setting, folder, num_images, precisions):
    """The cases of one set: each path in each precision, every model starting from the same weights."""
    hard_set = setting == 'hard'
    vocab_path = make_set(os.path.join(folder, setting), hard if hard_set else easy, num_images)
    cases = []
    for path, flags in PATHS.items():
        demo_args = shapes_demo.parse_args(['--root', os.path.join(folder, setting), '--model_path', folder,
                                            *(['--hard'] if hard_set else []), *flags])
        args = training.parse_args(shapes_demo.train_flags(demo_args, vocab_path))
        vocab = load_vocab(vocab_path)
        dataset = training.training_set(args, CaptionerConfig.from_args(args, len(vocab)), vocab)
        for index in range(len(dataset)):
            dataset.caption(index)  # tokenized once, as in every epoch of train.py but its first
        start = time.perf_counter()
        print(f'{setting} set, {path}:', flush=True)
        training.cache_training_images(dataset, args)
        if dataset.cache is not None:
            print(f'    (in {time.perf_counter() - start:.1f} s, once per run)')
        for amp in precisions:
            torch.manual_seed(0)
            encoder, decoder, _ = training.build_model(args, len(vocab))
            model = Captioner(encoder, decoder).train()
            sampler, collate = training.training_sampler(dataset, args, 0, 1)
            loader = batches(dataset, args.batch_size, shuffle=False, num_workers=args.num_workers, sampler=sampler,
                             collate=collate)
            optimizer = torch.optim.Adam(model.parameters(), lr=args.learning_rate)
            cases.append(Case(setting, path, amp, model, optimizer, endless(loader)))
    return cases


def step(case, grad_clip=5.0):
    """One training step as train.py takes it, timed part by part (on the CPU every operation has finished
    when it returns); the loss is caption_loss's, written out to time the decoder on its own."""
    start = time.perf_counter()
    inputs, captions, lengths, _ = next(case.batches)
    loaded = time.perf_counter()
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=case.amp):
        features = case.model.features(inputs)
        encoded = time.perf_counter()
        outputs = case.model.decoder(features, captions, lengths)
        targets = pack_padded_sequence(captions, lengths, batch_first=True).data
        loss = nn.functional.cross_entropy(outputs.float(), targets)
    decoded = time.perf_counter()
    case.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(case.model.parameters(), grad_clip)
    case.optimizer.step()
    return len(captions), (loaded - start, encoded - loaded, decoded - encoded, time.perf_counter() - decoded)


def report(cases, native_bf16):
    print('\n| set | path | precision | captions/step | ' + ' | '.join(f'{part} (ms)' for part in PARTS)
          + ' | step (ms) | captions/s | x plain fp32 |')
    print('|---|---|---|---:|' + '---:|' * (len(PARTS) + 3))
    rates = [statistics.median(captions / sum(parts) for captions, parts in case.steps) for case in cases]
    base = {case.setting: rate for case, rate in zip(cases, rates) if case.path == 'plain' and not case.amp}
    for case, rate in zip(cases, rates):
        parts = [statistics.median(parts[i] for _, parts in case.steps) * 1000 for i in range(len(PARTS))]
        step_ms = statistics.median(sum(parts) for _, parts in case.steps) * 1000
        precision = ('bf16' if native_bf16 else 'bf16 (emulated)') if case.amp else 'fp32'
        print(f'| {case.setting} | {case.path} | {precision} | '
              f'{statistics.median(captions for captions, _ in case.steps):.0f} | '
              + ' | '.join(f'{value:.1f}' for value in parts)
              + f' | {step_ms:.1f} | {rate:.0f} | {rate / base[case.setting]:.2f}x |')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument('--repeats', type=positive_int, default=5, help='turns of every case; medians over them')
    parser.add_argument('--steps', type=positive_int, default=5, help='steps of a case in each turn')
    parser.add_argument('--warmup', type=positive_int, default=3, help='untimed steps of each case first')
    parser.add_argument('--num_images', type=positive_int, default=1000, help='training images of each set')
    parser.add_argument('--sets', nargs='+', choices=['easy', 'hard'], default=['easy', 'hard'],
                        help='which synthetic sets: the demo and demo.py --hard')
    parser.add_argument('--no_bf16', action='store_true', help='float32 only')
    parser.add_argument('--threads', type=positive_int, default=os.cpu_count(),
                        help='torch threads (demo.py uses every core)')
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    native_bf16 = shapes_demo.cpu_runs_bf16_natively()
    precisions = [False] if args.no_bf16 else [False, True]
    print(f'cpu_capability={torch.backends.cpu.get_cpu_capability()} native_bf16={native_bf16} '
          f'threads={torch.get_num_threads()} torch={torch.__version__} python={platform.python_version()} '
          f'machine={platform.machine()}')
    print(f'demo step: smallcnn 64x64, hidden 256, batch 64, --num_workers 0; {args.num_images} training images '
          f'per set; {args.warmup} warm-up steps, then {args.repeats} turns of {args.steps} steps per case\n')
    with tempfile.TemporaryDirectory() as folder:
        cases = [case for setting in args.sets for case in cases_of(setting, folder, args.num_images, precisions)]
        for case in cases:
            for _ in range(args.warmup):
                step(case)
        for turn in range(args.repeats):
            for case in cases[turn % len(cases):] + cases[:turn % len(cases)]:
                case.steps += [step(case) for _ in range(args.steps)]
            print(f'turn {turn + 1}/{args.repeats} done', file=sys.stderr, flush=True)
    report(cases, native_bf16)


if __name__ == '__main__':
    main()
