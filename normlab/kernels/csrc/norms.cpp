// Fused CPU kernels for normlab's token norms (forward and backward).
//
// Every op normalises the last axis of a contiguous [rows, C] view. One task owns whole rows, so each row is read
// from memory once: the statistics pass brings it into L1/L2 and the later passes (more statistics, the write) hit
// cache. float16/bfloat16 are loaded into float32 vectors and every statistic is accumulated in float32; float64
// accumulates in float64. Gradients of the per-channel parameters (and of scalar ones) are reduced in fixed-size
// blocks of rows whose count depends on the row count only, then summed block by block in a fixed order: the
// result is bitwise identical whatever the thread count.
//
// Math (the op's Python docstrings cite the papers):
//   rms family:   y = x * r * w + b, r from the row's statistic (mode):
//     INSIDE   r = 1 / sqrt(mean_{i<k} x_i^2 + eps)            RMSNorm / pRMSNorm / SRMSNorm (Zhang & Sennrich 2019)
//     OUTSIDE  r = 1 / (sqrt(mean_{i<k} x_i^2) + eps)          the official RMSNorm PyTorch code
//     CRMS     r = 1 / sqrt((sum z^2 + (sum z)^2) / (C+1) + eps) CRMSNorm (Jiang et al. 2023, Eq. for z in R^{d-1})
//     SCALE    r = g / max(||x||_2, eps), no w / b               ScaleNorm (Nguyen & Salazar 2019)
//   layer norm:   y = (x - mean) / sqrt(var + eps) * w + b (biased variance, two passes over the cached row)
//   dyt:          y = tanh(alpha * x) * w + b (Zhu et al. 2025)
#include "row_loops.h"

#include <cmath>
#include <optional>
#include <tuple>

namespace {

using namespace normlab_kernels;
using OptT = std::optional<Tensor>;

enum Mode : int64_t { INSIDE = 0, OUTSIDE = 1, CRMS = 2, SCALE = 3 };

// y = base(x) * w + b with optional w, b: the write pass of every forward (one loop per case, so the vector loop
// tests nothing).
template <typename T, typename Base>
inline void write_mapped(const T* x, T* y, int64_t C, Base base, const acc_t<T>* w, const acc_t<T>* b) {
  if (w && b) {
    map_row(x, x, y, 0, C, [=](auto v, auto, int64_t i) { return base(v) * ld(w + i, v) + ld(b + i, v); });
  } else if (w) {
    map_row(x, x, y, 0, C, [=](auto v, auto, int64_t i) { return base(v) * ld(w + i, v); });
  } else if (b) {
    map_row(x, x, y, 0, C, [=](auto v, auto, int64_t i) { return base(v) + ld(b + i, v); });
  } else {
    map_row(x, x, y, 0, C, [=](auto v, auto, int64_t) { return base(v); });
  }
}

// y = (x + shift) * r * w + b (the write pass of the rms family, shift 0, and of layer norm, shift -mean:
// subtracting before scaling keeps (x - mean) exact for rows with a large mean).
template <typename T>
inline void write_affine(const T* x, T* y, int64_t C, acc_t<T> r, acc_t<T> shift, const acc_t<T>* w,
                         const acc_t<T>* b) {
  auto base = [=](auto v) {
    using VV = decltype(v);
    return (v + VV(shift)) * VV(r);
  };
  write_mapped(x, y, C, base, w, b);
}

template <typename A>
const A* opt_ptr(const Tensor& t) {
  return t.defined() ? t.data_ptr<A>() : nullptr;
}

// A parameter of `numel` elements as a contiguous tensor of the accumulation dtype (undefined when absent).
Tensor as_acc(const OptT& t, at::ScalarType acc, int64_t numel) {
  if (!t.has_value() || !t->defined()) return Tensor();
  TORCH_CHECK(t->numel() == numel, "normlab kernels: expected a parameter with ", numel, " elements, got size ",
              t->sizes());
  return t->to(acc).contiguous();
}

// Row statistics of the rms family. Returns r; `aux` is sum(z) for CRMS, the unclamped norm for SCALE and the rms
// for OUTSIDE (the backward needs them), `n` the clamped norm for SCALE.
template <typename T>
inline acc_t<T> rms_factor(const T* x, int64_t C, int64_t mode, int64_t k, double eps, acc_t<T> scale,
                           acc_t<T>& aux, acc_t<T>& n) {
  using A = acc_t<T>;
  const A e = static_cast<A>(eps);
  const A ss = reduce_row(x, x, 0, k, [](auto v, auto, int64_t) { return v * v; });
  switch (mode) {
    case INSIDE:
      return A(1) / std::sqrt(ss / A(k) + e);
    case OUTSIDE:
      aux = std::sqrt(ss / A(k));
      return A(1) / (aux + e);
    case CRMS: {
      aux = reduce_row(x, x, 0, C, [](auto v, auto, int64_t) { return v; });
      return A(1) / std::sqrt((ss + aux * aux) / A(C + 1) + e);
    }
    default:  // SCALE; std::max keeps a NaN norm (its first argument) as torch's clamp_min does
      aux = std::sqrt(ss);
      n = std::max(aux, e);
      return scale / n;
  }
}

// ------------------------------------------------------------------------------------------------ rms family ----

template <typename T>
void rms_fwd_rows(const T* x, T* y, int64_t rows, int64_t C, int64_t mode, int64_t k, double eps,
                  acc_t<T> scale, const acc_t<T>* w, const acc_t<T>* b) {
  at::parallel_for(0, rows, row_grain(C), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      acc_t<T> aux(0), n(0);
      const acc_t<T> f = rms_factor(x + r * C, C, mode, k, eps, scale, aux, n);
      write_affine(x + r * C, y + r * C, C, f, acc_t<T>(0), w, b);
    }
  });
}

