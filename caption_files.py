"""Caption files in either format, told apart by their content: COCO's captions JSON, or Karpathy's
dataset_coco.json / dataset_flickr8k.json / dataset_flickr30k.json ("images" with "split",
"filename", optional "filepath" and tokenized "sentences"). Both come back as a pycocotools COCO
object, so the rest of the code reads one format.

A Karpathy file is cut to one split: 'train' takes train and restval (the usual convention), 'val'
and 'test' take their own. Its image ids are COCO's (cocoid) where the file gives them, else its
own imgid; an image's file_name is filepath/filename when a filepath is given (COCO's images sit
in train2014/ and val2014/), else filename (Flickr's).
"""
import contextlib
import io
import json
import os

from pycocotools.coco import COCO

SPLITS = {'train': ('train', 'restval'), 'val': ('val',), 'test': ('test',)}


def is_karpathy(dataset):
    images = dataset.get('images') if isinstance(dataset, dict) else None
    return 'annotations' not in dataset and isinstance(images, list) and bool(images) \
        and isinstance(images[0], dict) and 'sentences' in images[0]


def from_karpathy(dataset, split):
    """The COCO captions layout of one split of a Karpathy file."""
    images, annotations = [], []
    for image in dataset['images']:
        if image['split'] not in SPLITS[split]:
            continue
        image_id = image.get('cocoid', image['imgid'])
        file_name = os.path.join(image['filepath'], image['filename']) if image.get('filepath') else image['filename']
        images.append({'id': image_id, 'file_name': file_name})
        for sentence in image['sentences']:
            text = sentence.get('raw') or ' '.join(sentence['tokens'])
            annotations.append({'id': sentence['sentid'], 'image_id': image_id, 'caption': text})
    return {'info': {'description': f"{dataset.get('dataset', 'Karpathy')} {split} split"},
            'images': images, 'annotations': annotations}


def load_captions(path, split='train'):
    """A COCO object for a COCO captions file (split is ignored) or one split of a Karpathy file."""
    with open(path) as f:
        dataset = json.load(f)
    if not isinstance(dataset, dict):
        raise ValueError(f'holds a JSON {type(dataset).__name__}, not an object')
    if is_karpathy(dataset):
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
        try:
            dataset = from_karpathy(dataset, split)
        except (KeyError, TypeError) as err:
            raise ValueError(f'a Karpathy dataset file, but an image or sentence lacks {err}') from None
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools' "creating index..."
        coco.createIndex()
    return coco
