// The per-step work of sab.fused (the one-node SAB layer) as C++ functions.
//
// The LSTM step and its backward make the same ATen calls, with the same arguments and in the
// same order, as the Python they replace (named above each function), so their results are
// equal bit for bit; what they save is Python's cost per tensor operation (1–3 µs:
// python -m benchmarks.dispatch).  A sparse read (attend_sparse) and its backward
// (read_backward_sparse) are loops of their own over the batch rows: the Python's ~15 and ~30
// tensor operations on a few hundred elements each cost more in ATen's own per-operation
// overhead (allocation, iterator set-up: 3–15 µs each) than in arithmetic.  They sum in their
// own order, so they equal the Python steps to rounding, not bit for bit (tests/test_native.py);
// every path that reads through them (training, evaluation, the sparse engine's forward and
// its recomputations) uses the same code, and so agrees with the others bit for bit.  The
// loop over time, the memory bank's bookkeeping and the credit routing through autograd stay
// in Python.
//
// ``rational_scores`` is the MLP scorer's ranking in one pass over the cached keys
// (sab.scorer.MLPScorer.rank calls it too, so every path ranks with it and selects the same
// memories).  It sums in its own order: equal to the ATen form to rounding, not bit for bit.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <cmath>
#include <limits>
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

namespace {

// a = e^{−2q} (B, d) for the rational form, NaN where |q| exceeds ``limit`` (as
// sab.scorer.MLPScorer.rank: exp(−2q).masked_fill_(|q| > limit, NaN), the mask as a loop)
Tensor exp_query(const Tensor& query, double limit) {
  Tensor a = at::exp(at::mul(query, -2));  // fresh, contiguous
  const Tensor qc = query.contiguous();
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "exp_query", [&] {
    const scalar_t* q = qc.data_ptr<scalar_t>();
    scalar_t* ap = a.data_ptr<scalar_t>();
    for (int64_t i = 0, n = a.numel(); i < n; ++i)
      if (std::abs(q[i]) > limit) ap[i] = std::numeric_limits<scalar_t>::quiet_NaN();
  });
  return a;
}

}  // namespace

// sab.scorer.MLPScorer.rank with the bank's cache (the rational form, falling back to the
// sigmoid form where it gives NaN), the slots shifted by the window's ``start`` as
// sab.cell.rank_memories does: (top (B, k), slots (B, k)).  The same values as the Python; the
// masking of a = e^{−2q} beyond ``limit``, the NaN test and the transform of the k best scores
// are loops here (each an ATen operation or three there).
std::vector<Tensor> rank(const Tensor& query, const Tensor& keys, const Tensor& cache,
                         const Tensor& v, int64_t k, double limit, int64_t start, int64_t tile) {
  static thread_local Tensor scratch;
  bool nan = false;
  Tensor scores = rational_scores(exp_query(query, limit), cache, v);
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "rank_nan", [&] {
    const scalar_t* sp = scores.data_ptr<scalar_t>();
    for (int64_t i = 0, n = scores.numel(); i < n && !nan; ++i) nan = std::isnan(sp[i]);
  });
  if (nan) {  // beyond the rational form's range
    Tensor q2 = at::mul(query, 2);
    scores = tiled_scores(keys, v, tile, scratch, [&](Tensor& out, int64_t lo, int64_t hi) {
      at::add_out(out, rows_of(q2, lo, hi).unsqueeze(1), rows_of(keys, lo, hi), 2)
          .sigmoid_();
    });
  }
  auto [top, index] = scores.topk(k, -1);  // fresh, contiguous
  AT_DISPATCH_FLOATING_TYPES(top.scalar_type(), "rank_top", [&] {
    const scalar_t vsum = v.sum().item<scalar_t>();
    scalar_t* tp = top.data_ptr<scalar_t>();
    int64_t* ip = index.data_ptr<int64_t>();
    for (int64_t i = 0, n = top.numel(); i < n; ++i) {  // 2x − Σv, as top.mul_(2).sub_(Σv)
      const scalar_t twice = tp[i] * 2;
      tp[i] = twice - vsum;
      ip[i] += start;
    }
  });
  return {top, index};
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

