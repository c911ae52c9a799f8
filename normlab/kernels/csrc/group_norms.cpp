// Fused CPU kernels of GroupNorm (Wu & He, ECCV 2018, Sec. 3.1, Eq. 1-2 with the group set of Eq. 7) and InstanceNorm
// (Ulyanov, Vedaldi & Lempitsky 2016, Eq. 2: one group per channel) on token tensors, forward and backward.
//
// Layout: a contiguous [B, N, C] view: B samples, N positions each (all the sample's tokens), channels last. The
// statistics of group g of sample b are over its N positions and the cg = C / G channels [g cg, (g + 1) cg), as
// torch.nn.functional.group_norm computes them on the channel-first tensor. float16/bfloat16 accumulate in float32.
//
// Statistics: each sample's rows are cut into fixed blocks of about 32K elements (the size depends on C only, so the
// results do not depend on the thread count). A block is read from memory once: a first pass sums its columns, the
// second (from cache) sums the squared deviations from the block's column means. The (block, channel) moments are then
// merged in block order with the parallel-variance identity (Chan, Golub & LeVeque 1979):
//   mean_g = sum_{k,c in g} S_kc / (N cg),   M2_g = sum_{k,c in g} [Q_kc + n_k (S_kc / n_k - mean_g)^2],
// a sum of non-negative terms (no cancellation, as the two-pass variance); var_g = M2_g / (N cg) (biased).
// Forward:  y = (x - mean_g) * rstd_g * w_c + b_c, rstd = 1 / sqrt(var + eps).
// Backward: with g' = dy * w, M = N cg, Q_g = sum_group g', P_g = sum_group g' (x - mean),
//           dx = rstd g' - rstd Q / M - rstd^3 P (x - mean) / M,
//           dw_c = sum_b rstd_bg sum_n dy (x - mean),   db_c = sum_{b,n} dy.
//           One pass over (x, dy) gives the per-(sample, channel) column sums (block partials summed in block order),
//           a second writes dx.
#include "row_loops.h"

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

namespace {

using namespace normlab_kernels;
using OptT = std::optional<Tensor>;

// The fixed row blocks of one sample: `per` rows each (the last one shorter), `count` of them.
struct SampleBlocks {
  int64_t per, count;
};
inline SampleBlocks sample_blocks(int64_t N, int64_t C) {
  const int64_t per = std::clamp<int64_t>(32768 / std::max<int64_t>(C, 1), 1, std::max<int64_t>(N, 1));
  return {per, std::max<int64_t>(1, (N + per - 1) / per)};
}

// Runs blk(b, r0, n, k) for every block k of every sample b (rows r0 .. r0 + n of sample b), blocks in parallel.
template <typename F>
void for_blocks(int64_t B, int64_t N, const SampleBlocks& sb, F blk) {
  at::parallel_for(0, B * sb.count, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t b = i / sb.count, k = i % sb.count, r0 = k * sb.per;
      blk(b, r0, std::min(N, r0 + sb.per) - r0, i);
    }
  });
}

// Runs f(b, c0, c1) over the [B, C] index space in parallel, ranges split at sample boundaries. Each (b, c) belongs to
// one call, so per-element sums written inside are independent of the split.
template <typename F>
void for_sample_channels(int64_t B, int64_t C, F f) {
  at::parallel_for(0, B * C, 2048, [&](int64_t lo, int64_t hi) {
    while (lo < hi) {
      const int64_t b = lo / C, c0 = lo % C, c1 = std::min(C, c0 + (hi - lo));
      f(b, c0, c1);
      lo += c1 - c0;
    }
  });
}

// dst[c] += f(x_c, g_c, c) for each row of a block.
template <typename T, typename A, typename F>
inline void add_columns(const T* x, const T* g, int64_t rows, int64_t C, A* dst, F f) {
  for (int64_t r = 0; r < rows; ++r) {
    for_each_row(x + r * C, g + r * C, 0, C,
                 [=](auto v, auto gv, int64_t i) { st(dst + i, ld(dst + i, v) + f(v, gv, i)); });
  }
}

