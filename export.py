"""Export a train.py checkpoint to ONNX, to caption with onnxruntime instead of PyTorch, or as a safetensors
folder, to share its weights without its optimizer state and without pickle.

    python export.py --checkpoint models/checkpoint.pt --out models/onnx
    python sample.py --onnx models/onnx --image png/example.png
    python export.py --checkpoint models/checkpoint.pt --format safetensors --output_dir models/coco
    python sample.py --checkpoint models/coco --image png/example.png

ONNX: writes encoder.onnx (image -> feature), decoder_step.onnx (one decoding step: token or image feature,
h, c -> log-probabilities of the next word, h, c; any batch size) and captioner.json (the vocabulary and
the sizes sample.py needs). For --decoder attention, encoder.onnx gives the grid of cells, and the step is
token, grid, h, s -> log-probabilities, h, s and the attention weights alpha. Greedy decoding, beam search and
sampling stay in Python: sample.py --onnx runs the decoders' own loop with each step done by onnxruntime.

safetensors: writes model.safetensors (the encoder's and decoder's weights, keys encoder.* and decoder.*),
config.json (the CaptionerConfig), vocab.json and README.md (a model card). sample.py, evaluate.py, app.py,
train.py --scst --init_from and torch.hub take the folder wherever they take a checkpoint; train.py --resume
needs the checkpoint itself, which also holds the optimizer's state.
"""
import argparse
import json
import os
import sys
from dataclasses import asdict

import safetensors.torch
import torch
from torch import nn

from build_vocab import save_vocab
from decoding import ONNX_FILES, SAFETENSORS_FILES, captioner_from_checkpoint, load_captioner, weights_digest
from files import CheckpointError, save_file
from flags import HelpFormatter
from model import read_checkpoint


class DecoderStep(nn.Module):
    """One decoding step as one graph. A token of -1 means "feed the image feature": the first step."""

    def __init__(self, decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, token, feature, h, c):
        inputs = torch.where((token < 0).unsqueeze(1), feature, self.decoder.embed(token.clamp(min=0)))
        log_probs, (h, c) = self.decoder.step(inputs, (h, c))
        return log_probs, h, c


class AttentionStep(nn.Module):
    """One step of the attention decoder as one graph, from the grid alone: a token of -1 means "the first
    step", whose word is zeros and whose h and s come from the grid's mean cell (the h and s given are then
    not used). The keys W_a a_i are computed again at every step, which costs a product of the grid by W_a per
    step, so that the graph needs no second input from a separate start graph."""

    def __init__(self, decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, token, grid, h, s):
        first = (token < 0).unsqueeze(1)
        zeros, start = self.decoder.start(grid)
        words = torch.where(first, zeros, self.decoder.embed(token.clamp(min=0)))
        state = start._replace(h=torch.where(first, start.h, h), s=torch.where(first, start.s, s))
        log_probs, state = self.decoder.step(words, state)
        return log_probs, state.h, state.s, state.alpha


def export_onnx(module, args, path, input_names, output_names, batch_dims=None):
    """torch.onnx.export through torch.export, every input's first dimension a dynamic batch (or the dimension
    batch_dims names, {input: dim}); written atomically, so that path never holds half a model."""
    if not hasattr(torch.export.Dim, 'DYNAMIC'):
        raise CheckpointError(f'export.py needs torch.export.Dim.DYNAMIC, which torch {torch.__version__} lacks: '
                              'pip install --upgrade torch')
    batch = torch.export.Dim.DYNAMIC
    dynamic = tuple({(batch_dims or {}).get(name, 0): batch} for name in input_names)
    with torch.no_grad():
        program = torch.onnx.export(module, args, dynamo=True, verbose=False, input_names=list(input_names),
                                    output_names=list(output_names), dynamic_shapes=dynamic)
    save_file(path, lambda f: f.write(program.model_proto.SerializeToString()))


def export(checkpoint, out):
    encoder, decoder, vocab, config = load_captioner(checkpoint)
    os.makedirs(out, exist_ok=True)
    batch, crop = 2, config.crop_size
    images = torch.randn(batch, 3, crop, crop)
    export_onnx(encoder, (images,), os.path.join(out, 'encoder.onnx'), ['image'], ['feature'])
    step_path, hidden = os.path.join(out, 'decoder_step.onnx'), config.hidden_size
    if config.decoder == 'attention':
        with torch.no_grad():
            grid = encoder(images)
        h, s = torch.randn(batch, hidden), torch.randn(batch, hidden)
        export_onnx(AttentionStep(decoder).eval(), (torch.tensor([-1, 4]), grid, h, s), step_path,
                    ['token', 'grid', 'h', 's'], ['log_probs', 'h_out', 's_out', 'alpha'])
    else:
        layers = config.num_layers
        h, c = torch.randn(layers, batch, hidden), torch.randn(layers, batch, hidden)  # two: export merges aliases
        export_onnx(DecoderStep(decoder).eval(), (torch.tensor([-1, 4]), torch.randn(batch, config.embed_size), h, c),
                    step_path, ['token', 'feature', 'h', 'c'], ['log_probs', 'h_out', 'c_out'], {'h': 1, 'c': 1})
    info = {'vocab': [vocab.idx2word[i] for i in range(len(vocab))], **asdict(config)}
    save_file(os.path.join(out, 'captioner.json'), lambda f: f.write(json.dumps(info).encode()))


