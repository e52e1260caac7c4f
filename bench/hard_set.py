"""The fc decoder against the attention decoder on the hard shapes set, for the same minutes of training.

    python -m bench.hard_set                                   # fc, then attention: 30 minutes each, about 70 in all
    python -m bench.hard_set --decoders attention --marks 10 20 30

Each decoder trains with demo.py's settings (python demo.py --hard --decoder NAME: the small CNN, 64-pixel
images, hidden 256, batch 64, Adam 3e-3, 8,000 training images) for the last mark's minutes of wall-clock
training, keeping each epoch's checkpoint. The checkpoint scored at a mark is that of the last epoch that
ended by then. The scores come after training, so they cost it no minutes: on the 500 held-out images,
greedy and beam 3, content accuracy (every object named rightly, counts included) and CIDEr. The table
goes to stdout and to --model_dir/hard_set.json.
"""
import argparse
import json
import os
import time

import torch

import shapes_demo
import training
from decoding import load_captioner
from flags import HelpFormatter, positive_float, positive_int
from model import DecodeSettings, save_checkpoint
from scoring import score_captions
from synthetic import hard, make_synthetic_coco
from vocabulary import build_vocab, save_vocab


def train_for(args, decoder, vocab_path):
    """Train `decoder` for max(args.marks) minutes; returns [(minutes when the epoch ended, its checkpoint's path)]."""
    demo_args = shapes_demo.parse_args(['--hard', '--decoder', decoder, '--root', args.root,
                                        '--num_train', str(args.num_train), '--num_val', str(args.num_val),
                                        '--seed', str(args.seed), '--model_path', os.path.join(args.model_dir, decoder),
                                        '--amp', 'off'])
    epochs, start = [], time.time()
    saving = 0.0  # seconds spent writing the epochs' checkpoints, which do not count as training

    def on_epoch_end(epoch, encoder, decoder_module, checkpoint):
        nonlocal saving
        elapsed = time.time() - start - saving
        path = os.path.join(demo_args.model_path, f'epoch{epoch + 1}.pt')
        began = time.time()
        save_checkpoint(path, checkpoint)
        saving += time.time() - began
        epochs.append((elapsed / 60, path))
        print(f'{decoder}: epoch {epoch + 1} ended at {elapsed / 60:.1f} min', flush=True)
        return shapes_demo.next_epoch_fits(elapsed, epoch + 1, max(args.marks))

    training.train(training.parse_args(shapes_demo.train_flags(demo_args, vocab_path)), on_epoch_end)
    return epochs


def scores_of(checkpoint, args, beam_size):
    """(content accuracy, CIDEr) of a checkpoint's captions of the held-out images."""
    with open(os.path.join(args.root, 'annotations', 'captions_val.json')) as f:
        coco = json.load(f)
    paths = {os.path.join(args.root, 'val', image['file_name']): image for image in coco['images']}
    captioner = load_captioner(checkpoint)
    settings = DecodeSettings(beam_size=beam_size).for_vocab(captioner.vocab)
    captions, _ = captioner.caption(list(paths), settings, batch_size=100)
    accuracy = sum(hard.content_matches(captions[path], image['objects']) for path, image in paths.items()) / len(paths)
    references = {}
    for annotation in coco['annotations']:
        references.setdefault(annotation['image_id'], []).append(annotation['caption'])
    results = {image['id']: captions[path] for path, image in paths.items()}
    scores, _ = score_captions(references, results)
    return accuracy, scores['CIDEr']


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument('--decoders', nargs='+', choices=['fc', 'attention'], default=['fc', 'attention'],
                        help='the decoders to train, one after the other')
    parser.add_argument('--marks', nargs='+', type=positive_float, default=[10, 20, 30],
                        help='minutes of training at which the models are scored; training lasts the last one')
    parser.add_argument('--root', default='data/synthetic_hard', help='where the hard set is (made if missing)')
    parser.add_argument('--model_dir', default='models/hard_set', help="each decoder's epochs go to MODEL_DIR/NAME")
    parser.add_argument('--num_train', type=positive_int, default=8000, help='training images')
    parser.add_argument('--num_val', type=positive_int, default=500, help='held-out images')
    parser.add_argument('--seed', type=int, default=0, help='seed of the set and of training')
    args = parser.parse_args(argv)
    args.marks = sorted(args.marks)

    torch.set_num_threads(os.cpu_count())
    make_synthetic_coco(args.root, args.num_train, args.num_val, image_size=64, seed=args.seed, kind=hard)
    vocab_path = os.path.join(args.root, 'vocab.json')
    save_vocab(build_vocab(os.path.join(args.root, 'annotations', 'captions_train.json'), threshold=1), vocab_path)
    print(f'torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, '
          f'{torch.get_num_threads()} threads', flush=True)

    epochs = {decoder: train_for(args, decoder, vocab_path) for decoder in args.decoders}
    rows = []
    for decoder, ended in epochs.items():
        for mark in args.marks:
            done = [(minutes, path) for minutes, path in ended if minutes <= mark]
            if not done:
                print(f'{decoder}: no epoch ended within {mark:g} minutes')
                continue
            minutes, path = done[-1]
            row = {'decoder': decoder, 'mark': mark, 'minutes': round(minutes, 1), 'epochs': len(done)}
            for beam_size, name in ((1, 'greedy'), (3, 'beam 3')):
                accuracy, cider = scores_of(path, args, beam_size)
                row[name] = {'content accuracy': accuracy, 'CIDEr': cider}
            rows.append(row)
            print(f"{decoder}, {mark:g} min ({len(done)} epochs, {minutes:.1f} min): "
                  f"greedy {row['greedy']['content accuracy']:.1%} CIDEr {100 * row['greedy']['CIDEr']:.1f}; "
                  f"beam 3 {row['beam 3']['content accuracy']:.1%} CIDEr {100 * row['beam 3']['CIDEr']:.1f}",
                  flush=True)
    with open(os.path.join(args.model_dir, 'hard_set.json'), 'w') as f:
        json.dump(rows, f, indent=1)

    print('\n| decoder | minutes | epochs | greedy: content accuracy | greedy: CIDEr | beam 3: content accuracy '
          '| beam 3: CIDEr |\n|---|---:|---:|---:|---:|---:|---:|')
    for row in rows:
        greedy, beam = row['greedy'], row['beam 3']
        print(f"| {row['decoder']} | {row['mark']:g} | {row['epochs']} | {greedy['content accuracy']:.1%} | "
              f"{100 * greedy['CIDEr']:.1f} | {beam['content accuracy']:.1%} | {100 * beam['CIDEr']:.1f} |")


if __name__ == '__main__':
    main()
