// CUDA kernels of the contour and difficulty-weight maps (SPEC section 2). Torch-free: raw pointers,
// sizes and a stream; `nvcc -c kernels/targets.cu` compiles this file alone.
//
// One call = a memset and 3 kernels in 2D, 4 in 3D, every Gaussian pass split over the fields
// (grid.z = field), then a normalisation kernel:
//   1. boundary bits: one bit per voxel, rows padded with their reflected ends (labels checked; class
//      bytes too when the mu_k differ);
//   2. plane pass: W then H in shared memory, one (plane, 32-column strip) per block; 2D: writes the maps
//      unnormalised and reduces the per-sample maxima (atomicMax on the float bits, valid because the
//      fields are non-negative);
//   3. (3D) the D pass: writes the maps unnormalised and reduces the maxima the same way;
//   4. normalisation: contour /= max, weight = mu0 + scale * weight / max. (Running the D pass twice,
//      maxima first and normalised writes second, moves 8 bytes a voxel less but was slower: 157 vs 140 us
//      of kernels for 2 x 128^3 on an H100, the D pass being bound by instructions, not bytes.)
// Fields: 0 = G_sc(B_all), 1 = G_sw(B_all), 2 = G_sw(mu[bclass] B_all), the last only when the mu_k
// differ (else weight = mu0 + mu * field 1 / max field 1).
// Default sigmas (2 and 8, radii 8 and 32) use fully unrolled windows with compile-time taps indices;
// any other radius up to kMaxRadius takes a generic runtime-radius path.
#include "targets.cuh"

#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

