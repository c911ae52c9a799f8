// Vectorised row loops shared by normlab's fused CPU norm kernels (norms.cpp).
//
// A row of C elements is processed in steps of two accumulator vectors (one bfloat16/float16 vector, widened to
// float32), then a scalar tail. One generic lambda serves both parts: it is called with Vectorized<A> in the body
// and with A in the tail, and ld/st/tanh_ are overloaded for both.
#pragma once

#include <torch/extension.h>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <optional>
#include <vector>

namespace normlab_kernels {

using at::Tensor;
using at::vec::Vectorized;
template <typename T>
using acc_t = at::opmath_type<T>;

// Load / store two accumulator vectors' worth of T (one reduced-precision vector for bf16 / fp16).
template <typename T, typename = void>
struct IO {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  static constexpr int64_t W = 2 * V::size();
  static void load(const T* p, V& a, V& b) {
    a = V::loadu(p);
    b = V::loadu(p + V::size());
  }
  static void store(T* p, const V& a, const V& b) {
    a.store(p);
    b.store(p + V::size());
  }
};
template <typename T>
struct IO<T, std::enable_if_t<at::vec::is_reduced_floating_point_v<T>>> {
  using A = float;
  using V = Vectorized<float>;
  static constexpr int64_t W = 2 * V::size();
  static void load(const T* p, V& a, V& b) { at::vec::load_to_float<T>(p, a, b); }
  static void store(T* p, const V& a, const V& b) { at::vec::convert_from_float<T>(a, b).store(p); }
};

// Overloads that let one generic lambda serve both the vector body and the scalar tail of a loop.
template <typename A>
inline A ld(const A* p, A) { return *p; }
template <typename A>
inline Vectorized<A> ld(const A* p, Vectorized<A>) { return Vectorized<A>::loadu(p); }
template <typename A>
inline void st(A* p, A v) { *p = v; }
template <typename A>
inline void st(A* p, Vectorized<A> v) { v.store(p); }
template <typename A>
inline A tanh_(A v) { return std::tanh(v); }
template <typename A>
inline Vectorized<A> tanh_(Vectorized<A> v) { return v.tanh(); }

// float32 tanh at about twice the speed of ATen's (Sleef's 1-ulp tanh), within a few ulp of it:
//   |x| <  0.55: the odd Taylor series of tanh through x^15 (the next term, 6404582/10854718875 x^17, is < 1 ulp);
//   |x| >= 0.55: 1 - 2 / (exp(2|x|) + 1) with Sleef's 1-ulp exp (no cancellation there: tanh >= 0.5), sign restored.
// NaN stays NaN and +-inf gives +-1, as std::tanh.
template <>
inline Vectorized<float> tanh_(Vectorized<float> x) {
  using V = Vectorized<float>;
  const V ax = x.abs();
  const V one(1.f);
  const V big = one - V(2.f) / ((ax + ax).exp() + one);
  const V x2 = x * x;
  V p(-929569.f / 638512875.f);
  p = at::vec::fmadd(p, x2, V(21844.f / 6081075.f));
  p = at::vec::fmadd(p, x2, V(-1382.f / 155925.f));
  p = at::vec::fmadd(p, x2, V(62.f / 2835.f));
  p = at::vec::fmadd(p, x2, V(-17.f / 315.f));
  p = at::vec::fmadd(p, x2, V(2.f / 15.f));
  p = at::vec::fmadd(p, x2, V(-1.f / 3.f));
  const V small = at::vec::fmadd(p * x2, x, x);
  const V signed_big = V::blendv(big, V(0.f) - big, x < V(0.f));
  return V::blendv(signed_big, small, ax < V(0.55f));
}

// Walk x and g over [lo, hi): vec(xa, ga, xb, gb, i) for each pair of vectors loaded from i (xa at i, xb at
// i + V::size()), then tail(i) for each index left over. The loop every row helper below runs.
template <typename T, typename Vec, typename Tail>
inline void walk_row(const T* x, const T* g, int64_t lo, int64_t hi, Vec vec, Tail tail) {
  using I = IO<T>;
  using V = Vectorized<acc_t<T>>;
  int64_t i = lo;
  for (; i + I::W <= hi; i += I::W) {
    V xa, xb, ga, gb;
    I::load(x + i, xa, xb);
    I::load(g + i, ga, gb);
    vec(xa, ga, xb, gb, i);
  }
  for (; i < hi; ++i) tail(i);
}

// sum_{lo<=i<hi} op(x_i, g_i, i) (g may be x when an op reads one row). Fixed order: two vector accumulators, then
// the scalar tail.
template <typename T, typename Op>
inline acc_t<T> reduce_row(const T* x, const T* g, int64_t lo, int64_t hi, Op op) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  V s0(A(0)), s1(A(0));
  A tail(0);
  walk_row(
      x, g, lo, hi,
      [&](V xa, V ga, V xb, V gb, int64_t i) {
        s0 = s0 + op(xa, ga, i);
        s1 = s1 + op(xb, gb, i + V::size());
      },
      [&](int64_t i) { tail += op(A(x[i]), A(g[i]), i); });
  return at::vec::vec_reduce_all<A>([](V p, V q) { return p + q; }, s0 + s1) + tail;
}

