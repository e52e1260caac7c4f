"""export.py and sample.py --onnx: the ONNX captioner gives the PyTorch captioner's captions."""
import json
import os

import pytest
import torch

import training
from conftest import disk_fills_for, learning_args, run, sample_lines
from decoding import ONNX_FILES as FILES
from decoding import load_captioner, load_onnx_captioner

pytest.importorskip('onnxruntime')
pytest.importorskip('onnxscript')
pytestmark = pytest.mark.skipif(not hasattr(torch.export.Dim, 'DYNAMIC'),
                                reason='export.py needs torch.export.Dim.DYNAMIC (newer than torch 2.5)')


@pytest.fixture(scope='module')
def exported(synthetic_set, tmp_path_factory):
    """A tiny model trained for two epochs on the synthetic set (2 layers, to export a stacked LSTM), and its
    ONNX files."""
    folder = tmp_path_factory.mktemp('export')
    training.train(learning_args(synthetic_set, folder, '--num_epochs', '2', '--num_layers', '2'))
    result = run('export.py', '--checkpoint', str(folder / 'checkpoint.pt'),
                             '--output_dir', str(folder / 'onnx'), timeout=600)
    assert result.returncode == 0, result.stderr
    return folder


@pytest.mark.parametrize('beam_size', ['1', '3'])
def test_onnx_captions_equal_pytorch_captions_on_the_validation_images(synthetic_set, exported, beam_size):
    images = [str(path) for path in sorted((synthetic_set / 'val').iterdir())]
    assert len(images) == 12
    pytorch = sample_lines('--image', *images, '--checkpoint', str(exported / 'checkpoint.pt'),
                           '--beam_size', beam_size)
    onnx = sample_lines('--image', *images, '--onnx', str(exported / 'onnx'), '--beam_size', beam_size)
    assert len(pytorch) == 12 and onnx == pytorch
    assert len({line.split(': ', 1)[1] for line in onnx}) > 1  # a trained model: not one caption for everything


def test_exported_files_match_the_model_step_by_step_for_any_batch(exported):
    assert sorted(p.name for p in (exported / 'onnx').iterdir()) == sorted(FILES)  # no temporary files left
    encoder, decoder, vocab, _ = load_captioner(str(exported / 'checkpoint.pt'))
    onnx_encoder, onnx_decoder, onnx_vocab, onnx_config = load_onnx_captioner(str(exported / 'onnx'))
    assert onnx_vocab.word2idx == vocab.word2idx and onnx_config.num_layers == 2
    torch.manual_seed(0)
    for batch in (1, 5):
        images = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            features = encoder(images)
            torch.testing.assert_close(onnx_encoder(images), features, rtol=1e-4, atol=1e-5)
            inputs, states, onnx_inputs, onnx_states = features, None, features, None
            for _ in range(3):  # the image step, then word steps carrying (h, c)
                log_probs, states = decoder.step(inputs, states)
                onnx_log_probs, onnx_states = onnx_decoder.step(onnx_inputs, onnx_states)
                torch.testing.assert_close(onnx_log_probs, log_probs, rtol=1e-4, atol=1e-4)
                assert len(onnx_states) == len(states) == 2  # (h, c)
                for a, b in zip(onnx_states, states):
                    assert a.shape == (2, batch, 48)
                    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
                words = log_probs.argmax(1)
                inputs, onnx_inputs = decoder.embed(words), onnx_decoder.embed(words)


def test_sample_onnx_without_the_files_is_a_clear_error(tmp_path):
    (tmp_path / 'captioner.json').write_text(json.dumps({}))
    result = run('sample.py', '--image', 'png/example.png', '--onnx', str(tmp_path), timeout=120)
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert result.stderr.startswith('error: ') and 'encoder.onnx' in result.stderr and 'export.py' in result.stderr


def test_a_disk_that_fills_during_an_export_is_one_line_and_keeps_the_previous_files(exported, tmp_path,
                                                                                     monkeypatch):
    import export
    out = tmp_path / 'onnx'
    out.mkdir()
    for name in FILES:
        (out / name).write_bytes((exported / 'onnx' / name).read_bytes())
    before = {name: (out / name).read_bytes() for name in FILES}
    disk_fills_for(monkeypatch, 'encoder.onnx')
    with pytest.raises(SystemExit) as caught:
        export.main(['--checkpoint', str(exported / 'checkpoint.pt'), '--output_dir', str(out)])
    assert caught.value.code == (f'error: could not write {out / "encoder.onnx"} (No space left on device); '
                                 'the previous encoder.onnx, if any, is intact')
    assert {name: (out / name).read_bytes() for name in FILES} == before and sorted(os.listdir(out)) == sorted(FILES)