double scalar_of(const OptT& t) {
  if (!t.has_value() || !t->defined()) return 1.0;
  TORCH_CHECK(t->numel() == 1, "normlab kernels: expected a one-element scalar parameter, got size ", t->sizes());
  return t->item<double>();
}

Tensor rms_fwd(const Tensor& x_, const OptT& w_, const OptT& b_, const OptT& scale_, double eps, int64_t mode,
               int64_t k) {
  const Tensor x = x_.contiguous();
  const int64_t C = x.size(-1), rows = C == 0 ? 0 : x.numel() / C;
  TORCH_CHECK(1 <= k && k <= C, "normlab rms_norm: expected k in [1, ", C, "], got ", k);
  Tensor y = at::empty_like(x);
  const auto acc = at::toOpMathType(x.scalar_type());
  const Tensor w = as_acc(w_, acc, C), b = as_acc(b_, acc, C);
  const double scale = scalar_of(scale_);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "normlab_rms_fwd", [&] {
    using A = acc_t<scalar_t>;
    rms_fwd_rows(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), rows, C, mode, k, eps, static_cast<A>(scale),
                 opt_ptr<A>(w), opt_ptr<A>(b));
  });
  return y;
}

// dx = g' * r - c * (x + shift) - k0 on [lo, hi), g' = gy * w (or gy). The rms family has k0 = 0; LayerNorm uses
// r = rstd, c = rstd^2 * sum(g' xhat) / C, shift = -mean, k0 = rstd * sum(g') / C.
template <typename T>
inline void write_dx(const T* gy, const T* x, T* dx, int64_t lo, int64_t hi, acc_t<T> r, acc_t<T> c,
                     acc_t<T> shift, acc_t<T> k0, const acc_t<T>* w) {
  if (w) {
    map_row(x, gy, dx, lo, hi, [=](auto v, auto g, int64_t i) {
      using VV = decltype(v);
      return g * ld(w + i, v) * VV(r) - VV(c) * (v + VV(shift)) - VV(k0);
    });
  } else {
    map_row(x, gy, dx, lo, hi, [=](auto v, auto g, int64_t) {
      using VV = decltype(v);
      return g * VV(r) - VV(c) * (v + VV(shift)) - VV(k0);
    });
  }
}

// dw += gy * (x + shift) * r, db += gy over one row (either pointer may be null).
template <typename T>
inline void accum_params(const T* gy, const T* x, int64_t C, acc_t<T> r, acc_t<T> shift, acc_t<T>* dw,
                         acc_t<T>* db) {
  if (dw && db) {
    for_each_row(x, gy, 0, C, [=](auto v, auto g, int64_t i) {
      using VV = decltype(v);
      st(dw + i, ld(dw + i, v) + g * (v + VV(shift)) * VV(r));
      st(db + i, ld(db + i, v) + g);
    });
  } else if (dw) {
    for_each_row(x, gy, 0, C, [=](auto v, auto g, int64_t i) {
      using VV = decltype(v);
      st(dw + i, ld(dw + i, v) + g * (v + VV(shift)) * VV(r));
    });
  } else if (db) {
    for_each_row(x, gy, 0, C, [=](auto v, auto g, int64_t i) { st(db + i, ld(db + i, v) + g); });
  }
}

// dx += g_add (the gradient reaching a fused add's residual output), after dx was rounded to T, as autograd does.
template <typename T>
inline void add_into(T* dx, const T* gadd, int64_t C) {
  map_row(dx, gadd, dx, 0, C, [](auto a, auto b, int64_t) { return a + b; });
}

