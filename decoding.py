"""From a trained model to captions: a TrainedCaptioner, loaded from a train.py checkpoint or export.py's safetensors
folder (load_captioner), the tutorial's files (load_tutorial) or export.py's ONNX files (load_onnx_captioner), captions
image files in batches (greedy, beam search, or sampled) as one DecodeSettings says, through CaptionDecoder's
decoding loop. With the ONNX files the encoder and the decoder step run in onnxruntime, and the loop stays
CaptionDecoder's own."""
import hashlib
import json
import os
from dataclasses import replace
from typing import NamedTuple

import torch
from safetensors import safe_open
from torch import nn

from data_loader import eval_transform
from files import CheckpointError, ImageError, load_image
from model import (
    AttentionDecoder,
    AttentionState,
    CaptionDecoder,
    CaptionerConfig,
    DecoderRNN,
    DecodeSettings,
    build_captioner,
    ids_to_sentence,
    read_checkpoint,
)
from vocabulary import Vocabulary, load_vocab


class TrainedCaptioner(NamedTuple):
    """A trained model ready to caption: its encoder and decoder (PyTorch's in eval mode, or onnxruntime's), its
    vocabulary and its CaptionerConfig. It unpacks as encoder, decoder, vocab, config."""
    encoder: 'nn.Module | OnnxEncoder'
    decoder: 'DecoderRNN | OnnxDecoder'
    vocab: Vocabulary
    config: CaptionerConfig

    @property
    def device(self):
        """Where images go: where the encoder's weights are (onnxruntime takes them from the CPU)."""
        return next(self.encoder.parameters()).device if isinstance(self.encoder, nn.Module) else torch.device('cpu')

    def decode(self, features, settings):
        """Word ids of a batch of features' captions, (batch, steps): greedy, beam search or, with
        settings.samples N, N sampled captions per image, (batch * N, steps) with the rows of one image together."""
        settings = settings.for_vocab(self.vocab)
        if settings.samples:
            return self.decoder.draw(features, settings)[0]
        if settings.beam_size > 1:
            return self.decoder.beam_search(features, settings)
        return self.decoder.sample(features, settings)

    @torch.no_grad()
    def caption_batches(self, paths, settings=DecodeSettings(), batch_size=32):
        """Yields (paths of the batch, {path: caption}, {path: error}) for each batch in turn: only one batch of
        images is in memory at a time. A caption has at least settings.min_len words before <end>, so none comes
        out empty (model.forbid). With settings.samples N, {path: [N sampled captions]} instead."""
        transform = eval_transform(self.config.image_size, self.config.crop_size, self.config.normalization)
        for start in range(0, len(paths), batch_size):
            batch, images, captions, errors = paths[start:start + batch_size], {}, {}, {}
            for path in batch:
                try:
                    images[path] = transform(load_image(path))
                except ImageError as err:
                    errors[path] = str(err)
            if images:
                ids = self.decode(self.encoder(torch.stack(list(images.values())).to(self.device)), settings)
                sentences = [ids_to_sentence(row, self.vocab) for row in ids.cpu()]
                if settings.samples:  # the rows of one image are together
                    sentences = [sentences[i:i + settings.samples] for i in range(0, len(sentences), settings.samples)]
                captions = dict(zip(images, sentences))
            yield batch, captions, errors

    def caption(self, paths, settings=DecodeSettings(), batch_size=32):
        """Returns {path: caption} (with settings.samples N, {path: [N sampled captions]}) for readable images
        and {path: error} for the rest."""
        captions, errors = {}, {}
        for _, batch_captions, batch_errors in self.caption_batches(paths, settings, batch_size):
            captions.update(batch_captions)
            errors.update(batch_errors)
        return captions, errors


def load_captioner(path, device='cpu'):
    """The TrainedCaptioner of a train.py checkpoint, or of a folder export.py --format safetensors wrote, on any
    device."""
    if os.path.isdir(path):
        return load_safetensors_folder(path, device)
    return captioner_from_checkpoint(read_checkpoint(path), path, device)


def captioner_from_checkpoint(checkpoint, path, device='cpu'):
    """The TrainedCaptioner of a train.py checkpoint already read (export.py also wants what else it records)."""
    try:
        config = CaptionerConfig.from_dict(checkpoint['model_args'])
        encoder, decoder = build_captioner(replace(config, train_backbone=False))  # scst.py unfreezes what it trains
        encoder.load_state_dict(checkpoint['encoder'])
        decoder.load_state_dict(checkpoint['decoder'])
        vocab = Vocabulary.from_words(checkpoint['vocab'])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as err:
        raise CheckpointError(f'{path}: not a train.py checkpoint ({str(err).splitlines()[0]})') from None
    if len(vocab) != config.vocab_size:
        raise CheckpointError(f'{path}: holds {len(vocab)} words but its decoder expects {config.vocab_size}')
    return TrainedCaptioner(encoder.to(device).eval(), decoder.to(device).eval(), vocab, config)


