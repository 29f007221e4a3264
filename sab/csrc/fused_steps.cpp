// The per-step work of sab.fused (the one-node SAB layer) as C++ functions.
//
// Each step function makes the same ATen calls, with the same arguments and in the same order,
// as the Python it replaces (named above each function), so the results are equal bit for bit
// (tests/test_native.py).  What it saves is Python's cost per tensor operation (1–3 µs:
// python -m benchmarks.dispatch) on the ~200 operations of a SAB time step; the loop over
// time, the memory bank's bookkeeping and the credit routing through autograd stay in Python.
//
// One function is a kernel of its own: ``rational_scores``, the MLP scorer's ranking in one
// pass over the cached keys (sab.scorer.MLPScorer.rank calls it too, so every path ranks with
// it).  It sums in its own order: equal to the ATen form to rounding, not bit for bit.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <optional>
#include <vector>

using at::Tensor;
using OptTensor = std::optional<Tensor>;

namespace {

// sab.fastmath.tanh: tanh(x) = 2·σ(2x) − 1, into ``out`` if given
Tensor fast_tanh(const Tensor& x, const OptTensor& out) {
  Tensor y = out ? at::mul_out(const_cast<Tensor&>(*out), x, 2) : at::mul(x, 2);
  return y.sigmoid_().mul_(2).sub_(1);
}

// sab.scorer.MLPScorer._tiled: ``hidden @ v`` (B, n) over tiles of ``tile`` elements; ``fill``
// writes the (b, n, d) hidden values of batch rows [lo, hi) into its first argument
template <typename Fill>
Tensor tiled_scores(const Tensor& like, const Tensor& v, int64_t tile, Tensor& scratch,
                    Fill fill) {
  const int64_t B = like.size(0), n = like.size(1), d = like.size(2);
  const int64_t rows = std::max<int64_t>(1, tile / std::max<int64_t>(1, n * d));
  auto carve = [&](int64_t b) {  // MLPScorer._scratch: a buffer kept between steps
    const int64_t numel = b * n * d;
    if (!scratch.defined() || scratch.numel() < numel || scratch.dtype() != like.dtype()) {
      const int64_t have = scratch.defined() ? scratch.numel() : 0;
      scratch = at::empty({std::max(numel, 2 * have)}, like.options());
    }
    return scratch.narrow(0, 0, numel).view({b, n, d});
  };
  if (rows >= B) {  // one tile: no slicing
    Tensor hidden = carve(B);
    fill(hidden, 0, B);
    return at::mv(hidden.view({-1, d}), v).view({B, n});
  }
  Tensor scores = at::empty({B, n}, like.options());
  for (int64_t s = 0; s < B; s += rows) {
    const int64_t hi = std::min(s + rows, B);
    Tensor hidden = carve(hi - s);
    fill(hidden, s, hi);
    Tensor out = scores.slice(0, s, hi).view({-1});
    at::mv_out(out, hidden.view({-1, d}), v);
  }
  return scores;
}

// sab.scorer._tile: batch rows [lo, hi) (for one tile, all rows: the same values as the
// unsliced tensor)
Tensor rows_of(const Tensor& x, int64_t lo, int64_t hi) { return x.slice(0, lo, hi); }

// rows [lo, hi) of the (B·n) scores of rational_scores; the pragma lets the compiler
// vectorise the sum (its order is then its own)
template <typename scalar_t>
void rational_rows(const scalar_t* A, const scalar_t* C, const scalar_t* V, scalar_t* O,
                   int64_t n, int64_t d, int64_t sb, int64_t si, int64_t lo, int64_t hi) {
  for (int64_t r = lo; r < hi; ++r) {
    const scalar_t* ab = A + (r / n) * d;
    const scalar_t* cb = C + (r / n) * sb + (r % n) * si;
    scalar_t acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < d; ++j) acc += V[j] / (scalar_t(1) + ab[j] * cb[j]);
    O[r] = acc;
  }
}

}  // namespace

