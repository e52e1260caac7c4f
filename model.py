"""The captioning model: a CNN encoder that turns an image into one embedding, and an LSTM decoder
that writes the caption word by word starting from that embedding (Vinyals et al., "Show and Tell",
CVPR 2015). Parameter names match the PyTorch tutorial's model, so its checkpoints load as they are.
"""
import argparse
import math
import os
import re

import torch
import torchvision
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from decoding import repeated_trigrams
from DIY_LSTM import LSTM


class CheckpointError(Exception):
    """A checkpoint or weights file that cannot be used; the message names the file and the fix."""


def at_least(kind, low, above=False):
    """An argparse type= for a finite int or float that is >= low (> low with above=True), so that a bad
    value gets argparse's own one-line error instead of a traceback or a silent run that does nothing."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'{text!r} is not {"a whole number" if kind is int else "a number"}')
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f'must be a finite number, not {text}')
        if value < low or (above and value == low):
            raise argparse.ArgumentTypeError(f'must be {"greater than" if above else "at least"} {low}, not {text}')
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its "invalid int value" message
    return parse


positive_int = at_least(int, 1)  # sizes, lengths, steps, epochs, beam sizes
count = at_least(int, 0)  # --num_workers, --save_step (0: only at the end of each epoch)
positive_float = at_least(float, 0, above=True)  # learning rates, clip values
nonnegative_float = at_least(float, 0)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows every flag's default, and the docstring's examples as they are written."""


