"""COCO-format (or Karpathy-split) captions as batches: (images, padded word ids, lengths), longest caption first."""
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch
import torch.utils.data as data
from torch.utils.data.distributed import DistributedSampler
from torchvision import transforms
from tqdm import tqdm

from backbones import IMAGENET_MEAN, IMAGENET_STD
from caption_files import load_captions
from files import ImageError, load_image
from vocabulary import tokenize, usable_captions

IMAGENET = (IMAGENET_MEAN, IMAGENET_STD)


def read_coco(path, split='train'):
    """A COCO-format captions file, or one split of a Karpathy dataset_*.json (see caption_files.py);
    a file that cannot be read is a ValueError naming it. Which captions are usable is usable_captions'."""
    try:
        coco = load_captions(path, split)
    except (OSError, ValueError, TypeError, KeyError, AssertionError) as err:
        raise ValueError(f'{path}: not a readable COCO captions file ({type(err).__name__}: {err})') from None
    return coco


def train_transform(crop_size, flip=True, normalization=IMAGENET):
    """The tutorial's augmentation: random crop of the resized image, random mirror. It takes a PIL image, or
    the same pixels as a uint8 (3, H, W) tensor (ImageCache's), and makes the same tensor of both from the
    same random numbers: no PIL image need be made for a cached one. normalization: (mean, std), the
    backbone's (CaptionerConfig.normalization)."""
    steps = [transforms.RandomCrop(crop_size)]
    if flip:
        steps.append(transforms.RandomHorizontalFlip())
    return transforms.Compose(steps + [to_float, transforms.Normalize(*normalization)])


def to_float(image):
    """transforms.ToTensor for uint8 (3, H, W) tensors too, with its arithmetic: the value as a float / 255."""
    if isinstance(image, torch.Tensor):
        return image.to(torch.get_default_dtype()).div(255)
    return transforms.functional.to_tensor(image)


def eval_transform(image_size, crop_size, normalization=IMAGENET):
    """Resize any image the way resize.py does, then take the centre crop the model trained on, normalised as
    its backbone expects (normalization: (mean, std), CaptionerConfig.normalization)."""
    return transforms.Compose([transforms.Resize((image_size, image_size)), transforms.CenterCrop(crop_size),
                               transforms.ToTensor(), transforms.Normalize(*normalization)])


def decoded(path):
    """The image at path as an (height, width, 3) uint8 array, or the reason it cannot be read."""
    try:
        return np.asarray(load_image(path))
    except ImageError as err:
        return str(err)


class ImageCache:
    """Decoded images kept in memory, so that each is decoded once a run instead of once per caption per
    epoch (train.py --cache_images). The pixels of all of them lie in one flat uint8 tensor: DataLoader
    workers share a tensor's memory, forked or spawned. A dict of arrays or PIL images would hold a Python
    object per image, whose reference counts, touched at every read, copy the memory pages around them
    into each forked worker, and it would be pickled whole to each spawned one. An image that could not be
    read keeps its reason, raised again at each read, so that training skips it or stops (--strict)
    exactly as when it reads the files."""

    CHUNK = 256  # images decoded between checks of the budget

    def __init__(self, pixels, where):
        self.pixels, self.where = pixels, where  # where: {image id: (offset, shape)}, or the reason it failed

    @staticmethod
    def estimate(paths):
        """The bytes len(paths) images take decoded, judged by the first readable one: resize.py makes them
        all the same size, and reading them all to know would cost what the cache saves."""
        for path in paths:
            pixels = decoded(path)
            if not isinstance(pixels, str):
                return pixels.nbytes * len(paths)
        return 0

    @classmethod
    def fill(cls, paths, budget, estimate, progress=False):
        """The images of paths ({image id: path}) decoded, by a thread per core (Pillow decodes outside the
        GIL), into room for the estimated bytes, made larger if need be; None if they take more than budget
        bytes after all."""
        items = list(paths.items())
        pixels, where, filled = torch.empty(min(estimate, budget), dtype=torch.uint8), {}, 0
        with ThreadPoolExecutor(os.cpu_count()) as pool, \
                tqdm(total=len(items), desc='decoding the images once', disable=not progress) as bar:
            for start in range(0, len(items), cls.CHUNK):
                chunk = items[start:start + cls.CHUNK]
                for (image_id, _), image in zip(chunk, pool.map(decoded, [path for _, path in chunk])):
                    if isinstance(image, str):
                        where[image_id] = image
                        continue
                    end = filled + image.size
                    if end > budget:
                        return None
                    if end > len(pixels):  # larger images than the first: make room, up to the budget
                        pixels = torch.cat([pixels[:filled], torch.empty(min(max(end, 2 * filled), budget) - filled,
                                                                         dtype=torch.uint8)])
                    pixels[filled:end].numpy()[:] = image.reshape(-1)
                    where[image_id], filled = (filled, image.shape), end
                bar.update(len(chunk))
        return cls(pixels[:filled].clone() if filled < len(pixels) else pixels, where)

    @property
    def nbytes(self):
        return self.pixels.numel()

    def image(self, image_id):
        """The pixels load_image gives, as a new uint8 (3, H, W) tensor, which train_transform turns into what
        it makes of load_image's PIL image; a copy, so that no transform can change the cache."""
        where = self.where[image_id]
        if isinstance(where, str):
            raise ImageError(where)
        offset, (height, width, channels) = where
        pixels = self.pixels[offset:offset + height * width * channels]
        return pixels.view(height, width, channels).permute(2, 0, 1).contiguous()


