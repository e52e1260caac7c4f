"""The synthetic shapes set: captions parse back to the scene, images show it, files are COCO and reproducible."""
import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nltk.tokenize import TreebankWordTokenizer
from PIL import Image
from pycocotools.coco import COCO

import synthetic
from synthetic import draw, easy
from synthetic.easy import COLOURS, SHAPES, SIZES, captions_for, content_matches, parse_caption, random_scene


def triples(objects):
    return tuple((obj['size'], obj['colour'], obj['shape']) for obj in objects)


def scenes(count, seed=0, size=64):
    rng = np.random.default_rng(seed)
    return [(random_scene(rng, size), rng) for _ in range(count)]


# --- captions -------------------------------------------------------------------------------

def test_every_caption_names_the_objects_left_to_right():
    used = set()
    for objects, rng in scenes(300):
        captions = captions_for(objects, rng)
        assert len(set(captions)) == 5
        for caption in captions:
            assert parse_caption(caption) == triples(objects)
            assert content_matches(caption, objects)
        used.update(captions)
    for template in easy.ONE + easy.TWO:  # every template was exercised
        words = template.replace('{}', '').split()
        assert any(all(word in caption.split() for word in words) for caption in used), template


def test_more_captions_than_templates_reuse_them():
    objects = [{'shape': 'circle', 'colour': 'red', 'size': 'small', 'diameter': 16, 'x': 30, 'y': 30}]
    captions = captions_for(objects, np.random.default_rng(0), n=9)
    assert len(captions) == 9 and len(set(captions)) == len(easy.ONE)


def test_treebank_tokenizer_splits_captions_on_spaces():
    tokenizer = TreebankWordTokenizer()
    for objects, rng in scenes(50):
        for caption in captions_for(objects, rng):
            assert tokenizer.tokenize(caption) == caption.split()


PAIR = [{'shape': 'circle', 'colour': 'red', 'size': 'large', 'diameter': 28, 'x': 18, 'y': 30},
        {'shape': 'triangle', 'colour': 'blue', 'size': 'small', 'diameter': 16, 'x': 46, 'y': 30}]


@pytest.mark.parametrize('caption', [
    'a large red circle and a small blue triangle .',
    'a small blue triangle to the right of a large red circle',  # order is not required
    'A Large Red Circle, and a small blue triangle.',
    ['<start>', 'a', 'large', 'red', 'circle', 'and', 'a', 'small', 'blue', 'triangle', '.', '<end>'],
])
def test_right_content_matches(caption):
    assert content_matches(caption, PAIR)


@pytest.mark.parametrize('caption', [
    'a large green circle and a small blue triangle .',   # colour
    'a large red square and a small blue triangle .',     # shape
    'a small red circle and a small blue triangle .',     # size
    'a large red circle .',                               # missing object
    'a large red circle and a small blue triangle and a small blue triangle .',  # extra object
    'a large red circle and a blue triangle .',           # incomplete mention
    'a red large circle and a small blue triangle .',     # words out of place
    '',
])
def test_wrong_content_does_not_match(caption):
    assert not content_matches(caption, PAIR)


def test_parse_caption_ignores_other_words_and_punctuation():
    assert parse_caption('<start> two shapes : a small purple square, and a large yellow circle. <end>') == (
        ('small', 'purple', 'square'), ('large', 'yellow', 'circle'))
    assert parse_caption(['<unk>', 'small', 'small', 'red', 'triangle', '<pad>']) == (('small', 'red', 'triangle'),)
    assert parse_caption('a red circle') == ()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(list(SIZES)), st.sampled_from(list(COLOURS)), st.sampled_from(SHAPES)),
                min_size=1, max_size=2, unique=True),
       st.lists(st.integers(0, 63), min_size=2, max_size=2, unique=True),
       st.integers(1, 12), st.integers(0, 2 ** 32 - 1))
def test_any_scene_parses_back(attributes, xs, n, seed):
    objects = [{'size': s, 'colour': c, 'shape': sh, 'x': x, 'y': 32, 'diameter': 16}
               for (s, c, sh), x in zip(attributes, xs)]
    in_order = triples(sorted(objects, key=lambda obj: obj['x']))
    captions = captions_for(objects, np.random.default_rng(seed), n)
    assert len(captions) == n
    assert all(parse_caption(caption) == in_order for caption in captions)


