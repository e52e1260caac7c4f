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

import torch
from torch import nn

from model import CheckpointError, DecoderRNN, HelpFormatter, load_captioner

FILES = ('encoder.onnx', 'decoder_step.onnx', 'captioner.json')


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
    """torch.onnx.export through torch.export, every input's first dimension a dynamic batch; written to a
    temporary file and renamed, so that path never holds half a model."""
    if not hasattr(torch.export.Dim, 'DYNAMIC'):
        raise CheckpointError(f'export.py needs torch.export.Dim.DYNAMIC, which torch {torch.__version__} lacks: '
                              'pip install --upgrade torch')
    batch = torch.export.Dim.DYNAMIC
    dynamic = tuple({1 if name in ('h', 'c') else 0: batch} for name in input_names)
    with torch.no_grad():
        program = torch.onnx.export(module, args, dynamo=True, verbose=False, input_names=list(input_names),
                                    output_names=list(output_names), dynamic_shapes=dynamic)
    temporary = f'{path}.tmp{os.getpid()}'
    try:
        program.save(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def export(checkpoint, out):
    encoder, decoder, vocab, config = load_captioner(checkpoint)
    os.makedirs(out, exist_ok=True)
    batch, crop = 2, config['crop_size']
    export_onnx(encoder, (torch.randn(batch, 3, crop, crop),), os.path.join(out, 'encoder.onnx'),
                ['image'], ['feature'])
    layers, hidden, embed = config['num_layers'], config['hidden_size'], config['embed_size']
    h, c = torch.randn(layers, batch, hidden), torch.randn(layers, batch, hidden)  # two tensors: export merges aliases
    export_onnx(DecoderStep(decoder).eval(), (torch.tensor([-1, 4]), torch.randn(batch, embed), h, c),
                os.path.join(out, 'decoder_step.onnx'), ['token', 'feature', 'h', 'c'], ['log_probs', 'h_out', 'c_out'])
    info = {'vocab': [vocab.idx2word[i] for i in range(len(vocab))],
            **{key: config[key] for key in ('image_size', 'crop_size', 'embed_size', 'hidden_size', 'num_layers',
                                             'max_seq_length')}}
    temporary = os.path.join(out, f'captioner.json.tmp{os.getpid()}')
    with open(temporary, 'w') as f:
        json.dump(info, f)
    os.replace(temporary, os.path.join(out, 'captioner.json'))


class OnnxEncoder:
    """encoder.onnx, called like EncoderCNN."""

    def __init__(self, session):
        self.session = session

    def __call__(self, images):
        return torch.from_numpy(self.session.run(None, {'image': images.cpu().numpy()})[0])


class OnnxDecoder:
    """decoder_step.onnx, decoded by DecoderRNN's own greedy and beam search loops."""

    sample, beam_search, decode_length = DecoderRNN.sample, DecoderRNN.beam_search, DecoderRNN.decode_length
    forbid = staticmethod(DecoderRNN.forbid)

    def __init__(self, session, config):
        self.session, self.config = session, config
        self.max_seq_length = config['max_seq_length']

    def embed(self, words):
        return words  # decoder_step.onnx embeds the word ids itself

    def step(self, inputs, states):
        batch = inputs.size(0)
        if inputs.dtype == torch.long:
            token, feature = inputs, torch.zeros(batch, self.config['embed_size'])
        else:
            token, feature = torch.full((batch,), -1), inputs
        if states is None:
            states = (torch.zeros(self.config['num_layers'], batch, self.config['hidden_size']),) * 2
        log_probs, h, c = self.session.run(None, {'token': token.numpy(), 'feature': feature.numpy(),
                                                  'h': states[0].numpy(), 'c': states[1].numpy()})
        return torch.from_numpy(log_probs), (torch.from_numpy(h), torch.from_numpy(c))


def load_onnx_captioner(folder, threads=None):
    """The encoder, decoder, vocabulary and config of an exported folder, run by onnxruntime."""
    from build_vocab import Vocabulary
    try:
        import onnxruntime
    except ImportError:
        raise CheckpointError('--onnx needs onnxruntime: pip install onnxruntime') from None
    missing = [name for name in FILES if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise CheckpointError(f'{folder}: no {", ".join(missing)}; write them with '
                              f'python export.py --checkpoint CHECKPOINT --out {folder}')
    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    try:
        with open(os.path.join(folder, 'captioner.json')) as f:
            config = json.load(f)
        sessions = [onnxruntime.InferenceSession(os.path.join(folder, name), options,
                                                 providers=['CPUExecutionProvider']) for name in FILES[:2]]
        vocab = Vocabulary.from_words(config['vocab'])
    except Exception as err:
        raise CheckpointError(f'{folder}: not a folder written by export.py ({str(err).splitlines()[0]})') from None
    return OnnxEncoder(sessions[0]), OnnxDecoder(sessions[1], config), vocab, config


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument('--checkpoint', type=str, default='models/checkpoint.pt', help='checkpoint from train.py')
    parser.add_argument('--output_dir', '--out', type=str, default='models/onnx', help='folder for the ONNX files')
    args = parser.parse_args(argv)
    try:
        export(args.checkpoint, args.output_dir)
    except (CheckpointError, OSError) as err:
        sys.exit(f'error: {err}')
    print(f'wrote {", ".join(os.path.join(args.output_dir, name) for name in FILES)}')


if __name__ == '__main__':
    main()
