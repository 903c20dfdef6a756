// Tensor-core 3x3x3 "same" convolution, 32 -> 32 channels, bf16/fp16, channels-last (kernels/conv3x3.cuh).
//
// One block = one output tile of TR x 16 voxels (TR = 16 or 32 rows, the caller's choice) in one plane z of
// one sample, all 32 output channels; TR / 4 warps, each 4 rows of 16 voxels (4 m16 tiles) x 32 channels
// (4 n8 tiles) of mma.m16n8k16 with float32 accumulators. For each kernel depth kd the block copies the input
// plane z + (kd - 1) d with its halo, (TR + 2d) x (16 + 2d) voxels x 32 channels, and the 9 taps of that
// depth into shared memory (cp.async, zero fill outside the volume: the "same" padding), then every one of
// the 9 (kh, kw) taps reads its shifted 16-voxel rows straight out of that tile with ldmatrix, whose per-lane
// row addresses make the shift free: each input element is copied once per kd instead of once per tap.
// Taller tiles copy fewer halo rows and weights per output. Planes outside the volume (the first and last d
// planes' missing neighbours) are skipped. Shared rows (one voxel's or one weight row's 64 bytes) store their four
// 16-byte chunks permuted, chunk ^ ((row >> 1) & 3), so the 8 rows of one ldmatrix phase (8 consecutive voxels, or
// weight rows) hit distinct banks; this is also wgmma's 64-byte swizzle of K-major rows (address bits 4-5 ^ 7-8 from
// a 1024-byte-aligned base). The halo tile's rows are padded to a multiple of 8 voxels and the dilation is a template
// parameter, so the permutation of a tap's rows depends on the lane and kw only: six per-lane offsets, and every
// ldmatrix address is one of them plus a per-kh base plus an immediate.
// On sm_90a (tile_rows 8) the column kernel below runs instead: it copies each input plane once for the output
// planes d apart that read it and computes all three kernel depths as one wgmma of N = 96 (see its comment); it reads
// 5 KB of shared memory per three m64n32k16 units of math where this kernel's wgmma form read 9 (stops 36-37 of
// docs/decisions/blocks.md).
#include "conv3x3.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cstdint>
#include <type_traits>

namespace {

constexpr int kChannels = 32;
constexpr int kRowBytes = kChannels * 2;  // one voxel's channels
constexpr int kTile = 16;                 // output tile width (w), and the weight gradient's tile side
constexpr int kMTiles = 4;                // rows (m16 tiles) per warp
// The forward's tile height TR (16 or 32): TR / 4 warps (one or two warpgroups sharing the weights).
__host__ __device__ constexpr int fwd_warps(int tr) { return tr / kMTiles; }
__host__ __device__ constexpr int fwd_threads(int tr) { return 32 * fwd_warps(tr); }
constexpr int kTapsPerDepth = 9;
constexpr int kWeightBytes = kTapsPerDepth * kChannels * kRowBytes;
constexpr int kMaxDilation = 6;           // template instances
constexpr int kSmemPerSM = 227 * 1024;    // shared memory a block may take (sm_80 / sm_90: 227 KB of 228)

__host__ __device__ constexpr int halo_side(int d) { return kTile + 2 * d; }
__host__ __device__ constexpr int halo_pitch(int d) { return (halo_side(d) + 7) / 8 * 8; }  // voxels per row
__host__ __device__ constexpr int smem_bytes(int d, int tr) {
  return (tr + 2 * d) * halo_pitch(d) * kRowBytes + kWeightBytes;
}

// Byte offset of 16-byte chunk `chunk` of shared row `row`.
__host__ __device__ constexpr uint32_t swizzled(int row, int chunk) {
  return row * kRowBytes + ((chunk ^ ((row >> 1) & 3)) << 4);
}

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

template <bool BF16>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#define HMEDN_MMA(TYPES)                                                                                         \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TYPES ".f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}," \
               " {%0, %1, %2, %3};\n"                                                                          \
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                                 \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))
  if constexpr (BF16) {
    HMEDN_MMA("bf16.bf16");
  } else {
    HMEDN_MMA("f16.f16");
  }
#undef HMEDN_MMA
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// sm_90a: the forward's math as wgmma (every 4 warps are one warpgroup), both operands by shared-memory descriptor
// in the K-major layout with the 64-byte swizzle, which is how the halo tile and the weight rows are stored (64-byte
// rows = 32 k values, 16-byte chunk ^ address bits 7-8 = ((row >> 1) & 3) of rows counted from a 1024-byte-aligned
// base, so the swizzle pattern starts on 512-byte boundaries and the base offset is 0 wherever a matrix starts):
// start address >> 4, leading byte offset unused (1), stride byte offset `stride` (the next 8 m or n rows), mode 64B.
// B (weights): 8-row groups 512 bytes apart. A (input): an m64 tile is an 8 x 8 patch of output voxels, its 8-row
// groups the patch's image rows, one halo row (pitch voxels) apart; a tap's shift moves the start address only.
__device__ __forceinline__ uint64_t smem_descriptor(uint32_t addr, uint32_t stride, uint32_t leading = 16) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (uint64_t{(leading & 0x3FFFF) >> 4} << 16) |
         (uint64_t{(stride & 0x3FFFF) >> 4} << 32) | (uint64_t{2} << 62);
}

#define HMEDN_ACC(a)                                                                                           \
  "+f"(a[0][0]), "+f"(a[0][1]), "+f"(a[0][2]), "+f"(a[0][3]), "+f"(a[1][0]), "+f"(a[1][1]), "+f"(a[1][2]),         \
      "+f"(a[1][3]), "+f"(a[2][0]), "+f"(a[2][1]), "+f"(a[2][2]), "+f"(a[2][3]), "+f"(a[3][0]), "+f"(a[3][1]),     \
      "+f"(a[3][2]), "+f"(a[3][3])
#define HMEDN_R16 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15"
#define HMEDN_R32 HMEDN_R16 ", %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define HMEDN_R48 HMEDN_R32 ", %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47"

