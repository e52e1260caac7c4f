"""Looking inside the attention decoder: sample.py --attention (one panel per word), --gates on its cell, the
scripts (sample.py's captioning flags, evaluate.py, demo.py, app.py) with an attention checkpoint, and the one-line
refusal of --attention for an fc model."""
import json
import os

import pytest
import torch
from PIL import Image
from playwright.sync_api import sync_playwright
from test_app import CHROMIUM, FLAGS, app_server, needs_chromium, upload

import app
import demo
import gates
import sample
import shapes_demo
import synthetic
import training
from conftest import run, tiny_args
from decoding import load_captioner
from model import AttentionDecoder, CaptionerConfig, DecodeSettings
from vocabulary import build_vocab, save_vocab


@pytest.fixture(scope='module')
def shapes64(tmp_path_factory):
    """A small synthetic set of 64-pixel images: smallcnn's last map is then 4x4, so there are 16 cells to
    attend to (at the usual 32 pixels there would be four)."""
    root = tmp_path_factory.mktemp('shapes64')
    synthetic.make_synthetic_coco(str(root), 32, 6, image_size=64, seed=3, progress=False)
    save_vocab(build_vocab(str(root / 'annotations' / 'captions_train.json'), threshold=1), str(root / 'vocab.json'))
    return root


@pytest.fixture(scope='module')
def checkpoints(shapes64, tmp_path_factory):
    """{'attention': ..., 'fc': ...}: a train.py checkpoint of each decoder, one short epoch each."""
    trained = {}
    for decoder in ('attention', 'fc'):
        model_path = tmp_path_factory.mktemp(f'{decoder}_model')
        training.train(tiny_args(shapes64, model_path, decoder=decoder, image_size=64, crop_size=64,
                                 attention_size=16, num_epochs=1))
        trained[decoder] = model_path / 'checkpoint.pt'
    return trained


def val_images(shapes64, count=3):
    return [str(path) for path in sorted((shapes64 / 'val').iterdir())[:count]]


