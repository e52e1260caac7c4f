"""Plot the loss history that train.py saves next to its checkpoint.

    python plot_history.py --history models/history.json --plot_path png/loss_curve.png
"""
import argparse
import json
import sys

import matplotlib
import numpy as np

matplotlib.use('Agg')  # draw to a file; no screen needed
import matplotlib.pyplot as plt  # noqa: E402

from flags import HelpFormatter  # noqa: E402


def plot(history, out):
    fig, loss_axis = plt.subplots(figsize=(7, 4), dpi=120)
    train = history['train']
    loss_axis.plot([e['step'] for e in train], [e['loss'] for e in train], lw=1, alpha=0.8, label='training loss')
    if history['val']:
        val = history['val']
        loss_axis.plot([e['step'] for e in val], [e['loss'] for e in val], 'o-', label='validation loss (per epoch)')
    loss_axis.set_xlabel('training step')
    loss_axis.set_ylabel('cross-entropy per word')
    perplexity_axis = loss_axis.secondary_yaxis('right', functions=(np.exp, lambda p: np.log(np.clip(p, 1e-9, None))))
    perplexity_axis.set_ylabel('perplexity')
    loss_axis.grid(alpha=0.3)
    loss_axis.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument('--history', default='models/history.json', help='history.json written by train.py')
    parser.add_argument('--plot_path', '--out', default='png/loss_curve.png', help='PNG file to write')
    args = parser.parse_args(argv)
    try:
        with open(args.history) as f:
            history = json.load(f)
        if not history.get('train'):
            raise ValueError('it holds no training steps yet')
    except (OSError, ValueError, AttributeError) as err:
        sys.exit(f'error: {args.history}: cannot plot ({err})')
    plot(history, args.plot_path)
    print(f'wrote {args.plot_path}')


if __name__ == '__main__':
    main()
