// Fused CPU kernels for the training forward/backward of the batch-statistic norms on token tensors: BatchNorm with
// a padding mask (Ioffe & Szegedy 2015) and RepBN, BatchNorm plus a learnable scalar skip alpha * x (Guo et al.,
// SLAB, ICML 2024, Eq. 3).
//
// Layout: a contiguous [T, C] view (rows = tokens, channels last); `mask` is a [T] bool tensor (true = valid) or
// absent. The statistics are per channel over the valid rows, so they are column reductions: each fixed block of rows
// accumulates a [C] partial (vectorised along the channels), and the partials are summed block by block in a fixed
// order, so results do not depend on the thread count. Mean first, then the centred second moment (two passes, as
// the composite op, which avoids the cancellation of E[x^2] - E[x]^2). float16/bfloat16 accumulate in float32.
//
// Forward:  mean_c = sum_valid x / n, var_c = sum_valid (x - mean)^2 / n (biased), r_c = 1 / sqrt(var_c + eps),
//           y = (x - mean) * r * w + b + alpha * x for every row (padding rows are normalised with the same
//           statistics, as the composite op does).
// Backward: every row's output depends on (mean, var), only valid rows feed them. With g' = gy * w and
//           xhat = (x - mean) * r, S1 = sum_all g', S2 = sum_all g' xhat (per channel):
//           dx = g' r + alpha gy - valid * r (S1 + xhat S2) / n,  dw = sum_all gy xhat,  db = sum_all gy,
//           dalpha = sum_all gy x.
#include "row_loops.h"

#include <optional>
#include <tuple>

namespace {

using namespace normlab_kernels;
using OptT = std::optional<Tensor>;

bool has(const OptT& t) { return t.has_value() && t->defined(); }

double alpha_of(const OptT& t) {
  if (!has(t)) return 0.0;
  TORCH_CHECK(t->numel() == 1, "normlab rep_batch_norm: expected a one-element alpha, got size ", t->sizes());
  return t->item<double>();
}

const bool* mask_ptr(const Tensor& m) { return m.defined() ? m.data_ptr<bool>() : nullptr; }

// K per-channel sums in one pass: partial[blk] += op(row) over the rows of each fixed block (valid rows only when
// `valid`), then the block partials are summed in block order. op(x_row, g_row, dst) adds one row's contributions
// to dst[0:K*C) (sum k at dst + k*C). Returns the [K*C] sums.
template <typename T, typename A, typename RowOp>
Tensor column_sums(const T* x, const T* g, int64_t T_, int64_t C, int64_t K, const bool* valid, at::ScalarType acc,
                   RowOp op) {
  const Blocks bl = make_blocks(T_);
  const int64_t width = K * C;
  Tensor partial = at::zeros({bl.count, width}, at::TensorOptions().dtype(acc));
  A* pp = partial.data_ptr<A>();
  at::parallel_for(0, bl.count, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t blk = lo; blk < hi; ++blk) {
      const int64_t end = std::min(T_, (blk + 1) * bl.per);
      for (int64_t r = blk * bl.per; r < end; ++r) {
        if (valid && !valid[r]) continue;
        op(x + r * C, g + r * C, pp + blk * width);
      }
    }
  });
  return sum_partials(partial);
}