// sab.cell.pointwise_backward up to ∂L/∂c(t), as ATen operations: ∂L/∂gates into ``dgates``;
// returns ∂L/∂c(t) (B, H), which ∂L/∂c(t−1) is σ(f) times (what python -m benchmarks.dispatch
// times against the same calls from Python)
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

// the same arithmetic as pointwise_grads in one pass over the batch rows, every operation
// rounded on its own as ATen's (the build has -ffp-contract=off: no fused multiply-adds), so
// the results are the same bits; also ∂L/∂c(t−1) = ∂L/∂c(t)·σ(f) into ``dc_prev``
void pointwise_grads_fused(const Tensor& gh, const Tensor& gc, const Tensor& act,
                           const Tensor& c_prev, const Tensor& tc, Tensor& dgates,
                           Tensor& dc_prev) {
  const int64_t B = c_prev.size(0), H = c_prev.size(1);
  const Tensor ghc = gh.contiguous(), gcc = gc.contiguous(), ac = act.contiguous(),
               cpc = c_prev.contiguous(), tcc = tc.contiguous();
  TORCH_CHECK(dgates.is_contiguous() && dc_prev.is_contiguous(), "pointwise_grads_fused: "
              "contiguous outputs expected");
  AT_DISPATCH_FLOATING_TYPES(ac.scalar_type(), "pointwise_grads_fused", [&] {
    using T = scalar_t;
    at::parallel_for(0, B, 16, [&](int64_t lo, int64_t hi) {
      for (int64_t b = lo; b < hi; ++b) {
        const T *a = ac.data_ptr<T>() + b * 4 * H, *dh = ghc.data_ptr<T>() + b * H,
                *dcn = gcc.data_ptr<T>() + b * H, *cp = cpc.data_ptr<T>() + b * H,
                *t = tcc.data_ptr<T>() + b * H;
        T* dg = dgates.data_ptr<T>() + b * 4 * H;
        T* dcp = dc_prev.data_ptr<T>() + b * H;
        _Pragma("omp simd")
        for (int64_t j = 0; j < H; ++j) {
          const T i = a[j], f = a[H + j], g = a[2 * H + j], o = a[3 * H + j];
          const T tt = t[j] * t[j];
          const T one_m_tt = T(1) - tt;
          T dc = dh[j] * o;
          dc = dc * one_m_tt;
          dc = dc + dcn[j];
          const T gg = g * g;
          const T dg_deriv = -gg + T(1);
          dg[j] = (dc * g) * ((T(1) - i) * i);
          dg[H + j] = (dc * cp[j]) * ((T(1) - f) * f);
          dg[2 * H + j] = (dc * i) * dg_deriv;
          dg[3 * H + j] = (dh[j] * t[j]) * ((T(1) - o) * o);
          dcp[j] = dc * f;
        }
      }
    });
  });
}

Tensor forget_gate(const Tensor& act) {  // σ(f), the second quarter of the activations
  const int64_t H = act.size(1) / 4;
  return act.narrow(1, H, H);
}

}  // namespace

// sab.cell.pointwise_backward as its ATen operations: (∂L/∂gates (B, 4H) in ``dgates``,
// ∂L/∂c_prev (B, H)) — what python -m benchmarks.dispatch times against the Python version
std::vector<Tensor> pointwise_backward(const Tensor& gh, const Tensor& gc, const Tensor& act,
                                       const Tensor& c_prev, const Tensor& tc, Tensor dgates) {
  Tensor dc = pointwise_grads(gh, gc, act, c_prev, tc, dgates);
  return {dgates, dc * forget_gate(act)};
}