// Slots 0 .. SLOTS - 1 of acc (each one 64 x 32 tile of the warpgroup: per warp the m16n8 accumulators of n8 tiles
// 0-3) += A (64 m x 16 k) x B (16 k x 32 SLOTS n: slot s takes n 32 s ..), both by descriptor. (Accumulating into
// slots from 1 on, e.g. n32 into acc[1], makes ptxas serialize every wgmma of the kernel: C7511.)
template <bool BF16, int SLOTS>
__device__ __forceinline__ void wgmma_slots(float (&acc)[3][4][4], uint64_t a_desc, uint64_t b_desc) {
#define HMEDN_WGMMA_TYPED(TYPES, N, REGS, A, B, ...)                                                              \
  asm volatile("wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TYPES " {" REGS "}, %" #A ", %" #B               \
               ", 1, 1, 1, 0, 0;\n"                                                                              \
               : __VA_ARGS__                                                                                    \
               : "l"(a_desc), "l"(b_desc))
#define HMEDN_WGMMA_BOTH(N, REGS, A, B, ...)                                                                      \
  if constexpr (BF16) {                                                                                          \
    HMEDN_WGMMA_TYPED("bf16.bf16", N, REGS, A, B, __VA_ARGS__);                                                   \
  } else {                                                                                                       \
    HMEDN_WGMMA_TYPED("f16.f16", N, REGS, A, B, __VA_ARGS__);                                                     \
  }
  static_assert(1 <= SLOTS && SLOTS <= 3, "slots 1-3");
  if constexpr (SLOTS == 1) {
    HMEDN_WGMMA_BOTH(32, HMEDN_R16, 16, 17, HMEDN_ACC(acc[0]))
  } else if constexpr (SLOTS == 2) {
    HMEDN_WGMMA_BOTH(64, HMEDN_R32, 32, 33, HMEDN_ACC(acc[0]), HMEDN_ACC(acc[1]))
  } else {
    HMEDN_WGMMA_BOTH(96, HMEDN_R48, 48, 49, HMEDN_ACC(acc[0]), HMEDN_ACC(acc[1]), HMEDN_ACC(acc[2]))
  }
#undef HMEDN_WGMMA_BOTH
#undef HMEDN_WGMMA_TYPED
}
#undef HMEDN_R48
#undef HMEDN_R32
#undef HMEDN_R16
#undef HMEDN_ACC

// d (64 x 32, as above) += a (registers: this warp's 16 m rows x 16 k, the mma.m16n8k16 A fragment) x B (16 k x 32
// n by descriptor, MN-major: rows of 32 n values along k, "transposed").
template <bool BF16>
__device__ __forceinline__ void wgmma_m64n32k16_rt(float (&d)[4][4], const uint32_t (&a)[4], uint64_t b_desc) {
#define HMEDN_WGMMA(TYPES)                                                                                       \
  asm volatile("wgmma.mma_async.sync.aligned.m64n32k16.f32." TYPES                                             \
               " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15},"                      \
               " {%16, %17, %18, %19}, %20, 1, 1, 1, 1;\n"                                                      \
               : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]),     \
                 "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),     \
                 "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3])                                   \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b_desc))
  if constexpr (BF16) {
    HMEDN_WGMMA("bf16.bf16");
  } else {
    HMEDN_WGMMA("f16.f16");
  }
#undef HMEDN_WGMMA
}
#endif

template <bool BF16>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (BF16) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
}

template <bool BF16>
__device__ __forceinline__ float2 unpack2(uint32_t bits) {
  if constexpr (BF16) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&bits));
  } else {
    return __half22float2(*reinterpret_cast<const __half2*>(&bits));
  }
}

template <bool BF16>
__device__ __forceinline__ float rounded(float v) {
  if constexpr (BF16) {
    return __bfloat162float(__float2bfloat16_rn(v));
  } else {
    return __half2float(__float2half_rn(v));
  }
}

// Writes this lane's outputs of voxel `out` (its channel pair 2 quad of each n8 tile: acc[nt][2 half], [2 half + 1]),
// or adds them to what it holds (one float32 sum rounded once).
template <bool BF16>
__device__ __forceinline__ void store_voxel(uint16_t* out, const float (&acc)[4][4], int half, bool accumulate) {
#pragma unroll
  for (int nt = 0; nt < 4; ++nt) {
    uint32_t* dst = reinterpret_cast<uint32_t*>(out + nt * 8);
    float lo = acc[nt][2 * half], hi = acc[nt][2 * half + 1];
    if (accumulate) {
      const float2 old = unpack2<BF16>(*dst);
      lo += old.x;
      hi += old.y;
    }
    *dst = pack2<BF16>(lo, hi);
  }
}

// Per-channel mean and M2 of the block's WARPS x MT m16 tiles x 32 outputs as stored (acc rounded), two passes over
// the registers (warp shuffles over the 8 lanes that share a channel pair, then the warps in shared memory), written
// to out[0:32] (mean) and out[32:64] (M2). `red` is (WARPS + 1) x 32 floats of shared memory no other thread still
// reads.
template <bool BF16, int WARPS, int MT>
__device__ __forceinline__ void tile_stats(const float (&acc)[MT][4][4], float* red, float* out, int tid) {
  constexpr float inv_count = 1.0f / (WARPS * MT * 16);
  const auto warp_sum = [&](int c) {
    float t = 0.0f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) t += red[w * kChannels + c];
    return t;
  };
  const int lane = tid & 31, warp = tid >> 5, gid = lane >> 2, quad = lane & 3;
  float mean[4][2];
#pragma unroll
  for (int pass = 0; pass < 2; ++pass) {
    float s[4][2] = {};
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < 4; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float v = rounded<BF16>(acc[mt][nt][e]);
          const float d = pass == 0 ? v : v - mean[nt][e & 1];
          s[nt][e & 1] += pass == 0 ? d : d * d;
        }
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int off = 4; off < 32; off <<= 1) s[nt][j] += __shfl_xor_sync(0xffffffffu, s[nt][j], off);
    if (gid == 0)
#pragma unroll
      for (int nt = 0; nt < 4; ++nt)
#pragma unroll
        for (int j = 0; j < 2; ++j) red[warp * kChannels + nt * 8 + 2 * quad + j] = s[nt][j];
    __syncthreads();
    if (pass == 0) {
#pragma unroll
      for (int nt = 0; nt < 4; ++nt)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int c = nt * 8 + 2 * quad + j;
          mean[nt][j] = warp_sum(c) * inv_count;
        }
      if (tid < kChannels) red[WARPS * kChannels + tid] = warp_sum(tid) * inv_count;
      __syncthreads();  // every read of the first pass's sums is done before the second pass writes
    } else if (tid < kChannels) {
      out[tid] = red[WARPS * kChannels + tid];
      out[kChannels + tid] = warp_sum(tid);
    }
  }
}

