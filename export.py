"""Export a train.py checkpoint to ONNX, to caption with onnxruntime instead of PyTorch.

    python export.py --checkpoint models/checkpoint.pt --out models/onnx
    python sample.py --onnx models/onnx --image png/example.png

Writes encoder.onnx (image -> feature), decoder_step.onnx (one decoding step: token or image feature,
h, c -> log-probabilities of the next word, h, c; any batch size) and captioner.json (the vocabulary and
the sizes sample.py needs). Greedy decoding and beam search stay in Python: sample.py --onnx runs
DecoderRNN's own loops with each step done by onnxruntime.
"""
import argparse
import json
import os
import sys
from dataclasses import asdict

import torch
from torch import nn

from decoding import ONNX_FILES, load_captioner
from files import CheckpointError, save_file
from flags import HelpFormatter


class DecoderStep(nn.Module):
    """One decoding step as one graph. A token of -1 means "feed the image feature": the first step."""

    def __init__(self, decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, token, feature, h, c):
        inputs = torch.where((token < 0).unsqueeze(1), feature, self.decoder.embed(token.clamp(min=0)))
        log_probs, (h, c) = self.decoder.step(inputs, (h, c))
        return log_probs, h, c


def export_onnx(module, args, path, input_names, output_names):
    """torch.onnx.export through torch.export, every input's first dimension a dynamic batch; written
    atomically, so that path never holds half a model."""
    if not hasattr(torch.export.Dim, 'DYNAMIC'):
        raise CheckpointError(f'export.py needs torch.export.Dim.DYNAMIC, which torch {torch.__version__} lacks: '
                              'pip install --upgrade torch')
    batch = torch.export.Dim.DYNAMIC
    dynamic = tuple({1 if name in ('h', 'c') else 0: batch} for name in input_names)
    with torch.no_grad():
        program = torch.onnx.export(module, args, dynamo=True, verbose=False, input_names=list(input_names),
                                    output_names=list(output_names), dynamic_shapes=dynamic)
    save_file(path, lambda f: f.write(program.model_proto.SerializeToString()))


def export(checkpoint, out):
    encoder, decoder, vocab, config = load_captioner(checkpoint)
    os.makedirs(out, exist_ok=True)
    batch, crop = 2, config.crop_size
    export_onnx(encoder, (torch.randn(batch, 3, crop, crop),), os.path.join(out, 'encoder.onnx'),
                ['image'], ['feature'])
    layers, hidden, embed = config.num_layers, config.hidden_size, config.embed_size
    h, c = torch.randn(layers, batch, hidden), torch.randn(layers, batch, hidden)  # two tensors: export merges aliases
    export_onnx(DecoderStep(decoder).eval(), (torch.tensor([-1, 4]), torch.randn(batch, embed), h, c),
                os.path.join(out, 'decoder_step.onnx'), ['token', 'feature', 'h', 'c'], ['log_probs', 'h_out', 'c_out'])
    info = {'vocab': [vocab.idx2word[i] for i in range(len(vocab))], **asdict(config)}
    save_file(os.path.join(out, 'captioner.json'), lambda f: f.write(json.dumps(info).encode()))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument('--checkpoint', type=str, default='models/checkpoint.pt', help='checkpoint from train.py')
    parser.add_argument('--output_dir', '--out', type=str, default='models/onnx', help='folder for the ONNX files')
    args = parser.parse_args(argv)
    try:
        export(args.checkpoint, args.output_dir)
    except (CheckpointError, OSError) as err:
        sys.exit(f'error: {err}')
    print(f'wrote {", ".join(os.path.join(args.output_dir, name) for name in ONNX_FILES)}')


if __name__ == '__main__':
    main()
