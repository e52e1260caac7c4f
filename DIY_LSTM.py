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
"""
import functools
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence


def _init_uniform(module, hidden_size):
    """nn.LSTM's initialisation: every weight and bias from U(-1/sqrt(H), 1/sqrt(H))."""
    bound = 1.0 / math.sqrt(hidden_size)
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
        _init_uniform(self, hidden_size)

    def extra_repr(self):
        return f'{self.input_size}, {self.hidden_size}' + ('' if self.bias else ', bias=False')

    def forward(self, input, hx=None):
        if input.dim() not in (1, 2):
            raise ValueError(f'LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead')
        unbatched = input.dim() == 1
        if unbatched:
            input = input.unsqueeze(0)
            hx = None if hx is None else (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        if hx is None:
            zeros = input.new_zeros(input.size(0), self.hidden_size)
            hx = (zeros, zeros)
        h_prev, s_prev = hx
        if s_prev.shape != h_prev.shape:
            raise RuntimeError(f'LSTMCell: Expected cell state of size {list(h_prev.shape)}, got {list(s_prev.shape)}')
        g, f, a, q = self.gates(input, h_prev)
        s = f * s_prev + g * torch.tanh(a)      # memory update
        h = q * torch.tanh(s)                   # hidden update
        return (h.squeeze(0), s.squeeze(0)) if unbatched else (h, s)

    def gates(self, input, h_prev):
        """The input gate g, forget gate f, new content a and output gate q, for (B, I) input."""
        if input.size(-1) != self.input_size:
            raise RuntimeError(f'input has inconsistent input_size: got {input.size(-1)} expected {self.input_size}')
        if tuple(h_prev.shape) != (input.size(0), self.hidden_size):
            raise RuntimeError(f'LSTMCell: Expected hidden state of size {(input.size(0), self.hidden_size)}, '
                               f'got {list(h_prev.shape)}')
        z = F.linear(input, self.weight_ih, self.bias_ih) + F.linear(h_prev, self.weight_hh, self.bias_hh)
        z_g, z_f, z_a, z_q = z.chunk(4, dim=1)  # PyTorch's row order: input, forget, content, output
        g = torch.sigmoid(z_g)                  # input gate
        f = torch.sigmoid(z_f)                  # forget gate
        a = z_a                                 # new content
        q = torch.sigmoid(z_q)                  # output gate
        return g, f, a, q


def _schedule(batch_sizes, reverse):
    """The order in which to visit the time steps of a packed batch.

    Packed data stores time step t as `batch_sizes[t]` consecutive rows, longest sequences first.
    Each entry is (first row, rows in this step, rows whose previous state comes from the step
    visited just before, that step's first row); the remaining rows start from the initial state.
    Going forward the batch only shrinks, so every row carries on; going backward it grows and
    new sequences join.
    """
    starts = [0]
    for n in batch_sizes[:-1]:
        starts.append(starts[-1] + n)
    order = range(len(batch_sizes) - 1, -1, -1) if reverse else range(len(batch_sizes))
    steps, prev_n, prev_start = [], 0, 0
    for t in order:
        n = batch_sizes[t]
        steps.append((starts[t], n, min(n, prev_n), prev_start))
        prev_n, prev_start = n, starts[t]
    return steps


def _previous(all_rows, initial, n, carried, prev_start):
    """The state each of a step's n rows starts from: the step before, or the initial state."""
    if carried == n:
        return all_rows[prev_start:prev_start + n]
    if carried == 0:
        return initial[:n]
    return torch.cat([all_rows[prev_start:prev_start + carried], initial[carried:n]])


class _Recurrence(torch.autograd.Function):
    """The time loop of one layer in one direction, with a hand-written backward.

    Input: `z_x`, the input projection U x(t) + b for every row of the packed data, computed
    before the loop in one matrix multiply. Output: h(t) and s(t) for every row. Each step writes
    into preallocated buffers, and the backward runs its own loop, so autograd records two nodes
    per layer instead of a dozen per time step.
    """

    @staticmethod
    def forward(ctx, z_x, weight_hh, h0, s0, batch_sizes, reverse):
        ctx.set_materialize_grads(False)
        hidden = weight_hh.size(1)
        steps = _schedule(batch_sizes, reverse)
        gates = torch.empty_like(z_x)  # per row: g, f, tanh(a), q
        h_all, s_all, tanh_s_all = (z_x.new_empty(z_x.size(0), hidden) for _ in range(3))
        times_w_hh = _weight_product(weight_hh, steps)
        for start, n, carried, prev_start in steps:
            rows = slice(start, start + n)
            h_prev = _previous(h_all, h0, n, carried, prev_start)
            s_prev = _previous(s_all, s0, n, carried, prev_start)

            z, y = times_w_hh(h_prev, add=z_x[rows]), gates[rows]  # z = U x(t) + W h(t-1) + b, all four gates
            torch.sigmoid(z[:, :2 * hidden], out=y[:, :2 * hidden])                       # g and f
            torch.tanh(z[:, 2 * hidden:3 * hidden], out=y[:, 2 * hidden:3 * hidden])     # tanh(a)
            torch.sigmoid(z[:, 3 * hidden:], out=y[:, 3 * hidden:])                       # q
            g, f, tanh_a, q = y.chunk(4, dim=1)

            s = torch.mul(f, s_prev, out=s_all[rows]).addcmul_(g, tanh_a)  # s(t) = f * s(t-1) + g * tanh(a)
            tanh_s = torch.tanh(s, out=tanh_s_all[rows])
            torch.mul(q, tanh_s, out=h_all[rows])                          # h(t) = q * tanh(s(t))

        ctx.save_for_backward(gates, h_all, s_all, tanh_s_all, weight_hh, h0, s0)
        ctx.steps = steps
        return h_all, s_all

    @staticmethod
    def backward(ctx, grad_h_all, grad_s_all):
        gates, h_all, s_all, tanh_s_all, weight_hh, h0, s0 = ctx.saved_tensors
        hidden = weight_hh.size(1)
        # dh and ds gather what later steps send back, so they start as the outputs' own gradients.
        dh_all = torch.zeros_like(h_all) if grad_h_all is None else grad_h_all.contiguous().clone()
        ds_all = torch.zeros_like(s_all) if grad_s_all is None else grad_s_all.contiguous().clone()
        dz_all = torch.empty_like(gates)  # dL/dz for every row; z = z_x + W h_prev, so also dL/dz_x
        dh0, ds0 = torch.zeros_like(h0), torch.zeros_like(s0)
        times_w_hh_t = _weight_product(weight_hh.t(), ctx.steps)
        for start, n, carried, prev_start in reversed(ctx.steps):
            rows = slice(start, start + n)
            g, f, tanh_a, q = gates[rows].chunk(4, dim=1)
            tanh_s = tanh_s_all[rows]
            dh, ds, dz = dh_all[rows], ds_all[rows], dz_all[rows]
            dz_g, dz_f, dz_a, dz_q = dz.chunk(4, dim=1)

            # h = q * tanh(s)
            torch.mul(dh, tanh_s, out=dz_q)                       # dL/dq
            ds += _tanh_backward(dh * q, tanh_s)                  # dL/ds, through tanh(s)
            # s = f * s_prev + g * tanh(a)
            torch.mul(ds, tanh_a, out=dz_g)                       # dL/dg
            torch.mul(ds, _previous(s_all, s0, n, carried, prev_start), out=dz_f)  # dL/df
            torch.mul(ds, g, out=dz_a)                            # dL/d tanh(a)
            # Through the activations, sigmoid' = y (1 - y) and tanh' = 1 - y^2, in place.
            _sigmoid_backward(dz[:, :2 * hidden], gates[rows][:, :2 * hidden])  # g and f
            _tanh_backward(dz_a, tanh_a, out=dz_a)
            _sigmoid_backward(dz_q, q)

            # z = z_x + W h_prev: dL/dh_prev = dz W and dL/ds_prev = ds * f go back to the rows the
            # previous state came from.
            previous = slice(prev_start, prev_start + carried)
            dh_all[previous].add_(times_w_hh_t(dz[:carried]))
            ds_all[previous].addcmul_(ds[:carried], f[:carried])
            if carried < n:
                dh0[carried:n] = times_w_hh_t(dz[carried:])
                ds0[carried:n] = ds[carried:] * f[carried:]
        # W's gradient, sum over steps of dz(t)^T h(t-1), as one matrix multiply.
        h_prev_all = torch.cat([_previous(h_all, h0, *step[1:]) for step in sorted(ctx.steps)])
        grad_w_hh = dz_all.t() @ h_prev_all if ctx.needs_input_grad[1] else None
        return dz_all, grad_w_hh, dh0, ds0, None, None


def _weight_product(weight, steps):
    """x -> x W^T, or add + x W^T, for a loop that multiplies by the same W at every step.

    One step's product, (batch x H) by (H x 4H), is most of the loop's time. PyTorch sends float32
    matrix multiplies to MKL, whose sgemm takes a slower code path on some CPUs (AMD's among them)
    than oneDNN's matmul, the library behind nn.LSTM on the CPU. oneDNN's matmul is reachable only
    through the private operators in torch.ops.mkldnn, so they are used when _onednn_matmul() finds
    them working; otherwise, and for other dtypes and devices, plain addmm. A loop of several steps
    first reorders W into oneDNN's blocked layout, once: that costs about one step and saves a little
    on every step.
    """
    if not _onednn_matmul(weight):
        w_t = weight.t()
        return lambda x, add=None: torch.mm(x, w_t) if add is None else torch.addmm(add, x, w_t)
    if len(steps) >= 4:
        weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), steps[0][1])

    def product(x, add=None):
        if add is None:
            return torch.ops.mkldnn._linear_pointwise(x, weight, None, 'none', [], '')
        return torch.ops.mkldnn._linear_pointwise.binary(x, add, weight, None, 'add')
    return product