def load_tutorial(encoder_path, decoder_path, vocab_path, sizes=None, device='cpu'):
    """The TrainedCaptioner of the tutorial's separate encoder and decoder state dicts, on any device; sizes
    are read off the weights, and sizes given as flags ({'embed_size': 256, ...}) are only checked against them."""
    vocab = load_vocab(vocab_path)
    encoder_state, decoder_state = read_checkpoint(encoder_path), read_checkpoint(decoder_path)
    try:
        vocab_size, embed_size = decoder_state['embed.weight'].shape
        hidden_size = decoder_state['lstm.weight_hh_l0'].shape[1]
        num_layers = sum(1 for key in decoder_state if key.startswith('lstm.weight_ih_l'))
        encoder_embed = encoder_state['linear.weight'].shape[0]
    except (KeyError, AttributeError, TypeError):
        raise CheckpointError(f'{decoder_path}, {encoder_path}: not the tutorial decoder and encoder '
                              'state dicts') from None
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
    config = CaptionerConfig(vocab_size, embed_size, hidden_size, num_layers, image_size=224, crop_size=224)
    encoder, decoder = build_captioner(config)
    try:
        encoder.load_state_dict(encoder_state)
        decoder.load_state_dict(decoder_state)
    except RuntimeError as err:
        raise CheckpointError(f'{encoder_path}: does not fit the tutorial model ({str(err).splitlines()[0]})') from None
    return TrainedCaptioner(encoder.to(device).eval(), decoder.to(device).eval(), vocab, config)


def check_max_len(checkpoint, config, max_len):
    """A checkpoint trained with --max_seq_length 0 (before that was refused) sets no usable caption length."""
    trained = config.max_seq_length
    if max_len is None and not (isinstance(trained, int) and trained >= 1):
        raise CheckpointError(f'{checkpoint} was trained with --max_seq_length {trained}, which allows no words; '
                              'pass --max_seq_length N, the longest caption in words')


# --- ONNX: export.py writes these files ---

ONNX_FILES = ('encoder.onnx', 'decoder_step.onnx', 'captioner.json')


class OnnxEncoder:
    """encoder.onnx, called like EncoderCNN."""

    def __init__(self, session):
        self.session = session

    def __call__(self, images):
        return torch.from_numpy(self.session.run(None, {'image': images.cpu().numpy()})[0])


class OnnxDecoder:
    """decoder_step.onnx of the fc decoder, decoded by the decoders' own loop (CaptionDecoder.decode, behind sample,
    beam_search and draw), which asks it for start, step, embed and select."""

    decode, decode_length = CaptionDecoder.decode, CaptionDecoder.decode_length
    sample, beam_search, draw = CaptionDecoder.sample, CaptionDecoder.beam_search, CaptionDecoder.draw
    start = staticmethod(DecoderRNN.start)
    select = staticmethod(DecoderRNN.select)

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


class OnnxAttentionDecoder(OnnxDecoder):
    """decoder_step.onnx of the attention decoder (export.AttentionStep): the state is AttentionDecoder's, h and s
    for each row and its grid, and the step computes the keys from the grid itself."""

    select = staticmethod(AttentionDecoder.select)

    def start(self, grid):
        """Token -1: the graph's first step, which takes h and s from the grid (the zeros here are not used)."""
        zeros = grid.new_zeros(grid.size(0), self.config.hidden_size)
        return torch.full((grid.size(0),), -1), AttentionState(zeros, zeros, grid, keys=None)

    def step(self, inputs, state):
        log_probs, h, s, alpha = self.session.run(None, {'token': inputs.numpy(), 'grid': state.grid.numpy(),
                                                         'h': state.h.numpy(), 's': state.s.numpy()})
        return torch.from_numpy(log_probs), state._replace(h=torch.from_numpy(h), s=torch.from_numpy(s),
                                                           alpha=torch.from_numpy(alpha))


def load_onnx_captioner(folder, threads=None):
    """The TrainedCaptioner of an exported folder, run by onnxruntime on the CPU."""
    try:
        import onnxruntime
    except ImportError:
        raise CheckpointError('--onnx needs onnxruntime: pip install onnxruntime') from None
    missing = [name for name in ONNX_FILES if not os.path.isfile(os.path.join(folder, name))]
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
                                                 providers=['CPUExecutionProvider']) for name in ONNX_FILES[:2]]
        vocab = Vocabulary.from_words(saved['vocab'])
        config = CaptionerConfig.from_dict({**saved, 'vocab_size': len(vocab)})
    except Exception as err:
        raise CheckpointError(f'{folder}: not a folder written by export.py ({str(err).splitlines()[0]})') from None
    decoder = (OnnxAttentionDecoder if config.decoder == 'attention' else OnnxDecoder)(sessions[1], config)
    return TrainedCaptioner(OnnxEncoder(sessions[0]), decoder, vocab, config)