namespace {

using hmedn::targets::boundary_class;
using hmedn::targets::boundary_from;
using hmedn::targets::kMaxClassWeights;
using hmedn::targets::kMaxRadius;
using hmedn::targets::reflect_index;

constexpr int kDefaultSmem = 48 * 1024;

struct Params {
  int radius[2];                          // [0] contour sigma, [1] weight sigma
  float taps[2][kMaxRadius + 1];          // half taps, taps[s][j] at offsets +-j
  float mu[kMaxClassWeights];             // per-class weights (only read with 3 channels)
};

// reflect_index without its 64-bit modulo for positions at most one axis length outside (all of them
// unless the radius exceeds the axis).
__device__ __forceinline__ int64_t reflect_fast(int64_t i, int64_t n) {
  if (i >= 0 && i < n) return i;
  if (i < 0 && i >= -n) return -1 - i;
  if (i >= n && i < 2 * n) return 2 * n - 1 - i;
  return reflect_index(i, n);
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

// ---- pass 1: boundary bits ----------------------------------------------------------------------
// One bit per position of every row (n, d, h), the rows padded by P = max radius on both sides with the
// reflected positions (bit q of a row = boundary at reflect(q - P, W)), so that every W window below is a
// contiguous bit range. With `classes` (the mu_k differ) also one class byte per voxel (unpadded).
// Block (32, 8): lane = bit of a padded word (grid.x), y = row h; each thread walks `dlen` planes along D
// keeping the labels of planes d - 1 and d of its column in registers, kBitsUnroll planes at a time: the
// loads of a group (the next planes' labels and the four in-plane neighbours of each) are issued together
// before any is used, so a thread waits for memory once per group, not once per plane. Every load is
// unconditional (32-bit offsets within the sample): a missing neighbour reads the voxel itself (equal
// labels: no edge), lanes past the padded row read column 0 and report no boundary.
constexpr int kBitsUnroll = 4;
template <typename L>
__global__ void __launch_bounds__(256)
bits_kernel(const L* __restrict__ labels, int D, int H, int W, int dlen, int dsegs, int pad, int words,
            int num_classes, uint8_t* __restrict__ bclass, uint32_t* __restrict__ bits,
            int* __restrict__ error_flag) {
  constexpr int U = kBitsUnroll;
  const int h = blockIdx.y * blockDim.y + threadIdx.y;
  if (h >= H) return;  // warp-uniform
  const int n = blockIdx.z / dsegs;
  const int d0 = (blockIdx.z - n * dsegs) * dlen;
  const int d1 = d0 + dlen < D ? d0 + dlen : D;
  const int q = static_cast<int>(blockIdx.x) * 32 + static_cast<int>(threadIdx.x) - pad;  // position along W
  const bool inside = q < W + pad;
  const int w = inside ? static_cast<int>(reflect_fast(q, W)) : 0;
  const int HW = H * W;
  const int ol = w > 0 ? -1 : 0, orr = w + 1 < W ? 1 : 0, ou = h > 0 ? -W : 0, od = h + 1 < H ? W : 0;
  const L* __restrict__ lab0 = labels + static_cast<int64_t>(n) * D * HW + h * W + w;  // plane d at lab0[d * HW]
  L lab[U + 2];  // planes db - 1, db, ..., db + U (the last ones clamped to D - 1: no boundary across the edge)
  lab[1] = lab0[d0 * HW];
  lab[0] = lab0[(d0 > 0 ? d0 - 1 : d0) * HW];
  bool bad = false;
  const auto i32 = [](L x) { return static_cast<int>(x); };
  uint32_t* out = bits + (static_cast<int64_t>(n) * D * H + h) * words + blockIdx.x;  // plane d at out[d * H * words]
  const int out_plane = H * words;
  for (int db = d0; db < d1; db += U) {
    L nb[U][4];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      lab[u + 2] = lab0[(db + u + 1 < D ? db + u + 1 : D - 1) * HW];
      const L* v = lab0 + (db + u < D ? db + u : D - 1) * HW;
      nb[u][0] = v[ol];
      nb[u][1] = v[orr];
      nb[u][2] = v[ou];
      nb[u][3] = v[od];
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int d = db + u;
      if (d >= d1) break;  // block-uniform
      const L cur = lab[u + 1];
      // Range-checked at full width, compared as 32-bit ints (exact for valid labels; unchecked invalid
      // ones give unspecified maps, never out-of-bounds reads: the class stays in [0, num_classes)).
      bad |= inside && (static_cast<int64_t>(cur) < 0 || static_cast<int64_t>(cur) >= num_classes);
      int k = boundary_from(i32(cur), i32(nb[u][0]), i32(nb[u][1]), i32(nb[u][2]), i32(nb[u][3]), i32(lab[u]),
                            i32(lab[u + 2]), num_classes, &bad);
      k = inside ? k : 0;
      if (bclass != nullptr && q >= 0 && q < W)
        bclass[(static_cast<int64_t>(n) * D + d) * HW + h * W + q] = static_cast<uint8_t>(k);
      const uint32_t word = __ballot_sync(0xffffffffu, k > 0);
      if (threadIdx.x == 0) out[d * out_plane] = word;
    }
    lab[0] = lab[U];
    lab[1] = lab[U + 1];
  }
  if (bad && error_flag != nullptr) *error_flag = 1;
}

// ---- the Gaussian passes -------------------------------------------------------------------------
// Every pass block filters a strip of kStrip columns (the 32 lanes) along one axis: count outputs from
// position start, out of a shared-memory copy Y[i][c] (pitch kPitch) of the axis positions
// reflect(start - r + i), i < count + 2r, so every window is a contiguous run of rows. count is the whole
// axis when it is at most kWholeMax long, else a tile of kTileLen. Warp y computes chunks of kChunk
// outputs per lane, sliding the window in registers (window_conv).
constexpr int kStrip = 32;
constexpr int kPitch = kStrip + 1;   // odd: the W pass's lanes (rows) store to distinct banks
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kChunk = 16;
constexpr int kWholeMax = 256;
constexpr int kTileLen = 128;
constexpr int kSparseBits = 6;   // W pass: taps of set bits only while no lane's window has more
constexpr int kLoadBatch = 8;    // rows of a strip each thread loads before storing them
constexpr int64_t kMinBlocks = 264;  // two waves of one block per SM on a 132-SM GPU

struct Axis {
  int64_t len;      // length of the filtered axis
  int tile;         // outputs per block along it
  int tiles;        // blocks along it
};

// other_blocks: blocks of the pass along the other dimensions; tiles shrink (halos grow) until the pass
// has at least kMinBlocks blocks, so that small batches (2D) still fill the GPU.
Axis make_axis(int64_t len, int64_t other_blocks) {
  int64_t tile = len <= kWholeMax ? len : kTileLen;
  while (tile > 2 * kChunk && other_blocks * ((len + tile - 1) / tile) < kMinBlocks)
    tile = (tile / 2 + kChunk - 1) / kChunk * kChunk;
  return Axis{len, static_cast<int>(tile), static_cast<int>((len + tile - 1) / tile)};
}

// What a pass block covers: blockIdx.x = (outer index, tile along the axis, strip of kStrip columns of the
// `cols` columns), strips fastest.
struct Tile {
  int64_t col0, start, outer;  // first column, first output along the axis, outer index (plane or sample)
  int count;                   // outputs along the axis
};
__device__ __forceinline__ Tile block_tile(int64_t cols, const Axis& a) {
  const int64_t strips = (cols + kStrip - 1) / kStrip;
  const int64_t bx = blockIdx.x, rest = bx / strips;
  Tile t;
  t.col0 = (bx - rest * strips) * kStrip;
  t.start = (rest % a.tiles) * a.tile;
  t.outer = rest / a.tiles;
  t.count = static_cast<int>(a.len - t.start < a.tile ? a.len - t.start : a.tile);
  return t;
}

// Rows of Y for count outputs: whole chunks (the last chunk's window may pass the last output) plus halos.
__host__ __device__ __forceinline__ int strip_rows(int count, int r) {
  return (count + kChunk - 1) / kChunk * kChunk + 2 * r;
}
size_t strip_smem(const Axis& a, int rmax) {
  return (sizeof(float) * kPitch + 2) * strip_rows(a.tile, rmax);
}

// Shared memory of a pass block: Y and two "row of Y may be nonzero" bytes per row (rows past
// count + 2r: zero).
struct Strip {
  float* Y;
  uint8_t* nz;
  int count, rows;  // outputs; rows holding data (count + 2r)
};
__device__ __forceinline__ Strip carve(float* smem, int count, int r) {
  Strip st;
  st.Y = smem;
  st.nz = reinterpret_cast<uint8_t*>(smem + kPitch * strip_rows(count, r));
  st.count = count;
  st.rows = count + 2 * r;
  const int tid = threadIdx.x + 32 * threadIdx.y;
  for (int i = st.rows + tid; i < strip_rows(count, r); i += kThreads) {
    st.nz[2 * i] = st.nz[2 * i + 1] = 0;
    for (int c = 0; c < kStrip; ++c) st.Y[i * kPitch + c] = 0.f;
  }
  return st;
}

__device__ __forceinline__ int warp_max_int(int v) {
#pragma unroll
  for (int s = 16; s > 0; s >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, s));
  return v;
}