// Copies (cp.async) the halo tile of an output tile of ROWS x 16 voxels at (h0, w0) from one input plane:
// (ROWS + 2 DIL) rows of (16 + 2 DIL) voxels x 32 channels, zeros outside the volume, row yy at halo_pitch voxels.
template <int DIL, int THREADS, int ROWS>
__device__ __forceinline__ void load_halo(uint32_t slab, const uint16_t* __restrict__ plane,
                                          const uint16_t* __restrict__ any, int h0, int w0, int H, int W,
                                          int64_t xv) {
  constexpr int side = halo_side(DIL), pitch = halo_pitch(DIL);
  for (int i = threadIdx.x; i < (ROWS + 2 * DIL) * side * 4; i += THREADS) {
    const int v = i >> 2, ch = i & 3;
    const int yy = v / side, xx = v - yy * side;
    const int gy = h0 - DIL + yy, gx = w0 - DIL + xx;
    const bool in = gy >= 0 && gy < H && gx >= 0 && gx < W;
    const uint16_t* src = in ? plane + (static_cast<int64_t>(gy) * W + gx) * xv + ch * 8 : any;
    cp_async16(slab + swizzled(yy * pitch + xx, ch), src, in);
  }
}

template <bool BF16, int DIL, int TR>
__global__ void __launch_bounds__(fwd_threads(TR), 64 / TR)  // 128 registers a thread
conv3x3_kernel(const uint16_t* __restrict__ x, const uint16_t* __restrict__ weight, uint16_t* __restrict__ y,
               int D, int H, int W, int tiles_w, int64_t xs, int64_t xv, int64_t ys, int64_t yv, bool flip,
               bool accumulate, float* __restrict__ stats) {
  constexpr int pitch = halo_pitch(DIL), kThreads = fwd_threads(TR);
  extern __shared__ __align__(1024) unsigned char smem[];  // the chunk permutation counts rows from here
  const uint32_t slab = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const uint32_t wsm = slab + (TR + 2 * DIL) * pitch * kRowBytes;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int h0 = (blockIdx.x / tiles_w) * TR, w0 = (blockIdx.x % tiles_w) * kTile;
  const int z = blockIdx.y;
  const int64_t n = blockIdx.z;
  const uint16_t* xn = x + n * xs;
  // ldmatrix rows. A (the warp's first m16 tile, tap (0, 0)): lanes 0-15 rows 0-15 at chunk 2 ks, lanes 16-31
  // the same rows at chunk 2 ks + 1; a tap (kh, kw) and m16 tile mt add (mt + kh DIL) pitch + kw DIL rows, a
  // multiple of 8 plus kw DIL, so the chunk permutation is that of row (lane & 15) + kw DIL. B: lanes 0-7 /
  // 16-23 weight rows n 0-7 / 8-15 at chunk 2 ks, lanes 8-15 / 24-31 the same rows at chunk 2 ks + 1; their
  // permutation is that of row lane & 7 whatever the tap and n block (multiples of 16 rows).
  const int a_row0 = warp * kMTiles * pitch + (lane & 15), b_row0 = (lane & 7) + ((lane >> 4) << 3);
  uint32_t a_off[3][2], b_off[2];
#pragma unroll
  for (int ks = 0; ks < 2; ++ks) {
#pragma unroll
    for (int kw = 0; kw < 3; ++kw) a_off[kw][ks] = slab + swizzled(a_row0 + kw * DIL, 2 * ks + (lane >> 4));
    b_off[ks] = wsm + swizzled(b_row0, 2 * ks + ((lane >> 3) & 1));
  }
  float acc[kMTiles][4][4] = {};

  for (int kd = 0; kd < 3; ++kd) {
    const int zi = z + (kd - 1) * DIL;
    if (zi < 0 || zi >= D) continue;  // block-uniform: a plane of zeros adds nothing
    __syncthreads();                  // the previous depth's reads of shared memory are done
    load_halo<DIL, kThreads, TR>(slab, xn + static_cast<int64_t>(zi) * H * W * xv, x, h0, w0, H, W, xv);
    const uint16_t* wk = weight + (flip ? 2 - kd : kd) * kTapsPerDepth * kChannels * kChannels;
    for (int i = tid; i < kTapsPerDepth * kChannels * 4; i += kThreads) {
      const int row = i >> 2, ch = i & 3;  // row = tap * 32 + n
      const int src = flip ? (kTapsPerDepth - 1 - row / kChannels) * kChannels + row % kChannels : row;
      cp_async16(wsm + swizzled(row, ch), wk + src * kChannels + ch * 8, true);
    }
    asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::: "memory");
    __syncthreads();

#pragma unroll 1  // a loop over kh keeps the fragments of one kernel row live, not all nine taps' (spills)
    for (int kh = 0; kh < 3; ++kh) {
      const uint32_t a_kh = kh * (DIL * pitch * kRowBytes), b_kh = kh * (3 * kChannels * kRowBytes);
#pragma unroll
      for (int kw = 0; kw < 3; ++kw) {
#pragma unroll
        for (int ks = 0; ks < 2; ++ks) {
          uint32_t b[2][4];
          const uint32_t b_addr = b_off[ks] + b_kh, a_addr = a_off[kw][ks] + a_kh;
#pragma unroll
          for (int np = 0; np < 2; ++np) ldmatrix_x4(b_addr + (kw * kChannels + np * 16) * kRowBytes, b[np]);
#pragma unroll
          for (int mt = 0; mt < kMTiles; ++mt) {
            uint32_t a[4];
            ldmatrix_x4(a_addr + mt * pitch * kRowBytes, a);
#pragma unroll
            for (int nt = 0; nt < 4; ++nt)
              mma16816<BF16>(acc[mt][nt], a, b[nt >> 1][2 * (nt & 1)], b[nt >> 1][2 * (nt & 1) + 1]);
          }
        }
      }
    }
  }

  uint16_t* yn = y + n * ys;
  const int gid = lane >> 2, quad = lane & 3;
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      // rows gid + 8 half of m16 tile mt: one image row of 16 voxels
      const int gy = h0 + warp * kMTiles + mt, gx = w0 + gid + 8 * half;
      if (gy < H && gx < W)
        store_voxel<BF16>(yn + (static_cast<int64_t>(z * H + gy) * W + gx) * yv + 2 * quad, acc[mt], half, accumulate);
    }
  }
  if (stats != nullptr) {  // every tile is full here (the launcher's contract)
    __syncthreads();       // shared memory is free: every warp's last reads of the halo and weights are done
    const int64_t row = (n * D + z) * gridDim.x + blockIdx.x;
    tile_stats<BF16, fwd_warps(TR), kMTiles>(acc, reinterpret_cast<float*>(smem), stats + row * 2 * kChannels, tid);
  }
}