// dst[i] += f(x_i, g_i, i) over one row.
template <typename T, typename A, typename F>
inline void accumulate_row(const T* x, const T* g, A* dst, int64_t C, F f) {
  for_each_row(x, g, 0, C, [=](auto v, auto gv, int64_t i) { st(dst + i, ld(dst + i, v) + f(v, gv, i)); });
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bn_fwd(const Tensor& x_, const OptT& mask_, const OptT& w_,
                                                  const OptT& b_, const OptT& alpha_, double eps) {
  TORCH_CHECK(x_.dim() == 2, "normlab batch_norm: expected a [T, C] input, got size ", x_.sizes());
  const Tensor x = x_.contiguous();
  const int64_t T_ = x.size(0), C = x.size(1);
  const Tensor mask = mask_.has_value() && mask_->defined() ? mask_->to(at::kBool).contiguous() : Tensor();
  TORCH_CHECK(!mask.defined() || mask.numel() == T_, "normlab batch_norm: expected a mask of ", T_, " rows");
  const auto acc = at::toOpMathType(x.scalar_type());
  const Tensor w = acc_param(w_, acc, C, "batch_norm"), b = acc_param(b_, acc, C, "batch_norm");
  const double alpha = alpha_of(alpha_);
  const int64_t n = mask.defined() ? mask.sum().item<int64_t>() : T_;
  Tensor y = at::empty_like(x), mean, var;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "normlab_bn_fwd", [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    const T* xp = x.data_ptr<T>();
    const bool* vp = mask_ptr(mask);
    const A inv_n = A(1) / static_cast<A>(std::max<int64_t>(n, 1));
    mean = column_sums<T, A>(xp, xp, T_, C, 1, vp, acc, [=](const T* xr, const T*, A* dst) {
      accumulate_row(xr, xr, dst, C, [](auto v, auto, int64_t) { return v; });
    });
    mean.mul_(inv_n);
    const A* mp = mean.data_ptr<A>();
    var = column_sums<T, A>(xp, xp, T_, C, 1, vp, acc, [=](const T* xr, const T*, A* dst) {
      accumulate_row(xr, xr, dst, C, [=](auto v, auto, int64_t i) {
        const auto d = v - ld(mp + i, v);
        return d * d;
      });
    });
    var.mul_(inv_n);
    // Per-channel scale r * w; the write computes (x - mean) * scale + b + alpha x.
    Tensor scale = (var + eps).rsqrt_();
    if (w.defined()) scale.mul_(w);
    const A* sp = scale.data_ptr<A>();
    const A* bp = b.defined() ? b.data_ptr<A>() : nullptr;
    const A al = static_cast<A>(alpha);
    const bool with_alpha = has(alpha_);
    T* yp = y.data_ptr<T>();
    at::parallel_for(0, T_, row_grain(C), [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        map_row(xp + r * C, xp + r * C, yp + r * C, 0, C, [=](auto v, auto, int64_t i) {
          using VV = decltype(v);
          auto out = (v - ld(mp + i, v)) * ld(sp + i, v);
          if (bp) out = out + ld(bp + i, v);
          if (with_alpha) out = out + VV(al) * v;
          return out;
        });
      }
    });
  });
  Tensor count = at::full({}, static_cast<double>(n), at::TensorOptions().dtype(acc));
  return {y, mean, var, count};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bn_bwd(const Tensor& gy_, const Tensor& x_, const OptT& mask_,
                                                  const Tensor& mean_, const Tensor& var_, const OptT& w_,
                                                  const OptT& alpha_, double eps, bool need_w, bool need_b,
                                                  bool need_alpha) {
  const Tensor x = x_.contiguous(), gy = gy_.to(x.scalar_type()).contiguous();
  const int64_t T_ = x.size(0), C = x.size(1);
  const Tensor mask = mask_.has_value() && mask_->defined() ? mask_->to(at::kBool).contiguous() : Tensor();
  const auto acc = at::toOpMathType(x.scalar_type());
  const Tensor w = acc_param(w_, acc, C, "batch_norm");
  const Tensor mean = mean_.to(acc).contiguous(), rstd = (var_.to(acc) + eps).rsqrt();
  const double alpha = alpha_of(alpha_);
  const int64_t n = mask.defined() ? mask.sum().item<int64_t>() : T_;
  Tensor dx = at::empty_like(x), sg, sgx, dalpha;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "normlab_bn_bwd", [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    const T *xp = x.data_ptr<T>(), *gp = gy.data_ptr<T>();
    const A *mp = mean.data_ptr<A>(), *rp = rstd.data_ptr<A>();
    // One pass over (x, gy), all rows: sum gy, sum gy * (x - mean), and sum gy * x when alpha is learned.
    const int64_t K = need_alpha ? 3 : 2;
    Tensor sums = column_sums<T, A>(xp, gp, T_, C, K, nullptr, acc, [=](const T* xr, const T* gr, A* dst) {
      A *d0 = dst, *d1 = dst + C, *d2 = need_alpha ? dst + 2 * C : nullptr;
      for_each_row(xr, gr, 0, C, [=](auto v, auto g, int64_t i) {
        st(d0 + i, ld(d0 + i, v) + g);
        st(d1 + i, ld(d1 + i, v) + g * (v - ld(mp + i, v)));
        if (d2) st(d2 + i, ld(d2 + i, v) + g * v);
      });
    });
    sg = sums.narrow(0, 0, C);
    sgx = sums.narrow(0, C, C);
    if (need_alpha) dalpha = sums.narrow(0, 2 * C, C).sum().reshape({1});
    // dx = k1 gy - valid (a + c (x - mean)), k1 = r w + alpha, a = r w S1' / n, c = r^3 w S2' / n, with
    // S1' = sum gy, S2' = sum gy (x - mean) (w factored out).
    Tensor rw = w.defined() ? rstd * w : rstd;
    const double inv_n = 1.0 / static_cast<double>(std::max<int64_t>(n, 1));
    Tensor k1 = rw + alpha;
    Tensor a = rw * sg * inv_n;
    Tensor c = rw * rstd * rstd * sgx * inv_n;
    const A *k1p = k1.data_ptr<A>(), *ap = a.data_ptr<A>(), *cp = c.data_ptr<A>();
    const bool* vp = mask_ptr(mask);
    T* dxp = dx.data_ptr<T>();
    at::parallel_for(0, T_, row_grain(C), [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const T *xr = xp + r * C, *gr = gp + r * C;
        if (vp && !vp[r]) {
          map_row(xr, gr, dxp + r * C, 0, C, [=](auto v, auto g, int64_t i) { return g * ld(k1p + i, v); });
        } else {
          map_row(xr, gr, dxp + r * C, 0, C, [=](auto v, auto g, int64_t i) {
            return g * ld(k1p + i, v) - ld(ap + i, v) - ld(cp + i, v) * (v - ld(mp + i, v));
          });
        }
      }
    });
  });
  // dw = sum gy * xhat = r * S2', db = S1'.
  Tensor dw = need_w ? sgx * rstd : empty_grad(x);
  return {dx, dw, need_b ? sg : empty_grad(x), need_alpha ? dalpha : empty_grad(x)};
}

}  // namespace

