// wbdit._C: operator schemas, the Python module stub, and the CPU kernels of the input path.
//
// Ops (namespace wbdit); each must equal its plain-PyTorch spec in wbdit/reference.py.
//
// patch_embed(x (B,G), W (H,p), b (H,), P (N,H)) -> out (B,N,H)
//   xpad[b, i] = x[b, i] for i < G, 0 for G <= i < N*p          (F.pad, or a crop if N*p < G)
//   out[b,n,h] = b[h] + P[n,h] + sum_{j<p} xpad[b, n*p + j] * W[h,j]
// patch_embed_backward(dout (B,N,H), x, W, compute_dx) -> (dx (B,G), dW (H,p), db (H,))   (P is frozen)
//   dx[b, n*p+j] = sum_h dout[b,n,h] * W[h,j]            (0 where n*p+j >= N*p)
//   dW[h, j]     = sum_{b,n} dout[b,n,h] * xpad[b, n*p+j]
//   db[h]        = sum_{b,n} dout[b,n,h]
//   dx is an empty (0,) tensor when compute_dx is false: in training x is data, and dx would
//   be half of the backward's arithmetic for nothing.
// timestep_embedding(t (B,), dim, max_period) -> (B, dim) float32, half = dim / 2
//   f_k = exp(-ln(max_period) * k / half), k < half, in float32
//   out[b, k] = cos(float(t[b]) * f_k),  out[b, half + k] = sin(float(t[b]) * f_k)
//
// Why fused: the (B*N, H) activations dwarf x, W, bias and pos (157 MB vs under 3 MB in fp32 at
// the seed shape). The forward writes them once; the reference writes the GEMM-with-bias output
// and then reads it and writes `+ pos` into a second 157 MB tensor. The backward reads dout once
// where the reference reads it once per GEMM and once for the bias sum.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "wbdit.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace wbdit {

void check_patch_embed(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                       const at::Tensor& pos_embed) {
  TORCH_CHECK(x.dim() == 2, "patch_embed: x must be (B, G), got ", x.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) >= 1, "patch_embed: weight must be (H, p), got ",
              weight.sizes());
  const int64_t H = weight.size(0);
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == H, "patch_embed: bias must be (", H, ",), got ",
              bias.sizes());
  TORCH_CHECK(pos_embed.dim() == 2 && pos_embed.size(1) == H, "patch_embed: pos_embed must be (N, ", H,
              "), got ", pos_embed.sizes());
  for (const at::Tensor* t : {&weight, &bias, &pos_embed}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "patch_embed: all inputs must have x's dtype ",
                x.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK(t->device() == x.device(), "patch_embed: all inputs must be on ", x.device());
  }
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "patch_embed: floating-point inputs only");
}

void check_patch_embed_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, "patch_embed_backward: x must be (B, G) and weight (H, p)");
  TORCH_CHECK(grad.dim() == 3 && grad.size(0) == x.size(0) && grad.size(2) == weight.size(0),
              "patch_embed_backward: grad must be (B, N, H) = (", x.size(0), ", N, ", weight.size(0), "), got ",
              grad.sizes());
  TORCH_CHECK(grad.scalar_type() == x.scalar_type() && weight.scalar_type() == x.scalar_type(),
              "patch_embed_backward: grad, x and weight must share one dtype");
  TORCH_CHECK(grad.device() == x.device() && weight.device() == x.device(),
              "patch_embed_backward: grad, x and weight must be on one device");
}

void check_timestep_embedding(const at::Tensor& t, int64_t dim) {
  TORCH_CHECK(t.dim() == 1, "timestep_embedding: t must be (B,), got ", t.sizes());
  TORCH_CHECK(dim > 0 && dim % 2 == 0, "timestep embedding dim must be even, got ", dim);
  TORCH_CHECK(t.scalar_type() != at::kBool && !at::isComplexType(t.scalar_type()),
              "timestep_embedding: t must be an integer or floating tensor");
}

namespace {

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__x86_64__)  // x86-64-v3/v4 names: GCC 11
// One binary for every x86-64 CPU: GCC compiles the hot loops below for AVX-512, AVX2 and the
// SSE2 baseline and picks the best one when the library loads (an ifunc), the way ATen builds
// its kernels per CPU_CAPABILITY. Baseline SSE2 alone runs them about 3x slower than AVX-512.
#define WBDIT_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define WBDIT_CPU_CLONES
#endif