// ---- forward / input gradient on sm_90a: a column of output planes per block -----------------------------------
// Block = one output tile of 8 x 16 voxels (two warpgroups, each one 8 x 8 patch = one m64 tile) in the planes z0, z0 + d, .., z0 + (Z - 1) d of one sample (a column: planes d apart share input planes). It walks
// the input planes z0 - d .. z0 + Z d once, copying each one's halo tile once, and feeds all three kernel depths from
// it: per tap, k16 half and patch one wgmma with N = 96, the three depths' 32 output channels, whose 32-column slots
// 0 / 1 / 2 accumulate the output planes p + d / p / p - d of input plane p (kd = 0 / 1 / 2), 48 float32 registers a
// thread. After plane p the slot of p - d is complete: it is written (with its tile statistics) and the slots shift. Per wgmma 2 KB of A and 3 KB
// of B are read for three times the per-depth form's math (2 + 1 KB). All 27 taps' weights stay in shared memory
// (rows (tap * 3 + kd) * 32 + co, 54 KB). At the column's ends only the slots of its own outputs are computed (N = 32
// or 64). A and B by shared-memory descriptor, as described at smem_descriptor.
constexpr int kColRows = 8, kColThreads = 256;
__host__ __device__ constexpr int col_halo_bytes(int d) { return (kColRows + 2 * d) * halo_pitch(d) * kRowBytes; }
__host__ __device__ constexpr int col_fixed_bytes() { return 3 * kWeightBytes + (kColThreads / 32 + 1) * kChannels * 4; }
// Two halo stages (the next plane copied while the current one's math runs) where two blocks of them fit an SM.
__host__ __device__ constexpr int col_stages(int d) {
  return 2 * (2 * col_halo_bytes(d) + col_fixed_bytes() + 1024) <= kSmemPerSM + 1024 ? 2 : 1;
}
__host__ __device__ constexpr int col_smem_bytes(int d) { return col_stages(d) * col_halo_bytes(d) + col_fixed_bytes(); }

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// Slots 0 .. SLOTS - 1 of the patch's accumulators += the input plane's taps (A: the patch's halo from a_base) x the
// weights of depths KD0 .. KD0 + SLOTS - 1 (B).
template <bool BF16, int DIL, int SLOTS, int KD0>
__device__ __forceinline__ void column_plane(float (&acc)[3][4][4], uint32_t a_base, uint32_t wsm) {
  constexpr int pitch = halo_pitch(DIL);
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
  for (int tap = 0; tap < kTapsPerDepth; ++tap) {
    const int kh = tap / 3, kw = tap % 3;
#pragma unroll
    for (int ks = 0; ks < 2; ++ks) {
      const uint64_t b_desc = smem_descriptor(wsm + (tap * 3 + KD0) * kChannels * kRowBytes + ks * 32, 512);
      const uint32_t a = a_base + (kh * DIL * pitch + kw * DIL) * kRowBytes + ks * 32;
      wgmma_slots<BF16, SLOTS>(acc, smem_descriptor(a, pitch * kRowBytes), b_desc);
    }
  }
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
}
#define HMEDN_COL_BOUNDS __launch_bounds__(kColThreads, 2)  // 128 registers a thread
#else
#define HMEDN_COL_BOUNDS __launch_bounds__(32)  // no image: the launcher reads this bound and takes conv3x3_kernel
#endif