// What every backward works on: x, gy (in x's dtype) and the fused add's gadd contiguous, w as a contiguous tensor
// of the accumulation dtype, dx to write and the summed parameter gradients.
struct Backward {
  Tensor x, gy, gadd, w, dx, dw, db;
  int64_t C, rows;
  at::ScalarType acc;

  // Runs row(x_r, gy_r, dx_r, w, dw_partial, db_partial) -> scalar on every row (see run_backward), then adds the
  // fused add's gadd into the row's dx (after dx is rounded, as autograd adds them); returns the summed scalar.
  template <typename T, typename Row>
  double run(bool need_w, bool need_b, bool need_scalar, Row row) {
    using A = acc_t<T>;
    const T *xp = x.data_ptr<T>(), *gp = gy.data_ptr<T>();
    const T* ap = gadd.defined() ? gadd.data_ptr<T>() : nullptr;
    T* dxp = dx.data_ptr<T>();
    const A* wp = opt_ptr<A>(w);
    const int64_t c = C;
    return run_backward<A>(rows, C, need_w, need_b, need_scalar, acc, dw, db, [&](int64_t r, A* dwp, A* dbp) {
      const A s = row(xp + r * c, gp + r * c, dxp + r * c, wp, dwp, dbp);
      if (ap) add_into(dxp + r * c, ap + r * c, c);
      return s;
    });
  }

  // A gradient if it was requested, else an empty tensor; a scalar one as a one-element tensor.
  Tensor grad(bool need, const Tensor& g) const { return need ? g : empty_grad(x); }
  Tensor scalar(bool need, double value) const {
    return need ? at::full({1}, value, at::TensorOptions().dtype(acc)) : empty_grad(x);
  }
};

Backward backward_inputs(const Tensor& gy, const Tensor& x_, const OptT& w, const OptT& gadd = std::nullopt) {
  const Tensor x = x_.contiguous();
  const int64_t C = x.size(-1);
  const auto acc = at::toOpMathType(x.scalar_type());
  const Tensor ga = gadd.has_value() && gadd->defined() ? gadd->to(x.scalar_type()).contiguous() : Tensor();
  const Tensor g = gy.to(x.scalar_type()).contiguous();
  return {x, g, ga, as_acc(w, acc, C), at::empty_like(x), Tensor(), Tensor(), C, C == 0 ? 0 : x.numel() / C, acc};
}

// Returns (dx, dw, db, dscale); a gradient that was not requested is an empty tensor.
std::tuple<Tensor, Tensor, Tensor, Tensor> rms_bwd(const Tensor& gy_, const Tensor& x_, const OptT& w_,
                                                   const OptT& scale_, const OptT& gadd_, double eps, int64_t mode,
                                                   int64_t k, bool need_w, bool need_b, bool need_scale) {
  Backward in = backward_inputs(gy_, x_, w_, gadd_);
  const int64_t C = in.C;
  TORCH_CHECK(1 <= k && k <= C, "normlab rms_norm: expected k in [1, ", C, "], got ", k);
  const double dscale = AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.x.scalar_type(),
                                                      "normlab_rms_bwd", [&] {
    using A = acc_t<scalar_t>;
    const A sc = static_cast<A>(scalar_of(scale_));
    return in.run<scalar_t>(need_w, need_b, need_scale, [&](auto xr, auto gr, auto dr, const A* wp, A* dwp, A* dbp) {
      A aux(0), n(0);
      const A f = rms_factor(xr, C, mode, k, eps, sc, aux, n);
      const A s = wp ? reduce_row(xr, gr, 0, C, [=](auto v, auto g, int64_t i) { return v * g * ld(wp + i, v); })
                     : reduce_row(xr, gr, 0, C, [](auto v, auto g, int64_t) { return v * g; });
      A c(0), shift(0);
      if (mode == INSIDE) {
        c = f * f * f * s / A(k);
      } else if (mode == OUTSIDE) {
        c = f * f * s / (A(k) * aux);
      } else if (mode == CRMS) {
        c = f * f * f * s / A(C + 1);
        shift = aux;
      } else if (aux >= static_cast<A>(eps)) {  // SCALE: clamp_min passes the gradient where norm >= eps
        c = f * s / (n * n);
      }
      write_dx(gr, xr, dr, 0, k, f, c, shift, A(0), wp);
      write_dx(gr, xr, dr, k, C, f, A(0), A(0), A(0), wp);  // pRMSNorm: channels past k are not in the statistic
      accum_params(gr, xr, C, f, A(0), dwp, dbp);
      return mode == SCALE ? s / n : A(0);
    });
  });
  return {in.dx, in.grad(need_w, in.dw), in.grad(need_b, in.db), in.scalar(need_scale, dscale)};
}

