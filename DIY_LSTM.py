"""An LSTM written by hand from its gate equations: a drop-in replacement for torch.nn.LSTM.

For input x(t), previous hidden state h(t-1) and previous memory s(t-1):

    g(t) = sigmoid(U^g x(t) + W^g h(t-1) + b^g)     input gate
    f(t) = sigmoid(U^f x(t) + W^f h(t-1) + b^f)     forget gate
    a(t) =         U   x(t) + W   h(t-1) + b        new content
    q(t) = sigmoid(U^o x(t) + W^o h(t-1) + b^o)     output gate
    s(t) = f(t) * s(t-1) + g(t) * tanh(a(t))        memory update
    h(t) = q(t) * tanh(s(t))                        hidden update

PyTorch stacks the four U matrices into `weight_ih` (4H x I) and the four W matrices into
`weight_hh` (4H x H). Its row blocks come in the order [g, f, a, q]; PyTorch's own documentation
calls the same blocks [i, f, g, o]. Each bias b is `bias_ih + bias_hh`, as in nn.LSTM.

With projections (proj_size P > 0; Sak, Senior and Beaufays, "Long Short-Term Memory Recurrent Neural
Network Architectures for Large Scale Acoustic Modeling", Interspeech 2014) the hidden state is
projected down to P units, and only the memory keeps H:

    h(t) = W_hr (q(t) * tanh(s(t)))                 projected hidden update

W_hr is `weight_hr_l{k}` (P x H); h(t), h_0 and each layer's output have P units, and W (`weight_hh`) is
4H x P. P = 0 (the default) means no projection.

`lstm_step` below is one step of these equations, as written, and the only place they are written in this
file. `LSTMCell` is nn.LSTMCell: one step from x(t). `LSTM` is nn.LSTM's multi-layer module: it computes
U x(t) + b for all time steps at once, then runs each layer and direction through time with `reference_loop`,
one `lstm_step` after another.

lstm_loops.py runs that same loop faster, and LSTM uses it whenever it can: a hand-written backward (two
autograd nodes per layer instead of a dozen per step), oneDNN's matrix multiplies on the CPU, and a loop
torch.compile can fuse for GPUs. It is handed `lstm_step` and `reference_loop` rather than importing them,
and the tests hold it to `reference_loop` in float64. `reference_loop` itself runs while torch.export traces
the model and when a gradient must be differentiated again. No built-in RNN kernel runs anywhere.
lstm_interface.py holds nn.LSTM's argument and shape checks and the forms of its inputs and outputs.
"""
import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import lstm_interface as interface
import lstm_loops


class CellValues(NamedTuple):
    """Every value of one time step, in the equations' letters (gates.py draws them)."""
    g: torch.Tensor  # input gate
    f: torch.Tensor  # forget gate
    a: torch.Tensor  # new content
    q: torch.Tensor  # output gate
    s: torch.Tensor  # memory
    h: torch.Tensor  # hidden state


def lstm_step(z_x, h_prev, s_prev, weight_hh, weight_hr=None):
    """One time step of the equations for a batch of rows: h(t-1), s(t-1) -> every value of step t.

    z_x is U x(t) + b, the four gates' share of the input, (B, 4H). It does not depend on h(t-1), so a
    whole sequence's z_x can be computed before its loop, in one large matrix multiply.
    """
    z = torch.addmm(z_x, h_prev, weight_hh.t())  # U x(t) + W h(t-1) + b: the four blocks side by side
    z_g, z_f, z_a, z_q = z.chunk(4, dim=1)       # PyTorch's row order: input, forget, content, output
    g = torch.sigmoid(z_g)                       # input gate
    f = torch.sigmoid(z_f)                       # forget gate
    a = z_a                                      # new content
    q = torch.sigmoid(z_q)                       # output gate
    s = f * s_prev + g * torch.tanh(a)           # memory update
    h = q * torch.tanh(s)                        # hidden update
    if weight_hr is not None:
        h = h @ weight_hr.t()                    # projected hidden update
    return CellValues(g, f, a, q, s, h)


def _init_uniform(module, hidden_size):
    """nn.LSTM's initialisation: every weight and bias from U(-1/sqrt(H), 1/sqrt(H))."""
    bound = 1.0 / math.sqrt(hidden_size) if hidden_size > 0 else 0
    for weight in module.parameters():
        nn.init.uniform_(weight, -bound, bound)


