"""DIY_LSTM against the equations and against torch.nn.LSTM."""
import copy
import functools
import itertools
import math
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import lstm_loops
from conftest import needs_gpu
from DIY_LSTM import LSTM, LSTMCell, lstm_step, reference_loop


@pytest.fixture(autouse=True, scope='module')
def float64():
    """Parity to 1e-10 needs float64; restore the default for the other test files."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


# --- gate math -------------------------------------------------------------------------------

def test_cell_gates_follow_the_equations_by_hand():
    """One input, one hidden unit: every gate worked out with math.exp."""
    cell = LSTMCell(1, 1)
    with torch.no_grad():
        # rows: input gate g, forget gate f, new content a, output gate q
        cell.weight_ih.copy_(torch.tensor([[0.5], [-1.0], [2.0], [1.5]]))
        cell.weight_hh.copy_(torch.tensor([[0.25], [0.5], [-0.5], [1.0]]))
        cell.bias_ih.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]))
        cell.bias_hh.copy_(torch.tensor([0.0, 1.0, -0.3, -0.4]))
    x, h_prev, s_prev = 2.0, -1.0, 0.5
    sig = lambda v: 1 / (1 + math.exp(-v))
    g = sig(0.5 * x + 0.25 * h_prev + 0.1)
    f = sig(-1.0 * x + 0.5 * h_prev + 1.2)
    a = 2.0 * x - 0.5 * h_prev + 0.0
    q = sig(1.5 * x + 1.0 * h_prev + 0.0)
    s = f * s_prev + g * math.tanh(a)
    h = q * math.tanh(s)

    got = cell.step(torch.tensor([[x]]), (torch.tensor([[h_prev]]), torch.tensor([[s_prev]])))
    for name, value, expected in zip('gfaq', got, (g, f, a, q)):
        assert value.item() == pytest.approx(expected, abs=1e-12), name
    h_got, s_got = cell(torch.tensor([[x]]), (torch.tensor([[h_prev]]), torch.tensor([[s_prev]])))
    assert s_got.item() == pytest.approx(s, abs=1e-12)
    assert h_got.item() == pytest.approx(h, abs=1e-12)


def test_cell_gates_follow_the_equations_in_numpy():
    rng = np.random.default_rng(0)
    I, H, B = 3, 4, 5
    U = {k: rng.normal(size=(H, I)) for k in 'gfaq'}
    W = {k: rng.normal(size=(H, H)) for k in 'gfaq'}
    b = {k: rng.normal(size=H) for k in 'gfaq'}
    cell = LSTMCell(I, H)
    with torch.no_grad():
        cell.weight_ih.copy_(torch.from_numpy(np.concatenate([U[k] for k in 'gfaq'])))
        cell.weight_hh.copy_(torch.from_numpy(np.concatenate([W[k] for k in 'gfaq'])))
        cell.bias_ih.copy_(torch.from_numpy(np.concatenate([b[k] for k in 'gfaq'])))
        cell.bias_hh.zero_()
    x, h_prev, s_prev = rng.normal(size=(B, I)), rng.normal(size=(B, H)), rng.normal(size=(B, H))

    pre = {k: x @ U[k].T + h_prev @ W[k].T + b[k] for k in 'gfaq'}
    g, f, q = sigmoid(pre['g']), sigmoid(pre['f']), sigmoid(pre['q'])
    a = pre['a']
    s = f * s_prev + g * np.tanh(a)
    h = q * np.tanh(s)

    got = cell.step(torch.from_numpy(x), (torch.from_numpy(h_prev), torch.from_numpy(s_prev)))
    for value, expected in zip(got, (g, f, a, q)):
        np.testing.assert_allclose(value.detach().numpy(), expected, atol=1e-12)
    h_got, s_got = cell(torch.from_numpy(x), (torch.from_numpy(h_prev), torch.from_numpy(s_prev)))
    np.testing.assert_allclose(s_got.detach().numpy(), s, atol=1e-12)
    np.testing.assert_allclose(h_got.detach().numpy(), h, atol=1e-12)


def test_layer_steps_the_equations_over_time():
    """The fast layer equals the cell applied step by step, and numpy's loop."""
    torch.manual_seed(0)
    lstm, cell = LSTM(3, 4), LSTMCell(3, 4)
    cell.load_state_dict({k[:-3]: v for k, v in lstm.state_dict().items()})
    x = torch.randn(6, 2, 3)
    h = s = torch.zeros(2, 4)
    expected = []
    for x_t in x:
        h, s = cell(x_t, (h, s))
        expected.append(h)
    out, (h_n, c_n) = lstm(x)
    torch.testing.assert_close(out, torch.stack(expected), rtol=0, atol=1e-12)
    torch.testing.assert_close(h_n[0], h, rtol=0, atol=1e-12)
    torch.testing.assert_close(c_n[0], s, rtol=0, atol=1e-12)


# --- lstm_loops' fast forms of the loop, against DIY_LSTM.reference_loop ----------------------

def loop_inputs(lengths, proj_size, seed):
    """z_x, W, W_hr, h0, s0 for one layer of hidden size 5, and the batch_sizes of captions of these lengths."""
    torch.manual_seed(seed)
    hidden, batch = 5, len(lengths)
    out = proj_size or hidden
    batch_sizes = [sum(length > t for length in lengths) for t in range(max(lengths))]
    tensors = [torch.randn(sum(batch_sizes), 4 * hidden), torch.randn(4 * hidden, out) / 2,
               torch.randn(proj_size, hidden) if proj_size else None,
               torch.randn(batch, out), torch.randn(batch, hidden)]
    return [t if t is None else t.requires_grad_() for t in tensors], batch_sizes


def fast_loops(batch_sizes, reverse):
    """The packed loop (inference and hand-written backward) and the grid loop, run here without torch.compile."""
    last_rows = lstm_loops._last_rows(batch_sizes, torch.device('cpu'))[int(reverse)]
    packed = lstm_loops.PackedLoop(batch_sizes, reverse, last_rows, reference_loop)
    grid = lstm_loops.GridLoop(batch_sizes, reverse, torch.device('cpu'),
                               functools.partial(lstm_loops.masked_steps, lstm_step), steps_per_call=3)
    return {'packed': packed, 'grid': grid}


