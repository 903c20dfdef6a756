// CUDA kernels of the contour and difficulty-weight maps (SPEC section 2). Torch-free: raw pointers,
// sizes and a stream; `nvcc -c kernels/targets.cu` compiles this file alone.
//
// One call = 5 kernels (2D: 4), every Gaussian pass split over the fields (grid.z = field):
//   1. boundary classes: one byte per voxel (the class when the mu_k differ, else 0/1), labels checked;
//   2. row pass along W: a shared-memory tile of 32 rows (coalesced loads, conflict-free sliding
//      windows with one row per lane, coalesced stores through the same tile);
//   3. column passes along H (3D: then along D), each thread sliding a window of kColOutputs outputs
//      down one column in registers (coalesced loads across the warp, reflected row offsets from a
//      per-warp table); the last pass writes contour / weight unnormalised and reduces the per-sample
//      maxima (atomicMax on the float bits, valid because the maxima are of non-negative fields);
//   4. a normalisation pass.
// Fields: 0 = G_sc(B_all), 1 = G_sw(B_all), 2 = G_sw(mu[bclass] B_all), the last only when the mu_k
// differ (else weight = mu0 + mu * field 1 / max field 1).
// Default sigmas (2 and 8, radii 8 and 32) use fully unrolled windows with compile-time taps indices;
// any other radius up to kMaxRadius takes a generic runtime-radius path.
#include "targets.cuh"

#include <cuda_runtime.h>

#include <cstdint>

namespace {

using hmedn::targets::boundary_class;
using hmedn::targets::kMaxClassWeights;
using hmedn::targets::kMaxRadius;
using hmedn::targets::reflect_index;

constexpr int kRowTile = 64;      // outputs along W per row-pass block
constexpr int kRowSegments = 4;   // warps per row-pass block, each computing kRowTile/4 outputs per row
constexpr int kRowOutputs = kRowTile / kRowSegments;
constexpr int kRowLines = 32;     // rows per row-pass block (one per lane)
constexpr int kColOutputs = 16;   // outputs per thread along the filtered axis in the column pass
constexpr int kColWarps = 4;      // warps per column-pass block, stacked along the filtered axis
constexpr int kDefaultSmem = 48 * 1024;

struct Params {
  int radius[2];                          // [0] contour sigma, [1] weight sigma
  float taps[2][kMaxRadius + 1];          // half taps, taps[s][j] at offsets +-j
  float mu[kMaxClassWeights];             // per-class weights (only read with 3 channels)
};

// Fast in-range path of reflect_index: most loads are interior.
__device__ __forceinline__ int64_t reflect_fast(int64_t i, int64_t n) {
  return (i >= 0 && i < n) ? i : reflect_index(i, n);
}

// acc[o] = sum_{j=-r..r} taps[|j|] * load(o + r + j), o = 0 .. T-1 (window start at load(0)).
// RC > 0: compile-time radius, every load feeds up to T accumulators; RC == 0: runtime radius r.
template <int T, int RC, typename Load>
__device__ __forceinline__ void window_conv(const Load& load, const float* __restrict__ taps, int r,
                                            float (&acc)[T]) {
#pragma unroll
  for (int o = 0; o < T; ++o) acc[o] = 0.f;
  if constexpr (RC > 0) {
    float w[RC + 1];  // taps in registers: FFMA operands, not a load per multiply
#pragma unroll
    for (int j = 0; j <= RC; ++j) w[j] = taps[j];
#pragma unroll
    for (int t = 0; t < T + 2 * RC; ++t) {
      const float v = load(t);
#pragma unroll
      for (int o = 0; o < T; ++o) {
        const int j = t - o - RC;
        if (j >= -RC && j <= RC) acc[o] = fmaf(w[j < 0 ? -j : j], v, acc[o]);
      }
    }
  } else {
    for (int t = 0; t < T + 2 * r; ++t) {
      const float v = load(t);
#pragma unroll
      for (int o = 0; o < T; ++o) {
        const int j = t - o - r;
        if (j >= -r && j <= r) acc[o] = fmaf(taps[j < 0 ? -j : j], v, acc[o]);
      }
    }
  }
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int s = 16; s > 0; s >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, s));
  return v;
}

