// Boundary, contour and difficulty-weight maps (SPEC section 2): definitions shared by the CPU
// implementation (csrc/targets.cpp) and the CUDA kernels (kernels/targets.cu), and the torch-free
// C launchers of the CUDA kernels.
//
// Everything above the HMEDN_TARGETS_CUDA_API block is plain C++ (host and device inline helpers): a
// CPU-only build includes this header too, so the index math is the same on both sides.
//
// Layout: labels and maps are contiguous (N, D, H, W) arrays, D = 1 for 2D inputs. "Boundary class" of
// a voxel v with label l: l if 1 <= l < K and a face neighbour inside the image has another label,
// else 0. The classes are disjoint, so B_all = (bclass > 0), sum_k B_k = B_all and
// sum_k mu_k B_k = mu[bclass] * B_all: the weight map needs two Gaussian fields, not K - 1.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__CUDACC__)
#define HMEDN_HD __host__ __device__ __forceinline__
#else
#define HMEDN_HD inline
#endif

namespace hmedn {
namespace targets {

// Largest Gaussian radius (int(4 sigma + 0.5)) and largest number of foreground classes with
// per-class weights the CUDA kernels take (both travel as kernel parameters).
constexpr int kMaxRadius = 128;
constexpr int kMaxClassWeights = 255;

// scipy.ndimage's "reflect" (half-sample symmetric, period 2n) index of position i on an axis of
// length n >= 1, valid for any i (also |i| >> n, when the radius exceeds the axis).
HMEDN_HD int64_t reflect_index(int64_t i, int64_t n) {
  const int64_t period = 2 * n;
  int64_t r = i % period;
  if (r < 0) r += period;
  return r < n ? r : period - 1 - r;
}

// Boundary class from a voxel's label k and its six face neighbours' labels (a neighbour outside the
// image passed as k): k if 1 <= k < num_classes and a neighbour has another label, else 0. Sets
// *bad = true when k is outside [0, num_classes).
template <typename V>
HMEDN_HD int boundary_from(V k, V kw0, V kw1, V kh0, V kh1, V kd0, V kd1, int num_classes, bool* bad) {
  const int64_t k64 = static_cast<int64_t>(k);
  if (k64 < 0 || k64 >= num_classes) {
    *bad = true;
    return 0;
  }
  const bool edge = (kw0 != k) | (kw1 != k) | (kh0 != k) | (kh1 != k) | (kd0 != k) | (kd1 != k);
  return k64 > 0 && edge ? static_cast<int>(k64) : 0;
}

// Boundary class of voxel (d, h, w) of one sample whose labels start at `lab` (contiguous D x H x W).
template <typename T>
HMEDN_HD int boundary_class(const T* lab, int64_t d, int64_t h, int64_t w, int64_t D, int64_t H,
                            int64_t W, int num_classes, bool* bad) {
  const int64_t idx = (d * H + h) * W + w;
  const int64_t hw = H * W;
  const T k = lab[idx];
  // every neighbour is loaded (no short-circuit), so the loads are independent and in flight together
  return boundary_from(k, w > 0 ? lab[idx - 1] : k, w + 1 < W ? lab[idx + 1] : k, h > 0 ? lab[idx - W] : k,
                       h + 1 < H ? lab[idx + W] : k, d > 0 ? lab[idx - hw] : k, d + 1 < D ? lab[idx + hw] : k,
                       num_classes, bad);
}

// Radius of scipy.ndimage.gaussian_filter's kernel: int(truncate * sigma + 0.5).
inline int gaussian_radius(double sigma, double truncate = 4.0) {
  return static_cast<int>(truncate * sigma + 0.5);
}

// One half of scipy's normalised Gaussian kernel, computed in float64 then rounded to float32:
// taps[j] is the weight at offsets +j and -j, j = 0 .. radius.
inline std::vector<float> gaussian_half_taps(double sigma, double truncate = 4.0) {
  const int radius = gaussian_radius(sigma, truncate);
  std::vector<double> phi(radius + 1);
  double total = 0.0;
  for (int j = 0; j <= radius; ++j) {
    phi[j] = std::exp(-0.5 / (sigma * sigma) * static_cast<double>(j) * j);
    total += (j == 0 ? 1.0 : 2.0) * phi[j];
  }
  std::vector<float> taps(radius + 1);
  for (int j = 0; j <= radius; ++j) taps[j] = static_cast<float>(phi[j] / total);
  return taps;
}

}  // namespace targets
}  // namespace hmedn

#if defined(__CUDACC__) || defined(HMEDN_WITH_CUDA)
#define HMEDN_TARGETS_CUDA_API
#include <cuda_runtime_api.h>

extern "C" {

// Label element types accepted by the launchers.
enum hmedn_label_dtype { HMEDN_LABEL_U8 = 0, HMEDN_LABEL_I32 = 1, HMEDN_LABEL_I64 = 2, HMEDN_LABEL_I16 = 3 };

// One make_targets call. All pointers except taps / mu are device pointers; taps and mu are host arrays
// copied into the kernels' parameters. Sizes: labels, contour and weight (N, D, H, W) contiguous.
struct hmedn_targets_args {
  const void* labels;
  int label_dtype;  // hmedn_label_dtype
  int64_t batch, depth, height, width;
  int spatial_dims;  // 2 (then depth == 1 and the D axis is not smoothed) or 3
  int num_classes;
  const float* taps_contour;  // host, radius_contour + 1 half taps (gaussian_half_taps)
  int radius_contour;
  const float* taps_weight;  // host, radius_weight + 1 half taps
  int radius_weight;
  float mu0;
  const float* mu;  // host, num_classes - 1 per-class weights
  float* contour;   // out (N, D, H, W)
  float* weight;    // out (N, D, H, W)
  void* workspace;  // hmedn_targets_cuda_workspace_bytes(args) bytes, 16-byte aligned
  int* error_flag;  // device int set to 1 when a label is outside [0, num_classes); may be null
};

// Bytes of device workspace the call described by `args` needs (args->workspace is not read).
size_t hmedn_targets_cuda_workspace_bytes(const hmedn_targets_args* args);

// Contour and weight maps, stream-ordered on `stream`. Returns cudaErrorInvalidValue for arguments
// out of the kernels' limits (radius > kMaxRadius, non-uniform mu with K - 1 > kMaxClassWeights, a
// Gaussian tile over the device's shared memory) and the launch error otherwise.
cudaError_t hmedn_targets_cuda(const hmedn_targets_args* args, cudaStream_t stream);

// Per-class boundaries: out is bool (N, K - 1, D, H, W) contiguous (one byte per element).
cudaError_t hmedn_boundary_map_cuda(const void* labels, int label_dtype, int64_t batch, int64_t depth,
                                    int64_t height, int64_t width, int num_classes, bool* out,
                                    int* error_flag, cudaStream_t stream);

}  // extern "C"
#endif
