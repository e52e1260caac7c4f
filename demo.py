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
import argparse
import json
import os
import platform
import time

import torch

import training
from build_vocab import build_vocab, save_vocab
from decoding import TrainedCaptioner, load_captioner
from flags import HelpFormatter, count, nonnegative_float, positive_float, positive_int
from model import DECODERS, CaptionerConfig, save_checkpoint
from sample import captioned_picture
from synthetic import easy, hard, make_synthetic_coco


def content_accuracy(captioner, caption_path, image_dir, batch_size=250, matches=easy.content_matches):
    """Share of images whose greedy caption names exactly their objects (sizes, colours, shapes)."""
    with open(caption_path) as f:
        images = json.load(f)['images']
    encoder, decoder = captioner.encoder, captioner.decoder
    was_training = encoder.training
    encoder.eval(), decoder.eval()
    objects = {os.path.join(image_dir, im['file_name']): im['objects'] for im in images}
    captions, _ = captioner.caption(list(objects), batch_size=batch_size)
    correct = sum(matches(captions.get(path, ''), objects[path]) for path in objects)
    encoder.train(was_training), decoder.train(was_training)
    return correct / len(images)


def learned_enough(accuracies, target=0.95, patience=2):
    """Whether training can stop: the best accuracy so far has passed target, and the last `patience`
    epochs did not improve on it."""
    best = max(accuracies)
    return best >= target and len(accuracies) - 1 - accuracies.index(best) >= patience


def next_epoch_fits(elapsed, epochs_done, minutes):
    """Whether one more epoch, as long as the mean epoch so far, ends within the minutes of the budget."""
    return elapsed * (epochs_done + 1) / epochs_done <= minutes * 60


def cpu_runs_bf16_natively():
    """Whether this CPU computes in bf16 in hardware (AVX512-BF16 or AMX on x86, Arm's BF16 extension), where
    bf16 autocast pays; elsewhere it is emulated and slower than float32. oneDNN's own check also says yes
    for every AVX-512 CPU, emulating or not, so on x86 the instructions themselves are asked for too. Both
    are private torch functions (in torch 2.5 and since): a torch without them counts as no."""
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        if native and platform.machine().lower() in ('x86_64', 'amd64'):
            native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    except (AttributeError, RuntimeError):
        return False
    return bool(native)


def choose_amp(setting):
    """(whether to train under bf16 autocast, one line saying why) for --amp auto, on or off."""
    if setting != 'auto':
        return setting == 'on', f'bf16 autocast: {setting} (--amp {setting})'
    if cpu_runs_bf16_natively():
        return True, 'bf16 autocast: on, since this CPU computes in bf16 natively (--amp off to train in float32)'
    return False, ('bf16 autocast: off, since this CPU would only emulate bf16, slower than float32 '
                   f'({torch.backends.cpu.get_cpu_capability()}; --amp on to use it anyway)')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument('--hard', action='store_true', help='the hard shapes set of synthetic/hard.py')
    parser.add_argument('--root', default=None,
                        help='where the synthetic set goes (default: data/synthetic, or data/synthetic_hard)')
    parser.add_argument('--model_path', default=None,
                        help='where checkpoints go (default: models/demo, models/demo_hard, with _attention after '
                             'either for --decoder attention)')
    parser.add_argument('--png_dir', default='png', help='where the example and its captioned picture are')
    parser.add_argument('--num_train', type=positive_int, default=8000, help='training images')
    parser.add_argument('--num_val', type=positive_int, default=500, help='held-out images')
    parser.add_argument('--minutes', type=positive_float, default=8, help='training time budget, the most it takes')
    parser.add_argument('--target', type=positive_float, default=0.95,
                        help='held-out content accuracy after which training stops once it stops improving')
    parser.add_argument('--patience', type=count, default=2,
                        help='epochs without a better accuracy, after passing --target, before training stops')
    parser.add_argument('--max_epochs', type=positive_int, default=100, help='the most epochs it trains')
    parser.add_argument('--hidden_size', type=positive_int, default=256, help="the decoder LSTM's hidden size")
    parser.add_argument('--decoder', choices=DECODERS, default='fc',
                        help="train.py's: fc, the tutorial's decoder, or attention, Show, Attend and Tell's")
    parser.add_argument('--seed', type=int, default=0, help='seed of the synthetic set and of training')
    parser.add_argument('--captions_per_image', type=positive_int, default=1,
                        help="train.py's: N > 1 puts N captions of each image in a batch, one CNN pass for them; "
                             "faster steps, but each epoch shows the CNN each image once, not five times, and "
                             "it learned far less per epoch here (see docs/training.md)")
    parser.add_argument('--cache_images', type=nonnegative_float, default=2, metavar='GB',
                        help="train.py's: decode the images once if they fit in this many GB (0: every time)")
    parser.add_argument('--amp', choices=['auto', 'on', 'off'], default='auto',
                        help='bf16 autocast: auto turns it on only where the CPU computes in bf16 natively')
    args = parser.parse_args(argv)
    suffix = '_hard' if args.hard else ''
    args.root = args.root or f'data/synthetic{suffix}'
    args.model_path = args.model_path or f'models/demo{suffix}' + ('_attention' if args.decoder == 'attention' else '')
    args.kind = hard if args.hard else easy
    return args


def train_args(args, vocab_path, amp=False):
    """train.py's flags for the synthetic set: the small CNN learns the shapes in minutes on a CPU."""
    return training.parse_args([
        '--image_dir', os.path.join(args.root, 'train'),
        '--caption_path', os.path.join(args.root, 'annotations', 'captions_train.json'),
        '--val_image_dir', os.path.join(args.root, 'val'),
        '--val_caption_path', os.path.join(args.root, 'annotations', 'captions_val.json'),
        '--vocab_path', vocab_path, '--model_path', args.model_path,
        '--backbone', 'smallcnn', '--weights', 'none', '--train_backbone', '--bn_momentum', '0.1',
        '--image_size', '64', '--crop_size', '64', '--no_flip',
        '--hidden_size', str(args.hidden_size), '--decoder', args.decoder, '--forget_bias', '1', '--grad_clip', '5',
        '--batch_size', '64', '--learning_rate', '3e-3', '--num_epochs', str(args.max_epochs),
        '--num_workers', '0', '--log_step', '20', '--save_step', '0', '--seed', str(args.seed),
        '--max_seq_length', '32' if args.hard else '20', '--captions_per_image', str(args.captions_per_image),
        '--cache_images', str(args.cache_images), *(['--amp'] if amp else [])])


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


def main():
    args = parse_args()
    start = time.time()
    torch.set_num_threads(os.cpu_count())
    make_synthetic_coco(args.root, args.num_train, args.num_val, image_size=64, seed=args.seed, kind=args.kind)
    vocab = build_vocab(os.path.join(args.root, 'annotations', 'captions_train.json'), threshold=1)
    save_vocab(vocab, os.path.join(args.root, 'vocab.json'))
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