// Filters Y along its rows: emit(o, c, value) for output o < count of column (lane) c. A warp's chunk
// whose window rows are all flagged zero (st.nz) emits zeros without computing them.
template <int R, typename Emit>
__device__ __forceinline__ void strip_conv(const Strip& st, const float* taps, int r, const Emit& emit) {
  const int c = threadIdx.x;
  for (int o0 = threadIdx.y * kChunk; o0 < st.count; o0 += kWarps * kChunk) {
    bool any = false;
    for (int t = o0 + c; t < o0 + kChunk + 2 * r; t += 32) any |= (st.nz[2 * t] | st.nz[2 * t + 1]) != 0;
    float acc[kChunk];
    if (__any_sync(0xffffffffu, any)) {
      const float* y = st.Y + o0 * kPitch + c;
      window_conv<kChunk, R>([&](int t) { return y[t * kPitch]; }, taps, r, acc);
    } else {
#pragma unroll
      for (int o = 0; o < kChunk; ++o) acc[o] = 0.f;
    }
#pragma unroll
    for (int o = 0; o < kChunk; ++o)
      if (o0 + o < st.count) emit(o0 + o, c, acc[o]);
  }
}

// Block maximum of the non-negative values m of all threads -> atomicMax on the float bits.
__device__ __forceinline__ void block_max_to(float m, float* target) {
  __shared__ float red[kWarps];
  m = warp_max(m);
  if (threadIdx.x == 0) red[threadIdx.y] = m;
  __syncthreads();
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    for (int k = 1; k < kWarps; ++k) m = fmaxf(m, red[k]);
    // non-negative floats order like their bit patterns as signed ints
    if (m > 0.f) atomicMax(reinterpret_cast<int*>(target), __float_as_int(m));
  }
}

