"""The whole pipeline on a tiny synthetic set: vocab, loader, training, checkpoints, sample.py."""
import argparse
import json
import math
import os

import pytest
import torch

import training
from conftest import REAL_GPU, TutorialDecoder, TutorialEncoder, learning_args, run, tutorial_files, unchanged_weights
from data_loader import get_loader, train_transform
from decoding import load_captioner
from model import CheckpointError, DecoderRNN, EncoderCNN, read_checkpoint, save_checkpoint
from vocabulary import load_vocab, tokenize


def test_loader_batches_are_sorted_and_padded(synthetic_set):
    vocab = load_vocab(str(synthetic_set / 'vocab.json'))
    loader = get_loader(str(synthetic_set / 'train'), str(synthetic_set / 'annotations' / 'captions_train.json'), vocab,
                        train_transform(32, flip=False), batch_size=10, shuffle=True, num_workers=0)
    images, targets, lengths = next(iter(loader))
    assert images.shape == (10, 3, 32, 32)
    assert lengths == sorted(lengths, reverse=True)
    assert targets.shape == (10, lengths[0])
    for row, length in zip(targets, lengths):
        assert row[0] == vocab('<start>') and row[length - 1] == vocab('<end>')
        assert (row[length:] == vocab('<pad>')).all()
        assert (row[1:length - 1] > vocab('<unk>')).all()  # every word of a caption is in the vocabulary


def test_training_lowers_the_loss_and_saves_a_checkpoint(synthetic_set, tmp_path, capsys):
    result = training.train(learning_args(synthetic_set, tmp_path, '--num_epochs', '4'))
    encoder, decoder, vocab, history = result.encoder, result.decoder, result.vocab, result.history
    losses = [entry['loss'] for entry in history['train']]
    assert len(losses) == 4 * 15  # 240 captions in batches of 16, one entry per step
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    assert len(history['val']) == 4 and history['val'][-1]['loss'] < history['val'][0]['loss']
    assert 'validation loss' in capsys.readouterr().out

    checkpoint = torch.load(tmp_path / 'checkpoint.pt', weights_only=True)
    assert checkpoint['epoch'] == 4 and checkpoint['step'] == 60
    assert checkpoint['model_args']['hidden_size'] == 48 and checkpoint['vocab'] == [
        vocab.idx2word[i] for i in range(len(vocab))]
    assert set(checkpoint) >= {'encoder', 'decoder', 'optimizer', 'model_args', 'vocab', 'epoch', 'step'}
    assert json.loads((tmp_path / 'history.json').read_text())['val'] == history['val']
    assert not [name for name in os.listdir(tmp_path) if '.tmp' in name]

    encoder2, decoder2, vocab2, config = load_captioner(str(tmp_path / 'checkpoint.pt'))
    assert vocab2.word2idx == vocab.word2idx
    images = torch.randn(3, 3, 32, 32)
    encoder.eval(), decoder.eval()
    assert torch.equal(decoder.sample(encoder(images)), decoder2.sample(encoder2(images)))


@pytest.fixture(scope='module')
def one_epoch(synthetic_set, tmp_path_factory):
    """A folder with the checkpoint of one epoch of learning_args, trained once for the tests that only read it."""
    models = tmp_path_factory.mktemp('one_epoch')
    training.train(learning_args(synthetic_set, models, '--num_epochs', '1'))
    return models


def test_sample_prints_a_caption_through_its_command_line(synthetic_set, one_epoch, tmp_path):
    image = sorted((synthetic_set / 'val').iterdir())[0]
    result = run('sample.py', '--image', str(image), '--checkpoint', str(one_epoch / 'checkpoint.pt'),
                 '--out', str(tmp_path / 'out'), '--grid', str(tmp_path / 'grid.png'), timeout=120, process=True)
    assert result.returncode == 0, result.stderr
    caption, png = result.stdout.splitlines()[0].split('  ->  ')
    assert png == str(tmp_path / 'out' / f'{image.stem}_captioned.png')  # where the PNG went
    vocab = load_vocab(str(synthetic_set / 'vocab.json'))
    assert caption and '<start>' not in caption and '<end>' not in caption
    assert all(word in vocab.word2idx for word in tokenize(caption))
    from PIL import Image
    with Image.open(tmp_path / 'out' / f'{image.stem}_captioned.png') as picture:
        assert picture.width >= 320 and picture.height > picture.width * 1.0  # image plus caption beneath
        caption_area = picture.crop((0, picture.width, picture.width, picture.height)).convert('L')
        assert caption_area.getextrema()[0] < 100  # dark text was drawn beneath the image
    with Image.open(tmp_path / 'grid.png') as sheet:
        assert sheet.size == picture.size  # one picture: a one-cell grid


