"""The C++ step functions (``sab.native``) compute what ``sab.fused``'s Python steps compute:
the LSTM step and its backward bit for bit (the same ATen operations in the same order; compared
in float32, where a changed order shows first), the sparse read and its backward (loops of their
own) to float64 rounding with the same selections — over training, evaluation and the sparse
engine."""
import shutil

import pytest
import torch

import sab
from sab import native
from sab.engines import forward_backward

from conftest import assert_forward_close, assert_grads_close, param_grads

from test_fused import CONFIGS, run

if shutil.which("c++") is None and shutil.which("g++") is None:  # pragma: no cover
    pytest.skip("no C++ compiler: sab.fused runs its Python steps", allow_module_level=True)


def test_the_step_functions_build():
    """With a C++ compiler present, the build must succeed (a failure falls back silently in
    use, but it is a bug)."""
    assert native.kernels() is not None


def test_describe_says_which_steps_run():
    """A benchmark's header says whether sab.native's steps or the Python ones ran."""
    assert native.describe() == "C++ steps (sab.native)"
    with native.enabled(steps=False):
        assert native.describe() == "Python steps (sab.native off)"


def test_a_failed_build_falls_back_to_the_python_steps(monkeypatch):
    """A build that fails warns once, with the compiler's error line, and the layer runs its
    Python steps."""
    def broken(openmp=True):
        raise RuntimeError("ninja: compiling\nfused_steps.cpp:1: error: something\nstopped")
    monkeypatch.setitem(native._STATE, "module", None)
    monkeypatch.setitem(native._STATE, "tried", False)
    monkeypatch.setattr(native, "_load", broken)
    with pytest.warns(UserWarning, match="fused_steps.cpp:1: error: something"):
        assert native.kernels() is None
    assert native.kernels() is None  # tried once per process
    assert native.describe() == "Python steps (not built)"  # what a benchmark's header says
    layer = sab.SABLSTM(3, 4, k_trunc=2, k_top=2, k_att=1, block_score_grad=True)
    out, _ = layer(torch.randn(9, 2, 3))
    out.sum().backward()
    assert torch.isfinite(layer.scorers[0].v.grad).all()


def test_a_compiler_without_openmp_builds_without_it(monkeypatch):
    """Where ``-fopenmp`` fails (a compiler without OpenMP), the functions build without it,
    with a warning that their loops run on one thread."""
    built = object()

    def load(openmp=True):
        if openmp:
            raise RuntimeError("fused_steps.cpp: fatal error: omp.h: No such file")
        return built
    monkeypatch.setitem(native._STATE, "module", None)
    monkeypatch.setitem(native._STATE, "tried", False)
    monkeypatch.setattr(native, "_openmp_flags", lambda: ["-fopenmp"])
    monkeypatch.setattr(native, "_load", load)
    with pytest.warns(UserWarning, match="built without -fopenmp .*omp.h"):
        assert native.kernels() is built


def test_a_stale_build_lock_is_removed(tmp_path, monkeypatch):
    """A build killed while compiling leaves torch's lock file, and the next build would wait
    on it forever: a lock older than any build is removed (with a warning) before loading."""
    import os
    import time
    monkeypatch.setenv("SAB_NATIVE_DIR", str(tmp_path))
    build = native._build_dir()
    build.mkdir(parents=True)
    lock = build / "lock"
    lock.write_text("")
    old = time.time() - 2 * native._STALE_LOCK_S
    os.utime(lock, (old, old))
    loaded = []
    monkeypatch.setattr("torch.utils.cpp_extension.load", lambda *a, **k: loaded.append(k))
    with pytest.warns(UserWarning, match="stale build lock"):
        native._load()
    assert not lock.exists() and loaded[0]["build_directory"] == str(build)


def _sparse_engine(kw, on, chunks=(7, 10), seed=0, dtype=torch.float64):
    """Losses and parameter gradients of the sparse engine over ``chunks``, state and memory
    carried (detached)."""
    with native.enabled(steps=on):
        torch.manual_seed(seed)
        layer = sab.SABLSTM(3, 6, **kw).to(dtype)
        g = torch.Generator().manual_seed(seed + 1)
        x = torch.randn(sum(chunks), 2, 3, generator=g, dtype=dtype)
        r = torch.randn(sum(chunks), 2, 6, generator=g, dtype=dtype)
        state, losses, t0 = None, [], 0
        for n in chunks:
            res = forward_backward(layer, x[t0:t0 + n],
                                   lambda a, b, o, s, t0=t0: ((o + s) * r[t0 + a:t0 + b]).sum(),
                                   state, engine="sparse")
            state = res.state
            losses.append(res.loss.detach())
            t0 += n
        return torch.stack(losses), param_grads(layer)


