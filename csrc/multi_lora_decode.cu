// multi_lora_decode: fused shrink + expand for multi-adapter LoRA at decode time (few tokens, one adapter per row).
//
// Math. For every token m with slot s = token_slot[m], 0 <= s < n_slots, r = ranks[s] > 0 and a non-null
// table entry:
//     t_j     = sum_k x[m, k] * A_s[j, k]                      j < r    (A_s: r x K, row-major, contiguous)
//     y[m, n] = y[m, n] + sum_j (t_j * scale_s[j]) * B_s[n, j]          (B_s: N x r, row-major, contiguous;
//                                                                        scale_s: r float32)
// Other tokens (s < 0, s >= n_slots, r <= 0, a null pointer in the table) leave y[m, :] untouched: their blocks
// exit after reading three integers. t never leaves the block (shared memory). Products and sums run in float32;
// y is read once, added to in float32 and rounded once to its dtype.
//
// Adapters are addressed through a pointer table, so adapters of different ranks live in their own tensors:
//     table: int64 (3, n_slots), row 0 = data_ptr(A_s), row 1 = data_ptr(B_s), row 2 = data_ptr(scale_s) (float32),
//            0 for an empty slot;  ranks: int32 (n_slots);  token_slot: int32 (M).
// The pointers cannot be checked on the host without reading device memory: whoever builds the table (the op
// layer in fastpeft/ops, never a user directly) guarantees that entry s points to r*K, N*r and r elements of
// the adapter dtype (float32 for scale) on y's device, alive until the kernel has run.
//
// Design.
//   grid  = (M, n_chunks): block (m, c) owns token m and output columns [c*NC, min(N, (c+1)*NC)).
//   block = 256 threads = 8 warps.
//   Each block recomputes the shrink of its token (the A_s re-reads of the other N-chunks hit L2), then expands
//   its N-chunk. NC (<= 1024 = 4 columns per thread) is chosen on the host so that M * n_chunks >= 2 blocks per
//   SM when the token count allows (M = 64 on an H100: NC = 832 for N = 4096, 5 chunks, 320 blocks).
//   Shared memory (static, 17 KiB): xs[4096] float32 (one K-tile of the token's x row) + ts[256] float32 (t of
//   one rank chunk). Any K: the shrink walks K in tiles of 4096, and each warp adds its partial dot products
//   into ts[j] (only the warp that owns row j ever writes ts[j], so the adds need no atomics).
//   Any rank: ranks are processed in chunks of 256 (the expand keeps its 4 column accumulators in registers
//   across rank chunks, so y is still rounded once); r <= 256 is one chunk, the common case.
//   Shrink: warp w computes rows j = w, w + 8, ... of the rank chunk; its 32 lanes stride along k; a butterfly
//   warp shuffle (__shfl_xor_sync) sums the lanes; lane 0 adds into ts[j].
//   Expand: thread i computes columns n = c*NC + i + 256*q (q < 4), acc_q += sum_j ts[j] * B_s[n, j], reading
//   the contiguous row B_s[n, r0:r0+rc]; ts[j] is a shared-memory broadcast.
//   Vectorisation: A_s and B_s are read with 16-byte loads (8 halves/bfloat16s or 4 floats) when the slot's
//   pointer is 16-byte aligned and the row length in bytes is a multiple of 16 (K * sizeof(W) for A_s,
//   r * sizeof(W) for B_s), so that every row starts aligned and the row length is a whole number of vectors;
//   otherwise (K or r not a multiple of the vector width, offset views) scalar loads. The choice is made per
//   block from the slot's pointer and is uniform within the block (no divergence). x is staged into shared
//   memory with coalesced scalar loads (K elements per block, small next to A_s's r * K).
//   Offsets are 64-bit (M * N and N * r may pass 2^31). ptxas (CUDA 13): 53-72 registers, no spills.
//   (No __launch_bounds__: with it, nvcc 13 capped registers at 48-64 and spilled.)
//
// Python (csrc/bindings.cpp): multi_lora_decode(y, x, table, ranks, token_slot, adapter_dtype=None, block_n=0),
// in place on y. adapter_dtype: dtype of A_s and B_s, x's (None) or float32. block_n: NC, 0 = automatic.
// The host wrapper validates devices, dtypes, contiguity and shapes before the launch; the values in ranks and
// token_slot stay on the device (no synchronisation): out-of-range slots and ranks <= 0 are skipped by the kernel.
//
// Launch: the current CUDA stream of y's device (c10::cuda::getCurrentCUDAStream, which at::cuda's is an alias
// of); launch errors are checked (C10_CUDA_KERNEL_LAUNCH_CHECK).
//
// Headers: ATen and c10/cuda only (not ATen/cuda/CUDAContext.h, which pulls cuBLAS/cuSPARSE headers that a
// minimal CUDA toolkit, like the CI's, does not ship).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <atomic>
#include <cstdint>
#include <limits>
#include <optional>

