"""Training and captioning speed at COCO scale, measured on this machine in one run.

    python -m bench.train      # on the GPU when there is one, where it also runs bench/lstm.py against cuDNN

(a) the tutorial-style pipeline: decode a resized JPEG, random crop and flip, ResNet-152 forward,
    then the decoder's forward and backward, for every caption of every epoch;
(b) training from extract_features.py's cache: read a float16 vector, then the same decoder step;
(c) the same as (b) under bf16 autocast (train.py --amp);
(d) on a GPU only, the same as (c) with the LSTM's loop compiled (train.py --compile reduce-overhead).
Also the decoder step alone (vocabulary 10,000, batch 128, COCO-like caption lengths), and the
latency and throughput of captioning the way sample.py does (resize, crop, greedy decoding). Random
weights are used throughout: speed does not depend on what the weights are. A COCO epoch is 414,113
captions (train2014).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import numpy as np
import torch
from PIL import Image

from bench import timing
from data_loader import FeatureDataset, batches, eval_transform, train_transform
from files import load_image
from flags import HelpFormatter, positive_int
from model import Captioner, CaptionerConfig, DecodeSettings, build_captioner, caption_loss

COCO_CAPTIONS = 414113


class FakeVocab:
    """Any word maps to some id below the vocabulary size; enough for timing."""

    def __init__(self, size):
        self.size = size

    def __call__(self, word):
        return 4 + hash(word) % (self.size - 4)

    def __len__(self):
        return self.size


def coco_like_lengths(batch, generator):
    """Caption lengths with <start> and <end>, spread like COCO's (mostly 10-14 tokens, 8-25)."""
    return sorted((torch.randn(batch, generator=generator) * 2.5 + 12.5).round().clamp(8, 25).int().tolist(),
                  reverse=True)


def make_jpegs(folder, count, size=256):
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        image = Image.fromarray(pixels).resize((size, size), Image.Resampling.BICUBIC)
        image.save(os.path.join(folder, f'{i}.jpg'), quality=90)


def timed(fn, device, repeats):
    return statistics.median(timing.timed(fn, device) for _ in range(repeats))


class Trainer:
    """The decoder and the encoder's head, trained as train.py trains them, on any batch."""

    def __init__(self, encoder, decoder, vocab_size, device, generator):
        params = list(encoder.linear.parameters()) + list(encoder.bn.parameters()) + list(decoder.parameters())
        self.optimizer = torch.optim.Adam(params, lr=1e-3)
        self.on_images, self.on_features = Captioner(encoder, decoder), Captioner(encoder, decoder, from_features=True)
        self.vocab_size, self.device, self.generator = vocab_size, device, generator

    def step(self, model, inputs, captions=None, lengths=None, amp=False):
        """One optimizer step; without captions, random ones of COCO-like lengths."""
        if captions is None:
            lengths = coco_like_lengths(inputs.size(0), self.generator)
            captions = torch.randint(4, self.vocab_size, (inputs.size(0), lengths[0]), generator=self.generator)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp):
            loss, _ = caption_loss(model, inputs.to(self.device), captions.to(self.device), lengths)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()


def write_cache(folder, images=2000):
    """A feature cache with the layout extract_features.py writes, and its captions file."""
    cache = os.path.join(folder, 'cache')
    os.makedirs(cache)
    np.save(os.path.join(cache, 'features.npy'),
            np.random.default_rng(0).standard_normal((images, 2, 2048)).astype(np.float16))
    np.save(os.path.join(cache, 'done.npy'), np.ones(images, dtype=bool))
    with open(os.path.join(cache, 'meta.json'), 'w') as f:
        f.write('{"image_ids": %s}' % list(range(1, images + 1)))
    captions = os.path.join(folder, 'captions.json')
    with open(captions, 'w') as f:
        json.dump({'images': [{'id': i, 'file_name': f'{i}.jpg'} for i in range(1, images + 1)],
                   'annotations': [{'id': 5 * i + k, 'image_id': i,  # 7 to 15 words, as most of COCO's
                                    'caption': ' '.join(['a man riding a horse', *['word'] * (2 + 2 * k)])}
                                   for i in range(1, images + 1) for k in range(5)]}, f)
    return cache, captions