template <bool BF16, int DIL>
__global__ void HMEDN_COL_BOUNDS
conv3x3_column_kernel(const uint16_t* __restrict__ x, const uint16_t* __restrict__ weight, uint16_t* __restrict__ y,
                      int D, int H, int W, int tiles_w, int planes, int64_t xs, int64_t xv, int64_t ys, int64_t yv,
                      bool flip, bool accumulate, float* __restrict__ stats) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int pitch = halo_pitch(DIL);
  extern __shared__ __align__(1024) unsigned char smem[];  // 512-byte swizzle atoms for wgmma's descriptors
  const uint32_t slab = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  constexpr int kStages = col_stages(DIL), kHalo = col_halo_bytes(DIL);
  const uint32_t wsm = slab + kStages * kHalo;
  float* red = reinterpret_cast<float*>(smem + kStages * kHalo + 3 * kWeightBytes);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, group = warp >> 2;
  const int h0 = (blockIdx.x / tiles_w) * kColRows, w0 = (blockIdx.x % tiles_w) * kTile;
  const int z0 = blockIdx.y % DIL + blockIdx.y / DIL * planes * DIL;
  if (z0 >= D) return;  // block-uniform
  const int zc = min(planes, (D - 1 - z0) / DIL + 1);  // this column's output planes
  const int64_t n = blockIdx.z;
  const uint16_t* xn = x + n * xs;
  uint16_t* yn = y + n * ys;
  // Input planes j of the column in the volume: jlo .. jhi (the others' zeros add nothing).
  const int jlo = z0 - DIL < 0 ? 0 : -1, jhi = z0 + zc * DIL >= D ? zc - 1 : zc;
  const auto copy_plane = [&](int j) {  // into stage (j - jlo) % kStages
    load_halo<DIL, kColThreads, kColRows>(slab + ((j - jlo) % kStages) * kHalo,
                                          xn + static_cast<int64_t>(z0 + j * DIL) * H * W * xv, x, h0, w0, H, W, xv);
  };
  for (int i = tid; i < 3 * kTapsPerDepth * kChannels * 4; i += kColThreads) {  // committed with the first plane
    const int row = i >> 2, ch = i & 3, co = row % kChannels, kd = row / kChannels % 3, tap = row / (3 * kChannels);
    const int src = flip ? (2 - kd) * kTapsPerDepth + kTapsPerDepth - 1 - tap : kd * kTapsPerDepth + tap;
    cp_async16(wsm + swizzled(row, ch), weight + (src * kChannels + co) * kChannels + ch * 8, true);
  }
  if (kStages == 2) {
    copy_plane(jlo);
    asm volatile("cp.async.commit_group;\n" ::: "memory");
  }
  const int gid = lane >> 2, quad = lane & 3;
  // Makes input plane j ready in shared memory; false for a plane outside the volume (block-uniform). With two
  // stages, plane j + 1's copy starts first.
  const auto ready_plane = [&](int j) {
    if (j < jlo || j > jhi) return false;
    __syncthreads();  // every warp's reads of the stage this copy overwrites (plane j - 1's, or j - 2's) are done
    if (kStages == 1) {
      copy_plane(j);
      asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::: "memory");
    } else if (j < jhi) {
      copy_plane(j + 1);
      asm volatile("cp.async.commit_group;\ncp.async.wait_group 1;\n" ::: "memory");
    } else {
      asm volatile("cp.async.wait_group 0;\n" ::: "memory");
    }
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // the copies, visible to wgmma's reads
    __syncthreads();
    return true;
  };
  // The warpgroup's A base in plane j's stage: its patch, columns 8 group ..
  const auto a_base = [&](int j) { return slab + ((j - jlo) % kStages) * kHalo + group * 8 * kRowBytes; };
  // Writes output plane i of the column from one slot (and its tile statistics).
  const auto store_plane = [&](int i, const float (&out)[4][4]) {
    const int z = z0 + i * DIL;
#pragma unroll
    for (int half = 0; half < 2; ++half) {  // rows 16 (warp % 4) + gid + 8 half of the patch: image row 2 (warp % 4) + half
      const int gy = h0 + 2 * (warp & 3) + half, gx = w0 + group * 8 + gid;
      if (gy < H && gx < W)
        store_voxel<BF16>(yn + (static_cast<int64_t>(z * H + gy) * W + gx) * yv + 2 * quad, out, half, accumulate);
    }
    if (stats != nullptr) {  // every tile is full here (the launcher's contract)
      const int64_t row = (n * D + z) * gridDim.x + blockIdx.x;
      tile_stats<BF16, kColThreads / 32, 1>(reinterpret_cast<const float(&)[1][4][4]>(out), red,
                                           stats + row * 2 * kChannels, tid);
    }
  };
  float acc[3][4][4] = {};
  // Input planes -1 .. zc - 2: slot s holds output j + 1 - s (depth s); outputs past the column's end are not
  // computed, so the first two planes fill slots 0 and 0-1. Output j - 1 (slot 2) is then complete.
  for (int j = -1; j <= zc - 2; ++j) {
    if (ready_plane(j)) {
      if (j == -1) {
        column_plane<BF16, DIL, 1, 0>(acc, a_base(j), wsm);
      } else if (j == 0) {
        column_plane<BF16, DIL, 2, 0>(acc, a_base(j), wsm);
      } else {
        column_plane<BF16, DIL, 3, 0>(acc, a_base(j), wsm);
      }
    }
    if (j >= 1) store_plane(j - 1, acc[2]);
    if (j == zc - 2) break;  // slots 0 / 1 now hold outputs zc - 1 / zc - 2, as the last two planes take them
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        acc[2][nt][e] = acc[1][nt][e];
        acc[1][nt][e] = acc[0][nt][e];
        acc[0][nt][e] = 0.0f;
      }
  }
  // Planes zc - 1 and zc: depths 1-2 into outputs zc - 1 / zc - 2 (slots 0-1), then depth 2 into output zc - 1.
  if (ready_plane(zc - 1)) column_plane<BF16, DIL, 2, 1>(acc, a_base(zc - 1), wsm);
  if (zc >= 2) store_plane(zc - 2, acc[1]);
  if (ready_plane(zc)) column_plane<BF16, DIL, 1, 2>(acc, a_base(zc), wsm);
  store_plane(zc - 1, acc[0]);
#endif
}
#undef HMEDN_COL_BOUNDS

// ---- weight gradient ------------------------------------------------------------------------------
// dW[tap][co][ci] = sum_v dY[v][co] X[v + shift(tap)][ci]. Block (split, kd) walks the output tiles split,
// split + splits, ... (those whose input plane z + (kd - 1) d exists), copying the output gradient's 16 x 16 tile
// and the input plane's halo tile into shared memory; where two blocks of two stages fit an SM (wgrad_stages), the
// next tile's copies run while the current tile's math does. K = the 16 voxels of one tile row at a time.
// - mma.sync (6 warps, warp = (kh, half of the tile's rows)): each warp accumulates its three taps (kh, kw = 0..2)
//   with M = 32 output channels (dY^T, ldmatrix.trans of the gradient rows) and N = 32 input channels (the shifted
//   input rows, ldmatrix.trans); at the end the two halves are summed in shared memory.
// - sm_90a, wgmma (one warpgroup, all 16 rows): M = 64 = two taps' 32 input channels (the shifted input rows as A
//   fragments, ldmatrix.trans; warps 0-1 the pair's first tap, 2-3 its second), N = 32 output channels (the gradient
//   row by descriptor, MN-major), five pairs for the nine taps (the last pair's second tap repeats the ninth and is
//   not written).
// The block writes its 9 taps to part[split][kd * 9 + tap] (float32, (tap, co, ci)); the caller sums over splits.
// The launcher reads which form the image holds from the kernel's launch bound (its maxThreadsPerBlock).
constexpr int kWgradThreadsMma = 192;
constexpr int kWgradThreadsWgmma = 128;
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define HMEDN_WGRAD_THREADS kWgradThreadsWgmma
constexpr int kTapPairs = (kTapsPerDepth + 1) / 2;
#else
#define HMEDN_WGRAD_THREADS kWgradThreadsMma
#endif
constexpr int kTileBytes = kTile * kTile * kRowBytes;
__host__ __device__ constexpr int wgrad_stage_bytes(int d) { return halo_side(d) * halo_pitch(d) * kRowBytes + kTileBytes; }
__host__ __device__ constexpr int wgrad_stages(int d) { return 2 * 2 * wgrad_stage_bytes(d) <= kSmemPerSM ? 2 : 1; }
__host__ __device__ constexpr int wgrad_smem_bytes(int d) {
  return wgrad_stages(d) * wgrad_stage_bytes(d);  // >= 9 x 32 x 33 floats for the mma.sync form's final sum
}