struct Fields {
  float* f[3];       // 3D: the fields after the W and H passes (workspace); 2D: unused
  float* contour;    // outputs
  float* weight;
};

// ---- pass 2: W then H, one (plane, strip of 32 columns, H tile) per block, field blockIdx.z ----------
// W pass from the padded bits: thread (row i, half s) computes kChunk outputs of Y row i, its window bits
// funnel-shifted into registers (a warp = 32 rows, skipped when all their windows are empty). MU: field 2,
// the taps weighted by mu[class] (class bytes). Then the H pass; 3D writes the field, 2D (LAST) writes
// contour / weight unnormalised and reduces the per-sample maxima of fields 0 and 1.
template <int R, int S, bool MU, bool LAST, int C>
__device__ __forceinline__ void plane_field(const uint32_t* __restrict__ bits, int words, int pad,
                                            const uint8_t* __restrict__ bclass, int64_t D, const Axis& ah,
                                            int64_t W, int field, const Params& p, const Fields& f,
                                            float* maxima, float* smem) {
  const int r = R > 0 ? R : p.radius[S];
  const int64_t H = ah.len;
  const Tile tile = block_tile(W, ah);
  const int64_t w0 = tile.col0, h0 = tile.start, plane = tile.outer;
  const int count = tile.count;
  // One tile: the W pass computes the H rows once (Y rows r .. r + H - 1), the halos are copied after it.
  const bool whole = ah.tiles == 1;
  const int n_src = whole ? static_cast<int>(H) : count + 2 * r;
  const Strip st = carve(smem, count, r);
  __shared__ float taps[kMaxRadius + 1];  // for the sparse W pass's indexed reads
  for (int j = threadIdx.x + 32 * threadIdx.y; j <= r; j += kThreads) taps[j] = p.taps[S][j];
  __syncthreads();

  const int tid = threadIdx.x + 32 * threadIdx.y;
  const int half = tid / (kThreads / 2);  // outputs [half * kChunk, half * kChunk + kChunk) of the strip
  constexpr int kWin = kChunk + 2 * (R > 0 ? R : 0);  // window bits (compile-time radius)
  constexpr int kWords = (kWin + 31) / 32;
  for (int i0 = 0; i0 < n_src; i0 += kThreads / 2) {  // uniform trip count: the warp votes below
    const int i = i0 + tid % (kThreads / 2);
    const bool active = i < n_src;
    const int64_t row = plane * H + (!active ? 0 : whole ? i : reflect_fast(h0 - r + i, H));
    const uint32_t* rb = bits + row * words;
    const int64_t b0 = pad + w0 - r + half * kChunk;  // >= 0: first window bit (padded position)
    float acc[kChunk];
#pragma unroll
    for (int o = 0; o < kChunk; ++o) acc[o] = 0.f;
    bool nonzero = true;
    if constexpr (R > 0 && !MU) {
      uint32_t win_bits[kWords];
      int set = 0;
      const int64_t q = b0 >> 5;
      const int sh = static_cast<int>(b0 & 31);
      uint32_t lo = active && q < words ? rb[q] : 0u;
#pragma unroll
      for (int k = 0; k < kWords; ++k) {
        const int64_t qk = q + k + 1;
        const uint32_t hi = active && qk < words ? rb[qk] : 0u;
        win_bits[k] = __funnelshift_r(lo, hi, sh);
        set += __popc(win_bits[k]);
        lo = hi;
      }
      nonzero = set > 0;
      const int most = warp_max_int(set);
      if (most > kSparseBits) {  // dense: every tap an FFMA
        window_conv<kChunk, R>([&](int t) { return static_cast<float>((win_bits[t >> 5] >> (t & 31)) & 1u); },
                               p.taps[S], r, acc);
      } else if (most > 0) {  // sparse: only the set bits' taps, in the same order (same sums)
#pragma unroll
        for (int k = 0; k < kWords; ++k) {
          for (uint32_t m = win_bits[k]; m != 0u; m &= m - 1u) {
            const int t = 32 * k + __ffs(m) - 1;
#pragma unroll
            for (int o = 0; o < kChunk; ++o) {
              const int j = t - o - R;
              if (j >= -R && j <= R) acc[o] += taps[j < 0 ? -j : j];
            }
          }
        }
      }
    } else if (active) {  // runtime radius or class weights: bits read one at a time (L1)
      const int64_t wrow = row * W;
      window_conv<kChunk, R>(
          [&](int t) {
            const int64_t b = b0 + t;
            const int64_t qb = b >> 5;
            const bool bit = qb < words && ((rb[qb] >> (b & 31)) & 1u);
            if (!bit) return 0.f;
            if constexpr (MU) return p.mu[bclass[wrow + reflect_fast(b - pad, W)] - 1];
            return 1.f;
          },
          p.taps[S], r, acc);
    }
    if (!active) continue;
    const int y = whole ? i + r : i;
#pragma unroll
    for (int o = 0; o < kChunk; ++o) st.Y[y * kPitch + half * kChunk + o] = acc[o];
    st.nz[2 * y + half] = nonzero;
  }
  __syncthreads();
  if (whole) {  // halo rows: reflected copies
    for (int e = tid; e < 2 * r * kStrip; e += kThreads) {
      const int k = e / kStrip, c = e % kStrip;
      const int y = k < r ? k : static_cast<int>(H) + k;  // k < r: top halo, else bottom
      const int from = static_cast<int>(reflect_fast(y - r, H)) + r;
      st.Y[y * kPitch + c] = st.Y[from * kPitch + c];
      if (c < 2) st.nz[2 * y + c] = st.nz[2 * from + c];
    }
    __syncthreads();
  }

  const int64_t base = plane * H * W + w0;
  float* dst = !LAST ? f.f[field] : (field == 0 ? f.contour : (field == C - 1 ? f.weight : nullptr));
  float m = 0.f;
  strip_conv<R>(st, p.taps[S], r, [&](int o, int c, float v) {
    if (w0 + c < W) {
      if (dst != nullptr) dst[base + (h0 + o) * W + c] = v;
      m = fmaxf(m, v);
    }
  });
  if constexpr (LAST) {
    if (field < 2) block_max_to(m, maxima + 2 * (plane / D) + field);  // block-uniform
  }
}

