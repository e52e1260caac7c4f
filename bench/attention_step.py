"""One training step of the attention decoder with DIY_LSTM.LSTMCell against the same decoder with
nn.LSTMCell, and the fc decoder's step (DIY_LSTM.LSTM against nn.LSTM) beside it.

    python -m bench.attention_step                 # CPU, 2 threads: about 5 minutes
    python -m bench.attention_step --device cuda

The workload is COCO's: batch 128, captions of 8 to 25 words (packed, longest first), embeddings of 256,
hidden 512, 10,000 words, and for attention a 7x7 grid of 2048 features (ResNet-152's layer4), as
extract_features.py caches it, so no CNN runs. A step is forward, caption_loss (cross-entropy, plus the
doubly stochastic penalty for attention), backward and Adam. Each decoder pair shares its weights and inputs;
the four take turns in rotating order, and the table gives medians and the ratio of the DIY module's median
to torch's (below 1.00: DIY is faster).
"""
import argparse
import statistics

import torch
from torch import nn

from bench.timing import cpu_libraries, sync, timed
from flags import HelpFormatter, positive_int
from model import AttentionDecoder, CaptionerConfig, DecoderRNN, caption_loss


def decoders(config, features_size, device):
    """{name: decoder}: the attention decoder on either cell, the fc decoder on either LSTM; pairs share weights."""
    attention = AttentionDecoder(config, features_size)
    attention_torch = AttentionDecoder(config, features_size, cell=nn.LSTMCell)
    attention_torch.load_state_dict(attention.state_dict())
    fc = DecoderRNN(config.embed_size, config.hidden_size, config.vocab_size, 1)
    fc_torch = DecoderRNN(config.embed_size, config.hidden_size, config.vocab_size, 1)
    fc_torch.lstm = nn.LSTM(config.embed_size, config.hidden_size, batch_first=True)
    fc_torch.load_state_dict(fc.state_dict())
    made = {'attention, DIY_LSTM.LSTMCell': attention, 'attention, nn.LSTMCell': attention_torch,
            'fc, DIY_LSTM.LSTM': fc, 'fc, nn.LSTM': fc_torch}
    return {name: decoder.to(device).train() for name, decoder in made.items()}


def training_step(decoder, features, captions, lengths):
    """Forward, loss, backward and Adam, as train.py's step on cached features (dropout off, so the pairs agree)."""
    optimizer = torch.optim.Adam(decoder.parameters(), lr=1e-4)

    def run():
        optimizer.zero_grad(set_to_none=True)
        loss, _ = caption_loss(lambda f, c, n: decoder(f, c, n), features, captions, lengths, alpha_c=1.0)
        loss.backward()
        optimizer.step()
        return loss.detach()
    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument('--batch_size', type=positive_int, default=128, help='captions per step')
    parser.add_argument('--hidden_size', type=positive_int, default=512, help='hidden size of both decoders')
    parser.add_argument('--grid_size', type=positive_int, default=7, help='the grid is grid_size x grid_size cells')
    parser.add_argument('--features_size', type=positive_int, default=2048, help="features of a cell")
    parser.add_argument('--vocab_size', type=positive_int, default=10000, help='words in the vocabulary')
    parser.add_argument('--repeats', type=positive_int, default=15, help='timed steps per decoder')
    parser.add_argument('--threads', type=positive_int, default=2, help='CPU threads for torch')
    parser.add_argument('--device', default='cpu', help='cpu or cuda')
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = False

    config = CaptionerConfig(vocab_size=args.vocab_size, hidden_size=args.hidden_size, dropout=0.0,
                             decoder='attention')
    lengths = torch.randint(8, 26, (args.batch_size,)).sort(descending=True).values.tolist()
    captions = torch.randint(4, args.vocab_size, (args.batch_size, lengths[0]), device=device)
    grid = torch.randn(args.batch_size, args.grid_size ** 2, args.features_size, device=device)
    pooled = torch.randn(args.batch_size, config.embed_size, device=device)
    steps = {name: training_step(decoder, grid if name.startswith('attention') else pooled, captions, lengths)
             for name, decoder in decoders(config, args.features_size, device).items()}

    first = {name: run() for name, run in steps.items()}  # a warm-up, and a check that each pair agrees
    pairs = (('attention, DIY_LSTM.LSTMCell', 'attention, nn.LSTMCell'), ('fc, DIY_LSTM.LSTM', 'fc, nn.LSTM'))
    for diy, reference in pairs:
        if not torch.allclose(first[diy], first[reference], rtol=1e-4):
            raise SystemExit(f'{diy} and {reference} disagree: loss {first[diy]:.6f} against {first[reference]:.6f}')
    names, times = list(steps), {name: [] for name in steps}
    for i in range(args.repeats):
        for name in names[i % len(names):] + names[:i % len(names)]:
            times[name].append(timed(steps[name], device))
    sync(device)
    ms = {name: 1000 * statistics.median(values) for name, values in times.items()}

    where = torch.cuda.get_device_name(device) if device.type == 'cuda' else cpu_libraries()
    print(f'{where} threads={torch.get_num_threads()} torch={torch.__version__} batch={args.batch_size} '
          f'hidden={args.hidden_size} grid={args.grid_size}x{args.grid_size}x{args.features_size} '
          f'vocab={args.vocab_size} lengths 8-25 ({sum(lengths)} words) repeats={args.repeats}\n')
    print('| decoder | DIY step (ms) | torch step (ms) | DIY / torch |')
    print('|---|---:|---:|---:|')
    for kind, diy, reference in (('attention', 'DIY_LSTM.LSTMCell', 'nn.LSTMCell'), ('fc', 'DIY_LSTM.LSTM', 'nn.LSTM')):
        mine, theirs = ms[f'{kind}, {diy}'], ms[f'{kind}, {reference}']
        print(f'| {kind} ({diy} / {reference}) | {mine:.1f} | {theirs:.1f} | {mine / theirs:.2f} |')


if __name__ == '__main__':
    main()
