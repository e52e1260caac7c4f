"""Caption images with a trained model.

    python sample.py --image png/example.png
    python sample.py --image photo1.jpg photo2.jpg --out captioned/
    python sample.py --image png/example.png --sample 5 --top_p 0.9    # five different captions
    python sample.py --image png/example.png --encoder_path encoder-5-3000.pkl \\
        --decoder_path decoder-5-3000.pkl --vocab_path vocab.pkl     # the tutorial's published files

A train.py checkpoint carries its model sizes and vocabulary, so there is nothing to match by hand.
"""
import argparse
import os
import sys
import textwrap

import torch
from PIL import Image, ImageDraw, ImageFont

import decoding
from build_vocab import VocabError, load_vocab
from data_loader import ImageError, eval_transform, load_image
from model import (CheckpointError, DecoderRNN, EncoderCNN, count, ids_to_sentence, load_captioner,
                   nonnegative_float, positive_float, positive_int, read_checkpoint)
from train import pick_device


def load_tutorial(encoder_path, decoder_path, vocab_path, sizes=None):
    """The tutorial's separate encoder and decoder state dicts; sizes are read off the weights, and
    sizes given as flags ({'embed_size': 256, ...}) are only checked against them."""
    vocab = load_vocab(vocab_path)
    encoder_state, decoder_state = read_checkpoint(encoder_path), read_checkpoint(decoder_path)
    try:
        vocab_size, embed_size = decoder_state['embed.weight'].shape
        hidden_size = decoder_state['lstm.weight_hh_l0'].shape[1]
        num_layers = sum(1 for key in decoder_state if key.startswith('lstm.weight_ih_l'))
        encoder_embed = encoder_state['linear.weight'].shape[0]
    except (KeyError, AttributeError, TypeError):
        raise CheckpointError(f'{decoder_path}, {encoder_path}: not the tutorial decoder and encoder state dicts') from None
    for name, actual in (('embed_size', embed_size), ('hidden_size', hidden_size), ('num_layers', num_layers)):
        given = (sizes or {}).get(name)
        if given is not None and given != actual:
            raise CheckpointError(f'{decoder_path} has {name} {actual} but --{name} {given} was given: '
                                  f'drop --{name} (sizes are read off the weights) or pass --{name} {actual}')
    if vocab_size != len(vocab):
        raise CheckpointError(f'{decoder_path} was trained with {vocab_size} words but {vocab_path} has {len(vocab)}: '
                              'pass the vocabulary the decoder was trained with')
    if encoder_embed != embed_size:
        raise CheckpointError(f'{encoder_path} makes {encoder_embed}-d features but {decoder_path} expects '
                              f'{embed_size}: pass the encoder trained with this decoder')
    encoder = EncoderCNN(embed_size, 'resnet152', weights=None)
    decoder = DecoderRNN(embed_size, hidden_size, vocab_size, num_layers)
    try:
        encoder.load_state_dict(encoder_state)
        decoder.load_state_dict(decoder_state)
    except RuntimeError as err:
        raise CheckpointError(f'{encoder_path}: does not fit the tutorial model ({str(err).splitlines()[0]})') from None
    return encoder.eval(), decoder.eval(), vocab, dict(image_size=224, crop_size=224)


def caption_images(paths, encoder, decoder, vocab, config, device, max_len=None, beam_size=1, length_penalty=0.0,
                   min_len=1, block_trigrams=False, samples=0, temperature=1.0, top_p=1.0):
    """Returns {path: caption} for readable images and {path: error} for the rest. A caption has at least
    min_len words: <end> is not allowed before, and <pad>, <start> and <unk> never, so none comes out empty.
    With samples=N, {path: [N sampled captions]} instead (decoding.sample, with temperature and top_p)."""
    transform = eval_transform(config['image_size'], config['crop_size'])
    images, captions, errors = {}, {}, {}
    for path in paths:
        try:
            images[path] = transform(load_image(path))
        except ImageError as err:
            errors[path] = str(err)
    if images:
        with torch.no_grad():
            features = encoder(torch.stack(list(images.values())).to(device))
        never = sorted({vocab('<unk>'), vocab('<pad>'), vocab('<start>')})
        special = dict(end_id=vocab('<end>'), unk_id=never, max_len=max_len, min_len=min_len,
                       block_trigrams=block_trigrams)
        if samples:
            with torch.no_grad():
                ids, _, _ = decoding.sample(decoder, features, samples, temperature, top_p, **special)
            rows = [[ids_to_sentence(row, vocab) for row in ids[i * samples:(i + 1) * samples].cpu()]
                    for i in range(len(images))]
            return dict(zip(images, rows)), errors
        if beam_size > 1:
            ids = decoder.beam_search(features, beam_size, length_penalty=length_penalty, **special)
        else:
            ids = decoder.sample(features, **special)
        captions = {path: ids_to_sentence(row, vocab) for path, row in zip(images, ids.cpu())}
    return captions, errors


def check_max_len(checkpoint, config, max_len):
    """A checkpoint trained with --max_seq_length 0 (before that was refused) sets no usable caption length."""
    trained = config.get('max_seq_length', 1)
    if max_len is None and not (isinstance(trained, int) and trained >= 1):
        raise CheckpointError(f'{checkpoint} was trained with --max_seq_length {trained}, which allows no words; '
                              'pass --max_len N, the longest caption in words')