std::tuple<Tensor, Tensor, Tensor> gn_fwd(const Tensor& x_, const OptT& w_, const OptT& b_, int64_t groups,
                                          double eps) {
  TORCH_CHECK(x_.dim() == 3, "normlab group_norm: expected a [B, N, C] input, got size ", x_.sizes());
  const Tensor x = x_.contiguous();
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), G = groups;
  TORCH_CHECK(G >= 1 && C % G == 0, "normlab group_norm: expected num_groups dividing ", C, ", got ", G);
  const auto acc = at::toOpMathType(x.scalar_type());
  const auto opts = at::TensorOptions().dtype(acc);
  const Tensor w = acc_param(w_, acc, C, "group_norm"), bias = acc_param(b_, acc, C, "group_norm");
  Tensor y = at::empty_like(x);
  if (x.numel() == 0) {  // statistics of an empty set, as the composite op's mean
    const Tensor nan = at::full({B, G}, std::numeric_limits<double>::quiet_NaN(), opts);
    return {y, nan, nan.clone()};
  }
  const int64_t cg = C / G;
  const SampleBlocks sb = sample_blocks(N, C);
  Tensor part = at::empty({B * sb.count, 2, C}, opts);  // per block: column means S_k / n_k, then Q_k
  Tensor mean = at::empty({B, G}, opts), var = at::empty({B, G}, opts);
  Tensor mu = at::empty({B, C}, opts), scale = at::empty({B, C}, opts), m2 = at::empty({B, C}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "normlab_gn_fwd", [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    const T* xp = x.data_ptr<T>();
    A* pp = part.data_ptr<A>();
    for_blocks(B, N, sb, [&](int64_t b, int64_t r0, int64_t n, int64_t i) {
      const T* xb = xp + (b * N + r0) * C;
      A *s = pp + i * 2 * C, *q = s + C;
      std::fill(s, s + 2 * C, A(0));
      add_columns(xb, xb, n, C, s, [](auto v, auto, int64_t) { return v; });
      const A inv_n = A(1) / static_cast<A>(n);
      for (int64_t c = 0; c < C; ++c) s[c] *= inv_n;  // kept as the block's column means
      add_columns(xb, xb, n, C, q, [=](auto v, auto, int64_t c) {
        const auto d = v - ld(s + c, v);
        return d * d;
      });
    });
    // Merge: column sums over the blocks (in block order), the group means, then each column's M2 about its group's
    // mean, then the group M2.
    A *mup = mu.data_ptr<A>(), *m2p = m2.data_ptr<A>(), *mp = mean.data_ptr<A>(), *vp = var.data_ptr<A>();
    const A inv_m = A(1) / static_cast<A>(N * cg);
    for_sample_channels(B, C, [&](int64_t b, int64_t c0, int64_t c1) {
      A* col = mup + b * C;
      for (int64_t c = c0; c < c1; ++c) col[c] = A(0);
      for (int64_t k = 0; k < sb.count; ++k) {
        const A* s = pp + (b * sb.count + k) * 2 * C;
        const A n = static_cast<A>(std::min(N, (k + 1) * sb.per) - k * sb.per);
        for (int64_t c = c0; c < c1; ++c) col[c] += n * s[c];
      }
    });
    auto group_total = [&](const A* cols, int64_t bg) {  // the sum of one (sample, group)'s columns, in order
      const A* col = cols + (bg / G) * C + (bg % G) * cg;
      A total(0);
      for (int64_t c = 0; c < cg; ++c) total += col[c];
      return total;
    };
    at::parallel_for(0, B * G, 64, [&](int64_t lo, int64_t hi) {
      for (int64_t bg = lo; bg < hi; ++bg) mp[bg] = group_total(mup, bg) * inv_m;
    });
    for_sample_channels(B, C, [&](int64_t b, int64_t c0, int64_t c1) {
      A *col = m2p + b * C, *mean_c = mup + b * C;
      for (int64_t c = c0; c < c1; ++c) {
        col[c] = A(0);
        mean_c[c] = mp[b * G + c / cg];
      }
      for (int64_t k = 0; k < sb.count; ++k) {
        const A* s = pp + (b * sb.count + k) * 2 * C;
        const A *q = s + C, n = static_cast<A>(std::min(N, (k + 1) * sb.per) - k * sb.per);
        for (int64_t c = c0; c < c1; ++c) {
          const A d = s[c] - mean_c[c];
          col[c] += q[c] + n * d * d;
        }
      }
    });
    const A* wp = w.defined() ? w.data_ptr<A>() : nullptr;
    A* sp = scale.data_ptr<A>();
    at::parallel_for(0, B * G, 64, [&](int64_t lo, int64_t hi) {
      for (int64_t bg = lo; bg < hi; ++bg) {
        const int64_t b = bg / G, c0 = (bg % G) * cg;
        vp[bg] = group_total(m2p, bg) * inv_m;
        const A r = A(1) / std::sqrt(vp[bg] + static_cast<A>(eps));
        for (int64_t c = c0; c < c0 + cg; ++c) sp[b * C + c] = wp ? r * wp[c] : r;
      }
    });
    // y = (x - mean) * (rstd w) + b, one sample's row at a time.
    const A* bp = bias.defined() ? bias.data_ptr<A>() : nullptr;
    T* yp = y.data_ptr<T>();
    at::parallel_for(0, B * N, row_grain(C), [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const A *m_ = mup + (r / N) * C, *s_ = sp + (r / N) * C;
        map_row(xp + r * C, xp + r * C, yp + r * C, 0, C, [=](auto v, auto, int64_t i) {
          auto out = (v - ld(m_ + i, v)) * ld(s_ + i, v);
          if (bp) out = out + ld(bp + i, v);
          return out;
        });
      }
    });
  });
  return {y, mean, var};
}