@pytest.mark.parametrize('lengths', [(6, 4, 4, 1), (5, 5, 5), (1,)])
@pytest.mark.parametrize('reverse', [False, True])
@pytest.mark.parametrize('proj_size', [0, 3])
@pytest.mark.parametrize('kind', ['packed', 'grid'])
def test_fast_loops_and_the_hand_written_backward_equal_the_reference_loop(lengths, reverse, proj_size, kind):
    """lstm_loops' loops return what reference_loop returns (h at every row, the final h and s), forward with
    and without gradients, and their gradients equal autograd's through reference_loop, all to 1e-10."""
    inputs, batch_sizes = loop_inputs(lengths, proj_size, seed=len(lengths) + proj_size)
    used = [t for t in inputs if t is not None]
    expected = reference_loop(*inputs, batch_sizes, reverse)
    cotangents = [torch.randn_like(t) for t in expected]
    expected_grads = torch.autograd.grad(expected, used, cotangents)
    loop = fast_loops(batch_sizes, reverse)[kind]
    with torch.no_grad():
        for name, a, b in zip(['h_all', 'h_last', 's_last'], loop(*inputs), expected):
            assert_same(a, b, f'{kind} inference {name}')
    got = loop(*inputs)
    for name, a, b in zip(['h_all', 'h_last', 's_last'], got, expected):
        assert_same(a, b, f'{kind} {name}')
    for i, (a, b) in enumerate(zip(torch.autograd.grad(got, used, cotangents), expected_grads)):
        assert_same(a, b, f'{kind} gradient of input {i}')


def test_the_hand_written_backward_runs_its_own_loop_not_the_reference(monkeypatch):
    """The fast backward is checked above against the reference; here, that it is what runs."""
    inputs, batch_sizes = loop_inputs((4, 2), 0, seed=3)
    loop = fast_loops(batch_sizes, False)['packed']
    loop.reference_loop = lambda *args, **kwargs: pytest.fail('reference loop used for a first-order backward')
    h_all, h_last, s_last = loop(*inputs)
    (h_all.sum() + h_last.sum() + s_last.sum()).backward()
    assert inputs[1].grad.abs().sum() > 0


# --- parity with torch.nn ---------------------------------------------------------------------

def assert_same(a, b, what):
    torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=lambda m: f'{what}: {m}')


def test_cell_matches_nn_lstmcell_batched_and_unbatched():
    torch.manual_seed(1)
    ref = nn.LSTMCell(5, 7)
    diy = LSTMCell(5, 7)
    diy.load_state_dict(ref.state_dict(), strict=True)
    for shape in ((3, 5), (5,)):
        x = torch.randn(*shape, requires_grad=True)
        hx = tuple(torch.randn(*shape[:-1], 7, requires_grad=True) for _ in range(2))
        results = []
        for module in (ref, diy):
            h, s = module(x, hx)
            loss = (h ** 2).sum() + (s * torch.arange(7.0)).sum()
            results.append((h, s) + torch.autograd.grad(loss, [x, *hx, *module.parameters()]))
        for a, b in zip(*results):
            assert_same(a, b, f'cell {shape}')
        torch.testing.assert_close(diy(x)[0], ref(x)[0], rtol=0, atol=1e-10)


CONFIGS = list(itertools.product([1, 2], [False, True], [False, True], [True, False], [False, True]))


@pytest.mark.parametrize('num_layers,batch_first,bidirectional,bias,with_hx', CONFIGS)
@pytest.mark.parametrize('input_kind', ['tensor', 'packed_sorted', 'packed_unsorted', 'unbatched'])
@pytest.mark.parametrize('loop', ['plain', 'compiled'])
def test_lstm_matches_nn_lstm(num_layers, batch_first, bidirectional, bias, with_hx, input_kind, loop,
                              compiled_for_real):
    torch.manual_seed(2)
    I, H, B, T = 5, 6, 4, 7
    kwargs = dict(num_layers=num_layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional)
    ref, diy = nn.LSTM(I, H, **kwargs), LSTM(I, H, **kwargs)
    diy.load_state_dict(ref.state_dict(), strict=True)
    if loop == 'compiled':
        diy.compile_loop(steps_per_call=3)  # 7 steps: two whole calls and one padded
    D = 2 if bidirectional else 1
    unbatched = input_kind == 'unbatched'

    x = torch.randn((T, I) if unbatched else ((B, T, I) if batch_first else (T, B, I)), requires_grad=True)
    state_shape = (D * num_layers, H) if unbatched else (D * num_layers, B, H)
    hx = tuple(torch.randn(state_shape, requires_grad=True) for _ in range(2)) if with_hx else None
    lengths = torch.tensor([7, 5, 5, 2]) if input_kind == 'packed_sorted' else torch.tensor([3, 7, 1, 5])

    results = []
    for module in (ref, diy):
        if input_kind.startswith('packed'):
            packed = pack_padded_sequence(x, lengths, batch_first=batch_first,
                                          enforce_sorted=input_kind == 'packed_sorted')
            out, (h_n, c_n) = module(packed, hx)
            assert torch.equal(out.batch_sizes, packed.batch_sizes)
            if packed.sorted_indices is not None:
                assert torch.equal(out.sorted_indices, packed.sorted_indices)
                assert torch.equal(out.unsorted_indices, packed.unsorted_indices)
            out = pad_packed_sequence(out, batch_first=batch_first)[0]
        else:
            out, (h_n, c_n) = module(x, hx)
        weights = torch.linspace(-1, 1, out.size(-1))
        loss = (out * weights).sum() + (h_n ** 2).sum() + (c_n ** 3).sum()
        wrt = [x, *module.parameters()] + (list(hx) if with_hx else [])
        results.append((out, h_n, c_n) + torch.autograd.grad(loss, wrt))

    names = ['output', 'h_n', 'c_n', 'grad input'] + [f'grad {n}' for n, _ in ref.named_parameters()]
    names += ['grad h_0', 'grad c_0']
    assert len(results[0]) == len(results[1])
    for name, a, b in zip(names, *results):
        assert a.shape == b.shape, name
        assert_same(a, b, name)


