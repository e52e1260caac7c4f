"""The loops through time behind DIY_LSTM.LSTM: `DIY_LSTM.reference_loop`, run faster.

DIY_LSTM.py writes the equations once, in `lstm_step`, and runs them through time in `reference_loop`.
`LSTM.forward` computes U x(t) + b for every time step at once (`input_projection`), then hands each layer and
direction to one of the loops from `time_loops`, which return what `reference_loop` returns: h at every row and
each sequence's final h and s. What makes them fast, and would bury the equations in DIY_LSTM.py:

- A PackedSequence is stepped block by block (`_schedule`): only the rows of sequences still running.
- With gradients, `_Recurrence`, an autograd.Function, runs the loop into preallocated buffers and has a
  hand-written backward: autograd records two nodes per layer instead of a dozen per time step.
- On the CPU in float32, the products go through oneDNN's matmul (`_weight_product`), which is faster
  than MKL's sgemm on some CPUs and is reachable only through private torch.ops operators.
- After `LSTM.compile_loop()`, long inputs run on a padded grid that torch.compile can trace
  (`GridLoop`, `masked_steps`): on a GPU the plain loop is bound by kernel launches.

This module never imports DIY_LSTM: it is handed `lstm_step` (the compiled loop runs it) and `reference_loop`
(the backward runs it when it must itself be differentiated, create_graph=True). Only two places here write
the equations in their own form, for speed: the fused loop `_forward_loop` and the hand-written backward
`_Recurrence.backward`; tests/test_diy_lstm.py holds both to `reference_loop` in float64.

No built-in RNN kernel runs anywhere: every step is the equations in ordinary tensor operations.
"""
import contextlib
import functools
import math

import torch
import torch.nn.functional as F

is_exporting = getattr(torch.compiler, 'is_exporting', lambda: False)  # torch >= 2.6: whether torch.export traces


def input_projection(x, weight, bias):
    """U x + b for every row of every time step at once, before the loop: U x(t) does not depend on
    h(t-1), and one large multiply runs much faster than one per step. Through oneDNN, as in
    _weight_product, when no gradient is recorded."""
    if not torch.is_autocast_enabled(x.device.type) and _onednn_matmul(weight):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, 'none', [], '')
    return F.linear(x, weight, bias)


def time_loops(rows, num_directions, compiled_steps, steps_per_call, reference_loop):
    """One loop per direction (forward, then backward) for a batch with these rows, run for every layer.

    rows: lstm_interface.Rows, whose `batch_sizes[t]` is the number of sequences running at step t, as in a
    PackedSequence; a plain tensor has the same batch at every step. The compiled loop (`compiled_steps`,
    from LSTM.compile_loop()) runs inputs of at least `steps_per_call` steps; shorter ones, such as decoding
    one word at a time, keep the packed loop. reference_loop: DIY_LSTM's, for second-order gradients.
    """
    batch_sizes, device = rows.batch_sizes, rows.data.device
    batch = batch_sizes[0]
    directions = range(num_directions)
    if compiled_steps is not None and len(batch_sizes) >= steps_per_call and batch > 0:
        return [GridLoop(batch_sizes, direction == 1, device, compiled_steps, steps_per_call)
                for direction in directions]
    # Rows holding each sequence's final state: for a plain tensor, the last and first steps' blocks.
    seq_len = len(batch_sizes)
    last_rows = (_last_rows(batch_sizes, device) if rows.packed is not None
                 else (slice((seq_len - 1) * batch, seq_len * batch), slice(0, batch)))
    return [PackedLoop(batch_sizes, direction == 1, last_rows[direction], reference_loop) for direction in directions]


class TimeLoop:
    """One layer in one direction through time.

    Called with z_x (U x + b for every packed row, from input_projection), W (`weight_hh`), W_hr
    (`weight_hr`, or None), h_0 and s_0 (batch x P or H, batch x H), it returns h at every packed row,
    and h and s at each sequence's end. Each subclass's _run does the stepping; __call__ settles the dtype.
    """

    def __call__(self, z_x, weight_hh, weight_hr, h0, s0):
        # Under autocast the loop runs in the input projection's lower precision, with autocast off.
        loop_args = [weight_hh, weight_hr, h0, s0]
        loop_args = [t if t is None or t.dtype == z_x.dtype else t.to(z_x.dtype) for t in loop_args]
        autocast = torch.is_autocast_enabled(z_x.device.type)
        with torch.autocast(z_x.device.type, enabled=False) if autocast else contextlib.nullcontext():
            return self._run(z_x, *loop_args)


