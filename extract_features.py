"""Run the frozen backbone once over a dataset and cache its pooled features, so that training
(`train.py --features DIR`) does not repeat a ResNet-152 forward pass for every caption of every epoch.

    python extract_features.py --image_dir data/resized2014 \\
        --caption_path data/annotations/captions_train2014.json --output data/features_train2014

For each image it stores two float16 vectors: the centre crop and its mirror image, which training
picks between at random. That keeps the tutorial's flips but not its random crops: every epoch sees
the same centre crop. An interrupted run picks up where it stopped.

The folder holds features.npy (a memory-mapped array, images x 2 x feature size), done.npy (which
rows are finished), meta.json (image ids and settings) and backbone.pt (the backbone's weights, so
that the checkpoint train.py writes still holds the whole encoder).
"""
import argparse
import json
import os
import sys

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from caption_files import load_captions
from data_loader import ImageError, eval_transform, load_image, open_cache
from model import CheckpointError, EncoderCNN, count, positive_int, read_checkpoint, save_checkpoint, save_file
from train import pick_device


class ImageFolderByIds(Dataset):
    def __init__(self, image_dir, file_names, transform):
        self.image_dir, self.file_names, self.transform = image_dir, file_names, transform

    def __getitem__(self, index):
        return index, self.transform(load_image(os.path.join(self.image_dir, self.file_names[index])))

    def __len__(self):
        return len(self.file_names)


def extract(args):
    coco = load_captions(args.caption_path, args.split)
    image_ids = sorted(coco.getImgIds())
    settings = dict(backbone=args.backbone, weights=args.weights, image_size=args.image_size,
                    crop_size=args.crop_size, caption_path=os.path.abspath(args.caption_path))
    os.makedirs(args.output, exist_ok=True)
    meta_path = os.path.join(args.output, 'meta.json')
    resume = os.path.exists(meta_path)
    # The head is not used here; a resumed run takes the backbone it started with, so it downloads nothing.
    encoder = EncoderCNN(1, args.backbone, None if resume else args.weights)
    if resume:
        _, done, meta = open_cache(args.output)
        if {k: meta.get(k) for k in settings} != settings or meta['image_ids'] != image_ids:
            raise ValueError(f'{args.output} holds features made with other settings; choose another --output')
        encoder.resnet.load_state_dict(read_checkpoint(os.path.join(args.output, 'backbone.pt')))
        features = np.load(os.path.join(args.output, 'features.npy'), mmap_mode='r+')
    else:
        feature_size = encoder.linear.in_features
        save_checkpoint(os.path.join(args.output, 'backbone.pt'), encoder.resnet.state_dict())
        features = np.lib.format.open_memmap(os.path.join(args.output, 'features.npy'), mode='w+',
                                             dtype=np.float16, shape=(len(image_ids), 2, feature_size))
        done = np.zeros(len(image_ids), dtype=bool)
        save_file(os.path.join(args.output, 'done.npy'), lambda f: np.save(f, done))
        meta = dict(settings, image_ids=image_ids, feature_size=feature_size)
        save_file(meta_path, lambda f: f.write(json.dumps(meta).encode()))
    device = pick_device(args.device)
    encoder.to(device).eval()

    todo = [i for i in range(len(image_ids)) if not done[i]]
    file_names = [coco.imgs[image_id]['file_name'] for image_id in image_ids]
    dataset = torch.utils.data.Subset(ImageFolderByIds(args.image_dir, file_names,
                                                       eval_transform(args.image_size, args.crop_size)), todo)
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.num_workers)
    with torch.no_grad():
        for rows, images in tqdm(loader, desc='extracting', unit='batch'):
            images = images.to(device)
            centre, mirror = encoder.pooled(images), encoder.pooled(images.flip(3))
            features[rows.numpy()] = torch.stack([centre, mirror], 1).cpu().numpy().astype(np.float16)
            features.flush()
            done[rows.numpy()] = True
            save_file(os.path.join(args.output, 'done.npy'), lambda f: np.save(f, done))  # after the features
    print(f'{int(done.sum())} of {len(image_ids)} images cached in {args.output}')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--image_dir', type=str, default='data/resized2014')
    parser.add_argument('--caption_path', type=str, default='data/annotations/captions_train2014.json',
                        help="COCO captions file, or Karpathy's dataset_*.json")
    parser.add_argument('--split', type=str, default='train', choices=['train', 'val', 'test'],
                        help='the part of a Karpathy file to extract (train includes restval)')
    parser.add_argument('--output', type=str, default='data/features_train2014')
    parser.add_argument('--backbone', type=str, default='resnet152')
    parser.add_argument('--weights', type=str, default='DEFAULT', help='DEFAULT, none, or a local .pth file')
    parser.add_argument('--image_size', type=positive_int, default=256, help='size resize.py gave the images')
    parser.add_argument('--crop_size', type=positive_int, default=224)
    parser.add_argument('--batch_size', type=positive_int, default=64)
    parser.add_argument('--num_workers', type=count, default=2)
    parser.add_argument('--device', type=str, default=None)
    args = parser.parse_args(argv)
    if args.weights.lower() == 'none':
        args.weights = None
    try:
        extract(args)
    except (CheckpointError, ImageError, FileNotFoundError, ValueError) as err:
        sys.exit(f'error: {err}')
    except OSError as err:  # features.npy is written in place, as a memory map: it cannot be renamed into place
        sys.exit(f'error: could not write {err.filename or args.output} ({err.strerror or err}); run again to go on')


if __name__ == '__main__':
    main()
