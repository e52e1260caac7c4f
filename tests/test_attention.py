"""The attention decoder (Show, Attend and Tell on DIY_LSTM.LSTMCell): parity with the same decoder on
nn.LSTMCell, its attention weights, the packed schedule's padding, and beam search against brute force."""
from dataclasses import replace

import pytest
import torch
from test_evaluate import END, UNK, all_captions, truncate
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from model import AttentionDecoder, CaptionerConfig, DecodeSettings, build_captioner, caption_loss


def decoder_pair(seed, vocab_size=11, dtype=torch.float64):
    """The attention decoder on DIY_LSTM.LSTMCell, and the same on nn.LSTMCell with the same weights."""
    config = CaptionerConfig(vocab_size=vocab_size, embed_size=6, hidden_size=7, attention_size=5, dropout=0.0,
                             max_seq_length=6, decoder='attention')
    torch.manual_seed(seed)
    diy = AttentionDecoder(config, features_size=4).to(dtype)
    reference = AttentionDecoder(config, features_size=4, cell=nn.LSTMCell).to(dtype)
    reference.load_state_dict(diy.state_dict())
    return diy, reference


def padded_batch(seed, batch=5, cells=9, vocab_size=11, dtype=torch.float64):
    """A grid per caption and captions of different lengths, longest first, padded with random words."""
    generator = torch.Generator().manual_seed(seed)
    grid = torch.randn(batch, cells, 4, generator=generator, dtype=dtype)
    lengths = sorted(torch.randint(1, 8, (batch,), generator=generator).tolist(), reverse=True)
    captions = torch.randint(0, vocab_size, (batch, lengths[0]), generator=generator)
    return grid, captions, lengths


@pytest.mark.parametrize('seed', range(3))
def test_the_diy_cell_gives_the_loss_and_every_gradient_of_nn_lstmcell(seed):
    diy, reference = decoder_pair(seed)
    grid, captions, lengths = padded_batch(seed)
    results = []
    for decoder in (diy, reference):
        features = grid.clone().requires_grad_()
        loss, words = caption_loss(lambda f, c, n: decoder(f, c, n), features, captions, lengths, alpha_c=1.0)
        loss.backward()
        results.append((loss, words, features.grad, {name: p.grad for name, p in decoder.named_parameters()}))
    (loss, words, grid_grad, grads), (ref_loss, ref_words, ref_grid_grad, ref_grads) = results
    assert words == ref_words == sum(lengths)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-10)
    torch.testing.assert_close(grid_grad, ref_grid_grad, rtol=0, atol=1e-10)
    assert grads.keys() == ref_grads.keys() and all(g is not None for g in grads.values())
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=0, atol=1e-10, msg=name)


@pytest.mark.parametrize('seed', range(3))
def test_the_diy_cell_gives_the_greedy_and_beam_captions_of_nn_lstmcell(seed):
    diy, reference = decoder_pair(seed)
    grid = padded_batch(seed)[0]
    for settings in (DecodeSettings(end_id=END, unk_id=UNK), DecodeSettings(beam_size=3, end_id=END, unk_id=UNK)):
        decode = 'sample' if settings.beam_size == 1 else 'beam_search'
        captions = [getattr(decoder.eval(), decode)(grid, settings) for decoder in (diy, reference)]
        assert torch.equal(*captions)


def test_the_loss_is_cross_entropy_plus_alpha_c_times_the_doubly_stochastic_penalty():
    diy, _ = decoder_pair(0)
    grid, captions, lengths = padded_batch(0)
    scores, penalty = diy(grid, captions, lengths)
    targets = pack_padded_sequence(captions, lengths, batch_first=True).data
    cross_entropy = nn.functional.cross_entropy(scores, targets)
    # The penalty by hand: each caption's attention weights, step by step, summed per cell over its own steps.
    sums = torch.zeros(grid.shape[:2], dtype=grid.dtype)
    inputs, state = diy.start(grid)
    for t in range(max(lengths)):
        _, state = diy.step(inputs, state)
        running = torch.tensor([t < n for n in lengths])
        sums += state.alpha * running.unsqueeze(1)
        inputs = diy.embed(captions[:, t])
    torch.testing.assert_close(penalty, ((1 - sums) ** 2).mean(), rtol=0, atol=1e-12)
    for alpha_c in (0.0, 1.0, 2.5):
        loss, _ = caption_loss(lambda f, c, n: diy(f, c, n), grid, captions, lengths, alpha_c)
        torch.testing.assert_close(loss, cross_entropy + alpha_c * penalty, rtol=0, atol=1e-12)