def captioned_picture(path, caption, min_width=320):
    """The image with its caption written beneath, wrapped to the picture's width."""
    image = load_image(path)
    if image.width < min_width:
        image = image.resize((min_width, round(image.height * min_width / image.width)), Image.Resampling.NEAREST)
    font_size = max(16, image.width // 24)
    font = ImageFont.load_default(size=font_size)
    chars_per_line = max(10, int(image.width / (0.55 * font_size)))
    lines = textwrap.wrap(caption, chars_per_line) or ['']
    line_height = int(font_size * 1.3)
    canvas = Image.new('RGB', (image.width, image.height + line_height * len(lines) + font_size), 'white')
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((font_size // 2, image.height + font_size // 2 + i * line_height), line, fill='black', font=font)
    return canvas


def grid(pictures, columns=4):
    """Captioned pictures side by side, in rows of `columns`, each cell as big as the largest picture."""
    width, height = max(p.width for p in pictures), max(p.height for p in pictures)
    columns = min(columns, len(pictures))
    rows = -(-len(pictures) // columns)
    sheet = Image.new('RGB', (columns * width, rows * height), 'white')
    for i, picture in enumerate(pictures):
        sheet.paste(picture, ((i % columns) * width, (i // columns) * height))
    return sheet


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--image', type=str, nargs='+', required=True, help='images to caption')
    parser.add_argument('--checkpoint', type=str, default='models/checkpoint.pt', help='checkpoint from train.py')
    parser.add_argument('--encoder_path', type=str, default=None, help="the tutorial's encoder state dict")
    parser.add_argument('--decoder_path', type=str, default=None, help="the tutorial's decoder state dict")
    parser.add_argument('--vocab_path', type=str, default=None, help="the tutorial's vocab.pkl (with the two above); with --checkpoint, only checked")
    for name in ('embed_size', 'hidden_size', 'num_layers'):
        parser.add_argument(f'--{name}', type=positive_int, default=None, help='optional: checked against the weights')
    parser.add_argument('--out', type=str, default=None, help='folder for PNGs with the caption drawn beneath')
    parser.add_argument('--max_len', type=positive_int, default=None, help='longest caption in words')
    parser.add_argument('--min_len', type=positive_int, default=1, help='fewest words before <end>')
    parser.add_argument('--beam_size', type=positive_int, default=1, help='1 is greedy decoding')
    parser.add_argument('--length_penalty', type=nonnegative_float, default=0.0,
                        help='rank beams by log p / length^alpha')
    parser.add_argument('--block_trigrams', action='store_true', help='no trigram may repeat within a caption')
    parser.add_argument('--sample', type=count, default=0, metavar='N', help='print N sampled captions per image')
    parser.add_argument('--temperature', type=positive_float, default=1.0,
                        help='with --sample: below 1 safer, above 1 wilder')
    parser.add_argument('--top_p', type=float, default=1.0,
                        help='with --sample: draw only from the most probable words holding this much probability')
    parser.add_argument('--grid', type=str, default=None, help='also write all captioned images as one PNG grid')
    parser.add_argument('--device', type=str, default=None)
    args = parser.parse_args(argv)

    if not 0 < args.top_p <= 1:
        sys.exit(f'error: --top_p must be above 0 and at most 1, not {args.top_p}')
    device = pick_device(args.device)
    try:
        if args.encoder_path or args.decoder_path:
            if not (args.encoder_path and args.decoder_path and args.vocab_path):
                raise CheckpointError('the tutorial format needs --encoder_path, --decoder_path and --vocab_path')
            sizes = dict(embed_size=args.embed_size, hidden_size=args.hidden_size, num_layers=args.num_layers)
            encoder, decoder, vocab, config = load_tutorial(args.encoder_path, args.decoder_path, args.vocab_path, sizes)
        else:
            encoder, decoder, vocab, config = load_captioner(args.checkpoint)
            given = len(load_vocab(args.vocab_path)) if args.vocab_path else len(vocab)
            if given != len(vocab):
                raise CheckpointError(f'{args.checkpoint} was trained with {len(vocab)} words but {args.vocab_path} '
                                      f'has {given}: leave out --vocab_path, since the checkpoint carries its own '
                                      'vocabulary')
            check_max_len(args.checkpoint, config, args.max_len)
    except (CheckpointError, VocabError) as err:
        sys.exit(f'error: {err}')
    encoder, decoder = encoder.to(device), decoder.to(device)

    captions, errors = caption_images(args.image, encoder, decoder, vocab, config, device, args.max_len,
                                      args.beam_size, args.length_penalty, args.min_len,
                                      args.block_trigrams, args.sample, args.temperature, args.top_p)
    if args.sample:
        for path in args.image:
            for caption in captions.get(path, []):
                print(caption if len(args.image) == 1 else f'{path}: {caption}')
            if path in errors:
                print(f'error: {errors[path]}', file=sys.stderr)
        if errors:
            sys.exit(1)
        return
    pictures = []
    for path in args.image:
        if path in errors:
            print(f'error: {errors[path]}', file=sys.stderr)
            continue
        print(captions[path] if len(args.image) == 1 else f'{path}: {captions[path]}')
        if args.out or args.grid:
            pictures.append(captioned_picture(path, captions[path]))
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            name = os.path.splitext(os.path.basename(path))[0] + '_captioned.png'
            pictures[-1].save(os.path.join(args.out, name))
    if args.grid and pictures:
        os.makedirs(os.path.dirname(args.grid) or '.', exist_ok=True)
        grid(pictures).save(args.grid)
    if errors:
        sys.exit(1)


if __name__ == '__main__':
    main()
