"""COCO-format (or Karpathy-split) captions as batches: (images, padded word ids, lengths), longest caption first."""
import json
import os

import numpy as np
import torch
import torch.utils.data as data
from torch.utils.data.distributed import DistributedSampler
from torchvision import transforms

from build_vocab import tokenize, usable_captions
from caption_files import load_captions
from files import ImageError, load_image

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def read_coco(path, split='train'):
    """A COCO-format captions file, or one split of a Karpathy dataset_*.json (see caption_files.py);
    a file that cannot be read is a ValueError naming it. Which captions are usable is usable_captions'."""
    try:
        coco = load_captions(path, split)
    except (OSError, ValueError, TypeError, KeyError, AssertionError) as err:
        raise ValueError(f'{path}: not a readable COCO captions file ({type(err).__name__}: {err})') from None
    return coco


def train_transform(crop_size, flip=True):
    """The tutorial's augmentation: random crop of the resized image, random mirror."""
    steps = [transforms.RandomCrop(crop_size)]
    if flip:
        steps.append(transforms.RandomHorizontalFlip())
    return transforms.Compose(steps + [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def eval_transform(image_size, crop_size):
    """Resize any image the way resize.py does, then take the centre crop the model trained on."""
    return transforms.Compose([transforms.Resize((image_size, image_size)), transforms.CenterCrop(crop_size),
                               transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class CocoDataset(data.Dataset):
    """One item per caption annotation: (image tensor, word ids from <start> to <end>).

    Unusable captions are dropped with a count (see usable_captions); a caption longer than max_words
    words is cut there, keeping its <end>. With skip_unreadable, captions of images missing from root are
    dropped (with a count); without it, they are an error. An image that cannot be decoded raises
    ImageError, or with skip_unreadable or return_errors comes back as (None, reason) for collate_skipping:
    raised in a DataLoader worker, the error would reach the user wrapped in the worker's traceback, so
    training takes the reason back and decides in its own process.
    json may also be a Karpathy dataset_*.json file, of which split ('train', 'val' or 'test') is read.
    """

    def __init__(self, root, json, vocab, transform=None, max_words=50, skip_unreadable=False, return_errors=False,
                 split='train'):
        self.root = root
        self.coco = read_coco(json, split)
        self.ids = usable_captions(self.coco, json)
        if root is not None:
            self._check_images(json, skip_unreadable)
        self.vocab, self.transform, self.max_words = vocab, transform, max_words
        self.return_errors = skip_unreadable or return_errors
        self.word_ids = {}  # tokenized once, on first use: tokenizing costs as much as decoding a small image

    def _check_images(self, json, skip_missing):
        """Count the images the annotations name but root lacks, before any training starts."""
        needed = {self.coco.anns[ann_id]['image_id'] for ann_id in self.ids}
        missing = {i for i in needed if not os.path.isfile(os.path.join(self.root, self.coco.imgs[i]['file_name']))}
        if not missing:
            return
        message = f'{len(missing)} of the {len(needed)} images named in {json} are missing from {self.root}'
        if missing == needed:
            raise ImageError(f'none of the {len(needed)} images named in {json} is in {self.root}: pass the folder '
                             'that resize.py wrote for these annotations')
        if not skip_missing:
            raise ImageError(f'{message}; leave out --strict to skip their captions')
        print(f'note: {message}; their captions are skipped')
        self.ids = [ann_id for ann_id in self.ids if self.coco.anns[ann_id]['image_id'] not in missing]

    def __getitem__(self, index):
        image_id = self.coco.anns[self.ids[index]]['image_id']
        try:
            image = load_image(os.path.join(self.root, self.coco.imgs[image_id]['file_name']))
        except ImageError as err:
            if not self.return_errors:
                raise
            return None, str(err)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.caption(index)

    def caption(self, index):
        if index not in self.word_ids:
            words = tokenize(self.coco.anns[self.ids[index]]['caption'])[:self.max_words]
            self.word_ids[index] = [self.vocab(word) for word in ['<start>', *words, '<end>']]
        return torch.tensor(self.word_ids[index])

    def __len__(self):
        return len(self.ids)


def open_cache(folder):
    """(features, done, meta) of a cache from extract_features.py; the features are memory-mapped.
    meta['unreadable'] maps the ids of images it could not read to the reason."""
    try:
        with open(os.path.join(folder, 'meta.json')) as f:
            meta = json.load(f)
        features = np.load(os.path.join(folder, 'features.npy'), mmap_mode='r')
        done = np.load(os.path.join(folder, 'done.npy'))
        unreadable_path = os.path.join(folder, 'unreadable.json')
        meta['unreadable'] = {}
        if os.path.exists(unreadable_path):
            with open(unreadable_path) as f:
                meta['unreadable'] = {int(image_id): reason for image_id, reason in json.load(f).items()}
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f'{folder}: not a feature cache from extract_features.py ({err})') from None
    return features, done, meta


class FeatureDataset(CocoDataset):
    """CocoDataset with the cached backbone features in place of images: the centre crop, or at random
    (with mirror=True) its mirror image. Captions of images extract_features.py could not read are left out."""

    def __init__(self, folder, json, vocab, mirror=True, split='train'):
        super().__init__(None, json, vocab, split=split)
        self.features, done, meta = open_cache(folder)
        unreadable = meta['unreadable']
        if not all(done[row] or image_id in unreadable for row, image_id in enumerate(meta['image_ids'])):
            raise ValueError(f'{folder}: only {int(done.sum())} of {len(done)} images are extracted; '
                             'run extract_features.py again to finish')
        self.row = {image_id: row for row, image_id in enumerate(meta['image_ids']) if done[row]}
        if unreadable:
            kept = [ann_id for ann_id in self.ids if self.coco.anns[ann_id]['image_id'] not in unreadable]
            print(f'note: {folder}: {len(unreadable)} images could not be read when it was made; '
                  f'their {len(self.ids) - len(kept)} captions are skipped')
            if not kept:
                raise ValueError(f'{folder}: none of the images of {json} could be read when it was made, '
                                 'so there is nothing to train on; check the images in --image_dir')
            self.ids = kept
        missing = {self.coco.anns[ann_id]['image_id'] for ann_id in self.ids} - set(self.row)
        if missing:
            raise ValueError(f'{folder}: {len(missing)} images of {json} are not in the cache')
        self.mirror = mirror

    def __getitem__(self, index):
        row = self.row[self.coco.anns[self.ids[index]]['image_id']]
        view = int(torch.randint(2, ())) if self.mirror else 0
        return torch.from_numpy(self.features[row, view].astype(np.float32)), self.caption(index)


def collate_fn(batch):
    """Sort by caption length, longest first, as pack_padded_sequence expects; pad with <pad>=0."""
    batch.sort(key=lambda item: len(item[1]), reverse=True)
    images, captions = zip(*batch)
    lengths = [len(caption) for caption in captions]
    targets = torch.zeros(len(captions), max(lengths), dtype=torch.long)
    for i, caption in enumerate(captions):
        targets[i, :lengths[i]] = caption
    return torch.stack(images, 0), targets, lengths


def collate_skipping(batch):
    """collate_fn for training, leaving out unreadable images: (images, targets, lengths, errors);
    images is None when no image of the batch could be read."""
    errors = [reason for image, reason in batch if image is None]
    readable = [item for item in batch if item[0] is not None]
    return (*collate_fn(readable), errors) if readable else (None, None, None, errors)


def get_loader(root, json, vocab, transform, batch_size, shuffle, num_workers, sampler=None):
    dataset = CocoDataset(root=root, json=json, vocab=vocab, transform=transform)
    return batches(dataset, batch_size, shuffle, num_workers, sampler)


def batches(dataset, batch_size, shuffle, num_workers, sampler=None, collate=collate_fn, pin_memory=False):
    """A DataLoader with collate_fn. Its own generator keeps the global RNG untouched, so a resumed
    run draws the same random numbers as an uninterrupted one. A ResumableSampler cuts the batches itself.
    pin_memory (for a CUDA device): batches in page-locked memory, which copies to the GPU with
    non_blocking=True while the GPU keeps computing."""
    if isinstance(sampler, ResumableSampler):
        return data.DataLoader(dataset=dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate,
                               persistent_workers=num_workers > 0, generator=torch.Generator(), pin_memory=pin_memory)
    return data.DataLoader(dataset=dataset, batch_size=batch_size, shuffle=shuffle and sampler is None,
                           sampler=sampler, num_workers=num_workers, collate_fn=collate,
                           persistent_workers=num_workers > 0, generator=torch.Generator(), pin_memory=pin_memory)


def batch_sizes(count, batch_size):
    """The sizes of the batches that count captions are cut into: full batches of batch_size, then the
    rest, except that the rest is never one caption alone.

    In training mode the encoder's BatchNorm cannot normalize a batch of one (it stops with "Expected more
    than 1 value per channel when training"), and an optimizer step on one caption would weigh it as much
    as a whole batch; dropping it (drop_last) would leave a caption untrained every epoch. So when one
    caption is left over, the last two batches share their batch_size + 1 captions evenly, neither larger
    than batch_size (a --batch_size chosen to fill the GPU's memory still fits), and the number of batches
    stays the same; with a batch_size of 2, the three captions make one batch instead. Only a batch_size of
    1, or a share of one caption, leaves a batch of one (Captioner trains it on BatchNorm's running statistics).
    """
    full, rest = divmod(count, batch_size)
    sizes = [batch_size] * full + ([rest] if rest else [])
    if rest == 1 and full and batch_size > 1:
        pair = batch_size + 1
        sizes[-2:] = [pair - pair // 2, pair // 2] if pair // 2 > 1 else [pair]
    return sizes


class ResumableSampler(data.Sampler):
    """The batches of each process's share of a fresh shuffle every epoch (seeded, so reproducible), cut as
    batch_sizes says, able to start part-way through an epoch: after the batches a resumed run has already
    done. A batch sampler: batches() passes it to the DataLoader as one."""

    def __init__(self, dataset, batch_size, rank, world_size, seed):
        self.share = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        self.batch_size, self.skip = batch_size, 0
        self.sizes = batch_sizes(self.share.num_samples, batch_size)

    @property
    def num_samples(self):
        """The captions of each process's share of an epoch."""
        return self.share.num_samples

    @property
    def batches_per_epoch(self):
        return len(self.sizes)

    def start(self, epoch, batches_done):
        self.share.set_epoch(epoch)
        self.skip = batches_done

    def __iter__(self):
        indices, start = list(self.share), 0
        for number, size in enumerate(self.sizes):
            if number >= self.skip:
                yield indices[start:start + size]
            start += size

    def __len__(self):
        return len(self.sizes) - self.skip


def first_images(dataset, count=None):
    """The captions of the first `count` images of a dataset, by image id: a fixed subset (all with None)."""
    if count is None:
        return dataset
    image_of = {index: dataset.coco.anns[ann_id]['image_id'] for index, ann_id in enumerate(dataset.ids)}
    kept = set(sorted(set(image_of.values()))[:count])
    return data.Subset(dataset, [index for index, image_id in image_of.items() if image_id in kept])
