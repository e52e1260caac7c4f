"""Peak memory of sample.py as the number of images grows. It captions --batch_size images at a time,
so a folder of 500 images should need no more memory than one of 50.

    python -m bench.sample                     # 50 and 500 COCO-sized images, ResNet-152, batches of 32

Each row is a fresh `python sample.py --image FOLDER` process; its peak resident memory is what the
operating system reports for it when it ends (ru_maxrss). The last row captions the small folder in a
single batch, as sample.py did before it had --batch_size. The model has random weights (memory does not
depend on what the weights are) and the images are random 640x480 JPEGs.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict

import numpy as np
from PIL import Image

from flags import HelpFormatter, positive_int
from model import CaptionerConfig, build_captioner, save_checkpoint


def write_checkpoint(path, backbone, vocab_size=10000):
    """A train.py-style checkpoint with random weights and a vocabulary of made-up words."""
    config = CaptionerConfig(vocab_size, backbone=backbone)
    encoder, decoder = build_captioner(config)
    words = ['<pad>', '<start>', '<end>', '<unk>'] + [f'word{i}' for i in range(vocab_size - 4)]
    save_checkpoint(path, {'model_args': asdict(config), 'vocab': words, 'encoder': encoder.state_dict(),
                           'decoder': decoder.state_dict()})


def peak_memory(command):
    """(peak resident memory in MB, seconds) of a command run to its end."""
    start = time.time()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise SystemExit(f'error: {" ".join(command)} failed (status {status})')
    return usage.ru_maxrss / 1024, time.time() - start  # ru_maxrss is in kB on Linux


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument('--counts', type=positive_int, nargs='+', default=[50, 500], help='folder sizes to caption')
    parser.add_argument('--batch_size', type=positive_int, default=32, help="sample.py's --batch_size")
    parser.add_argument('--backbone', '--encoder', default='resnet152', help='torchvision ResNet of the model')
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as work:
        checkpoint = os.path.join(work, 'checkpoint.pt')
        write_checkpoint(checkpoint, args.backbone)
        folders = {}
        for count in sorted(args.counts):
            folders[count] = os.path.join(work, f'images{count}')
            os.makedirs(folders[count])
            for i in range(count):
                pixels = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(os.path.join(folders[count], f'{i:06d}.jpg'), quality=90)
        smallest = min(args.counts)
        runs = [(count, args.batch_size) for count in sorted(args.counts)] + [(smallest, smallest)]
        print(f'sample.py, {args.backbone}, peak resident memory of the whole process')
        print('| images | --batch_size | peak memory (MB) | time (s) |')
        print('|---:|---:|---:|---:|')
        for count, batch_size in runs:
            command = [sys.executable, 'sample.py', '--checkpoint', checkpoint, '--image', folders[count],
                       '--batch_size', str(batch_size), '--json', os.path.join(work, 'captions.json')]
            megabytes, seconds = peak_memory(command)
            print(f'| {count} | {batch_size} | {megabytes:.0f} | {seconds:.0f} |', flush=True)


if __name__ == '__main__':
    main()
