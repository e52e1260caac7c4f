"""CaptionerConfig: one description of the model that train.py, the checkpoint, load_captioner and the
tutorial loader share, and checkpoints written before it existed."""
import json
import shutil
from dataclasses import asdict, fields
from pathlib import Path

import pytest
import torch

import train as trainer
import training
from conftest import run, tiny_args
from decoding import load_captioner
from model import CaptionerConfig, DecodeSettings, build_captioner, read_checkpoint

# Written by train.py before CaptionerConfig existed (commit 9bcc01f): two epochs on the synthetic set of
# conftest's synthetic_set, frozen smallcnn, --embed_size 8 --hidden_size 12 --max_seq_length 9
# --bn_momentum 0.1 --forget_bias 1 --seed 3. The JSON holds what that code computed from it for
# torch.manual_seed(0); torch.randn(3, 3, 32, 32): the encoder's features, the first step's
# log-probabilities, and the greedy and beam-3 captions.
OLD = Path(__file__).parent / 'data' / 'checkpoint_before_config.pt'
OLD_OUTPUTS = Path(__file__).parent / 'data' / 'checkpoint_before_config.json'


def test_a_checkpoint_from_before_the_config_loads_and_computes_what_it_did():
    encoder, decoder, vocab, config = load_captioner(str(OLD))
    assert config == CaptionerConfig(vocab_size=35, embed_size=8, hidden_size=12, num_layers=1, max_seq_length=9,
                                     backbone='smallcnn', train_backbone=False, bn_momentum=0.1, image_size=32,
                                     crop_size=32, forget_bias=None)  # it predates the field, so the default
    expected = json.loads(OLD_OUTPUTS.read_text())
    torch.manual_seed(0)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        features = encoder(images)
        torch.testing.assert_close(features, torch.tensor(expected['features']))
        torch.testing.assert_close(decoder.step(features, None)[0], torch.tensor(expected['first_step_log_probs']))
        assert decoder.sample(features, DecodeSettings().for_vocab(vocab)).tolist() == expected['greedy']
        assert decoder.beam_search(features, DecodeSettings(beam_size=3).for_vocab(vocab)).tolist() == expected['beam3']


def test_a_checkpoint_from_before_the_config_captions_and_resumes(synthetic_set, tmp_path):
    image = sorted((synthetic_set / 'val').iterdir())[0]
    result = run('sample.py', '--image', image, '--checkpoint', OLD)
    assert result.returncode == 0 and result.stdout.strip(), result.stderr[-2000:]

    (tmp_path / 'models').mkdir()
    shutil.copy(OLD, tmp_path / 'models' / 'checkpoint.pt')
    args = trainer.parse_args(['--image_dir', str(synthetic_set / 'train'), '--vocab_path',
                               str(synthetic_set / 'vocab.json'), '--caption_path',
                               str(synthetic_set / 'annotations' / 'captions_train.json'),
                               '--model_path', str(tmp_path / 'models'), '--num_workers', '0', '--tensorboard', 'none',
                               '--resume', '--num_epochs', '3', '--device', 'cpu'])
    result = training.train(args)
    decoder, history = result.decoder, result.history
    assert decoder.lstm.hidden_size == 12 and history['train'][-1]['epoch'] == 2  # its settings, one more epoch
    saved = read_checkpoint(str(tmp_path / 'models' / 'checkpoint.pt'))
    assert saved['epoch'] == 3 and saved['model_args'] == asdict(CaptionerConfig.from_dict(saved['model_args']))
    assert saved['model_args']['forget_bias'] == 1  # from the run's own settings, now kept in the config


def test_every_config_field_is_a_train_flag_with_the_same_default():
    args = trainer.parse_args([])
    for field in fields(CaptionerConfig):
        if field.name == 'vocab_size':
            assert not hasattr(args, field.name)  # it comes from the vocabulary
        else:
            assert getattr(args, field.name) == field.default, field.name
    assert CaptionerConfig.from_args(args, 123) == CaptionerConfig(vocab_size=123)


def test_the_checkpoint_holds_the_whole_config_and_rebuilds_the_same_model(synthetic_set, tmp_path):
    args = tiny_args(synthetic_set, tmp_path, num_epochs=1, num_layers=2, max_seq_length=7, forget_bias=2.5,
                     bn_momentum=0.2)
    result = training.train(args)
    encoder, decoder, vocab = result.encoder, result.decoder, result.vocab
    saved = read_checkpoint(str(tmp_path / 'checkpoint.pt'))['model_args']
    assert saved == dict(vocab_size=len(vocab), embed_size=16, hidden_size=24, num_layers=2, max_seq_length=7,
                         backbone='smallcnn', train_backbone=False, bn_momentum=0.2, image_size=32, crop_size=32,
                         forget_bias=2.5, decoder='fc', grid_size=7, attention_size=512, dropout=0.5)
    encoder2, decoder2, _, config = load_captioner(str(tmp_path / 'checkpoint.pt'))
    assert asdict(config) == saved and decoder2.max_seq_length == 7 and encoder2.bn.momentum == 0.2
    images = torch.randn(2, 3, 32, 32)
    encoder.eval(), decoder.eval()
    with torch.no_grad():
        assert torch.equal(decoder.sample(encoder(images)), decoder2.sample(encoder2(images)))


def test_build_captioner_follows_the_config():
    torch.manual_seed(0)
    config = CaptionerConfig(vocab_size=30, embed_size=6, hidden_size=10, num_layers=2, max_seq_length=5,
                             backbone='smallcnn', bn_momentum=0.3, forget_bias=1.5)
    encoder, decoder = build_captioner(config)
    assert decoder.embed.weight.shape == (30, 6) and decoder.linear.out_features == 30
    assert decoder.lstm.hidden_size == 10 and decoder.lstm.num_layers == 2 and decoder.max_seq_length == 5
    assert encoder.linear.out_features == 6 and encoder.bn.momentum == 0.3
    frozen = list(encoder.resnet.parameters())
    assert len(frozen) >= 10 and not any(p.requires_grad for p in frozen)  # frozen unless train_backbone
    for layer in range(2):  # the forget gate's rows: 1.5 in bias_ih, 0 in bias_hh
        assert torch.equal(getattr(decoder.lstm, f'bias_ih_l{layer}')[10:20], torch.full((10,), 1.5))
        assert torch.equal(getattr(decoder.lstm, f'bias_hh_l{layer}')[10:20], torch.zeros(10))
    trainable, _ = build_captioner(CaptionerConfig(vocab_size=30, backbone='smallcnn', train_backbone=True))
    assert len(list(trainable.resnet.parameters())) == len(frozen)
    assert all(p.requires_grad for p in trainable.resnet.parameters())


def test_old_and_new_keys_in_a_saved_config():
    saved = {'embed_size': 4, 'hidden_size': 5, 'vocab_size': 9, 'num_layers': 1, 'max_seq_length': 3,
             'a_setting_from_the_future': 1}
    config = CaptionerConfig.from_dict(saved)
    assert (config.embed_size, config.hidden_size, config.vocab_size) == (4, 5, 9)
    assert config.backbone == 'resnet152' and config.crop_size == 224  # missing: the defaults
    with pytest.raises(AttributeError):
        config.a_setting_from_the_future