def _spy_reads(monkeypatch, names=("_attend_native", "_read_backward_native")):
    """Names of the C++ read functions ``names`` called through ``sab.fused`` (appended to the
    list returned)."""
    import sab.fused
    calls = []
    for name in names:
        fn = getattr(sab.fused, name)
        monkeypatch.setattr(sab.fused, name,
                            lambda *a, fn=fn, name=name: calls.append(name) or fn(*a))
    return calls


@pytest.mark.parametrize("kw", CONFIGS + [dict(k_trunc=4, k_top=3, k_att=2, max_memories=5,
                                               block_score_grad=True, delta_grad=True)])
@pytest.mark.parametrize("carry_graph", [False, True])
def test_training_equals_the_python_steps(kw, carry_graph, monkeypatch):
    """The one-node layer with the C++ steps against its Python steps, float64: the same
    memories selected, outputs and records to rounding, gradients to 1e-10."""
    calls = _spy_reads(monkeypatch)
    results = {}
    for on in (True, False):
        calls.clear()
        with native.enabled(steps=on):
            results[on] = run(kw, True, (7, 10), carry_graph, seed=0)
        # sparse reads went through the C++ functions, or none did
        assert set(calls) == ({"_attend_native", "_read_backward_native"} if on else set())
    (out_n, recs_n, grads_n, gx_n), (out_p, recs_p, grads_p, gx_p) = results[True], results[False]
    assert_forward_close(out_n, out_p)
    for a, b in zip(recs_n, recs_p):
        for f in ("indices", "memory_steps"):
            assert torch.equal(getattr(a, f), getattr(b, f)), f
        for f in ("summary", "weights"):
            assert_forward_close(getattr(a, f), getattr(b, f), msg=f)
    assert_grads_close(gx_n, gx_p)
    for name in grads_p:
        assert_grads_close(grads_n[name], grads_p[name], msg=name)


@pytest.mark.parametrize("carry_graph", [False, True])
def test_the_lstm_steps_are_bit_identical(carry_graph, monkeypatch):
    """Without attention (k_top = 0) only the LSTM step and its backward run in C++: the same
    ATen calls as the Python, so the same bits, in float32."""
    calls = _spy_reads(monkeypatch)
    kw = dict(k_trunc=3, k_top=0, k_att=1)
    results = {}
    for on in (True, False):
        with native.enabled(steps=on):
            results[on] = run(kw, True, (7, 10), carry_graph, seed=0, dtype=torch.float32)
    assert not calls
    (out_n, _, grads_n, gx_n), (out_p, _, grads_p, gx_p) = results[True], results[False]
    assert torch.equal(out_n, out_p) and torch.equal(gx_n, gx_p)
    for name in grads_p:
        assert torch.equal(grads_n[name], grads_p[name]), name


@pytest.mark.parametrize("kw", [CONFIGS[4], CONFIGS[5], dict(k_trunc=3, k_top=2, k_att=1)])
def test_the_sparse_engine_equals_the_python_steps(kw):
    """Its graph-free forward (logging the rankings) and its recomputations (replaying them),
    with the C++ steps and with the Python steps, float64."""
    loss_n, grads_n = _sparse_engine(kw, True)
    loss_p, grads_p = _sparse_engine(kw, False)
    assert_forward_close(loss_n, loss_p)
    for name in grads_p:
        assert_grads_close(grads_n[name], grads_p[name], msg=name)


def test_evaluation_equals_the_python_steps():
    outs = {}
    for on in (True, False):
        with native.enabled(steps=on), torch.no_grad():
            torch.manual_seed(2)
            layer = sab.SABLSTM(3, 6, k_trunc=5, k_top=3, k_att=2, max_memories=6).double()
            x = torch.randn(30, 4, 3, generator=torch.Generator().manual_seed(3),
                            dtype=torch.float64)
            out, state = layer(x)
            outs[on] = (out, state.h, state.c)
    for a, b in zip(outs[True], outs[False]):
        assert_forward_close(a, b)