// sab.cell.pointwise_backward in one pass (pointwise_grads_fused): the same results
std::vector<Tensor> pointwise_backward_fused(const Tensor& gh, const Tensor& gc,
                                             const Tensor& act, const Tensor& c_prev,
                                             const Tensor& tc, Tensor dgates) {
  Tensor dc_prev = at::empty_like(c_prev, at::MemoryFormat::Contiguous);
  pointwise_grads_fused(gh, gc, act, c_prev, tc, dgates, dc_prev);
  return {dgates, dc_prev};
}

// sab.fused._forward, the LSTM step's backward: sab.cell.pointwise_backward into ``dgates``
// (one pass, bit-identical), then the gradient of the state entering the step (zeros after a
// truncation point ``cut``): (∂L/∂h (B, H), ∂L/∂c (B, H))
std::vector<Tensor> lstm_step_backward(const Tensor& gh, const Tensor& gc, const Tensor& act,
                                       const Tensor& c_prev, const Tensor& tc, Tensor dgates,
                                       const Tensor& w_hh, bool cut) {
  Tensor dc_prev = pointwise_backward_fused(gh, gc, act, c_prev, tc, dgates)[1];
  if (cut) return {at::zeros_like(gh), at::zeros_like(dc_prev)};
  return {at::matmul(dgates, w_hh), dc_prev};
}

namespace {

// pointer to element (b, i, 0) of a (B, m, D) tensor whose last dimension is contiguous
template <typename scalar_t>
inline scalar_t* row3(const Tensor& x, int64_t b, int64_t i) {
  return x.data_ptr<scalar_t>() + b * x.stride(0) + i * x.stride(1);
}

template <typename scalar_t>
inline scalar_t* row2(const Tensor& x, int64_t b) {
  return x.data_ptr<scalar_t>() + b * x.stride(0);
}

void check_rows(const Tensor& x, const char* name) {
  TORCH_CHECK(x.stride(-1) == 1, name, ": the last dimension must be contiguous, strides ",
              x.strides());
}

// batch rows per task of at::parallel_for: a read's row is a few µs of work
constexpr int64_t kRowGrain = 16;

}  // namespace

