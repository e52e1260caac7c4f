"""torch.nn.LSTM's interface around DIY_LSTM: argument checks, the shapes of inputs and states, and the form of
the output, with nn.LSTM's exception types and wording.

DIY_LSTM.py calls these so that its cell and its layers read as the equations and the wiring of the layers.
What nn.LSTM accepts goes in: a (time, batch, features) tensor, or batch first, or unbatched (time, features),
or a PackedSequence. The loops through time see one form of all of them, `Rows`: each time step's rows one
after another, as a PackedSequence stores them, with `batch_sizes[t]` sequences running at step t.
"""
import numbers
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.nn.utils.rnn import PackedSequence


@dataclass(frozen=True)
class LSTMOptions:
    """nn.LSTM's arguments after input_size, hidden_size and num_layers, in its order and with its defaults."""
    bias: bool = True
    batch_first: bool = False
    dropout: float = 0.0
    bidirectional: bool = False
    proj_size: int = 0
    device: torch.device | str | None = None
    dtype: torch.dtype | None = None


def check_lstm_arguments(input_size, hidden_size, num_layers, options):
    """nn.LSTM's checks of its constructor's arguments, with its exception types and wording."""
    dropout, proj_size = options.dropout, options.proj_size
    if not isinstance(dropout, numbers.Number) or isinstance(dropout, bool) or not 0 <= dropout <= 1:
        raise ValueError('dropout should be a number in range [0, 1] representing the probability '
                         'of an element being zeroed')
    if dropout > 0 and num_layers == 1:
        warnings.warn('dropout option adds dropout after all but last recurrent layer, so non-zero '
                      f'dropout expects num_layers greater than 1, but got dropout={dropout} and '
                      f'num_layers={num_layers}', stacklevel=3)
    for name, value, kind in (('bias', options.bias, bool), ('batch_first', options.batch_first, bool),
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


def cell_inputs(cell, input, hx):
    """nn.LSTMCell's checks; returns (input as (B, I) rows, (h, s) as (B, H) each, whether it was unbatched)."""
    if input.dim() not in (1, 2):
        raise ValueError(f'LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead')
    for i, state in enumerate(() if hx is None else hx):
        if state.dim() not in (1, 2):
            raise ValueError(f'LSTMCell: Expected hx[{i}] to be 1D or 2D, got {state.dim()}D instead')
    unbatched = input.dim() == 1
    if unbatched:
        input = input.unsqueeze(0)
        hx = None if hx is None else (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
    if hx is None:
        zeros = input.new_zeros(input.size(0), cell.hidden_size)
        hx = (zeros, zeros)
    # What nn.LSTMCell's kernel says when handed anything but two states (an unbatched hx was rebuilt above).
    if not isinstance(hx, (tuple, list)):
        raise TypeError(f"lstm_cell(): argument 'hx' (position 2) must be tuple of Tensors, not {type(hx).__name__}")
    if len(hx) != 2:
        raise RuntimeError('lstm_cell expects two hidden states')
    if input.size(1) != cell.input_size:
        raise RuntimeError(f'input has inconsistent input_size: got {input.size(1)} expected {cell.input_size}')
    for i, state in enumerate(hx):
        if state.size(0) != input.size(0):
            raise RuntimeError(f"Input batch size {input.size(0)} doesn't match hidden{i} batch size {state.size(0)}")
        if state.size(1) != cell.hidden_size:
            raise RuntimeError(f'hidden{i} has inconsistent hidden_size: got {state.size(1)}, '
                               f'expected {cell.hidden_size}')
    return input, tuple(hx), unbatched


class Rows(NamedTuple):
    """An LSTM's input as the loops through time see it, and what it takes to give the output nn.LSTM's form.

    data: every time step's rows one after another, (rows, features). batch_sizes: the number of rows of each
    step. packed: the PackedSequence given, whose indices put the batch back in order; for a tensor, None, and
    its shape instead: time_major is (steps, batch), unbatched says there was no batch dimension.
    """
    data: torch.Tensor
    batch_sizes: list
    packed: PackedSequence | None = None
    time_major: tuple = ()
    unbatched: bool = False

    @property
    def sorted_indices(self):
        return None if self.packed is None else self.packed.sorted_indices


def input_rows(lstm, input):
    """The input's `Rows`, with nn.LSTM's checks of its shape and dtype."""
    if isinstance(input, PackedSequence):
        rows = Rows(input.data, input.batch_sizes.tolist(), packed=input)
    else:
        if input.dim() not in (2, 3):
            raise ValueError(f'LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead')
        unbatched = input.dim() == 2
        if unbatched:
            input = input.unsqueeze(1)
        elif lstm.batch_first:
            input = input.transpose(0, 1)
        seq_len, batch = input.shape[:2]
        if seq_len == 0:
            raise RuntimeError('Expected sequence length to be larger than 0 in RNN')
        rows = Rows(input.reshape(seq_len * batch, input.size(2)), [batch] * seq_len, time_major=(seq_len, batch),
                    unbatched=unbatched)
    data = rows.data
    if data.dim() != 2:
        raise RuntimeError(f'packed input must have 2 dimensions, got {data.dim()}')
    if data.size(1) != lstm.input_size:
        raise RuntimeError(f'input.size(-1) must be equal to input_size. Expected {lstm.input_size}, '
                           f'got {data.size(1)}')
    weight = lstm.weight_ih_l0
    if data.dtype != weight.dtype and not torch.is_autocast_enabled(data.device.type):
        raise ValueError(f'RNN input dtype ({data.dtype}) does not match weight dtype ({weight.dtype}). '
                         f'Convert input: input.to({weight.dtype}), or convert model: model.to({data.dtype})')
    return rows


def initial_state(lstm, hx, rows):
    """(h_0, s_0) as (layers * directions, batch, P or H) and (..., H), zeros when hx is None, in the order of
    the rows of a packed batch (longest sequence first); with nn.LSTM's checks of hx."""
    layers = lstm.num_layers * lstm.num_directions
    batch = rows.batch_sizes[0]
    shapes = ((layers, batch, lstm.proj_size or lstm.hidden_size), (layers, batch, lstm.hidden_size))
    if hx is None:
        return tuple(rows.data.new_zeros(shape) for shape in shapes)
    if not isinstance(hx, (tuple, list)):
        raise TypeError('LSTM: hx must be a tuple (h_0, c_0)')  # nn.LSTM fails by accident, indexing hx
    want = 2 if rows.unbatched else 3
    if hx[0].dim() != want or hx[1].dim() != want:
        kind = 'unbatched 2-D' if rows.unbatched else 'batched 3-D'
        raise RuntimeError(f'For {kind} input, hx and cx should also be {want}-D but got '
                           f'({hx[0].dim()}-D, {hx[1].dim()}-D) tensors')
    if rows.unbatched:
        hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
    for i, (state, shape) in enumerate(zip(hx, shapes)):
        if tuple(state.shape) != shape:
            raise RuntimeError(f'Expected hidden[{i}] size {shape}, got {list(state.shape)}')
        if state.dtype != rows.data.dtype and not torch.is_autocast_enabled(rows.data.device.type):
            raise RuntimeError(f'LSTM hx dtype ({state.dtype}) does not match input dtype ({rows.data.dtype}): '
                               f'convert hx: hx[{i}].to({rows.data.dtype})')
    if len(hx) != 2:  # what nn.LSTM's kernel says, after the checks above, when handed more than two states
        raise RuntimeError('lstm expects two hidden states')
    if rows.sorted_indices is not None:
        hx = tuple(state.index_select(1, rows.sorted_indices) for state in hx)
    return hx


def lstm_output(lstm, rows, output, h_n, s_n):
    """The last layer's rows and the final states in the form of nn.LSTM's output for this input."""
    if rows.packed is not None:
        unsorted = rows.packed.unsorted_indices
        if unsorted is not None:
            h_n, s_n = h_n.index_select(1, unsorted), s_n.index_select(1, unsorted)
        packed = rows.packed
        return PackedSequence(output, packed.batch_sizes, packed.sorted_indices, unsorted), (h_n, s_n)
    output = output.view(*rows.time_major, output.size(1))
    if rows.unbatched:
        return output.squeeze(1), (h_n.squeeze(1), s_n.squeeze(1))
    return (output.transpose(0, 1) if lstm.batch_first else output), (h_n, s_n)
