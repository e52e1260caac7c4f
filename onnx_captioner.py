"""Captioning with export.py's ONNX files through onnxruntime: the encoder and the decoder step run there,
greedy decoding and beam search stay DecoderRNN's own loops."""
import json
import os

import torch

from build_vocab import Vocabulary
from files import CheckpointError
from model import CaptionerConfig, DecoderRNN

FILES = ('encoder.onnx', 'decoder_step.onnx', 'captioner.json')


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
        self.max_seq_length = config.max_seq_length

    def embed(self, words):
        return words  # decoder_step.onnx embeds the word ids itself

    def step(self, inputs, states):
        batch = inputs.size(0)
        if inputs.dtype == torch.long:
            token, feature = inputs, torch.zeros(batch, self.config.embed_size)
        else:
            token, feature = torch.full((batch,), -1), inputs
        if states is None:
            states = (torch.zeros(self.config.num_layers, batch, self.config.hidden_size),) * 2
        log_probs, h, c = self.session.run(None, {'token': token.numpy(), 'feature': feature.numpy(),
                                                  'h': states[0].numpy(), 'c': states[1].numpy()})
        return torch.from_numpy(log_probs), (torch.from_numpy(h), torch.from_numpy(c))


def load_onnx_captioner(folder, threads=None):
    """The encoder, decoder, vocabulary and config of an exported folder, run by onnxruntime."""
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
            saved = json.load(f)
        sessions = [onnxruntime.InferenceSession(os.path.join(folder, name), options,
                                                 providers=['CPUExecutionProvider']) for name in FILES[:2]]
        vocab = Vocabulary.from_words(saved['vocab'])
        config = CaptionerConfig.from_dict({**saved, 'vocab_size': len(vocab)})
    except Exception as err:
        raise CheckpointError(f'{folder}: not a folder written by export.py ({str(err).splitlines()[0]})') from None
    return OnnxEncoder(sessions[0]), OnnxDecoder(sessions[1], config), vocab, config