class PackedLoop(TimeLoop):
    """The loop over the packed rows, step by step (`_schedule`): with gradients, the autograd.Function with its
    hand-written backward; otherwise (inference) the fast loop alone."""

    def __init__(self, batch_sizes, reverse, last_rows, reference_loop):
        self.batch_sizes, self.reverse, self.last_rows = batch_sizes, reverse, last_rows
        self.schedule, self.reference_loop = _schedule(batch_sizes, reverse), reference_loop

    def _run(self, z_x, *loop_args):
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in [z_x, *loop_args]):
            return _Recurrence.apply(z_x, *loop_args, self)
        with torch.no_grad():  # inference: nothing to record, so oneDNN's products may run
            _, _, h_all, s_all, _ = _forward_loop(z_x, *loop_args, self.schedule)
        return h_all, h_all[self.last_rows], s_all[self.last_rows]


class GridLoop(TimeLoop):
    """The loop of LSTM.compile_loop(): scatter the packed rows into a padded grid, run the compiled
    steps `steps_per_call` at a time, gather the rows back.

    torch.compile cannot trace the packed loop, whose number of steps and rows are data. The grid has a
    whole number of calls' worth of steps, times the batch, so every call has the same shapes whatever
    the captions' lengths. Going backward, time is flipped, so that the compiled steps always run forward.
    """

    def __init__(self, batch_sizes, reverse, device, compiled_steps, steps_per_call):
        self.compiled_steps, self.steps_per_call = compiled_steps, steps_per_call
        steps, batch, rows = len(batch_sizes), batch_sizes[0], sum(batch_sizes)
        padded_steps = math.ceil(steps / steps_per_call) * steps_per_call
        # Built on the device, from the one copy of batch_sizes (_to_device): no index tensor waits for it.
        sizes = _to_device(batch_sizes, device)
        time = torch.repeat_interleave(torch.arange(steps, device=device), sizes, output_size=rows)  # of each row
        sequence = torch.arange(rows, device=device) - (torch.cumsum(sizes, 0) - sizes)[time]
        grid_step = steps - 1 - time if reverse else time
        # Where each packed row goes in the grid, and which cells of the grid are running.
        self.cells = grid_step * batch + sequence
        self.running = torch.zeros(padded_steps * batch, dtype=torch.bool, device=device)
        self.running[self.cells] = True
        self.running = self.running.view(padded_steps, batch, 1)

    def _run(self, z_x, weight_hh, weight_hr, h0, s0):
        cells, running = self.cells, self.running
        grid = z_x.new_zeros(running.numel(), z_x.size(1)).index_copy(0, cells, z_x)
        grid = grid.view(*running.shape[:2], -1)
        h, s, outputs = h0, s0, []
        for grid_part, running_part in zip(grid.split(self.steps_per_call), running.split(self.steps_per_call)):
            h_steps, h, s = self.compiled_steps(grid_part, running_part, weight_hh, weight_hr, h, s)
            if not h.requires_grad:
                # No gradient, so no backward is pending: with mode='reduce-overhead' the next call
                # then replays the same CUDA graph into the memory of this call's outputs. Keep copies.
                h_steps, h, s = h_steps.clone(), h.clone(), s.clone()
            outputs.append(h_steps)
        h_all = torch.cat(outputs).view(running.numel(), -1).index_select(0, cells)
        return h_all, h, s


def _last_rows(batch_sizes, device):
    """Rows of the packed output holding each sequence's final state, per direction, on the device.

    Going forward, sequence j ends at step length_j - 1; going backward it ends at step 0.
    """
    sizes = _to_device(batch_sizes, device)
    sequence = torch.arange(batch_sizes[0] if batch_sizes else 0, device=device)
    lengths = (sizes.unsqueeze(0) > sequence.unsqueeze(1)).sum(1)
    starts = torch.cumsum(sizes, 0) - sizes
    forward = starts[lengths - 1] + sequence
    return forward, sequence


