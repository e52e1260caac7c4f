"""Trigram blocking in greedy and beam search, and temperature / top-p sampling, against brute force
on a tiny vocabulary."""
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from test_evaluate import END, START, UNK, all_captions, sequence_log_prob, tiny_decoder, truncate

import synthetic
import train as trainer
import training
from conftest import run
from model import DecodeSettings, repeated_trigrams
from vocabulary import build_vocab, save_vocab


def has_repeated_trigram(words):
    trigrams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    return len(trigrams) != len(set(trigrams))


def test_the_mask_blocks_exactly_the_words_that_repeat_a_trigram():
    rng = np.random.default_rng(0)
    for _ in range(200):
        rows = rng.integers(0, 4, size=(3, int(rng.integers(0, 9))))  # few words, so repeats are common
        mask = repeated_trigrams(torch.tensor(rows), 6, end_id=END)
        for row, blocked in zip(rows.tolist(), mask):
            seen = {tuple(row[i:i + 3]) for i in range(len(row) - 2)}
            expected = [w != END and len(row) >= 2 and tuple(row[-2:] + [w]) in seen for w in range(6)]
            assert blocked.tolist() == expected, row


def repetitive_decoder(seed):
    """A tiny decoder that likes saying word 5 again and again, so the best caption repeats trigrams."""
    decoder = tiny_decoder(seed)
    with torch.no_grad():
        decoder.linear.bias[5] += 6.0
        decoder.linear.bias[END] -= 4.0
    return decoder


@pytest.mark.parametrize('seed', range(4))
def test_exhaustive_beam_with_blocking_finds_the_best_caption_without_repeats(seed):
    decoder = repetitive_decoder(seed)
    features = torch.randn(2, 4)
    candidates = list(all_captions(6, 5))  # 1365 captions of up to 5 words: that many beams is exhaustive
    with torch.no_grad():
        plain = DecodeSettings(beam_size=len(candidates), end_id=END, unk_id=UNK, max_len=5)
        found = decoder.beam_search(features, replace(plain, block_trigrams=True))
        plain = decoder.beam_search(features, plain)
        for feature, row, unblocked in zip(features, found, plain):
            scored = sorted((sequence_log_prob(decoder, feature, words), words) for words in candidates)
            allowed = [(score, words) for score, words in scored if not has_repeated_trigram(words)]
            assert truncate(row) == allowed[-1][1]
            assert truncate(unblocked) == scored[-1][1]
            assert has_repeated_trigram(truncate(unblocked))  # blocking had something to do


@pytest.mark.parametrize('start', [None, START])
@pytest.mark.parametrize('seed', range(4))
def test_greedy_with_blocking_takes_the_best_allowed_word_at_each_step(seed, start):
    decoder = repetitive_decoder(seed)
    features = torch.randn(3, 4)
    with torch.no_grad():
        found = decoder.sample(features, DecodeSettings(end_id=END, unk_id=UNK, max_len=8, block_trigrams=True,
                                                        start_id=start))
        plain = decoder.sample(features, DecodeSettings(end_id=END, unk_id=UNK, max_len=8, start_id=start))
        assert any(has_repeated_trigram(truncate(row)) for row in plain)  # blocking had something to do
        for feature, row in zip(features, found):
            words = []
            while len(words) < 8 and END not in words:  # the best word whose trigram is new, tried one by one
                said = [w for w in words if w != start]  # <start> may come first only, and is no word
                allowed = [w for w in range(6)
                           if w != UNK and not (w == start and words) and not (w == END and not said)]
                scores = {w: sequence_log_prob(decoder, feature, words + [w]) for w in allowed}
                words.append(max((w for w in scores if w == END or not has_repeated_trigram(words + [w])),
                                 key=scores.get))
            assert truncate(row) == words and not has_repeated_trigram(words)


def step_distribution(decoder, feature, words, temperature, top_p, start=None):
    """The distribution the next word is drawn from, computed by hand: tempered softmax without <unk>
    (nor <end> before one word other than <start>: min_len is 1; nor <start> after the first step), cut to
    the most probable words holding top_p of the probability, renormalised."""
    log_probs, states = decoder.step(feature.unsqueeze(0), None)
    for word in words:
        log_probs, states = decoder.step(decoder.embed(torch.tensor([word])), states)
    probs = torch.softmax(log_probs[0].double() / temperature, 0).numpy()
    probs[UNK] = 0.0
    if not [w for w in words if w != start]:
        probs[END] = 0.0
    if start is not None and words:
        probs[start] = 0.0
    probs /= probs.sum()
    kept, mass = np.zeros_like(probs), 0.0
    for word in np.argsort(-probs):
        if mass >= top_p:
            break
        kept[word], mass = probs[word], mass + probs[word]
    return kept / kept.sum()