// sab.fused._attend for a sparse read (n > k_top) of the MLP scorer: the query, the ranking
// (or the replayed ``top``/``ranked``) through ``rank``, then one pass per batch row for the
// rest — the gather of the selected memories' values and keys, the threshold
// (sab.sparsifier.threshold_forward: ã_i = relu(a_i − δ), w_i = ã_i / (Σã + ε)) and
// s(t) = Σ w_i m_i into ``s`` — where the Python makes ~15 tensor operations of a few hundred
// elements each.  Returns query, top, ranked, values, keys, ids, weights, shifted, denom,
// m_delta, delta_ids (the last two undefined without ``delta_grad``).
std::vector<Tensor> attend_sparse(const Tensor& h_hat, const Tensor& w_q, const Tensor& b_q,
                                  const Tensor& v, const Tensor& bank_values,
                                  const Tensor& bank_keys, const Tensor& slot_ids,
                                  const OptTensor& cache, int64_t start, int64_t stop,
                                  int64_t k_top, double eps, bool delta_grad, double limit,
                                  int64_t tile, const OptTensor& replay_top,
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
  const int64_t m = delta_grad ? k_top + 1 : k_top;
  const int64_t H = bank_values.size(2), d = bank_keys.size(2);
  check_rows(bank_values, "bank values");
  check_rows(bank_keys, "bank keys");
  check_rows(s, "s");
  const Tensor topc = top.contiguous(), rankc = ranked.contiguous(), idc = slot_ids.contiguous();
  Tensor values = at::empty({B, m, H}, bank_values.options());
  Tensor keys = at::empty({B, m, d}, bank_keys.options());
  Tensor ids = at::empty({B, m}, slot_ids.options());
  Tensor weights = at::empty({B, k_top}, top.options());
  Tensor shifted = at::empty({B, k_top}, top.options());
  Tensor denom = at::empty({B, 1}, top.options());
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "attend_sparse", [&] {
    const scalar_t* tp = topc.data_ptr<scalar_t>();
    const int64_t* rp = rankc.data_ptr<int64_t>();
    const int64_t* sid = idc.data_ptr<int64_t>();
    int64_t* ip = ids.data_ptr<int64_t>();
    scalar_t *wp = weights.data_ptr<scalar_t>(), *sp = shifted.data_ptr<scalar_t>(),
             *dp = denom.data_ptr<scalar_t>();
    const int64_t kr = topc.size(1);  // k_top + 1 ranked per row
    at::parallel_for(0, B, kRowGrain, [&](int64_t lo, int64_t hi) {
      for (int64_t b = lo; b < hi; ++b) {
        for (int64_t i = 0; i < m; ++i) {  // the gather
          const int64_t slot = rp[b * kr + i];
          std::copy_n(row3<scalar_t>(bank_values, b, slot), H, row3<scalar_t>(values, b, i));
          std::copy_n(row3<scalar_t>(bank_keys, b, slot), d, row3<scalar_t>(keys, b, i));
          ip[b * m + i] = sid[slot];
        }
        const scalar_t delta = tp[b * kr + k_top];  // the (k_top+1)-th score
        scalar_t total = 0;
        for (int64_t i = 0; i < k_top; ++i) {
          const scalar_t x = tp[b * kr + i] - delta;
          const scalar_t r = x > 0 ? x : (x == x ? scalar_t(0) : x);  // relu, NaN kept
          sp[b * k_top + i] = r;
          total += r;
        }
        const scalar_t den = eps > 0 ? total + scalar_t(eps) : (total > 0 ? total : scalar_t(1));
        dp[b] = den;
        scalar_t* out = row2<scalar_t>(s, b);
        std::fill_n(out, H, scalar_t(0));
        for (int64_t i = 0; i < k_top; ++i) {
          const scalar_t w = sp[b * k_top + i] / den;
          wp[b * k_top + i] = w;
          const scalar_t* val = row3<scalar_t>(values, b, i);
          _Pragma("omp simd")
          for (int64_t j = 0; j < H; ++j) out[j] += w * val[j];
        }
      }
    });
  });
  Tensor m_delta, delta_ids;
  if (delta_grad) {
    m_delta = values.slice(1, k_top);
    delta_ids = ids.slice(1, k_top);
    values = values.slice(1, 0, k_top);
    keys = keys.slice(1, 0, k_top);
    ids = ids.slice(1, 0, k_top);
  }
  return {query, top, ranked, values, keys, ids, weights, shifted, denom, m_delta, delta_ids};
}