class CocoDataset(data.Dataset):
    """One item per caption annotation: (image tensor, word ids from <start> to <end>); or, for a group of
    captions of one image (a tuple of their indices, see GroupedSampler), the image once with all of them.
    Images come from their files as PIL images or, after cache_images, from memory as uint8 tensors: a
    cached dataset's transform must take those (train_transform does).

    Unusable captions are dropped with a count (see usable_captions); a caption longer than max_words
    words is cut there, keeping its <end>. With skip_unreadable, captions of images missing from root are
    dropped (with a count); without it, they are an error. An image that cannot be decoded raises
    ImageError, or with skip_unreadable or return_errors comes back as (None, reason) for collate_skipping:
    raised in a DataLoader worker, the error would reach the user wrapped in the worker's traceback, so
    training takes the reason back and decides in its own process.
    json may also be a Karpathy dataset_*.json file, of which split ('train', 'val' or 'test') is read.
    """

    max_words = 50  # a longer caption is cut here, keeping its <end>

    def __init__(self, root, json, vocab, transform=None, skip_unreadable=False, return_errors=False, split='train'):
        self.root = root
        self.coco = read_coco(json, split)
        self.ids = usable_captions(self.coco, json)
        if root is not None:
            self._check_images(json, skip_unreadable)
        self.vocab, self.transform = vocab, transform
        self.return_errors = skip_unreadable or return_errors
        self.word_ids = {}  # tokenized once, on first use: tokenizing costs as much as decoding a small image
        self.cache = None  # an ImageCache, once cache_images has filled one

    def _check_images(self, json, skip_missing):
        """Count the images the annotations name but root lacks, before any training starts."""
        needed = {self.coco.anns[ann_id]['image_id'] for ann_id in self.ids}
        missing = {i for i in needed if not os.path.isfile(self.path(i))}
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

    def path(self, image_id):
        return os.path.join(self.root, self.coco.imgs[image_id]['file_name'])

    def image_id(self, index):
        """The id of the image that caption index describes."""
        return self.coco.anns[self.ids[index]]['image_id']

    def cache_images(self, budget, progress=False):
        """Decode the images of the captions into memory once (an ImageCache), if they take at most budget
        bytes; returns (whether they are cached, the bytes they take): when too many, the estimate, or None
        if they passed the budget only as they were read."""
        paths = {image_id: self.path(image_id) for image_id in dict.fromkeys(map(self.image_id, range(len(self))))}
        estimate = ImageCache.estimate(paths.values())
        if estimate > budget:
            return False, estimate
        self.cache = ImageCache.fill(paths, budget, estimate, progress)
        return self.cache is not None, self.cache and self.cache.nbytes

    def image(self, image_id):
        """The image, transformed: from the cache if there is one, else decoded from its file."""
        image = self.cache.image(image_id) if self.cache is not None else load_image(self.path(image_id))
        return self.transform(image) if self.transform is not None else image

    def __getitem__(self, index):
        group = index if isinstance(index, tuple) else None
        try:
            image = self.image(self.image_id(group[0] if group else index))
        except ImageError as err:
            if not self.return_errors:
                raise
            return None, [str(err)] * len(group) if group else str(err)  # a group: the reason for each caption
        return image, [self.caption(i) for i in group] if group else self.caption(index)

    def caption(self, index):
        if index not in self.word_ids:
            words = tokenize(self.coco.anns[self.ids[index]]['caption'])[:self.max_words]
            self.word_ids[index] = [self.vocab(word) for word in ['<start>', *words, '<end>']]
        return torch.tensor(self.word_ids[index])

    def __len__(self):
        return len(self.ids)


