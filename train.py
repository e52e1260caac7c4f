"""Train the captioning model.

    python train.py                                      # COCO, the tutorial's defaults
    python train.py --features data/features_train2014   # from extract_features.py's cache: much faster
    torchrun --nproc_per_node=4 train.py ...             # several GPUs (or CPU processes), one per process
    python train.py --resume                             # continue models/checkpoint.pt where it stopped
    tensorboard --logdir models/tensorboard              # watch the losses and sample captions
    python train.py --scst --init_from models/best.pt    # self-critical fine-tuning for CIDEr-D (scst.py)

Everything sample.py needs (model sizes, vocabulary, weights) goes into one checkpoint file, and with a
validation set best.pt keeps the epoch of lowest validation loss. Ctrl-C or SIGTERM saves a checkpoint
after the current step, then stops. --resume takes the run's settings from the checkpoint.
"""
import sys

import torch

import scst
import training
from files import CheckpointError, ImageError
from runs import settle_settings
from vocabulary import VocabError


def parse_args(argv=None):
    """The settings of a run, from argv (None: the command line): training.parse_args's flags, with this
    docstring as --help's description."""
    return training.parse_args(argv, description=__doc__)


def main(argv=None):
    args = parse_args(argv)
    try:
        (scst.train if args.scst else training.train)(args)
    except (training.Interrupted, scst.Stopped) as err:
        print(err, file=sys.stderr)
        sys.exit(130)
    except (VocabError, ImageError, CheckpointError, training.NonFiniteLoss, training.RecompileLimit,
            FileNotFoundError, ValueError) as err:
        sys.exit(f'error: {err}')
    except torch.OutOfMemoryError:
        settings, _ = settle_settings(args)  # with --resume, the checkpoint's batch size unless given again
        sys.exit(f'error: out of GPU memory with --batch_size {settings.batch_size}; try a smaller --batch_size '
                 '(or --amp, or --features to leave the backbone out of training)')


if __name__ == '__main__':
    main()