def test_the_replayed_cell_is_the_attention_decoders_own():
    config = CaptionerConfig(vocab_size=9, embed_size=5, hidden_size=6, attention_size=4, dropout=0.0,
                             decoder='attention')
    torch.manual_seed(0)
    decoder = AttentionDecoder(config, features_size=3).double().eval()
    grid, ids = torch.randn(4, 3, dtype=torch.float64), torch.tensor([1, 5, 7, 4, 2])
    layer, = gates.replay(decoder, grid, ids)
    assert layer['g'].shape == (5, 6)
    inputs, state = decoder.start(grid.unsqueeze(0))
    with torch.no_grad():
        for t, word in enumerate(ids):
            _, state = decoder.step(inputs, state)
            torch.testing.assert_close(layer['h'][t], state.h[0], rtol=0, atol=1e-12)
            torch.testing.assert_close(layer['s'][t], state.s[0], rtol=0, atol=1e-12)
            inputs = decoder.embed(word.view(1))
    torch.testing.assert_close(layer['h'], layer['q'] * torch.tanh(layer['s']), rtol=0, atol=1e-12)
    maps = decoder.attention_maps(grid, ids)
    assert maps.shape == (5, 4)
    torch.testing.assert_close(maps.sum(1), torch.ones(5, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize('beam_size', [1, 3])
def test_record_gives_the_caption_sample_py_writes_and_one_panel_per_word(shapes64, checkpoints, beam_size):
    captioner = load_captioner(str(checkpoints['attention']))
    settings = DecodeSettings(beam_size=beam_size)
    captions, _ = captioner.caption(val_images(shapes64), settings)
    for path in val_images(shapes64):
        result = gates.record(path, captioner, settings)
        assert result['caption'] == captions[path]
        steps = len(result['words'])
        assert result['attention'].shape == (steps, 16) and result['layers'][0]['h'].shape == (steps, 24)
        torch.testing.assert_close(result['attention'].sum(1), torch.ones(steps), rtol=0, atol=1e-5)
        assert result['seen'].size == (64, 64)
        fig = gates.attention_figure(result)
        words = result['words']
        panels = words[1:] if words[0] == '<start>' else words  # a first <start> says nothing of the image
        assert len(panels) >= 1 and [axes.get_title() for axes in fig.axes] == panels
        assert all(len(axes.images) == 2 for axes in fig.axes)  # the image, and the weights over it


def test_sample_py_writes_the_attention_and_gate_pictures(shapes64, checkpoints, tmp_path):
    image, checkpoint = val_images(shapes64)[0], str(checkpoints['attention'])
    pictures = run('sample.py', '--image', image, '--checkpoint', checkpoint, '--beam_size', '3', '--attention',
                   tmp_path / 'a.png', '--gates', tmp_path / 'g.png', '--gates_json', tmp_path / 'g.json')
    assert pictures.returncode == 0, pictures.stderr
    result = gates.record(image, load_captioner(checkpoint), DecodeSettings(beam_size=3))
    assert pictures.stdout == result['caption'] + '\n'  # the caption, as sample.py prints it without pictures
    fig = gates.attention_figure(result)
    assert len(fig.axes) == len(gates.attention_panels(result)) >= 1
    with Image.open(tmp_path / 'a.png') as picture:
        assert picture.format == 'PNG'
        assert picture.size == tuple(round(inches * 100) for inches in fig.get_size_inches())  # that figure's
        assert len(picture.convert('RGB').getcolors(1 << 20)) > 200  # images under weights, not a blank page
    with Image.open(tmp_path / 'g.png') as picture:
        assert picture.format == 'PNG' and picture.width >= 700
    numbers = json.loads((tmp_path / 'g.json').read_text())
    assert numbers['caption'] == result['caption'] and numbers['decoding'] == 'beam search, beam 3'
    assert torch.tensor(numbers['layers'][0]['g']).shape == (len(numbers['words']), 24)
    assert not [name for name in os.listdir(tmp_path) if '.tmp' in name]


def test_attention_of_an_fc_model_is_refused_in_one_line(shapes64, checkpoints, tmp_path, capsys):
    result = run('sample.py', '--image', val_images(shapes64)[0], '--checkpoint', checkpoints['fc'],
                 '--attention', tmp_path / 'a.png')
    assert result.returncode == 1
    assert result.stderr.splitlines() == ['device: cpu, dtype: float32',
                                          'error: --attention needs a model trained with --decoder attention']
    assert result.stdout == '' and not (tmp_path / 'a.png').exists()
    with pytest.raises(SystemExit) as two:
        sample.parse_args(['--image', *val_images(shapes64, 2), '--attention', str(tmp_path / 'a.png')])
    assert two.value.code == 2 and 'take one --image' in capsys.readouterr().err


def test_sample_py_captions_with_an_attention_model(shapes64, checkpoints, tmp_path):
    images, checkpoint = val_images(shapes64), str(checkpoints['attention'])
    beams = run('sample.py', '--image', *images, '--checkpoint', checkpoint, '--json', tmp_path / 'c.json',
                '--grid', tmp_path / 'grid.png', '--min_len', '4', '--block_trigrams', '--beam_size', '3',
                '--batch_size', '2')
    assert beams.returncode == 0, beams.stderr
    settings = DecodeSettings(beam_size=3, min_len=4, block_trigrams=True)
    expected, _ = load_captioner(checkpoint).caption(images, settings)
    written = json.loads((tmp_path / 'c.json').read_text())
    assert {item['file_name']: item['caption'] for item in written} == expected
    assert len(expected) == len(images) >= 1
    assert all(len(caption.replace('.', ' .').split()) >= 4 for caption in expected.values())
    with Image.open(tmp_path / 'grid.png') as grid:
        assert grid.format == 'PNG' and grid.width >= 3 * 320
    sampled = run('sample.py', '--image', *images, '--checkpoint', checkpoint, '--sample', '2', '--top_p', '0.9',
                  '--json', tmp_path / 's.json')
    assert sampled.returncode == 0, sampled.stderr
    assert [len(item['captions']) for item in json.loads((tmp_path / 's.json').read_text())] == [2, 2, 2]


def test_evaluate_py_scores_an_attention_model(shapes64, checkpoints, tmp_path):
    result = run('evaluate.py', '--checkpoint', checkpoints['attention'], '--image_dir', shapes64 / 'val',
                 '--caption_path', shapes64 / 'annotations' / 'captions_val.json', '--results_path',
                 tmp_path / 'results.json', '--beam_size', '2')
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'CIDEr' in result.stdout and len(json.loads((tmp_path / 'results.json').read_text())) == 6


def test_demo_trains_the_attention_decoder_beside_the_fc_model():
    attention, fc = shapes_demo.parse_args(['--decoder', 'attention']), shapes_demo.parse_args([])
    assert (attention.root, attention.model_path) == ('data/synthetic', 'models/demo_attention')
    hard = shapes_demo.parse_args(['--decoder', 'attention', '--hard'])
    assert (hard.root, hard.model_path) == ('data/synthetic_hard', 'models/demo_hard_attention')
    flags, fc_flags = (vars(demo.train_args(args, 'vocab.json')) for args in (attention, fc))
    assert (flags['decoder'], fc_flags['decoder']) == ('attention', 'fc')
    assert {name for name in flags if flags[name] != fc_flags[name]} == {'decoder', 'model_path'}


def test_app_shows_the_attention_picture_only_for_an_attention_model(shapes64, checkpoints):
    image, settings = val_images(shapes64)[0], DecodeSettings(beam_size=2)
    fc = app.describe(image, load_captioner(str(checkpoints['fc'])), settings)
    assert fc[0] == '' and fc[3] is not None and fc[4] is None
    attention = app.describe(image, load_captioner(str(checkpoints['attention'])), settings)
    assert attention[0] == '' and attention[4].size[0] > 0


@needs_chromium
def test_the_page_serves_the_attention_picture(shapes64, checkpoints, tmp_path):
    with app_server(checkpoints['attention'], tmp_path) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={'width': 1200, 'height': 900})
        page.goto(url, timeout=120_000)
        page.wait_for_selector('#upload input[type=file]', state='attached', timeout=120_000)
        image = val_images(shapes64)[1]
        upload(page, image)
        widths = {}
        for name in ('gates', 'attention'):
            picture = page.wait_for_selector(f'#{name} img', timeout=120_000)
            page.wait_for_function('img => img.complete && img.naturalWidth > 0', arg=picture, timeout=60_000)
            widths[name] = picture.evaluate('img => img.naturalWidth')
        browser.close()
    fig = gates.attention_figure(gates.record(image, load_captioner(str(checkpoints['attention']))))
    assert widths['attention'] == round(fig.get_size_inches()[0] * 100)  # the greedy caption's attention picture
    assert widths['gates'] >= 700
