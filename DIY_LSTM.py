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

`LSTMCell` below is one step of these equations, as written. `LSTM` is nn.LSTM's multi-layer module: it
computes U x(t) + b for all steps at once, then runs each layer and direction through time. The loops
through time live in lstm_loops.py, because what makes them fast would hide the equations here: a
hand-written backward (two autograd nodes per layer instead of a dozen per step, second-order gradients
included), oneDNN's matrix multiplies on the CPU, and a loop torch.compile can fuse for GPUs. They run
the same equations in ordinary tensor operations, never a built-in RNN kernel.
"""
import math
import numbers
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from lstm_loops import input_projection, masked_steps, time_loops


def _init_uniform(module, hidden_size):
    """nn.LSTM's initialisation: every weight and bias from U(-1/sqrt(H), 1/sqrt(H))."""
    bound = 1.0 / math.sqrt(hidden_size) if hidden_size > 0 else 0
    for weight in module.parameters():
        nn.init.uniform_(weight, -bound, bound)


class LSTMCell(nn.Module):
    """One time step of the LSTM, in plain autograd ops: the equations exactly as written."""

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
        if input.dim() not in (1, 2):
            raise ValueError(f'LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead')
        for i, state in enumerate(hx or ()):
            if state.dim() not in (1, 2):
                raise ValueError(f'LSTMCell: Expected hx[{i}] to be 1D or 2D, got {state.dim()}D instead')
        unbatched = input.dim() == 1
        if unbatched:
            input = input.unsqueeze(0)
            hx = None if hx is None else (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        if hx is None:
            zeros = input.new_zeros(input.size(0), self.hidden_size)
            hx = (zeros, zeros)
        if input.size(1) != self.input_size:
            raise RuntimeError(f'input has inconsistent input_size: got {input.size(1)} expected {self.input_size}')
        for i, state in enumerate(hx):  # nn.LSTMCell's checks and wording
            if state.size(0) != input.size(0):
                raise RuntimeError(f"Input batch size {input.size(0)} doesn't match hidden{i} batch size "
                                   f"{state.size(0)}")
            if state.size(1) != self.hidden_size:
                raise RuntimeError(f'hidden{i} has inconsistent hidden_size: got {state.size(1)}, '
                                   f'expected {self.hidden_size}')
        h_prev, s_prev = hx
        g, f, a, q = self.gates(input, h_prev)
        s = f * s_prev + g * torch.tanh(a)      # memory update
        h = q * torch.tanh(s)                   # hidden update
        return (h.squeeze(0), s.squeeze(0)) if unbatched else (h, s)

    def gates(self, input, h_prev):
        """The input gate g, forget gate f, new content a and output gate q, for (B, I) input."""
        z = F.linear(input, self.weight_ih, self.bias_ih) + F.linear(h_prev, self.weight_hh, self.bias_hh)
        z_g, z_f, z_a, z_q = z.chunk(4, dim=1)  # PyTorch's row order: input, forget, content, output
        g = torch.sigmoid(z_g)                  # input gate
        f = torch.sigmoid(z_f)                  # forget gate
        a = z_a                                 # new content
        q = torch.sigmoid(z_q)                  # output gate
        return g, f, a, q


class LSTM(nn.Module):
    """Multi-layer LSTM with the arguments, parameter names, inputs and outputs of torch.nn.LSTM."""

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, proj_size=0, device=None, dtype=None):
        super().__init__()
        # nn.LSTM's checks, exception types and wording.
        if not isinstance(dropout, numbers.Number) or isinstance(dropout, bool) or not 0 <= dropout <= 1:
            raise ValueError('dropout should be a number in range [0, 1] representing the probability '
                             'of an element being zeroed')
        if dropout > 0 and num_layers == 1:
            warnings.warn('dropout option adds dropout after all but last recurrent layer, so non-zero '
                          f'dropout expects num_layers greater than 1, but got dropout={dropout} and '
                          f'num_layers={num_layers}', stacklevel=2)
        for name, value, kind in (('bias', bias, bool), ('batch_first', batch_first, bool),
                                  ('input_size', input_size, int), ('hidden_size', hidden_size, int),
                                  ('num_layers', num_layers, int), ('proj_size', proj_size, int)):
            if not isinstance(value, kind):
                raise TypeError(f'{name} should be of type {kind.__name__}, got: {type(value).__name__}')
        for name, value in (('input_size', input_size), ('hidden_size', hidden_size), ('num_layers', num_layers)):
            if value <= 0:
                raise ValueError(f'{name} must be greater than zero')
        if proj_size < 0:
            raise ValueError('proj_size should be a positive integer or zero to disable projections')
        if proj_size >= hidden_size:
            raise ValueError('proj_size has to be smaller than hidden_size')
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional, self.proj_size = bidirectional, proj_size
        self.num_directions = 2 if bidirectional else 1
        self._compiled_steps, self.steps_per_call = None, 8  # set by compile_loop()
        factory = dict(device=device, dtype=dtype)
        out_size = proj_size or hidden_size  # the size of h
        self._all_weights = []
        for layer in range(num_layers):
            layer_input_size = input_size if layer == 0 else out_size * self.num_directions
            for direction in range(self.num_directions):
                suffix = self._suffix(layer, direction)
                shapes = {'weight_ih': (4 * hidden_size, layer_input_size), 'weight_hh': (4 * hidden_size, out_size)}
                if bias:
                    shapes.update(bias_ih=(4 * hidden_size,), bias_hh=(4 * hidden_size,))
                if proj_size > 0:
                    shapes['weight_hr'] = (proj_size, hidden_size)  # W_hr
                for name, shape in shapes.items():
                    self.register_parameter(name + suffix, nn.Parameter(torch.empty(shape, **factory)))
                self._all_weights.append([name + suffix for name in shapes])
        self.reset_parameters()

    @staticmethod
    def _suffix(layer, direction):
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
        self._compiled_steps = torch.compile(masked_steps, **{'dynamic': True, **compile_kwargs})

    def __getstate__(self):
        """A compiled function cannot be pickled: a copy runs the plain loop until compiled again."""
        return {**super().__getstate__(), '_compiled_steps': None}

    def forward(self, input, hx=None):
        packed = isinstance(input, PackedSequence)
        if packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            batch_sizes = batch_sizes.tolist()
            unbatched = False
        else:
            data, unbatched, (seq_len, batch) = self._time_major_rows(input)
            batch_sizes, sorted_indices, unsorted_indices = [batch] * seq_len, None, None
        self._check_input(data)
        h0, s0 = self._initial_state(hx, batch_sizes[0], data, unbatched, sorted_indices)

        # The time loop of each direction, the same for every layer (lstm_loops.py).
        loops = time_loops(batch_sizes, packed, self.num_directions, data.device, self._compiled_steps,
                           self.steps_per_call)
        layer_input, h_n, s_n = data, [], []
        for layer in range(self.num_layers):
            if layer > 0 and self.dropout > 0 and self.training:
                layer_input = F.dropout(layer_input, self.dropout, training=True)
            outputs = []
            for direction, time_loop in enumerate(loops):
                suffix, index = self._suffix(layer, direction), layer * self.num_directions + direction
                bias = getattr(self, 'bias_ih' + suffix) + getattr(self, 'bias_hh' + suffix) if self.bias else None
                z_x = input_projection(layer_input, getattr(self, 'weight_ih' + suffix), bias)  # all steps at once
                weight_hr = getattr(self, 'weight_hr' + suffix) if self.proj_size > 0 else None
                h_all, h_last, s_last = time_loop(z_x, getattr(self, 'weight_hh' + suffix), weight_hr,
                                                  h0[index], s0[index])
                h_n.append(h_last)
                s_n.append(s_last)
                outputs.append(h_all)
            # Bidirectional: the next layer's input is both directions' h side by side.
            layer_input = torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]
        h_n, s_n = torch.stack(h_n), torch.stack(s_n)  # final states, (layers * directions, batch, P or H)

        if packed:
            if unsorted_indices is not None:
                h_n, s_n = h_n.index_select(1, unsorted_indices), s_n.index_select(1, unsorted_indices)
            return PackedSequence(layer_input, input.batch_sizes, sorted_indices, unsorted_indices), (h_n, s_n)
        output = layer_input.view(seq_len, batch, layer_input.size(1))
        if unbatched:
            return output.squeeze(1), (h_n.squeeze(1), s_n.squeeze(1))
        return (output.transpose(0, 1) if self.batch_first else output), (h_n, s_n)

    def _time_major_rows(self, input):
        """A plain input as (time x batch) rows of features, whether it was unbatched, and (steps, batch)."""
        if input.dim() not in (2, 3):
            raise ValueError(f'LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead')
        unbatched = input.dim() == 2
        if unbatched:
            input = input.unsqueeze(1)
        elif self.batch_first:
            input = input.transpose(0, 1)
        seq_len, batch = input.shape[:2]
        if seq_len == 0:
            raise RuntimeError('Expected sequence length to be larger than 0 in RNN')
        return input.reshape(seq_len * batch, input.size(2)), unbatched, (seq_len, batch)

    def _check_input(self, data):
        if data.dim() != 2:
            raise RuntimeError(f'packed input must have 2 dimensions, got {data.dim()}')
        if data.size(1) != self.input_size:
            raise RuntimeError(f'input.size(-1) must be equal to input_size. Expected {self.input_size}, '
                               f'got {data.size(1)}')
        weight = self.weight_ih_l0
        if data.dtype != weight.dtype and not torch.is_autocast_enabled(data.device.type):
            raise ValueError(f'RNN input dtype ({data.dtype}) does not match weight dtype ({weight.dtype}). '
                             f'Convert input: input.to({weight.dtype}), or convert model: model.to({data.dtype})')

    def _initial_state(self, hx, batch, data, unbatched, sorted_indices):
        """(h_0, c_0) as (layers * directions, batch, P or H) and (..., H), in the packed batch's sorted order."""
        layers = self.num_layers * self.num_directions
        shapes = ((layers, batch, self.proj_size or self.hidden_size), (layers, batch, self.hidden_size))
        if hx is None:
            return tuple(data.new_zeros(shape) for shape in shapes)
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            raise TypeError('LSTM: hx must be a tuple (h_0, c_0)')
        want = 2 if unbatched else 3
        if hx[0].dim() != want or hx[1].dim() != want:
            kind = 'unbatched 2-D' if unbatched else 'batched 3-D'
            raise RuntimeError(f'For {kind} input, hx and cx should also be {want}-D but got '
                               f'({hx[0].dim()}-D, {hx[1].dim()}-D) tensors')
        if unbatched:
            hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
        for i, (state, shape) in enumerate(zip(hx, shapes)):
            if tuple(state.shape) != shape:
                raise RuntimeError(f'Expected hidden[{i}] size {shape}, got {list(state.shape)}')
            if state.dtype != data.dtype and not torch.is_autocast_enabled(data.device.type):
                raise RuntimeError(f'LSTM hx dtype ({state.dtype}) does not match input dtype ({data.dtype}): '
                                   f'convert hx: hx[{i}].to({data.dtype})')
        if sorted_indices is not None:
            hx = (hx[0].index_select(1, sorted_indices), hx[1].index_select(1, sorted_indices))
        return hx
