// Python bindings of every csrc kernel: one module, `fastpeft._cuda` when built ahead of time
// (FASTPEFT_BUILD_CUDA=1 pip install .) or `fastpeft_cuda` when built just in time (fastpeft/ops/cuda_ext.py).
// Kernels are declared here and defined in their .cu files; this file includes no CUDA header, so it compiles
// with the host compiler alone.
#include <torch/extension.h>

#include <optional>

namespace fastpeft {

// csrc/multi_lora_decode.cu
void multi_lora_decode(at::Tensor y, const at::Tensor& x, const at::Tensor& table, const at::Tensor& ranks,
                       const at::Tensor& token_slot, std::optional<at::ScalarType> adapter_dtype,
                       int64_t block_n);

}  // namespace fastpeft

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastpeft CUDA C++ kernels (csrc/)";
  m.def("multi_lora_decode", &fastpeft::multi_lora_decode, py::arg("y"), py::arg("x"), py::arg("table"),
        py::arg("ranks"), py::arg("token_slot"), py::arg("adapter_dtype") = py::none(), py::arg("block_n") = 0,
        R"doc(multi_lora_decode(y, x, table, ranks, token_slot, adapter_dtype=None, block_n=0) -> None

Multi-adapter LoRA for few tokens, in place on y (M, N):
    y[m] += ((x[m] @ A_s.T) * scale_s) @ B_s.T    for s = token_slot[m], 0 <= s < n_slots, ranks[s] > 0
other rows of y are left untouched.

y (M, N), x (M, K): contiguous CUDA tensors of one dtype (bfloat16, float16, float32).
table: int64 (3, n_slots), contiguous: data_ptr of A_s (r x K), of B_s (N x r), of scale_s (r, float32);
    0 for an empty slot. The caller keeps those tensors alive and contiguous, on y's device.
ranks: int32 (n_slots,); token_slot: int32 (M,).
adapter_dtype: dtype of every A_s and B_s: None (x's dtype), x's dtype or torch.float32.
block_n: output columns per block, 0 for the automatic choice (about 2 blocks per SM), else 1..1024.
Runs on the current CUDA stream; float32 accumulation, y rounded once.)doc");
}