template <bool BF16, int DIL>
__global__ void __launch_bounds__(HMEDN_WGRAD_THREADS, 2)
conv3x3_wgrad_kernel(const uint16_t* __restrict__ x, const uint16_t* __restrict__ g, float* __restrict__ part,
                     int D, int H, int W, int tiles_h, int tiles_w, int tiles, int64_t xs, int64_t xv, int64_t gs,
                     int64_t gv) {
  constexpr int pitch = halo_pitch(DIL), kStages = wgrad_stages(DIL), kStage = wgrad_stage_bytes(DIL);
  constexpr int kThreads = HMEDN_WGRAD_THREADS;
  static_assert(wgrad_smem_bytes(DIL) >= kTapsPerDepth * kChannels * (kChannels + 1) * 4, "room for the final sum");
  extern __shared__ __align__(1024) unsigned char smem[];
  const uint32_t slab = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const uint32_t gsm = slab + (kStage - kTileBytes);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, kd = blockIdx.y;
  const int j = lane >> 3;  // ldmatrix matrix of this lane's row address
  // ldmatrix.trans rows: 8 voxels (K) of 16 bytes = 8 channels each; offsets of tile rows, kh and stages are
  // multiples of 8 voxels (stages of 512 bytes), so a row's chunk permutation depends on the lane and kw only.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  // A = the shifted input X^T (M = this warp's 16 input channels of tap 2p + warp / 2, K = voxels): matrix j =
  // voxels 0-7 / 8-15 for j >> 1, channel chunk 2 (warp & 1) + (j & 1).
  uint32_t a_off[kTapPairs];
#pragma unroll
  for (int p = 0; p < kTapPairs; ++p) {
    const int tap = min(2 * p + (warp >> 1), kTapsPerDepth - 1), kh = tap / 3, kw = tap % 3;
    a_off[p] = slab + swizzled((kh * pitch + kw) * DIL + (lane & 7) + ((j >> 1) << 3), 2 * (warp & 1) + (j & 1));
  }
  float acc[kTapPairs][4][4] = {};
#else
  // A = dY^T (M = channels, K = voxels): voxels 0-7 / 8-15 of the k-step's row for j >> 1, channel chunk 2 mt +
  // (j & 1). B = shifted input (K = voxels, N = channels): voxels 0-7 / 8-15 for j & 1, chunk 2 p + (j >> 1) (n8
  // tiles 2p, 2p + 1).
  const int kh = warp % 3, half = warp / 3;
  uint32_t a_off[2], b_off[3][2];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) a_off[mt] = gsm + swizzled((lane & 7) + ((j >> 1) << 3), 2 * mt + (j & 1));
#pragma unroll
  for (int kw = 0; kw < 3; ++kw)
#pragma unroll
    for (int p = 0; p < 2; ++p)
      b_off[kw][p] = slab + swizzled((lane & 7) + ((j & 1) << 3) + kw * DIL, 2 * p + (j >> 1));
  const uint32_t a_warp = half * 8 * kTile * kRowBytes, b_warp = (half * 8 + kh * DIL) * pitch * kRowBytes;
  float acc[3][2][4][4] = {};
#endif

  // The first tile at or after t whose input plane exists (block-uniform), or `tiles`.
  const auto next_tile = [&](int t) {
    for (; t < tiles; t += gridDim.x) {
      const int zi = (t / tiles_w / tiles_h) % D + (kd - 1) * DIL;
      if (zi >= 0 && zi < D) break;
    }
    return t;
  };
  // Copies tile t's halo and gradient tile into stage `stage` (cp.async, one commit group).
  const auto load_tile = [&](int t, int stage) {
    const int tw = t % tiles_w, rest = t / tiles_w, th = rest % tiles_h, zn = rest / tiles_h;
    const int z = zn % D, zi = z + (kd - 1) * DIL;
    const int64_t n = zn / D;
    const int h0 = th * kTile, w0 = tw * kTile;
    const uint32_t base = slab + stage * kStage;
    load_halo<DIL, kThreads, kTile>(base, x + n * xs + static_cast<int64_t>(zi) * H * W * xv, x, h0, w0, H, W, xv);
    const uint16_t* gp = g + n * gs + static_cast<int64_t>(z) * H * W * gv;
    for (int i = tid; i < kTile * kTile * 4; i += kThreads) {
      const int v = i >> 2, ch = i & 3, gy = h0 + v / kTile, gx = w0 + v % kTile;
      const bool in = gy < H && gx < W;
      cp_async16(base + (kStage - kTileBytes) + swizzled(v, ch),
                 in ? gp + (static_cast<int64_t>(gy) * W + gx) * gv + ch * 8 : g, in);
    }
    asm volatile("cp.async.commit_group;\n" ::: "memory");
  };

  int t = next_tile(blockIdx.x), stage = 0;
  if (kStages == 2 && t < tiles) load_tile(t, 0);
  while (t < tiles) {
    const int t_next = next_tile(t + gridDim.x);
    if (kStages == 1) {
      __syncthreads();  // the previous tile's reads of shared memory are done
      load_tile(t, 0);
      asm volatile("cp.async.wait_group 0;\n" ::: "memory");
    } else if (t_next < tiles) {
      load_tile(t_next, stage ^ 1);  // into the stage whose reads ended at the previous tile's closing barrier
      asm volatile("cp.async.wait_group 1;\n" ::: "memory");
    } else {
      asm volatile("cp.async.wait_group 0;\n" ::: "memory");
    }
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // the copies, visible to wgmma's reads
#endif
    __syncthreads();
    const uint32_t so = stage * kStage;
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    {  // per tile row r: one wgmma per tap pair; row r + 1's A fragments load while row r's wgmmas run
      uint32_t a[2][kTapPairs][4];
      const auto load_a = [&](int r, uint32_t (&dst)[kTapPairs][4]) {
#pragma unroll
        for (int p = 0; p < kTapPairs; ++p) ldmatrix_x4_trans(a_off[p] + so + r * pitch * kRowBytes, dst[p]);
      };
      load_a(0, a[0]);
#pragma unroll
      for (int r = 0; r < kTile; ++r) {
        asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
        const uint64_t b_desc = smem_descriptor(gsm + so + r * kTile * kRowBytes, 512, 512);
#pragma unroll
        for (int p = 0; p < kTapPairs; ++p) wgmma_m64n32k16_rt<BF16>(acc[p], a[r & 1][p], b_desc);
        asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
        asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");  // row r - 1 done: its A is free
        if (r + 1 < kTile) load_a(r + 1, a[(r + 1) & 1]);
      }
      asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
    }
#else
#pragma unroll 2
    for (int r = 0; r < 8; ++r) {  // k-step: row half * 8 + r of the tile
      uint32_t a[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) ldmatrix_x4_trans(a_off[mt] + so + a_warp + r * kTile * kRowBytes, a[mt]);
#pragma unroll
      for (int kw = 0; kw < 3; ++kw) {
        uint32_t b[2][4];
#pragma unroll
        for (int p = 0; p < 2; ++p) ldmatrix_x4_trans(b_off[kw][p] + so + b_warp + r * pitch * kRowBytes, b[p]);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
          for (int nt = 0; nt < 4; ++nt)
            mma16816<BF16>(acc[kw][mt][nt], a[mt], b[nt >> 1][2 * (nt & 1)], b[nt >> 1][2 * (nt & 1) + 1]);
      }
    }
#endif
    if (kStages == 2) {
      __syncthreads();  // this stage's reads are done before the next iteration's copies overwrite it
      stage ^= 1;
    }
    t = t_next;
  }

  float* out = part + (static_cast<int64_t>(blockIdx.x) * 27 + kd * kTapsPerDepth) * kChannels * kChannels;
  const int gid = lane >> 2, q = lane & 3;
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#pragma unroll
  for (int p = 0; p < kTapPairs; ++p) {
    const int tap = 2 * p + (warp >> 1);
    if (tap >= kTapsPerDepth) continue;  // the repeated ninth tap
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int ci = 16 * (warp & 1) + gid + 8 * (e >> 1), co = nt * 8 + 2 * q + (e & 1);
        out[(tap * kChannels + co) * kChannels + ci] = acc[p][nt][e];
      }
  }
