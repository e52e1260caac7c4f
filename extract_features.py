"""Run the frozen backbone once over a dataset and cache its pooled features, so that training
(`train.py --features DIR`) does not repeat a ResNet-152 forward pass for every caption of every epoch.

    python extract_features.py --image_dir data/resized2014 \\
        --caption_path data/annotations/captions_train2014.json --output_dir data/features_train2014

For each image it stores two float16 vectors: the centre crop and its mirror image, which training
picks between at random. That keeps the tutorial's flips but not its random crops: every epoch sees
the same centre crop. With --decoder attention it stores, for each of the two, the grid of cells that the
attention decoder reads instead of the pooled vector (give train.py the same --decoder and --grid_size;
it refuses a cache of another kind). An interrupted run picks up where it stopped. An image that cannot be
read is reported and skipped, as train.py does (--strict stops instead); train.py --features leaves its
captions out, and a second run tries it again.

The folder holds features.npy (a memory-mapped array, images x 2 x feature size, or for a grid images x 2
x cells x feature size), done.npy (which rows are finished), meta.json (image ids and settings; a grid_size
of null means pooled vectors, as in caches from before grids), unreadable.json (images that could not be
read, and why) and backbone.pt (the backbone's weights, so that the checkpoint train.py writes still
holds the whole encoder).
"""
import argparse
import contextlib
import errno
import json
import os
import sys

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from backbones import image_normalization
from data_loader import batches, eval_transform, open_cache, read_coco
from files import CheckpointError, ImageError, load_image, save_file
from flags import HelpFormatter, count, positive_int
from model import DECODERS, EncoderCNN, read_checkpoint, save_checkpoint
from runs import configure_cuda, describe_device, pick_device, pins_memory, to_device


class ImageFolderByIds(Dataset):
    """(row, image tensor, None), or (row, None, reason) for an image that cannot be read: the reason comes
    back to the main process, which reports it in one line, instead of a worker's traceback."""

    def __init__(self, image_dir, file_names, transform):
        self.image_dir, self.file_names, self.transform = image_dir, file_names, transform

    def __getitem__(self, index):
        try:
            return index, self.transform(load_image(os.path.join(self.image_dir, self.file_names[index]))), None
        except ImageError as err:
            return index, None, str(err)

    def __len__(self):
        return len(self.file_names)


def collate_readable(batch):
    """(rows, images, {row: reason}): the readable images of a batch, and why the others are not."""
    readable = [(row, image) for row, image, _ in batch if image is not None]
    errors = {row: reason for row, _, reason in batch if reason is not None}
    rows = torch.tensor([row for row, _ in readable], dtype=torch.long)
    return rows, torch.stack([image for _, image in readable]) if readable else None, errors


def save_json(path, value):
    save_file(path, lambda f: f.write(json.dumps(value).encode()))


def create_features(path, shape):
    """features.npy, memory-mapped, with its disk space claimed now. open_memmap writes only its last byte,
    and writing into a memory map on a full disk kills the process with SIGBUS, without a word; claimed
    here, a full disk is an OSError naming the file, and no half-made file is left."""
    try:
        features = np.lib.format.open_memmap(path, mode='w+', dtype=np.float16, shape=shape)
        with open(path, 'r+b') as f:
            if hasattr(os, 'posix_fallocate'):  # not on macOS or Windows
                claim_space(f.fileno())
    except OSError as err:
        with contextlib.suppress(OSError):
            os.remove(path)
        raise OSError(err.errno, err.strerror, path) from None
    return features


def claim_space(fd):
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise  # other errors: a file system that cannot claim space ahead, left as it was


def feature_shape(encoder, crop_size):
    """The shape of one image's features, (feature size,) or (cells, feature size): found by running the
    backbone on one blank image, since the number of cells depends on the backbone and on the crop."""
    with torch.no_grad():
        return tuple(encoder.eval().pooled(torch.zeros(1, 3, crop_size, crop_size)).shape[1:])