namespace fastpeft {
namespace {

constexpr int kThreads = 256;                     // threads per block
constexpr int kWarps = kThreads / 32;             // warps per block
constexpr int kColsPerThread = 4;                 // expand: output columns per thread
constexpr int kMaxChunk = kThreads * kColsPerThread;  // largest N-chunk a block can own (1024)
constexpr int kKTile = 4096;                      // shrink: elements of x staged in shared memory at a time
constexpr int kRankChunk = 256;                   // ranks handled per pass (= size of ts)

static_assert(kKTile % 8 == 0 && kRankChunk % 8 == 0, "tiles must be whole numbers of 16-byte vectors");
static_assert(kRankChunk <= kThreads, "one thread per rank row zeroes / scales ts");

template <typename W>
struct VecWidth {
  static constexpr int value = 16 / static_cast<int>(sizeof(W));  // elements per 16-byte load: 4 or 8
};

// 16 bytes at p (16-byte aligned, read-only for the kernel's lifetime) as VecWidth<W> floats, element i of the
// vector first (little-endian: element 2i is the low half of 32-bit word i).
__device__ __forceinline__ void load_vec(const float* p, float* out) {
  const float4 v = __ldg(reinterpret_cast<const float4*>(p));
  out[0] = v.x;
  out[1] = v.y;
  out[2] = v.z;
  out[3] = v.w;
}

template <typename H>  // at::Half or at::BFloat16
__device__ __forceinline__ void load_vec16(const H* p, float* out) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = static_cast<float>(H(static_cast<unsigned short>(words[i] & 0xffffu), H::from_bits()));
    out[2 * i + 1] = static_cast<float>(H(static_cast<unsigned short>(words[i] >> 16), H::from_bits()));
  }
}

__device__ __forceinline__ void load_vec(const at::Half* p, float* out) { load_vec16(p, out); }
__device__ __forceinline__ void load_vec(const at::BFloat16* p, float* out) { load_vec16(p, out); }

// V floats of shared memory at p (16-byte aligned) with 16-byte shared loads: for V = 4 a quarter warp reads
// 128 contiguous bytes (no bank conflict); for V = 8, 2-way conflicts (8 lanes, 32 bytes apart).
template <int V>
__device__ __forceinline__ void load_shared(const float* p, float* out) {
  static_assert(V % 4 == 0, "whole float4s");
#pragma unroll
  for (int i = 0; i < V / 4; ++i) {
    const float4 f = reinterpret_cast<const float4*>(p)[i];
    out[4 * i] = f.x;
    out[4 * i + 1] = f.y;
    out[4 * i + 2] = f.z;
    out[4 * i + 3] = f.w;
  }
}

// One element at p through the read-only path (the table's pointers are generic to the compiler; __ldg makes
// them global, non-coherent loads, which is valid because A_s and B_s are not written during the kernel).
__device__ __forceinline__ float load_scalar(const float* p) { return __ldg(p); }

template <typename H>  // at::Half or at::BFloat16
__device__ __forceinline__ float load_scalar16(const H* p) {
  return static_cast<float>(H(__ldg(reinterpret_cast<const unsigned short*>(p)), H::from_bits()));
}