def atomic_write(path, write):
    """write(file) into a temporary file beside path, then rename it over path: whatever happens, path
    holds either the old content or the new, never half of it."""
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    temporary = f'{path}.tmp{os.getpid()}'
    try:
        with open(temporary, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def save_file(path, write):
    """atomic_write, with a full disk or any other write failure as one CheckpointError line."""
    try:
        atomic_write(path, write)
    except OSError as err:
        raise CheckpointError(f'could not write {path} ({err.strerror or err}); '
                              f'the previous {os.path.basename(path)}, if any, is intact') from None


def save_checkpoint(path, checkpoint):
    save_file(path, lambda f: torch.save(checkpoint, f))


def remove_stale_temporaries(folder):
    """Delete the NAME.tmpPID files that atomic_write leaves when a process is killed mid-save, if that
    process is gone: each can be as large as a checkpoint. Returns (files removed, bytes freed)."""
    removed, freed = 0, 0
    for entry in os.scandir(folder) if os.path.isdir(folder) else ():
        match = re.fullmatch(r'.+\.tmp(\d+)', entry.name)
        if not match or not entry.is_file(follow_symlinks=False) or process_alive(int(match.group(1))):
            continue
        try:
            size = entry.stat().st_size
            os.remove(entry.path)
        except FileNotFoundError:
            continue  # another run removed it first
        removed, freed = removed + 1, freed + size
    return removed, freed


def process_alive(pid):
    """Whether a process with this id exists (signal 0 checks without sending anything)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # alive but someone else's, or not a real pid: leave the file alone
    return True


def read_checkpoint(path):
    """torch.load with weights_only=True: tensors and plain data load, code never runs. Every file this
    project reads this way holds a dict (a checkpoint or a state dict), so anything else is refused."""
    if not os.path.isfile(path):
        raise CheckpointError(f'{path}: no such file')
    try:
        loaded = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f'{path}: not a readable checkpoint ({reason})') from None
    if not isinstance(loaded, dict):
        raise CheckpointError(f'{path}: holds a {type(loaded).__name__}, not a checkpoint (a dict of weights '
                              'and settings); pass a checkpoint.pt written by train.py')
    return loaded


def small_cnn(width=16):
    """A five-layer CNN that learns the synthetic shapes from scratch in minutes on a CPU."""
    layers, channels = [], 3
    for out in [width, 2 * width, 4 * width, 8 * width, 8 * width]:
        layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1, bias=False),
                   nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
        channels = out
    layers.append(nn.AdaptiveAvgPool2d(1))
    return nn.Sequential(*layers), channels


# The torchvision networks whose layers end in avgpool and fc, which is what EncoderCNN takes apart.
RESNETS = ('resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152', 'resnext50_32x4d', 'resnext101_32x8d',
           'resnext101_64x4d', 'wide_resnet50_2', 'wide_resnet101_2')


def backbone_trunk(name, weights):
    """A classification network without its final fc layer, and the size of the pooled features.

    weights: 'DEFAULT' (torchvision's ImageNet weights, downloaded once), None (random), or the path
    of a local .pth state dict such as torchvision's resnet152-394f9c45.pth, for machines offline.
    """
    if name == 'smallcnn':
        return small_cnn()
    if name not in RESNETS:
        raise ValueError(f'--backbone {name} is not supported: use smallcnn or a torchvision ResNet '
                         f'({", ".join(RESNETS)})')
    local = weights is not None and weights != 'DEFAULT'
    try:
        net = torchvision.models.get_model(name, weights=None if local else weights)
    except OSError as err:  # urllib's URLError is an OSError
        raise CheckpointError(f'could not download the ImageNet weights of {name} ({err}); download them elsewhere '
                              f'and pass --weights PATH, or --weights none') from err
    if local:
        net.load_state_dict(read_checkpoint(weights))
    return nn.Sequential(*list(net.children())[:-1]), net.fc.in_features


class EncoderCNN(nn.Module):
    def __init__(self, embed_size, backbone='resnet152', weights='DEFAULT', train_backbone=False,
                 bn_momentum=0.01):
        super().__init__()
        self.resnet, features = backbone_trunk(backbone, weights)
        self.linear = nn.Linear(features, embed_size)
        self.bn = nn.BatchNorm1d(embed_size, momentum=bn_momentum)
        self.train_backbone = train_backbone
        self.resnet.requires_grad_(train_backbone)

    def train(self, mode=True):
        """A frozen backbone stays in eval mode, so its BatchNorm statistics never drift."""
        super().train(mode)
        if not self.train_backbone:
            self.resnet.eval()
        return self

    def forward(self, images):
        return self.head(self.pooled(images))

    def pooled(self, images):
        """The backbone's pooled features: what extract_features.py caches for a frozen backbone."""
        with torch.set_grad_enabled(self.train_backbone and torch.is_grad_enabled()):
            return self.resnet(images).flatten(1)

    def head(self, pooled):
        return self.bn(self.linear(pooled))


class DecoderRNN(nn.Module):
    def __init__(self, embed_size, hidden_size, vocab_size, num_layers, max_seq_length=20):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_size)
        self.lstm = LSTM(embed_size, hidden_size, num_layers, batch_first=True)
        self.linear = nn.Linear(hidden_size, vocab_size)
        self.max_seq_length = max_seq_length

    def forward(self, features, captions, lengths):
        """Teacher forcing: step 0 sees the image, step t sees word t-1 and predicts word t.

        Returns scores for the packed (non-padding) positions only, in the order of
        pack_padded_sequence(captions, lengths, batch_first=True).data.
        """
        embeddings = self.embed(captions[:, :-1])
        inputs = torch.cat((features.unsqueeze(1), embeddings), 1)
        packed = pack_padded_sequence(inputs, lengths, batch_first=True)
        hiddens, _ = self.lstm(packed)
        return self.linear(hiddens.data)

    def step(self, inputs, states):
        """One decoding step: log-probabilities of the next word, and the new LSTM state."""
        hiddens, states = self.lstm(inputs.unsqueeze(1), states)
        return self.linear(hiddens.squeeze(1)).log_softmax(-1), states

    def decode_length(self, max_len):
        max_len = max_len or self.max_seq_length
        if max_len < 1:
            raise ValueError(f'the longest caption must be at least 1 word, not {max_len}')
        return max_len

    @staticmethod
    def forbid(log_probs, step, said, end_id, unk_id, start_id, min_len):
        """Rule words out, in place, for greedy and beam decoding alike: unk_id (an id or a list of ids)
        always; start_id after the first step (train.py's captions begin with <start>, so a trained model
        says it first); and <end> while fewer than min_len words other than <start> have been said, so
        that no caption comes out empty."""
        log_probs[..., unk_id] = -math.inf
        if start_id is not None and step > 0:
            log_probs[..., start_id] = -math.inf
        log_probs[..., end_id] = log_probs[..., end_id].masked_fill(said < min_len, -math.inf)

    @torch.no_grad()
    def sample(self, features, end_id=2, unk_id=3, max_len=None, min_len=1, start_id=None, block_trigrams=False):
        """Greedy decoding for a batch, with the rules of forbid(); stops once every caption has produced <end>.
        block_trigrams: never choose a word that repeats a trigram of the caption."""
        inputs, states = features, None
        words, finished = [], torch.zeros(features.size(0), dtype=torch.bool, device=features.device)
        said = torch.zeros(features.size(0), dtype=torch.long, device=features.device)
        for t in range(self.decode_length(max_len)):
            log_probs, states = self.step(inputs, states)
            self.forbid(log_probs, t, said, end_id, unk_id, start_id, min_len)
            if block_trigrams and words:
                log_probs[repeated_trigrams(torch.stack(words, 1), log_probs.size(1), end_id)] = -math.inf
            predicted = log_probs.argmax(1)
            words.append(predicted)
            said += predicted != start_id if start_id is not None else 1
            finished |= predicted == end_id
            if finished.all():
                break
            inputs = self.embed(predicted)
        return torch.stack(words, 1)

    @torch.no_grad()
    def beam_search(self, features, beam_size=3, end_id=2, unk_id=3, max_len=None, length_penalty=0.0, min_len=1,
                    all_beams=False, start_id=None, block_trigrams=False):
        """Batched beam search: for each image the caption of highest total log-probability among the beams.

        With length_penalty alpha > 0, finished captions are ranked by log p / length^alpha, which stops
        the search from favouring short captions. The rules of forbid() hold, so an empty caption never wins.
        beam_size=1 gives exactly the greedy caption.
        all_beams=True returns every beam, best first, (batch, beams, steps), and their log-probabilities.
        block_trigrams: no beam may extend itself with a word that repeats one of its trigrams.
        """
        batch, beams = features.size(0), beam_size
        # Every beam starts from the image; only beam 0 counts at first, so the first step picks distinct words.
        scores = features.new_full((batch, beams), -math.inf)
        scores[:, 0] = 0.0
        inputs, states = features.repeat_interleave(beams, dim=0), None
        sequences = torch.zeros(batch, beams, 0, dtype=torch.long, device=features.device)
        finished = torch.zeros(batch, beams, dtype=torch.bool, device=features.device)
        offsets = torch.arange(batch, device=features.device).unsqueeze(1) * beams
        for t in range(self.decode_length(max_len)):
            if finished.all():
                break
            log_probs, states = self.step(inputs, states)
            log_probs = log_probs.view(batch, beams, -1)
            said = (sequences != start_id).sum(2) if start_id is not None else sequences.new_full(finished.shape, t)
            self.forbid(log_probs, t, said, end_id, unk_id, start_id, min_len)
            if block_trigrams:
                repeats = repeated_trigrams(sequences.flatten(0, 1), log_probs.size(2), end_id)
                log_probs[repeats.view_as(log_probs)] = -math.inf
            # A finished beam can only repeat <end>, at no cost, so its score stays as it was.
            log_probs = log_probs.masked_fill(finished.unsqueeze(2), -math.inf)
            log_probs[:, :, end_id] = log_probs[:, :, end_id].masked_fill(finished, 0.0)
            vocab_size = log_probs.size(2)
            scores, flat = (scores.unsqueeze(2) + log_probs).flatten(1).topk(beams, dim=1)
            origin, words = flat // vocab_size, flat % vocab_size  # which beam each survivor extends, and how
            sequences = torch.cat([sequences.gather(1, origin.unsqueeze(2).expand_as(sequences)),
                                   words.unsqueeze(2)], dim=2)
            finished = finished.gather(1, origin) | (words == end_id)
            rows = (offsets + origin).flatten()
            states = tuple(state[:, rows] for state in states)
            inputs = self.embed(words.flatten())
        lengths = ((sequences != end_id).cumsum(2) == torch.arange(1, sequences.size(2) + 1, device=scores.device))
        lengths = lengths.sum(2) + finished.long()  # words up to and including <end>
        ranking = scores / lengths.float() ** length_penalty
        if all_beams:  # every beam, best first, with its total log-probability
            order = ranking.argsort(dim=1, descending=True, stable=True)
            return sequences.gather(1, order.unsqueeze(2).expand_as(sequences)), scores.gather(1, order)
        best = ranking.argmax(1)
        return sequences[torch.arange(batch), best]

def load_captioner(path, device='cpu'):
    """Rebuild encoder, decoder and vocabulary from a train.py checkpoint, on any device."""
    from build_vocab import Vocabulary
    checkpoint = read_checkpoint(path)
    try:
        config, words = checkpoint['model_args'], checkpoint['vocab']
        encoder = EncoderCNN(config['embed_size'], config['backbone'], weights=None, bn_momentum=config['bn_momentum'])
        decoder = DecoderRNN(config['embed_size'], config['hidden_size'], config['vocab_size'], config['num_layers'],
                             config['max_seq_length'])
        encoder.load_state_dict(checkpoint['encoder'])
        decoder.load_state_dict(checkpoint['decoder'])
        vocab = Vocabulary.from_words(words)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f'{path}: not a train.py checkpoint ({str(err).splitlines()[0]})') from None
    if len(vocab) != config['vocab_size']:
        raise CheckpointError(f'{path}: holds {len(vocab)} words but its decoder expects {config["vocab_size"]}')
    return encoder.to(device).eval(), decoder.to(device).eval(), vocab, config


def decode_options(vocab, max_len=None, min_len=1):
    """The special word ids for DecoderRNN.sample and beam_search, so every script decodes alike."""
    return dict(end_id=vocab('<end>'), unk_id=sorted({vocab('<unk>'), vocab('<pad>')}), start_id=vocab('<start>'),
                max_len=max_len, min_len=min_len)


def ids_to_sentence(ids, vocab):
    """Word ids to a plain sentence: no <start>, nothing from <end> on, punctuation against its word."""
    words = []
    for index in ids:
        word = vocab.idx2word[int(index)]
        if word == '<end>':
            break
        if word != '<start>':
            words.append(word)
    return ' '.join(words).replace(' .', '.').replace(' ,', ',')