// sab.fused._read_backward for a sparse read, given ∂L/∂s (B, H), in one pass per batch row
// (the tanh of the scorer's hidden layer, as σ, is one vectorised ATen call before it):
//   ∂L/∂w_i = m_i·ds,  ∂L/∂m_i = w_i ds (values),  ∂L/∂a_i by sab.sparsifier.threshold_grad
//   (and δ's score −Σ_i ∂L/∂a_i with ``m_delta``, its key W_k m_δ recomputed),
//   ∂L/∂z_ij = 4 v_j σ_ij (1 − σ_ij) ∂L/∂a_i with σ_ij = σ(2 q_j + 2 k_ij) (the keys' and,
//   summed over i, the query's gradient: sab.scorer.mlp_scores_grad), ∂L/∂v_j = Σ ∂L/∂a_i (2σ_ij − 1).
// ∂L/∂v is added into ``g_v``, ∂L/∂query written into ``g_query``; with ``local`` (the
// chunk-local buffer (B·n_local, H + d), rows [value | key], and the chunk's first memory id
// ``first``) the credit of this chunk's memories is added there (sab.fused._credit and
// _delta_credit), memories of earlier chunks left out.  Returns ∂L/∂values (B, k, H),
// ∂L/∂keys (B, k(+1), d; δ's memory last) and, with ``local`` and ``m_delta``, ``old``
// (B, 1, 1): where δ's memory came from an earlier chunk (its key's gradient then goes to W_k
// through the caller; undefined when none did).
std::vector<Tensor> read_backward_sparse(const Tensor& ds, const Tensor& values,
                                         const Tensor& keys, const Tensor& weights,
                                         const Tensor& shifted, const Tensor& denom,
                                         const Tensor& query, const Tensor& v,
                                         const Tensor& w_k, const OptTensor& m_delta,
                                         Tensor g_query, Tensor g_v, const Tensor& ids,
                                         const OptTensor& delta_ids, const OptTensor& local,
                                         int64_t first, int64_t n_local) {
  const int64_t B = values.size(0), k = values.size(1), H = values.size(2), d = keys.size(2);
  const int64_t kk = m_delta ? k + 1 : k;
  for (auto [x, name] : {std::pair<const Tensor*, const char*>{&ds, "ds"}, {&values, "values"},
                         {&keys, "keys"}, {&query, "query"}, {&g_query, "g_query"}})
    check_rows(*x, name);
  const Tensor key_delta = m_delta ? at::linear(m_delta->squeeze(1), w_k) : Tensor();  // (B, d)
  const Tensor wc = weights.contiguous(), shc = shifted.contiguous(), dnc = denom.contiguous();
  const Tensor vc = v.contiguous(), idc = ids.contiguous();
  const Tensor didc = delta_ids ? delta_ids->contiguous() : Tensor();
  Tensor sig = at::empty({B, kk, d}, keys.options());
  Tensor g_values = at::empty({B, k, H}, values.options());
  Tensor g_z = at::empty({B, kk, d}, keys.options());
  Tensor g_scores = at::empty({B, kk}, weights.options());
  Tensor gv_rows = at::empty({B, d}, v.options());
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "read_backward_sparse", [&] {
    // the scorer's pre-activations 2q + 2k, then σ of them all at once
    at::parallel_for(0, B, kRowGrain, [&](int64_t lo, int64_t hi) {
      for (int64_t b = lo; b < hi; ++b) {
        const scalar_t* q = row2<scalar_t>(query, b);
        for (int64_t i = 0; i < kk; ++i) {
          const scalar_t* key = i < k ? row3<scalar_t>(keys, b, i) : row2<scalar_t>(key_delta, b);
          scalar_t* z = row3<scalar_t>(sig, b, i);
          _Pragma("omp simd")
          for (int64_t j = 0; j < d; ++j) z[j] = q[j] * 2 + key[j] * 2;
        }
      }
    });
    sig.sigmoid_();
    const scalar_t *wp = wc.data_ptr<scalar_t>(), *shp = shc.data_ptr<scalar_t>(),
                   *dnp = dnc.data_ptr<scalar_t>(), *vp = vc.data_ptr<scalar_t>();
    const int64_t* ip = idc.data_ptr<int64_t>();
    scalar_t* gsp = g_scores.data_ptr<scalar_t>();
    scalar_t* loc = local ? local->data_ptr<scalar_t>() : nullptr;
    const int64_t ld = H + d;  // a row [value | key] of the local buffer
    at::parallel_for(0, B, kRowGrain, [&](int64_t lo, int64_t hi) {
      for (int64_t b = lo; b < hi; ++b) {
        const scalar_t* dsb = row2<scalar_t>(ds, b);
        const scalar_t* w = wp + b * k;
        scalar_t* gs = gsp + b * kk;
        scalar_t ga = 0;  // Σ_i w_i ∂L/∂w_i
        for (int64_t i = 0; i < k; ++i) {
          const scalar_t* val = row3<scalar_t>(values, b, i);
          scalar_t* gval = row3<scalar_t>(g_values, b, i);
          scalar_t dw = 0;
          _Pragma("omp simd reduction(+ : dw)")
          for (int64_t j = 0; j < H; ++j) {
            dw += val[j] * dsb[j];
            gval[j] = w[i] * dsb[j];
          }
          gs[i] = dw;
          ga += dw * w[i];
        }
        scalar_t gsum = 0;
        for (int64_t i = 0; i < k; ++i) {  // sab.sparsifier.threshold_grad
          gs[i] = shp[b * k + i] > 0 ? (gs[i] - ga) / dnp[b] : scalar_t(0);
          gsum += gs[i];
        }
        if (kk > k) gs[k] = -gsum;  // δ's score: a_δ enters every ã_i with sign −1
        scalar_t* gq = row2<scalar_t>(g_query, b);
        scalar_t* gv = gv_rows.data_ptr<scalar_t>() + b * d;
        std::fill_n(gq, d, scalar_t(0));
        std::fill_n(gv, d, scalar_t(0));
        for (int64_t i = 0; i < kk; ++i) {
          const scalar_t* sg = row3<scalar_t>(sig, b, i);
          scalar_t* gz = row3<scalar_t>(g_z, b, i);
          const scalar_t g = gs[i];
          _Pragma("omp simd")
          for (int64_t j = 0; j < d; ++j) {
            gz[j] = (sg[j] - sg[j] * sg[j]) * (g * (vp[j] * 4));
            gq[j] += gz[j];
            gv[j] += g * (sg[j] * 2 - 1);
          }
        }
        if (loc == nullptr) continue;
        auto add_row = [&](int64_t id, const scalar_t* gval, const scalar_t* gkey) {
          if (id < first) return;  // a memory of an earlier chunk: not this buffer's
          scalar_t* dst = loc + (b * n_local + (id - first)) * ld;
          if (gval != nullptr) {
            _Pragma("omp simd")
            for (int64_t j = 0; j < H; ++j) dst[j] += gval[j];
          }
          _Pragma("omp simd")
          for (int64_t j = 0; j < d; ++j) dst[H + j] += gkey[j];
        };
        for (int64_t i = 0; i < k; ++i)
          add_row(ip[b * k + i], row3<scalar_t>(g_values, b, i), row3<scalar_t>(g_z, b, i));
        if (kk > k) add_row(didc.data_ptr<int64_t>()[b], nullptr, row3<scalar_t>(g_z, b, k));
      }
    });
  });
  g_v.add_(gv_rows.sum(0));
  Tensor old;
  if (local && m_delta && first != 0) {  // sab.fused._old
    Tensor o = at::lt(*delta_ids, first);
    if (o.any().item<bool>()) old = o.unsqueeze(-1);
  }
  return {g_values, g_z, old};
}

