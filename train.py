"""Train the captioning model.

    python train.py                                  # COCO, the tutorial's defaults
    python train.py --val_caption_path data/annotations/captions_val2014.json --val_image_dir data/resized_val2014

Everything sample.py needs (model sizes, vocabulary, weights) goes into one checkpoint file.
"""
import argparse
import json
import math
import os
import sys

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence
from tqdm import tqdm

from build_vocab import VocabError, load_vocab
from data_loader import ImageError, eval_transform, get_loader, train_transform
from model import CheckpointError, DecoderRNN, EncoderCNN, save_checkpoint


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model_path', type=str, default='models/', help='folder for checkpoint.pt and history.json')
    parser.add_argument('--crop_size', type=int, default=224, help='size for randomly cropping images')
    parser.add_argument('--image_size', type=int, default=256, help='size resize.py gave the images')
    parser.add_argument('--vocab_path', type=str, default='data/vocab.json', help='vocabulary from build_vocab.py')
    parser.add_argument('--image_dir', type=str, default='data/resized2014', help='resized training images')
    parser.add_argument('--caption_path', type=str, default='data/annotations/captions_train2014.json')
    parser.add_argument('--val_image_dir', type=str, default=None, help='resized validation images')
    parser.add_argument('--val_caption_path', type=str, default=None, help='validation captions, for held-out loss')
    parser.add_argument('--log_step', type=int, default=10, help='steps between logged losses')
    parser.add_argument('--save_step', type=int, default=1000, help='steps between checkpoints (also every epoch)')

    parser.add_argument('--embed_size', type=int, default=256, help='dimension of word embedding vectors')
    parser.add_argument('--hidden_size', type=int, default=512, help='dimension of lstm hidden states')
    parser.add_argument('--num_layers', type=int, default=1, help='number of layers in lstm')
    parser.add_argument('--max_seq_length', type=int, default=20, help='longest caption sample.py writes')
    parser.add_argument('--backbone', type=str, default='resnet152', help='torchvision ResNet name, or smallcnn')
    parser.add_argument('--weights', type=str, default='DEFAULT',
                        help="backbone weights: DEFAULT (ImageNet, downloaded), none, or a local .pth file")
    parser.add_argument('--train_backbone', action='store_true', help='train the CNN too instead of freezing it')
    parser.add_argument('--bn_momentum', type=float, default=0.01, help="momentum of the encoder head's BatchNorm")
    parser.add_argument('--forget_bias', type=float, default=None, help='initial forget-gate bias (default: random)')
    parser.add_argument('--no_flip', action='store_true', help='no random mirroring (when captions say left/right)')

    parser.add_argument('--num_epochs', type=int, default=5)
    parser.add_argument('--batch_size', type=int, default=128)
    parser.add_argument('--num_workers', type=int, default=2)
    parser.add_argument('--learning_rate', type=float, default=0.001)
    parser.add_argument('--grad_clip', type=float, default=None, help='clip the gradient norm to this value')
    parser.add_argument('--device', type=str, default=None, help='cuda, mps or cpu (default: the best available)')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    if args.weights.lower() == 'none':
        args.weights = None
    return args


def pick_device(name=None):
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device('cuda')
    if torch.backends.mps.is_available():
        return torch.device('mps')
    return torch.device('cpu')


def caption_loss(encoder, decoder, images, captions, lengths):
    """Mean cross-entropy over the real (packed) words of the batch, summed-token count alongside."""
    outputs = decoder(encoder(images), captions, lengths)
    targets = pack_padded_sequence(captions, lengths, batch_first=True).data
    return nn.functional.cross_entropy(outputs, targets), targets.numel()


@torch.no_grad()
def validation_loss(encoder, decoder, loader, device):
    encoder.eval(), decoder.eval()
    total, count = 0.0, 0
    for images, captions, lengths in loader:
        loss, n = caption_loss(encoder, decoder, images.to(device), captions.to(device), lengths)
        total, count = total + loss.item() * n, count + n
    encoder.train(), decoder.train()
    return total / max(count, 1)


def set_forget_bias(lstm, value):
    """Start with the forget gate open so memory survives early training (Gers et al., 2000)."""
    hidden = lstm.hidden_size
    for name, bias in lstm.named_parameters():
        if name.startswith('bias_'):
            with torch.no_grad():
                bias[hidden:2 * hidden] = value if name.startswith('bias_ih') else 0.0


