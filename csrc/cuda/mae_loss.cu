// Fused MAE reconstruction loss: one pass over each counted row of pred and target writes the
// row's sum of squared errors and, in the same pass, the gradient with respect to pred.
//
// Torch-free: the launcher takes raw device pointers and a CUDA stream, and returns a
// cudaError_t (or a negative code for arguments it refuses). moca_kernels/mae_loss/cuda.py
// calls it through ctypes and registers it as a torch.library op.
//
// Layout: pred (n, p) with row stride pred_stride, target (n, p) with row stride target_stride,
// dpred (n, p) contiguous, row_loss (n,) float32, mask (n,) bytes or null (every row counts),
// count: a device float, the number of counted rows (read for mode MEAN only).
// dpred = 2 (pred - t) * scale with scale 1 / (count * p) (MEAN), 1 (SUM) or 1 / p (NONE: each
// row's loss is its mean); rows that do not count get zeros and a loss of 0.
// norm_pix: t = (target - mean) / sqrt(unbiased var + eps) per row, the row staged once in
// shared memory (p <= kMaxNormPixRow).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

constexpr int kThreads = 256;
constexpr int kVec = 8;                 // elements per vector step: 16 bytes of half/bf16, 32 of float
// A float32 row staged in shared memory: with the 32-byte scratch, within the 48 KiB a block may
// use without opting in.
constexpr long long kMaxNormPixRow = 12000;
enum Mode { MEAN = 0, SUM = 1, NONE = 2 };
enum DType { F32 = 0, F16 = 1, BF16 = 2 };

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

template <typename T>
struct alignas(16) Pack {  // one vector step: a single 16-byte access for half/bf16, two for float
  T v[kVec];
};

// Sum over the block; every thread gets the result. scratch: kThreads / 32 floats.
__device__ float block_sum(float v, float* scratch) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < kThreads / 32 ? scratch[lane] : 0.f;
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  __syncthreads();  // scratch is reused by the next call
  return v;
}

template <typename P, typename Q, bool VEC, bool NORM>
__global__ void __launch_bounds__(kThreads) mae_rows(
    const P* __restrict__ pred, const Q* __restrict__ target, const uint8_t* __restrict__ mask,
    const float* __restrict__ count, long long p, long long pred_stride, long long target_stride, float eps,
    int mode, float* __restrict__ row_loss, P* __restrict__ dpred) {
  extern __shared__ float staged[];  // NORM: the target row (p floats)
  __shared__ float scratch[kThreads / 32];
  const long long row = blockIdx.x;
  const P* pr = pred + row * pred_stride;
  const Q* tr = target + row * target_stride;
  P* gr = dpred + row * p;
  const long long steps = VEC ? p / kVec : p;  // VEC: p is a multiple of kVec

  if (mask != nullptr && !mask[row]) {  // a row that does not count: zero gradient, no reads
    for (long long i = threadIdx.x; i < steps; i += kThreads) {
      if (VEC) {
        Pack<P> z;
#pragma unroll
        for (int j = 0; j < kVec; ++j) z.v[j] = from_float<P>(0.f);
        reinterpret_cast<Pack<P>*>(gr)[i] = z;
      } else {
        gr[i] = from_float<P>(0.f);
      }
    }
    if (threadIdx.x == 0) row_loss[row] = 0.f;
    return;
  }

  float shift = 0.f, inv_std = 1.f;
  if (NORM) {  // stage the row, then mean and unbiased variance in two passes over shared memory
    float sum = 0.f;
    for (long long i = threadIdx.x; i < steps; i += kThreads) {
      if (VEC) {
        const Pack<Q> t = reinterpret_cast<const Pack<Q>*>(tr)[i];
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          const float x = to_float(t.v[j]);
          staged[i * kVec + j] = x;
          sum += x;
        }
      } else {
        const float x = to_float(tr[i]);
        staged[i] = x;
        sum += x;
      }
    }
    shift = block_sum(sum, scratch) / static_cast<float>(p);  // also orders the staging writes
    float squares = 0.f;
    for (long long i = threadIdx.x; i < p; i += kThreads) {
      const float d = staged[i] - shift;
      squares += d * d;
    }
    const float var = p > 1 ? block_sum(squares, scratch) / static_cast<float>(p - 1) : 0.f;
    inv_std = rsqrtf(var + eps);
  }

  float scale = 2.f;
  if (mode == MEAN) scale = 2.f / (fmaxf(*count, 1.f) * static_cast<float>(p));
  if (mode == NONE) scale = 2.f / static_cast<float>(p);

  float squares = 0.f;
  for (long long i = threadIdx.x; i < steps; i += kThreads) {
    if (VEC) {
      const Pack<P> a = reinterpret_cast<const Pack<P>*>(pr)[i];
      Pack<P> g;
      float t[kVec];
      if (NORM) {
#pragma unroll
        for (int j = 0; j < kVec; ++j) t[j] = (staged[i * kVec + j] - shift) * inv_std;
      } else {
        const Pack<Q> b = reinterpret_cast<const Pack<Q>*>(tr)[i];
#pragma unroll
        for (int j = 0; j < kVec; ++j) t[j] = to_float(b.v[j]);
      }
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const float d = to_float(a.v[j]) - t[j];
        squares += d * d;
        g.v[j] = from_float<P>(d * scale);
      }
      reinterpret_cast<Pack<P>*>(gr)[i] = g;
    } else {
      const float t = NORM ? (staged[i] - shift) * inv_std : to_float(tr[i]);
      const float d = to_float(pr[i]) - t;
      squares += d * d;
      gr[i] = from_float<P>(d * scale);
    }
  }
  const float total = block_sum(squares, scratch);
  if (threadIdx.x == 0) row_loss[row] = total;
}