// sab.fused._attend for a dense read (softmax over every memory of the window [start, stop):
// the self-attention baseline, and SAB while n ≤ k_top) of the MLP scorer, one pass per batch
// row: the scores v·tanh(q + k_i) in the rational form of the ranking (σ(2q + 2k) =
// 1 / (1 + e^{−2q}·e^{−2k}), over the bank's cache ``cache`` = e^{−2k}), the softmax and
// s(t) = Σ w_i m_i into ``s``.  Returns query, a = e^{−2q} (B, d), the window's values
// (B, n, H) and cache rows (B, n, d) for the backward — copies with ``copy`` (a bank bounded by
// max_memories rewrites its slots in place), else views of the bank's buffers (an append-only
// bank never changes a written slot: it grows into new buffers) — ids (B, n), weights (B, n)
// — or nothing where the
// rational form gives NaN (a query or key beyond ``limit``): the caller then reads as the
// Python does, through the sigmoid.  Equal to sab.cell's dense read to rounding.
std::vector<Tensor> attend_dense(const Tensor& h_hat, const Tensor& w_q, const Tensor& b_q,
                                 const Tensor& v, const Tensor& bank_values,
                                 const Tensor& cache, const Tensor& slot_ids, int64_t start,
                                 int64_t stop, double limit, bool copy, Tensor s) {
  const int64_t B = h_hat.size(0), n = stop - start, H = bank_values.size(2),
                d = cache.size(2);
  check_rows(bank_values, "bank values");
  check_rows(cache, "cache");
  check_rows(s, "s");
  Tensor query = at::linear(h_hat, w_q, b_q);
  Tensor a = exp_query(query, limit);
  const Tensor vc = v.contiguous();
  Tensor values = copy ? at::empty({B, n, H}, bank_values.options())
                       : bank_values.slice(1, start, stop);
  Tensor crows = copy ? at::empty({B, n, d}, cache.options()) : cache.slice(1, start, stop);
  Tensor weights = at::empty({B, n}, h_hat.options());
  // (a copy: the bank's slots may be rewritten later in the chunk)
  Tensor ids = slot_ids.slice(0, start, stop).clone().unsqueeze(0).expand({B, n});
  std::atomic<bool> nan{false};
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "attend_dense", [&] {
    using T = scalar_t;
    const T* ap = a.data_ptr<T>();
    const T* vp = vc.data_ptr<T>();
    const T vsum = v.sum().template item<T>();
    at::parallel_for(0, B, 4, [&](int64_t lo, int64_t hi) {
      for (int64_t b = lo; b < hi; ++b) {
        const T* ab = ap + b * d;
        T* w = weights.data_ptr<T>() + b * n;
        T top = -std::numeric_limits<T>::infinity();
        for (int64_t i = 0; i < n; ++i) {
          const T* cb = row3<T>(cache, b, start + i);
          if (copy) {
            std::copy_n(row3<T>(bank_values, b, start + i), H, row3<T>(values, b, i));
            std::copy_n(cb, d, row3<T>(crows, b, i));
          }
          T acc = 0;
          _Pragma("omp simd reduction(+ : acc)")
          for (int64_t j = 0; j < d; ++j) acc += vp[j] / (T(1) + ab[j] * cb[j]);
          const T score = acc * 2 - vsum;  // Σ v_j tanh(q_j + k_ij)
          if (std::isnan(score)) nan = true;
          w[i] = score;
          top = std::max(top, score);
        }
        T total = 0;
        for (int64_t i = 0; i < n; ++i) {
          w[i] = std::exp(w[i] - top);
          total += w[i];
        }
        T* out = row2<T>(s, b);
        std::fill_n(out, H, T(0));
        for (int64_t i = 0; i < n; ++i) {
          w[i] /= total;
          const T* val = row3<T>(values, b, i);
          _Pragma("omp simd")
          for (int64_t j = 0; j < H; ++j) out[j] += w[i] * val[j];
        }
      }
    });
  });
  if (nan) return {};
  return {query, a, values, crows, ids, weights};
}

