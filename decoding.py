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
    for t in range(max_len or decoder.max_seq_length):
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
