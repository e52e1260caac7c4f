"""Find LSTM units whose memory tracks something in the synthetic set's captions.

    python gate_units.py --checkpoint models/demo/most_accurate.pt --out png/gate_units.png

Captions the held-out synthetic images as sample.py does, replays every caption through the LSTM (gates.py),
and asks two yes/no questions at every step: is the colour word next, and is a second object coming? For each
question it prints the units whose memory tanh(s) correlates most with the answer, and --out draws the best
unit's values for each answer.
"""
import argparse
import json
import os
import sys

import torch

from decoding import load_captioner
from files import CheckpointError, ImageError, atomic_write
from flags import HelpFormatter
from gates import png_bytes, record
from synthetic import easy


def step_labels(words):
    """Two yes/no questions for each step of a synthetic caption, None where a question does not apply:
    'the colour word is next' (the next word is a colour), and 'a second object is coming' (asked only up to the
    first shape word: does the caption go on to name a second object?)."""
    colour_next = [float(later in easy.COLOURS) for later in words[1:]] + [0.0]
    shapes = [i for i, word in enumerate(words) if word in easy.SHAPES]
    second = [float(len(shapes) > 1) if shapes and i <= shapes[0] else None for i in range(len(words))]
    return {'the colour word is next': colour_next, 'a second object is coming': second}


def tracking_units(results):
    """For each question of step_labels, every unit's correlation between its memory tanh(s) and the answer,
    over all the steps of all the captions where the question applies: {question: (r per unit, values, answers)}."""
    found = {}
    for question in step_labels(['a']):
        values, answers = [], []
        for result in results:
            for s, answer in zip(torch.tanh(result['layers'][-1]['s']), step_labels(result['words'])[question]):
                if answer is not None:
                    values.append(s)
                    answers.append(answer)
        values, answers = torch.stack(values), torch.tensor(answers)
        centred, y = values - values.mean(0), answers - answers.mean()
        r = (centred * y[:, None]).sum(0) / (centred.norm(dim=0) * y.norm() + 1e-12)
        found[question] = (r, values, answers)
    return found


def units_figure(found, count):
    """For each question, the best unit's tanh(s) at the steps where the answer is yes and where it is no."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(5 * len(found), 3.4), layout='constrained')
    for axes, (question, (r, values, answers)) in zip(fig.subplots(1, len(found), squeeze=False)[0], found.items()):
        unit = int(r.abs().argmax())
        bins = torch.linspace(-1, 1, 41).numpy()
        for answer, label in ((1, 'yes'), (0, 'no')):
            if (answers == answer).any():
                axes.hist(values[answers == answer, unit].numpy(), bins=bins, alpha=0.6, density=True, label=label)
        axes.set_title(f'"{question}"\nunit {unit}: r = {float(r[unit]):+.2f}', fontsize=10)
        axes.set_xlabel(f'tanh(s) of unit {unit} at each step ({len(answers)} steps of {count} captions)')
        axes.legend(title='answer', fontsize=8)
    return fig


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument('--checkpoint', type=str, default='models/demo/best.pt', help='checkpoint from train.py')
    parser.add_argument('--image_dir', type=str, default='data/synthetic/val', help='synthetic images to caption')
    parser.add_argument('--caption_path', type=str, default='data/synthetic/annotations/captions_val.json',
                        help='their COCO-format captions')
    parser.add_argument('--out', type=str, default=None, help='PNG: the best unit for each question')
    args = parser.parse_args(argv)
    try:
        captioner = load_captioner(args.checkpoint)
        with open(args.caption_path) as f:
            paths = [os.path.join(args.image_dir, image['file_name']) for image in json.load(f)['images']]
        results = [record(path, captioner) for path in paths]
    except (CheckpointError, ImageError) as err:
        sys.exit(f'error: {err}')
    except OSError as err:
        sys.exit(f'error: {err.filename}: {err.strerror}; python demo.py makes the synthetic set and the model')
    found = tracking_units(results)
    for question, (r, _, answers) in found.items():
        best = r.abs().argsort(descending=True)[:3].tolist()
        print(f'"{question}" ({int(answers.sum())} yes, {int((answers == 0).sum())} no): '
              + ', '.join(f'unit {u} r = {float(r[u]):+.2f}' for u in best)
              + f'; median |r| of all {len(r)} units {float(r.abs().median()):.2f}')
    if args.out:
        data = png_bytes(units_figure(found, len(results)))
        atomic_write(args.out, lambda f: f.write(data))


if __name__ == '__main__':
    main()