def test_sample_reports_bad_images_and_captions_the_rest(synthetic_set, one_epoch, tmp_path):
    good = sorted((synthetic_set / 'val').iterdir())[0]
    bad = tmp_path / 'not_an_image.jpg'
    bad.write_text('hello')
    result = run('sample.py', '--image', str(good), str(bad), str(tmp_path / 'missing.png'),
                             '--checkpoint', str(one_epoch / 'checkpoint.pt'), timeout=120)
    assert result.returncode == 1
    assert result.stdout.startswith(f'{good}: ')
    device, *errors = result.stderr.strip().splitlines()  # the device line first, on stderr, apart from the captions
    assert device == 'device: cpu, dtype: float32'
    assert len(errors) == 2 and 'not_an_image.jpg' in errors[0] and 'missing.png' in errors[1]
    assert 'Traceback' not in result.stderr


def test_gpu_saved_checkpoint_loads_on_cpu(one_epoch, tmp_path, monkeypatch):
    checkpoint = torch.load(one_epoch / 'checkpoint.pt', weights_only=True)
    # Tag every storage as CUDA, exactly as torch.save does for tensors on a GPU.
    monkeypatch.setattr(torch.serialization, 'location_tag', lambda storage: 'cuda:0')
    torch.save(checkpoint, tmp_path / 'gpu.pt')
    monkeypatch.undo()
    if not REAL_GPU:
        with pytest.raises(RuntimeError, match='CUDA'):
            torch.load(tmp_path / 'gpu.pt', weights_only=True)
    encoder, decoder, _, _ = load_captioner(str(tmp_path / 'gpu.pt'))
    assert next(decoder.parameters()).device.type == 'cpu'
    torch.testing.assert_close(decoder.state_dict()['linear.weight'], checkpoint['decoder']['linear.weight'])


def test_frozen_backbone_batchnorm_statistics_do_not_change():
    torch.manual_seed(0)
    encoder = EncoderCNN(16, backbone='resnet18', weights=None)
    decoder = DecoderRNN(16, 24, vocab_size=10, num_layers=1)
    frozen = {k: v.clone() for k, v in encoder.resnet.state_dict().items()}
    head_mean = encoder.bn.running_mean.clone()
    optimizer = torch.optim.Adam(list(encoder.linear.parameters()) + list(encoder.bn.parameters())
                                 + list(decoder.parameters()))
    encoder.train(), decoder.train()
    assert not encoder.resnet.training and encoder.bn.training
    captions = torch.randint(3, 10, (4, 6))
    for _ in range(3):
        loss, _ = training.caption_loss(training.Captioner(encoder, decoder), torch.randn(4, 3, 64, 64) * 3 + 1,
                                        captions, [6, 6, 6, 6])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for key, value in encoder.resnet.state_dict().items():
        assert torch.equal(value, frozen[key]), key
    assert not torch.equal(encoder.bn.running_mean, head_mean)
    assert all(not p.requires_grad for p in encoder.resnet.parameters())


def test_trainable_backbone_does_learn():
    encoder = EncoderCNN(8, backbone='smallcnn', weights=None, train_backbone=True)
    encoder.train()
    assert encoder.resnet.training
    before = encoder.resnet[1].running_mean.clone()
    encoder(torch.randn(4, 3, 32, 32) + 2).sum().backward()
    assert not torch.equal(before, encoder.resnet[1].running_mean)
    assert encoder.resnet[0].weight.grad is not None


def test_tutorial_state_dicts_load_strictly():
    tutorial_encoder, tutorial_decoder = TutorialEncoder(256), TutorialDecoder(256, 512, 100, 2)
    encoder = EncoderCNN(256, backbone='resnet152', weights=None)
    decoder = DecoderRNN(256, 512, 100, 2)
    assert list(encoder.state_dict()) == list(tutorial_encoder.state_dict())
    assert list(decoder.state_dict()) == list(tutorial_decoder.state_dict())
    encoder.load_state_dict(tutorial_encoder.state_dict(), strict=True)
    decoder.load_state_dict(tutorial_decoder.state_dict(), strict=True)
    tutorial_decoder.load_state_dict(decoder.state_dict(), strict=True)