#else
  __syncthreads();  // shared memory becomes the halves' sum
  float* red = reinterpret_cast<float*>(smem);
  for (int pass = 0; pass < 2; ++pass) {
#pragma unroll
    for (int kw = 0; kw < 3; ++kw)
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int co = mt * 16 + gid + 8 * (e >> 1), ci = nt * 8 + 2 * q + (e & 1);
            const int k = ((kh * 3 + kw) * kChannels + co) * kChannels + ci;
            // red's rows of 33 floats: the 8 output channels one instruction's lanes hold fall in 8 banks
            const int padded = ((kh * 3 + kw) * kChannels + co) * (kChannels + 1) + ci;
            if (pass == 0 && half == 1) red[padded] = acc[kw][mt][nt][e];
            if (pass == 1 && half == 0) out[k] = acc[kw][mt][nt][e] + red[padded];
          }
    __syncthreads();
  }
#endif
}
#undef HMEDN_WGRAD_THREADS

bool aligned(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// What both launchers ask of the volume read at shifted positions (x) and of the call: sizes the grids and 32-bit
// in-sample offsets take, a dilation with a template instance, a dtype, 16-byte chunks of whole voxels.
template <typename Args>
bool valid_volume(const Args& a) {
  return a.x != nullptr && a.batch >= 1 && a.batch <= 65535 && a.depth >= 1 && a.depth <= 65535 && a.height >= 1 &&
         a.width >= 1 && a.height * a.width <= INT32_MAX / kTile && a.depth * a.height * a.width <= INT32_MAX &&
         a.dilation >= 1 && a.dilation <= kMaxDilation && (a.dtype == HMEDN_CONV_BF16 || a.dtype == HMEDN_CONV_FP16) &&
         aligned(a.x, 16) && a.x_voxel_stride % 8 == 0 && a.x_sample_stride % 8 == 0 && a.x_voxel_stride >= kChannels;
}

bool valid(const hmedn_conv3x3_args* a) {
  return a != nullptr && valid_volume(*a) && a->weight != nullptr && a->y != nullptr && aligned(a->weight, 16) &&
         aligned(a->y, 4) && a->y_voxel_stride % 2 == 0 && a->y_sample_stride % 2 == 0 &&
         a->y_voxel_stride >= kChannels &&
         (a->tile_rows == 16 || a->tile_rows == 32 || (a->tile_rows == kColRows && a->multiprocessors >= 1)) &&
         (a->stats == nullptr || (a->height % a->tile_rows == 0 && a->width % kTile == 0 && a->accumulate == 0 &&
                                  aligned(a->stats, 4)));
}

bool valid(const hmedn_conv3x3_wgrad_args* a) {
  return a != nullptr && valid_volume(*a) && a->grad != nullptr && a->part != nullptr && a->splits >= 1 &&
         a->splits <= 65535 && aligned(a->grad, 16) && a->grad_voxel_stride % 8 == 0 &&
         a->grad_sample_stride % 8 == 0 && a->grad_voxel_stride >= kChannels;
}

// Opts the kernel into `bytes` of dynamic shared memory.
cudaError_t allow_smem(const void* kernel, int bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

int tiles_along(int64_t len, int tile = kTile) { return static_cast<int>((len + tile - 1) / tile); }

constexpr bool two_columns_per_sm(int d) {
  return d > kMaxDilation || (2 * (col_smem_bytes(d) + 1024) <= kSmemPerSM + 1024 && two_columns_per_sm(d + 1));
}

// Output planes per column of conv3x3_column_kernel: the fewest (up to 8) whose blocks are all resident at once (2
// blocks per SM: launch bound and shared memory), else 8. Only arithmetic: no CUDA call, so the first launch is as
// safe inside a CUDA graph capture as any other.
int column_planes(const hmedn_conv3x3_args& a, int tiles) {
  constexpr int kBlocksPerSM = 2;
  static_assert(two_columns_per_sm(1), "two blocks of the column kernel fit an SM's shared memory at every dilation");
  const int64_t chain = (a.depth + a.dilation - 1) / a.dilation;  // output planes d apart
  for (int z = 1; z < 8; ++z)
    if (a.batch * tiles * a.dilation * ((chain + z - 1) / z) <= int64_t{kBlocksPerSM} * a.multiprocessors) return z;
  return 8;
}

// Whether the image of `kernel` (a conv3x3_column_kernel instance) for the current device is the real kernel, not the
// stub of other architectures (its launch bound says which).
bool is_column_image(const void* kernel) {
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, kernel) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return attr.maxThreadsPerBlock >= kColThreads;
}

template <bool BF16, int DIL>
cudaError_t launch_column(const hmedn_conv3x3_args& a, cudaStream_t stream) {
  constexpr int bytes = col_smem_bytes(DIL);
  auto kernel = conv3x3_column_kernel<BF16, DIL>;
  if (!is_column_image(reinterpret_cast<const void*>(kernel))) return cudaErrorNoKernelImageForDevice;
  const cudaError_t err = allow_smem(reinterpret_cast<const void*>(kernel), bytes);
  if (err != cudaSuccess) return err;
  const int tiles_h = tiles_along(a.height, kColRows), tiles_w = tiles_along(a.width);
  const int planes = column_planes(a, tiles_h * tiles_w);
  const int64_t chain = (a.depth + DIL - 1) / DIL;
  const dim3 grid(static_cast<unsigned>(tiles_h * tiles_w), static_cast<unsigned>(DIL * ((chain + planes - 1) / planes)),
                  static_cast<unsigned>(a.batch));
  kernel<<<grid, kColThreads, bytes, stream>>>(
      static_cast<const uint16_t*>(a.x), static_cast<const uint16_t*>(a.weight), static_cast<uint16_t*>(a.y),
      static_cast<int>(a.depth), static_cast<int>(a.height), static_cast<int>(a.width), tiles_w, planes,
      a.x_sample_stride, a.x_voxel_stride, a.y_sample_stride, a.y_voxel_stride, a.flip_taps != 0, a.accumulate != 0,
      a.stats);
  return cudaGetLastError();
}

template <bool BF16, int DIL, int TR>
cudaError_t launch(const hmedn_conv3x3_args& a, cudaStream_t stream) {
  const int tiles_h = tiles_along(a.height, TR), tiles_w = tiles_along(a.width);
  constexpr int bytes = smem_bytes(DIL, TR);
  auto kernel = conv3x3_kernel<BF16, DIL, TR>;
  const cudaError_t err = allow_smem(reinterpret_cast<const void*>(kernel), bytes);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(tiles_h * tiles_w), static_cast<unsigned>(a.depth),
                  static_cast<unsigned>(a.batch));
  kernel<<<grid, fwd_threads(TR), bytes, stream>>>(
      static_cast<const uint16_t*>(a.x), static_cast<const uint16_t*>(a.weight), static_cast<uint16_t*>(a.y),
      static_cast<int>(a.depth), static_cast<int>(a.height), static_cast<int>(a.width), tiles_w, a.x_sample_stride,
      a.x_voxel_stride, a.y_sample_stride, a.y_voxel_stride, a.flip_taps != 0, a.accumulate != 0, a.stats);
  return cudaGetLastError();
}