// ---- pass 1: boundary classes ---------------------------------------------------------------------
// One byte per voxel: the class k >= 1 of a boundary voxel when `classes` (the mu_k differ), else 1;
// 0 off the boundary. Blocks of 32 x 8 voxels of a plane run over the (n, d) planes (grid.z, strided).
template <typename L>
__global__ void bclass_kernel(const L* __restrict__ labels, int64_t planes, int64_t D, int64_t H, int64_t W,
                              int num_classes, bool classes, uint8_t* __restrict__ bclass,
                              int* __restrict__ error_flag) {
  const int64_t w = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t h = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y;
  if (w >= W || h >= H) return;
  bool bad = false;
  for (int64_t plane = blockIdx.z; plane < planes; plane += gridDim.z) {
    const int64_t n = plane / D, d = plane - n * D;
    const int k = boundary_class(labels + n * D * H * W, d, h, w, D, H, W, num_classes, &bad);
    bclass[(plane * H + h) * W + w] = static_cast<uint8_t>(classes ? k : (k > 0));
  }
  if (bad && error_flag != nullptr) *error_flag = 1;
}

// ---- pass 2: along W ------------------------------------------------------------------------------
// Block: kRowLines rows x kRowTile outputs of field blockIdx.z, 32 x kRowSegments threads. Shared: the
// field's tile, kRowLines x pitch floats (pitch odd: lanes = rows read distinct banks), then the
// output stage.
template <int R>
__device__ __forceinline__ void row_pass_field(const uint8_t* __restrict__ bclass, int64_t W, int64_t rows,
                                               int64_t row0, int64_t w0, int field, const Params& p, int s,
                                               float* __restrict__ out, float* smem) {
  const int r = R > 0 ? R : p.radius[s];
  const int ext = kRowTile + 2 * r;
  const int pitch = ext | 1;
  const int lane = threadIdx.x, warp = threadIdx.y;
  auto fill = [&](int q_row, int q) {
    const int64_t row = row0 + q_row;
    if (row < rows && q < ext) {
      const int k = bclass[row * W + reflect_fast(w0 - r + q, W)];
      smem[q_row * pitch + q] = field == 2 ? (k > 0 ? p.mu[k - 1] : 0.f) : (k > 0 ? 1.f : 0.f);
    }
  };
  if constexpr (R > 0) {  // all loads independent and unrolled, so they are in flight together
#pragma unroll
    for (int rr = 0; rr < kRowLines / kRowSegments; ++rr)
#pragma unroll
      for (int k = 0; k < (kRowTile + 2 * R + 31) / 32; ++k) fill(warp + rr * kRowSegments, lane + 32 * k);
  } else {
    for (int q_row = warp; q_row < kRowLines; q_row += kRowSegments)
      for (int q = lane; q < ext; q += 32) fill(q_row, q);
  }
  __syncthreads();
  // lane = row, warp = segment of kRowOutputs outputs; the window of output o starts at q = seg*T + o
  const int q0 = warp * kRowOutputs;
  float acc[kRowOutputs];
  const float* src = smem + lane * pitch + q0;
  window_conv<kRowOutputs, R>([&](int t) { return src[t]; }, p.taps[s], r, acc);
  __syncthreads();
  constexpr int stage_pitch = kRowTile + 1;
#pragma unroll
  for (int o = 0; o < kRowOutputs; ++o) smem[lane * stage_pitch + q0 + o] = acc[o];
  __syncthreads();
  for (int q_row = warp; q_row < kRowLines; q_row += kRowSegments) {
    const int64_t row = row0 + q_row;
    if (row >= rows) break;
    for (int q = lane; q < kRowTile && w0 + q < W; q += 32) out[row * W + w0 + q] = smem[q_row * stage_pitch + q];
  }
}

