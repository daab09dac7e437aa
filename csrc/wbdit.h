// Argument checks shared by the CPU (wbdit.cpp) and CUDA (wbdit_cuda.cu) implementations, so
// both devices reject the same inputs with the same messages.
#pragma once

#include <ATen/core/Tensor.h>

namespace wbdit {

void check_patch_embed(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                       const at::Tensor& pos_embed);
void check_patch_embed_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight);
void check_timestep_embedding(const at::Tensor& t, int64_t dim);

}  // namespace wbdit