void register_power_norm(pybind11::module& m);

void register_batch_norms(pybind11::module& m) {
  m.def("bn_fwd", &bn_fwd);
  m.def("bn_bwd", &bn_bwd);
  register_power_norm(m);
}

// ------------------------------------------------------------------------------------------------- PowerNorm ----
//
// PowerNorm (Shen et al., ICML 2020, Alg. 1 and the official MaskPowerNorm code) on token rows: an optional
// GroupScaling per row (each of `groups` groups of channels divided by its root mean square, eps `gs_eps`; groups = 0:
// none), then z = xs * inv_fwd (per channel), y = z * w + b. The statistics are the column quadratic means of xs over
// the valid rows; the step logic between the passes runs in Python on [C] tensors. The backward is the paper's
// approximate recursion: g = dy * w, g~ = g - (1 - alpha_bkw) u z (u: the running mean-gradient projection),
// s = sum_all g~ z (the caller adds s / positions to u), dxs = g~ * inv_bwd, then the GroupScaling backward.
namespace {

// xs = GroupScaling(x) of one row into `out` (accumulation type), groups of C / groups channels.
template <typename T, typename A>
inline void group_scale_row(const T* x, A* out, int64_t C, int64_t groups, double gs_eps, A* rg) {
  const int64_t n = groups > 0 ? C / groups : C;
  for (int64_t g = 0; g < std::max<int64_t>(groups, 1); ++g) {
    const int64_t lo = g * n, hi = lo + n;
    A r = A(1);
    if (groups > 0) {
      const A ss = reduce_row(x, x, lo, hi, [](auto v, auto, int64_t) { return v * v; });
      r = A(1) / std::sqrt(ss / A(n) + static_cast<A>(gs_eps));
    }
    if (rg) rg[g] = r;
    for (int64_t i = lo; i < hi; ++i) out[i] = A(x[i]) * r;
  }
}

Tensor pn_stats(const Tensor& x_, const OptT& mask_, int64_t groups, double gs_eps) {
  const Tensor x = x_.contiguous();
  const int64_t T_ = x.size(0), C = x.size(1);
  const Tensor mask = has(mask_) ? mask_->to(at::kBool).contiguous() : Tensor();
  const auto acc = at::toOpMathType(x.scalar_type());
  Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "normlab_pn_stats", [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    const T* xp = x.data_ptr<T>();
    out = column_sums<T, A>(xp, xp, T_, C, 1, mask_ptr(mask), acc, [=](const T* xr, const T*, A* dst) {
      std::vector<A> xs(C);
      group_scale_row(xr, xs.data(), C, groups, gs_eps, static_cast<A*>(nullptr));
      at::vec::map2([](auto d, auto v) { return d + v * v; }, dst, dst, xs.data(), C);
    });
  });
  return out;
}

