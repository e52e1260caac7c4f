"""Images per second when captioning on the CPU: onnxruntime (export.py's files) against PyTorch.

A model with random weights at the given sizes is saved as a checkpoint, exported with export.py, and
both captioners caption the same batch of random images (encoder, then greedy decoding or beam search).
Repeats alternate between the two, and the table gives medians.

    python -m bench.onnx                                     # ResNet-152, hidden 512, 10,000 words (the tutorial's)
    python -m bench.onnx --backbone smallcnn --image_size 64 --hidden_size 256   # the demo's sizes
"""
import argparse
import os
import statistics
import tempfile
import time
from dataclasses import asdict

import torch

from decoding import load_captioner, load_onnx_captioner
from exporting import export
from flags import HelpFormatter, positive_int
from model import CaptionerConfig, DecodeSettings, build_captioner, save_checkpoint


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument('--backbone', '--encoder', default='resnet152', help='torchvision ResNet name, or smallcnn')
    parser.add_argument('--image_size', type=positive_int, default=224, help='side of the square input images')
    parser.add_argument('--embed_size', type=positive_int, default=256, help='dimension of word embedding vectors')
    parser.add_argument('--hidden_size', type=positive_int, default=512, help='dimension of lstm hidden states')
    parser.add_argument('--vocab_size', type=positive_int, default=10000, help='words in the (random) vocabulary')
    parser.add_argument('--batch_size', type=positive_int, default=8, help='images captioned at a time')
    parser.add_argument('--beam_size', type=positive_int, default=1, help='1 is greedy decoding')
    parser.add_argument('--repeats', type=positive_int, default=5, help='timed repeats of each captioner')
    parser.add_argument('--threads', type=positive_int, default=2, help='torch and onnxruntime threads')
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    words = ['<pad>', '<start>', '<end>', '<unk>'] + [f'word{i}' for i in range(args.vocab_size - 4)]
    config = CaptionerConfig(args.vocab_size, args.embed_size, args.hidden_size, backbone=args.backbone,
                             image_size=args.image_size, crop_size=args.image_size)
    encoder, decoder = build_captioner(config)
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = os.path.join(folder, 'checkpoint.pt')
        save_checkpoint(checkpoint, dict(model_args=asdict(config), vocab=words, encoder=encoder.state_dict(),
                                         decoder=decoder.state_dict()))
        export(checkpoint, folder)
        captioners = {'PyTorch': load_captioner(checkpoint)[:2],
                      'onnxruntime': load_onnx_captioner(folder, threads=args.threads)[:2]}
        images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)

        def caption(name):
            encoder, decoder = captioners[name]
            with torch.no_grad():
                features = encoder(images)
                if args.beam_size > 1:
                    return decoder.beam_search(features, DecodeSettings(beam_size=args.beam_size))
                return decoder.sample(features)

        results = {name: caption(name) for name in captioners}  # also the warm-up
        if not torch.equal(results['PyTorch'], results['onnxruntime']):
            raise SystemExit('onnxruntime and PyTorch captions differ: the timings would not compare the same work')
        times = {name: [] for name in captioners}
        for i in range(args.repeats):
            for name in (list(captioners) if i % 2 == 0 else list(captioners)[::-1]):
                start = time.perf_counter()
                caption(name)
                times[name].append(time.perf_counter() - start)
    print(f'backbone={args.backbone} image={args.image_size} embed={args.embed_size} hidden={args.hidden_size} '
          f'vocab={args.vocab_size} batch={args.batch_size} beam={args.beam_size} threads={args.threads} '
          f'words={results["PyTorch"].size(1)} cpu={torch.backends.cpu.get_cpu_capability()} '
          f'torch={torch.__version__}\n')
    print('| captioner | images/s (median) | relative |')
    print('|---|---:|---:|')
    base = statistics.median(times['PyTorch'])
    for name, measured in times.items():
        median = statistics.median(measured)
        print(f'| {name} | {args.batch_size / median:.1f} | {base / median:.2f}x |')


if __name__ == '__main__':
    main()