struct Fields {
  const float* in[3];
  float* out[3];  // LAST: out[0] = contour, out[1] = weight (unnormalised)
};

template <int R0, int R1>
__global__ void __launch_bounds__(32 * kRowSegments)
row_pass_kernel(const uint8_t* __restrict__ bclass, int64_t W, int64_t rows, const __grid_constant__ Params p,
                const __grid_constant__ Fields f) {
  extern __shared__ float smem[];
  const int field = blockIdx.z;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRowLines;
  const int64_t w0 = static_cast<int64_t>(blockIdx.y) * kRowTile;
  if (field == 0)
    row_pass_field<R0>(bclass, W, rows, row0, w0, field, p, 0, f.out[0], smem);
  else
    row_pass_field<R1>(bclass, W, rows, row0, w0, field, p, 1, f.out[field], smem);
}

// ---- passes 3: along H and D, layout (outer, len, inner), filtered axis len; field blockIdx.z -----
template <int R, bool LAST, int C>
__device__ __forceinline__ void col_pass_field(const Fields& f, int field, int64_t outer, int64_t i, int64_t l0,
                                               int64_t len, int64_t inner, const Params& p, int s,
                                               int64_t* offs, float& m) {
  const int r = R > 0 ? R : p.radius[s];
  for (int t = threadIdx.x; t < kColOutputs + 2 * r; t += 32) offs[t] = reflect_index(l0 - r + t, len) * inner;
  __syncwarp();
  if (i >= inner || l0 >= len) return;
  const int64_t base = outer * len * inner + i;
  const float* __restrict__ src = f.in[field] + base;
  float acc[kColOutputs];
  window_conv<kColOutputs, R>([&](int t) { return src[offs[t]]; }, p.taps[s], r, acc);
  float* dst = !LAST ? f.out[field] : (field == 0 ? f.out[0] : (field == C - 1 ? f.out[1] : nullptr));
#pragma unroll
  for (int o = 0; o < kColOutputs; ++o) {
    if (l0 + o < len) {
      if (dst != nullptr) dst[base + (l0 + o) * inner] = acc[o];
      m = fmaxf(m, acc[o]);
    }
  }
}

template <int C, bool LAST, int R0, int R1>
__global__ void __launch_bounds__(32 * kColWarps)
col_pass_kernel(const __grid_constant__ Fields f, int64_t len, int64_t inner, int64_t inner_tiles, const __grid_constant__ Params p,
                float* __restrict__ maxima) {
  __shared__ int64_t offsets[kColWarps][kColOutputs + 2 * kMaxRadius];
  const int field = blockIdx.z;
  const int64_t outer = blockIdx.x / inner_tiles;
  const int64_t i = (blockIdx.x - outer * inner_tiles) * 32 + threadIdx.x;
  const int64_t l0 = (static_cast<int64_t>(blockIdx.y) * kColWarps + threadIdx.y) * kColOutputs;
  float m = 0.f;
  if (field == 0)
    col_pass_field<R0, LAST, C>(f, field, outer, i, l0, len, inner, p, 0, offsets[threadIdx.y], m);
  else
    col_pass_field<R1, LAST, C>(f, field, outer, i, l0, len, inner, p, 1, offsets[threadIdx.y], m);
  if constexpr (LAST) {
    if (field > 1) return;  // block-uniform: only the B_all fields have maxima
    __shared__ float red[kColWarps];
    m = warp_max(m);
    if (threadIdx.x == 0) red[threadIdx.y] = m;
    __syncthreads();
    if (threadIdx.x == 0 && threadIdx.y == 0) {
      for (int k = 1; k < kColWarps; ++k) m = fmaxf(m, red[k]);
      // non-negative floats order like their bit patterns as signed ints
      if (m > 0.f) atomicMax(reinterpret_cast<int*>(maxima) + 2 * outer + field, __float_as_int(m));
    }
  }
}