# --- scenes and images ----------------------------------------------------------------------

@pytest.mark.parametrize('size', [64, 128])
def test_scenes_are_inside_apart_and_unambiguous(size):
    scale = size / 64
    counts = {1: 0, 2: 0}
    for objects, _ in scenes(400, seed=1, size=size):
        counts[len(objects)] += 1
        for obj in objects:
            low, high = SIZES[obj['size']]
            assert low * scale - 1 <= obj['diameter'] <= high * scale + 1
            x0, y0, x1, y1 = draw.box(obj)
            assert 0 < x0 and 0 < y0 and x1 < size - 1 and y1 < size - 1
        if len(objects) == 2:
            a, b = objects
            assert b['x'] - a['x'] >= 12 * scale
            assert draw.apart(draw.box(a), draw.box(b), 2 * scale)
            assert triples([a]) != triples([b])
    assert 150 < counts[1] < 250


@pytest.mark.parametrize('size', [64, 96])
def test_images_show_each_object_in_its_colour(size):
    for objects, rng in scenes(100, seed=2, size=size):
        image = easy.render_image(objects, rng, size)
        assert image.size == (size, size) and image.mode == 'RGB'
        pixels = np.asarray(image, dtype=float)
        for obj in objects:
            centre = pixels[obj['y'] - 1:obj['y'] + 2, obj['x'] - 1:obj['x'] + 2].reshape(-1, 3)
            assert np.abs(centre - COLOURS[obj['colour']]).max() <= 12, obj
        assert pixels[0, 0].min() > 150  # corners are always background: light
        assert pixels[-1, -1].min() > 150


def test_write_example(tmp_path):
    path = tmp_path / 'png' / 'example.png'
    objects = easy.write_example(str(path))
    with Image.open(path) as image:
        assert image.size == (64, 64) and image.mode == 'RGB'
        pixels = np.asarray(image, dtype=float)
    assert triples(objects) == (('large', 'red', 'circle'), ('small', 'blue', 'triangle'))
    for obj in objects:
        assert np.abs(pixels[obj['y'], obj['x']] - COLOURS[obj['colour']]).max() <= 12


# --- the COCO files -------------------------------------------------------------------------

def make(root, seed=0):
    return synthetic.make_synthetic_coco(str(root), num_train=20, num_val=5, seed=seed, progress=False)


def test_coco_files(tmp_path):
    train_json, val_json = make(tmp_path)
    ids = {}
    for split, path, count in (('train', train_json, 20), ('val', val_json, 5)):
        coco = COCO(path)
        assert len(coco.imgs) == count and len(coco.anns) == 5 * count
        for image in coco.imgs.values():
            with Image.open(tmp_path / split / image['file_name']) as picture:
                assert picture.size == (image['width'], image['height']) == (64, 64)
            captions = [ann['caption'] for ann in coco.imgToAnns[image['id']]]
            assert len(captions) == 5
            assert all(parse_caption(caption) == triples(image['objects']) for caption in captions)
        ids[split] = (set(coco.imgs), set(coco.anns))
    assert ids['train'][0] == set(range(1, 21)) and ids['val'][0] == set(range(21, 26))
    assert not ids['train'][1] & ids['val'][1]
    assert sorted(os.listdir(tmp_path / 'train'))[0] == '000000000001.png'


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    def contents(root):
        return {path.relative_to(root): path.read_bytes() for path in sorted(root.rglob('*')) if path.is_file()}

    for name, seed in (('a', 0), ('b', 0), ('c', 1)):
        make(tmp_path / name, seed)
    assert contents(tmp_path / 'a') == contents(tmp_path / 'b')
    a, c = contents(tmp_path / 'a'), contents(tmp_path / 'c')
    assert a.keys() == c.keys()
    assert sum(a[key] != c[key] for key in a) >= 20


def test_existing_set_is_reused_unless_parameters_change(tmp_path):
    train_json, _ = make(tmp_path)
    os.remove(tmp_path / 'train' / '000000000001.png')  # a marker: regeneration would restore it
    make(tmp_path)
    assert not (tmp_path / 'train' / '000000000001.png').exists()
    make(tmp_path, seed=3)
    assert (tmp_path / 'train' / '000000000001.png').exists()
    with open(train_json) as f:
        assert json.load(f)['info']['parameters']['seed'] == 3