def test_the_python_steps_run_where_the_functions_do_not_apply():
    """The torch.compile'd ranking (``fused_scorer``), other scorers, and ``SAB_NATIVE=0``
    (``native.enabled(False)``) keep the Python steps."""
    from sab.fused import _native
    cpu = torch.zeros(1)
    scorer = sab.SABLSTM(3, 4, k_trunc=2, k_top=2, k_att=1).scorers[0]
    assert _native(scorer, cpu) is not None
    assert _native(sab.SABLSTM(3, 4, k_trunc=2, k_top=2, k_att=1, scorer="dot").scorers[0], cpu) is None
    with native.enabled(steps=False):
        assert _native(scorer, cpu) is None
    scorer.fused = True
    assert _native(scorer, cpu) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,H", [(3, 5), (64, 128), (17, 33)])
def test_the_fused_lstm_backward_is_bit_identical(dtype, B, H):
    """The LSTM pointwise backward as one pass over the batch rows (what ``lstm_step_backward``
    runs) gives the bits of ``sab.cell.pointwise_backward``'s ATen operations, and of their C++
    twin: each operation rounded on its own (no fused multiply-add)."""
    from sab.cell import pointwise_backward
    K = native.kernels()
    g = torch.Generator().manual_seed(B * H)
    gh, gc, c_prev, tc = (torch.randn(B, H, generator=g, dtype=dtype) for _ in range(4))
    act = torch.rand(B, 4 * H, generator=g, dtype=dtype)
    want = pointwise_backward(gh, gc, act, c_prev, tc, torch.empty(B, 4 * H, dtype=dtype))
    for fn in (K.pointwise_backward_fused, K.pointwise_backward):
        got = fn(gh, gc, act, c_prev, tc, torch.empty(B, 4 * H, dtype=dtype))
        assert all(torch.equal(x, y) for x, y in zip(got, want)), fn.__name__


def _self_attention(on, max_memories, carry_graph, scale=1.0, chunks=(7, 10)):
    """Outputs and gradients (parameters, input) of the self-attention baseline over ``chunks``
    in float64, with the C++ steps or the Python ones; ``scale`` multiplies the query weights."""
    with native.enabled(steps=on):
        torch.manual_seed(0)
        layer = sab.SelfAttnLSTM(3, 5, max_memories=max_memories).double()
        with torch.no_grad():
            layer.scorers[0].query_proj.weight.mul_(scale)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(sum(chunks), 2, 3, dtype=torch.float64, generator=g, requires_grad=True)
        r = torch.randn(sum(chunks), 2, 5, dtype=torch.float64, generator=g)
        state, outs, t0 = None, [], 0
        for n in chunks:
            out, state = layer(x[t0:t0 + n], state)
            outs.append(out)
            state = state if carry_graph else state.detach()
            t0 += n
        out = torch.cat(outs)
        ((out * r).sum() + state.c.pow(2).sum()).backward()
        return out.detach(), param_grads(layer), x.grad


@pytest.mark.parametrize("max_memories", [None, 4])
@pytest.mark.parametrize("carry_graph", [False, True])
def test_dense_reads_equal_the_python_steps(max_memories, carry_graph, monkeypatch):
    """The self-attention baseline's dense reads through the C++ functions (softmax over every
    memory, scores in the ranking's rational form) against the Python reads (sigmoid form),
    float64: outputs to rounding, gradients to 1e-10 — with a bank that rewrites its slots
    (``max_memories``) and with the state carried with and without its graph."""
    calls = _spy_reads(monkeypatch, ("_attend_dense_native", "_read_backward_dense_native"))
    out_n, grads_n, gx_n = _self_attention(True, max_memories, carry_graph)
    assert set(calls) == {"_attend_dense_native", "_read_backward_dense_native"}
    out_p, grads_p, gx_p = _self_attention(False, max_memories, carry_graph)
    assert_forward_close(out_n, out_p)
    assert_grads_close(gx_n, gx_p)
    for name in grads_p:
        assert_grads_close(grads_n[name], grads_p[name], msg=name)


def test_dense_reads_beyond_the_rational_range_fall_back_to_the_python_read(monkeypatch):
    """Queries beyond ``rational_limit`` (NaN in the rational scores): the C++ dense read
    declines and the Python read runs — the same bits as the Python steps throughout."""
    import sab.fused
    declined = []
    fn = sab.fused._attend_dense_native
    monkeypatch.setattr(sab.fused, "_attend_dense_native",
                        lambda *a: declined.append(fn(*a) is None) or None)
    got = _self_attention(True, None, False, scale=1e4)
    assert declined and all(declined)
    want = _self_attention(False, None, False, scale=1e4)
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
    for name in want[1]:
        assert torch.equal(got[1][name], want[1][name]), name