// ------------------------------------------------------------------------------------------------ layer norm ----

template <typename T>
inline void ln_stats(const T* x, int64_t C, double eps, acc_t<T>& mean, acc_t<T>& rstd) {
  using A = acc_t<T>;
  mean = reduce_row(x, x, 0, C, [](auto v, auto, int64_t) { return v; }) / A(C);
  const A m = mean;
  const A var = reduce_row(x, x, 0, C, [=](auto v, auto, int64_t) {
                  using VV = decltype(v);
                  const VV d = v - VV(m);
                  return d * d;
                }) / A(C);
  rstd = A(1) / std::sqrt(var + static_cast<A>(eps));
}

Tensor ln_fwd(const Tensor& x_, const OptT& w_, const OptT& b_, double eps) {
  const Tensor x = x_.contiguous();
  const int64_t C = x.size(-1), rows = C == 0 ? 0 : x.numel() / C;
  Tensor y = at::empty_like(x);
  const auto acc = at::toOpMathType(x.scalar_type());
  const Tensor w = as_acc(w_, acc, C), b = as_acc(b_, acc, C);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "normlab_ln_fwd", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const A *wp = opt_ptr<A>(w), *bp = opt_ptr<A>(b);
    at::parallel_for(0, rows, row_grain(C), [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        A mean, rstd;
        ln_stats(xp + r * C, C, eps, mean, rstd);
        write_affine(xp + r * C, yp + r * C, C, rstd, -mean, wp, bp);
      }
    });
  });
  return y;
}

std::tuple<Tensor, Tensor, Tensor> ln_bwd(const Tensor& gy_, const Tensor& x_, const OptT& w_, const OptT& gadd_,
                                          double eps, bool need_w, bool need_b) {
  Backward in = backward_inputs(gy_, x_, w_, gadd_);
  const int64_t C = in.C;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.x.scalar_type(), "normlab_ln_bwd", [&] {
    using A = acc_t<scalar_t>;
    in.run<scalar_t>(need_w, need_b, false, [&](auto xr, auto gr, auto dr, const A* wp, A* dwp, A* dbp) {
      A mean, rstd;
      ln_stats(xr, C, eps, mean, rstd);
      const A m = mean, rs = rstd;
      A sg, sgx;  // sum g' and sum g' * xhat, g' = gy * w
      if (wp) {
        sg = reduce_row(xr, gr, 0, C, [=](auto v, auto g, int64_t i) { return g * ld(wp + i, v); });
        sgx = reduce_row(xr, gr, 0, C, [=](auto v, auto g, int64_t i) {
          using VV = decltype(v);
          return g * ld(wp + i, v) * ((v - VV(m)) * VV(rs));
        });
      } else {
        sg = reduce_row(xr, gr, 0, C, [](auto, auto g, int64_t) { return g; });
        sgx = reduce_row(xr, gr, 0, C, [=](auto v, auto g, int64_t) {
          using VV = decltype(v);
          return g * ((v - VV(m)) * VV(rs));
        });
      }
      write_dx(gr, xr, dr, 0, C, rs, rs * rs * sgx / A(C), -m, rs * sg / A(C), wp);
      accum_params(gr, xr, C, rs, -m, dwp, dbp);
      return A(0);
    });
  });
  return {in.dx, in.grad(need_w, in.dw), in.grad(need_b, in.db)};
}

// ------------------------------------------------------------------------------------- fused residual add + norm ----

// h = x + residual (rounded to the input dtype, as an eager add would), y = norm(h); mode < 0 is LayerNorm, else an
// rms-family mode. Returns (y, h). The row of h is written and normalised while it is still in cache.
std::tuple<Tensor, Tensor> add_norm_fwd(const Tensor& x_, const Tensor& res_, const OptT& w_, const OptT& b_,
                                        double eps, int64_t mode) {
  const Tensor x = x_.contiguous(), res = res_.to(x.scalar_type()).contiguous();
  TORCH_CHECK(x.sizes() == res.sizes(), "normlab add_norm: x and residual must have the same shape");
  const int64_t C = x.size(-1), rows = C == 0 ? 0 : x.numel() / C;
  Tensor y = at::empty_like(x), h = at::empty_like(x);
  const auto acc = at::toOpMathType(x.scalar_type());
  const Tensor w = as_acc(w_, acc, C), b = as_acc(b_, acc, C);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "normlab_add_norm_fwd", [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    const T *xp = x.data_ptr<T>(), *rp = res.data_ptr<T>();
    T *yp = y.data_ptr<T>(), *hp = h.data_ptr<T>();
    const A *wp = opt_ptr<A>(w), *bp = opt_ptr<A>(b);
    at::parallel_for(0, rows, row_grain(C), [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        T* hr = hp + r * C;
        map_row(xp + r * C, rp + r * C, hr, 0, C, [](auto a, auto q, int64_t) { return a + q; });
        A f, shift(0);
        if (mode < 0) {
          A mean;
          ln_stats(hr, C, eps, mean, f);
          shift = -mean;
        } else {
          A aux(0), n(0);
          f = rms_factor(hr, C, mode, C, eps, A(1), aux, n);
        }
        write_affine(hr, yp + r * C, C, f, shift, wp, bp);
      }
    });
  });
  return {y, h};
}