def open_cache(folder):
    """(features, done, meta) of a cache from extract_features.py; the features are memory-mapped, so that a
    cache of grids larger than memory trains. meta['unreadable'] maps the ids of images it could not read to
    the reason; meta['grid_size'] is None for pooled vectors, as in every cache from before grids."""
    try:
        with open(os.path.join(folder, 'meta.json')) as f:
            meta = json.load(f)
        meta.setdefault('grid_size', None)
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


def cache_kind(grid_size):
    """What a cache of this grid_size holds, and the flags that make one."""
    if grid_size is None:
        return 'pooled features', '--decoder fc'
    return 'grids', f'--decoder attention --grid_size {grid_size}'


def check_cache_kind(folder, meta, grid_size):
    """A cache of pooled vectors cannot feed the attention decoder, nor a grid the fc decoder or a decoder of
    another grid; refused in one line that says which cache to make."""
    if meta['grid_size'] != grid_size:
        (held, held_flags), (needed, needed_flags) = cache_kind(meta['grid_size']), cache_kind(grid_size)
        raise ValueError(f'{folder} holds {held} ({held_flags}) but this model reads {needed}: make a cache for it '
                         f'with extract_features.py {needed_flags}')


class FeatureDataset(CocoDataset):
    """CocoDataset with the cached backbone features in place of images: the centre crop, or at random
    (with mirror=True) its mirror image. Captions of images extract_features.py could not read are left out.
    grid_size: the model's CaptionerConfig.feature_grid (None: pooled vectors); a cache of another kind is
    refused. Each item is read from the memory-mapped file when it is asked for."""

    def __init__(self, folder, json, vocab, mirror=True, split='train', grid_size=None):
        super().__init__(None, json, vocab, split=split)
        self.features, done, meta = open_cache(folder)
        check_cache_kind(folder, meta, grid_size)
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

    def image(self, image_id):
        view = int(torch.randint(2, ())) if self.mirror else 0
        return torch.from_numpy(self.features[self.row[image_id], view].astype(np.float32))


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


class ImageGroups(NamedTuple):
    """The inputs of a grouped batch (train.py --captions_per_image N): each image (or its cached features)
    once, and for each caption the row of its image. The encoder then runs once per image instead of once per
    caption; a row per caption rather than a count per image, because the batch's captions are sorted by
    length, which mixes the images' captions up. A NamedTuple, so that DataLoader's pin_memory and
    DistributedDataParallel move it to the device as they move a tensor, and train.py's step takes either."""
    images: torch.Tensor
    image_of: torch.Tensor

    def to(self, device, **kwargs):
        return ImageGroups(self.images.to(device, **kwargs), self.image_of.to(device, **kwargs))


def collate_groups(batch):
    """collate_skipping for batches of groups (GroupedSampler): (ImageGroups, targets, lengths, errors), each
    image once; errors hold an unreadable image's reason once for each of its captions, so that training
    counts the captions it skipped as with collate_skipping."""
    images, rows, errors = [], [], []
    for image, captions in batch:
        if image is None:
            errors += captions  # the reasons
            continue
        rows += [(torch.tensor(len(images)), caption) for caption in captions]
        images.append(image)
    if not images:
        return None, None, None, errors
    image_of, targets, lengths = collate_fn(rows)  # sorted by length, each caption with its image's row
    return ImageGroups(torch.stack(images), image_of), targets, lengths, errors


def get_loader(root, json, vocab, transform, batch_size, shuffle, num_workers, sampler=None):
    dataset = CocoDataset(root=root, json=json, vocab=vocab, transform=transform)
    return batches(dataset, batch_size, shuffle, num_workers, sampler)


