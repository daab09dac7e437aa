// CUDA kernels of wbdit._C: patch embedding (forward and backward) and timestep embedding.
//
// They must equal wbdit/reference.py (see the math at the top of wbdit.cpp):
//   out[b,n,h] = bias[h] + pos[n,h] + sum_{j<p} xpad[b, n*p+j] * W[h,j]      xpad: x zero-padded to N*p
//   dx[b, n*p+j] = sum_h dout[b,n,h] W[h,j];   dW[h,j] = sum_{b,n} dout[b,n,h] xpad[b,n*p+j];
//   db[h] = sum_{b,n} dout[b,n,h]
//   temb[b,k] = cos(float(t_b) f_k), temb[b,half+k] = sin(float(t_b) f_k), f_k = exp(-ln(max_period) k / half)
// fp32, bf16 and fp16 (and fp64) inputs; sums are carried in float (double for fp64).
//
// Why these shapes of kernel: at the seed shape (B=256, N=200, H=768) the (B*N, H) activations
// are 157 MB in fp32 while x, W, bias and pos together are under 3 MB, so the forward is one
// write of the output (the reference writes the GEMM-with-bias output, then reads it and writes
// `+ pos` into a second tensor), and the backward reads dout twice (dx, then dW with db) where
// the reference reads it three times (two GEMMs and the bias sum), and once when dx is not wanted
// (training: x is data) where the reference reads it twice.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "wbdit.h"

