"""Caption images with a trained model.

    python sample.py --image png/example.png     # models/checkpoint.pt, else the shipped shapes model
    python sample.py --image photo1.jpg photo2.jpg --output_dir captioned/
    python sample.py --image png/example.png --sample 5 --top_p 0.9    # five different captions
    python sample.py --image photos/ --json captions.json                  # every image in a folder
    python sample.py --image png/example.png --encoder_path encoder-5-3000.pkl \\
        --decoder_path decoder-5-3000.pkl --vocab_path vocab.pkl     # the tutorial's published files
    python sample.py --image png/example.png --onnx models/onnx      # export.py's files, with onnxruntime
    python sample.py --image png/example.png --checkpoint models/demo_attention/most_accurate.pt \\
        --attention attention.png     # where a model trained with --decoder attention looked for each word

A train.py checkpoint, or export.py's safetensors folder, carries its model sizes and vocabulary, so there is
nothing to match by hand. Without --checkpoint, models/checkpoint.pt is used if it exists, else models/shapes,
the demo model shipped with the repository, which knows only the synthetic shapes.
Images are captioned --batch_size at a time, so memory stays the same however many there are.
"""
import argparse
import json
import os
import sys

from PIL import Image
from tqdm import tqdm

from decoding import check_max_len, default_model, load_captioner, load_onnx_captioner, load_tutorial
from files import CheckpointError, ImageError, save_file
from flags import HelpFormatter, count, nonnegative_float, positive_float, positive_int
from images import captioned_picture
from model import DecodeSettings
from runs import describe_device, pick_device
from vocabulary import VocabError, load_vocab


def image_paths(names):
    """The paths given, with each folder replaced by the image files in it (by extension, sorted).
    A folder with none stays as it is, so that it is reported like any path that is not an image."""
    extensions = {extension for extension, format in Image.registered_extensions().items() if format in Image.OPEN}
    paths = []
    for name in names:
        inside = []
        if os.path.isdir(name):
            inside = sorted(os.path.join(name, entry) for entry in os.listdir(name)
                            if os.path.splitext(entry)[1].lower() in extensions
                            and os.path.isfile(os.path.join(name, entry)))
        paths.extend(inside or [name])
    return paths