@pytest.mark.parametrize('start', [None, START])
@pytest.mark.parametrize('temperature, top_p', [(1.0, 1.0), (0.7, 0.8), (1.5, 0.5)])
def test_sampling_draws_captions_with_their_brute_force_probabilities(temperature, top_p, start):
    decoder = tiny_decoder(1)
    feature = torch.randn(1, 4)
    expected = {}
    with torch.no_grad():
        for words in all_captions(6, 2, min_len=1, start=start):
            p = 1.0
            for t, word in enumerate(words):
                p *= step_distribution(decoder, feature[0], words[:t], temperature, top_p, start)[word]
            expected[tuple(words)] = p
        assert sum(expected.values()) == pytest.approx(1.0)
        torch.manual_seed(0)
        n = 20000
        settings = DecodeSettings(samples=n, temperature=temperature, top_p=top_p, end_id=END, unk_id=UNK, max_len=2,
                                  start_id=start)
        words, log_probs, mask = decoder.draw(feature, settings)
    drawn = [tuple(row[keep].tolist()) for row, keep in zip(words, mask)]
    assert len(drawn) == n
    counts = {caption: drawn.count(caption) / n for caption in set(drawn)}
    assert all(expected.get(caption, 0.0) > 0 for caption in counts)  # nothing outside the nucleus
    assert sum(abs(counts.get(c, 0.0) - p) for c, p in expected.items()) / 2 < 0.02  # total variation
    for caption, row_log_probs in zip(drawn[:200], log_probs[:200]):
        assert row_log_probs.sum().item() == pytest.approx(math.log(expected[caption]), abs=1e-4)
    if top_p < 1.0:
        assert sum(p == 0 for p in expected.values()) > 0  # the nucleus really cut something


@pytest.mark.parametrize('block_trigrams', [False, True])
@pytest.mark.parametrize('start', [None, START])
def test_greedy_beam_one_and_sampling_the_top_word_choose_the_same_words(start, block_trigrams):
    """Greedy decoding, beam search with one beam and sampling with nothing but the most probable word left
    (top_p near 0, or temperature near 0) are the one decoding loop choosing alike: the same word ids, also
    after <end>, where every row holds <end>, in a batch whose captions end at different steps."""
    decoder = tiny_decoder(7, vocab_size=12)
    decoder.max_seq_length = 10
    features = torch.randn(32, 4)
    greedy_settings = DecodeSettings(end_id=END, unk_id=UNK, start_id=start, min_len=2, block_trigrams=block_trigrams)
    with torch.no_grad():
        greedy = decoder.sample(features, greedy_settings)
        beam = decoder.beam_search(features, replace(greedy_settings, beam_size=1))
        torch.manual_seed(0)
        top_word, top_log_probs, top_mask = decoder.draw(features, replace(greedy_settings, samples=1, top_p=1e-6))
        cold, _, _ = decoder.draw(features, replace(greedy_settings, samples=1, temperature=1e-6))
    lengths = [len(truncate(row)) for row in greedy]
    assert len(set(lengths)) > 1 and min(lengths) < greedy.size(1)  # some captions end before others
    for row, length in zip(greedy.tolist(), lengths):
        assert row[length:] == [END] * (len(row) - length)
    assert torch.equal(beam, greedy)
    assert torch.equal(top_word, greedy) and torch.equal(cold, greedy)
    assert top_mask.sum(1).tolist() == lengths
    assert (top_log_probs == 0).all()  # the only word left has probability 1


def test_sample_py_writes_n_different_captions(tmp_path):
    root = tmp_path / 'data'
    synthetic.make_synthetic_coco(str(root), num_train=16, num_val=2, image_size=32, seed=3, progress=False)
    save_vocab(build_vocab(str(root / 'annotations' / 'captions_train.json'), threshold=1), str(root / 'vocab.json'))
    training.train(trainer.parse_args([
        '--image_dir', str(root / 'train'), '--caption_path', str(root / 'annotations' / 'captions_train.json'),
        '--vocab_path', str(root / 'vocab.json'), '--model_path', str(tmp_path / 'models'), '--backbone', 'smallcnn',
        '--weights', 'none', '--image_size', '32', '--crop_size', '32', '--embed_size', '16', '--hidden_size', '16',
        '--batch_size', '16', '--num_workers', '0', '--num_epochs', '1', '--device', 'cpu']))
    image = str(sorted((root / 'val').iterdir())[0])
    checkpoint = str(tmp_path / 'models' / 'checkpoint.pt')
    command = ['sample.py', '--checkpoint', checkpoint, '--image', image]
    result = run(*command, '--sample', '6', '--temperature', '2')
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 6 and len(set(lines)) > 1  # an almost untrained model at temperature 2 varies
    result = run(*command, '--sample', '2', '--top_p', '0')
    assert result.returncode == 2 and result.stderr.splitlines()[-1] == \
        'sample.py: error: argument --top_p: must be greater than 0, not 0'
    result = run(*command, '--sample', '2', '--top_p', '1.5')
    assert result.returncode == 2 and result.stderr.splitlines()[-1] == \
        'sample.py: error: --top_p is a probability: at most 1, not 1.5'
    result = run(*command, '--block_trigrams', '--beam_size', '3')
    assert result.returncode == 0 and len(result.stdout.splitlines()) == 1