class LSTMCell(nn.Module):
    """nn.LSTMCell: one time step, `lstm_step` from the input x(t)."""

    def __init__(self, input_size, hidden_size, bias=True, device=None, dtype=None):
        super().__init__()
        self.input_size, self.hidden_size, self.bias = input_size, hidden_size, bias
        factory = dict(device=device, dtype=dtype)
        self.weight_ih = nn.Parameter(torch.empty(4 * hidden_size, input_size, **factory))  # U^g; U^f; U; U^o
        self.weight_hh = nn.Parameter(torch.empty(4 * hidden_size, hidden_size, **factory))  # W^g; W^f; W; W^o
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(4 * hidden_size, **factory))
            self.bias_hh = nn.Parameter(torch.empty(4 * hidden_size, **factory))
        else:
            self.register_parameter('bias_ih', None)
            self.register_parameter('bias_hh', None)
        self.reset_parameters()

    def reset_parameters(self):
        """Fresh weights, e.g. after building on the meta device and calling to_empty()."""
        _init_uniform(self, self.hidden_size)

    def extra_repr(self):
        return f'{self.input_size}, {self.hidden_size}' + ('' if self.bias else ', bias=False')

    def forward(self, input, hx=None):
        """(h(t), s(t)) from x(t) and hx = (h(t-1), s(t-1)), zeros when hx is None; batched or not."""
        values = self.step(input, hx)
        return values.h, values.s

    def step(self, input, hx=None):
        """Every value of the step, as CellValues."""
        x, (h_prev, s_prev), unbatched = interface.cell_inputs(self, input, hx)  # nn.LSTMCell's checks
        bias = self.bias_ih + self.bias_hh if self.bias else None
        values = lstm_step(F.linear(x, self.weight_ih, bias), h_prev, s_prev, self.weight_hh)
        return CellValues(*(value.squeeze(0) for value in values)) if unbatched else values