def training_rates(args, trainer, decoder, device):
    """[(row name, captions per second)] for (a)-(d), and the seconds of one decoder step."""
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        make_jpegs(folder, args.pipeline_batch)
        transform = train_transform(224)

        def tutorial_batch():
            images = torch.stack([transform(load_image(os.path.join(folder, f'{i}.jpg')))
                                  for i in range(args.pipeline_batch)])
            trainer.step(trainer.on_images, images)

        tutorial_batch()  # warm-up
        seconds = timed(tutorial_batch, device, max(2, args.repeats // 2))
        rows.append(('(a) tutorial pipeline: JPEG + crop + ResNet-152 + decoder', args.pipeline_batch / seconds))

        dataset = FeatureDataset(*write_cache(folder), FakeVocab(args.vocab_size))
        iterator = iter(batches(dataset, args.batch_size, shuffle=True, num_workers=0))

        def cache_batch(amp):
            trainer.step(trainer.on_features, *next(iterator), amp=amp)

        for amp, name in ((False, '(b) from the feature cache: float16 features + decoder'),
                          (True, '(c) the same with --amp (bf16 autocast)')):
            cache_batch(amp)
            rows.append((name, args.batch_size / timed(lambda: cache_batch(amp), device, args.repeats)))

        features = torch.randn(args.batch_size, 2048, device=device)
        decoder_seconds = timed(lambda: trainer.step(trainer.on_features, features), device, args.repeats)
        if device.type == 'cuda':
            decoder.lstm.compile_loop(mode='reduce-overhead')
            for _ in range(10):  # compile, then record CUDA graphs for the usual numbers of calls
                cache_batch(True)
            rows.append(('(d) the same as (c) with --compile reduce-overhead',
                         args.batch_size / timed(lambda: cache_batch(True), device, args.repeats)))
    return rows, decoder_seconds


def captioning_speed(args, encoder, decoder, device, eval_batch=32):
    """(seconds to caption one photo, images per second in batches of eval_batch), as sample.py does it."""
    encoder.eval(), decoder.eval()
    transform = eval_transform(256, 224)
    photo = Image.fromarray(np.random.default_rng(1).integers(0, 256, (480, 640, 3), dtype=np.uint8))

    def caption(batch):
        with torch.no_grad():
            images = torch.stack([transform(photo)] * batch).to(device)
            decoder.sample(encoder(images), DecodeSettings(max_len=20))

    caption(1)
    latency = timed(lambda: caption(1), device, args.repeats)
    return latency, eval_batch / timed(lambda: caption(eval_batch), device, max(2, args.repeats // 2))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                        help='cuda or cpu; the default is the GPU where there is one')
    parser.add_argument('--batch_size', type=positive_int, default=128,
                        help='batch of the cache and decoder benchmarks')
    parser.add_argument('--pipeline_batch', type=positive_int, default=16, help='batch of the slow tutorial pipeline')
    parser.add_argument('--vocab_size', type=positive_int, default=10000, help="the decoder's vocabulary size")
    parser.add_argument('--repeats', type=positive_int, default=5, help='timed repeats; the table reports their median')
    args = parser.parse_args()
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    encoder, decoder = build_captioner(CaptionerConfig(vocab_size=args.vocab_size))  # the tutorial's model
    encoder, decoder = encoder.to(device).train(), decoder.to(device).train()
    rows, decoder_seconds = training_rates(args, Trainer(encoder, decoder, args.vocab_size, device, generator), decoder,
                                           device)
    latency, throughput = captioning_speed(args, encoder, decoder, device)

    print(f'device={device} threads={torch.get_num_threads()} torch={torch.__version__} '
          f'vocab={args.vocab_size} batch={args.batch_size} (pipeline batch {args.pipeline_batch})\n')
    print('| training | captions/s | one COCO epoch |')
    print('|---|---:|---:|')
    for name, rate in rows:
        print(f'| {name} | {rate:.1f} | {COCO_CAPTIONS / rate / 3600:.1f} h |')
    print('\n' + ', '.join(f'{name[:3]} {rate / rows[0][1]:.0f}x' for name, rate in rows[1:]), 'faster than (a).\n')
    print('| step | time |')
    print('|---|---:|')
    print(f'| decoder forward+backward, batch {args.batch_size}, vocab {args.vocab_size} '
          f'| {1000 * decoder_seconds:.0f} ms |')
    print(f'| sample.py: one image (ResNet-152 + 20 greedy steps) | {1000 * latency:.0f} ms |')
    print(f'| batched captioning, 32 images at a time | {throughput:.1f} images/s |')
    if device.type == 'cuda':
        print('\nDIY_LSTM against cuDNN at the decoder shape:\n', flush=True)
        # bench.lstm is a program of its own, so it runs as one, from the repository's root, and its exit code is ours.
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        lstm = subprocess.run([sys.executable, '-m', 'bench.lstm', '--device', 'cuda', '--threads',
                               str(torch.get_num_threads())], cwd=root)
        sys.exit(lstm.returncode)


if __name__ == '__main__':
    main()
