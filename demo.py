"""The whole job in one command, on a CPU, with no download:

    python demo.py

1. generates the synthetic shapes set in COCO format (data/synthetic),
2. builds its vocabulary with build_vocab.py,
3. trains a small CNN + DIY_LSTM decoder with train.py, reporting held-out loss and the share of
   validation images whose greedy caption names exactly the right sizes, colours and shapes, until
   that share has passed 95% and stopped improving (or --minutes have passed); the images are decoded
   once into memory, and bf16 autocast is on where the CPU computes in bf16 natively,
4. captions png/example.png with the most accurate checkpoint and writes png/example_captioned.png.

    python demo.py --hard

does the same on the hard shapes set of synthetic/hard.py (data/synthetic_hard, models/demo_hard), where
content accuracy counts every object and the caption must also name how many there are; it prints a few
held-out captions instead of captioning the example.

    python demo.py --decoder attention

trains the attention decoder (Show, Attend and Tell) instead, into models/demo_attention (models/demo_hard_attention
with --hard), so that it leaves the fc model where it is, and writes png/example_captioned_attention.png;
sample.py --attention then shows where it looked for each word.
"""
import json
import os
import time

import torch

import training
from decoding import TrainedCaptioner, load_captioner
from images import captioned_picture
from model import CaptionerConfig, save_checkpoint
from shapes_demo import choose_amp, content_accuracy, learned_enough, next_epoch_fits, parse_args, train_flags
from synthetic import easy, make_synthetic_coco
from vocabulary import build_vocab, save_vocab


def train_args(args, vocab_path, amp=False):
    """train.py's settings for the synthetic set (shapes_demo.train_flags)."""
    return training.parse_args(train_flags(args, vocab_path, amp))


def train_most_accurate(args, vocab, best_path):
    """Train until held-out content accuracy has passed --target and stopped improving, or --minutes
    have passed, keeping the most accurate epoch in best_path (train.py's best.pt is the epoch of lowest
    validation loss); returns the accuracy of each epoch."""
    val_json = os.path.join(args.root, 'annotations', 'captions_val.json')
    matches = args.kind.content_matches
    accuracies, train_start = [], time.time()

    def on_epoch_end(epoch, encoder, decoder, checkpoint):
        captioner = TrainedCaptioner(encoder, decoder, vocab, CaptionerConfig.from_dict(checkpoint['model_args']))
        accuracy = content_accuracy(captioner, val_json, os.path.join(args.root, 'val'), matches=matches)
        if accuracy > max(accuracies, default=-1.0):
            save_checkpoint(best_path, checkpoint)
        accuracies.append(accuracy)
        elapsed = time.time() - train_start
        print(f'epoch {epoch + 1}: held-out content accuracy {accuracy:.1%} (best {max(accuracies):.1%}), '
              f'{elapsed / 60:.1f} min', flush=True)
        if learned_enough(accuracies, args.target, args.patience):
            print(f'stopping: no better accuracy in the {args.patience} epochs since the best, '
                  f'{max(accuracies):.1%}', flush=True)
            return False
        return next_epoch_fits(elapsed, epoch + 1, args.minutes)

    amp, line = choose_amp(args.amp)
    print(line, flush=True)
    training.train(train_args(args, os.path.join(args.root, 'vocab.json'), amp), on_epoch_end)
    return accuracies


def make_set(args):
    """The demo's synthetic set under args.root and its vocabulary (every word, as the set is small), saved as
    vocab.json beside it; returns the vocabulary."""
    make_synthetic_coco(args.root, args.num_train, args.num_val, image_size=64, seed=args.seed, kind=args.kind)
    vocab = build_vocab(os.path.join(args.root, 'annotations', 'captions_train.json'), threshold=1)
    save_vocab(vocab, os.path.join(args.root, 'vocab.json'))
    return vocab


def main():
    args = parse_args(description=__doc__)
    start = time.time()
    torch.set_num_threads(os.cpu_count())
    vocab = make_set(args)
    print(f'{len(vocab)} words in the vocabulary ({time.time() - start:.0f} s so far)')

    best_path = os.path.join(args.model_path, 'most_accurate.pt')
    accuracies = train_most_accurate(args, vocab, best_path)
    captioner = load_captioner(best_path)
    print(f'\nbest held-out content accuracy: {max(accuracies):.1%}')
    if args.hard:
        with open(os.path.join(args.root, 'annotations', 'captions_val.json')) as f:
            names = [image['file_name'] for image in json.load(f)['images'][:4]]
        paths = [os.path.join(args.root, 'val', name) for name in names]
        captions, _ = captioner.caption(paths)
        for path in paths:
            print(f'{path}: {captions[path]}')
    else:
        example = os.path.join(args.png_dir, 'example.png')
        if not os.path.exists(example):
            easy.write_example(example)
        captions, _ = captioner.caption([example])
        out = os.path.join(args.png_dir, 'example_captioned.png' if args.decoder == 'fc' else
                           f'example_captioned_{args.decoder}.png')
        captioned_picture(example, captions[example]).save(out)
        print(f'{example}: {captions[example]}  ->  {out}')
    print(f'total time: {(time.time() - start) / 60:.1f} min')


if __name__ == '__main__':
    main()
