"""Self-critical training: the CIDEr-D reward is pycocoevalcap's, the loss is -(r - b) log p, and
train.py --scst learns, checkpoints and resumes, from images and from the feature cache."""
import json

import numpy as np
import pytest
import torch
from pycocoevalcap.cider.cider import Cider

import exporting
import scst
import synthetic
import train as trainer
import training
from conftest import assert_same_weights, run
from model import DecodeSettings, read_checkpoint
from synthetic import easy
from vocabulary import build_vocab, plain_words, save_vocab


def references_and_captions(seed=0, images=40):
    rng = np.random.default_rng(seed)
    references, captions = {}, {}
    for image_id in range(images):
        objects = easy.random_scene(rng, 64)
        # in plain words, as evaluate.py hands them to pycocoevalcap without Java
        references[image_id] = [plain_words(c) for c in easy.captions_for(objects, rng)]
        other = plain_words(easy.captions_for(easy.random_scene(rng, 64), rng)[0])
        captions[image_id] = [references[image_id][0], other, 'a large', ''][image_id % 4]
    return references, captions


def test_reward_is_pycocoevalcaps_cider_d_with_the_same_document_frequencies():
    references, captions = references_and_captions()
    _, expected = Cider().compute_score(references, {i: [c] for i, c in captions.items()})
    ids = list(references)
    reward = scst.CiderD(references)([captions[i] for i in ids], ids)
    assert np.allclose(reward, expected, rtol=1e-12, atol=1e-12)
    assert reward.max() > 1 and reward.min() == 0.0  # real scores, not all alike
    # A few images scored at a time still use the whole corpus's document frequencies and size.
    some = [3, 17, 17, 30]
    assert np.allclose(scst.CiderD(references)([captions[i] for i in some], some), expected[some], rtol=1e-12)


def test_reward_differs_with_other_document_frequencies():
    references, captions = references_and_captions()
    ids = list(references)
    whole = scst.CiderD(references)([captions[i] for i in ids], ids)
    half = scst.CiderD({i: references[i] for i in ids[:20]})([captions[i] for i in ids[:20]], ids[:20])
    assert not np.allclose(whole[:20], half)


class FixedCider:
    """A stand-in reward: 1 for captions that start with the word 'large' else 0, so the test knows r."""

    def __call__(self, captions, image_ids):
        return np.array([float(c.startswith('large')) for c in captions])