__device__ __forceinline__ float load_scalar(const at::Half* p) { return load_scalar16(p); }
__device__ __forceinline__ float load_scalar(const at::BFloat16* p) { return load_scalar16(p); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// T: activation dtype of x and y; W: adapter dtype of A_s and B_s (T or float).
template <typename T, typename W>
__global__ void
multi_lora_decode_kernel(T* __restrict__ y, const T* __restrict__ x, const int64_t* __restrict__ table,
                         const int32_t* __restrict__ ranks, const int32_t* __restrict__ token_slot,
                         int64_t n_slots, int64_t K, int64_t N, int64_t chunk) {
  constexpr int V = VecWidth<W>::value;
  __shared__ __align__(16) float xs[kKTile];
  __shared__ float ts[kRankChunk];

  const int64_t m = blockIdx.x;
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;

  // Which adapter, if any. Every value here is uniform across the block, so the early exits are too.
  const int64_t slot = token_slot[m];
  if (slot < 0 || slot >= n_slots) return;
  const int64_t r = ranks[slot];
  if (r <= 0) return;
  const W* A = reinterpret_cast<const W*>(static_cast<uintptr_t>(table[slot]));
  const W* B = reinterpret_cast<const W*>(static_cast<uintptr_t>(table[n_slots + slot]));
  const float* S = reinterpret_cast<const float*>(static_cast<uintptr_t>(table[2 * n_slots + slot]));
  if (A == nullptr || B == nullptr || S == nullptr) return;

  const int64_t n_begin = static_cast<int64_t>(blockIdx.y) * chunk;
  const int64_t n_end = (n_begin + chunk < N) ? n_begin + chunk : N;
  const bool vec_a = aligned16(A) && (K % V == 0);   // every row of A_s starts 16-byte aligned
  const bool vec_b = aligned16(B) && (r % V == 0);   // every row of B_s starts 16-byte aligned
  const T* xrow = x + m * K;

  float acc[kColsPerThread];
#pragma unroll
  for (int q = 0; q < kColsPerThread; ++q) acc[q] = 0.f;

  for (int64_t r0 = 0; r0 < r; r0 += kRankChunk) {
    const int rc = static_cast<int>((r - r0 < kRankChunk) ? r - r0 : kRankChunk);

    // ---- shrink: ts[j] = sum_k x[m, k] * A_s[r0 + j, k], j < rc ----
    __syncthreads();                 // the previous rank chunk's expand has finished reading ts
    if (tid < rc) ts[tid] = 0.f;
    for (int64_t k0 = 0; k0 < K; k0 += kKTile) {
      const int kt = static_cast<int>((K - k0 < kKTile) ? K - k0 : kKTile);
      __syncthreads();               // the previous tile's readers are done with xs; orders the ts zeroing
      for (int i = tid; i < kt; i += kThreads) xs[i] = static_cast<float>(xrow[k0 + i]);
      __syncthreads();               // xs holds x[m, k0 : k0 + kt]
      for (int j = warp; j < rc; j += kWarps) {
        const W* a = A + (r0 + j) * K + k0;
        float s = 0.f;
        if (vec_a) {
          // kt is a multiple of V here: K % V == 0 and kKTile % V == 0.
          for (int v = lane * V; v < kt; v += 32 * V) {
            float av[V], xv[V];
            load_vec(a + v, av);
            load_shared<V>(xs + v, xv);   // v is a multiple of V, so xs + v is 16-byte aligned
#pragma unroll
            for (int e = 0; e < V; ++e) s = fmaf(xv[e], av[e], s);
          }
        } else {
          for (int i = lane; i < kt; i += 32) s = fmaf(xs[i], load_scalar(a + i), s);
        }
        s = warp_sum(s);
        if (lane == 0) ts[j] += s;   // row j belongs to this warp alone
      }
    }
    __syncthreads();                 // every ts[j] of this rank chunk is complete
    if (tid < rc) ts[tid] *= load_scalar(S + r0 + tid);
    __syncthreads();                 // ts holds t_j * scale_s[j]

    // ---- expand: acc_q += sum_j ts[j] * B_s[n, r0 + j] for this thread's columns n ----
#pragma unroll
    for (int q = 0; q < kColsPerThread; ++q) {
      const int64_t n = n_begin + static_cast<int64_t>(q) * kThreads + tid;
      if (n < n_end) {
        const W* b = B + n * r + r0;
        float s = 0.f;
        if (vec_b) {
          // rc is a multiple of V here: r % V == 0 and kRankChunk % V == 0; r0 is a multiple of V too.
          for (int j = 0; j < rc; j += V) {
            float bv[V];
            load_vec(b + j, bv);
#pragma unroll
            for (int e = 0; e < V; ++e) s = fmaf(ts[j + e], bv[e], s);
          }
        } else {
          for (int j = 0; j < rc; ++j) s = fmaf(ts[j], load_scalar(b + j), s);
        }
        acc[q] += s;
      }
    }
  }

  // ---- y[m, n] += acc, rounded once ----
  T* yrow = y + m * N;
#pragma unroll
  for (int q = 0; q < kColsPerThread; ++q) {
    const int64_t n = n_begin + static_cast<int64_t>(q) * kThreads + tid;
    if (n < n_end) yrow[n] = static_cast<T>(static_cast<float>(yrow[n]) + acc[q]);
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Columns per block: enough blocks for ~2 per SM at this token count, at least one column per thread (256),
// at most kMaxChunk, a multiple of 32 (whole warps of columns).
int64_t auto_chunk(int64_t M, int64_t N, int sm_count) {
  const int64_t target_blocks = 2 * static_cast<int64_t>(sm_count > 0 ? sm_count : 1);
  const int64_t chunks = ceil_div(target_blocks, M);
  int64_t chunk = ceil_div(ceil_div(N, chunks), 32) * 32;
  if (chunk < kThreads) chunk = kThreads;
  if (chunk > kMaxChunk) chunk = kMaxChunk;
  return chunk;
}

const char* dtype_name(at::ScalarType t) { return c10::toString(t); }

// Streaming multiprocessors of `device`, queried once per device (cudaDeviceGetAttribute) and cached.
int sm_count(c10::DeviceIndex device) {
  constexpr int kCached = 64;
  static std::atomic<int> cache[kCached] = {};
  if (device >= 0 && device < kCached) {
    const int known = cache[device].load(std::memory_order_relaxed);
    if (known > 0) return known;
  }
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  if (device >= 0 && device < kCached) cache[device].store(count, std::memory_order_relaxed);
  return count;
}

template <typename T, typename W>
void launch(dim3 grid, cudaStream_t stream, at::Tensor& y, const at::Tensor& x, const at::Tensor& table,
            const at::Tensor& ranks, const at::Tensor& token_slot, int64_t n_slots, int64_t K, int64_t N,
            int64_t chunk) {
  multi_lora_decode_kernel<T, W><<<grid, kThreads, 0, stream>>>(
      y.mutable_data_ptr<T>(), x.const_data_ptr<T>(), table.const_data_ptr<int64_t>(),
      ranks.const_data_ptr<int32_t>(), token_slot.const_data_ptr<int32_t>(), n_slots, K, N, chunk);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// y (M, N) += per-token LoRA delta, in place. See the header comment for the math and the table layout.
// adapter_dtype: dtype of every A_s and B_s (None: x's dtype; otherwise x's dtype or float32).
// block_n: output columns per block (0: automatic; otherwise 1..1024).
void multi_lora_decode(at::Tensor y, const at::Tensor& x, const at::Tensor& table, const at::Tensor& ranks,
                       const at::Tensor& token_slot, std::optional<at::ScalarType> adapter_dtype,
                       int64_t block_n) {
  const char* fn = "fastpeft multi_lora_decode";
  TORCH_CHECK(y.defined() && x.defined() && table.defined() && ranks.defined() && token_slot.defined(), fn,
              ": every tensor argument must be defined (got an undefined tensor)");
  TORCH_CHECK(y.is_cuda(), fn, ": y must be a CUDA tensor, got one on ", y.device());
  const c10::Device dev = y.device();
  TORCH_CHECK(x.device() == dev, fn, ": x is on ", x.device(), " but y is on ", dev,
              "; put every tensor on one device");
  TORCH_CHECK(table.device() == dev, fn, ": table is on ", table.device(), " but y is on ", dev,
              "; put every tensor on one device");
  TORCH_CHECK(ranks.device() == dev, fn, ": ranks is on ", ranks.device(), " but y is on ", dev,
              "; put every tensor on one device");
  TORCH_CHECK(token_slot.device() == dev, fn, ": token_slot is on ", token_slot.device(), " but y is on ", dev,
              "; put every tensor on one device");

  const at::ScalarType act = x.scalar_type();
  TORCH_CHECK(act == at::kBFloat16 || act == at::kHalf || act == at::kFloat, fn,
              ": x must be bfloat16, float16 or float32, got ", dtype_name(act));
  TORCH_CHECK(y.scalar_type() == act, fn, ": y and x must have the same dtype, got y ", dtype_name(y.scalar_type()),
              " and x ", dtype_name(act));
  const at::ScalarType wdt = adapter_dtype.value_or(act);
  TORCH_CHECK(wdt == act || wdt == at::kFloat, fn, ": adapter_dtype must be x's dtype (", dtype_name(act),
              ") or float32, got ", dtype_name(wdt));
  TORCH_CHECK(table.scalar_type() == at::kLong, fn, ": table must be int64 (data pointers), got ",
              dtype_name(table.scalar_type()));
  TORCH_CHECK(ranks.scalar_type() == at::kInt, fn, ": ranks must be int32, got ", dtype_name(ranks.scalar_type()));
  TORCH_CHECK(token_slot.scalar_type() == at::kInt, fn, ": token_slot must be int32, got ",
              dtype_name(token_slot.scalar_type()));

  TORCH_CHECK(y.dim() == 2, fn, ": y must be 2-D (M, N), got shape ", y.sizes());
  TORCH_CHECK(x.dim() == 2, fn, ": x must be 2-D (M, K), got shape ", x.sizes());
  TORCH_CHECK(y.size(0) == x.size(0), fn, ": y and x must have the same number of rows (tokens), got y ", y.sizes(),
              " and x ", x.sizes());
  TORCH_CHECK(table.dim() == 2 && table.size(0) == 3, fn,
              ": table must have shape (3, n_slots) (rows: A pointers, B pointers, scale pointers), got ",
              table.sizes());
  const int64_t n_slots = table.size(1);
  TORCH_CHECK(ranks.dim() == 1 && ranks.size(0) == n_slots, fn, ": ranks must have shape (n_slots,) = (", n_slots,
              ",) to match table, got ", ranks.sizes());
  const int64_t M = x.size(0), K = x.size(1), N = y.size(1);
  TORCH_CHECK(token_slot.dim() == 1 && token_slot.size(0) == M, fn, ": token_slot must have shape (M,) = (", M,
              ",) (one slot per row of x), got ", token_slot.sizes());
  TORCH_CHECK(y.is_contiguous(), fn, ": y must be contiguous (call .contiguous() and copy back)");
  TORCH_CHECK(x.is_contiguous(), fn, ": x must be contiguous");
  TORCH_CHECK(table.is_contiguous(), fn, ": table must be contiguous");
  TORCH_CHECK(ranks.is_contiguous(), fn, ": ranks must be contiguous");
  TORCH_CHECK(token_slot.is_contiguous(), fn, ": token_slot must be contiguous");
  TORCH_CHECK(block_n == 0 || (block_n >= 1 && block_n <= kMaxChunk), fn, ": block_n must be 0 (automatic) or in 1..",
              kMaxChunk, ", got ", block_n);
  TORCH_CHECK(M <= std::numeric_limits<int32_t>::max(), fn, ": at most 2^31 - 1 tokens per call, got ", M);

  if (M == 0 || N == 0 || K == 0 || n_slots == 0) return;  // nothing to add
  {  // y is written while x is read by other blocks: they must not share memory
    const auto y0 = reinterpret_cast<uintptr_t>(y.const_data_ptr());
    const auto x0 = reinterpret_cast<uintptr_t>(x.const_data_ptr());
    const auto y1 = y0 + static_cast<uintptr_t>(y.numel() * y.element_size());
    const auto x1 = x0 + static_cast<uintptr_t>(x.numel() * x.element_size());
    TORCH_CHECK(y1 <= x0 || x1 <= y0, fn, ": y and x overlap in memory; y is written in place, pass a copy of x");
  }

  c10::cuda::CUDAGuard guard(dev);
  const int64_t chunk = block_n > 0 ? block_n : auto_chunk(M, N, sm_count(dev.index()));
  const int64_t n_chunks = ceil_div(N, chunk);
  TORCH_CHECK(n_chunks <= 65535, fn, ": N = ", N, " needs ", n_chunks, " column chunks of ", chunk,
              " (the grid allows 65535); pass a larger block_n");
  const dim3 grid(static_cast<unsigned>(M), static_cast<unsigned>(n_chunks));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev.index()).stream();

  // Five instantiations: float activations take float adapters; half and bfloat16 take their own or float32.
  if (act == at::kFloat) {
    launch<float, float>(grid, stream, y, x, table, ranks, token_slot, n_slots, K, N, chunk);
  } else if (act == at::kHalf) {
    if (wdt == at::kFloat) {
      launch<at::Half, float>(grid, stream, y, x, table, ranks, token_slot, n_slots, K, N, chunk);
    } else {
      launch<at::Half, at::Half>(grid, stream, y, x, table, ranks, token_slot, n_slots, K, N, chunk);
    }
  } else {
    if (wdt == at::kFloat) {
      launch<at::BFloat16, float>(grid, stream, y, x, table, ranks, token_slot, n_slots, K, N, chunk);
    } else {
      launch<at::BFloat16, at::BFloat16>(grid, stream, y, x, table, ranks, token_slot, n_slots, K, N, chunk);
    }
  }
}

}  // namespace fastpeft