// ---- normalisation: contour /= max, weight = mu0 + scale * weight / max ----------------------------
__global__ void normalise_kernel(float* __restrict__ contour, float* __restrict__ weight, int64_t spatial,
                                 const float* __restrict__ maxima, float mu0, float scale) {
  const int64_t n = blockIdx.y;
  const float mc = maxima[2 * n], mw = maxima[2 * n + 1];
  const float inv_c = mc > 0.f ? 1.f / mc : 0.f;
  const float inv_w = mw > 0.f ? scale / mw : 0.f;
  float* c = contour + n * spatial;
  float* w = weight + n * spatial;
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < spatial;
       v += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    c[v] = c[v] * inv_c;
    w[v] = fmaf(w[v], inv_w, mu0);
  }
}

template <typename L>
__global__ void boundary_map_kernel(const L* __restrict__ labels, int64_t batch, int64_t D, int64_t H,
                                    int64_t W, int num_classes, bool* __restrict__ out,
                                    int* __restrict__ error_flag) {
  const int64_t spatial = D * H * W;
  const int64_t n = blockIdx.y;
  bool bad = false;
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < spatial;
       v += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t d = v / (H * W), hw = v - d * H * W, h = hw / W, w = hw - h * W;
    const int k = boundary_class(labels + n * spatial, d, h, w, D, H, W, num_classes, &bad);
    bool* o = out + n * (num_classes - 1) * spatial + v;
    for (int c = 1; c < num_classes; ++c) o[(c - 1) * spatial] = (k == c);
  }
  if (bad && error_flag != nullptr) *error_flag = 1;
}

// ---- host side ----------------------------------------------------------------------------------
int num_channels(int num_classes, const float* mu) {
  for (int k = 1; k < num_classes - 1; ++k)
    if (mu[k] != mu[0]) return 3;
  return 2;
}

