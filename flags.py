"""argparse helpers every script shares. No torch here, so the scripts that do not need it
(build_vocab.py, resize.py, python -m synthetic, plot_history.py) start fast."""
import argparse
import math


def at_least(kind, low, above=False):
    """An argparse type= for a finite int or float that is >= low (> low with above=True), so that a bad
    value gets argparse's own one-line error instead of a traceback or a silent run that does nothing."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'{text!r} is not {"a whole number" if kind is int else "a number"}')
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f'must be a finite number, not {text}')
        if value < low or (above and value == low):
            raise argparse.ArgumentTypeError(f'must be {"greater than" if above else "at least"} {low}, not {text}')
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its "invalid int value" message
    return parse


positive_int = at_least(int, 1)  # sizes, lengths, steps, epochs, beam sizes
count = at_least(int, 0)  # --num_workers, --save_step (0: only at the end of each epoch)
positive_float = at_least(float, 0, above=True)  # learning rates, clip values
nonnegative_float = at_least(float, 0)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows every flag's default, and the docstring's examples as they are written."""
