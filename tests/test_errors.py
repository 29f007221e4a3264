"""Bad input gets a clear error naming the argument and what was expected."""
import pytest
import torch

import sab
from sab import RecurrentState

from conftest import make_sab


@pytest.mark.parametrize("kw,match", [
    (dict(k_trunc=0), "k_trunc must be an integer >= 1"),
    (dict(k_trunc=-2), "k_trunc"),
    (dict(k_trunc=2.5), "k_trunc"),
    (dict(k_att=0), "k_att must be an integer >= 1"),
    (dict(k_top=-1), "k_top must be an integer >= 0"),
    (dict(max_memories=0), "max_memories"),
    (dict(att_hidden=0), "att_hidden"),
    (dict(num_layers=0), "num_layers"),
    (dict(dropout=1.0), "dropout"),
    (dict(scorer="dot-product-of-doom"), "scorer must be one of"),
    (dict(delta_grad=True), "delta_grad=True needs block_score_grad=True"),
    (dict(delta_grad=1, block_score_grad=True), "delta_grad must be True or False"),
])
def test_bad_hyperparameters(kw, match):
    args = dict(k_trunc=2, k_top=1, k_att=1)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        sab.SABLSTM(3, 4, **args)


def test_bad_sizes():
    with pytest.raises(ValueError, match="hidden_size"):
        sab.SABLSTM(3, 0, k_trunc=1, k_top=1, k_att=1)
    with pytest.raises(ValueError, match="input_size"):
        sab.LSTM(-1, 4)
    with pytest.raises(ValueError, match="k_trunc"):
        sab.TBPTTLSTM(3, 4, k_trunc=0)


@pytest.mark.parametrize("shape,match", [
    ((5,), r"x must have shape \(T, B, input_size\).*1 dimensions"),
    ((5, 2, 3, 1), "4 dimensions"),
    ((5, 2, 7), "feature size 7"),
    ((5, 7), "feature size 7"),
])
def test_bad_input_shape(shape, match):
    layer = make_sab(3, 4)
    with pytest.raises(ValueError, match=match):
        layer(torch.zeros(shape, dtype=torch.float64))


def test_batch_first_message_names_the_layout():
    layer = make_sab(3, 4, batch_first=True)
    with pytest.raises(ValueError, match=r"\(B, T, input_size\)"):
        layer(torch.zeros(2, 5, 9, dtype=torch.float64))


def test_wrong_dtype_and_empty_input():
    layer = make_sab(3, 4)
    with pytest.raises(TypeError, match="dtype"):
        layer(torch.zeros(5, 2, 3))  # float32 into a float64 layer
    with pytest.raises(TypeError, match="dtype"):
        layer(torch.zeros(5, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one step"):
        layer(torch.zeros(0, 2, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="must be a tensor"):
        layer([[1.0, 2.0, 3.0]])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input(bad):
    layer = make_sab(3, 4)
    x = torch.zeros(5, 2, 3, dtype=torch.float64)
    x[3, 1, 2] = bad
    with pytest.raises(ValueError, match="NaN or infinity"):
        layer(x)


def test_state_from_another_layer_or_batch():
    layer = make_sab(3, 4, num_layers=2)
    x = torch.zeros(5, 2, 3, dtype=torch.float64)
    _, state = layer(x)
    with pytest.raises(ValueError, match=r"state.h must have shape .*\(2, 3, 4\).*got \(2, 2, 4\)"):
        layer(torch.zeros(5, 3, 3, dtype=torch.float64), state)  # another batch size
    other = make_sab(3, 6, num_layers=2)
    with pytest.raises(ValueError, match="state.h"):
        other(x, state)  # another hidden size
    one = make_sab(3, 4, num_layers=1)
    with pytest.raises(ValueError, match="state.h"):
        one(x, state)  # another depth
    bad = RecurrentState(state.h, state.c, state.memory[:1], state.step)
    with pytest.raises(ValueError, match="one bank per layer"):
        layer(x, bad)
    wider = make_sab(3, 4, num_layers=2, att_hidden=9)
    with pytest.raises(ValueError, match=r"state.memory\[0\] holds memories"):
        wider(x, state)  # keys of another width
    with pytest.raises(TypeError, match="state must be"):
        layer(x, "not a state")
    with pytest.raises(ValueError, match="state.step"):
        layer(x, RecurrentState(state.h, state.c, state.memory, -3))
    with pytest.raises(TypeError, match="state.h is torch.float32"):
        layer(x, RecurrentState(state.h.float(), state.c, state.memory, 5))


def test_build_rnn_errors():
    with pytest.raises(ValueError, match="model must be one of"):
        sab.build_rnn("gru", 1, 4)
    with pytest.raises(ValueError, match="'lstm' does not take k_top"):
        sab.build_rnn("lstm", 1, 4, k_top=3)
    with pytest.raises(TypeError):
        sab.build_rnn("tbptt", 1, 4)  # k_trunc is required