def test_state_dict_names_and_order_match_nn_lstm():
    ref = nn.LSTM(3, 4, num_layers=2, bidirectional=True)
    diy = LSTM(3, 4, num_layers=2, bidirectional=True)
    assert list(diy.state_dict()) == list(ref.state_dict())
    assert [p.shape for p in diy.parameters()] == [p.shape for p in ref.parameters()]
    ref.load_state_dict(diy.state_dict(), strict=True)
    assert 'weight_ih_l1_reverse' in diy.state_dict()
    assert list(LSTM(3, 4, bias=False).state_dict()) == ['weight_ih_l0', 'weight_hh_l0']


def test_constructor_attributes_and_repr_match_nn_lstm():
    kwargs = dict(num_layers=2, bias=False, batch_first=True, dropout=0.25, bidirectional=True)
    ref, diy = nn.LSTM(3, 4, **kwargs), LSTM(3, 4, **kwargs)
    for name in ['input_size', 'hidden_size', 'num_layers', 'bias', 'batch_first', 'dropout', 'bidirectional']:
        assert getattr(diy, name) == getattr(ref, name), name
    assert repr(diy) == repr(ref)
    assert not isinstance(diy, nn.RNNBase)


def test_initialisation_is_uniform_within_one_over_sqrt_hidden():
    torch.manual_seed(3)
    lstm = LSTM(10, 16, num_layers=2)
    bound = 1 / math.sqrt(16)
    for name, p in lstm.named_parameters():
        assert p.abs().max() <= bound, name
        assert p.abs().max() > 0.9 * bound, name  # really spread over the range, not zeros
    cell = LSTMCell(10, 16)
    assert cell.weight_ih.shape == (64, 10) and cell.weight_hh.shape == (64, 16)
    assert cell.weight_hh.abs().max() <= bound


# --- gradients, dropout, errors ---------------------------------------------------------------

def test_gradcheck_plain_and_packed():
    torch.manual_seed(4)
    lstm = LSTM(3, 2, num_layers=2, bidirectional=True)
    x = torch.randn(4, 3, 3, requires_grad=True)
    hx = tuple(torch.randn(4, 3, 2, requires_grad=True) for _ in range(2))

    def plain(x, h0, c0, *weights):
        out, (h, c) = torch.func.functional_call(lstm, dict(zip(names, weights)), (x, (h0, c0)))
        return out, h, c

    def packed(x, h0, c0, *weights):
        seq = pack_padded_sequence(x, torch.tensor([4, 1, 3]), enforce_sorted=False)
        out, (h, c) = torch.func.functional_call(lstm, dict(zip(names, weights)), (seq, (h0, c0)))
        return out.data, h, c

    names = [n for n, _ in lstm.named_parameters()]
    weights = [p.detach().requires_grad_() for p in lstm.parameters()]
    assert torch.autograd.gradcheck(plain, (x, *hx, *weights))
    assert torch.autograd.gradcheck(packed, (x, *hx, *weights))


