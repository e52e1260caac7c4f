"""Decoding beyond the most probable caption: trigram blocking, and sampling with a temperature and
nucleus (top-p) truncation, for sample.py --sample and for self-critical training (scst.py)."""
import math

import torch


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
           block_trigrams=False):
    """n sampled captions per image: (words, log_probs, mask), each (batch * n, steps), rows of one image
    together. log_probs are those of the distribution sampled from (after temperature, top-p, and the bans
    on unk_id (an id or a list of ids), on <end> before min_len words and on repeated trigrams); mask marks
    the words up to and including <end>; after <end> a row holds <end>. Gradients flow to the decoder and
    features when enabled, as SCST needs."""
    inputs, states = features.repeat_interleave(n, dim=0), None
    finished = torch.zeros(inputs.size(0), dtype=torch.bool, device=features.device)
    words, log_probs, mask = [], [], []
    for _ in range(max_len or decoder.max_seq_length):
        scores, states = decoder.step(inputs, states)
        banned = torch.zeros_like(scores, dtype=torch.bool)
        banned[:, unk_id] = True
        if len(words) < min_len:
            banned[:, end_id] = True
        if block_trigrams and words:
            banned |= repeated_trigrams(torch.stack(words, 1), scores.size(1), end_id)
        scores = nucleus((scores / temperature).masked_fill(banned, -math.inf).log_softmax(-1), top_p)
        word = torch.multinomial(scores.detach().exp(), 1).squeeze(1).masked_fill(finished, end_id)
        mask.append(~finished)
        log_probs.append(scores.gather(1, word.unsqueeze(1)).squeeze(1).masked_fill(finished, 0.0))
        words.append(word)
        finished = finished | (word == end_id)
        if finished.all():
            break
        inputs = decoder.embed(word)
    return torch.stack(words, 1), torch.stack(log_probs, 1), torch.stack(mask, 1)