// ------------------------------------------------------------------------------------------------------- dyt ----

Tensor dyt_fwd(const Tensor& x_, const Tensor& alpha_, const OptT& w_, const OptT& b_) {
  const Tensor x = x_.contiguous();
  const int64_t C = x.size(-1), rows = C == 0 ? 0 : x.numel() / C;
  Tensor y = at::empty_like(x);
  const auto acc = at::toOpMathType(x.scalar_type());
  const Tensor w = as_acc(w_, acc, C), b = as_acc(b_, acc, C);
  const double alpha = scalar_of(alpha_);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "normlab_dyt_fwd", [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    const T* xp = x.data_ptr<T>();
    T* yp = y.data_ptr<T>();
    const A *wp = opt_ptr<A>(w), *bp = opt_ptr<A>(b);
    const A al = static_cast<A>(alpha);
    at::parallel_for(0, rows, row_grain(C), [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        write_mapped(xp + r * C, yp + r * C, C, [=](auto v) { return tanh_(v * decltype(v)(al)); }, wp, bp);
      }
    });
  });
  return y;
}

// One pass per row: t = tanh(alpha x), q = gy * w * (1 - t^2); dx = alpha q, d alpha += q x, dw += gy t, db += gy.
// Returns (dx, dalpha, dw, db); a gradient that was not requested is an empty tensor.
std::tuple<Tensor, Tensor, Tensor, Tensor> dyt_bwd(const Tensor& gy_, const Tensor& x_, const Tensor& alpha_,
                                                   const OptT& w_, bool need_alpha, bool need_w, bool need_b) {
  Backward in = backward_inputs(gy_, x_, w_);
  const int64_t C = in.C;
  const double dalpha = AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.x.scalar_type(),
                                                      "normlab_dyt_bwd", [&] {
    using A = acc_t<scalar_t>;
    const A al = static_cast<A>(scalar_of(alpha_));
    return in.run<scalar_t>(need_w, need_b, need_alpha, [&](auto xr, auto gr, auto dr, const A* wp, A* dwp, A* dbp) {
      Acc<A> sa;
      map_row(xr, gr, dr, 0, C, [&](auto v, auto g, int64_t i) {
        using VV = decltype(v);
        const VV t = tanh_(v * VV(al));
        const VV gw = wp ? g * ld(wp + i, v) : g;
        const VV q = gw * (VV(A(1)) - t * t);
        if (need_alpha) sa.add(q * v);
        if (dwp) st(dwp + i, ld(dwp + i, v) + g * t);
        if (dbp) st(dbp + i, ld(dbp + i, v) + g);
        return q * VV(al);
      });
      return sa.total();
    });
  });
  return {in.dx, in.scalar(need_alpha, dalpha), in.grad(need_w, in.dw), in.grad(need_b, in.db)};
}

}  // namespace

void register_batch_norms(pybind11::module& m);  // batch_norms.cpp
void register_group_norms(pybind11::module& m);  // group_norms.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "normlab fused CPU norm kernels";
  register_batch_norms(m);
  register_group_norms(m);
  m.def("rms_fwd", &rms_fwd);
  m.def("rms_bwd", &rms_bwd);
  m.def("ln_fwd", &ln_fwd);
  m.def("ln_bwd", &ln_bwd);
  m.def("add_norm_fwd", &add_norm_fwd);
  m.def("dyt_fwd", &dyt_fwd);
  m.def("dyt_bwd", &dyt_bwd);
  m.def("capability", []() {
#if defined(CPU_CAPABILITY_AVX512)
    return "AVX512";
#elif defined(CPU_CAPABILITY_AVX2)
    return "AVX2";
#else
    return "DEFAULT";
#endif
  });
}