// The MLP scorer's ranking scores in the rational form, Σ_j v_j / (1 + a_bj·c_bij) (B, n), from
// a = e^{−2q} (B, d) and the bank's cache c = e^{−2k} (B, n, d; rows of d contiguous): one pass
// over the cache, without the (B, n, d) intermediate that addcmul, reciprocal and mv write and
// read back (sab.scorer.MLPScorer._rational).  NaN in a or c gives NaN scores (the caller falls
// back to the sigmoid form).
Tensor rational_scores(const Tensor& a, const Tensor& cache, const Tensor& v) {
  TORCH_CHECK(cache.dim() == 3 && a.dim() == 2 && v.dim() == 1, "rational_scores: a (B, d), "
              "cache (B, n, d), v (d,) expected, got ", a.sizes(), ", ", cache.sizes(), ", ",
              v.sizes());
  const int64_t B = cache.size(0), n = cache.size(1), d = cache.size(2);
  TORCH_CHECK(a.size(0) == B && a.size(1) == d && v.size(0) == d, "rational_scores: shapes ",
              a.sizes(), ", ", cache.sizes(), ", ", v.sizes(), " do not match");
  const Tensor c = cache.stride(2) == 1 ? cache : cache.contiguous();
  const Tensor ac = a.contiguous(), vc = v.contiguous();
  Tensor out = at::empty({B, n}, cache.options());
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "rational_scores", [&] {
    at::parallel_for(0, B * n, 1024, [&](int64_t lo, int64_t hi) {  // (serial on one thread)
      rational_rows<scalar_t>(ac.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(),
                              vc.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n, d,
                              c.stride(0), c.stride(1), lo, hi);
    });
  });
  return out;
}

// sab.scorer.MLPScorer.rank with the bank's cache (the rational form, falling back to the
// sigmoid form where it gives NaN), the slots shifted by the window's ``start`` as
// sab.cell.rank_memories does: (top (B, k), slots (B, k))
std::vector<Tensor> rank(const Tensor& query, const Tensor& keys, const Tensor& cache,
                         const Tensor& v, int64_t k, double limit, int64_t start, int64_t tile) {
  static thread_local Tensor scratch;
  Tensor a = at::exp(at::mul(query, -2)).masked_fill_(at::gt(at::abs(query), limit), NAN);
  Tensor scores = rational_scores(a, cache, v);
  if (scores.isnan().any().item<bool>()) {  // beyond the rational form's range
    Tensor q2 = at::mul(query, 2);
    scores = tiled_scores(keys, v, tile, scratch, [&](Tensor& out, int64_t lo, int64_t hi) {
      at::add_out(out, rows_of(q2, lo, hi).unsqueeze(1), rows_of(keys, lo, hi), 2)
          .sigmoid_();
    });
  }
  auto [top, index] = scores.topk(k, -1);
  top.mul_(2).sub_(v.sum());
  return {top, index.add_(start)};
}

// sab.fused._forward, one step's LSTM: the gates x W_ihᵀ + b + h W_hhᵀ through
// sab.cell.gate_activations_, then sab.cell.cell_update (c and tanh c into the given rows):
// (activations (B, 4H), ĥ (B, H), c (B, H), tanh c (B, H))
std::vector<Tensor> lstm_step(const Tensor& xp, const Tensor& h, const Tensor& w_hh_t,
                              const Tensor& c_prev, const OptTensor& c_out,
                              const OptTensor& tc_out) {
  Tensor act = at::addmm(xp, h, w_hh_t);
  const int64_t H = c_prev.size(1);
  Tensor g = act.narrow(1, 2 * H, H);
  g.mul_(2);
  act.sigmoid_();
  g.mul_(2).sub_(1);
  auto a = act.split(H, 1);  // σ(i), σ(f), tanh(g), σ(o)
  Tensor fc = a[1] * c_prev;
  Tensor c = c_out ? at::addcmul_out(const_cast<Tensor&>(*c_out), fc, a[0], a[2])
                   : at::addcmul(fc, a[0], a[2]);
  Tensor tc = fast_tanh(c, tc_out);
  return {act, a[3] * tc, c, tc};
}

namespace {

// sab.cell.pointwise_backward up to ∂L/∂c(t): ∂L/∂gates into ``dgates``; returns ∂L/∂c(t)
// (B, H), which ∂L/∂c(t−1) is σ(f) times
Tensor pointwise_grads(const Tensor& gh, const Tensor& gc, const Tensor& act,
                       const Tensor& c_prev, const Tensor& tc, Tensor& dgates) {
  const int64_t H = c_prev.size(1);
  auto a = act.split(H, 1);  // σ(i), σ(f), tanh(g), σ(o)
  Tensor deriv = (1 - act).mul_(act);
  Tensor dg_deriv = deriv.narrow(1, 2 * H, H);
  at::mul_out(dg_deriv, a[2], a[2]).neg_().add_(1);
  Tensor dc = gh * a[3];
  dc.mul_(1 - tc * tc).add_(gc);
  auto d = dgates.split(H, 1);
  at::mul_out(d[0], dc, a[2]);
  at::mul_out(d[1], dc, c_prev);
  at::mul_out(d[2], dc, a[0]);
  at::mul_out(d[3], gh, tc);
  dgates.mul_(deriv);
  return dc;
}

Tensor forget_gate(const Tensor& act) {  // σ(f), the second quarter of the activations
  const int64_t H = act.size(1) / 4;
  return act.narrow(1, H, H);
}

}  // namespace