def batches(dataset, batch_size, shuffle, num_workers, sampler=None, collate=collate_fn, pin_memory=False, seed=None):
    """A DataLoader with collate_fn. Its own generator keeps the global RNG untouched, so a resumed
    run draws the same random numbers as an uninterrupted one; seeded with seed, it makes the seeds of
    the workers' random numbers (crops, flips) from it, each worker's its own (None: a generator's default
    seed, the same in every run). A ResumableSampler cuts the batches itself. pin_memory (for a CUDA
    device): batches in page-locked memory, which copies to the GPU with non_blocking=True while the GPU
    keeps computing."""
    generator = torch.Generator() if seed is None else torch.Generator().manual_seed(seed)
    if isinstance(sampler, ResumableSampler):
        return data.DataLoader(dataset=dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate,
                               persistent_workers=num_workers > 0, generator=generator, pin_memory=pin_memory)
    return data.DataLoader(dataset=dataset, batch_size=batch_size, shuffle=shuffle and sampler is None,
                           sampler=sampler, num_workers=num_workers, collate_fn=collate,
                           persistent_workers=num_workers > 0, generator=generator, pin_memory=pin_memory)


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
        self.batch_size, self.epoch, self.skip = batch_size, 0, 0
        self.sizes = batch_sizes(self.share.num_samples, batch_size)

    @property
    def num_samples(self):
        """The captions of each process's share of an epoch."""
        return self.share.num_samples

    @property
    def batches_per_epoch(self):
        return len(self.sizes)

    def start(self, epoch, batches_done):
        self.epoch, self.skip = epoch, batches_done

    def share_of_epoch(self):
        """This process's items of the current epoch, in order: caption indices."""
        self.share.set_epoch(self.epoch)
        return list(self.share)

    def __iter__(self):
        items, start = self.share_of_epoch(), 0
        for number, size in enumerate(self.sizes):
            if number >= self.skip:
                yield items[start:start + size]
            start += size

    def __len__(self):
        return len(self.sizes) - self.skip


class GroupedSampler(ResumableSampler):
    """ResumableSampler for grouped batches (train.py --captions_per_image N), whose items are groups: tuples
    of up to N caption indices of one image, which CocoDataset reads as the image once with its captions.

    Each epoch, each image's captions are shuffled and cut into as few groups as hold them, of sizes as even
    as can be (7 captions, N 5: 4 and 3), so every caption is trained once an epoch whatever its image's
    count; then the groups are shuffled. Each process gets its share of the groups as DistributedSampler
    gives it captions, the first ones repeated to even the shares up: the group count is the same every
    epoch, so every process takes the same number of steps each epoch (one waiting for another's step
    would wait forever), and the learning-rate schedule knows them in advance. A group never spans
    processes. Batches hold batch_size // N groups, cut by batch_sizes, so no batch has one image alone
    while the share has more. Everything is seeded by seed and epoch, so a resumed run sees the same
    batches. image_ids: the image of each caption index."""

    def __init__(self, image_ids, batch_size, captions_per_image, rank, world_size, seed):
        if batch_size < 2 * captions_per_image:
            raise ValueError(f'--batch_size {batch_size} holds fewer than two images of --captions_per_image '
                             f'{captions_per_image} captions, and the encoder\'s BatchNorm cannot train on one image: '
                             f'give a --batch_size of at least {2 * captions_per_image}, or fewer captions per image')
        self.captions = {}  # image id: its caption indices
        for index, image_id in enumerate(image_ids):
            self.captions.setdefault(image_id, []).append(index)
        self.per_group, self.rank, self.world_size, self.seed = captions_per_image, rank, world_size, seed
        groups = sum(-(-len(indices) // captions_per_image) for indices in self.captions.values())
        self.groups_per_share = -(-groups // world_size)
        self.batch_size, self.epoch, self.skip = batch_size, 0, 0
        self.sizes = batch_sizes(self.groups_per_share, batch_size // captions_per_image)

    @property
    def num_samples(self):
        """The groups of each process's share of an epoch."""
        return self.groups_per_share

    def share_of_epoch(self):
        """This process's groups of the current epoch, in order."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(sum(map(len, self.captions.values())), generator=generator).tolist()
        groups = []
        for indices in self.captions.values():
            shuffled = sorted(indices, key=order.__getitem__)  # the image's captions in a random order
            parts = np.array_split(shuffled, -(-len(shuffled) // self.per_group))
            groups += [tuple(part.tolist()) for part in parts]
        groups = [groups[i] for i in torch.randperm(len(groups), generator=generator).tolist()]
        total = self.groups_per_share * self.world_size
        if len(groups) < total:
            groups = (groups * -(-total // len(groups)))[:total]
        return groups[self.rank::self.world_size]


def first_images(dataset, count=None):
    """The captions of the first `count` images of a dataset, by image id: a fixed subset (all with None)."""
    if count is None:
        return dataset
    image_of = {index: dataset.coco.anns[ann_id]['image_id'] for index, ann_id in enumerate(dataset.ids)}
    kept = set(sorted(set(image_of.values()))[:count])
    return data.Subset(dataset, [index for index, image_id in image_of.items() if image_id in kept])