def test_attention_weights_are_non_negative_and_sum_to_one_over_the_cells():
    diy, _ = decoder_pair(1)
    grid = padded_batch(1, cells=13)[0]
    inputs, state = diy.start(grid)
    for word in range(6):
        _, state = diy.step(inputs, state)
        assert state.alpha.shape == (5, 13) and (state.alpha >= 0).all()
        torch.testing.assert_close(state.alpha.sum(1), torch.ones(5, dtype=grid.dtype), rtol=0, atol=1e-12)
        inputs = diy.embed(torch.full((5,), word + 4))
    maps = diy.attention_maps(grid[0], torch.tensor([1, 5, 6, END]))
    assert maps.shape == (4, 13) and (maps >= 0).all()
    torch.testing.assert_close(maps.sum(1), torch.ones(4, dtype=grid.dtype), rtol=0, atol=1e-12)


@pytest.mark.parametrize('seed', range(3))
def test_padding_and_finished_rows_never_change_a_caption_s_scores(seed):
    diy, _ = decoder_pair(seed)
    grid, captions, lengths = padded_batch(seed)
    scores = diy(grid, captions, lengths).scores
    # Each caption alone, at its own length, gives the same scores as in the batch...
    rows = torch.arange(len(lengths)).repeat(max(lengths), 1).T
    order = pack_padded_sequence(rows, lengths, batch_first=True).data
    for i, length in enumerate(lengths):
        alone = diy(grid[i:i + 1], captions[i:i + 1, :length], [length]).scores
        torch.testing.assert_close(scores[order == i], alone, rtol=0, atol=1e-12)
    # ...and other words in the padding change nothing.
    noisy = captions.clone()
    for i, length in enumerate(lengths):
        noisy[i, length:] = (noisy[i, length:] + 3) % 11
    torch.testing.assert_close(diy(grid, noisy, lengths).scores, scores, rtol=0, atol=0)


def sequence_log_prob(decoder, grid, words):
    """Total log-probability of a word sequence, by teacher forcing through the decoder's steps."""
    inputs, state = decoder.start(grid.unsqueeze(0))
    total = 0.0
    for word in words:
        log_probs, state = decoder.step(inputs, state)
        total += log_probs[0, word].item()
        inputs = decoder.embed(torch.tensor([word]))
    return total


@pytest.mark.parametrize('seed', range(4))
@pytest.mark.parametrize('length_penalty', [0.0, 1.0])
def test_exhaustive_beam_search_finds_the_most_probable_caption(seed, length_penalty):
    diy, _ = decoder_pair(seed, vocab_size=6, dtype=torch.float32)
    with torch.no_grad():
        diy.linear.weight.mul_(8)  # peaked, varied distributions, so the search has real choices
    diy.eval()
    grid = padded_batch(seed, batch=2, vocab_size=6, dtype=torch.float32)[0]
    # 85 captions of up to 3 words exist, so 125 beams keep every one of them: the search is exhaustive.
    settings = DecodeSettings(beam_size=125, end_id=END, unk_id=UNK, max_len=3, length_penalty=length_penalty,
                              min_len=0)
    with torch.no_grad():
        found = diy.beam_search(grid, settings)
        for image, row in zip(grid, found):
            scored = [(sequence_log_prob(diy, image, words) / len(words) ** length_penalty, words)
                      for words in all_captions(6, 3)]
            best_score, best_words = max(scored)
            assert truncate(row) == best_words
            assert sorted(s for s, _ in scored)[-2] < best_score - 1e-6  # a unique optimum, not a tie


@pytest.mark.parametrize('beam_size', [1, 3])
def test_a_batch_decodes_as_its_images_one_at_a_time(beam_size):
    diy, _ = decoder_pair(2, dtype=torch.float32)
    diy.eval()
    grid = padded_batch(2, batch=6, dtype=torch.float32)[0]
    settings = DecodeSettings(beam_size=beam_size, end_id=END, unk_id=UNK, block_trigrams=True)
    with torch.no_grad():
        together = diy.beam_search(grid, settings)
        for image, row in zip(grid, together):
            alone = diy.beam_search(image.unsqueeze(0), settings)[0]
            assert truncate(alone) == truncate(row)
        greedy = replace(settings, beam_size=1)
        assert torch.equal(diy.sample(grid, greedy), diy.beam_search(grid, greedy))


def test_the_grid_encoders_give_cells_of_the_decoder_s_features():
    for backbone, image, cells in (('smallcnn', 64, 16), ('resnet18', 96, 9)):
        config = CaptionerConfig(vocab_size=8, backbone=backbone, decoder='attention', grid_size=3, hidden_size=8,
                                 attention_size=4, embed_size=4)
        encoder, decoder = build_captioner(config)
        grid = encoder.eval()(torch.randn(2, 3, image, image))
        assert grid.shape == (2, cells, encoder.features_size) == (2, cells, decoder.f_beta.out_features)
        assert sum(p.numel() for p in encoder.linear.parameters()) == 0  # no head: the cells as they are
