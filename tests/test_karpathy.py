"""Karpathy's dataset_*.json files (Flickr8k, Flickr30k, COCO splits) as --caption_path, written here
over a small synthetic set, in both layouts: COCO's (filepath/filename) and Flickr's (filename only)."""
import json
import shutil

import pytest

import synthetic
from caption_files import load_captions
from conftest import run
from vocabulary import build_vocab, load_vocab, tokenize

SPLITS = ('train', 'restval', 'val', 'test')


@pytest.fixture(scope='module')
def karpathy(tmp_path_factory):
    """dataset_coco.json (images under train/ and val/, with cocoid) and dataset_flickr.json (one flat folder)."""
    root = tmp_path_factory.mktemp('karpathy')
    synthetic.make_synthetic_coco(str(root), num_train=24, num_val=8, image_size=32, seed=4, progress=False)
    (root / 'flat').mkdir()
    coco_images, flickr_images, sentence_id = [], [], 0
    for folder in ('train', 'val'):
        with open(root / 'annotations' / f'captions_{folder}.json') as f:
            coco = json.load(f)
        for image in coco['images']:
            captions = [a['caption'] for a in coco['annotations'] if a['image_id'] == image['id']]
            sentences = []
            for caption in captions:
                sentences.append({'raw': caption, 'tokens': tokenize(caption), 'imgid': image['id'] - 1,
                                  'sentid': sentence_id})
                sentence_id += 1
            split = SPLITS[image['id'] % 2] if folder == 'train' else SPLITS[2 + image['id'] % 2]
            entry = {'filename': image['file_name'], 'imgid': image['id'] - 1, 'split': split, 'sentences': sentences,
                     'sentids': [s['sentid'] for s in sentences]}
            coco_images.append(dict(entry, filepath=folder, cocoid=image['id']))
            flickr_images.append(entry)
            shutil.copy(root / folder / image['file_name'], root / 'flat' / image['file_name'])
    with open(root / 'dataset_coco.json', 'w') as f:
        json.dump({'dataset': 'coco', 'images': coco_images}, f)
    with open(root / 'dataset_flickr.json', 'w') as f:
        json.dump({'dataset': 'flickr8k', 'images': flickr_images}, f)
    return root


def test_splits_are_read_by_content_and_restval_counts_as_train(karpathy):
    coco = load_captions(str(karpathy / 'dataset_coco.json'), 'train')
    assert sorted(coco.getImgIds()) == list(range(1, 25))  # train and restval
    assert coco.imgs[3]['file_name'] == 'train/000000000003.png'
    assert len(coco.anns) == 24 * 5 and coco.imgToAnns[3][0]['caption'].endswith('.')
    flickr = load_captions(str(karpathy / 'dataset_flickr.json'), 'test')
    assert sorted(flickr.getImgIds()) == [24, 26, 28, 30]  # imgid, as Flickr files have no cocoid
    assert flickr.imgs[24]['file_name'] == '000000000025.png'
    assert sorted(load_captions(str(karpathy / 'dataset_coco.json'), 'val').getImgIds()) == [26, 28, 30, 32]
    same = load_captions(str(karpathy / 'annotations' / 'captions_train.json'), 'test')  # COCO: split ignored
    assert len(same.getImgIds()) == 24


def test_build_vocab_gives_the_vocabulary_of_the_same_captions_in_coco_format(karpathy, tmp_path):
    result = run('build_vocab.py', '--caption_path', karpathy / 'dataset_flickr.json', '--vocab_path',
                 tmp_path / 'vocab.json', '--threshold', '1', process=True)
    assert result.returncode == 0, result.stderr[-2000:]
    from_coco = build_vocab(str(karpathy / 'annotations' / 'captions_train.json'), threshold=1)
    assert load_vocab(str(tmp_path / 'vocab.json')).word2idx == from_coco.word2idx


def test_train_extract_and_evaluate_take_a_karpathy_file(karpathy, tmp_path):
    result = run('build_vocab.py', '--caption_path', karpathy / 'dataset_coco.json', '--vocab_path',
                 tmp_path / 'vocab.json', '--threshold', '1')
    assert result.returncode == 0, result.stderr[-2000:]
    result = run('extract_features.py', '--image_dir', karpathy / 'flat', '--caption_path',
                 karpathy / 'dataset_flickr.json', '--output', tmp_path / 'cache', '--backbone', 'smallcnn',
                 '--weights', 'none', '--image_size', '32', '--crop_size', '32', '--num_workers', '0')
    assert result.returncode == 0, result.stderr[-2000:]
    with open(tmp_path / 'cache' / 'meta.json') as f:
        assert json.load(f)['image_ids'] == list(range(0, 24))  # Flickr's imgids of train and restval
    common = ['--vocab_path', tmp_path / 'vocab.json', '--backbone', 'smallcnn', '--weights', 'none',
              '--image_size', '32', '--crop_size', '32', '--embed_size', '16', '--hidden_size', '16',
              '--batch_size', '16', '--num_workers', '0', '--num_epochs', '1', '--log_step', '1']
    result = run('train.py', '--image_dir', karpathy, '--caption_path', karpathy / 'dataset_coco.json',
                 '--val_image_dir', karpathy, '--val_caption_path', karpathy / 'dataset_coco.json',
                 '--model_path', tmp_path / 'models', *common)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'validation loss' in result.stdout and 'missing' not in result.stdout
    with open(tmp_path / 'models' / 'history.json') as f:
        assert len(json.load(f)['train']) == 8  # 120 captions of train + restval, in batches of 16
    result = run('train.py', '--features', tmp_path / 'cache', '--caption_path', karpathy / 'dataset_flickr.json',
                 '--model_path', tmp_path / 'from_cache', *common)
    assert result.returncode == 0, result.stderr[-2000:]
    result = run('evaluate.py', '--checkpoint', tmp_path / 'models' / 'checkpoint.pt', '--image_dir', karpathy / 'flat',
                 '--caption_path', karpathy / 'dataset_flickr.json', '--split', 'test', '--block_trigrams',
                 '--results_path', tmp_path / 'results.json')
    assert result.returncode == 0, result.stderr[-2000:]
    assert '4 images' in result.stdout
    with open(tmp_path / 'results.json') as f:
        assert sorted(r['image_id'] for r in json.load(f)) == [24, 26, 28, 30]


def test_images_are_looked_for_under_filepath(karpathy, tmp_path):
    result = run('build_vocab.py', '--caption_path', karpathy / 'dataset_coco.json', '--vocab_path',
                 tmp_path / 'vocab.json')
    assert result.returncode == 0, result.stderr[-2000:]
    result = run('train.py', '--image_dir', karpathy / 'flat', '--caption_path', karpathy / 'dataset_coco.json',
                 '--vocab_path', tmp_path / 'vocab.json', '--model_path', tmp_path, '--strict',
                 '--backbone', 'smallcnn',
                 '--weights', 'none')
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert result.stderr.strip().startswith(f'error: none of the 24 images named in {karpathy / "dataset_coco.json"} '
                                            f'is in {karpathy / "flat"}')