def export_safetensors(checkpoint, out, trained_on=None, card_note=None):
    """model.safetensors, config.json, vocab.json and README.md in out, each written atomically. The weights'
    sha256 goes into model.safetensors' metadata, so that a changed file is refused when it is loaded."""
    if os.path.isdir(checkpoint):  # another exported folder: its weights, but no record of its training
        saved, captioner = {}, load_captioner(checkpoint)
    else:
        saved = read_checkpoint(checkpoint)
        captioner = captioner_from_checkpoint(saved, checkpoint)
    tensors = {f'{name}.{key}': value.contiguous() for name, module in (('encoder', captioner.encoder),
                                                                       ('decoder', captioner.decoder))
               for key, value in module.state_dict().items()}
    data = safetensors.torch.save(tensors, metadata={'format': 'pt', 'sha256': weights_digest(tensors)})
    weights_path, config_path, vocab_path = (os.path.join(out, name) for name in SAFETENSORS_FILES)
    save_file(weights_path, lambda f: f.write(data))
    save_file(config_path, lambda f: f.write(json.dumps(asdict(captioner.config), indent=1).encode() + b'\n'))
    save_vocab(captioner.vocab, vocab_path)
    card = model_card(captioner, saved, out, trained_on or (saved.get('args') or {}).get('caption_path'), card_note)
    save_file(os.path.join(out, 'README.md'), lambda f: f.write(card.encode()))


def model_card(captioner, saved, out, trained_on, card_note):
    """README.md of an exported folder: what the model is, what the checkpoint recorded of its training (and
    --trained_on, --card_note), and how to use it."""
    config, history = captioner.config, saved.get('history', {}).get('val') or [{}]
    facts = [f'Trained on: {trained_on or "not recorded"}.']
    if 'epoch' in saved:
        facts.append(f'Epochs trained: {saved["epoch"]}.')
    if 'loss' in history[-1]:
        facts.append(f'Held-out loss after the last epoch: {history[-1]["loss"]:.3f}.')
    return '\n'.join([
        f'# Image captioner: {config.backbone} encoder and hand-written LSTM decoder', '',
        f'A CNN encoder ({config.backbone}, {config.crop_size}x{config.crop_size}-pixel images) and an LSTM decoder '
        f'(hidden size {config.hidden_size}, {config.vocab_size} words), exported by `export.py --format safetensors`.',
        '', *facts, *([card_note] if card_note else []), '',
        '- `model.safetensors`: the weights, keys `encoder.*` and `decoder.*` (no optimizer state: '
        '`train.py --resume` needs the original checkpoint)',
        '- `config.json`: the model\'s settings (`CaptionerConfig`)',
        '- `vocab.json`: its vocabulary', '',
        'In the repository\'s folder:', '', '```bash',
        f'python sample.py --checkpoint {out} --image png/example.png',
        f'python app.py --checkpoint {out}', '```', '',
        'or in Python (nothing is downloaded; loading reads only safetensors and JSON, so no code runs):', '',
        '```python', 'import torch', '',
        f"captioner = torch.hub.load('path/to/the/repository', 'captioner', source='local', checkpoint='{out}')",
        "captions, errors = captioner.caption(['png/example.png'])", '```', ''])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument('--checkpoint', type=str, default='models/checkpoint.pt', help='checkpoint from train.py')
    parser.add_argument('--format', choices=('onnx', 'safetensors'), default='onnx',
                        help='onnx: for onnxruntime (sample.py --onnx); safetensors: the weights, config and '
                             'vocabulary, for sample.py --checkpoint and torch.hub')
    parser.add_argument('--output_dir', '--out', type=str, default=None,
                        help='folder for the files (default: models/onnx, or models/safetensors)')
    parser.add_argument('--trained_on', type=str, default=None,
                        help="safetensors: the model card's training data (default: the captions file the "
                             'checkpoint records)')
    parser.add_argument('--card_note', type=str, default=None,
                        help='safetensors: a sentence for the model card, such as its measured scores')
    args = parser.parse_args(argv)
    out = args.output_dir or f'models/{args.format}'
    try:
        if args.format == 'onnx':
            export(args.checkpoint, out)
        else:
            export_safetensors(args.checkpoint, out, args.trained_on, args.card_note)
    except (CheckpointError, OSError) as err:
        sys.exit(f'error: {err}')
    names = ONNX_FILES if args.format == 'onnx' else (*SAFETENSORS_FILES, 'README.md')
    print(f'wrote {", ".join(os.path.join(out, name) for name in names)}')


if __name__ == '__main__':
    main()