def _input_product(x, weight, bias):
    """U x + b for every row at once: through oneDNN, as in _weight_product, when no gradient is recorded."""
    if not torch.is_autocast_enabled(x.device.type) and _onednn_matmul(weight):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, 'none', [], '')
    return F.linear(x, weight, bias)


def _onednn_matmul(weight):
    """Whether _weight_product may use oneDNN for this weight; torch.backends.mkldnn.enabled = False turns it off.

    The private operators have no derivative, so not while autograd records (a double backward), and
    not while torch.compile or torch.export traces, so that their graphs hold only public operators.
    """
    return (weight.device.type == 'cpu' and weight.dtype == torch.float32 and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling() and torch.backends.mkldnn.enabled and _onednn_ops_work())


@functools.cache
def _onednn_ops_work():
    """Checked once: the private operators exist in this PyTorch build, take these arguments and multiply right."""
    try:
        x = torch.linspace(-1, 1, 15, dtype=torch.float32).view(3, 5)  # no random numbers: leave the seed alone
        w = torch.linspace(-2, 1, 20, dtype=torch.float32).view(4, 5)
        add, packed = x[:, :4].contiguous(), torch.ops.mkldnn._reorder_linear_weight(w, 3)
        y = torch.ops.mkldnn._linear_pointwise.binary(x, add, packed, None, 'add')
        y_t = torch.ops.mkldnn._linear_pointwise(add, w.t(), None, 'none', [], '')  # W^T unpacked, as a view
        return torch.allclose(y, add + x @ w.t(), atol=1e-5) and torch.allclose(y_t, add @ w, atol=1e-5)
    except (AttributeError, RuntimeError, TypeError):
        return False


