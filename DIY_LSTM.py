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

Second-order gradients (a gradient penalty, gradgradcheck): the hand-written backward is the fast way to
get first-order gradients. When the backward itself must be differentiated (create_graph=True), it runs
the loop again in plain autograd ops and differentiates that instead.
"""
import contextlib
import functools
import math
import numbers
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence


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


_is_exporting = getattr(torch.compiler, 'is_exporting', lambda: False)  # torch >= 2.6


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


def _forward_loop(z_x, weight_hh, weight_hr, h0, s0, steps):
    """The time loop of one layer in one direction, writing every step into preallocated buffers.

    Input: `z_x`, the input projection U x(t) + b for every row of the packed data, computed before
    the loop in one matrix multiply. Returns the buffers: per row g, f, tanh(a) and q (`gates`), q * tanh(s)
    (`m_all`, the same tensor as `h_all` without a projection), h(t), s(t) and tanh(s(t)).
    """
    hidden = weight_hh.size(0) // 4
    gates = torch.empty_like(z_x)  # per row: g, f, tanh(a), q
    s_all, tanh_s_all = (z_x.new_empty(z_x.size(0), hidden) for _ in range(2))
    h_all = z_x.new_empty(z_x.size(0), weight_hh.size(1))
    m_all = h_all if weight_hr is None else z_x.new_empty(z_x.size(0), hidden)
    times_w_hh = _weight_product(weight_hh, steps)
    times_w_hr = None if weight_hr is None else _weight_product(weight_hr, steps)
    for start, n, carried, prev_start in steps:
        rows = slice(start, start + n)
        h_prev = _previous(h_all, h0, n, carried, prev_start)
        s_prev = _previous(s_all, s0, n, carried, prev_start)

        z, y = times_w_hh(h_prev, add=z_x[rows]), gates[rows]  # z = U x(t) + W h(t-1) + b, all four gates
        torch.sigmoid(z[:, :2 * hidden], out=y[:, :2 * hidden])                    # g and f
        torch.tanh(z[:, 2 * hidden:3 * hidden], out=y[:, 2 * hidden:3 * hidden])  # tanh(a)
        torch.sigmoid(z[:, 3 * hidden:], out=y[:, 3 * hidden:])                    # q
        g, f, tanh_a, q = y.chunk(4, dim=1)

        s = torch.mul(f, s_prev, out=s_all[rows]).addcmul_(g, tanh_a)  # s(t) = f * s(t-1) + g * tanh(a)
        tanh_s = torch.tanh(s, out=tanh_s_all[rows])
        m = torch.mul(q, tanh_s, out=m_all[rows])                      # h(t) = q * tanh(s(t))
        if weight_hr is not None:
            h_all[rows] = times_w_hr(m)                                 # h(t) = W_hr (q * tanh(s(t)))
    return gates, m_all, h_all, s_all, tanh_s_all


class _Recurrence(torch.autograd.Function):
    """_forward_loop with a hand-written backward.

    Autograd records two nodes per layer instead of a dozen per time step, and the backward runs its
    own loop. Only when the backward must itself be differentiated does it fall back to autograd.
    """

    @staticmethod
    def forward(ctx, z_x, weight_hh, weight_hr, h0, s0, steps):
        ctx.set_materialize_grads(False)
        gates, m_all, h_all, s_all, tanh_s_all = _forward_loop(z_x, weight_hh, weight_hr, h0, s0, steps)
        ctx.save_for_backward(z_x, gates, None if weight_hr is None else m_all, h_all, s_all, tanh_s_all,
                              weight_hh, weight_hr, h0, s0)
        ctx.steps = steps
        return h_all, s_all

    @staticmethod
    def backward(ctx, grad_h_all, grad_s_all):
        z_x, gates, m_all, h_all, s_all, tanh_s_all, weight_hh, weight_hr, h0, s0 = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the gradients themselves need gradients
            return _differentiable_backward(ctx, (z_x, weight_hh, weight_hr, h0, s0), grad_h_all, grad_s_all)
        hidden = weight_hh.size(0) // 4
        # dh and ds gather what later steps send back, so they start as the outputs' own gradients.
        dh_all = torch.zeros_like(h_all) if grad_h_all is None else grad_h_all.contiguous().clone()
        ds_all = torch.zeros_like(s_all) if grad_s_all is None else grad_s_all.contiguous().clone()
        dz_all = torch.empty_like(gates)  # dL/dz for every row; z = z_x + W h_prev, so also dL/dz_x
        dh0, ds0 = torch.zeros_like(h0), torch.zeros_like(s0)
        times_w_hh_t = _weight_product(weight_hh.t(), ctx.steps)
        times_w_hr_t = None if weight_hr is None else _weight_product(weight_hr.t(), ctx.steps)
        for start, n, carried, prev_start in reversed(ctx.steps):
            rows = slice(start, start + n)
            g, f, tanh_a, q = gates[rows].chunk(4, dim=1)
            tanh_s = tanh_s_all[rows]
            dh, ds, dz = dh_all[rows], ds_all[rows], dz_all[rows]
            dz_g, dz_f, dz_a, dz_q = dz.chunk(4, dim=1)
            if weight_hr is not None:
                dh = times_w_hr_t(dh)                             # h = W_hr m: dL/dm = dh W_hr

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
        # W's gradient, sum over steps of dz(t)^T h(t-1), as one matrix multiply; W_hr's, of dh(t)^T m(t).
        h_prev_all = torch.cat([_previous(h_all, h0, *step[1:]) for step in sorted(ctx.steps)])
        grad_w_hh = dz_all.t() @ h_prev_all if ctx.needs_input_grad[1] else None
        grad_w_hr = dh_all.t() @ m_all if ctx.needs_input_grad[2] else None
        return dz_all, grad_w_hh, grad_w_hr, dh0, ds0, None


def _differentiable_backward(ctx, inputs, grad_h_all, grad_s_all):
    """The backward for create_graph=True: the loop again in plain autograd ops, differentiated by
    autograd, so that the gradients it returns have a graph of their own (correct to any order)."""
    z_x, weight_hh, weight_hr, h0, s0 = inputs
    with torch.enable_grad():
        h_all, s_all = _plain_loop(z_x, weight_hh, weight_hr, h0, s0, ctx.steps)
    outputs, grads = zip(*[(out, grad) for out, grad in ((h_all, grad_h_all), (s_all, grad_s_all)) if grad is not None])
    wanted = [t for t, needed in zip(inputs, ctx.needs_input_grad) if needed]
    found = iter(torch.autograd.grad(outputs, wanted, grads, create_graph=True, allow_unused=True))
    return tuple(next(found) if needed else None for needed in ctx.needs_input_grad[:5]) + (None,)


def _step(z_x_t, h_prev, s_prev, weight_hh, weight_hr):
    """One time step of the equations in plain autograd ops."""
    z = torch.addmm(z_x_t, h_prev, weight_hh.t())            # U x(t) + W h(t-1) + b, all four gates
    z_g, z_f, z_a, z_q = z.chunk(4, dim=1)
    s = torch.sigmoid(z_f) * s_prev + torch.sigmoid(z_g) * torch.tanh(z_a)  # memory update
    h = torch.sigmoid(z_q) * torch.tanh(s)                                  # hidden update
    return (h if weight_hr is None else h @ weight_hr.t()), s


def _plain_loop(z_x, weight_hh, weight_hr, h0, s0, steps):
    """_forward_loop in plain out-of-place ops, so that autograd records (and can differentiate) every step."""
    h_steps, s_steps, h, s = {}, {}, None, None
    for start, n, carried, prev_start in steps:
        if carried == n:
            h_prev, s_prev = h[:n], s[:n]
        else:
            h_prev = torch.cat([h[:carried], h0[carried:n]]) if carried else h0[:n]
            s_prev = torch.cat([s[:carried], s0[carried:n]]) if carried else s0[:n]
        h, s = _step(z_x[start:start + n], h_prev, s_prev, weight_hh, weight_hr)
        h_steps[start], s_steps[start] = h, s
    return torch.cat([h_steps[k] for k in sorted(h_steps)]), torch.cat([s_steps[k] for k in sorted(s_steps)])


def _weight_product(weight, steps):
    """x -> x W^T, or add + x W^T, for a loop that multiplies by the same W at every step.

    One step's product W h(t-1), (batch x H) by (H x 4H), is most of the loop's time. PyTorch sends float32
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
    For the same reasons _step, which runs only while autograd records or a tracer traces, uses addmm.
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