namespace wbdit {
namespace {

constexpr int kFwdThreads = 128;  // threads along h per block
constexpr int kFwdRows = 8;       // rows (b, n) per block: each thread reuses its W[h, :] 8 times
constexpr int kWarps = 8;         // warps per block in the backward kernels
constexpr int kJ = 8;             // patch positions j handled per pass, kept in registers

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename scalar_t>
__global__ void __launch_bounds__(kFwdThreads)
    patch_embed_fwd_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
                           const scalar_t* __restrict__ bias, const scalar_t* __restrict__ pos,
                           scalar_t* __restrict__ out, int64_t rows, int64_t G, int64_t N, int64_t H, int64_t p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t h = blockIdx.x * static_cast<int64_t>(kFwdThreads) + threadIdx.x;
  if (h >= H) return;
  const acc_t bh = static_cast<acc_t>(bias[h]);
  const scalar_t* wh = w + h * p;
  // Grid-stride over row groups: gridDim.y is capped at 65535.
  for (int64_t r0 = blockIdx.y * static_cast<int64_t>(kFwdRows); r0 < rows;
       r0 += static_cast<int64_t>(gridDim.y) * kFwdRows) {
    const int64_t r_end = r0 + kFwdRows < rows ? r0 + kFwdRows : rows;
    for (int64_t r = r0; r < r_end; ++r) {
      const int64_t b = r / N, n = r - b * N;
      acc_t acc = bh + static_cast<acc_t>(pos[n * H + h]);
      // All lanes of a warp read the same x[b, n*p + j]: one broadcast load per j.
      const scalar_t* xr = x + b * G + n * p;
      const int64_t jmax = G - n * p < p ? G - n * p : p;  // genes past G are the zero padding
      for (int64_t j = 0; j < jmax; ++j) acc += static_cast<acc_t>(xr[j]) * static_cast<acc_t>(wh[j]);
      out[r * H + h] = static_cast<scalar_t>(acc);
    }
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// dx: one warp per row (b, n); lanes stride over h, kJ sums of dout[r, h] W[h, j] at a time
// in registers, then a shuffle reduction. The row stays in L1 between the ceil(p / kJ) passes.
template <typename scalar_t>
__global__ void __launch_bounds__(kWarps * 32)
    patch_embed_bwd_dx_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ w,
                              scalar_t* __restrict__ dx, int64_t rows, int64_t G, int64_t N, int64_t H, int64_t p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x & 31;
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t r = blockIdx.x * static_cast<int64_t>(kWarps) + threadIdx.x / 32; r < rows; r += warp_stride) {
    const int64_t b = r / N, n = r - b * N;
    const int64_t jmax = G - n * p < p ? G - n * p : p;  // warp-uniform: every lane reaches the shuffles
    const scalar_t* gr = grad + r * H;
    for (int64_t j0 = 0; j0 < jmax; j0 += kJ) {
      acc_t acc[kJ];
#pragma unroll
      for (int jj = 0; jj < kJ; ++jj) acc[jj] = acc_t(0);
      for (int64_t h = lane; h < H; h += 32) {
        const acc_t g = static_cast<acc_t>(gr[h]);
        const scalar_t* wh = w + h * p + j0;
#pragma unroll
        for (int jj = 0; jj < kJ; ++jj)
          if (j0 + jj < jmax) acc[jj] += g * static_cast<acc_t>(wh[jj]);
      }
#pragma unroll
      for (int jj = 0; jj < kJ; ++jj) {
        const acc_t s = warp_sum(acc[jj]);
        if (lane == 0 && j0 + jj < jmax) dx[b * G + n * p + j0 + jj] = static_cast<scalar_t>(s);
      }
    }
  }
}

// dW and db: block (32 lanes along h) x (kWarps row-interleaved warps); blockIdx.y owns one
// contiguous split of the rows and writes its partial sums to ws[split, j, h] (j == p is db).
// Each (split, j, h) is written once, and the splits are added by at::sum afterwards, so the
// result is deterministic (no atomics).
template <typename scalar_t>
__global__ void __launch_bounds__(kWarps * 32)
    patch_embed_bwd_dw_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                              at::opmath_type<scalar_t>* __restrict__ ws, int64_t rows, int64_t rows_per_split,
                              int64_t G, int64_t N, int64_t H, int64_t p) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t red[kJ + 1][kWarps][32];
  const int tx = threadIdx.x & 31, ty = threadIdx.x / 32;
  const int64_t h = blockIdx.x * 32 + tx;
  const int64_t r_begin = blockIdx.y * rows_per_split;
  const int64_t r_end = r_begin + rows_per_split < rows ? r_begin + rows_per_split : rows;
  for (int64_t j0 = 0; j0 < p; j0 += kJ) {
    acc_t acc[kJ + 1];
#pragma unroll
    for (int jj = 0; jj <= kJ; ++jj) acc[jj] = acc_t(0);
    if (h < H) {
      for (int64_t r = r_begin + ty; r < r_end; r += kWarps) {
        const int64_t b = r / N, n = r - b * N;
        const acc_t g = static_cast<acc_t>(grad[r * H + h]);
        acc[kJ] += g;
        const scalar_t* xr = x + b * G + n * p + j0;
        const int64_t jmax = G - n * p - j0;  // genes past G are the zero padding
#pragma unroll
        for (int jj = 0; jj < kJ; ++jj)
          if (j0 + jj < p && jj < jmax) acc[jj] += g * static_cast<acc_t>(xr[jj]);
      }
    }
#pragma unroll
    for (int jj = 0; jj <= kJ; ++jj) red[jj][ty][tx] = acc[jj];
    __syncthreads();
    if (ty == 0 && h < H) {
      acc_t* out = ws + blockIdx.y * (p + 1) * H;
#pragma unroll
      for (int jj = 0; jj <= kJ; ++jj) {
        acc_t s = acc_t(0);
#pragma unroll
        for (int y = 0; y < kWarps; ++y) s += red[jj][y][tx];
        if (jj < kJ && j0 + jj < p) out[(j0 + jj) * H + h] = s;
        if (jj == kJ && j0 == 0) out[p * H + h] = s;
      }
    }
    __syncthreads();
  }
}

template <typename t_t>
__global__ void timestep_embedding_kernel(const t_t* __restrict__ t, float* __restrict__ out, int64_t B,
                                          int64_t half, float neg_log_period, float inv_half) {
  const int64_t total = B * half;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = i / half, k = i - b * half;
    // The reference's float32 steps on CUDA: (-ln P) * k, then times the reciprocal of half
    // (torch turns division by a CPU scalar into that product), then expf. Same roundings,
    // same bits; sincosf keeps full range reduction, so huge t stays finite and accurate.
    const float f = expf((neg_log_period * static_cast<float>(k)) * inv_half);
    const float a = static_cast<float>(t[b]) * f;
    float s, c;
    sincosf(a, &s, &c);
    out[b * 2 * half + k] = c;
    out[b * 2 * half + half + k] = s;
  }
}