// The loops below work on fixed-size blocks of h (kLanes) so that the compiler keeps a block of
// sums in SIMD registers across the runtime-length loop over the p genes of a patch, instead of
// reading and writing a whole row once per gene.
constexpr int kLanes = 32;
// Rows of dout per block in the dW/db accumulation: each load and store of a block of dW^T
// then serves kRows rows.
constexpr int kRows = 4;

// Lane-parallel dot product: each lane sums in order, so the lanes can live in SIMD registers
// without reassociating one serial sum (no -ffast-math needed).
template <typename acc_t>
inline acc_t dot(const acc_t* __restrict__ a, const acc_t* __restrict__ b, int64_t n) {
  acc_t lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) lanes[l] += a[i + l] * b[i + l];
  }
  acc_t s = 0;
  for (int l = 0; l < kLanes; ++l) s += lanes[l];
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// W (H, p) -> W^T (p, H) in the accumulation type: every row of the activations is combined
// with W along h, and a contiguous h makes those loops stream and vectorize.
template <typename scalar_t, typename acc_t>
std::vector<acc_t> transposed_weight(const scalar_t* w, int64_t H, int64_t p) {
  std::vector<acc_t> wt(p * H);
  for (int64_t h = 0; h < H; ++h)
    for (int64_t j = 0; j < p; ++j) wt[j * H + h] = static_cast<acc_t>(w[h * p + j]);
  return wt;
}

// Rows (b, n) per task: enough work per task that at::parallel_for's overhead is small.
int64_t row_grain(int64_t H) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(H, 1)); }

// out[r, :] = bp[n, :] + sum_{j < jmax} x[b, n*p + j] * wt[j, :] for rows r in [begin, end).
template <typename scalar_t, typename acc_t>
WBDIT_CPU_CLONES void patch_embed_rows(const scalar_t* __restrict__ x, const acc_t* __restrict__ wt,
                                       const acc_t* __restrict__ bp, scalar_t* __restrict__ out, int64_t begin,
                                       int64_t end, int64_t G, int64_t N, int64_t H, int64_t p) {
  for (int64_t r = begin; r < end; ++r) {
    const int64_t b = r / N, n = r % N;
    // Genes past G are the zero padding: they add nothing, so the sums stop at G.
    const int64_t jmax = std::min<int64_t>(p, G - n * p);
    const scalar_t* xr = x + b * G + n * p;
    const acc_t* bpn = bp + n * H;
    scalar_t* o = out + r * H;
    int64_t h0 = 0;
    for (; h0 + kLanes <= H; h0 += kLanes) {
      acc_t a[kLanes];
      for (int l = 0; l < kLanes; ++l) a[l] = bpn[h0 + l];
      for (int64_t j = 0; j < jmax; ++j) {
        const acc_t xv = static_cast<acc_t>(xr[j]);
        const acc_t* wj = wt + j * H + h0;
        for (int l = 0; l < kLanes; ++l) a[l] += xv * wj[l];
      }
      for (int l = 0; l < kLanes; ++l) o[h0 + l] = static_cast<scalar_t>(a[l]);
    }
    for (; h0 < H; ++h0) {
      acc_t a = bpn[h0];
      for (int64_t j = 0; j < jmax; ++j) a += static_cast<acc_t>(xr[j]) * wt[j * H + h0];
      o[h0] = static_cast<scalar_t>(a);
    }
  }
}

// dwt[j, :] += sum_i xs[i, j] * g[i, :] and db += sum_i g[i, :] over R rows i of dout (g, in
// the accumulation type) and their zero-padded patches xs (R, p).
template <int R, typename acc_t>
inline void accumulate_rows(const acc_t* __restrict__ g, const acc_t* __restrict__ xs, acc_t* __restrict__ dwt,
                            acc_t* __restrict__ db, int64_t H, int64_t p) {
  int64_t h0 = 0;
  for (; h0 + kLanes <= H; h0 += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      acc_t s = db[h0 + l];
      for (int i = 0; i < R; ++i) s += g[i * H + h0 + l];
      db[h0 + l] = s;
    }
    for (int64_t j = 0; j < p; ++j) {
      acc_t a[kLanes];
      acc_t* dwj = dwt + j * H + h0;
      for (int l = 0; l < kLanes; ++l) a[l] = dwj[l];
      for (int i = 0; i < R; ++i) {
        const acc_t xv = xs[i * p + j];
        for (int l = 0; l < kLanes; ++l) a[l] += xv * g[i * H + h0 + l];
      }
      for (int l = 0; l < kLanes; ++l) dwj[l] = a[l];
    }
  }
  for (; h0 < H; ++h0) {
    for (int i = 0; i < R; ++i) db[h0] += g[i * H + h0];
    for (int64_t j = 0; j < p; ++j)
      for (int i = 0; i < R; ++i) dwt[j * H + h0] += xs[i * p + j] * g[i * H + h0];
  }
}