// out_i = op(x_i, g_i, i) for lo <= i < hi.
template <typename T, typename Op>
inline void map_row(const T* x, const T* g, T* out, int64_t lo, int64_t hi, Op op) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  walk_row(
      x, g, lo, hi,
      [&](V xa, V ga, V xb, V gb, int64_t i) { IO<T>::store(out + i, op(xa, ga, i), op(xb, gb, i + V::size())); },
      [&](int64_t i) { out[i] = T(op(A(x[i]), A(g[i]), i)); });
}

// Fixed row blocks for deterministic parameter-gradient partials: the count depends on the row count only.
struct Blocks {
  int64_t count, per;
};
inline Blocks make_blocks(int64_t rows) {
  const int64_t nb = std::clamp<int64_t>(rows / 16, 1, 64);
  const int64_t per = std::max<int64_t>(1, (rows + nb - 1) / nb);
  return {std::max<int64_t>(1, (rows + per - 1) / per), per};
}

inline int64_t row_grain(int64_t C) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)); }

// Sum the [count, C] partials block by block (fixed order) into a [C] tensor.
inline Tensor sum_partials(const Tensor& partial) {
  const int64_t nb = partial.size(0), C = partial.size(1);
  Tensor out = at::empty({C}, partial.options());
  AT_DISPATCH_FLOATING_TYPES(partial.scalar_type(), "normlab_sum_partials", [&] {
    const scalar_t* p = partial.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, C, 1024, [&](int64_t lo, int64_t hi) {
      for (int64_t c = lo; c < hi; ++c) o[c] = 0;
      for (int64_t b = 0; b < nb; ++b) {
        const scalar_t* row = p + b * C;
        at::vec::map2([](auto a, auto q) { return a + q; }, o + lo, o + lo, row + lo, hi - lo);
      }
    });
  });
  return out;
}

inline Tensor empty_grad(const Tensor& like) { return at::empty({0}, like.options()); }

// op(x_i, g_i, i) for lo <= i < hi, for its side effects (accumulating parameter-gradient partials).
template <typename T, typename Op>
inline void for_each_row(const T* x, const T* g, int64_t lo, int64_t hi, Op op) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  walk_row(
      x, g, lo, hi,
      [&](V xa, V ga, V xb, V gb, int64_t i) {
        op(xa, ga, i);
        op(xb, gb, i + V::size());
      },
      [&](int64_t i) { op(A(x[i]), A(g[i]), i); });
}

// Sum of vector and scalar contributions in one object, so one generic lambda can accumulate from both loop parts.
template <typename A>
struct Acc {
  Vectorized<A> v{A(0)};
  A s{0};
  void add(Vectorized<A> x) { v = v + x; }
  void add(A x) { s += x; }
  A total() const { return at::vec::vec_reduce_all<A>([](auto p, auto q) { return p + q; }, v) + s; }
};

// Runs row(r, dw_partial, db_partial) -> scalar over all rows. Without parameter gradients rows are split freely;
// with them, over fixed blocks whose partials are then summed in block order (deterministic). Fills dw / db (the
// summed [C] gradients, undefined unless requested) and returns the summed scalar.
template <typename A, typename RowFn>
double run_backward(int64_t rows, int64_t C, bool need_w, bool need_b, bool need_scalar, at::ScalarType acc,
                    Tensor& dw, Tensor& db, RowFn row) {
  if (!need_w && !need_b && !need_scalar) {
    at::parallel_for(0, rows, row_grain(C), [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) row(r, static_cast<A*>(nullptr), static_cast<A*>(nullptr));
    });
    return 0.0;
  }
  const Blocks bl = make_blocks(rows);
  const auto opts = at::TensorOptions().dtype(acc);
  Tensor pw = need_w ? at::zeros({bl.count, C}, opts) : Tensor();
  Tensor pb = need_b ? at::zeros({bl.count, C}, opts) : Tensor();
  std::vector<A> ps(bl.count, A(0));
  A* pwp = need_w ? pw.data_ptr<A>() : nullptr;
  A* pbp = need_b ? pb.data_ptr<A>() : nullptr;
  at::parallel_for(0, bl.count, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t blk = lo; blk < hi; ++blk) {
      A acc_s(0);
      const int64_t end = std::min(rows, (blk + 1) * bl.per);
      for (int64_t r = blk * bl.per; r < end; ++r) {
        acc_s += row(r, pwp ? pwp + blk * C : nullptr, pbp ? pbp + blk * C : nullptr);
      }
      ps[blk] = acc_s;
    }
  });
  if (need_w) dw = sum_partials(pw);
  if (need_b) db = sum_partials(pb);
  double total = 0.0;
  for (const A v : ps) total += static_cast<double>(v);
  return total;
}

// An optional per-channel parameter in the accumulation dtype, contiguous (undefined when absent); `op` names the
// norm in the error a wrong size raises.
inline Tensor acc_param(const std::optional<Tensor>& t, at::ScalarType acc, int64_t C, const char* op) {
  if (!t.has_value() || !t->defined()) return Tensor();
  TORCH_CHECK(t->numel() == C, "normlab ", op, ": expected a parameter with ", C, " elements, got size ", t->sizes());
  return t->to(acc).contiguous();
}

}  // namespace normlab_kernels