def _sigmoid_backward(grad, y):
    """grad * y * (1 - y) in one pass, written into grad."""
    return torch.ops.aten.sigmoid_backward.grad_input(grad, y, grad_input=grad)


def _tanh_backward(grad, y, out=None):
    """grad * (1 - y^2) in one pass."""
    if out is None:
        return torch.ops.aten.tanh_backward(grad, y)
    return torch.ops.aten.tanh_backward.grad_input(grad, y, grad_input=out)


def _masked_steps(z_x, running, weight_hh, h, s):
    """A few time steps of the equations on a padded batch, in plain ops for torch.compile to fuse.

    z_x is (steps, B, 4H) and running is (steps, B, 1). A row that is not running (past the end of
    its caption, or not yet started when going backward) keeps its state, so each row finishes with
    its own last state and the padding changes no output or gradient.
    """
    outputs = []
    for z_x_t, running_t in zip(z_x, running):
        z = torch.addmm(z_x_t, h, weight_hh.t())            # U x(t) + W h(t-1) + b, all four gates
        z_g, z_f, z_a, z_q = z.chunk(4, dim=1)
        g, f, q = torch.sigmoid(z_g), torch.sigmoid(z_f), torch.sigmoid(z_q)
        s = torch.where(running_t, f * s + g * torch.tanh(z_a), s)  # memory update
        h = torch.where(running_t, q * torch.tanh(s), h)            # hidden update
        outputs.append(h)
    return torch.stack(outputs), h, s