// The backward over rows [begin, end): partial dW^T (p, H) and db (H) of these rows into dwt
// and dbc, and dx[b, n*p + j] = dot(dout[r, :], wt[j, :]) when dx is not null.
// gbuf (kRows, H) and xbuf (kRows, p) are scratch.
template <typename scalar_t, typename acc_t>
WBDIT_CPU_CLONES void patch_embed_backward_rows(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                                                const acc_t* __restrict__ wt, scalar_t* __restrict__ dx,
                                                acc_t* __restrict__ dwt, acc_t* __restrict__ dbc, acc_t* gbuf,
                                                acc_t* xbuf, int64_t begin, int64_t end, int64_t G, int64_t N,
                                                int64_t H, int64_t p) {
  for (int64_t r0 = begin; r0 < end; r0 += kRows) {
    const int64_t R = std::min<int64_t>(kRows, end - r0);
    for (int64_t i = 0; i < R; ++i) {
      const int64_t r = r0 + i, b = r / N, n = r % N;
      const int64_t jmax = std::min<int64_t>(p, G - n * p);
      for (int64_t j = 0; j < p; ++j) xbuf[i * p + j] = j < jmax ? static_cast<acc_t>(x[b * G + n * p + j]) : acc_t(0);
      const scalar_t* gr = grad + r * H;
      acc_t* gi = gbuf + i * H;
      for (int64_t h = 0; h < H; ++h) gi[h] = static_cast<acc_t>(gr[h]);
      if (dx != nullptr) {
        for (int64_t j = 0; j < jmax; ++j) dx[b * G + n * p + j] = static_cast<scalar_t>(dot(gi, wt + j * H, H));
      }
    }
    if (R == kRows) {
      accumulate_rows<kRows>(gbuf, xbuf, dwt, dbc, H, p);
    } else {
      for (int64_t i = 0; i < R; ++i) accumulate_rows<1>(gbuf + i * H, xbuf + i * p, dwt, dbc, H, p);
    }
  }
}

template <typename scalar_t>
void patch_embed_cpu_kernel(const scalar_t* x, const scalar_t* w, const scalar_t* bias, const scalar_t* pos,
                            scalar_t* out, int64_t B, int64_t G, int64_t N, int64_t H, int64_t p) {
  using acc_t = at::opmath_type<scalar_t>;
  const std::vector<acc_t> wt = transposed_weight<scalar_t, acc_t>(w, H, p);
  // bias + pos (N, H) once, shared by all B rows of each token.
  std::vector<acc_t> bp(N * H);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t h = 0; h < H; ++h)
      bp[n * H + h] = static_cast<acc_t>(bias[h]) + static_cast<acc_t>(pos[n * H + h]);
  at::parallel_for(0, B * N, row_grain(H), [&](int64_t begin, int64_t end) {
    patch_embed_rows<scalar_t, acc_t>(x, wt.data(), bp.data(), out, begin, end, G, N, H, p);
  });
}

template <typename scalar_t>
void patch_embed_backward_cpu_kernel(const scalar_t* grad, const scalar_t* x, const scalar_t* w, scalar_t* dx,
                                     scalar_t* dw, scalar_t* db, int64_t B, int64_t G, int64_t N, int64_t H,
                                     int64_t p) {  // dx == nullptr: dx not wanted
  using acc_t = at::opmath_type<scalar_t>;
  const std::vector<acc_t> wt = transposed_weight<scalar_t, acc_t>(w, H, p);
  const int64_t rows = B * N;
  // dW and db are sums over all rows: each chunk of rows keeps its own partial (dW^T, db), and
  // the partials are added in chunk order afterwards, so the result does not depend on which
  // thread ran which chunk.
  const int64_t chunks = std::max<int64_t>(
      1, std::min<int64_t>(at::get_num_threads(), (rows + row_grain(H) - 1) / row_grain(H)));
  std::vector<acc_t> partial(chunks * (p + 1) * H, acc_t(0));
  at::parallel_for(0, chunks, 1, [&](int64_t c_begin, int64_t c_end) {
    std::vector<acc_t> gbuf(kRows * H), xbuf(kRows * p);
    for (int64_t c = c_begin; c < c_end; ++c) {
      acc_t* dwt = partial.data() + c * (p + 1) * H;
      patch_embed_backward_rows<scalar_t, acc_t>(grad, x, wt.data(), dx, dwt, dwt + p * H, gbuf.data(),
                                                 xbuf.data(), rows * c / chunks, rows * (c + 1) / chunks, G, N,
                                                 H, p);
    }
  });
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t j = 0; j < p; ++j) {
      acc_t s = 0;
      for (int64_t c = 0; c < chunks; ++c) s += partial[(c * (p + 1) + j) * H + h];
      dw[h * p + j] = static_cast<scalar_t>(s);
    }
    acc_t s = 0;
    for (int64_t c = 0; c < chunks; ++c) s += partial[(c * (p + 1) + p) * H + h];
    db[h] = static_cast<scalar_t>(s);
  }
}