cudaError_t set_smem(const void* kernel, size_t bytes) {
  if (bytes <= static_cast<size_t>(kDefaultSmem)) return cudaSuccess;
  int device = 0, optin = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  if (bytes > static_cast<size_t>(optin)) return cudaErrorInvalidValue;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

unsigned blocks_for(int64_t n, int threads) {
  const int64_t b = (n + threads - 1) / threads;
  return static_cast<unsigned>(b < 4096 ? b : 4096);
}

template <int C, int R0, int R1>
cudaError_t launch_passes(const hmedn_targets_args& a, const Params& p, const uint8_t* bclass, float* ws,
                          float* maxima, cudaStream_t stream) {
  const int64_t N = a.batch, D = a.depth, H = a.height, W = a.width;
  const int64_t S = D * H * W;
  // 2D: row pass -> ws, H pass (last) -> outputs. 3D: row pass -> (contour, weight, ws[2]),
  // H pass -> ws, D pass (last) -> outputs.
  float* x[3] = {a.contour, a.weight, ws + 2 * N * S};
  float* y[3] = {ws, ws + N * S, ws + 2 * N * S};
  float* first[3];
  for (int c = 0; c < 3; ++c) first[c] = a.spatial_dims == 2 ? y[c] : x[c];
  if (a.spatial_dims == 3 && C == 3) y[2] = ws + 3 * N * S;  // x[2] already holds the row pass's field

  const int rmax = p.radius[0] > p.radius[1] ? p.radius[0] : p.radius[1];
  const size_t tile_bytes = sizeof(float) * kRowLines * ((kRowTile + 2 * rmax) | 1);
  const size_t stage_bytes = sizeof(float) * kRowLines * (kRowTile + 1);
  const size_t row_smem = tile_bytes > stage_bytes ? tile_bytes : stage_bytes;
  auto row_kernel = row_pass_kernel<R0, R1>;
  cudaError_t err = set_smem(reinterpret_cast<const void*>(row_kernel), row_smem);
  if (err != cudaSuccess) return err;
  const int64_t rows = N * D * H;
  const dim3 row_grid(static_cast<unsigned>((rows + kRowLines - 1) / kRowLines),
                      static_cast<unsigned>((W + kRowTile - 1) / kRowTile), C);
  row_kernel<<<row_grid, dim3(32, kRowSegments), row_smem, stream>>>(
      bclass, W, rows, p, Fields{{nullptr, nullptr, nullptr}, {first[0], first[1], first[2]}});
  if ((err = cudaGetLastError()) != cudaSuccess) return err;

  const dim3 block(32, kColWarps);
  const int64_t lines_per_block = static_cast<int64_t>(kColWarps) * kColOutputs;
  auto col_grid = [&](int64_t outer, int64_t len, int64_t inner) {
    return dim3(static_cast<unsigned>(outer * ((inner + 31) / 32)),
                static_cast<unsigned>((len + lines_per_block - 1) / lines_per_block), C);
  };
  const Fields last{{y[0], y[1], y[2]}, {a.contour, a.weight, nullptr}};
  if (a.spatial_dims == 3) {
    const Fields h{{x[0], x[1], x[2]}, {y[0], y[1], y[2]}};
    col_pass_kernel<C, false, R0, R1><<<col_grid(N * D, H, W), block, 0, stream>>>(h, H, W, (W + 31) / 32, p,
                                                                                   maxima);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    col_pass_kernel<C, true, R0, R1><<<col_grid(N, D, H * W), block, 0, stream>>>(last, D, H * W,
                                                                                  (H * W + 31) / 32, p, maxima);
  } else {
    col_pass_kernel<C, true, R0, R1><<<col_grid(N, H, W), block, 0, stream>>>(last, H, W, (W + 31) / 32, p,
                                                                              maxima);
  }
  if ((err = cudaGetLastError()) != cudaSuccess) return err;

  const float scale = C == 3 ? 1.f : a.mu[0];
  normalise_kernel<<<dim3(blocks_for(S, 256), static_cast<unsigned>(N)), 256, 0, stream>>>(
      a.contour, a.weight, S, maxima, a.mu0, scale);
  return cudaGetLastError();
}

template <typename L>
cudaError_t launch_bclass(const hmedn_targets_args& a, bool classes, uint8_t* bclass, cudaStream_t stream) {
  const int64_t planes = a.batch * a.depth;
  const dim3 grid(static_cast<unsigned>((a.width + 31) / 32), static_cast<unsigned>((a.height + 7) / 8),
                  static_cast<unsigned>(planes < 65535 ? planes : 65535));
  bclass_kernel<<<grid, dim3(32, 8), 0, stream>>>(static_cast<const L*>(a.labels), planes, a.depth, a.height, a.width,
                                          a.num_classes, classes, bclass, a.error_flag);
  return cudaGetLastError();
}

size_t align16(size_t bytes) { return (bytes + 15) / 16 * 16; }

}  // namespace

extern "C" size_t hmedn_targets_cuda_workspace_bytes(int64_t batch, int64_t depth, int64_t height, int64_t width,
                                                      int num_classes, const float* mu) {
  const int64_t voxels = batch * depth * height * width;
  const int channels = num_channels(num_classes, mu);
  const int buffers = channels == 3 ? 4 : 2;  // y[0..C) plus, with 3 fields, the row pass's third field
  return align16(2 * batch * sizeof(float)) + align16(voxels) + buffers * voxels * sizeof(float);
}