# --- Safetensors: export.py --format safetensors writes these files, and a copy of the demo model ships in them ---

SAFETENSORS_FILES = ('model.safetensors', 'config.json', 'vocab.json')
SHIPPED_MODEL = 'models/shapes'  # relative to the folder a script runs in, like every other default path
SHIPPED_NOTE = ('shipped with this repository, trained by python demo.py on synthetic shapes only: '
                'for photos, train on COCO (docs/training.md) and pass --checkpoint')


def default_model(*candidates):
    """For a script run without --checkpoint: the first of candidates that exists, else the shipped model if it is
    here, with the line that names it; else (the first candidate, None), for the caller to report as missing."""
    for path in (*candidates, SHIPPED_MODEL):
        if os.path.exists(path):
            return path, f'model: {path}' + (f' ({SHIPPED_NOTE})' if path == SHIPPED_MODEL else '')
    return candidates[0], None


def weights_digest(tensors):
    """sha256 of every tensor's name, dtype, shape and bytes, in name order. export.py stores it in
    model.safetensors' metadata, because safetensors itself only checks that the header fits the file: a changed
    number would otherwise load silently."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f'{name} {tensor.dtype} {tuple(tensor.shape)}\n'.encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def load_safetensors_folder(folder, device='cpu'):
    """The TrainedCaptioner of export.py's safetensors folder. Only safetensors and json read it, so nothing in the
    folder can run code (no torch.load, no pickle); each fault is one CheckpointError naming the file at fault."""
    weights_path, config_path, vocab_path = (os.path.join(folder, name) for name in SAFETENSORS_FILES)
    for path in (weights_path, config_path, vocab_path):
        if not os.path.isfile(path):
            raise CheckpointError(f'{path}: no such file; pass a train.py checkpoint, or a folder written by '
                                  'python export.py --format safetensors')
    try:
        with safe_open(weights_path, framework='pt') as f:
            digest = (f.metadata() or {}).get('sha256')
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:  # safetensors' SafetensorError (its module moved between versions), or an OSError
        raise CheckpointError(f'{weights_path}: not a readable safetensors file ({str(err).splitlines()[0]})') from None
    if digest is not None and digest != weights_digest(tensors):  # files from other tools carry no digest
        raise CheckpointError(f'{weights_path}: the weights differ from those export.py wrote (sha256 mismatch); '
                              'export the checkpoint again')
    try:
        with open(config_path, encoding='utf-8') as f:
            config = CaptionerConfig.from_dict(json.load(f))
        encoder, decoder = build_captioner(replace(config, train_backbone=False))
    except (OSError, ValueError, TypeError, AttributeError) as err:
        raise CheckpointError(f'{config_path}: not a model config ({str(err).splitlines()[0]})') from None
    try:
        with open(vocab_path, encoding='utf-8') as f:
            vocab = Vocabulary.from_words(json.load(f)['words'])
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        raise CheckpointError(f'{vocab_path}: not a vocabulary ({str(err).splitlines()[0]})') from None
    if len(vocab) != config.vocab_size:
        raise CheckpointError(f'{vocab_path}: holds {len(vocab)} words but {config_path} says {config.vocab_size}')
    modules = {'encoder': encoder, 'decoder': decoder}
    check_weights_fit(tensors, modules, weights_path, config_path)
    for name, module in modules.items():
        module.load_state_dict({key.removeprefix(f'{name}.'): value for key, value in tensors.items()
                                if key.startswith(f'{name}.')})
    return TrainedCaptioner(encoder.to(device).eval(), decoder.to(device).eval(), vocab, config)


def check_weights_fit(tensors, modules, weights_path, config_path):
    """Every weight the modules built from config.json need, of the shape they need, and no other: else one line
    with the first few differences."""
    expected = {f'{name}.{key}': value.shape for name, module in modules.items()
                for key, value in module.state_dict().items()}
    problems = [f'no {key}' for key in expected if key not in tensors]
    problems += [f'unexpected {key}' for key in tensors if key not in expected]
    problems += [f'{key} is {tuple(tensors[key].shape)}, not {tuple(shape)}' for key, shape in expected.items()
                 if key in tensors and tensors[key].shape != shape]
    if problems:
        more = f' and {len(problems) - 3} more' if len(problems) > 3 else ''
        raise CheckpointError(f'{weights_path} does not fit {config_path}: {"; ".join(problems[:3])}{more}')