std::tuple<Tensor, Tensor, Tensor> gn_bwd(const Tensor& gy_, const Tensor& x_, const Tensor& mean_,
                                          const Tensor& var_, const OptT& w_, int64_t groups, double eps,
                                          bool need_w, bool need_b) {
  TORCH_CHECK(x_.dim() == 3, "normlab group_norm: expected a [B, N, C] input, got size ", x_.sizes());
  const Tensor x = x_.contiguous(), gy = gy_.to(x.scalar_type()).contiguous();
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), G = groups;
  TORCH_CHECK(G >= 1 && C % G == 0, "normlab group_norm: expected num_groups dividing ", C, ", got ", G);
  const auto acc = at::toOpMathType(x.scalar_type());
  const auto opts = at::TensorOptions().dtype(acc);
  const Tensor w = acc_param(w_, acc, C, "group_norm");
  Tensor dx = at::empty_like(x);
  Tensor dw = need_w ? at::zeros({C}, opts) : empty_grad(x), db = need_b ? at::zeros({C}, opts) : empty_grad(x);
  if (x.numel() == 0) return {dx, dw, db};
  const int64_t cg = C / G;
  const Tensor rstd = (var_.to(acc) + eps).rsqrt().contiguous(), mean = mean_.to(acc).contiguous();
  const SampleBlocks sb = sample_blocks(N, C);
  Tensor part = at::empty({B * sb.count, 2, C}, opts);  // per block: sum dy, sum dy (x - mean)
  Tensor sums = at::empty({B, 2, C}, opts);
  Tensor mu = mean.repeat_interleave(cg, 1).contiguous();  // [B, C]: each channel's group mean
  Tensor k1 = at::empty({B, C}, opts), ka = at::empty({B, C}, opts), kc = at::empty({B, C}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "normlab_gn_bwd", [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    const T *xp = x.data_ptr<T>(), *gp = gy.data_ptr<T>();
    const A *mup = mu.data_ptr<A>(), *rp = rstd.data_ptr<A>();
    A *pp = part.data_ptr<A>(), *sp = sums.data_ptr<A>();
    for_blocks(B, N, sb, [&](int64_t b, int64_t r0, int64_t n, int64_t i) {
      const int64_t off = (b * N + r0) * C;
      const A* m_ = mup + b * C;
      A *s = pp + i * 2 * C, *q = s + C;
      std::fill(s, s + 2 * C, A(0));
      for (int64_t r = 0; r < n; ++r) {
        for_each_row(xp + off + r * C, gp + off + r * C, 0, C, [=](auto v, auto g, int64_t c) {
          st(s + c, ld(s + c, v) + g);
          st(q + c, ld(q + c, v) + g * (v - ld(m_ + c, v)));
        });
      }
    });
    for_sample_channels(B, C, [&](int64_t b, int64_t c0, int64_t c1) {
      A *s = sp + b * 2 * C, *q = s + C;
      for (int64_t c = c0; c < c1; ++c) s[c] = q[c] = A(0);
      for (int64_t k = 0; k < sb.count; ++k) {
        const A* ps = pp + (b * sb.count + k) * 2 * C;
        for (int64_t c = c0; c < c1; ++c) {
          s[c] += ps[c];
          q[c] += ps[C + c];
        }
      }
    });
    // Per group: Q = sum w S1, P = sum w S2; per (sample, channel) the dx coefficients
    // k1 = rstd w, ka = rstd Q / M, kc = rstd^3 P / M.
    const A* wp = w.defined() ? w.data_ptr<A>() : nullptr;
    A *k1p = k1.data_ptr<A>(), *kap = ka.data_ptr<A>(), *kcp = kc.data_ptr<A>();
    const A inv_m = A(1) / static_cast<A>(N * cg);
    at::parallel_for(0, B * G, 64, [&](int64_t lo, int64_t hi) {
      for (int64_t bg = lo; bg < hi; ++bg) {
        const int64_t b = bg / G, c0 = (bg % G) * cg;
        const A *s = sp + b * 2 * C, *q = s + C;
        A qs(0), ps(0);
        for (int64_t c = c0; c < c0 + cg; ++c) {
          qs += wp ? wp[c] * s[c] : s[c];
          ps += wp ? wp[c] * q[c] : q[c];
        }
        const A r = rp[bg], a = r * qs * inv_m, cc = r * r * r * ps * inv_m;
        for (int64_t c = c0; c < c0 + cg; ++c) {
          k1p[b * C + c] = wp ? r * wp[c] : r;
          kap[b * C + c] = a;
          kcp[b * C + c] = cc;
        }
      }
    });
    T* dxp = dx.data_ptr<T>();
    at::parallel_for(0, B * N, row_grain(C), [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const int64_t o = (r / N) * C;
        const A *k1_ = k1p + o, *ka_ = kap + o, *kc_ = kcp + o, *m_ = mup + o;
        map_row(xp + r * C, gp + r * C, dxp + r * C, 0, C, [=](auto v, auto g, int64_t i) {
          return g * ld(k1_ + i, v) - ld(ka_ + i, v) - ld(kc_ + i, v) * (v - ld(m_ + i, v));
        });
      }
    });
    // dw_c = sum_b rstd_bg S2_bc, db_c = sum_b S1_bc, samples in order.
    A* dwp = need_w ? dw.data_ptr<A>() : nullptr;
    A* dbp = need_b ? db.data_ptr<A>() : nullptr;
    if (dwp || dbp) {
      at::parallel_for(0, C, 1024, [&](int64_t lo, int64_t hi) {
        for (int64_t b = 0; b < B; ++b) {
          const A *s = sp + b * 2 * C, *q = s + C;
          for (int64_t c = lo; c < hi; ++c) {
            if (dwp) dwp[c] += rp[b * G + c / cg] * q[c];
            if (dbp) dbp[c] += s[c];
          }
        }
      });
    }
  });
  return {dx, dw, db};
}

}  // namespace

void register_group_norms(pybind11::module& m) {
  m.def("gn_fwd", &gn_fwd);
  m.def("gn_bwd", &gn_bwd);
}