extern "C" cudaError_t hmedn_targets_cuda(const hmedn_targets_args* a, cudaStream_t stream) {
  if (a == nullptr || a->batch < 1 || a->batch > 65535 || a->depth < 1 || a->height < 1 || a->width < 1 ||
      a->num_classes < 2 || (a->spatial_dims != 2 && a->spatial_dims != 3) ||
      (a->spatial_dims == 2 && a->depth != 1) || a->radius_contour < 0 || a->radius_contour > kMaxRadius ||
      a->radius_weight < 0 || a->radius_weight > kMaxRadius)
    return cudaErrorInvalidValue;
  const int channels = num_channels(a->num_classes, a->mu);
  if (channels == 3 && a->num_classes - 1 > kMaxClassWeights) return cudaErrorInvalidValue;
  Params p{};
  p.radius[0] = a->radius_contour;
  p.radius[1] = a->radius_weight;
  for (int j = 0; j <= a->radius_contour; ++j) p.taps[0][j] = a->taps_contour[j];
  for (int j = 0; j <= a->radius_weight; ++j) p.taps[1][j] = a->taps_weight[j];
  if (channels == 3)
    for (int k = 0; k < a->num_classes - 1; ++k) p.mu[k] = a->mu[k];
  char* w = static_cast<char*>(a->workspace);
  float* maxima = reinterpret_cast<float*>(w);
  uint8_t* bclass = reinterpret_cast<uint8_t*>(w + align16(2 * a->batch * sizeof(float)));
  float* ws = reinterpret_cast<float*>(w + align16(2 * a->batch * sizeof(float)) +
                                       align16(a->batch * a->depth * a->height * a->width));
  cudaError_t err = cudaMemsetAsync(maxima, 0, 2 * a->batch * sizeof(float), stream);
  if (err != cudaSuccess) return err;
  const bool classes = channels == 3;
  switch (a->label_dtype) {
    case HMEDN_LABEL_U8: err = launch_bclass<uint8_t>(*a, classes, bclass, stream); break;
    case HMEDN_LABEL_I16: err = launch_bclass<int16_t>(*a, classes, bclass, stream); break;
    case HMEDN_LABEL_I32: err = launch_bclass<int32_t>(*a, classes, bclass, stream); break;
    case HMEDN_LABEL_I64: err = launch_bclass<int64_t>(*a, classes, bclass, stream); break;
    default: return cudaErrorInvalidValue;
  }
  if (err != cudaSuccess) return err;
  const bool defaults = p.radius[0] == 8 && p.radius[1] == 32;
  if (channels == 2)
    return defaults ? launch_passes<2, 8, 32>(*a, p, bclass, ws, maxima, stream)
                    : launch_passes<2, 0, 0>(*a, p, bclass, ws, maxima, stream);
  return defaults ? launch_passes<3, 8, 32>(*a, p, bclass, ws, maxima, stream)
                  : launch_passes<3, 0, 0>(*a, p, bclass, ws, maxima, stream);
}

extern "C" cudaError_t hmedn_boundary_map_cuda(const void* labels, int label_dtype, int64_t batch, int64_t depth,
                                                int64_t height, int64_t width, int num_classes, bool* out,
                                                int* error_flag, cudaStream_t stream) {
  if (batch < 1 || batch > 65535 || depth < 1 || height < 1 || width < 1 || num_classes < 2)
    return cudaErrorInvalidValue;
  const dim3 grid(blocks_for(depth * height * width, 256), static_cast<unsigned>(batch));
  switch (label_dtype) {
    case HMEDN_LABEL_U8:
      boundary_map_kernel<<<grid, 256, 0, stream>>>(static_cast<const uint8_t*>(labels), batch, depth, height,
                                                   width, num_classes, out, error_flag);
      break;
    case HMEDN_LABEL_I16:
      boundary_map_kernel<<<grid, 256, 0, stream>>>(static_cast<const int16_t*>(labels), batch, depth, height,
                                                   width, num_classes, out, error_flag);
      break;
    case HMEDN_LABEL_I32:
      boundary_map_kernel<<<grid, 256, 0, stream>>>(static_cast<const int32_t*>(labels), batch, depth, height,
                                                   width, num_classes, out, error_flag);
      break;
    case HMEDN_LABEL_I64:
      boundary_map_kernel<<<grid, 256, 0, stream>>>(static_cast<const int64_t*>(labels), batch, depth, height,
                                                   width, num_classes, out, error_flag);
      break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}
