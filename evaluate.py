"""Score a model's captions the way the field does: BLEU-1..4, METEOR, ROUGE-L and CIDEr, computed by
the COCO caption evaluation code (pycocoevalcap).

    # COCO, on the Karpathy test split (dataset_coco.json from Karpathy's neuraltalk2 splits)
    python evaluate.py --checkpoint models/checkpoint.pt --image_dir data/resized_val2014 \\
        --caption_path data/annotations/captions_val2014.json --split_file dataset_coco.json --split test
    # Flickr8k's test split, from Karpathy's dataset_flickr8k.json
    python evaluate.py --checkpoint models/flickr8k/checkpoint.pt --image_dir data/flickr8k/resized \\
        --caption_path data/flickr8k/dataset_flickr8k.json --split test --block_trigrams
    # the synthetic set
    python evaluate.py --checkpoint models/demo/most_accurate.pt --image_dir data/synthetic/val \\
        --caption_path data/synthetic/annotations/captions_val.json --beam_size 3

SPICE is not run: its scorer downloads Stanford CoreNLP when it starts. METEOR and the PTB tokenizer
need Java; without it METEOR is skipped and captions are tokenized in Python instead.
"""
import argparse
import json
import math
import os
import sys

from tqdm import tqdm

from data_loader import read_coco
from decoding import check_max_len, load_captioner
from files import CheckpointError, atomic_write
from flags import HelpFormatter, nonnegative_float, positive_int
from model import DecodeSettings
from runs import pick_device
from scoring import score_captions
from vocabulary import VocabError


def select_images(coco, split_file=None, split='test'):
    """All image ids of the captions file, or those of one split of Karpathy's dataset_coco.json."""
    image_ids = sorted(coco.getImgIds())
    if split_file is None:
        return image_ids
    try:
        with open(split_file) as f:
            wanted = {image['cocoid'] for image in json.load(f)['images'] if image['split'] == split}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{split_file}: not Karpathy's dataset_coco.json ({type(err).__name__}: {err})") from None
    selected = [image_id for image_id in image_ids if image_id in wanted]
    if len(selected) < len(wanted):
        print(f'note: {len(wanted) - len(selected)} {split} images of {split_file} are not in this captions file')
    return selected


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument('--checkpoint', type=str, default='models/checkpoint.pt',
                        help='checkpoint from train.py, or folder from export.py --format safetensors')
    parser.add_argument('--image_dir', type=str, default='data/resized_val2014', help='the images to caption')
    parser.add_argument('--caption_path', type=str, default='data/annotations/captions_val2014.json',
                        help="reference captions: COCO format, or Karpathy's dataset_*.json (see --split)")
    parser.add_argument('--split_file', type=str, default=None,
                        help="Karpathy's dataset_coco.json, to score one split (None: every image of --caption_path)")
    parser.add_argument('--split', type=str, default='test', choices=['test', 'val'],
                        help='the split to score: of --split_file, or of a Karpathy file given as --caption_path')
    parser.add_argument('--results_path', type=str, default='results.json',
                        help='file for the captions, in COCO results format')
    parser.add_argument('--beam_size', type=positive_int, default=1, help='1 is greedy decoding')
    parser.add_argument('--length_penalty', type=nonnegative_float, default=0.0,
                        help='rank beams by log p / length^alpha')
    parser.add_argument('--max_seq_length', '--max_len', type=positive_int, default=None,
                        help="longest caption in words (None: the model's own, 20 unless trained otherwise)")
    parser.add_argument('--min_len', type=positive_int, default=1, help='fewest words before <end>')
    parser.add_argument('--batch_size', type=positive_int, default=64, help='images captioned at a time')
    parser.add_argument('--block_trigrams', action='store_true', help='no trigram may repeat within a caption')
    parser.add_argument('--device', type=str, default=None, help='cuda, mps or cpu (None: the best available)')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        device = pick_device(args.device)
        if not os.path.exists(args.checkpoint):
            raise CheckpointError(f'{args.checkpoint}: no such file; train a model first (python train.py), '
                                  'or pass --checkpoint PATH')
        captioner = load_captioner(args.checkpoint, device)
        check_max_len(args.checkpoint, captioner.config, args.max_seq_length)
        if not os.path.isfile(args.caption_path):
            raise FileNotFoundError(f'{args.caption_path}: no such file')
        coco = read_coco(args.caption_path, args.split)
        image_ids = select_images(coco, args.split_file, args.split)
    except (CheckpointError, VocabError, OSError, ValueError) as err:
        sys.exit(f'error: {err}')

    results, failed = {}, 0
    paths = {os.path.join(args.image_dir, coco.imgs[image_id]['file_name']): image_id for image_id in image_ids}
    batches = captioner.caption_batches(list(paths), DecodeSettings.from_args(args), args.batch_size)
    for _, captions, errors in tqdm(batches, total=math.ceil(len(paths) / args.batch_size), desc='captioning',
                                    unit='batch'):
        results.update({paths[path]: caption for path, caption in captions.items()})
        for message in errors.values():
            tqdm.write(f'error: {message}', file=sys.stderr)
        failed += len(errors)
    if not results:
        sys.exit('error: no image could be captioned')
    results_json = json.dumps([{'image_id': image_id, 'caption': caption} for image_id, caption in results.items()])
    atomic_write(args.results_path, lambda f: f.write(results_json.encode()))

    references = {image_id: [ann['caption'] for ann in coco.imgToAnns[image_id]] for image_id in results}
    scores, notes = score_captions(references, results)
    print(f'\n{len(results)} images, beam size {args.beam_size}; captions in {args.results_path}')
    print('| ' + ' | '.join(scores) + ' |')
    print('|' + '---:|' * len(scores))
    print('| ' + ' | '.join(f'{100 * value:.1f}' for value in scores.values()) + ' |')
    for note in notes:
        print(f'note: {note}')
    if failed:
        sys.exit(f'error: {failed} images could not be read')


if __name__ == '__main__':
    main()