def _masked_steps(z_x, running, weight_hh, weight_hr, h, s):
    """A few time steps of the equations on a padded batch, in plain ops for torch.compile to fuse.

    z_x is (steps, B, 4H) and running is (steps, B, 1). A row that is not running (past the end of
    its caption, or not yet started when going backward) keeps its state, so each row finishes with
    its own last state and the padding changes no output or gradient.
    """
    outputs = []
    for z_x_t, running_t in zip(z_x, running):
        h_new, s_new = _step(z_x_t, h, s, weight_hh, weight_hr)
        s = torch.where(running_t, s_new, s)
        h = torch.where(running_t, h_new, h)
        outputs.append(h)
    return torch.stack(outputs), h, s


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
        compiled loop runs `steps_per_call` steps per call on a padded grid, the same shape whatever
        the captions' lengths. Inductor fuses each step's gate arithmetic into one kernel, and
        mode='reduce-overhead' replays each call as one CUDA graph. Inputs shorter than one call, such
        as decoding one word at a time, keep the plain loop. The keyword arguments go to torch.compile;
        the batch size is dynamic by default, so that a smaller last batch needs no second compile.
        torch.compile's backward cannot be differentiated again: no second-order gradients here.
        """
        self.steps_per_call = steps_per_call
        self._compiled_steps = torch.compile(_masked_steps, **{'dynamic': True, **compile_kwargs})

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
        batch = batch_sizes[0]
        self._check_input(data)
        h0, s0 = self._initial_state(hx, batch, data, unbatched, sorted_indices)

        compiled = self._compiled_steps is not None and len(batch_sizes) >= self.steps_per_call and batch > 0
        directions = range(self.num_directions)
        grids = schedules = last_rows = [None] * self.num_directions
        if compiled:
            grids = [self._grid(batch_sizes, direction == 1, data.device) for direction in directions]
        else:
            schedules = [_schedule(batch_sizes, direction == 1) for direction in directions]
            # Rows holding each sequence's final state: for a plain tensor, the last and first steps' blocks.
            last_rows = (self._last_rows(batch_sizes, data.device) if packed
                         else (slice((seq_len - 1) * batch, seq_len * batch), slice(0, batch)))
        # Under autocast the loop runs in the input projection's lower precision, with autocast off.
        autocast = torch.is_autocast_enabled(data.device.type)
        layer_input, h_n, s_n = data, [], []
        for layer in range(self.num_layers):
            if layer > 0 and self.dropout > 0 and self.training:
                layer_input = F.dropout(layer_input, self.dropout, training=True)
            outputs = []
            for direction in directions:
                suffix, index = self._suffix(layer, direction), layer * self.num_directions + direction
                bias = getattr(self, 'bias_ih' + suffix) + getattr(self, 'bias_hh' + suffix) if self.bias else None
                z_x = _input_product(layer_input, getattr(self, 'weight_ih' + suffix), bias)  # all steps at once
                weight_hr = getattr(self, 'weight_hr' + suffix) if self.proj_size > 0 else None
                loop_args = [getattr(self, 'weight_hh' + suffix), weight_hr, h0[index], s0[index]]
                loop_args = [t if t is None or t.dtype == z_x.dtype else t.to(z_x.dtype) for t in loop_args]
                with torch.autocast(data.device.type, enabled=False) if autocast else contextlib.nullcontext():
                    h_all, h_last, s_last = self._time_loop(z_x, loop_args, grids[direction], schedules[direction],
                                                            last_rows[direction])
                h_n.append(h_last)
                s_n.append(s_last)
                outputs.append(h_all)
            layer_input = torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]
        h_n, s_n = torch.stack(h_n), torch.stack(s_n)

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

    def _time_loop(self, z_x, loop_args, grid, schedule, last_rows):
        """One layer and direction through time: (h at every step, h and s at each sequence's end), by the
        compiled loop (given its grid), the autograd.Function, the export-friendly loop or the inference loop."""
        if grid is not None:
            return self._compiled_loop(z_x, *loop_args, *grid)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in [z_x, *loop_args]):
            h_all, s_all = _Recurrence.apply(z_x, *loop_args, schedule)
        elif _is_exporting():  # torch.export / ONNX: out-of-place ops, no Function
            h_all, s_all = _plain_loop(z_x, *loop_args, schedule)
        else:  # inference: the fast loop, without the autograd.Function around it
            with torch.no_grad():  # nothing to record, so oneDNN's products may run
                _, _, h_all, s_all, _ = _forward_loop(z_x, *loop_args, schedule)
        return h_all, h_all[last_rows], s_all[last_rows]

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

    def _compiled_loop(self, z_x, weight_hh, weight_hr, h0, s0, cells, running):
        """The loop of compile_loop(): scatter the packed rows into the grid, run the steps, gather them back."""
        grid = z_x.new_zeros(running.numel(), z_x.size(1)).index_copy(0, cells, z_x)
        grid = grid.view(*running.shape[:2], -1)
        h, s, outputs = h0, s0, []
        for grid_part, running_part in zip(grid.split(self.steps_per_call), running.split(self.steps_per_call)):
            h_steps, h, s = self._compiled_steps(grid_part, running_part, weight_hh, weight_hr, h, s)
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