Tensor pn_apply(const Tensor& x_, const Tensor& inv_, const OptT& w_, const OptT& b_, int64_t groups,
                double gs_eps) {
  const Tensor x = x_.contiguous();
  const int64_t T_ = x.size(0), C = x.size(1);
  const auto acc = at::toOpMathType(x.scalar_type());
  Tensor scale = inv_.to(acc).contiguous();
  const Tensor w = acc_param(w_, acc, C, "batch_norm"), b = acc_param(b_, acc, C, "batch_norm");
  if (w.defined()) scale = scale * w;
  Tensor y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "normlab_pn_apply", [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    const T* xp = x.data_ptr<T>();
    T* yp = y.data_ptr<T>();
    const A* sp = scale.data_ptr<A>();
    const A* bp = b.defined() ? b.data_ptr<A>() : nullptr;
    at::parallel_for(0, T_, row_grain(C), [&](int64_t lo, int64_t hi) {
      std::vector<A> xs(C);
      for (int64_t r = lo; r < hi; ++r) {
        group_scale_row(xp + r * C, xs.data(), C, groups, gs_eps, static_cast<A*>(nullptr));
        T* yr = yp + r * C;
        for (int64_t i = 0; i < C; ++i) yr[i] = T(bp ? xs[i] * sp[i] + bp[i] : xs[i] * sp[i]);
      }
    });
  });
  return y;
}

// Returns (dx, s, dw, db): s = sum_all g~ z per channel, dw = sum dy z, db = sum dy (compute dtype).
std::tuple<Tensor, Tensor, Tensor, Tensor> pn_bwd(const Tensor& gy_, const Tensor& x_, const Tensor& inv_fwd_,
                                                  const Tensor& inv_bwd_, const OptT& w_, const Tensor& u_,
                                                  double alpha_bkw, int64_t groups, double gs_eps, bool need_w,
                                                  bool need_b) {
  const Tensor x = x_.contiguous(), gy = gy_.to(x.scalar_type()).contiguous();
  const int64_t T_ = x.size(0), C = x.size(1);
  const auto acc = at::toOpMathType(x.scalar_type());
  const Tensor w = acc_param(w_, acc, C, "batch_norm");
  const Tensor fw = inv_fwd_.to(acc).contiguous(), bw = inv_bwd_.to(acc).contiguous();
  const Tensor u = (u_.to(acc) * (1.0 - alpha_bkw)).contiguous();
  Tensor dx = at::empty_like(x), sums;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "normlab_pn_bwd", [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    const T *xp = x.data_ptr<T>(), *gp = gy.data_ptr<T>();
    const A *fwp = fw.data_ptr<A>(), *bwp = bw.data_ptr<A>(), *up = u.data_ptr<A>();
    const A* wp = w.defined() ? w.data_ptr<A>() : nullptr;
    T* dxp = dx.data_ptr<T>();
    const int64_t n = groups > 0 ? C / groups : C;
    sums = column_sums<T, A>(xp, gp, T_, C, 3, nullptr, acc, [=](const T* xr, const T* gr, A* dst) {
      std::vector<A> xs(C), dxs(C), rg(std::max<int64_t>(groups, 1));
      group_scale_row(xr, xs.data(), C, groups, gs_eps, rg.data());
      A *ds = dst, *dw = dst + C, *db = dst + 2 * C;
      for (int64_t i = 0; i < C; ++i) {
        const A z = xs[i] * fwp[i], dy = A(gr[i]);
        const A gt = (wp ? dy * wp[i] : dy) - up[i] * z;
        ds[i] += gt * z;
        dw[i] += dy * z;
        db[i] += dy;
        dxs[i] = gt * bwp[i];
      }
      T* dr = dxp + (xr - xp);
      for (int64_t g = 0; g < std::max<int64_t>(groups, 1); ++g) {  // GroupScaling backward per group
        const int64_t lo = g * n, hi = lo + n;
        if (groups == 0) {
          for (int64_t i = lo; i < hi; ++i) dr[i] = T(dxs[i]);
          continue;
        }
        const A r = rg[g];
        A dot(0);
        for (int64_t i = lo; i < hi; ++i) dot += dxs[i] * A(xr[i]);
        const A c = r * r * r * dot / A(n);
        for (int64_t i = lo; i < hi; ++i) dr[i] = T(dxs[i] * r - c * A(xr[i]));
      }
    });
  });
  // Separate tensors: a custom op's outputs may not alias one another.
  Tensor dw = need_w ? sums.narrow(0, C, C).clone() : empty_grad(x);
  Tensor db = need_b ? sums.narrow(0, 2 * C, C).clone() : empty_grad(x);
  return {dx, sums.narrow(0, 0, C).clone(), dw, db};
}