def test_sample_loads_the_tutorial_files(tutorial_encoder_file, tmp_path):
    words = ['<pad>', '<start>', '<end>', '<unk>', 'a', 'giraffe', 'standing', 'in', 'grass']
    decoder = tutorial_files(tmp_path, words, tutorial_encoder_file)
    image = tmp_path / 'photo.png'
    from PIL import Image
    Image.new('RGB', (300, 200), (120, 160, 60)).save(image)
    command = ['sample.py', '--image', image, '--encoder_path', tmp_path / 'encoder-5-3000.pkl',
               '--decoder_path', tmp_path / 'decoder-5-3000.pkl', '--vocab_path', tmp_path / 'vocab.pkl']
    result = run(*command, process=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() and all(word in words[3:] for word in result.stdout.split())

    # A vocabulary of another size gets a message naming both sizes, not a state-dict traceback.
    tutorial_files(tmp_path, words[:-1], tutorial_encoder_file)
    torch.save(decoder.state_dict(), tmp_path / 'decoder-5-3000.pkl')
    result = run(*command)
    assert result.returncode == 1
    assert '9 words' in result.stderr and 'has 8' in result.stderr and 'Traceback' not in result.stderr


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def test_malicious_and_broken_checkpoints_are_refused(tmp_path):
    marker = tmp_path / 'pwned'
    torch.save({'model_args': Exploit(marker)}, tmp_path / 'evil.pt')
    with pytest.raises(CheckpointError, match='evil.pt'):
        read_checkpoint(str(tmp_path / 'evil.pt'))
    assert not marker.exists()

    save_checkpoint(str(tmp_path / 'good.pt'), {'weights': torch.randn(1000)})
    data = (tmp_path / 'good.pt').read_bytes()
    (tmp_path / 'truncated.pt').write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match='truncated.pt'):
        read_checkpoint(str(tmp_path / 'truncated.pt'))
    with pytest.raises(CheckpointError, match='no such file'):
        read_checkpoint(str(tmp_path / 'absent.pt'))
    with pytest.raises(CheckpointError, match='not a train.py checkpoint'):
        load_captioner(str(tmp_path / 'good.pt'))


def test_train_reports_user_mistakes_in_one_line(tmp_path):
    result = run('train.py', '--vocab_path', str(tmp_path / 'nope.json'), timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == f'error: not found: {tmp_path / "nope.json"}: run build_vocab.py first, or pass ' \
                                    '--vocab_path'


def untrained_decoder(checkpoint):
    """The decoder's weights as train.py drew them before its first step: the same flags and seed, built again."""
    args = argparse.Namespace(**checkpoint['args'])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        _, decoder, _ = training.build_model(args, len(checkpoint['vocab']))
    return decoder.state_dict()


@pytest.mark.parametrize('decoder', ['fc', 'attention'])
def test_demo_trains_end_to_end_on_a_tiny_set(decoder, tmp_path, monkeypatch):
    """demo.py makes the set, trains, and captions the example; and it really trained: the training loss
    ends below ln(vocabulary size), what guessing every word uniformly scores, the held-out loss falls every
    epoch, and every decoder weight in both saved checkpoints differs from the weights drawn before training.

    The fc run is demo.py's one start as a real process; the attention run is in this process (faster).
    demo.py picks its device by itself and has no --device: both run on the CPU with CUDA hidden, as a GPU
    machine's user would ask (the fake CUDA of CAPTIONING_FAKE_CUDA=1 honours CUDA_VISIBLE_DEVICES too)."""
    command = ['demo.py', '--root', tmp_path / 'data', '--model_path', tmp_path / 'models', '--png_dir',
               tmp_path / 'png', '--num_train', '128', '--num_val', '10', '--max_epochs', '3', '--hidden_size', '32',
               '--decoder', decoder]
    if decoder == 'fc':
        result = run(*command, env=dict(os.environ, CUDA_VISIBLE_DEVICES=''), timeout=300)
    else:
        monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '')
        result = run(*command)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert sum(line.startswith('epoch') and 'held-out content accuracy' in line for line in lines) == 3
    assert any(line.startswith('best held-out content accuracy:') for line in lines)
    assert sum('validation loss' in line for line in lines) == 3
    picture = 'example_captioned.png' if decoder == 'fc' else 'example_captioned_attention.png'
    assert (tmp_path / 'png' / 'example.png').exists() and (tmp_path / 'png' / picture).exists()

    uniform = math.log(len(load_vocab(tmp_path / 'data' / 'vocab.json')))
    with open(tmp_path / 'models' / 'history.json') as f:
        history = json.load(f)
    assert history['train'] and history['train'][-1]['loss'] < uniform, (history['train'], uniform)
    val = [entry['loss'] for entry in history['val']]
    assert len(val) == 3 and val[0] > val[1] > val[2], val
    last = read_checkpoint(tmp_path / 'models' / 'checkpoint.pt')
    assert last['model_args']['decoder'] == decoder
    initial = untrained_decoder(last)
    for name in ('checkpoint.pt', 'best.pt', 'most_accurate.pt'):
        trained = read_checkpoint(tmp_path / 'models' / name)['decoder']
        assert list(trained) == list(initial), name
        unchanged = unchanged_weights(trained, initial)
        assert not unchanged, f'{name}: untrained {unchanged}'


def test_plot_history_draws_the_loss_curve(two_epoch_model, tmp_path):
    out = tmp_path / 'curve.png'
    result = run('plot_history.py', '--history', str(two_epoch_model / 'history.json'), '--out', str(out),
                 timeout=120, process=True)
    assert result.returncode == 0, result.stderr
    from PIL import Image
    with Image.open(out) as picture:
        assert picture.width > 400 and len(picture.convert('RGB').getcolors(1 << 16)) > 10
    result = run('plot_history.py', '--history', str(tmp_path / 'none.json'), timeout=120)
    assert result.returncode == 1 and result.stderr.startswith('error:') and 'Traceback' not in result.stderr