at::Tensor patch_embed_cpu(const at::Tensor& x_, const at::Tensor& weight_, const at::Tensor& bias_,
                           const at::Tensor& pos_embed_) {
  check_patch_embed(x_, weight_, bias_, pos_embed_);
  const at::Tensor x = x_.contiguous(), weight = weight_.contiguous(), bias = bias_.contiguous(),
                   pos = pos_embed_.contiguous();
  const int64_t B = x.size(0), G = x.size(1), H = weight.size(0), p = weight.size(1), N = pos.size(0);
  at::Tensor out = at::empty({B, N, H}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "patch_embed_cpu", [&] {
    patch_embed_cpu_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
                                     bias.const_data_ptr<scalar_t>(), pos.const_data_ptr<scalar_t>(),
                                     out.mutable_data_ptr<scalar_t>(), B, G, N, H, p);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> patch_embed_backward_cpu(const at::Tensor& grad_,
                                                                        const at::Tensor& x_,
                                                                        const at::Tensor& weight_,
                                                                        bool compute_dx) {
  check_patch_embed_backward(grad_, x_, weight_);
  const at::Tensor grad = grad_.contiguous(), x = x_.contiguous(), weight = weight_.contiguous();
  const int64_t B = x.size(0), G = x.size(1), H = weight.size(0), p = weight.size(1);
  const int64_t N = grad.size(1);
  // Genes cropped away (N*p < G) get no gradient; the kernel writes only genes < N*p.
  at::Tensor dx = !compute_dx ? at::empty({0}, x.options()) : N * p < G ? at::zeros_like(x) : at::empty_like(x);
  at::Tensor dw = at::empty_like(weight), db = at::empty({H}, weight.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "patch_embed_backward_cpu", [&] {
    patch_embed_backward_cpu_kernel<scalar_t>(grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                              weight.const_data_ptr<scalar_t>(),
                                              compute_dx ? dx.mutable_data_ptr<scalar_t>() : nullptr,
                                              dw.mutable_data_ptr<scalar_t>(), db.mutable_data_ptr<scalar_t>(), B,
                                              G, N, H, p);
  });
  return {dx, dw, db};
}

// Largest |t f_k| for the vectorized sin/cos below: n = round(a * 2/pi) stays under 2^20, so
// n * kPio2Hi is exact in double and the two-constant reduction loses nothing a float can see.
constexpr double kFastArgMax = 1.0e6;
constexpr double kPio2Hi = 1.57079632673412561417e+00;  // first 33 bits of pi/2 (fdlibm pio2_1)
constexpr double kPio2Lo = 6.07710050650619224932e-11;  // pi/2 - kPio2Hi (fdlibm pio2_1t)
constexpr double kTwoOverPi = 6.36619772367581382433e-01;
constexpr double kRound = 6755399441055744.0;  // 1.5 * 2^52: (x + kRound) - kRound rounds x to an integer

// Rows [begin, end) of the embedding: row[k] = cos(a), row[half + k] = sin(a), a = t_b * f_k in
// float32 as in the reference. libm's scalar sinf/cosf made this 3x slower than torch's SLEEF
// kernels, so sin and cos are computed in a form the compiler vectorizes on every x86-64 level:
// r = a - n pi/2 in double (exact for |a| <= kFastArgMax), Taylor polynomials on |r| <= pi/4
// (truncation below 1e-11), and the quadrant n mod 4 by arithmetic, because a float-to-int
// conversion or a floating compare in the loop stops GCC from vectorizing it below AVX-512.
// Rounded to float this is within an ulp of torch's sin and cos. Rows whose arguments can
// exceed kFastArgMax (timesteps far beyond any diffusion schedule) are redone with libm's
// exact reduction; f_absmax = max_k |f_k| finds them.
WBDIT_CPU_CLONES void timestep_embedding_rows(const float* __restrict__ t, const float* __restrict__ f,
                                              double f_absmax, float* __restrict__ out, int64_t begin, int64_t end,
                                              int64_t half) {
  for (int64_t b = begin; b < end; ++b) {
    const float tb = t[b];
    float* __restrict__ cos_row = out + b * 2 * half;
    float* __restrict__ sin_row = cos_row + half;
    for (int64_t k = 0; k < half; ++k) {
      const double a = static_cast<double>(tb * f[k]);
      const double n = (a * kTwoOverPi + kRound) - kRound;
      const double r = (a - n * kPio2Hi) - n * kPio2Lo;
      const double r2 = r * r;
      const double s = r * (1.0 + r2 * (-1.0 / 6 + r2 * (1.0 / 120 + r2 * (-1.0 / 5040 + r2 * (1.0 / 362880 +
                                                                                          r2 * (-1.0 / 39916800))))));
      const double c = 1.0 + r2 * (-0.5 + r2 * (1.0 / 24 + r2 * (-1.0 / 720 + r2 * (1.0 / 40320 + r2 * (-1.0 / 3628800 +
                                                                                         r2 * (1.0 / 479001600))))));
      const double m2 = (n * 0.5 - 0.25 + kRound) - kRound;   // floor(n / 2): n / 2 - 0.25 is never a tie
      const double odd = n - 2.0 * m2;                         // n mod 2
      const double m4 = (m2 * 0.5 - 0.25 + kRound) - kRound;  // floor(n / 4)
      const double hi = m2 - 2.0 * m4;                         // 1 when n mod 4 is 2 or 3
      const double sin_a = s + odd * (c - s);                  // odd quadrants swap sin and cos
      const double cos_a = c + odd * (s - c);
      cos_row[k] = static_cast<float>((1.0 - 2.0 * (odd + hi - 2.0 * odd * hi)) * cos_a);  // - for n mod 4 in {1, 2}
      sin_row[k] = static_cast<float>((1.0 - 2.0 * hi) * sin_a);                            // - for n mod 4 in {2, 3}
    }
    if (std::fabs(static_cast<double>(tb)) * f_absmax >= 0.5 * kFastArgMax) {
      for (int64_t k = 0; k < half; ++k) {
        const float a = tb * f[k];
        if (!(std::fabs(static_cast<double>(a)) <= kFastArgMax)) {  // also inf and nan
          cos_row[k] = std::cos(a);
          sin_row[k] = std::sin(a);
        }
      }
    }
  }
}

at::Tensor timestep_embedding_cpu(const at::Tensor& t_, int64_t dim, double max_period) {
  check_timestep_embedding(t_, dim);
  const int64_t B = t_.size(0), half = dim / 2;
  // The frequencies come from the reference's own ATen ops: torch's vectorized exp and libm's
  // expf differ in the last bit for about 1% of arguments, and one ulp of f_k moves t * f_k by
  // t * 6e-8, which is visible for large t. The table is only `half` floats.
  const at::Tensor freqs =
      at::exp(at::arange(half, t_.options().dtype(at::kFloat)) * (-std::log(max_period)) / half).contiguous();
  const at::Tensor t = t_.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({B, dim}, t_.options().dtype(at::kFloat));
  const float* f = freqs.const_data_ptr<float>();
  const float* tp = t.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  double f_absmax = 0.0;
  for (int64_t k = 0; k < half; ++k) f_absmax = std::max(f_absmax, std::fabs(static_cast<double>(f[k])));
  at::parallel_for(0, B, std::max<int64_t>(1, 16384 / dim), [&](int64_t begin, int64_t end) {
    timestep_embedding_rows(tp, f, f_absmax, op, begin, end, half);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(wbdit, m) {
  // Fake (meta) kernels and autograd live in Python; torch imports this module when it needs them.
  m.set_python_module("wbdit.extension");
  m.def("patch_embed(Tensor x, Tensor weight, Tensor bias, Tensor pos_embed) -> Tensor");
  m.def("patch_embed_backward(Tensor grad, Tensor x, Tensor weight, bool compute_dx=True) -> (Tensor, Tensor, Tensor)");
  m.def("timestep_embedding(Tensor t, int dim, float max_period) -> Tensor");
}

TORCH_LIBRARY_IMPL(wbdit, CPU, m) {
  m.impl("patch_embed", &patch_embed_cpu);
  m.impl("patch_embed_backward", &patch_embed_backward_cpu);
  m.impl("timestep_embedding", &timestep_embedding_cpu);
}

}  // namespace wbdit

// `import wbdit._C` only has to load this library so that the registrations above run; the ops
// are called through torch.ops.wbdit, so the module itself stays empty.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