at::Tensor patch_embed_cuda(const at::Tensor& x_, const at::Tensor& weight_, const at::Tensor& bias_,
                            const at::Tensor& pos_embed_) {
  check_patch_embed(x_, weight_, bias_, pos_embed_);
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous(), weight = weight_.contiguous(), bias = bias_.contiguous(),
                   pos = pos_embed_.contiguous();
  const int64_t B = x.size(0), G = x.size(1), H = weight.size(0), p = weight.size(1), N = pos.size(0);
  at::Tensor out = at::empty({B, N, H}, x.options());
  const int64_t rows = B * N;
  if (out.numel() == 0) return out;
  const dim3 grid(ceil_div(H, kFwdThreads), std::min<int64_t>(ceil_div(rows, kFwdRows), 65535));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "patch_embed_cuda", [&] {
    patch_embed_fwd_kernel<scalar_t><<<grid, kFwdThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(), bias.const_data_ptr<scalar_t>(),
        pos.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), rows, G, N, H, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> patch_embed_backward_cuda(const at::Tensor& grad_,
                                                                         const at::Tensor& x_,
                                                                         const at::Tensor& weight_,
                                                                         bool compute_dx) {
  check_patch_embed_backward(grad_, x_, weight_);
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor grad = grad_.contiguous(), x = x_.contiguous(), weight = weight_.contiguous();
  const int64_t B = x.size(0), G = x.size(1), H = weight.size(0), p = weight.size(1), N = grad.size(1);
  const int64_t rows = B * N;
  const at::ScalarType acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // Genes cropped away (N*p < G) get no gradient; the dx kernel writes only genes < N*p.
  at::Tensor dx = !compute_dx ? at::empty({0}, x.options()) : N * p < G ? at::zeros_like(x) : at::empty_like(x);
  if (rows == 0 || H == 0) {
    return {dx, at::zeros_like(weight), at::zeros({H}, weight.options())};
  }
  // Enough (h-tile, split) blocks to fill a large GPU several times over, each split still
  // long enough (>= 64 rows) that its partial sums are worth writing out.
  const int64_t h_tiles = ceil_div(H, 32);
  const int64_t splits = std::max<int64_t>(1, std::min(ceil_div(rows, 64), ceil_div(2048, h_tiles)));
  const int64_t rows_per_split = ceil_div(rows, splits);
  at::Tensor ws = at::empty({splits, p + 1, H}, x.options().dtype(acc_type));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "patch_embed_backward_cuda", [&] {
    if (compute_dx) {
      const int64_t dx_blocks = std::min<int64_t>(ceil_div(rows, kWarps), 1 << 20);
      patch_embed_bwd_dx_kernel<scalar_t><<<dx_blocks, kWarps * 32, 0, stream>>>(
          grad.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(),
          rows, G, N, H, p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    patch_embed_bwd_dw_kernel<scalar_t><<<dim3(h_tiles, splits), kWarps * 32, 0, stream>>>(
        grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
        ws.mutable_data_ptr<at::opmath_type<scalar_t>>(), rows, rows_per_split, G, N, H, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // Fresh outputs (not views of `sums`), converted to the weight's dtype by copy_.
  const at::Tensor sums = ws.sum(0);  // (p + 1, H)
  at::Tensor dw = at::empty_like(weight), db = at::empty({H}, weight.options());
  dw.copy_(sums.narrow(0, 0, p).t());
  db.copy_(sums.select(0, p));
  return {dx, dw, db};
}

at::Tensor timestep_embedding_cuda(const at::Tensor& t_, int64_t dim, double max_period) {
  check_timestep_embedding(t_, dim);
  const c10::cuda::CUDAGuard guard(t_.device());
  const at::Tensor t = t_.contiguous();
  const int64_t B = t.size(0), half = dim / 2;
  at::Tensor out = at::empty({B, dim}, t.options().dtype(at::kFloat));
  if (B == 0) return out;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>(ceil_div(B * half, threads), 1 << 16);
  // Both constants rounded to float exactly as torch rounds a Python scalar for a float32 op.
  const float neg_log_period = static_cast<float>(-std::log(max_period));
  const float inv_half = 1.0f / static_cast<float>(half);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_ALL_TYPES_AND2(at::kBFloat16, at::kHalf, t.scalar_type(), "timestep_embedding_cuda", [&] {
    timestep_embedding_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
        t.const_data_ptr<scalar_t>(), out.mutable_data_ptr<float>(), B, half, neg_log_period, inv_half);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(wbdit, CUDA, m) {
  m.impl("patch_embed", &patch_embed_cuda);
  m.impl("patch_embed_backward", &patch_embed_backward_cuda);
  m.impl("timestep_embedding", &timestep_embedding_cuda);
}

}  // namespace wbdit