// UnifiedNorm's backward (Yang et al., ACM MM 2022): its smoothing needs the batch's column sums before dx, so two
// passes. un_sums: (sum gy, sum gy * x) per channel over all rows; un_dx: dx = gy * a - x * b per channel.
Tensor un_sums(const Tensor& gy_, const Tensor& x_) {
  const Tensor x = x_.contiguous(), gy = gy_.to(x.scalar_type()).contiguous();
  const int64_t T_ = x.size(0), C = x.size(1);
  const auto acc = at::toOpMathType(x.scalar_type());
  Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "normlab_un_sums", [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    out = column_sums<T, A>(x.data_ptr<T>(), gy.data_ptr<T>(), T_, C, 2, nullptr, acc,
                            [=](const T* xr, const T* gr, A* dst) {
                              A *d0 = dst, *d1 = dst + C;
                              for_each_row(xr, gr, 0, C, [=](auto v, auto g, int64_t i) {
                                st(d0 + i, ld(d0 + i, v) + g);
                                st(d1 + i, ld(d1 + i, v) + g * v);
                              });
                            });
  });
  return out;
}

Tensor un_dx(const Tensor& gy_, const Tensor& x_, const Tensor& a_, const Tensor& b_) {
  const Tensor x = x_.contiguous(), gy = gy_.to(x.scalar_type()).contiguous();
  const int64_t T_ = x.size(0), C = x.size(1);
  const auto acc = at::toOpMathType(x.scalar_type());
  const Tensor a = a_.to(acc).contiguous(), b = b_.to(acc).contiguous();
  Tensor dx = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "normlab_un_dx", [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    const T *xp = x.data_ptr<T>(), *gp = gy.data_ptr<T>();
    const A *ap = a.data_ptr<A>(), *bp = b.data_ptr<A>();
    T* dxp = dx.data_ptr<T>();
    at::parallel_for(0, T_, row_grain(C), [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        map_row(xp + r * C, gp + r * C, dxp + r * C, 0, C,
                [=](auto v, auto g, int64_t i) { return g * ld(ap + i, v) - v * ld(bp + i, v); });
      }
    });
  });
  return dx;
}

}  // namespace

void register_power_norm(pybind11::module& m) {
  m.def("pn_stats", &pn_stats);
  m.def("pn_apply", &pn_apply);
  m.def("pn_bwd", &pn_bwd);
  m.def("un_sums", &un_sums);
  m.def("un_dx", &un_dx);
}