class LSTM(nn.Module):
    """Multi-layer LSTM with the arguments, parameter names, inputs and outputs of torch.nn.LSTM."""

    def __init__(self, input_size, hidden_size, num_layers=1, *args, **kwargs):
        """nn.LSTM's arguments: after the sizes, bias=True, batch_first=False, dropout=0.0, bidirectional=False,
        proj_size=0, device=None, dtype=None, by position or by name (lstm_interface.LSTMOptions)."""
        super().__init__()
        options = interface.LSTMOptions(*args, **kwargs)
        interface.check_lstm_arguments(input_size, hidden_size, num_layers, options)
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = options.bias, options.batch_first, float(options.dropout)
        self.bidirectional, self.proj_size = options.bidirectional, options.proj_size
        self.num_directions = 2 if self.bidirectional else 1
        self._compiled_steps, self.steps_per_call = None, 8  # set by compile_loop()
        factory = dict(device=options.device, dtype=options.dtype)
        out_size = self.proj_size or hidden_size  # the size of h
        self._all_weights = []
        for layer in range(num_layers):
            layer_input_size = input_size if layer == 0 else out_size * self.num_directions
            for direction in range(self.num_directions):
                suffix = self._suffix(layer, direction)
                shapes = {'weight_ih': (4 * hidden_size, layer_input_size), 'weight_hh': (4 * hidden_size, out_size)}
                if self.bias:
                    shapes.update(bias_ih=(4 * hidden_size,), bias_hh=(4 * hidden_size,))
                if self.proj_size > 0:
                    shapes['weight_hr'] = (self.proj_size, hidden_size)  # W_hr
                for name, shape in shapes.items():
                    self.register_parameter(name + suffix, nn.Parameter(torch.empty(shape, **factory)))
                self._all_weights.append([name + suffix for name in shapes])
        self.reset_parameters()

    @staticmethod
    def _suffix(layer, direction):
        """nn.LSTM's parameter-name suffix: _l0, _l0_reverse, _l1, ..."""
        return f'_l{layer}' + ('_reverse' if direction == 1 else '')

    def reset_parameters(self):
        """Fresh weights, e.g. after building on the meta device and calling to_empty()."""
        _init_uniform(self, self.hidden_size)

    @property
    def all_weights(self):
        """nn.LSTM's per-layer (and direction) lists: weight_ih, weight_hh[, bias_ih, bias_hh][, weight_hr]."""
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    def extra_repr(self):
        text = f'{self.input_size}, {self.hidden_size}'
        for name, default in (('proj_size', 0), ('num_layers', 1), ('bias', True), ('batch_first', False),
                              ('dropout', 0.0), ('bidirectional', False)):
            if getattr(self, name) != default:
                text += f', {name}={getattr(self, name)}'
        return text

    def flatten_parameters(self):
        """Kept so that code written for nn.LSTM runs unchanged; these weights need no flattening."""

    def compile_loop(self, steps_per_call=8, **compile_kwargs):
        """Run the time loop through torch.compile: on a GPU the plain loop is bound by kernel launches.

        torch.compile cannot trace the packed loop, whose number of steps and rows are data, so the
        compiled loop (lstm_loops.GridLoop) runs `steps_per_call` steps per call on a padded grid, the
        same shape whatever the captions' lengths. Inductor fuses each step's gate arithmetic into one
        kernel, and mode='reduce-overhead' replays each call as one CUDA graph. Inputs shorter than one
        call, such as decoding one word at a time, keep the plain loop. The keyword arguments go to
        torch.compile; the batch size is dynamic by default, so that a smaller last batch needs no second
        compile. torch.compile's backward cannot be differentiated again: no second-order gradients here.
        """
        self.steps_per_call = steps_per_call
        self._compiled_steps = lstm_loops.compile_steps(lstm_step, **{'dynamic': True, **compile_kwargs})

    def __getstate__(self):
        """A compiled function cannot be pickled: a copy runs the plain loop until compiled again."""
        return {**super().__getstate__(), '_compiled_steps': None}

    def forward(self, input, hx=None):
        rows = interface.input_rows(self, input)        # every time step's rows one after another
        h0, s0 = interface.initial_state(self, hx, rows)
        loops = self._time_loops(rows)                  # one per direction: forward, then backward in time
        layer_input, h_n, s_n = rows.data, [], []
        for layer in range(self.num_layers):
            if layer > 0 and self.dropout > 0 and self.training:
                layer_input = F.dropout(layer_input, self.dropout, training=True)
            outputs = []
            for direction, time_loop in enumerate(loops):
                weight_ih, weight_hh, bias, weight_hr = self.layer_weights(layer, direction)
                z_x = lstm_loops.input_projection(layer_input, weight_ih, bias)  # U x(t) + b, all steps at once
                index = layer * self.num_directions + direction
                h_all, h_last, s_last = time_loop(z_x, weight_hh, weight_hr, h0[index], s0[index])
                outputs.append(h_all)
                h_n.append(h_last)
                s_n.append(s_last)
            # Bidirectional: the next layer's input is both directions' h side by side.
            layer_input = torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]
        return interface.lstm_output(self, rows, layer_input, torch.stack(h_n), torch.stack(s_n))

    def layer_weights(self, layer, direction):
        """(U, W, b, W_hr) of one layer and direction; b and W_hr are None without bias or projection."""
        suffix = self._suffix(layer, direction)
        bias = getattr(self, 'bias_ih' + suffix) + getattr(self, 'bias_hh' + suffix) if self.bias else None
        weight_hr = getattr(self, 'weight_hr' + suffix) if self.proj_size > 0 else None
        return getattr(self, 'weight_ih' + suffix), getattr(self, 'weight_hh' + suffix), bias, weight_hr

    def _time_loops(self, rows):
        """The loop through time of each direction: reference_loop while torch.export traces the model (export.py),
        otherwise lstm_loops' fast form of it."""
        directions = range(self.num_directions)
        if lstm_loops.is_exporting():
            return [functools.partial(reference_loop, batch_sizes=rows.batch_sizes, reverse=direction == 1)
                    for direction in directions]
        return lstm_loops.time_loops(rows, self.num_directions, self._compiled_steps, self.steps_per_call,
                                     reference_loop)


def reference_loop(z_x, weight_hh, weight_hr, h0, s0, batch_sizes, reverse=False):
    """One layer in one direction through time, one `lstm_step` after another.

    z_x holds U x(t) + b for every time step's rows, one step after another, `batch_sizes[t]` rows at step t:
    the sequences still running, longest first (a PackedSequence's order). h0 and s0 hold every sequence's
    initial state. Returns h at every row, and each sequence's final h and s.

    h and s hold every sequence's current state. At step t its first batch_sizes[t] rows step on, and the rest
    keep theirs: going forward those sequences have ended, so they keep their final state; going backward (from
    the last step to the first) they have not started yet, so they keep their initial state.
    """
    starts = [0]
    for n in batch_sizes:
        starts.append(starts[-1] + n)
    h, s, h_rows = h0, s0, [None] * len(batch_sizes)
    times = range(len(batch_sizes))
    for t in reversed(times) if reverse else times:
        n = batch_sizes[t]
        step = lstm_step(z_x[starts[t]:starts[t + 1]], h[:n], s[:n], weight_hh, weight_hr)
        h_rows[t] = step.h
        h = step.h if n == len(h) else torch.cat([step.h, h[n:]])
        s = step.s if n == len(s) else torch.cat([step.s, s[n:]])
    return torch.cat(h_rows), h, s