class LSTM(nn.Module):
    """Multi-layer LSTM with the arguments, parameter names, inputs and outputs of torch.nn.LSTM."""

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, device=None, dtype=None):
        super().__init__()
        if not 0 <= dropout <= 1 or isinstance(dropout, bool):
            raise ValueError('dropout should be a number in range [0, 1] representing the probability '
                             'of an element being zeroed')
        if hidden_size <= 0 or num_layers <= 0:
            raise ValueError('hidden_size and num_layers must be greater than zero')
        if dropout > 0 and num_layers == 1:
            warnings.warn('dropout option adds dropout after all but last recurrent layer, so non-zero '
                          f'dropout expects num_layers greater than 1, but got dropout={dropout} and '
                          f'num_layers={num_layers}')
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional = bidirectional
        self.num_directions = 2 if bidirectional else 1
        self._compiled_steps, self.steps_per_call = None, 8  # set by compile_loop()
        factory = dict(device=device, dtype=dtype)
        for layer in range(num_layers):
            layer_input_size = input_size if layer == 0 else hidden_size * self.num_directions
            for direction in range(self.num_directions):
                suffix = self._suffix(layer, direction)
                self.register_parameter('weight_ih' + suffix, nn.Parameter(
                    torch.empty(4 * hidden_size, layer_input_size, **factory)))
                self.register_parameter('weight_hh' + suffix, nn.Parameter(
                    torch.empty(4 * hidden_size, hidden_size, **factory)))
                if bias:
                    self.register_parameter('bias_ih' + suffix, nn.Parameter(torch.empty(4 * hidden_size, **factory)))
                    self.register_parameter('bias_hh' + suffix, nn.Parameter(torch.empty(4 * hidden_size, **factory)))
        _init_uniform(self, hidden_size)

    @staticmethod
    def _suffix(layer, direction):
        return f'_l{layer}' + ('_reverse' if direction == 1 else '')

    def extra_repr(self):
        text = f'{self.input_size}, {self.hidden_size}'
        for name, default in (('num_layers', 1), ('bias', True), ('batch_first', False),
                              ('dropout', 0.0), ('bidirectional', False)):
            if getattr(self, name) != default:
                text += f', {name}={getattr(self, name)}'
        return text

    def flatten_parameters(self):
        """Kept so that code written for nn.LSTM runs unchanged; these weights need no flattening."""

    def compile_loop(self, steps_per_call=8, **compile_kwargs):
        """Run the time loop through torch.compile: on a GPU the plain loop is bound by kernel launches.

        torch.compile cannot trace the packed loop, whose number of steps and rows are data, so the
        compiled loop runs `steps_per_call` steps per call on a padded grid, the same shape whatever
        the captions' lengths. Inductor fuses each step's gate arithmetic into one kernel, and
        mode='reduce-overhead' replays each call as one CUDA graph. Inputs shorter than one call, such
        as decoding one word at a time, keep the plain loop. The keyword arguments go to torch.compile;
        the batch size is dynamic by default, so that a smaller last batch needs no second compile.
        """
        self.steps_per_call = steps_per_call
        self._compiled_steps = torch.compile(_masked_steps, **{'dynamic': True, **compile_kwargs})

    def __getstate__(self):
        """A compiled function cannot be pickled: a copy runs the plain loop until compiled again."""
        return {**super().__getstate__(), '_compiled_steps': None}

    def forward(self, input, hx=None):
        if isinstance(input, PackedSequence):
            data, batch_sizes, sorted_indices, unsorted_indices = input
            batch_sizes = batch_sizes.tolist()
            unbatched = False
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f'LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead')
            unbatched = input.dim() == 2
            if unbatched:
                input = input.unsqueeze(1)
            elif self.batch_first:
                input = input.transpose(0, 1)
            seq_len, batch = input.shape[:2]
            data = input.reshape(seq_len * batch, input.size(2))
            batch_sizes, sorted_indices, unsorted_indices = [batch] * seq_len, None, None
        batch = batch_sizes[0] if batch_sizes else 0
        self._check_input(data)
        h0, s0 = self._initial_state(hx, batch, data, unbatched, sorted_indices)

        compiled = self._compiled_steps is not None and len(batch_sizes) >= self.steps_per_call
        if compiled:
            grids = [self._grid(batch_sizes, direction == 1, data.device) for direction in range(self.num_directions)]
        else:
            last_rows = self._last_rows(batch_sizes, data.device)
        layer_input, h_n, s_n = data, [], []
        for layer in range(self.num_layers):
            if layer > 0 and self.dropout > 0 and self.training:
                layer_input = F.dropout(layer_input, self.dropout, training=True)
            outputs = []
            for direction in range(self.num_directions):
                suffix, index = self._suffix(layer, direction), layer * self.num_directions + direction
                bias = getattr(self, 'bias_ih' + suffix) + getattr(self, 'bias_hh' + suffix) if self.bias else None
                z_x = _input_product(layer_input, getattr(self, 'weight_ih' + suffix), bias)  # all steps at once
                weight_hh, h_init, s_init = getattr(self, 'weight_hh' + suffix), h0[index], s0[index]
                if z_x.dtype != weight_hh.dtype:  # under autocast: the whole loop runs in its lower precision
                    weight_hh, h_init, s_init = (t.to(z_x.dtype) for t in (weight_hh, h_init, s_init))
                with torch.autocast(data.device.type, enabled=False):
                    if compiled:
                        h_all, h_last, s_last = self._compiled_loop(z_x, weight_hh, h_init, s_init, *grids[direction])
                    else:
                        h_all, s_all = _Recurrence.apply(z_x, weight_hh, h_init, s_init, batch_sizes, direction == 1)
                        h_last, s_last = h_all[last_rows[direction]], s_all[last_rows[direction]]
                h_n.append(h_last)
                s_n.append(s_last)
                outputs.append(h_all)
            layer_input = torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]
        h_n, s_n = torch.stack(h_n), torch.stack(s_n)

        if isinstance(input, PackedSequence):
            if unsorted_indices is not None:
                h_n, s_n = h_n.index_select(1, unsorted_indices), s_n.index_select(1, unsorted_indices)
            return PackedSequence(layer_input, input.batch_sizes, sorted_indices, unsorted_indices), (h_n, s_n)
        output = layer_input.view(seq_len, batch, -1)
        if unbatched:
            return output.squeeze(1), (h_n.squeeze(1), s_n.squeeze(1))
        return (output.transpose(0, 1) if self.batch_first else output), (h_n, s_n)

    def _check_input(self, data):
        if data.dim() != 2:
            raise RuntimeError(f'packed input must have 2 dimensions, got {data.dim()}')
        if data.size(1) != self.input_size:
            raise RuntimeError(f'input.size(-1) must be equal to input_size. Expected {self.input_size}, '
                               f'got {data.size(1)}')
        weight = self.weight_ih_l0
        if data.dtype != weight.dtype and not torch.is_autocast_enabled(data.device.type):
            raise ValueError(f'LSTM input dtype ({data.dtype}) does not match weight dtype ({weight.dtype}). '
                             f'Convert input: input.to({weight.dtype}), or convert model: model.to({data.dtype})')

    def _initial_state(self, hx, batch, data, unbatched, sorted_indices):
        """(h_0, c_0) as (layers * directions, batch, H), in the packed batch's sorted order."""
        shape = (self.num_layers * self.num_directions, batch, self.hidden_size)
        if hx is None:
            zeros = data.new_zeros(shape)
            return zeros, zeros
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            raise TypeError('LSTM: hx must be a tuple (h_0, c_0)')
        want = 2 if unbatched else 3
        if hx[0].dim() != want or hx[1].dim() != want:
            kind = 'unbatched 2-D' if unbatched else 'batched 3-D'
            raise RuntimeError(f'For {kind} input, hx and cx should also be {want}-D but got '
                               f'({hx[0].dim()}-D, {hx[1].dim()}-D) tensors')
        if unbatched:
            hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
        for i, state in enumerate(hx):
            if tuple(state.shape) != shape:
                raise RuntimeError(f'Expected hidden[{i}] size {shape}, got {list(state.shape)}')
            if state.dtype != data.dtype and not torch.is_autocast_enabled(data.device.type):
                raise ValueError(f'LSTM hx dtype ({state.dtype}) does not match input dtype ({data.dtype})')
        if sorted_indices is not None:
            hx = (hx[0].index_select(1, sorted_indices), hx[1].index_select(1, sorted_indices))
        return hx

    def _grid(self, batch_sizes, reverse, device):
        """Where the compiled loop puts each packed row, and which cells of its grid are running.

        The grid has a whole number of calls' worth of steps, times the batch. Going backward, time
        is flipped, so that the compiled steps always run forward.
        """
        steps, batch = len(batch_sizes), batch_sizes[0]
        padded_steps = math.ceil(steps / self.steps_per_call) * self.steps_per_call
        time, sequence = torch.arange(steps).view(-1, 1), torch.arange(batch).view(1, -1)
        in_packed_data = sequence < torch.tensor(batch_sizes).view(-1, 1)  # row-major order is the packed order
        grid_step = steps - 1 - time if reverse else time
        cells = (grid_step * batch + sequence)[in_packed_data]
        running = torch.zeros(padded_steps * batch, dtype=torch.bool)
        running[cells] = True
        return cells.to(device), running.view(padded_steps, batch, 1).to(device)

    def _compiled_loop(self, z_x, weight_hh, h0, s0, cells, running):
        """The loop of compile_loop(): scatter the packed rows into the grid, run the steps, gather them back."""
        grid = z_x.new_zeros(running.numel(), z_x.size(1)).index_copy(0, cells, z_x)
        grid = grid.view(*running.shape[:2], -1)
        h, s, outputs = h0, s0, []
        for grid_part, running_part in zip(grid.split(self.steps_per_call), running.split(self.steps_per_call)):
            h_steps, h, s = self._compiled_steps(grid_part, running_part, weight_hh, h, s)
            if not h.requires_grad:
                # No gradient, so no backward is pending: with mode='reduce-overhead' the next call
                # then replays the same CUDA graph into the memory of this call's outputs. Keep copies.
                h_steps, h, s = h_steps.clone(), h.clone(), s.clone()
            outputs.append(h_steps)
        h_all = torch.cat(outputs).view(running.numel(), -1).index_select(0, cells)
        return h_all, h, s

    @staticmethod
    def _last_rows(batch_sizes, device):
        """Rows of the packed output holding each sequence's final state, per direction.

        Going forward, sequence j ends at step length_j - 1; going backward it ends at step 0.
        """
        sizes = torch.tensor(batch_sizes, dtype=torch.long)
        batch = int(sizes[0]) if len(batch_sizes) else 0
        sequence = torch.arange(batch)
        lengths = (sizes.unsqueeze(0) > sequence.unsqueeze(1)).sum(1)
        starts = torch.cumsum(sizes, 0) - sizes
        forward = starts[lengths - 1] + sequence
        return forward.to(device), sequence.to(device)