def grid(pictures, columns=4):
    """Captioned pictures side by side, in rows of `columns`, each cell as big as the largest picture."""
    width, height = max(p.width for p in pictures), max(p.height for p in pictures)
    columns = min(columns, len(pictures))
    rows = -(-len(pictures) // columns)
    sheet = Image.new('RGB', (columns * width, rows * height), 'white')
    for i, picture in enumerate(pictures):
        sheet.paste(picture, ((i % columns) * width, (i // columns) * height))
    return sheet


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument('--image', type=str, nargs='+', required=True,
                        help='images to caption; a folder stands for every image file in it')
    parser.add_argument('--checkpoint', type=str, default=None,
                        help='checkpoint from train.py, or folder from export.py --format safetensors (None: '
                             'models/checkpoint.pt if it exists, else the shipped shapes model models/shapes)')
    parser.add_argument('--encoder_path', type=str, default=None, help="the tutorial's encoder state dict")
    parser.add_argument('--decoder_path', type=str, default=None, help="the tutorial's decoder state dict")
    parser.add_argument('--vocab_path', type=str, default=None,
                        help="the tutorial's vocab.pkl (with the two above); with --checkpoint, only checked")
    for name in ('embed_size', 'hidden_size', 'num_layers'):
        parser.add_argument(f'--{name}', type=positive_int, default=None,
                            help="the tutorial model's size; optional: only checked against the weights")
    parser.add_argument('--output_dir', '--out', type=str, default=None,
                        help='folder for PNGs with the caption drawn beneath')
    parser.add_argument('--json', type=str, default=None,
                        help='also write the captions to this file, as [{"file_name": ..., "caption": ...}, ...] '
                             '(with --sample, "captions": [...])')
    parser.add_argument('--grid', type=str, default=None, help='also write all captioned images as one PNG grid')
    parser.add_argument('--max_seq_length', '--max_len', type=positive_int, default=None,
                        help="longest caption in words (None: the model's own, 20 unless trained otherwise)")
    parser.add_argument('--min_len', type=positive_int, default=1, help='fewest words before <end>')
    parser.add_argument('--beam_size', type=positive_int, default=1, help='1 is greedy decoding')
    parser.add_argument('--length_penalty', type=nonnegative_float, default=0.0,
                        help='rank beams by log p / length^alpha')
    parser.add_argument('--gates', type=str, default=None, help="one image: PNG of the LSTM's gates at every word")
    parser.add_argument('--gates_json', type=str, default=None, help='one image: the gates as JSON numbers')
    parser.add_argument('--attention', type=str, default=None,
                        help='one image: PNG of where the model looked for every word (a model trained with '
                             '--decoder attention)')
    parser.add_argument('--batch_size', type=positive_int, default=32, help='images captioned at a time')
    parser.add_argument('--block_trigrams', action='store_true', help='no trigram may repeat within a caption')
    parser.add_argument('--sample', type=count, default=0, metavar='N', help='print N sampled captions per image')
    parser.add_argument('--temperature', type=positive_float, default=1.0,
                        help='with --sample: below 1 safer, above 1 wilder')
    parser.add_argument('--top_p', type=positive_float, default=1.0,
                        help='with --sample: draw only from the most probable words holding this much probability'
                             ' (at most 1; 1 draws from every word)')
    parser.add_argument('--device', type=str, default=None, help='cuda, mps or cpu (None: the best available)')
    parser.add_argument('--onnx', type=str, default=None,
                        help="export.py's folder: caption with onnxruntime on the CPU")
    args = parser.parse_args(argv)
    inside = args.gates or args.gates_json or args.attention
    if inside and len(args.image) != 1:
        parser.error('--gates, --gates_json and --attention take one --image')
    if inside and args.onnx:
        parser.error('--gates, --gates_json and --attention need the PyTorch model: leave out --onnx')
    if args.top_p > 1:
        parser.error(f'--top_p is a probability: at most 1, not {args.top_p}')
    if args.sample and (inside or args.output_dir or args.grid):
        parser.error('--sample prints its captions (and writes --json); leave out --gates, --attention, '
                     '--output_dir and --grid')
    return args


def load_model(args, device):
    """The TrainedCaptioner of --onnx (on the CPU), the tutorial's three files, or a --checkpoint (by default
    decoding.default_model's, named on stderr, where it does not mix with the captions)."""
    if args.onnx:
        return load_onnx_captioner(args.onnx)
    if args.encoder_path or args.decoder_path:
        if not (args.encoder_path and args.decoder_path and args.vocab_path):
            raise CheckpointError('the tutorial format needs --encoder_path, --decoder_path and --vocab_path')
        sizes = dict(embed_size=args.embed_size, hidden_size=args.hidden_size, num_layers=args.num_layers)
        return load_tutorial(args.encoder_path, args.decoder_path, args.vocab_path, sizes, device)
    if args.checkpoint is None:
        args.checkpoint, line = default_model('models/checkpoint.pt')
        if line:
            print(line, file=sys.stderr)
    if not os.path.exists(args.checkpoint):
        raise CheckpointError(f'{args.checkpoint}: no such file; train a model first (python train.py), '
                              'or pass --checkpoint PATH')
    captioner = load_captioner(args.checkpoint, device)
    vocab = captioner.vocab
    given = len(load_vocab(args.vocab_path)) if args.vocab_path else len(vocab)
    if given != len(vocab):
        raise CheckpointError(f'{args.checkpoint} was trained with {len(vocab)} words but {args.vocab_path} '
                              f'has {given}: leave out --vocab_path, since the checkpoint carries its own vocabulary')
    check_max_len(args.checkpoint, captioner.config, args.max_seq_length)
    return captioner


def show_inside(args, captioner, settings):
    """--gates, --gates_json and --attention: print the image's caption and write the pictures and numbers of
    gates.record. --attention is refused before anything is written if the model has no attention to show."""
    import gates
    if args.attention and captioner.config.decoder != 'attention':
        sys.exit('error: --attention needs a model trained with --decoder attention')
    try:
        result = gates.record(args.image[0], captioner, settings)
        print(result['caption'])
        gates.save(result, args.gates, args.gates_json, args.attention)
    except ImageError as err:
        sys.exit(f'error: {err}')
    except OSError as err:
        written = err.filename or args.gates or args.gates_json or args.attention
        sys.exit(f'error: could not write {written} ({err.strerror or err})')


def caption_all(args, captioner, settings):
    """Print every image's caption and write the files asked for; returns how many images failed."""
    paths = image_paths(args.image)
    results, pictures, failed = [], [], 0
    bar = tqdm(total=len(paths), unit='image', desc='captioning', disable=len(paths) <= args.batch_size)
    for batch, captions, errors in captioner.caption_batches(paths, settings, args.batch_size):
        for path in batch:
            if path in errors:
                tqdm.write(f'error: {errors[path]}', file=sys.stderr)
            elif args.sample:  # N captions per image, printed one a line
                results.append({'file_name': path, 'captions': captions[path]})
                lines = [caption if len(paths) == 1 else f'{path}: {caption}' for caption in captions[path]]
                tqdm.write('\n'.join(lines), file=sys.stdout)
            else:
                results.append({'file_name': path, 'caption': captions[path]})
                tqdm.write(write_picture(args, path, captions[path], pictures, single=len(paths) == 1), file=sys.stdout)
        failed += len(errors)
        bar.update(len(batch))
    bar.close()
    if args.grid and pictures:
        save_file(args.grid, lambda f: grid(pictures).save(f, format='PNG'))
        print(f'grid of {len(pictures)} captioned images: {args.grid}')
    if args.json:
        save_file(args.json, lambda f: f.write(json.dumps(results, indent=1).encode()))
        print(f'captions of {len(results)} images: {args.json}')
    return failed


def write_picture(args, path, caption, pictures, single):
    """The line to print for one image, after writing its captioned picture to --output_dir and keeping
    it for --grid, as asked."""
    line = caption if single else f'{path}: {caption}'
    if args.output_dir or args.grid:
        picture = captioned_picture(path, caption)
    if args.output_dir:
        out = os.path.join(args.output_dir, os.path.splitext(os.path.basename(path))[0] + '_captioned.png')
        save_file(out, lambda f: picture.save(f, format='PNG'))
        line += f'  ->  {out}'
    if args.grid:
        pictures.append(picture)
    return line


def main(argv=None):
    args = parse_args(argv)
    settings = DecodeSettings.from_args(args)
    try:
        device = pick_device('cpu' if args.onnx else args.device)
        captioner = load_model(args, device)
    except (CheckpointError, VocabError, ValueError) as err:
        sys.exit(f'error: {err}')
    # On stderr, where it does not mix with the captions.
    print(describe_device(device, runtime='onnxruntime' if args.onnx else None), file=sys.stderr, flush=True)
    if args.gates or args.gates_json or args.attention:
        return show_inside(args, captioner, settings)
    try:
        failed = caption_all(args, captioner, settings)
    except CheckpointError as err:  # an output file could not be written: a full disk, a read-only folder
        sys.exit(f'error: {err}')
    if failed:
        sys.exit(1)


if __name__ == '__main__':
    main()
