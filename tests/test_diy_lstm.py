"""DIY_LSTM against the equations and against torch.nn.LSTM."""
import copy
import itertools
import math
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from DIY_LSTM import LSTM, LSTMCell



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

    got = cell.gates(torch.tensor([[x]]), torch.tensor([[h_prev]]))
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

    got = cell.gates(torch.from_numpy(x), torch.from_numpy(h_prev))
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


@pytest.mark.parametrize('call,message', [
    (lambda m: m(torch.randn(5, 2, 7)), 'Expected 3, got 7'),
    (lambda m: m(torch.randn(5, 2, 3, 1)), 'Expected input to be 2D or 3D'),
    (lambda m: m(torch.randn(5, 2, 3), (torch.zeros(1, 4, 4), torch.zeros(1, 4, 4))), r'hidden\[0\] size \(1, 2, 4\)'),
    (lambda m: m(torch.randn(5, 2, 3), (torch.zeros(1, 2, 4), torch.zeros(1, 2, 5))), r'hidden\[1\] size'),
    (lambda m: m(torch.randn(5, 2, 3), (torch.zeros(2, 4), torch.zeros(2, 4))), 'should also be 3-D'),
    (lambda m: m(torch.randn(5, 2, 3), torch.zeros(1, 2, 4)), 'tuple'),
    (lambda m: m(torch.randn(5, 2, 3, dtype=torch.float32)), 'dtype'),
    (lambda m: m(torch.randn(5, 2, 3), (torch.zeros(1, 2, 4, dtype=torch.float32),) * 2), 'dtype'),
])
def test_bad_input_gets_a_clear_error(call, message):
    with pytest.raises((RuntimeError, ValueError, TypeError), match=message):
        call(LSTM(3, 4))


def test_cell_bad_input_gets_a_clear_error():
    cell = LSTMCell(3, 4)
    with pytest.raises(RuntimeError, match='input_size: got 5 expected 3'):
        cell(torch.randn(2, 5))
    with pytest.raises(ValueError, match='1D or 2D'):
        cell(torch.randn(2, 2, 3))
    with pytest.raises(RuntimeError, match='hidden state of size'):
        cell(torch.randn(2, 3), (torch.zeros(3, 4), torch.zeros(3, 4)))
    with pytest.raises(RuntimeError, match='cell state of size'):
        cell(torch.randn(2, 3), (torch.zeros(2, 4), torch.zeros(1, 4)))


def test_constructor_rejects_bad_arguments():
    with pytest.raises(ValueError):
        LSTM(3, 4, dropout=1.5)
    with pytest.raises(ValueError):
        LSTM(3, 0)
    with pytest.warns(UserWarning, match='dropout'):
        LSTM(3, 4, dropout=0.5)


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


def test_compiled_loop_runs_whole_calls_and_leaves_short_inputs_to_the_plain_loop(compiled_for_real):
    torch.manual_seed(7)
    ref, diy = nn.LSTM(4, 5, bidirectional=True), LSTM(4, 5, bidirectional=True)
    diy.load_state_dict(ref.state_dict())
    diy.compile_loop(steps_per_call=4)
    compiled, calls = diy._compiled_steps, []
    diy._compiled_steps = lambda *args: calls.append(args[0].size(0)) or compiled(*args)
    for steps, expected_calls in ((9, [4, 4, 4] * 2), (3, [])):
        calls.clear()
        packed = pack_padded_sequence(torch.randn(steps, 3, 4), torch.tensor([steps, steps - 1, 1]))
        with torch.no_grad():
            results = [(out.data, h_n, c_n) for out, (h_n, c_n) in (module(packed) for module in (ref, diy))]
        for name, a, b in zip(('output', 'h_n', 'c_n'), *results):
            assert_same(a, b, f'{name}, {steps} steps')
        assert calls == expected_calls


@pytest.mark.skipif(not torch.cuda.is_available(), reason='CUDA graphs need a CUDA GPU')
def test_compiled_loop_with_cuda_graphs_matches_nn_lstm():
    """Training steps of varied lengths and a smaller last batch, then evaluation, replayed as CUDA graphs."""
    torch.manual_seed(8)
    ref = nn.LSTM(5, 6, bidirectional=True).cuda()
    diy = LSTM(5, 6, bidirectional=True).cuda()
    diy.load_state_dict(ref.state_dict())
    diy.compile_loop(steps_per_call=4, mode='reduce-overhead')
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
    lstm.compile_loop()
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