def extract(args):
    """Fill the cache in --output_dir, on the device with train.py's CUDA settings (configure_cuda): its
    images, all of one size, in page-locked batches copied while the GPU computes."""
    device = pick_device(args.device)
    configure_cuda(device, tf32=not args.no_tf32)
    print(describe_device(device, 'float32, stored as float16'), flush=True)
    coco = read_coco(args.caption_path, args.split)
    image_ids = sorted(coco.getImgIds())
    grid_size = args.grid_size if args.decoder == 'attention' else None
    settings = dict(backbone=args.backbone, weights=args.weights, image_size=args.image_size,
                    crop_size=args.crop_size, caption_path=os.path.abspath(args.caption_path), grid_size=grid_size)
    os.makedirs(args.output_dir, exist_ok=True)
    meta_path = os.path.join(args.output_dir, 'meta.json')
    resume = os.path.exists(meta_path)
    # The head is not used here; a resumed run takes the backbone it started with, so it downloads nothing.
    encoder = EncoderCNN(1, args.backbone, None if resume else args.weights, grid_size=grid_size)
    if resume:
        _, done, meta = open_cache(args.output_dir)  # a cache from before grids has no grid_size: pooled, None
        if {k: meta.get(k) for k in settings} != settings or meta['image_ids'] != image_ids:
            raise ValueError(f'{args.output_dir} holds features made with other settings; choose another --output_dir')
        encoder.resnet.load_state_dict(read_checkpoint(os.path.join(args.output_dir, 'backbone.pt')))
        features = np.load(os.path.join(args.output_dir, 'features.npy'), mmap_mode='r+')
        unreadable = {str(image_id): reason for image_id, reason in meta['unreadable'].items()}
    else:
        feature_size = encoder.features_size
        save_checkpoint(os.path.join(args.output_dir, 'backbone.pt'), encoder.resnet.state_dict())
        features = create_features(os.path.join(args.output_dir, 'features.npy'),
                                   (len(image_ids), 2, *feature_shape(encoder, args.crop_size)))
        done, unreadable = np.zeros(len(image_ids), dtype=bool), {}
        save_file(os.path.join(args.output_dir, 'done.npy'), lambda f: np.save(f, done))
        save_json(meta_path, dict(settings, image_ids=image_ids, feature_size=feature_size))
    encoder.to(device).eval()

    todo = [i for i in range(len(image_ids)) if not done[i]]  # unreadable images are tried again
    file_names = [coco.imgs[image_id]['file_name'] for image_id in image_ids]
    transform = eval_transform(args.image_size, args.crop_size, image_normalization(args.backbone))
    dataset = torch.utils.data.Subset(ImageFolderByIds(args.image_dir, file_names, transform), todo)
    loader = batches(dataset, args.batch_size, False, args.num_workers, collate=collate_readable,
                     pin_memory=pins_memory(device))
    with torch.no_grad():
        for rows, images, errors in tqdm(loader, desc='extracting', unit='batch'):
            for row, reason in errors.items():
                if args.strict:
                    raise ImageError(f'{reason} (--strict stops here; without it, unreadable images are skipped)')
                tqdm.write(f'skipped: {reason}', file=sys.stderr)
                unreadable[str(image_ids[row])] = reason
            if images is not None:
                images = to_device(images, device)
                centre, mirror = encoder.pooled(images), encoder.pooled(images.flip(3))
                features[rows.numpy()] = torch.stack([centre, mirror], 1).cpu().numpy().astype(np.float16)
                features.flush()
                done[rows.numpy()] = True
                for row in rows.tolist():
                    unreadable.pop(str(image_ids[row]), None)  # read this time
            # Both only after the features are on disk, and each written whole or not at all.
            save_file(os.path.join(args.output_dir, 'done.npy'), lambda f: np.save(f, done))
            save_json(os.path.join(args.output_dir, 'unreadable.json'), unreadable)
    print(f'{int(done.sum())} of {len(image_ids)} images cached in {args.output_dir}')
    if unreadable:
        print(f'skipped {len(unreadable)} images that could not be read (named above); '
              'train.py --features leaves their captions out')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument('--image_dir', type=str, default='data/resized2014', help='resized images, from resize.py')
    parser.add_argument('--caption_path', type=str, default='data/annotations/captions_train2014.json',
                        help="COCO-format captions file naming the images to cache, or Karpathy's dataset_*.json")
    parser.add_argument('--split', type=str, default='train', choices=['train', 'val', 'test'],
                        help='the part of a Karpathy file to extract (train includes restval)')
    parser.add_argument('--output_dir', '--output', type=str, default='data/features_train2014',
                        help='folder for the cache, for train.py --features')
    parser.add_argument('--backbone', '--encoder', type=str, default='resnet152',
                        help='torchvision ResNet name, smallcnn, or efficientnet_lite0')
    parser.add_argument('--weights', type=str, default='DEFAULT',
                        help="backbone weights: DEFAULT (ImageNet: torchvision's, downloaded; efficientnet_lite0's, "
                             'from its installed package), none, or a local .pth file')
    parser.add_argument('--decoder', choices=DECODERS, default='fc',
                        help="the train.py --decoder the cache is for: fc, one pooled vector per image; attention, "
                             'the grid of cells')
    parser.add_argument('--grid_size', type=positive_int, default=7,
                        help="--decoder attention: a ResNet's last map pooled to grid_size x grid_size cells "
                             "(smallcnn's is used as it is); train.py needs the same --grid_size")
    parser.add_argument('--image_size', type=positive_int, default=256, help='size resize.py gave the images')
    parser.add_argument('--crop_size', type=positive_int, default=224, help='side of the centre crop the backbone sees')
    parser.add_argument('--batch_size', type=positive_int, default=64, help='images per forward pass')
    parser.add_argument('--num_workers', type=count, default=2, help='processes that read and decode images')
    parser.add_argument('--strict', action='store_true', help='stop at an unreadable image instead of skipping it')
    parser.add_argument('--device', type=str, default=None, help='cuda, mps or cpu (default: the best available)')
    parser.add_argument('--no_tf32', action='store_true',
                        help='on a GPU, float32 matrix products and convolutions in full float32, not in TF32 '
                             '(faster, with a 10-bit mantissa), as train.py --no_tf32')
    args = parser.parse_args(argv)
    if args.weights.lower() == 'none':
        args.weights = None
    try:
        extract(args)
    except (CheckpointError, ImageError, FileNotFoundError, ValueError) as err:
        sys.exit(f'error: {err}')
    except OSError as err:  # features.npy is written in place, as a memory map: it cannot be renamed into place
        sys.exit(f'error: could not write {err.filename or args.output_dir} ({err.strerror or err}); '
                 'run again to go on')


if __name__ == '__main__':
    main()