def _to_device(numbers, device):
    """A list of ints as a long tensor on the device. To a GPU through page-locked memory, asynchronously: a
    plain copy from the CPU would wait for all the work queued on the GPU, at every forward."""
    tensor = torch.tensor(numbers, dtype=torch.long)
    if device.type == 'cuda':
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


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
    """_forward_loop with a hand-written backward; both must equal DIY_LSTM.reference_loop and its autograd.

    Autograd records two nodes per layer instead of a dozen per time step, and the backward runs its
    own loop. Only when the backward must itself be differentiated does it fall back to autograd.
    """

    @staticmethod
    def forward(ctx, z_x, weight_hh, weight_hr, h0, s0, loop):
        ctx.set_materialize_grads(False)
        gates, m_all, h_all, s_all, tanh_s_all = _forward_loop(z_x, weight_hh, weight_hr, h0, s0, loop.schedule)
        ctx.save_for_backward(z_x, gates, None if weight_hr is None else m_all, h_all, s_all, tanh_s_all,
                              weight_hh, weight_hr, h0, s0)
        ctx.loop = loop
        # Copies, not views: a Function's outputs must not be views of one another.
        return h_all, h_all[loop.last_rows].clone(), s_all[loop.last_rows].clone()

    @staticmethod
    def backward(ctx, grad_h_all, grad_h_last, grad_s_last):
        z_x, gates, m_all, h_all, s_all, tanh_s_all, weight_hh, weight_hr, h0, s0 = ctx.saved_tensors
        steps, last_rows = ctx.loop.schedule, ctx.loop.last_rows
        if torch.is_grad_enabled():  # create_graph=True: the gradients themselves need gradients
            return _differentiable_backward(ctx, (z_x, weight_hh, weight_hr, h0, s0),
                                            (grad_h_all, grad_h_last, grad_s_last))
        hidden = weight_hh.size(0) // 4
        # dh and ds gather what later steps send back, so they start as the outputs' own gradients.
        dh_all = torch.zeros_like(h_all) if grad_h_all is None else grad_h_all.contiguous().clone()
        ds_all = torch.zeros_like(s_all)
        if grad_h_last is not None:
            dh_all[last_rows] += grad_h_last
        if grad_s_last is not None:
            ds_all[last_rows] += grad_s_last
        dz_all = torch.empty_like(gates)  # dL/dz for every row; z = z_x + W h_prev, so also dL/dz_x
        dh0, ds0 = torch.zeros_like(h0), torch.zeros_like(s0)
        times_w_hh_t = _weight_product(weight_hh.t(), steps)
        times_w_hr_t = None if weight_hr is None else _weight_product(weight_hr.t(), steps)
        for start, n, carried, prev_start in reversed(steps):
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
        h_prev_all = torch.cat([_previous(h_all, h0, *step[1:]) for step in sorted(steps)])
        grad_w_hh = dz_all.t() @ h_prev_all if ctx.needs_input_grad[1] else None
        grad_w_hr = dh_all.t() @ m_all if ctx.needs_input_grad[2] else None
        return dz_all, grad_w_hh, grad_w_hr, dh0, ds0, None


def _differentiable_backward(ctx, inputs, grads):
    """The backward for create_graph=True: DIY_LSTM.reference_loop again, differentiated by autograd, so that
    the gradients it returns have a graph of their own (correct to any order)."""
    loop = ctx.loop
    with torch.enable_grad():
        outputs = loop.reference_loop(*inputs, batch_sizes=loop.batch_sizes, reverse=loop.reverse)
    outputs, grads = zip(*[(out, grad) for out, grad in zip(outputs, grads) if grad is not None])
    wanted = [t for t, needed in zip(inputs, ctx.needs_input_grad) if needed]
    found = iter(torch.autograd.grad(outputs, wanted, grads, create_graph=True, allow_unused=True))
    return tuple(next(found) if needed else None for needed in ctx.needs_input_grad[:5]) + (None,)


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


def _onednn_matmul(weight):
    """Whether _weight_product may use oneDNN for this weight; torch.backends.mkldnn.enabled = False turns it off.

    The private operators have no derivative, so not while autograd records (a double backward), and
    not while torch.compile or torch.export traces, so that their graphs hold only public operators.
    DIY_LSTM.lstm_step, which the loops here run only while autograd records or a tracer traces, uses plain addmm.
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


def compile_steps(lstm_step, **compile_kwargs):
    """masked_steps over this step function, through torch.compile (LSTM.compile_loop)."""
    return torch.compile(functools.partial(masked_steps, lstm_step), **compile_kwargs)


def masked_steps(lstm_step, z_x, running, weight_hh, weight_hr, h, s):
    """A few time steps of lstm_step on a padded batch, in plain ops for torch.compile to fuse.

    z_x is (steps, B, 4H) and running is (steps, B, 1). A row that is not running (past the end of
    its caption, or not yet started when going backward) keeps its state, so each row finishes with
    its own last state and the padding changes no output or gradient.
    """
    outputs = []
    for z_x_t, running_t in zip(z_x, running):
        step = lstm_step(z_x_t, h, s, weight_hh, weight_hr)
        s = torch.where(running_t, step.s, s)
        h = torch.where(running_t, step.h, h)
        outputs.append(h)
    return torch.stack(outputs), h, s