def test_dropout_between_layers_only_in_training():
    torch.manual_seed(5)
    ref = nn.LSTM(4, 8, num_layers=2, dropout=0.5)
    diy = LSTM(4, 8, num_layers=2, dropout=0.5)
    diy.load_state_dict(ref.state_dict())
    x = torch.randn(5, 3, 4)
    ref.eval(), diy.eval()
    torch.testing.assert_close(diy(x)[0], ref(x)[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(diy(x)[0], diy(x)[0], rtol=0, atol=0)
    diy.train()
    first, second = diy(x)[0], diy(x)[0]
    assert not torch.allclose(first, second)
    assert not torch.allclose(first, ref(x)[0])
    # With one layer there is nothing between layers to drop.
    single = LSTM(4, 8, num_layers=1)
    single.train()
    torch.testing.assert_close(single(x)[0], single(x)[0], rtol=0, atol=0)


def layer_inputs(module, x, monkeypatch):
    """Run module on x and return (its output, the input each layer received), caught where DIY_LSTM hands a
    layer's input to lstm_loops.input_projection (once per direction; the directions share it)."""
    seen = []
    project = lstm_loops.input_projection
    monkeypatch.setattr(lstm_loops, 'input_projection', lambda rows, *args: seen.append(rows) or project(rows, *args))
    out = module(x)[0]
    monkeypatch.setattr(lstm_loops, 'input_projection', project)
    return out, [rows.view(x.shape[:-1] + (-1,)) for rows in seen[::module.num_directions]]


def one_layer_of(module, layer):
    """A one-layer DIY LSTM with the weights of one of module's layers, in eval mode: what that layer computes,
    bit for bit, as it runs the same code (its parity with nn.LSTM is tested above)."""
    single = LSTM(module.weight_ih_l0.size(1) if layer == 0 else module.num_directions * module.hidden_size,
                     module.hidden_size, bidirectional=module.bidirectional)
    single.load_state_dict({name.replace(f'_l{layer}', '_l0'): value for name, value in module.state_dict().items()
                            if f'_l{layer}' in name})
    return single.eval()


@pytest.mark.parametrize('p', [0.5, 0.75])  # scales 2 and 4: x / (1 - p) is exact in floating point
@pytest.mark.parametrize('bidirectional', [False, True])
def test_dropout_zeroes_or_scales_by_one_over_one_minus_p_between_layers_and_never_the_output(
        p, bidirectional, monkeypatch):
    """In training, layer k > 0 gets layer k - 1's output with each element either 0 or exactly that element
    divided by (1 - p) (inverted dropout, as nn.LSTM); layer 0 gets the input as given, and the last layer's
    output is returned undropped: it equals that layer run on the input it received."""
    torch.manual_seed(14)
    lstm = LSTM(4, 16, num_layers=3, dropout=p, bidirectional=bidirectional).train()
    x = torch.randn(6, 5, 4)
    out, inputs = layer_inputs(lstm, x, monkeypatch)
    assert len(inputs) == 3
    assert torch.equal(inputs[0], x)
    zeros = 0
    for layer in (1, 2):
        with torch.no_grad():
            undropped = one_layer_of(lstm, layer - 1)(inputs[layer - 1])[0]
        got = inputs[layer]
        dropped = got == 0
        assert not (undropped == 0).any()  # so a 0 in got is dropout's
        torch.testing.assert_close(got[~dropped], undropped[~dropped] / (1 - p), rtol=0, atol=0)
        zeros += dropped.sum().item()
        # roughly a fraction p of the elements dropped: binomial, 6 * 5 * 16 * D elements each layer
        assert abs(dropped.float().mean().item() - p) < 0.1, f'layer {layer}: {dropped.float().mean():.2f} dropped'
    with torch.no_grad():
        top = one_layer_of(lstm, 2)(inputs[2])[0]
    assert not (out == 0).any()
    torch.testing.assert_close(out, top, rtol=0, atol=0)


def test_dropout_with_one_layer_changes_nothing_and_eval_mode_drops_nothing(monkeypatch):
    """One layer has nothing between layers to drop; in eval mode no layer's input is dropped, so the outputs
    equal nn.LSTM's (its eval mode) and every layer's input is the previous layer's output as computed."""
    torch.manual_seed(15)
    x = torch.randn(6, 5, 4)
    ref = nn.LSTM(4, 8, num_layers=1)
    with pytest.warns(UserWarning, match='dropout'):
        single = LSTM(4, 8, num_layers=1, dropout=0.5).train()
    single.load_state_dict(ref.state_dict())
    torch.testing.assert_close(single(x)[0], ref(x)[0], rtol=0, atol=1e-12)

    ref = nn.LSTM(4, 8, num_layers=3, dropout=0.5).eval()
    diy = LSTM(4, 8, num_layers=3, dropout=0.5).eval()
    diy.load_state_dict(ref.state_dict())
    out, inputs = layer_inputs(diy, x, monkeypatch)
    with torch.no_grad():
        for layer in (1, 2):
            torch.testing.assert_close(inputs[layer], one_layer_of(diy, layer - 1)(inputs[layer - 1])[0],
                                       rtol=0, atol=0)
        torch.testing.assert_close(out, ref(x)[0], rtol=0, atol=1e-12)
    assert not any((layer_input == 0).any() for layer_input in inputs)


def raised(call, module):
    """The exception that call(module) raises; the test fails if it raises none."""
    with pytest.raises(Exception) as caught:
        call(module)
    return caught.value


def assert_same_error(call, ref, diy):
    """nn's exception and DIY_LSTM's for the same mistake: the same class and the same words, which is what
    code written for nn.LSTM catches and what users search for."""
    expected, got = raised(call, ref), raised(call, diy)
    assert type(got) is type(expected), f'{type(got).__name__}: {got} != {type(expected).__name__}: {expected}'
    assert str(got) == str(expected)


def lstm_call(x_shape, *states, dtype=None):
    """A call of an LSTM(3, 4) on a random input of x_shape and, if states are given, hx = those zero tensors
    (a shape, or a (shape, dtype) pair)."""
    def call(module):
        x = torch.randn(x_shape, dtype=dtype)
        hx = tuple(torch.zeros(s[0], dtype=s[1]) if isinstance(s[1], torch.dtype) else torch.zeros(s)
                   for s in states)
        return module(x, hx) if states else module(x)
    return call


LSTM_MISTAKES = {
    'input size': lstm_call((5, 2, 7)),
    'unbatched input size': lstm_call((5, 7)),
    'input 4-D': lstm_call((5, 2, 3, 1)),
    'input 1-D': lstm_call((3,)),
    'input dtype': lstm_call((5, 2, 3), dtype=torch.float32),
    'no steps': lstm_call((0, 2, 3)),
    'no steps, unbatched': lstm_call((0, 3)),
    'h batch': lstm_call((5, 2, 3), (1, 4, 4), (1, 4, 4)),
    'h layers': lstm_call((5, 2, 3), (2, 2, 4), (2, 2, 4)),
    'c size': lstm_call((5, 2, 3), (1, 2, 4), (1, 2, 5)),
    'unbatched h size': lstm_call((5, 3), (1, 5), (1, 4)),
    '2-D states, batched input': lstm_call((5, 2, 3), (2, 4), (2, 4)),
    '3-D states, unbatched input': lstm_call((5, 3), (1, 2, 4), (1, 2, 4)),
    'one state 2-D': lstm_call((5, 2, 3), (1, 2, 4), (2, 4)),
    'three states': lstm_call((5, 2, 3), (1, 2, 4), (1, 2, 4), (1, 2, 4)),
    'three states, the first wrong': lstm_call((5, 2, 3), (1, 2, 5), (1, 2, 5), (1, 2, 5)),
    'one state': lstm_call((5, 2, 3), (1, 2, 4)),
}


@pytest.mark.parametrize('mistake', LSTM_MISTAKES)
def test_lstm_bad_input_gets_nn_lstms_exception_and_words(mistake):
    assert_same_error(LSTM_MISTAKES[mistake], nn.LSTM(3, 4), LSTM(3, 4))


def test_lstm_projected_hx_of_the_wrong_size_gets_nn_lstms_exception_and_words():
    for states in [((1, 2, 4), (1, 2, 4)), ((1, 2, 2), (1, 2, 2))]:
        assert_same_error(lstm_call((5, 2, 3), *states), nn.LSTM(3, 4, proj_size=2), LSTM(3, 4, proj_size=2))


@pytest.mark.parametrize('mistake,states', [('input size', ()), ('h batch', ((1, 3, 4), (1, 3, 4))),
                                            ('c size', ((1, 2, 4), (1, 2, 5)))])
def test_lstm_checks_a_packed_input_as_nn_lstm_checks_the_padded_one(mistake, states):
    """nn.LSTM checks nothing of a PackedSequence and fails later, in a matrix multiply or a broadcast; DIY_LSTM
    checks it as nn.LSTM checks a tensor, so its error for a packed batch is nn.LSTM's for the padded batch."""
    features = 7 if mistake == 'input size' else 3
    padded = lstm_call((5, 2, features), *states)
    packed = lambda module: module(pack_padded_sequence(torch.randn(5, 2, features), torch.tensor([5, 3])),
                                   tuple(torch.zeros(shape) for shape in states) or None)
    expected, got = raised(padded, nn.LSTM(3, 4)), raised(packed, LSTM(3, 4))
    assert type(got) is type(expected) and str(got) == str(expected)
    assert 'Expected' not in str(raised(packed, nn.LSTM(3, 4)))  # nn.LSTM's own words for the packed batch differ


@pytest.mark.parametrize('call,torch_type,message', [
    # hx as one tensor: nn.LSTM indexes it and fails with an IndexError (or, with two rows, a TypeError)
    (lambda m: m(torch.randn(5, 2, 3), torch.zeros(1, 2, 4)), IndexError,
     'LSTM: hx must be a tuple (h_0, c_0)'),
    # an h of another dtype: nn.LSTM's matrix multiply fails; a c of another dtype nn.LSTM runs with
    (lstm_call((5, 2, 3), ((1, 2, 4), torch.float32), ((1, 2, 4), torch.float32)), RuntimeError,
     'LSTM hx dtype (torch.float32) does not match input dtype (torch.float64): convert hx: hx[0].to(torch.float64)'),
    (lstm_call((5, 2, 3), (1, 2, 4), ((1, 2, 4), torch.float32)), None,
     'LSTM hx dtype (torch.float32) does not match input dtype (torch.float64): convert hx: hx[1].to(torch.float64)'),
])
def test_lstm_words_its_own_errors_where_nn_lstm_has_no_check(call, torch_type, message):
    """The documented exceptions to nn.LSTM's words: where nn.LSTM has no check of its own and fails by accident
    deeper down (or runs), DIY_LSTM raises a message of its own. nn.LSTM's side is pinned too, so that a check
    added to torch shows up here and DIY_LSTM can take its words."""
    got = raised(call, LSTM(3, 4))
    assert str(got) == message
    if torch_type is None:
        call(nn.LSTM(3, 4))  # runs
    else:
        assert type(raised(call, nn.LSTM(3, 4))) is torch_type


def cell_call(x_shape, states=None, dtype=None):
    """A call of an LSTMCell(3, 4) on a random input of x_shape, with hx = zero tensors of these shapes, or
    hx = one zero tensor when states is a single shape."""
    def call(module):
        x = torch.randn(x_shape, dtype=dtype)
        if states is None:
            return module(x)
        if isinstance(states[0], int):
            return module(x, torch.zeros(states))
        return module(x, tuple(torch.zeros(shape) for shape in states))
    return call


CELL_MISTAKES = {
    'input size': cell_call((2, 5)),
    'unbatched input size': cell_call((5,)),
    'input 3-D': cell_call((2, 2, 3)),
    'input 0-D': cell_call(()),
    'input dtype': cell_call((2, 3), dtype=torch.float32),
    'h batch': cell_call((2, 3), [(3, 4), (3, 4)]),
    'c batch': cell_call((2, 3), [(2, 4), (1, 4)]),
    'h size': cell_call((2, 3), [(2, 5), (2, 5)]),
    'c size': cell_call((2, 3), [(2, 4), (2, 5)]),
    'unbatched, 2-D states': cell_call((3,), [(1, 4), (1, 4)]),
    'states 3-D': cell_call((2, 3), [(1, 2, 4), (1, 2, 4)]),
    'states 4-D': cell_call((2, 3), [(1, 1, 2, 4), (1, 1, 2, 4)]),
    'three states': cell_call((2, 3), [(2, 4)] * 3),
    'one state': cell_call((2, 3), [(2, 4)]),
    'one state, unbatched': cell_call((3,), [(4,)]),
    'hx one tensor': cell_call((2, 3), (2, 4)),
}


@pytest.mark.parametrize('mistake', CELL_MISTAKES)
def test_cell_bad_input_gets_nn_lstmcells_exception_and_words(mistake):
    assert_same_error(CELL_MISTAKES[mistake], nn.LSTMCell(3, 4), LSTMCell(3, 4))


@pytest.mark.parametrize('kwargs', [
    dict(dropout=1.5), dict(dropout='0.5'), dict(dropout=True), dict(hidden_size=0), dict(hidden_size=-2),
    dict(hidden_size=4.0), dict(input_size=0), dict(input_size=-1), dict(input_size=3.0), dict(input_size='3'),
    dict(num_layers=0), dict(num_layers=-1), dict(bias=1), dict(bias='False'), dict(batch_first=0),
    dict(proj_size=-1), dict(proj_size=4), dict(proj_size=5),
])
def test_constructor_rejects_bad_arguments_as_nn_lstm_does(kwargs):
    arguments = {'input_size': 3, 'hidden_size': 4, **kwargs}
    assert_same_error(lambda module: module(**arguments), nn.LSTM, LSTM)


@pytest.mark.parametrize('kwargs', [dict(input_size=-1), dict(input_size=3.0), dict(hidden_size=-1)])
def test_cell_constructor_rejects_bad_arguments_as_nn_lstmcell_does(kwargs):
    arguments = {'input_size': 3, 'hidden_size': 4, **kwargs}
    assert_same_error(lambda module: module(**arguments), nn.LSTMCell, LSTMCell)


def test_constructor_takes_nn_lstms_arguments_by_position_too():
    args = (3, 4, 2, False, True, 0.0, True, 2)  # sizes, num_layers, bias, batch_first, dropout, bidirectional, proj
    ref, diy = nn.LSTM(*args), LSTM(*args)
    assert list(diy.state_dict()) == list(ref.state_dict())
    for name in ('bias', 'batch_first', 'dropout', 'bidirectional', 'proj_size'):
        assert getattr(diy, name) == getattr(ref, name), name
    with pytest.raises(TypeError):
        LSTM(3, 4, colour='red')


def test_constructor_warns_and_rejects_what_nn_lstm_does_not_reach():
    """nn.LSTM's warning about dropout with one layer, word for word; and the documented exceptions: a float
    num_layers or proj_size, which nn.LSTM does not check and trips over later (in range(), in torch.empty),
    gets the same exception class with DIY_LSTM's own words, in nn.LSTM's style for the other arguments."""
    warned = []
    for module in (nn.LSTM, LSTM):
        with pytest.warns(UserWarning) as caught:
            module(3, 4, dropout=0.5)
        warned.append([str(w.message) for w in caught])
    assert warned[0] == warned[1] and len(warned[0]) == 1
    for name, message in (('num_layers', 'num_layers should be of type int, got: float'),
                          ('proj_size', 'proj_size should be of type int, got: float')):
        call = lambda module: module(3, 4, **{name: 1.0 if name == 'num_layers' else 2.0})
        expected, got = raised(call, nn.LSTM), raised(call, LSTM)
        assert type(got) is type(expected) is TypeError
        assert str(got) == message and str(expected) != message


def test_no_builtin_lstm_kernel_is_called(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError('a built-in LSTM kernel was called')
    for owner, name in [(torch, 'lstm'), (torch, 'lstm_cell'), (torch._VF, 'lstm'), (torch._VF, 'lstm_cell'),
                        (nn.LSTM, 'forward'), (nn.LSTMCell, 'forward')]:
        monkeypatch.setattr(owner, name, forbidden)
    lstm = LSTM(3, 4, num_layers=2, bidirectional=True)
    packed = pack_padded_sequence(torch.randn(5, 2, 3), torch.tensor([5, 2]))
    lstm(packed)[0].data.sum().backward()
    LSTMCell(3, 4)(torch.randn(2, 3))[0].sum().backward()
    assert lstm.weight_hh_l1_reverse.grad.abs().sum() > 0


def test_float32_matches_nn_lstm_closely():
    torch.manual_seed(6)
    ref = nn.LSTM(16, 32, batch_first=True).float()
    diy = LSTM(16, 32, batch_first=True).float()
    diy.load_state_dict(ref.state_dict())
    x = torch.randn(8, 10, 16, dtype=torch.float32)
    torch.testing.assert_close(diy(x)[0], ref(x)[0], rtol=1e-5, atol=1e-5)


def float32_results(module, x, lengths, grad):
    """Outputs, final states and (with grad) every gradient, for a packed and a fixed-length float32 input."""
    results = []
    for packed in (True, False):
        inputs = x.detach().requires_grad_(grad)
        data = pack_padded_sequence(inputs, lengths, batch_first=True) if packed else inputs
        with torch.set_grad_enabled(grad):
            out, (h_n, c_n) = module(data)
        out = out.data if packed else out
        results += [out, h_n, c_n]
        if grad:
            loss = (out * torch.linspace(-1, 1, out.size(-1))).sum() + (c_n ** 2).sum()
            results += torch.autograd.grad(loss, [inputs, *module.parameters()])
    return results


@pytest.mark.parametrize('steps', [2, 9])  # the matmul reorders W once for loops of 4 steps or more
@pytest.mark.parametrize('grad', [True, False])
@pytest.mark.parametrize('proj_size', [0, 8])  # W is 4H x P, W_hr P x H
@pytest.mark.parametrize('onednn', ['as available', 'private operators missing'])
def test_float32_matmul_through_onednn_or_its_fallback_matches_nn_lstm(steps, grad, proj_size, onednn, monkeypatch):
    """In float32 the loop's products may go through torch.ops.mkldnn: with them and without, nn.LSTM's numbers."""
    if onednn == 'private operators missing':
        def missing(*args, **kwargs):  # what torch.ops does for an operator this build lacks
            raise AttributeError("'_OpNamespace' 'mkldnn' object has no attribute")
        monkeypatch.setattr(torch.ops.mkldnn, '_linear_pointwise', missing)
        monkeypatch.setattr(torch.ops.mkldnn, '_reorder_linear_weight', missing)
        monkeypatch.setattr(lstm_loops, '_onednn_ops_work', functools.cache(lstm_loops._onednn_ops_work.__wrapped__))
        assert not lstm_loops._onednn_ops_work()
    torch.manual_seed(7)
    ref = nn.LSTM(16, 32, batch_first=True, proj_size=proj_size, dtype=torch.float32)
    diy = LSTM(16, 32, batch_first=True, proj_size=proj_size, dtype=torch.float32)
    diy.load_state_dict(ref.state_dict())
    x = torch.randn(6, steps, 16, dtype=torch.float32)
    lengths = torch.tensor([steps, steps, steps - 1, 1, 1, 1])
    for got, expected in zip(float32_results(diy, x, lengths, grad), float32_results(ref, x, lengths, grad),
                             strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_compiled_loop_runs_whole_calls_and_leaves_short_inputs_to_the_plain_loop(compiled_for_real):
    torch.manual_seed(7)
    ref, diy = nn.LSTM(4, 5, bidirectional=True), LSTM(4, 5, bidirectional=True)
    diy.load_state_dict(ref.state_dict())
    diy.compile_loop(steps_per_call=3)
    compiled, calls = diy._compiled_steps, []
    diy._compiled_steps = lambda *args: calls.append(args[0].size(0)) or compiled(*args)
    for steps, expected_calls in ((8, [3, 3, 3] * 2), (2, [])):
        calls.clear()
        packed = pack_padded_sequence(torch.randn(steps, 3, 4), torch.tensor([steps, steps - 1, 1]))
        with torch.no_grad():
            results = [(out.data, h_n, c_n) for out, (h_n, c_n) in (module(packed) for module in (ref, diy))]
        for name, a, b in zip(('output', 'h_n', 'c_n'), *results):
            assert_same(a, b, f'{name}, {steps} steps')
        assert calls == expected_calls


@needs_gpu
def test_compiled_loop_with_cuda_graphs_matches_nn_lstm():
    """Training steps of varied lengths and a smaller last batch, then evaluation, replayed as CUDA graphs."""
    torch.manual_seed(8)
    ref = nn.LSTM(5, 6, bidirectional=True).cuda()
    diy = LSTM(5, 6, bidirectional=True).cuda()
    diy.load_state_dict(ref.state_dict())
    diy.compile_loop(steps_per_call=3, mode='reduce-overhead')
    for steps, batch, grad in [(9, 4, True), (12, 4, True), (9, 4, True), (10, 3, True), (9, 4, False), (11, 4, False)]:
        lengths = torch.randint(1, steps + 1, (batch,))
        lengths[0] = steps
        x = torch.randn(steps, batch, 5, device='cuda', requires_grad=grad)
        results = []
        for module in (ref, diy):
            module.zero_grad(set_to_none=True)
            with torch.set_grad_enabled(grad):
                out, (h_n, c_n) = module(pack_padded_sequence(x, lengths, enforce_sorted=False))
                result = [out.data, h_n, c_n]
                if grad:
                    (out.data.sum() + h_n.sum() + c_n.sum()).backward()
                    result += [p.grad for p in module.parameters()]
            results.append([t.detach().clone() for t in result])
        for a, b in zip(*results):
            assert_same(a, b, f'{steps} steps, batch {batch}, grad {grad}')


def test_a_compiled_lstm_can_be_copied_and_pickled():
    lstm = LSTM(3, 4)
    lstm.compile_loop(steps_per_call=3)
    x = torch.randn(9, 2, 3)
    for copied in (copy.deepcopy(lstm), pickle.loads(pickle.dumps(lstm))):
        assert copied._compiled_steps is None  # the copy runs the plain loop
        assert_same(copied(x)[0], lstm(x)[0], 'copy')


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(1, 6), min_size=1, max_size=5),
       input_size=st.integers(1, 4), hidden_size=st.integers(1, 5),
       num_layers=st.integers(1, 2), bidirectional=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_packed_parity_on_random_shapes(lengths, input_size, hidden_size, num_layers, bidirectional, seed):
    torch.manual_seed(seed)
    kwargs = dict(num_layers=num_layers, bidirectional=bidirectional, batch_first=True)
    ref, diy = nn.LSTM(input_size, hidden_size, **kwargs), LSTM(input_size, hidden_size, **kwargs)
    diy.load_state_dict(ref.state_dict())
    x = torch.randn(len(lengths), max(lengths), input_size, requires_grad=True)
    results = []
    for module in (ref, diy):
        packed = pack_padded_sequence(x, torch.tensor(lengths), batch_first=True, enforce_sorted=False)
        out, (h_n, c_n) = module(packed)
        loss = out.data.sin().sum() + h_n.sum() + (c_n ** 2).sum()
        results.append((out.data, h_n, c_n) + torch.autograd.grad(loss, [x, *module.parameters()]))
    for a, b in zip(*results):
        assert_same(a, b, 'random shapes')



# --- second-order gradients -------------------------------------------------------------------

def gradient_penalty_grads(module, x, hx, packed_lengths):
    """A gradient penalty through the LSTM: g = d(sum of outputs)/dx with create_graph=True, then
    the gradients of sum(g^2) with respect to the parameters and the initial state."""
    inputs = pack_padded_sequence(x, packed_lengths, enforce_sorted=False) if packed_lengths is not None else x
    out, (h_n, c_n) = module(inputs, hx)
    out = out.data if packed_lengths is not None else out
    weights = torch.linspace(-1, 1, out.size(-1))
    first = (out * weights).sum() + (h_n ** 2).sum() + c_n.sin().sum()
    (g,) = torch.autograd.grad(first, x, create_graph=True)
    return torch.autograd.grad((g ** 2).sum(), [*module.parameters(), *hx])


@pytest.mark.parametrize('steps', [1, 6])
@pytest.mark.parametrize('kind', ['tensor', 'packed'])
@pytest.mark.parametrize('num_layers,bidirectional,proj_size', [(1, False, 0), (2, True, 0), (2, True, 2)])
def test_gradient_penalty_parameter_gradients_match_nn_lstm(steps, kind, num_layers, bidirectional, proj_size):
    torch.manual_seed(9)
    kwargs = dict(num_layers=num_layers, bidirectional=bidirectional, proj_size=proj_size)
    ref, diy = nn.LSTM(4, 5, **kwargs), LSTM(4, 5, **kwargs)
    diy.load_state_dict(ref.state_dict(), strict=True)
    D = 2 if bidirectional else 1
    x = torch.randn(steps, 3, 4, requires_grad=True)
    hx = (torch.randn(D * num_layers, 3, proj_size or 5, requires_grad=True),
          torch.randn(D * num_layers, 3, 5, requires_grad=True))
    lengths = torch.tensor([steps, max(steps - 2, 1), 1]) if kind == 'packed' else None
    expected = gradient_penalty_grads(ref, x, hx, lengths)
    got = gradient_penalty_grads(diy, x, hx, lengths)
    names = [n for n, _ in ref.named_parameters()] + ['h_0', 'c_0']
    for name, a, b in zip(names, expected, got):
        assert a.abs().max() > 0, name  # the penalty really reaches every parameter
        assert_same(b, a, f'penalty gradient of {name}')


def test_gradgradcheck_plain_packed_and_projected():
    torch.manual_seed(10)
    for kwargs in (dict(num_layers=2, bidirectional=True), dict(proj_size=2)):
        lstm = LSTM(3, 3, **kwargs)
        names = [n for n, _ in lstm.named_parameters()]
        layers = lstm.num_layers * lstm.num_directions
        x = torch.randn(3, 2, 3, requires_grad=True)
        h0 = torch.randn(layers, 2, lstm.proj_size or 3, requires_grad=True)
        c0 = torch.randn(layers, 2, 3, requires_grad=True)

        def plain(x, h0, c0, *weights):
            out, (h, c) = torch.func.functional_call(lstm, dict(zip(names, weights)), (x, (h0, c0)))
            return out, h, c

        def packed(x, h0, c0, *weights):
            seq = pack_padded_sequence(x, torch.tensor([1, 3]), enforce_sorted=False)
            out, (h, c) = torch.func.functional_call(lstm, dict(zip(names, weights)), (seq, (h0, c0)))
            return out.data, h, c

        weights = [p.detach().requires_grad_() for p in lstm.parameters()]
        for fn in (plain, packed):
            # fast_mode checks the second derivatives along random directions rather than every entry
            assert torch.autograd.gradgradcheck(fn, (x, h0, c0, *weights), fast_mode=True)


def test_first_order_backward_stays_on_the_hand_written_loop(monkeypatch):
    """Without create_graph the fast backward runs, never the differentiable fallback."""
    import lstm_loops
    monkeypatch.setattr(lstm_loops, '_differentiable_backward', lambda *args: pytest.fail('fallback used'))
    lstm = LSTM(3, 4)
    lstm(torch.randn(5, 2, 3, requires_grad=True))[0].sum().backward()
    assert lstm.weight_hh_l0.grad.abs().sum() > 0


# --- edge cases nn.LSTM handles ---------------------------------------------------------------

@pytest.mark.parametrize('batch_first', [False, True])
@pytest.mark.parametrize('proj_size', [0, 2])
def test_batch_size_zero_gives_empty_outputs_like_nn_lstm(batch_first, proj_size):
    kwargs = dict(num_layers=2, bidirectional=True, batch_first=batch_first, proj_size=proj_size)
    ref, diy = nn.LSTM(3, 4, **kwargs), LSTM(3, 4, **kwargs)
    x = torch.randn((0, 5, 3) if batch_first else (5, 0, 3), requires_grad=True)
    for expected, got in zip(ref(x)[:1] + ref(x)[1], diy(x)[:1] + diy(x)[1]):
        assert got.shape == expected.shape and got.numel() == 0
    diy(x)[0].sum().backward()
    assert x.grad.shape == x.shape


def test_empty_cell_like_nn_lstmcell():
    cell, ref = LSTMCell(10, 0), nn.LSTMCell(10, 0)
    for module in (cell, ref):
        h, c = module(torch.randn(2, 10))
        assert h.shape == c.shape == (2, 0)
    assert LSTMCell(3, 4)(torch.randn(0, 3))[0].shape == (0, 4)


def test_bf16_module_under_cpu_autocast_with_an_fp32_state():
    torch.manual_seed(11)
    ref, diy = nn.LSTM(3, 4).bfloat16(), LSTM(3, 4).bfloat16()
    diy.load_state_dict(ref.state_dict())
    x = torch.randn(5, 2, 3, dtype=torch.float32)
    hx = (torch.randn(1, 2, 4, dtype=torch.float32), torch.randn(1, 2, 4, dtype=torch.float32))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        got = diy(x, hx)
        try:
            expected = ref(x, hx)
        except RuntimeError as err:  # oneDNN has no bf16 LSTM primitive for CPUs without AVX-512 (AVX2 EPYC)
            assert 'primitive' in str(err)
            expected = None
    if expected is None:  # then what that kernel computes: nn.LSTM in float32 on bf16-rounded inputs, as bf16
        rounded = [t.bfloat16().float() for t in (x, *hx)]
        out, (h, c) = copy.deepcopy(ref).float()(rounded[0], tuple(rounded[1:]))
        expected = (out.bfloat16(), (h.bfloat16(), c.bfloat16()))
    for a, b in zip(expected[:1] + expected[1], got[:1] + got[1]):
        assert b.dtype == a.dtype == torch.bfloat16
        torch.testing.assert_close(b.float(), a.float(), rtol=0.05, atol=0.05)


# --- projections ------------------------------------------------------------------------------

@pytest.mark.parametrize('num_layers,bidirectional,batch_first', [(1, False, False), (2, True, True), (2, False, True)])
@pytest.mark.parametrize('input_kind', ['tensor', 'packed_unsorted', 'unbatched'])
@pytest.mark.parametrize('loop', ['plain', 'compiled'])
@pytest.mark.parametrize('with_hx', [False, True])
def test_projected_lstm_matches_nn_lstm(num_layers, bidirectional, batch_first, input_kind, loop, with_hx,
                                        compiled_for_real):
    torch.manual_seed(12)
    I, H, P, B, T = 5, 6, 3, 4, 7
    kwargs = dict(num_layers=num_layers, batch_first=batch_first, bidirectional=bidirectional, proj_size=P)
    ref, diy = nn.LSTM(I, H, **kwargs), LSTM(I, H, **kwargs)
    assert list(diy.state_dict()) == list(ref.state_dict()) and 'weight_hr_l0' in diy.state_dict()
    assert [p.shape for p in diy.parameters()] == [p.shape for p in ref.parameters()]
    diy.load_state_dict(ref.state_dict(), strict=True)
    if loop == 'compiled':
        diy.compile_loop(steps_per_call=3)
    D, unbatched = 2 if bidirectional else 1, input_kind == 'unbatched'
    x = torch.randn((T, I) if unbatched else ((B, T, I) if batch_first else (T, B, I)), requires_grad=True)
    batch = () if unbatched else (B,)
    hx = (torch.randn(D * num_layers, *batch, P, requires_grad=True),
          torch.randn(D * num_layers, *batch, H, requires_grad=True)) if with_hx else None
    results = []
    for module in (ref, diy):
        if input_kind == 'packed_unsorted':
            packed = pack_padded_sequence(x, torch.tensor([3, 7, 1, 5]), batch_first=batch_first, enforce_sorted=False)
            out, (h_n, c_n) = module(packed, hx)
            out = pad_packed_sequence(out, batch_first=batch_first)[0]
        else:
            out, (h_n, c_n) = module(x, hx)
        loss = (out * torch.linspace(-1, 1, out.size(-1))).sum() + (h_n ** 2).sum() + (c_n ** 3).sum()
        wrt = [x, *module.parameters()] + (list(hx) if with_hx else [])
        results.append((out, h_n, c_n) + torch.autograd.grad(loss, wrt))
    assert results[1][0].size(-1) == D * P and results[1][1].size(-1) == P and results[1][2].size(-1) == H
    names = ['output', 'h_n', 'c_n', 'grad input'] + [f'grad {n}' for n, _ in ref.named_parameters()]
    for name, a, b in zip(names + ['grad h_0', 'grad c_0'], *results):
        assert a.shape == b.shape, name
        assert_same(b, a, name)


# --- the rest of nn.LSTM's interface ----------------------------------------------------------

def test_all_weights_flatten_parameters_and_proj_size_attribute():
    for kwargs in (dict(num_layers=2, bidirectional=True), dict(num_layers=2, proj_size=2, bias=False)):
        ref, diy = nn.LSTM(3, 4, **kwargs), LSTM(3, 4, **kwargs)
        diy.load_state_dict(ref.state_dict())
        assert diy.proj_size == ref.proj_size and repr(diy) == repr(ref)
        assert [[w.shape for w in ws] for ws in diy.all_weights] == [[w.shape for w in ws] for ws in ref.all_weights]
        for ours, theirs in zip(diy.all_weights, ref.all_weights):
            for a, b in zip(ours, theirs):
                assert a is not None and torch.equal(a, b)
        assert diy.all_weights[0][0] is diy.weight_ih_l0
        diy.flatten_parameters()  # a no-op, as code written for nn.LSTM calls it
    assert LSTM(3, 4, proj_size=0).proj_size == 0


@pytest.mark.parametrize('make', [lambda **f: LSTM(3, 16, num_layers=2, proj_size=4, **f),
                                  lambda **f: LSTMCell(3, 16, **f)])
def test_meta_device_to_empty_then_reset_parameters(make):
    torch.manual_seed(13)
    module = make(device='meta')
    assert all(p.is_meta for p in module.parameters())
    module = module.to_empty(device='cpu')
    module.reset_parameters()
    bound = 1 / math.sqrt(16)
    for name, p in module.named_parameters():
        assert not p.is_meta and p.abs().max() <= bound and p.abs().max() > 0.8 * bound, name
    before = [p.clone() for p in module.parameters()]
    module.reset_parameters()  # fresh values each time
    assert all(not torch.equal(a, b) for a, b in zip(before, module.parameters()))