template <int R0, int R1, int C, bool LAST>
__global__ void __launch_bounds__(kThreads)
plane_kernel(const uint32_t* __restrict__ bits, int words, int pad, const uint8_t* __restrict__ bclass, int64_t D,
             Axis ah, int64_t W, const __grid_constant__ Params p, const __grid_constant__ Fields f,
             float* __restrict__ maxima) {
  extern __shared__ float smem[];
  const int field = blockIdx.z;
  if (field == 0)
    plane_field<R0, 0, false, LAST, C>(bits, words, pad, bclass, D, ah, W, 0, p, f, maxima, smem);
  else if (C == 3 && field == 2)  // class weights: runtime-radius loop (unrolled, it spills)
    plane_field<0, 1, true, LAST, C>(bits, words, pad, bclass, D, ah, W, 2, p, f, maxima, smem);
  else
    plane_field<R1, 1, false, LAST, C>(bits, words, pad, bclass, D, ah, W, field, p, f, maxima, smem);
}

// ---- pass 3 (3D): along D, one (sample, strip of 32 (h, w) columns, D tile) per block ---------------
// blockIdx.z = field: field 0 writes the contour, field C - 1 the weight (both unnormalised), fields 0
// and 1 reduce the per-sample maxima (field 1 of 3 is summed for its maximum only).
template <int R, int S, int C>
__device__ __forceinline__ void depth_field(const Fields& f, int field, const Axis& ad, int64_t HW,
                                            const Params& p, float* maxima, float* smem) {
  const int r = R > 0 ? R : p.radius[S];
  const int64_t D = ad.len;
  const Tile tile = block_tile(HW, ad);
  const int64_t j0 = tile.col0, d0 = tile.start, n = tile.outer;
  const int count = tile.count;
  const Strip st = carve(smem, count, r);
  const float* __restrict__ src = f.f[field] + n * D * HW + j0;
  const int c = threadIdx.x;
  const bool column = j0 + c < HW;
  for (int i0 = threadIdx.y; i0 < st.rows; i0 += kWarps * kLoadBatch) {  // loads in flight together
    float v[kLoadBatch];
#pragma unroll
    for (int u = 0; u < kLoadBatch; ++u) {
      const int i = i0 + u * kWarps;
      v[u] = i < st.rows && column ? src[reflect_fast(d0 - r + i, D) * HW + c] : 0.f;
    }
#pragma unroll
    for (int u = 0; u < kLoadBatch; ++u) {
      const int i = i0 + u * kWarps;
      const bool nonzero = __any_sync(0xffffffffu, v[u] != 0.f);
      if (i < st.rows) {
        st.Y[i * kPitch + c] = v[u];
        if (c < 2) st.nz[2 * i + c] = nonzero;
      }
    }
  }
  __syncthreads();
  float* dst = field == 0 ? f.contour : field == C - 1 ? f.weight : nullptr;
  if (dst != nullptr) dst += n * D * HW + j0;
  float m = 0.f;
  strip_conv<R>(st, p.taps[S], r, [&](int o, int cc, float v) {
    if (j0 + cc < HW) {
      if (dst != nullptr) dst[(d0 + o) * HW + cc] = v;
      m = fmaxf(m, v);
    }
  });
  if (field < 2) block_max_to(m, maxima + 2 * n + field);  // block-uniform
}