// f(std::integral_constant<int, d>{}) for the dilations with a template instance, cudaErrorInvalidValue otherwise.
template <typename F>
cudaError_t with_dilation(int d, const F& f) {
  switch (d) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 6: return f(std::integral_constant<int, 6>{});
    default: return cudaErrorInvalidValue;
  }
}
static_assert(kMaxDilation == 6, "with_dilation lists every instance");

template <bool BF16, int DIL>
cudaError_t launch_wgrad(const hmedn_conv3x3_wgrad_args& a, cudaStream_t stream) {
  constexpr int bytes = wgrad_smem_bytes(DIL);
  auto kernel = conv3x3_wgrad_kernel<BF16, DIL>;
  cudaFuncAttributes attr{};  // the image's launch bound says its form (128 threads: wgmma, 192: mma.sync)
  cudaError_t err = cudaFuncGetAttributes(&attr, reinterpret_cast<const void*>(kernel));
  if (err == cudaSuccess) err = allow_smem(reinterpret_cast<const void*>(kernel), bytes);
  if (err != cudaSuccess) return err;
  const int threads = attr.maxThreadsPerBlock < kWgradThreadsMma ? kWgradThreadsWgmma : kWgradThreadsMma;
  const int tiles_h = tiles_along(a.height), tiles_w = tiles_along(a.width);
  const int64_t tiles = a.batch * a.depth * tiles_h * tiles_w;
  if (tiles > INT32_MAX) return cudaErrorInvalidValue;
  kernel<<<dim3(static_cast<unsigned>(a.splits), 3), threads, bytes, stream>>>(
      static_cast<const uint16_t*>(a.x), static_cast<const uint16_t*>(a.grad), a.part, static_cast<int>(a.depth),
      static_cast<int>(a.height), static_cast<int>(a.width), tiles_h, tiles_w, static_cast<int>(tiles),
      a.x_sample_stride, a.x_voxel_stride, a.grad_sample_stride, a.grad_voxel_stride);
  return cudaGetLastError();
}

}  // namespace

extern "C" cudaError_t hmedn_conv3x3_wgrad_cuda(const hmedn_conv3x3_wgrad_args* a, cudaStream_t stream) {
  if (!valid(a)) return cudaErrorInvalidValue;
  return with_dilation(a->dilation, [&](auto dil) {
    return a->dtype == HMEDN_CONV_BF16 ? launch_wgrad<true, decltype(dil)::value>(*a, stream)
                                       : launch_wgrad<false, decltype(dil)::value>(*a, stream);
  });
}

extern "C" int hmedn_conv3x3_max_dilation(void) { return kMaxDilation; }

extern "C" int hmedn_conv3x3_column_runs_on_current_device(void) {
  return is_column_image(reinterpret_cast<const void*>(conv3x3_column_kernel<true, 1>)) ? 1 : 0;
}

extern "C" int hmedn_conv3x3_runs_on_current_device(void) {
  cudaFuncAttributes attr{};
  const bool ok = cudaFuncGetAttributes(&attr, reinterpret_cast<const void*>(conv3x3_kernel<true, 1, 16>)) ==
                      cudaSuccess &&
                  cudaFuncGetAttributes(&attr, reinterpret_cast<const void*>(conv3x3_wgrad_kernel<true, 1>)) ==
                      cudaSuccess;
  if (!ok) cudaGetLastError();  // reset the last-error state (a missing image is not a sticky error)
  return ok ? 1 : 0;
}

extern "C" cudaError_t hmedn_conv3x3_cuda(const hmedn_conv3x3_args* a, cudaStream_t stream) {
  if (!valid(a)) return cudaErrorInvalidValue;
  return with_dilation(a->dilation, [&](auto dil) {
    constexpr int d = decltype(dil)::value;
    if (a->tile_rows == kColRows)
      return a->dtype == HMEDN_CONV_BF16 ? launch_column<true, d>(*a, stream) : launch_column<false, d>(*a, stream);
    if (a->tile_rows == 32)
      return a->dtype == HMEDN_CONV_BF16 ? launch<true, d, 32>(*a, stream) : launch<false, d, 32>(*a, stream);
    return a->dtype == HMEDN_CONV_BF16 ? launch<true, d, 16>(*a, stream) : launch<false, d, 16>(*a, stream);
  });
}
