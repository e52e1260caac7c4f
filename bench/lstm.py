"""Time DIY_LSTM.LSTM against torch.nn.LSTM on the captioning decoder's workload.

Three modules share the same weights and inputs: nn.LSTM, DIY_LSTM with its plain loop, and DIY_LSTM
after LSTM.compile_loop(). Each repeat times them back to back, in rotating order, so that machine noise
hits all alike; the table reports medians and the ratios of the medians to nn.LSTM (below 1.00 means
DIY_LSTM is faster).

    python -m bench.lstm                  # CPU, 2 threads, float32
    python -m bench.lstm --device cuda    # on a GPU, against cuDNN; compiled with CUDA graphs
    python -m bench.lstm --amp            # all three under bf16 autocast, as train.py --amp runs them

On a GPU all three run in full float32: TF32 is turned off for matrix multiplies and for cuDNN, whose
LSTM would otherwise round through TF32 while DIY_LSTM's products do not, and differ by more than the
check before timing allows.
"""
import argparse
import statistics

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import shapes_demo
from bench.timing import cpu_libraries, timed
from DIY_LSTM import LSTM
from flags import HelpFormatter, positive_int


def output_data(out):
    return out if torch.is_tensor(out) else out.data  # a PackedSequence's rows


def train_step(lstm, make_input):
    """Forward and backward through the LSTM, as one teacher-forced training step does."""
    def run():
        lstm.zero_grad(set_to_none=True)
        out = output_data(lstm(make_input())[0])
        out.sum().backward()
        return out.detach(), lstm.weight_hh_l0.grad
    return run


def inference(lstm, make_input):
    def run():
        with torch.no_grad():
            return (output_data(lstm(make_input())[0]),)
    return run


def decode_step(lstm, batch, args, device):
    """One step of greedy decoding: a single token per caption, carrying (h, c)."""
    x = torch.randn(batch, 1, args.embed_size, generator=torch.Generator().manual_seed(batch)).to(device)
    state = (torch.zeros(1, batch, args.hidden_size, device=device),) * 2

    def run():
        with torch.no_grad():
            return (lstm(x, state)[0],)
    return run


def under_autocast(fn, device):
    """fn under bf16 autocast, as train.py --amp runs the decoder where the device computes in bf16."""
    def run():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return fn()
    return run


def amp_label(amp):
    if not amp:
        return 'off'
    return 'bf16' if shapes_demo.cpu_runs_bf16_natively() else 'bf16(emulated: this CPU has no bf16 instructions)'


def check_same(results, case, amp):
    """Timings mean something only if all three compute the same, to the rounding of their precision: float32
    through time, or under bf16 autocast (8 bits of mantissa) within 5% of the largest value."""
    for key, result in results.items():
        for value, expected in zip(result, results['nn.LSTM']):
            value, expected = value.float(), expected.float()
            scale = expected.abs().max() if amp else 0.0
            if not torch.allclose(value, expected, rtol=1e-2, atol=max(1e-3, 5e-2 * float(scale))):
                raise SystemExit(f'{case}: {key} differs from nn.LSTM by up to {(value - expected).abs().max():.2e}')


def median_times(case, runs, repeats, device, amp):
    """{module: median milliseconds of runs[module]()}, timed back to back in rotating order, after a
    warm-up (in which the compiled loop compiles, then records CUDA graphs) and a check that all agree."""
    results = {}
    for key, fn in runs.items():
        for _ in range(3):
            results[key] = fn()
    check_same(results, case, amp)
    times = {key: [] for key in runs}
    keys = list(runs)
    for i in range(repeats):
        for key in keys[i % 3:] + keys[:i % 3]:
            times[key].append(timed(runs[key], device))
    return {key: 1000 * statistics.median(times[key]) for key in keys}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument('--embed_size', type=positive_int, default=256, help="the LSTM's input size")
    parser.add_argument('--hidden_size', type=positive_int, default=512, help="the LSTM's hidden size")
    parser.add_argument('--batch_size', type=positive_int, default=128, help='sequences per batch')
    parser.add_argument('--repeats', type=positive_int, default=30,
                        help='timed repeats; the table reports their median')
    parser.add_argument('--threads', type=positive_int, default=2, help='CPU threads for torch')
    parser.add_argument('--device', default='cpu', help='cpu or cuda')
    parser.add_argument('--seed', type=int, default=0, help='seed of the weights and inputs')
    parser.add_argument('--compile_mode', default=None,
                        help='torch.compile mode for the compiled loop (None: reduce-overhead on CUDA, else default)')
    parser.add_argument('--steps_per_call', type=positive_int, default=8,
                        help='time steps per call of the compiled loop')
    parser.add_argument('--amp', action='store_true',
                        help='bf16 autocast around all three (emulated, and slow, on a CPU without bf16 instructions)')
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    mode = args.compile_mode or ('reduce-overhead' if device.type == 'cuda' else 'default')
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    modules = {'nn.LSTM': nn.LSTM(args.embed_size, args.hidden_size, batch_first=True).to(device)}
    for name in ('DIY_LSTM', 'compiled'):
        modules[name] = LSTM(args.embed_size, args.hidden_size, batch_first=True).to(device)
        modules[name].load_state_dict(modules['nn.LSTM'].state_dict())
    modules['compiled'].compile_loop(steps_per_call=args.steps_per_call, mode=mode)

    batch = args.batch_size
    lengths = torch.randint(8, 26, (batch,)).sort(descending=True).values  # caption lengths 8-25
    padded = torch.randn(batch, int(lengths[0]), args.embed_size, device=device, requires_grad=True)
    fixed = torch.randn(batch, 20, args.embed_size, device=device, requires_grad=True)

    def packed():
        return pack_padded_sequence(padded, lengths, batch_first=True)

    def plain():
        return fixed

    cases = [
        ('(a) packed, lengths 8-25, fwd+bwd', lambda m: train_step(m, packed)),
        ('(b) fixed length 20, fwd+bwd', lambda m: train_step(m, plain)),
        ('packed, lengths 8-25, forward only', lambda m: inference(m, packed)),
        ('fixed length 20, forward only', lambda m: inference(m, plain)),
        ('greedy decode step, batch 1', lambda m: decode_step(m, 1, args, device)),
        (f'greedy decode step, batch {batch}', lambda m: decode_step(m, batch, args, device)),
    ]
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else device.type
    print(f'device={name} threads={torch.get_num_threads()} input={args.embed_size} hidden={args.hidden_size} '
          f'batch={batch} repeats={args.repeats} compile mode={mode} steps_per_call={args.steps_per_call} '
          f'torch={torch.__version__} amp={amp_label(args.amp)}'
          + (f' {cpu_libraries()}\n' if device.type == 'cpu' else ' tf32=off\n'))
    print('| case | nn.LSTM (ms) | DIY_LSTM (ms) | compiled (ms) | DIY / nn.LSTM | compiled / nn.LSTM |')
    print('|---|---:|---:|---:|---:|---:|')
    for case, make in cases:
        runs = {key: make(module) for key, module in modules.items()}
        if args.amp:
            runs = {key: under_autocast(run, device) for key, run in runs.items()}
        ms = median_times(case, runs, args.repeats, device, args.amp)
        print(f'| {case} | {ms["nn.LSTM"]:.3f} | {ms["DIY_LSTM"]:.3f} | {ms["compiled"]:.3f} | '
              f'{ms["DIY_LSTM"] / ms["nn.LSTM"]:.2f} | {ms["compiled"] / ms["nn.LSTM"]:.2f} |', flush=True)


if __name__ == '__main__':
    main()