// sab.cell.pointwise_backward: (∂L/∂gates (B, 4H) in ``dgates``, ∂L/∂c_prev (B, H)); also
// what python -m benchmarks.dispatch times against the Python version
std::vector<Tensor> pointwise_backward(const Tensor& gh, const Tensor& gc, const Tensor& act,
                                       const Tensor& c_prev, const Tensor& tc, Tensor dgates) {
  Tensor dc = pointwise_grads(gh, gc, act, c_prev, tc, dgates);
  return {dgates, dc * forget_gate(act)};
}

// sab.fused._forward, the LSTM step's backward: sab.cell.pointwise_backward into ``dgates``,
// then the gradient of the state entering the step (zeros after a truncation point ``cut``):
// (∂L/∂h (B, H), ∂L/∂c (B, H))
std::vector<Tensor> lstm_step_backward(const Tensor& gh, const Tensor& gc, const Tensor& act,
                                       const Tensor& c_prev, const Tensor& tc, Tensor dgates,
                                       const Tensor& w_hh, bool cut) {
  Tensor dc = pointwise_grads(gh, gc, act, c_prev, tc, dgates);
  if (cut) return {at::zeros_like(gh), at::zeros_like(dc)};
  return {at::matmul(dgates, w_hh), dc * forget_gate(act)};
}

// sab.fused._attend for a sparse read (n > k_top) of the MLP scorer: the query, the ranking
// (or the replayed ``top``/``ranked``), the gather, sab.sparsifier.threshold_forward, and
// s(t) into ``s``.  Returns query, top, ranked, values, keys, ids, weights, shifted, denom,
// m_delta, delta_ids (the last two undefined without ``delta_grad``).
std::vector<Tensor> attend_sparse(const Tensor& h_hat, const Tensor& w_q, const Tensor& b_q,
                                  const Tensor& v, const Tensor& bank_values,
                                  const Tensor& bank_keys, const Tensor& slot_ids,
                                  const OptTensor& cache, const Tensor& offsets, int64_t start,
                                  int64_t stop, int64_t k_top, double eps, bool delta_grad,
                                  double limit, int64_t tile, const OptTensor& replay_top,
                                  const OptTensor& replay_ranked, Tensor s) {
  const int64_t B = h_hat.size(0);
  Tensor query = at::linear(h_hat, w_q, b_q);
  Tensor top, ranked;
  if (replay_top) {
    top = *replay_top;
    ranked = *replay_ranked;
  } else {
    Tensor keys = bank_keys.slice(1, start, stop);
    auto r = rank(query, keys, cache->slice(1, start, stop), v, k_top + 1, limit, start, tile);
    top = r[0];
    ranked = r[1];
  }
  Tensor slots = delta_grad ? ranked : ranked.slice(1, 0, k_top);
  const int64_t m = slots.size(1), cap = bank_values.size(1);
  // sab.memory._gather_rows, both buffers at the same rows
  Tensor flat = (slots + offsets).reshape(-1);
  Tensor values = bank_values.reshape({B * cap, bank_values.size(2)}).index_select(0, flat)
                      .view({B, m, bank_values.size(2)});
  Tensor keys = bank_keys.reshape({B * cap, bank_keys.size(2)}).index_select(0, flat)
                    .view({B, m, bank_keys.size(2)});
  Tensor ids = slot_ids.index_select(0, slots.reshape(-1)).view({B, m});
  Tensor m_delta, delta_ids;
  if (delta_grad) {
    m_delta = values.slice(1, k_top);
    delta_ids = ids.slice(1, k_top);
    values = values.slice(1, 0, k_top);
    keys = keys.slice(1, 0, k_top);
    ids = ids.slice(1, 0, k_top);
  }
  // sab.sparsifier.threshold_forward(top[:, :k], top[:, k], eps)
  Tensor shifted = at::relu(top.slice(1, 0, k_top) - top.select(1, k_top).unsqueeze(-1));
  Tensor total = shifted.sum(-1, true);
  Tensor denom = eps > 0 ? total + eps : at::where(total > 0, total, 1.0);
  Tensor weights = shifted / denom;
  s.copy_(at::bmm(weights.unsqueeze(1), values).squeeze(1));
  return {query, top, ranked, values, keys, ids, weights, shifted, denom, m_delta, delta_ids};
}