@pytest.mark.parametrize('baseline', ['greedy', 'mean'])
def test_loss_is_minus_advantage_times_log_probability_per_word(baseline):
    from build_vocab import Vocabulary
    from model import DecoderRNN
    vocab = Vocabulary.from_words(['<pad>', '<start>', '<end>', '<unk>', 'large', 'small', 'red'])
    torch.manual_seed(0)
    decoder = DecoderRNN(8, 12, len(vocab), 1, max_seq_length=5)
    features = torch.randn(3, 8)
    torch.manual_seed(1)
    loss, _, _ = scst.scst_loss(decoder, features, [0, 1, 2], FixedCider(), vocab, 4, baseline)
    torch.manual_seed(1)
    words, _, mask = decoder.draw(features, DecodeSettings(samples=4, end_id=2, unk_id=[0, 3], start_id=1))

    def first_word_is_large(row):  # <start> may come first, and is not part of the caption
        row = [int(w) for w in row if int(w) != 1]
        return float(bool(row) and vocab.idx2word[row[0]] == 'large')
    rewards = np.array([first_word_is_large(row) for row in words])
    if baseline == 'greedy':
        greedy = decoder.sample(features, DecodeSettings(end_id=2, unk_id=[0, 3], start_id=1))
        b = np.repeat([first_word_is_large(row) for row in greedy], 4)
    else:
        b = np.array([(rewards[i // 4 * 4:i // 4 * 4 + 4].sum() - rewards[i]) / 3 for i in range(12)])
    total, words_counted = 0.0, 0
    for row, keep, r, base, feature in zip(words, mask, rewards, b, features.repeat_interleave(4, 0)):
        sequence = row[keep].tolist()  # teacher forcing through the decoder, independently of CaptionDecoder.draw
        log_probs, states = decoder.step(feature.unsqueeze(0), None)
        for position, word in enumerate(sequence):
            renormalised = log_probs[0].clone()
            renormalised[[0, 3]] = -float('inf')  # <pad>, <unk>
            if position > 0:  # <start> at the first step only
                renormalised[1] = -float('inf')
            if all(w == 1 for w in sequence[:position]):  # no empty caption: min_len is 1, <start> is no word
                renormalised[2] = -float('inf')
            total += -(r - base) * renormalised.log_softmax(-1)[word].item()
            log_probs, states = decoder.step(decoder.embed(torch.tensor([word])), states)
        words_counted += len(sequence)
    assert rewards.min() != rewards.max()  # some advantage to learn from
    assert loss.item() == pytest.approx(total / words_counted, rel=1e-5)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A tiny cross-entropy model on the synthetic set, trained from a feature cache of a frozen backbone."""
    root = tmp_path_factory.mktemp('scst')
    synthetic.make_synthetic_coco(str(root), num_train=48, num_val=16, image_size=32, seed=2, progress=False)
    save_vocab(build_vocab(str(root / 'annotations' / 'captions_train.json'), threshold=1), str(root / 'vocab.json'))
    result = run('extract_features.py', '--image_dir', root / 'train',
                 '--caption_path', root / 'annotations' / 'captions_train.json', '--output', root / 'cache',
                 '--backbone', 'smallcnn', '--weights', 'none', '--image_size', '32', '--crop_size', '32',
                 '--batch_size', '16', '--num_workers', '0')
    assert result.returncode == 0, result.stderr[-2000:]
    training.train(trainer.parse_args(common(root, root / 'ce') + [
        '--features', str(root / 'cache'), '--vocab_path', str(root / 'vocab.json'), '--num_epochs', '6',
        '--learning_rate', '3e-3']))
    return root


def common(root, model_path):
    return ['--image_dir', str(root / 'train'), '--caption_path', str(root / 'annotations' / 'captions_train.json'),
            '--model_path', str(model_path), '--backbone', 'smallcnn', '--weights', 'none', '--image_size', '32',
            '--crop_size', '32', '--no_flip', '--embed_size', '16', '--hidden_size', '32', '--batch_size', '16',
            '--num_workers', '0', '--log_step', '1', '--save_step', '0', '--device', 'cpu']


def scst_args(root, model_path, *extra):
    return trainer.parse_args(common(root, model_path) + [
        '--scst', '--init_from', str(root / 'ce' / 'checkpoint.pt'), '--learning_rate', '5e-3',
        '--val_image_dir', str(root / 'val'), '--val_caption_path', str(root / 'annotations' / 'captions_val.json'),
        *extra])


def test_scst_raises_the_reward(trained, tmp_path):
    history = scst.train(scst_args(trained, tmp_path, '--num_epochs', '12', '--scst_baseline', 'mean')).history
    sampled = [entry['reward'] for entry in history['scst']]  # the expected reward SCST maximises
    assert len(sampled) == 36  # 48 images in batches of 16, 12 epochs
    assert np.mean(sampled[-12:]) > np.mean(sampled[:12]) + 0.05  # the last four epochs against the first four
    assert len(history['val']) == 12 and all(np.isfinite(e['cider']) for e in history['val'])


def test_scst_from_the_cache_and_from_images_and_resuming(trained, tmp_path):
    features = ['--features', str(trained / 'cache')]
    result = scst.train(scst_args(trained, tmp_path / 'whole', '--num_epochs', '2', *features))
    encoder, decoder = result.encoder, result.decoder
    scst.train(scst_args(trained, tmp_path / 'split', '--num_epochs', '1', *features))
    assert read_checkpoint(str(tmp_path / 'split' / 'checkpoint.pt'))['epoch'] == 1
    result = scst.train(scst_args(trained, tmp_path / 'split', '--num_epochs', '2', '--resume', *features))
    encoder2, decoder2, history = result.encoder, result.decoder, result.history
    assert_same_weights(encoder, encoder2)
    assert_same_weights(decoder, decoder2)
    assert [e['step'] for e in history['scst']] == list(range(1, 7))
    with open(tmp_path / 'split' / 'history.json') as f:
        assert len(json.load(f)['scst']) == 6

    # from images, through the command line; the checkpoint samples like any other
    result = run('train.py', *map(str, common(trained, tmp_path / 'images')), '--scst',
                             '--init_from', str(trained / 'ce' / 'checkpoint.pt'), '--num_epochs', '1')
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'reward=' in result.stderr
    image = sorted((trained / 'val').iterdir())[0]
    result = run('sample.py', '--checkpoint', str(tmp_path / 'images' / 'checkpoint.pt'),
                             '--image', str(image), timeout=120)
    assert result.returncode == 0 and result.stdout.strip(), result.stderr[-2000:]


def test_scst_starts_from_an_exported_folder_as_from_its_checkpoint(trained, tmp_path):
    exporting.export_safetensors(str(trained / 'ce' / 'checkpoint.pt'), str(tmp_path / 'shared'))
    features = ['--features', str(trained / 'cache'), '--num_epochs', '1']
    from_checkpoint = scst.train(scst_args(trained, tmp_path / 'a', *features))
    args = scst_args(trained, tmp_path / 'b', *features)
    args.init_from = str(tmp_path / 'shared')
    from_folder = scst.train(args)
    assert_same_weights(from_checkpoint.encoder, from_folder.encoder)
    assert_same_weights(from_checkpoint.decoder, from_folder.decoder)


def test_scst_mistakes_are_one_line_errors(trained, tmp_path):
    for extra, message in ((['--scst'], '--scst needs --init_from'),
                           (['--scst', '--init_from', str(trained / 'ce' / 'checkpoint.pt'), '--scst_baseline', 'mean',
                             '--scst_samples', '1'], '--scst_baseline mean needs --scst_samples 2 or more'),
                           (['--scst', '--init_from', str(tmp_path / 'none.pt')], 'no such file')):
        result = run('train.py', *map(str, common(trained, tmp_path)), *extra, timeout=120)
        assert result.returncode == 1 and message in result.stderr, result.stderr[-2000:]
        assert result.stderr.startswith('error:') and 'Traceback' not in result.stderr