template <int R0, int R1, int C>
__global__ void __launch_bounds__(kThreads)
depth_kernel(const __grid_constant__ Fields f, Axis ad, int64_t HW, const __grid_constant__ Params p,
             float* __restrict__ maxima) {
  extern __shared__ float smem[];
  const int field = blockIdx.z;
  if (field == 0)
    depth_field<R0, 0, C>(f, 0, ad, HW, p, maxima, smem);
  else
    depth_field<R1, 1, C>(f, field, ad, HW, p, maxima, smem);
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

// Workspace: per-sample maxima, padded boundary bits, class bytes (3 fields), the 3D fields.
struct Layout {
  int pad, words;
  size_t maxima, bits, bclass, fields, total;
};

size_t align16(size_t bytes) { return (bytes + 15) / 16 * 16; }

Layout layout(const hmedn_targets_args& a, int channels) {
  Layout l{};
  const int64_t voxels = a.batch * a.depth * a.height * a.width;
  l.pad = a.radius_contour > a.radius_weight ? a.radius_contour : a.radius_weight;
  l.words = static_cast<int>((a.width + 2 * l.pad + 31) / 32);
  l.maxima = 0;
  l.bits = align16(2 * a.batch * sizeof(float));
  l.bclass = l.bits + align16(sizeof(uint32_t) * a.batch * a.depth * a.height * l.words);
  l.fields = l.bclass + (channels == 3 ? align16(voxels) : 0);
  l.total = l.fields + (a.spatial_dims == 3 ? channels * voxels * sizeof(float) : 0);
  return l;
}

template <int C, int R0, int R1>
cudaError_t launch_passes(const hmedn_targets_args& a, const Params& p, const Layout& l, char* ws,
                          cudaStream_t stream) {
  const int64_t N = a.batch, D = a.depth, H = a.height, W = a.width;
  const int64_t S = D * H * W;
  float* maxima = reinterpret_cast<float*>(ws + l.maxima);
  const uint32_t* bits = reinterpret_cast<const uint32_t*>(ws + l.bits);
  const uint8_t* bclass = C == 3 ? reinterpret_cast<const uint8_t*>(ws + l.bclass) : nullptr;
  float* fields = reinterpret_cast<float*>(ws + l.fields);
  const Fields f{{fields, fields + N * S, fields + 2 * N * S}, a.contour, a.weight};
  const int rmax = l.pad;
  const float scale = C == 3 ? 1.f : a.mu[0];

  const Axis ah = make_axis(H, N * D * ((W + kStrip - 1) / kStrip) * C);
  const size_t plane_smem = strip_smem(ah, rmax);
  const int64_t plane_blocks = N * D * ah.tiles * ((W + kStrip - 1) / kStrip);
  if (plane_blocks > INT32_MAX) return cudaErrorInvalidValue;
  const dim3 plane_grid(static_cast<unsigned>(plane_blocks), 1, C);
  const dim3 block(32, kWarps);
  cudaError_t err;
  auto kernel = a.spatial_dims == 2 ? plane_kernel<R0, R1, C, true> : plane_kernel<R0, R1, C, false>;
  if ((err = set_smem(reinterpret_cast<const void*>(kernel), plane_smem)) != cudaSuccess) return err;
  kernel<<<plane_grid, block, plane_smem, stream>>>(bits, l.words, l.pad, bclass, D, ah, W, p, f, maxima);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  if (a.spatial_dims == 3) {
    const int64_t HW = H * W;
    const Axis ad = make_axis(D, N * ((HW + kStrip - 1) / kStrip) * C);
    const size_t depth_smem = strip_smem(ad, rmax);
    const int64_t depth_blocks = N * ad.tiles * ((HW + kStrip - 1) / kStrip);
    if (depth_blocks > INT32_MAX) return cudaErrorInvalidValue;
    auto depth = depth_kernel<R0, R1, C>;
    if ((err = set_smem(reinterpret_cast<const void*>(depth), depth_smem)) != cudaSuccess) return err;
    depth<<<dim3(static_cast<unsigned>(depth_blocks), 1, C), block, depth_smem, stream>>>(f, ad, HW, p, maxima);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  normalise_kernel<<<dim3(blocks_for(S, 256), static_cast<unsigned>(N)), 256, 0, stream>>>(
      a.contour, a.weight, S, maxima, a.mu0, scale);
  return cudaGetLastError();
}

template <typename L>
cudaError_t launch_bits(const hmedn_targets_args& a, const Layout& l, uint8_t* bclass, uint32_t* bits,
                        cudaStream_t stream) {
  int dlen = 16;  // planes per thread; more when batch x segments would pass the grid's z limit
  while (a.batch * ((a.depth + dlen - 1) / dlen) > 65535) dlen *= 2;
  const int dsegs = static_cast<int>((a.depth + dlen - 1) / dlen);
  const dim3 grid(static_cast<unsigned>(l.words), static_cast<unsigned>((a.height + kWarps - 1) / kWarps),
                  static_cast<unsigned>(a.batch * dsegs));
  bits_kernel<<<grid, dim3(32, kWarps), 0, stream>>>(
      static_cast<const L*>(a.labels), static_cast<int>(a.depth), static_cast<int>(a.height),
      static_cast<int>(a.width), dlen, dsegs, l.pad, l.words, a.num_classes, bclass, bits, a.error_flag);
  return cudaGetLastError();
}

bool valid(const hmedn_targets_args* a) {
  return a != nullptr && a->batch >= 1 && a->batch <= 65535 && a->depth >= 1 && a->height >= 1 && a->width >= 1 &&
         a->num_classes >= 2 && (a->spatial_dims == 2 || a->spatial_dims == 3) &&
         (a->spatial_dims == 3 || a->depth == 1) && a->radius_contour >= 0 && a->radius_contour <= kMaxRadius &&
         a->radius_weight >= 0 && a->radius_weight <= kMaxRadius && a->depth * a->height * a->width <= INT32_MAX &&
         a->height <= int64_t{65535} * kWarps;  // rows of 8 per block of the bits kernel in grid.y
}

}  // namespace

extern "C" size_t hmedn_targets_cuda_workspace_bytes(const hmedn_targets_args* a) {
  return valid(a) ? layout(*a, num_channels(a->num_classes, a->mu)).total : 0;
}

extern "C" cudaError_t hmedn_targets_cuda(const hmedn_targets_args* a, cudaStream_t stream) {
  if (!valid(a)) return cudaErrorInvalidValue;
  const int channels = num_channels(a->num_classes, a->mu);
  if (channels == 3 && a->num_classes - 1 > kMaxClassWeights) return cudaErrorInvalidValue;
  const Layout l = layout(*a, channels);
  Params p{};
  p.radius[0] = a->radius_contour;
  p.radius[1] = a->radius_weight;
  for (int j = 0; j <= a->radius_contour; ++j) p.taps[0][j] = a->taps_contour[j];
  for (int j = 0; j <= a->radius_weight; ++j) p.taps[1][j] = a->taps_weight[j];
  if (channels == 3)
    for (int k = 0; k < a->num_classes - 1; ++k) p.mu[k] = a->mu[k];
  char* ws = static_cast<char*>(a->workspace);
  cudaError_t err = cudaMemsetAsync(ws + l.maxima, 0, 2 * a->batch * sizeof(float), stream);
  if (err != cudaSuccess) return err;
  uint8_t* bclass = channels == 3 ? reinterpret_cast<uint8_t*>(ws + l.bclass) : nullptr;
  uint32_t* bits = reinterpret_cast<uint32_t*>(ws + l.bits);
  switch (a->label_dtype) {
    case HMEDN_LABEL_U8: err = launch_bits<uint8_t>(*a, l, bclass, bits, stream); break;
    case HMEDN_LABEL_I16: err = launch_bits<int16_t>(*a, l, bclass, bits, stream); break;
    case HMEDN_LABEL_I32: err = launch_bits<int32_t>(*a, l, bclass, bits, stream); break;
    case HMEDN_LABEL_I64: err = launch_bits<int64_t>(*a, l, bclass, bits, stream); break;
    default: return cudaErrorInvalidValue;
  }
  if (err != cudaSuccess) return err;
  const bool defaults = p.radius[0] == 8 && p.radius[1] == 32;
  if (channels == 2)
    return defaults ? launch_passes<2, 8, 32>(*a, p, l, ws, stream) : launch_passes<2, 0, 0>(*a, p, l, ws, stream);
  return defaults ? launch_passes<3, 8, 32>(*a, p, l, ws, stream) : launch_passes<3, 0, 0>(*a, p, l, ws, stream);
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