template <typename P, typename Q>
cudaError_t launch_typed(const void* pred, const void* target, const uint8_t* mask, const float* count,
                         long long n, long long p, long long pred_stride, long long target_stride, bool norm_pix,
                         float eps, int mode, float* row_loss, void* dpred, cudaStream_t stream) {
  const bool vec = p % kVec == 0 && pred_stride % kVec == 0 && target_stride % kVec == 0 &&
                   reinterpret_cast<uintptr_t>(pred) % 16 == 0 && reinterpret_cast<uintptr_t>(target) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(dpred) % 16 == 0;
  const size_t shared = norm_pix ? static_cast<size_t>(p) * sizeof(float) : 0;
  const dim3 grid(static_cast<unsigned>(n)), block(kThreads);
  const P* a = static_cast<const P*>(pred);
  const Q* b = static_cast<const Q*>(target);
  P* g = static_cast<P*>(dpred);
#define MOCA_MAE_LAUNCH(V, N) \
  mae_rows<P, Q, V, N><<<grid, block, shared, stream>>>(a, b, mask, count, p, pred_stride, target_stride, eps, \
                                                         mode, row_loss, g)
  if (vec && norm_pix) MOCA_MAE_LAUNCH(true, true);
  else if (vec) MOCA_MAE_LAUNCH(true, false);
  else if (norm_pix) MOCA_MAE_LAUNCH(false, true);
  else MOCA_MAE_LAUNCH(false, false);
#undef MOCA_MAE_LAUNCH
  return cudaGetLastError();
}

template <typename P>
cudaError_t launch_pred(int target_dtype, const void* pred, const void* target, const uint8_t* mask,
                        const float* count, long long n, long long p, long long pred_stride, long long target_stride,
                        bool norm_pix, float eps, int mode, float* row_loss, void* dpred, cudaStream_t stream) {
  switch (target_dtype) {
    case F32: return launch_typed<P, float>(pred, target, mask, count, n, p, pred_stride, target_stride, norm_pix,
                                            eps, mode, row_loss, dpred, stream);
    case F16: return launch_typed<P, __half>(pred, target, mask, count, n, p, pred_stride, target_stride, norm_pix,
                                             eps, mode, row_loss, dpred, stream);
    default: return launch_typed<P, __nv_bfloat16>(pred, target, mask, count, n, p, pred_stride, target_stride,
                                                   norm_pix, eps, mode, row_loss, dpred, stream);
  }
}

}  // namespace

extern "C" {

// Returns 0 (cudaSuccess), a cudaError_t, or a negative code: -1 a dtype code not in {0 float32,
// 1 float16, 2 bfloat16}, -2 a size out of range (n >= 2^31, p < 1), -3 norm_pix with
// p > moca_mae_max_norm_pix_row(), -4 an unknown mode. n == 0 launches nothing.
int moca_mae_loss(const void* pred, int pred_dtype, const void* target, int target_dtype, const uint8_t* mask,
                  const float* count, long long n, long long p, long long pred_stride, long long target_stride,
                  int norm_pix, float eps, int mode, float* row_loss, void* dpred, void* stream) {
  if (pred_dtype < F32 || pred_dtype > BF16 || target_dtype < F32 || target_dtype > BF16) return -1;
  if (n < 0 || n >= (1LL << 31) || p < 1) return -2;
  if (norm_pix && p > kMaxNormPixRow) return -3;
  if (mode < MEAN || mode > NONE) return -4;
  if (n == 0) return 0;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (pred_dtype) {
    case F32: return launch_pred<float>(target_dtype, pred, target, mask, count, n, p, pred_stride, target_stride,
                                        norm_pix != 0, eps, mode, row_loss, dpred, s);
    case F16: return launch_pred<__half>(target_dtype, pred, target, mask, count, n, p, pred_stride, target_stride,
                                         norm_pix != 0, eps, mode, row_loss, dpred, s);
    default: return launch_pred<__nv_bfloat16>(target_dtype, pred, target, mask, count, n, p, pred_stride,
                                               target_stride, norm_pix != 0, eps, mode, row_loss, dpred, s);
  }
}

long long moca_mae_max_norm_pix_row(void) { return kMaxNormPixRow; }

const char* moca_cuda_error_string(int code) {
  switch (code) {
    case -1: return "dtype code out of range";
    case -2: return "size out of range (rows must be below 2^31, row length at least 1)";
    case -3: return "norm_pix rows longer than the kernel stages in shared memory";
    case -4: return "unknown reduction mode";
    default: return cudaGetErrorString(static_cast<cudaError_t>(code));
  }
}

}  // extern "C"
