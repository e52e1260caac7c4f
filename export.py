"""Export a train.py checkpoint to ONNX, to caption with onnxruntime instead of PyTorch, or as a safetensors
folder, to share its weights without its optimizer state and without pickle.

    python export.py --checkpoint models/checkpoint.pt --out models/onnx
    python sample.py --onnx models/onnx --image png/example.png
    python export.py --checkpoint models/checkpoint.pt --format safetensors --output_dir models/coco
    python sample.py --checkpoint models/coco --image png/example.png

ONNX: writes encoder.onnx (image -> feature), decoder_step.onnx (one decoding step: token or image feature,
h, c -> log-probabilities of the next word, h, c; any batch size) and captioner.json (the vocabulary and
the sizes sample.py needs). For --decoder attention, encoder.onnx gives the grid of cells, and the step is
token, grid, h, s -> log-probabilities, h, s and the attention weights alpha. Greedy decoding, beam search and
sampling stay in Python: sample.py --onnx runs the decoders' own loop with each step done by onnxruntime.

safetensors: writes model.safetensors (the encoder's and decoder's weights, keys encoder.* and decoder.*),
config.json (the CaptionerConfig), vocab.json and README.md (a model card). sample.py, evaluate.py, app.py,
train.py --scst --init_from and torch.hub take the folder wherever they take a checkpoint; train.py --resume
needs the checkpoint itself, which also holds the optimizer's state.
"""
import argparse
import os
import sys

from decoding import ONNX_FILES, SAFETENSORS_FILES
from exporting import export, export_safetensors
from files import CheckpointError
from flags import HelpFormatter


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument('--checkpoint', type=str, default='models/checkpoint.pt', help='checkpoint from train.py')
    parser.add_argument('--format', choices=('onnx', 'safetensors'), default='onnx',
                        help='onnx: for onnxruntime (sample.py --onnx); safetensors: the weights, config and '
                             'vocabulary, for sample.py --checkpoint and torch.hub')
    parser.add_argument('--output_dir', '--out', type=str, default=None,
                        help='folder for the files (default: models/onnx, or models/safetensors)')
    parser.add_argument('--trained_on', type=str, default=None,
                        help="safetensors: the model card's training data (default: the captions file the "
                             'checkpoint records)')
    parser.add_argument('--card_note', type=str, default=None,
                        help='safetensors: a sentence for the model card, such as its measured scores')
    args = parser.parse_args(argv)
    out = args.output_dir or f'models/{args.format}'
    try:
        if args.format == 'onnx':
            export(args.checkpoint, out)
        else:
            export_safetensors(args.checkpoint, out, args.trained_on, args.card_note)
    except (CheckpointError, OSError) as err:
        sys.exit(f'error: {err}')
    names = ONNX_FILES if args.format == 'onnx' else (*SAFETENSORS_FILES, 'README.md')
    print(f'wrote {", ".join(os.path.join(out, name) for name in names)}')


if __name__ == '__main__':
    main()
