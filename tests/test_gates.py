"""The gate inspector: gates.py recomputes the LSTM's gates right, and sample.py --gates / --gates_json."""
import json

import pytest
import torch
from PIL import Image
from torch import nn

import gate_units
import gates
from conftest import run
from data_loader import eval_transform
from decoding import load_captioner
from model import DecoderRNN, DecodeSettings


@pytest.fixture(scope='module')
def checkpoint(two_epoch_model):
    return two_epoch_model / 'checkpoint.pt'


def test_replay_matches_nn_lstm_and_the_gate_equations():
    torch.manual_seed(0)
    decoder = DecoderRNN(embed_size=8, hidden_size=6, vocab_size=11, num_layers=2).double().eval()
    feature, ids = torch.randn(8, dtype=torch.float64), torch.tensor([4, 7, 1, 9, 2])
    layers = gates.replay(decoder, feature, ids)
    assert len(layers) == 2 and layers[0]['g'].shape == (5, 6)

    reference = nn.LSTM(8, 6, 2, batch_first=True).double()
    reference.load_state_dict(decoder.lstm.state_dict())
    inputs = torch.cat([feature[None], decoder.embed(ids[:-1])])[None]
    with torch.no_grad():
        out, (_, s_n) = reference(inputs)
    torch.testing.assert_close(layers[1]['h'], out[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.stack([layer['s'][-1] for layer in layers]), s_n[:, 0], rtol=0, atol=1e-12)

    # The first layer's gates from PyTorch's documented row order [i, f, g, o], computed independently.
    w_ih, w_hh = decoder.lstm.weight_ih_l0, decoder.lstm.weight_hh_l0
    bias = decoder.lstm.bias_ih_l0 + decoder.lstm.bias_hh_l0
    h_prev = torch.cat([torch.zeros(1, 6, dtype=torch.float64), layers[0]['h'][:-1]])
    with torch.no_grad():
        i, f, g, o = (inputs[0] @ w_ih.T + h_prev @ w_hh.T + bias).split(6, dim=1)
    for ours, theirs in (('g', i.sigmoid()), ('f', f.sigmoid()), ('a', g), ('q', o.sigmoid())):
        torch.testing.assert_close(layers[0][ours], theirs, rtol=0, atol=1e-12)


def test_record_replays_the_caption_that_sample_py_writes(synthetic_set, checkpoint):
    captioner = load_captioner(str(checkpoint))
    encoder, decoder, vocab, config = captioner
    images = sorted(str(p) for p in (synthetic_set / 'val').iterdir())[:3]
    for beam_size in (1, 3):
        captions, _ = captioner.caption(images, DecodeSettings(beam_size=beam_size))
        for path in images:
            result = gates.record(path, captioner, DecodeSettings(beam_size=beam_size))
            assert result['caption'] == captions[path]
            assert len(result['words']) == result['layers'][0]['h'].size(0) == len(result['log_probs'])
            if beam_size == 1:  # the replayed hidden states choose the same words, step by step
                scores = decoder.linear(result['layers'][-1]['h']).detach()
                scores[:, [vocab('<unk>'), vocab('<pad>')]] = -float('inf')
                scores[1:, vocab('<start>')] = -float('inf')  # only the first word may be <start>
                said = (result['ids'] != vocab('<start>')).long().cumsum(0) - (result['ids'] != vocab('<start>')).long()
                scores[said < 1, vocab('<end>')] = -float('inf')  # min_len 1: a word other than <start> first
                assert scores.argmax(1).tolist() == result['ids'].tolist()


def test_all_beams_are_ranked_and_scored_by_their_log_probability(synthetic_set, checkpoint):
    captioner = load_captioner(str(checkpoint))
    encoder, decoder, vocab, config = captioner
    result = gates.record(str(sorted((synthetic_set / 'val').iterdir())[0]), captioner)
    settings = DecodeSettings(beam_size=4).for_vocab(vocab)
    with torch.no_grad():
        feature = encoder(eval_transform(config.image_size, config.crop_size)(result['image'])[None])
        beams, scores = decoder.beam_search(feature, settings, all_beams=True)
        assert torch.equal(beams[:, 0], decoder.beam_search(feature, settings))
        assert scores[0].tolist() == sorted(scores[0].tolist(), reverse=True)
        for ids, score in zip(beams[0], scores[0]):
            ends = (ids == vocab('<end>')).nonzero()
            ids = ids[:int(ends[0]) + 1] if len(ends) else ids
            layers = gates.replay(decoder, feature[0], ids)
            log_p = decoder.linear(layers[-1]['h']).log_softmax(-1).gather(1, ids[:, None]).sum()
            torch.testing.assert_close(log_p, score, atol=1e-4, rtol=0)


def test_top_units_are_the_most_varying():
    steps, hidden = 6, 10
    layer = {key: torch.full((steps, hidden), 0.5) for key in 'gfq'}
    layer['s'] = torch.zeros(steps, hidden)
    layer['g'][::2, 7] = 1.0   # unit 7 flips its input gate: the most varying
    layer['s'][::2, 3] = 0.3   # unit 3 varies less, in its memory
    layer['f'][0, 5] = 0.6     # unit 5 hardly at all
    assert gates.top_units(layer, 3).tolist() == [7, 3, 5]


def test_sample_py_writes_the_gate_picture_and_numbers(synthetic_set, checkpoint, tmp_path):
    image = str(sorted((synthetic_set / 'val').iterdir())[1])
    command = ['sample.py', '--image', image, '--checkpoint', checkpoint]
    plain = run(*command)
    assert plain.returncode == 0, plain.stderr
    result = run(*command, '--gates', tmp_path / 'g.png', '--gates_json', tmp_path / 'g.json')
    assert result.returncode == 0, result.stderr
    assert result.stdout == plain.stdout and plain.stdout.strip()

    numbers = json.loads((tmp_path / 'g.json').read_text())
    assert numbers['caption'] == plain.stdout.strip() and numbers['decoding'] == 'greedy'
    layer = {key: torch.tensor(value) for key, value in numbers['layers'][0].items()}
    assert set(layer) == set('gfaqsh') and layer['g'].shape == (len(numbers['words']), 48)
    assert all(0 <= layer[key].min() and layer[key].max() <= 1 for key in 'gfq')
    torch.testing.assert_close(layer['h'], layer['q'] * torch.tanh(layer['s']), atol=2e-6, rtol=0)
    torch.testing.assert_close(layer['s'][1:], layer['f'][1:] * layer['s'][:-1] + layer['g'][1:] * torch.tanh(
        layer['a'][1:]), atol=5e-6, rtol=0)

    with Image.open(tmp_path / 'g.png') as picture:
        assert picture.width >= 700 and picture.height > 4 * 33 * 8  # four heatmaps of 33 rows beneath the image
        assert len(picture.convert('RGB').getcolors(1 << 20)) > 500  # heatmaps, not a blank page


def test_sample_py_gates_refuses_bad_input_cleanly(synthetic_set, checkpoint, tmp_path):
    images = [str(p) for p in sorted((synthetic_set / 'val').iterdir())[:2]]
    command = ['sample.py', '--checkpoint', checkpoint, '--gates', tmp_path / 'g.png']
    two = run(*command, '--image', *images)
    assert two.returncode == 2 and 'take one --image' in two.stderr
    bad = tmp_path / 'bad.png'
    bad.write_text('not an image')
    unreadable = run(*command, '--image', bad)
    device, error = unreadable.stderr.splitlines()
    assert unreadable.returncode == 1 and device == 'device: cpu, dtype: float32'
    assert error.startswith('error: ') and 'bad.png' in error
    assert 'Traceback' not in unreadable.stderr and not (tmp_path / 'g.png').exists()


def test_tracking_units_finds_a_unit_that_holds_the_answer():
    words = ['<start>', 'a', 'large', 'red', 'circle', 'and', 'a', 'small', 'blue', 'square', '.', '<end>']
    labels = gate_units.step_labels(words)
    assert labels['the colour word is next'] == [0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0]
    assert labels['a second object is coming'] == [1] * 5 + [None] * 7
    assert gate_units.step_labels(['<start>', 'a', 'red', 'circle', '.'])['a second object is coming'][:4] == [0] * 4

    torch.manual_seed(0)
    results = []
    for caption in (words, ['<start>', 'a', 'small', 'green', 'triangle', '.', '<end>']):
        s = torch.randn(len(caption), 8) * 0.1
        labels = gate_units.step_labels(caption)['a second object is coming']
        s[:, 5] = torch.atanh(torch.tensor(labels_or_zero(labels)))
        results.append({'words': caption, 'layers': [{'s': s}]})
    r, values, answers = gate_units.tracking_units(results)['a second object is coming']
    assert int(r.abs().argmax()) == 5 and float(r[5]) > 0.99
    assert len(answers) == 5 + 5  # the steps up to each caption's first shape word


def labels_or_zero(answers):
    return [0.9 * a if a is not None else 0.0 for a in answers]