// sab.fused._read_backward for a sparse read, given ∂L/∂s (B, H): ∂L/∂v added into ``g_v``,
// ∂L/∂query into ``g_query``; with ``local`` (the chunk-local buffer (B·n_local, H + d), rows
// [value | key], and the chunk's first memory id ``first``), the credit of this chunk's
// memories is added there (sab.fused._credit and _delta_credit), carried memories' masked.
// Returns ∂L/∂values (B, k, H), ∂L/∂keys (B, k(+1), d; δ's memory last) and, with ``local``
// and ``m_delta``, ``old`` (B, 1, 1): where δ's memory came from an earlier chunk (its key's
// gradient then goes to W_k through the caller; undefined when none did).
std::vector<Tensor> read_backward_sparse(const Tensor& ds, const Tensor& values,
                                         const Tensor& keys_in, const Tensor& weights,
                                         const Tensor& shifted, const Tensor& denom,
                                         const Tensor& query, const Tensor& v,
                                         const Tensor& w_k, const OptTensor& m_delta,
                                         Tensor g_query, Tensor g_v, const Tensor& ids,
                                         const OptTensor& delta_ids, const OptTensor& local,
                                         const Tensor& offsets, int64_t first, int64_t n_local) {
  Tensor dw = (values * ds.unsqueeze(1)).sum(-1);  // (B, k)
  Tensor g_values = weights.unsqueeze(-1) * ds.unsqueeze(1);  // (B, k, H)
  // sab.sparsifier.threshold_grad
  Tensor g = (dw - (dw * weights).sum(-1, true)) / denom;
  Tensor g_scores = at::where(shifted > 0, g, 0.0);
  Tensor keys = keys_in;
  if (m_delta) {  // δ's memory's score: its key from the stored value
    g_scores = at::cat({g_scores, -g_scores.sum(-1, true)}, 1);
    keys = at::cat({keys, at::linear(m_delta->squeeze(1), w_k).unsqueeze(1)}, 1);
  }
  // sab.scorer.mlp_scores_grad
  const int64_t B = keys.size(0), k = keys.size(1), d = keys.size(2);
  Tensor sig = at::add(query.unsqueeze(1) * 2, keys, 2).sigmoid_();
  Tensor gv = at::addmv(g_scores.sum(), sig.view({B * k, d}).t(), g_scores.reshape(B * k), -1, 2);
  Tensor g_z = at::addcmul(sig, sig, sig, -1).mul_(g_scores.unsqueeze(-1) * (v * 4));
  g_query.copy_(g_z.sum(1));
  g_v.add_(gv);
  const int64_t m = ids.size(1), H = values.size(2);
  Tensor old;
  if (local) {  // sab.fused._credit / _delta_credit into the chunk-local buffer
    auto local_add = [&](const Tensor& buf, const Tensor& which, Tensor grad) -> Tensor {
      Tensor rel = which - first;
      Tensor mask;
      if (first != 0) {  // sab.fused._old
        Tensor o = which < first;
        if (o.any().item<bool>()) mask = o.unsqueeze(-1);
      }
      if (mask.defined()) {
        rel = rel.clamp_min(0);
        grad = grad.masked_fill(mask, 0);
      }
      Tensor flat = (rel + offsets).reshape(-1);  // sab.memory._flat_rows
      Tensor(buf).index_add_(0, flat, grad.reshape({-1, grad.size(-1)}));
      return mask;
    };
    local_add(*local, ids, at::cat({g_values, g_z.slice(1, 0, m)}, -1));
    if (m_delta) old = local_add(local->slice(1, H), *delta_ids, g_z.slice(1, m));
  }
  return {g_values, g_z, old};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rational_scores", &rational_scores);
  m.def("rank", &rank);
  m.def("lstm_step", &lstm_step);
  m.def("pointwise_backward", &pointwise_backward);
  m.def("lstm_step_backward", &lstm_step_backward);
  m.def("attend_sparse", &attend_sparse);
  m.def("read_backward_sparse", &read_backward_sparse);
}