def check_paths(args):
    for path in (args.vocab_path, args.caption_path, args.image_dir, args.val_caption_path, args.val_image_dir):
        if path is not None and not os.path.exists(path):
            raise FileNotFoundError(f'not found: {path}')
    if (args.val_caption_path is None) != (args.val_image_dir is None):
        raise ValueError('give both --val_caption_path and --val_image_dir, or neither')


def train(args, on_epoch_end=None):
    """Train, writing checkpoint.pt and history.json.

    on_epoch_end(epoch, encoder, decoder, checkpoint) runs after each epoch; returning False stops training.
    """
    check_paths(args)
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    vocab = load_vocab(args.vocab_path)
    loader = get_loader(args.image_dir, args.caption_path, vocab, train_transform(args.crop_size, not args.no_flip),
                        args.batch_size, shuffle=True, num_workers=args.num_workers)
    val_loader = None
    if args.val_caption_path:
        val_loader = get_loader(args.val_image_dir, args.val_caption_path, vocab,
                                eval_transform(args.image_size, args.crop_size),
                                args.batch_size, shuffle=False, num_workers=args.num_workers)

    model_args = dict(embed_size=args.embed_size, hidden_size=args.hidden_size, vocab_size=len(vocab),
                      num_layers=args.num_layers, max_seq_length=args.max_seq_length, backbone=args.backbone,
                      train_backbone=args.train_backbone, bn_momentum=args.bn_momentum,
                      image_size=args.image_size, crop_size=args.crop_size)
    encoder = EncoderCNN(args.embed_size, args.backbone, args.weights, args.train_backbone, args.bn_momentum).to(device)
    decoder = DecoderRNN(args.embed_size, args.hidden_size, len(vocab), args.num_layers, args.max_seq_length).to(device)
    if args.forget_bias is not None:
        set_forget_bias(decoder.lstm, args.forget_bias)
    trained = [encoder.linear, encoder.bn, decoder] + ([encoder.resnet] if args.train_backbone else [])
    params = [p for module in trained for p in module.parameters()]
    optimizer = torch.optim.Adam(params, lr=args.learning_rate)

    checkpoint_path = os.path.join(args.model_path, 'checkpoint.pt')
    history = {'train': [], 'val': []}
    step = 0

    def save(epoch):
        checkpoint = {'model_args': model_args, 'vocab': [vocab.idx2word[i] for i in range(len(vocab))],
                      'encoder': encoder.state_dict(), 'decoder': decoder.state_dict(),
                      'optimizer': optimizer.state_dict(), 'epoch': epoch, 'step': step, 'args': vars(args)}
        save_checkpoint(checkpoint_path, checkpoint)
        with open(os.path.join(args.model_path, 'history.json'), 'w') as f:
            json.dump(history, f)
        return checkpoint

    encoder.train(), decoder.train()
    for epoch in range(args.num_epochs):
        bar = tqdm(loader, desc=f'epoch {epoch + 1}/{args.num_epochs}', dynamic_ncols=True)
        for images, captions, lengths in bar:
            loss, _ = caption_loss(encoder, decoder, images.to(device), captions.to(device), lengths)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.grad_clip:
                nn.utils.clip_grad_norm_(params, args.grad_clip)
            optimizer.step()
            step += 1
            if step % args.log_step == 0:
                value = loss.item()
                history['train'].append({'epoch': epoch, 'step': step, 'loss': value, 'perplexity': math.exp(value)})
                bar.set_postfix(loss=f'{value:.4f}', perplexity=f'{math.exp(value):.2f}')
            if args.save_step and step % args.save_step == 0:
                save(epoch)
        if val_loader is not None:
            value = validation_loss(encoder, decoder, val_loader, device)
            history['val'].append({'epoch': epoch, 'step': step, 'loss': value, 'perplexity': math.exp(value)})
            print(f'epoch {epoch + 1}: validation loss {value:.4f}, perplexity {math.exp(value):.2f}', flush=True)
        checkpoint = save(epoch + 1)
        if on_epoch_end is not None and on_epoch_end(epoch, encoder, decoder, checkpoint) is False:
            break
    return encoder, decoder, vocab, history


def main(argv=None):
    args = parse_args(argv)
    try:
        train(args)
    except (VocabError, ImageError, CheckpointError, FileNotFoundError, ValueError) as err:
        sys.exit(f'error: {err}')


if __name__ == '__main__':
    main()
