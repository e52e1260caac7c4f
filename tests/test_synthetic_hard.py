"""The hard synthetic set: references name every object with its count, differ in wording and order,
state true relations, and the images show what the captions say."""
import json
from collections import Counter

import numpy as np
import pytest

import synthetic
from synthetic import hard as synthetic_hard
from synthetic.hard import captions_for, content_matches, parse_caption, random_scene, relations, render_image


def scenes(count, seed=0):
    rng = np.random.default_rng(seed)
    return [(random_scene(rng), rng) for _ in range(count)]


def test_every_reference_names_every_object_with_its_count():
    sizes, repeats, words = Counter(), 0, Counter()
    for objects, rng in scenes(400):
        captions = captions_for(objects, rng)
        assert len(captions) == 5
        for caption in captions:
            assert content_matches(caption, objects), (caption, objects)
            words.update(caption.split())
        sizes[len(objects)] += 1
        repeats += len(synthetic_hard.groups_of(objects)) < len(objects)
    assert set(sizes) == {1, 2, 3, 4} and min(sizes.values()) > 60
    assert repeats > 50 and words['two'] > 0 and words['three'] > 0
    for word in ('big', 'little', 'hollow', 'outlined', 'diamond', 'orange', 'above', 'under', 'next', 'left'):
        assert words[word] > 0, word


def test_references_differ_in_wording_and_in_order():
    differ_in_order = 0
    for objects, rng in scenes(200, seed=1):
        captions = captions_for(objects, rng)
        if len(synthetic_hard.groups_of(objects)) >= 3:
            assert len(set(captions)) == 5
            firsts = {tuple(parse_caption(' '.join(c.split()[:7]))) for c in captions}
            differ_in_order += len(firsts) > 1
    assert differ_in_order > 30


@pytest.mark.parametrize('a, b, expected', [
    ((10, 30), (50, 32), ['left']), ((50, 30), (10, 28), ['right']),
    ((30, 10), (28, 50), ['above']), ((30, 50), (33, 10), ['below']),
    ((20, 30), (36, 30), ['left', 'near'])])
def test_relations_say_where_one_object_is_from_the_other(a, b, expected):
    def obj(x, y):
        return {'x': x, 'y': y, 'diameter': 12}
    assert relations(obj(*a), obj(*b)) == expected


@pytest.mark.parametrize('caption, right', [
    ('two big hollow red circles and a little blue diamond .', True),
    ('a little blue diamond under a large outlined red circle and a big hollow red circle', True),
    ('there are two large outlined red circles beside a small blue diamond .', True),
    ('a big hollow red circle and a little blue diamond .', False),  # one circle missing
    ('two big red circles and a little blue diamond .', False),  # solid, not hollow
    ('two big hollow red circles , a little blue diamond and a small green square .', False)])  # one too many
def test_parse_caption_reads_counts_synonyms_and_fills(caption, right):
    objects = [{'size': 'large', 'fill': 'hollow', 'colour': 'red', 'shape': 'circle'}] * 2 + \
              [{'size': 'small', 'fill': 'solid', 'colour': 'blue', 'shape': 'diamond'}]
    assert content_matches(caption, objects) is right


def test_images_show_solid_and_hollow_shapes_in_their_colours():
    checked = 0
    for objects, rng in scenes(100, seed=2):
        pixels = np.asarray(render_image(objects, rng)).astype(int)
        for obj in objects:
            centre = pixels[obj['y'] + (obj['shape'] == 'triangle'), obj['x']]
            close = np.abs(centre - np.array(synthetic_hard.COLOURS[obj['colour']])).max() <= 12
            assert close == (obj['fill'] == 'solid'), obj  # a hollow shape shows the background inside
            checked += 1
    assert checked > 200


def test_the_hard_set_is_written_in_coco_format_and_the_easy_one_is_unchanged(tmp_path):
    train, val = synthetic.make_synthetic_coco(str(tmp_path / 'hard'), num_train=12, num_val=4, seed=3,
                                               progress=False, kind=synthetic_hard)
    with open(train) as f:
        dataset = json.load(f)
    assert dataset['info']['parameters']['hard'] == synthetic_hard.VERSION
    assert len(dataset['annotations']) == 60 and len(dataset['images']) == 12
    assert all(image['objects'] for image in dataset['images'])
    assert all('fill' in obj for im in dataset['images'] for obj in im['objects'])
    for image in dataset['images']:
        captions = [a['caption'] for a in dataset['annotations'] if a['image_id'] == image['id']]
        assert len(captions) == 5 and all(content_matches(c, image['objects']) for c in captions)
    easy, _ = synthetic.make_synthetic_coco(str(tmp_path / 'easy'), num_train=12, num_val=4, seed=3, progress=False)
    with open(easy) as f:
        assert 'hard' not in json.load(f)['info']['parameters']  # sets made before --hard stay valid
