"""From a trained model to captions: image files captioned in batches (greedy, beam search, or sampled),
sampling with a temperature and nucleus (top-p) truncation, for sample.py --sample and for self-critical
training (scst.py), and captioning with export.py's ONNX files through onnxruntime, where the encoder and
the decoder step run in onnxruntime and greedy decoding and beam search stay DecoderRNN's own loops."""
import json
import math
import os

import torch

from build_vocab import Vocabulary
from data_loader import eval_transform
from files import CheckpointError, ImageError, load_image
from model import CaptionerConfig, DecoderRNN, decode_options, ids_to_sentence, repeated_trigrams


def nucleus(log_probs, top_p):
    """Keep the smallest set of most probable words whose probability reaches top_p (always the top
    word), renormalised; the rest get -inf (Holtzman et al., ICLR 2020)."""
    if top_p >= 1.0:
        return log_probs
    sorted_log_probs, order = log_probs.sort(-1, descending=True)
    mass_before = sorted_log_probs.exp().cumsum(-1) - sorted_log_probs.exp()
    drop = torch.zeros_like(log_probs, dtype=torch.bool).scatter_(-1, order, mass_before >= top_p)
    return log_probs.masked_fill(drop, -math.inf).log_softmax(-1)


def sample(decoder, features, n=1, temperature=1.0, top_p=1.0, end_id=2, unk_id=3, max_len=None, min_len=1,
           start_id=None, block_trigrams=False):
    """n sampled captions per image: (words, log_probs, mask), each (batch * n, steps), rows of one image
    together. The words ruled out are greedy and beam decoding's (DecoderRNN.forbid: unk_id always, start_id
    after the first step, <end> before min_len words other than <start>) and, with block_trigrams, repeated
    trigrams. log_probs are those of the distribution sampled from (after temperature, top-p and those rules);
    mask marks the words up to and including <end>; after <end> a row holds <end>. Gradients flow to the
    decoder and features when enabled, as SCST needs."""
    inputs, states = features.repeat_interleave(n, dim=0), None
    finished = torch.zeros(inputs.size(0), dtype=torch.bool, device=features.device)
    said = torch.zeros(inputs.size(0), dtype=torch.long, device=features.device)
    words, log_probs, mask = [], [], []
    for t in range(decoder.decode_length(max_len)):
        scores, states = decoder.step(inputs, states)
        ruled_out = scores.new_zeros(scores.shape)  # forbid() writes -inf in place, so not into scores' graph
        decoder.forbid(ruled_out, t, said, end_id, unk_id, start_id, min_len)
        banned = ruled_out.isinf()
        if block_trigrams and words:
            banned |= repeated_trigrams(torch.stack(words, 1), scores.size(1), end_id)
        scores = nucleus((scores / temperature).masked_fill(banned, -math.inf).log_softmax(-1), top_p)
        word = torch.multinomial(scores.detach().exp(), 1).squeeze(1).masked_fill(finished, end_id)
        mask.append(~finished)
        log_probs.append(scores.gather(1, word.unsqueeze(1)).squeeze(1).masked_fill(finished, 0.0))
        words.append(word)
        said += word != start_id if start_id is not None else 1
        finished = finished | (word == end_id)
        if finished.all():
            break
        inputs = decoder.embed(word)
    return torch.stack(words, 1), torch.stack(log_probs, 1), torch.stack(mask, 1)


@torch.no_grad()
def caption_batches(paths, encoder, decoder, vocab, config, device, max_len=None, beam_size=1, length_penalty=0.0,
                    batch_size=32, min_len=1, block_trigrams=False, samples=0, temperature=1.0, top_p=1.0):
    """Yields (paths of the batch, {path: caption}, {path: error}) for each batch in turn: only one batch of
    images is in memory at a time. A caption has at least min_len words before <end>, so none comes out empty
    (DecoderRNN.forbid). With samples=N, {path: [N sampled captions]} instead (sample(), with
    temperature and top_p)."""
    transform = eval_transform(config.image_size, config.crop_size)
    special = dict(decode_options(vocab, max_len, min_len), block_trigrams=block_trigrams)
    for start in range(0, len(paths), batch_size):
        batch, images, captions, errors = paths[start:start + batch_size], {}, {}, {}
        for path in batch:
            try:
                images[path] = transform(load_image(path))
            except ImageError as err:
                errors[path] = str(err)
        if images:
            features = encoder(torch.stack(list(images.values())).to(device))
            if samples:
                ids, _, _ = sample(decoder, features, samples, temperature, top_p, **special)
            elif beam_size > 1:
                ids = decoder.beam_search(features, beam_size, length_penalty=length_penalty, **special)
            else:
                ids = decoder.sample(features, **special)
            sentences = [ids_to_sentence(row, vocab) for row in ids.cpu()]
            if samples:  # the rows of one image are together
                sentences = [sentences[i:i + samples] for i in range(0, len(sentences), samples)]
            captions = dict(zip(images, sentences))
        yield batch, captions, errors


def caption_images(paths, encoder, decoder, vocab, config, device, max_len=None, beam_size=1, length_penalty=0.0,
                   batch_size=32, min_len=1, block_trigrams=False, samples=0, temperature=1.0, top_p=1.0):
    """Returns {path: caption} (with samples=N, {path: [N sampled captions]}) for readable images and
    {path: error} for the rest."""
    captions, errors = {}, {}
    for _, batch_captions, batch_errors in caption_batches(paths, encoder, decoder, vocab, config, device, max_len,
                                                        beam_size, length_penalty, batch_size, min_len,
                                                        block_trigrams, samples, temperature, top_p):
        captions.update(batch_captions)
        errors.update(batch_errors)
    return captions, errors


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
    return OnnxEncoder(sessions[0]), OnnxDecoder(sessions[1], config), vocab, config
