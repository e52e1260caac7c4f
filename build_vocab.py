"""Build the word vocabulary of a COCO captions file, and save it.

    python build_vocab.py --caption_path data/annotations/captions_train2014.json --vocab_path data/vocab.json

A vocabulary is saved as JSON ({"words": [...]} in index order). vocabulary.py holds the Vocabulary and
its files: load_vocab also reads the original tutorial's vocab.pkl, without running any code that a pickle
could smuggle in.
"""
import argparse
import sys

from files import CheckpointError
from flags import HelpFormatter, positive_int
from vocabulary import VocabError, Vocabulary, build_vocab, save_vocab  # noqa: F401 (the tutorial imports Vocabulary)


def main():
    parser = argparse.ArgumentParser(description='Build the vocabulary of a COCO captions file.',
                                     formatter_class=HelpFormatter)
    parser.add_argument('--caption_path', type=str, default='data/annotations/captions_train2014.json',
                        help="COCO-format captions file, or Karpathy's dataset_*.json")
    parser.add_argument('--split', type=str, default='train', choices=['train', 'val', 'test'],
                        help='the part of a Karpathy file to read (train includes restval)')
    parser.add_argument('--vocab_path', type=str, default='data/vocab.json', help='where to save the vocabulary')
    parser.add_argument('--threshold', type=positive_int, default=4, help='minimum word count to be kept')
    args = parser.parse_args()
    try:
        vocab = build_vocab(args.caption_path, args.threshold, args.split)
        save_vocab(vocab, args.vocab_path)
    except (VocabError, CheckpointError) as err:
        print(f'error: {err}', file=sys.stderr)
        sys.exit(1)
    print(f'Total vocabulary size: {len(vocab)}')
    print(f'Saved the vocabulary to {args.vocab_path}')


if __name__ == '__main__':
    main()