// sab.fused._read_backward for a dense read of attend_dense, given ∂L/∂s (B, H), one pass per
// batch row: ∂L/∂w_i = m_i·ds, ∂L/∂m_i = w_i ds, the softmax's ∂L/∂a_i = w_i (∂L/∂w_i −
// Σ_k w_k ∂L/∂w_k), and the scorer's as in read_backward_sparse with σ_ij = 1 / (1 + a_j c_ij)
// from the saved cache rows (no exponential).  ∂L/∂v is added into ``g_v``, ∂L/∂query written
// into ``g_query``.  With ``local`` (rows [value | key] of the chunk-local buffer) this chunk's
// memories' credit is added there directly (memories of earlier chunks left out) and nothing
// else is returned; without it (a carried graph takes the credit) returns ∂L/∂values (B, n, H)
// and ∂L/∂keys (B, n, d).
std::vector<Tensor> read_backward_dense(const Tensor& ds, const Tensor& values,
                                        const Tensor& crows, const Tensor& weights,
                                        const Tensor& a, const Tensor& v, Tensor g_query,
                                        Tensor g_v, const Tensor& ids, const OptTensor& local,
                                        int64_t first, int64_t n_local) {
  const int64_t B = values.size(0), n = values.size(1), H = values.size(2), d = crows.size(2);
  check_rows(ds, "ds");
  check_rows(g_query, "g_query");
  check_rows(values, "values");
  check_rows(crows, "cache rows");
  const Tensor vc = v.contiguous(), ac = a.contiguous(), wc = weights.contiguous(),
               idc = ids.contiguous();
  Tensor g_values, g_z;  // without ``local``: the credit accumulates here instead
  if (!local) {
    g_values = at::zeros({B, n, H}, values.options());
    g_z = at::zeros({B, n, d}, crows.options());
  }
  Tensor gv_rows = at::empty({B, d}, v.options());
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "read_backward_dense", [&] {
    using T = scalar_t;
    const T *vp = vc.data_ptr<T>(), *ap = ac.data_ptr<T>(), *wp = wc.data_ptr<T>();
    const int64_t* ip = idc.data_ptr<int64_t>();
    T* loc = local ? local->data_ptr<T>() : nullptr;
    const int64_t ld = H + d;
    at::parallel_for(0, B, 4, [&](int64_t lo, int64_t hi) {
      std::vector<T> gs(n);
      for (int64_t b = lo; b < hi; ++b) {
        const T* dsb = row2<T>(ds, b);
        const T* w = wp + b * n;
        T ga = 0;
        for (int64_t i = 0; i < n; ++i) {
          const T* val = row3<T>(values, b, i);
          T dw = 0;
          _Pragma("omp simd reduction(+ : dw)")
          for (int64_t j = 0; j < H; ++j) dw += val[j] * dsb[j];
          gs[i] = dw;
          ga += dw * w[i];
        }
        T* gq = row2<T>(g_query, b);
        T* gv = gv_rows.data_ptr<T>() + b * d;
        std::fill_n(gq, d, T(0));
        std::fill_n(gv, d, T(0));
        const T* ab = ap + b * d;
        for (int64_t i = 0; i < n; ++i) {
          const T g = w[i] * (gs[i] - ga);  // the softmax's backward
          const T* cb = row3<T>(crows, b, i);
          // where the memory's credit goes: its local row, the outputs, or nowhere (a memory
          // of an earlier chunk carried without a graph: only the query's and v's part)
          T *gval = nullptr, *gz = nullptr;
          if (loc == nullptr) {
            gval = row3<T>(g_values, b, i);
            gz = row3<T>(g_z, b, i);
          } else if (ip[b * n + i] >= first) {
            gval = loc + (b * n_local + (ip[b * n + i] - first)) * ld;
            gz = gval + H;
          }
          if (gval != nullptr) {
            _Pragma("omp simd")
            for (int64_t j = 0; j < H; ++j) gval[j] += w[i] * dsb[j];
          }
          _Pragma("omp simd")
          for (int64_t j = 0; j < d; ++j) {
            const T sg = T(1) / (T(1) + ab[j] * cb[j]);
            const T z = (sg - sg * sg) * (g * (vp[j] * 4));
            if (gz != nullptr) gz[j] += z;
            gq[j] += z;
            gv[j] += g * (sg * 2 - 1);
          }
        }
      }
    });
  });
  g_v.add_(gv_rows.sum(0));
  if (local) return {};
  return {g_values, g_z};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rational_scores", &rational_scores);
  m.def("rank", &rank);
  m.def("lstm_step", &lstm_step);
  m.def("pointwise_backward", &pointwise_backward);
  m.def("pointwise_backward_fused", &pointwise_backward_fused);
  m.def("lstm_step_backward", &lstm_step_backward);
  m.def("attend_sparse", &attend_sparse);
  m.def("read_backward_sparse", &read_backward_sparse);
  m.def("attend_dense", &attend_dense);
  m.def("read_backward_dense", &read_backward_dense);
}
