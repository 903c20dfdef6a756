// Boundary, contour and difficulty-weight maps (SPEC section 2): CPU implementation, input checks and the
// registration of the ops hmedn_fast::boundary_map and hmedn_fast::make_targets (CPU, CUDA and Meta).
//
// The CPU path has the structure of the CUDA kernels (kernels/targets.cu) and shares their index math
// (kernels/targets.cuh): a row pass along W fused with the boundary classes, column passes along H (and D)
// over (outer, len, inner) layouts vectorised along the contiguous inner axis, per-sample maxima reduced
// in the last pass, and a normalisation pass. Work is split over batch and lines with at::parallel_for
// (OpenMP in torch builds; follows torch.set_num_threads).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <limits>
#include <type_traits>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "targets.cuh"

#ifdef HMEDN_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace {

using hmedn::targets::boundary_class;
using hmedn::targets::gaussian_half_taps;
using hmedn::targets::reflect_index;

// Numbers in error messages are formatted here, never streamed (c10::str): on one GPU image the
// extension's inlined std::ostream number insertion picked a wrong locale facet and crashed (libstdc++
// headers of the build compiler vs the libstdc++ loaded in the process). snprintf has no facets.
std::string num(int64_t v) { return std::to_string(v); }
std::string num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);
  return buf;
}
std::string shape_str(at::IntArrayRef sizes) {
  std::string out = "(";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + num(sizes[i]);
  return out + ")";
}

// ---- input checks (shared by every backend, Meta included) -----------------------------------------
struct Shape {
  int64_t n, d, h, w;
  int spatial_dims;
  int64_t spatial() const { return d * h * w; }
};

void check_labels_meta(const at::Tensor& labels, int64_t num_classes, const char* op) {
  const auto t = labels.scalar_type();
  TORCH_CHECK_TYPE(t == at::kByte || t == at::kShort || t == at::kInt || t == at::kLong, op,
                   ": labels must be an integer tensor of dtype uint8, int16, int32 or int64, got ", t);
  TORCH_CHECK_VALUE(labels.dim() == 3 || labels.dim() == 4, op,
                    ": labels must have shape (N, H, W) or (N, D, H, W), got ", num(labels.dim()), " dims");
  TORCH_CHECK_VALUE(num_classes >= 2, op, ": num_classes must be >= 2 (background + 1 class), got ",
                    num(num_classes));
  TORCH_CHECK_VALUE(num_classes <= (int64_t{1} << 30), op, ": num_classes=", num(num_classes), " is too large");
}

Shape check_labels(const at::Tensor& labels, int64_t num_classes, const char* op) {
  check_labels_meta(labels, num_classes, op);
  TORCH_CHECK_VALUE(labels.numel() > 0, op, ": labels must not be empty, got shape ", shape_str(labels.sizes()));
  const bool three = labels.dim() == 4;
  return Shape{labels.size(0), three ? labels.size(1) : 1, labels.size(-2), labels.size(-1), three ? 3 : 2};
}

void check_params(int64_t num_classes, double sigma_contour, double sigma_weight, double mu0,
                  at::ArrayRef<double> mu, const char* op) {
  TORCH_CHECK_VALUE(std::isfinite(sigma_contour) && sigma_contour > 0, op,
                    ": sigma_contour must be a finite number > 0, got ", num(sigma_contour));
  TORCH_CHECK_VALUE(std::isfinite(sigma_weight) && sigma_weight > 0, op,
                    ": sigma_weight must be a finite number > 0, got ", num(sigma_weight));
  TORCH_CHECK_VALUE(std::isfinite(mu0), op, ": mu0 must be finite, got ", num(mu0));
  TORCH_CHECK_VALUE(static_cast<int64_t>(mu.size()) == num_classes - 1, op, ": mu must hold num_classes - 1 = ",
                    num(num_classes - 1), " per-class weights, got ", num(static_cast<int64_t>(mu.size())));
  for (const double m : mu) TORCH_CHECK_VALUE(std::isfinite(m), op, ": mu must be finite, got ", num(m));
}

[[noreturn]] void fail_label_range(const at::Tensor& labels, int64_t num_classes, const char* op) {
  const auto mm = at::aminmax(labels);
  TORCH_CHECK_VALUE(false, op, ": labels must lie in [0, num_classes=", num(num_classes), "), got values in [",
                    num(std::get<0>(mm).item<int64_t>()), ", ", num(std::get<1>(mm).item<int64_t>()), "]");
}

// ---- CPU kernels -------------------------------------------------------------------------------------
struct Taps {
  std::vector<float> w;  // half taps, w[j] at offsets +-j
  int r;
  explicit Taps(double sigma) : w(gaussian_half_taps(sigma)), r(static_cast<int>(w.size()) - 1) {}
};

constexpr int64_t kSpan = 32;  // outputs accumulated in registers at once (4 AVX2 dependency chains)

// out[x] = sum_{j=-r..r} taps[|j|] * c[x + j * step], x = 0 .. n-1, n a multiple of kSpan. `c` points at
// the centre of output 0; the taps' neighbours lie `step` floats apart (1 along a row, the chunk width
// in a gathered column block). FMA: fused multiply-adds (only where the CPU has them).
template <bool FMA>
inline __attribute__((always_inline)) void conv_span_impl(const float* c, int64_t step, const float* taps, int r,
                                                          int64_t n, float* out) {
  for (int64_t x0 = 0; x0 < n; x0 += kSpan) {
    float acc[kSpan];
    for (int64_t x = 0; x < kSpan; ++x) acc[x] = taps[0] * c[x0 + x];
    for (int j = 1; j <= r; ++j) {
      const float wj = taps[j];
      const float* lo = c + x0 - j * step;
      const float* hi = c + x0 + j * step;
      for (int64_t x = 0; x < kSpan; ++x) {
        if constexpr (FMA) acc[x] = __builtin_fmaf(wj, lo[x] + hi[x], acc[x]);
        else acc[x] += wj * (lo[x] + hi[x]);
      }
    }
    for (int64_t x = 0; x < kSpan; ++x) out[x0 + x] = acc[x];
  }
}

using ConvSpan = void (*)(const float*, int64_t, const float*, int, int64_t, float*);

// CPU features, read once at load time: the hot loops are compiled twice (baseline and AVX2) and pick by them.
#if defined(__x86_64__) && defined(__GNUC__)
#define HMEDN_X86_CLONES 1
const bool kHasAvx2 = (__builtin_cpu_init(), __builtin_cpu_supports("avx2"));
const bool kHasFma = __builtin_cpu_supports("fma");
#else
#define HMEDN_X86_CLONES 0
#endif

void conv_span_baseline(const float* c, int64_t step, const float* taps, int r, int64_t n, float* out) {
  conv_span_impl<false>(c, step, taps, r, n, out);
}

// The hot loop again, compiled for AVX2 + FMA and picked at load time when the CPU has both.
#if HMEDN_X86_CLONES
__attribute__((target("avx2,fma"))) void conv_span_avx2(const float* c, int64_t step, const float* taps, int r,
                                                         int64_t n, float* out) {
  conv_span_impl<true>(c, step, taps, r, n, out);
}

const ConvSpan conv_span = kHasAvx2 && kHasFma ? conv_span_avx2 : conv_span_baseline;
#else
const ConvSpan conv_span = conv_span_baseline;
#endif

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// max(m, x[0..n)) for non-negative floats, compared as their int32 bit patterns (same order), which
// vectorises (a float max reduction does not without -ffast-math).
float max_nonnegative(const float* x, int64_t n, float m) {
  int32_t best;
  std::memcpy(&best, &m, sizeof(best));
  for (int64_t i = 0; i < n; ++i) {
    int32_t v;
    std::memcpy(&v, x + i, sizeof(v));
    best = v > best ? v : best;
  }
  std::memcpy(&m, &best, sizeof(m));
  return m;
}

struct Fields3 {
  float* f[3];
};

// Boundary classes of one row (d, h) of a sample, as boundary_class() of kernels/targets.cuh computes
// them voxel by voxel, written as whole-row comparisons in the label type (no widening, no branches:
// the loop vectorises in L-wide lanes): a missing neighbour (image edge) is replaced by the voxel
// itself, which never differs. Returns whether the row has a boundary.
template <typename L>
inline __attribute__((always_inline)) bool row_classes_impl(const L* lab, int64_t d, int64_t h, const Shape& s,
                                                            int num_classes, L* cls, bool& bad) {
  const int64_t W = s.w, HW = s.h * s.w;
  const L* row = lab + (d * s.h + h) * W;
  const L* up = h > 0 ? row - W : row;
  const L* down = h + 1 < s.h ? row + W : row;
  const L* front = d > 0 ? row - HW : row;
  const L* back = d + 1 < s.d ? row + HW : row;
  const L top = static_cast<L>(std::min<int64_t>(num_classes - 1, std::numeric_limits<L>::max()));
  // value lambdas (no captured accumulators: the loop's accumulators stay in registers, cls cannot alias them)
  const auto out_of_range = [top](L k) -> L {
    L o = k > top;
    if constexpr (std::is_signed_v<L>) o |= k < 0;
    return o;
  };
  const auto cls_of = [&out_of_range](L k, L u, L dn, L f, L b, L left, L right) -> L {
    const L edge = (u != k) | (dn != k) | (f != k) | (b != k) | (left != k) | (right != k);
    return static_cast<L>(k & -static_cast<L>(edge & !out_of_range(k) & (k > 0)));  // k or 0
  };
  L any = 0, invalid = 0;
  for (int64_t w = 0; w < W; ++w) invalid |= out_of_range(row[w]);
  // the row's ends apart, so that the interior loop has no clamped indices
  cls[0] = cls_of(row[0], up[0], down[0], front[0], back[0], row[0], row[W > 1 ? 1 : 0]);
  any |= cls[0];
  for (int64_t w = 1; w + 1 < W; ++w) {
    const L c = cls_of(row[w], up[w], down[w], front[w], back[w], row[w - 1], row[w + 1]);
    cls[w] = c;
    any |= c;
  }
  if (W > 1) {
    cls[W - 1] = cls_of(row[W - 1], up[W - 1], down[W - 1], front[W - 1], back[W - 1], row[W - 2], row[W - 1]);
    any |= cls[W - 1];
  }
  if (invalid) bad = true;
  return any != 0;
}

template <typename L>
bool row_classes_baseline(const L* lab, int64_t d, int64_t h, const Shape& s, int num_classes, L* cls, bool& bad) {
  return row_classes_impl(lab, d, h, s, num_classes, cls, bad);
}

#if HMEDN_X86_CLONES
// Again for AVX2: the baseline (SSE2) has no 64-bit lane compare, so int64 labels would run scalar there.
template <typename L>
__attribute__((target("avx2"))) bool row_classes_avx2(const L* lab, int64_t d, int64_t h, const Shape& s,
                                                      int num_classes, L* cls, bool& bad) {
  return row_classes_impl(lab, d, h, s, num_classes, cls, bad);
}
#endif

template <typename L>
bool row_classes(const L* lab, int64_t d, int64_t h, const Shape& s, int num_classes, L* cls, bool& bad) {
#if HMEDN_X86_CLONES
  if (kHasAvx2) return row_classes_avx2(lab, d, h, s, num_classes, cls, bad);
#endif
  return row_classes_baseline(lab, d, h, s, num_classes, cls, bad);
}

// Row pass along W with the boundary classes fused: per row, the boundary classes, the reflected fields
// f1 = B_all and f2 = mu[bclass] B_all (zero-padded to whole spans), and their smoothing along W.
// Returns true on a label outside [0, num_classes).
template <typename L>
bool row_pass(const L* labels, const Shape& s, int num_classes, const Taps& tc, const Taps& tw,
              const std::vector<float>& mu, int channels, Fields3 out) {
  const int rmax = std::max(tc.r, tw.r);
  const int64_t rows = s.n * s.d * s.h, W = s.w, plane = s.d * s.h, span = round_up(W, kSpan);
  std::atomic<bool> bad{false};
  std::vector<int64_t> src(W + 2 * rmax);  // reflected source column of every padded position, computed once
  for (int64_t q = 0; q < W + 2 * rmax; ++q) src[q] = reflect_index(q - rmax, W);
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / W), [&](int64_t begin, int64_t end) {
    std::vector<L> cls(W);
    std::vector<float> f1(span + 2 * rmax, 0.f), f2(channels == 3 ? span + 2 * rmax : 0, 0.f), row_out(span);
    bool local_bad = false;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / plane, dh = row - n * plane, d = dh / s.h, h = dh - d * s.h;
      const L* lab = labels + n * plane * W;
      const bool any = row_classes(lab, d, h, s, num_classes, cls.data(), local_bad);
      if (!any) {
        for (int c = 0; c < channels; ++c) std::memset(out.f[c] + row * W, 0, W * sizeof(float));
        continue;
      }
      for (int64_t q = 0; q < W + 2 * rmax; ++q) {
        const int k = static_cast<int>(cls[src[q]]);
        f1[q] = k > 0 ? 1.f : 0.f;
        if (channels == 3) f2[q] = k > 0 ? mu[k - 1] : 0.f;
      }
      const Taps* taps[3] = {&tc, &tw, &tw};
      for (int c = 0; c < channels; ++c) {
        const float* field = c == 2 ? f2.data() : f1.data();
        conv_span(field + rmax, 1, taps[c]->w.data(), taps[c]->r, span, row_out.data());
        std::memcpy(out.f[c] + row * W, row_out.data(), W * sizeof(float));
      }
    }
    if (local_bad) bad = true;
  });
  return bad;
}

// Column pass over an (outer, len, inner) array along len. Each task gathers a block of up to kChunk
// columns of one outer slice, reflected by r lines on both sides, into a contiguous buffer (long
// contiguous copies; no cache-set conflicts from power-of-two strides) and smooths it; `out` may be `in`
// (each task reads all of its columns before writing them) or null (only the maxima are wanted); with
// `maxima` (size outer) the per-outer maxima of the (non-negative) result are returned.
void col_pass(const float* in, float* out, int64_t outer, int64_t len, int64_t inner, const Taps& t,
              float* maxima) {
  constexpr int64_t kChunk = 512;
  const int64_t chunk = std::min(kChunk, round_up(inner, kSpan));
  const int64_t chunks = (inner + chunk - 1) / chunk, items = outer * chunks;
  std::vector<float> item_max(maxima != nullptr ? items : 0, 0.f);
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    const int64_t ext_len = len + 2 * t.r;
    std::vector<float> ext(ext_len * chunk, 0.f), row(chunk);
    std::vector<int64_t> nonzero(ext_len + 1);  // prefix counts of gathered lines holding a non-zero
    for (int64_t item = begin; item < end; ++item) {
      const int64_t o = item / chunks, i0 = (item - o * chunks) * chunk;
      const int64_t width = std::min(chunk, inner - i0), span = round_up(width, kSpan);
      const float* src = in + o * len * inner + i0;
      for (int64_t q = 0; q < ext_len; ++q) {
        float* line = ext.data() + q * chunk;
        std::memcpy(line, src + reflect_index(q - t.r, len) * inner, width * sizeof(float));
        int any = 0;
        for (int64_t x = 0; x < width; ++x) any |= line[x] != 0.f;
        nonzero[q + 1] = nonzero[q] + any;
      }
      float m = 0.f;
      for (int64_t l = 0; l < len; ++l) {
        // boundaries are sparse: a window of zero lines gives a zero line without the convolution
        if (nonzero[l + 2 * t.r + 1] == nonzero[l]) std::fill(row.begin(), row.begin() + width, 0.f);
        else conv_span(ext.data() + (l + t.r) * chunk, chunk, t.w.data(), t.r, span, row.data());
        if (out != nullptr) std::memcpy(out + (o * len + l) * inner + i0, row.data(), width * sizeof(float));
        if (maxima != nullptr) m = max_nonnegative(row.data(), width, m);
      }
      if (maxima != nullptr) item_max[item] = m;
    }
  });
  if (maxima != nullptr)
    for (int64_t o = 0; o < outer; ++o)
      maxima[o] = *std::max_element(item_max.begin() + o * chunks, item_max.begin() + (o + 1) * chunks);
}

int num_channels(at::ArrayRef<double> mu) {
  for (const double m : mu)
    if (static_cast<float>(m) != static_cast<float>(mu[0])) return 3;
  return 2;
}

template <typename L>
void make_targets_cpu_typed(const at::Tensor& labels, const Shape& s, int num_classes, const Taps& tc,
                            const Taps& tw, double mu0, at::ArrayRef<double> mu, at::Tensor& contour,
                            at::Tensor& weight) {
  const int channels = num_channels(mu);
  const int64_t N = s.n, S = s.spatial();
  std::vector<float> mu_f(mu.begin(), mu.end());
  // Every pass works in place: fields [G_c(B_all), G_w(B_all), G_w(mu B_all)] live in (contour, weight)
  // with 2 fields, in (contour, extra, weight) with 3 (extra only feeds the weight's normaliser).
  at::Tensor extra = channels == 3 ? at::empty({N * S}, labels.options().dtype(at::kFloat)) : at::Tensor();
  float* c_ptr = contour.data_ptr<float>();
  float* w_ptr = weight.data_ptr<float>();
  const Fields3 f = channels == 3 ? Fields3{{c_ptr, extra.data_ptr<float>(), w_ptr}} : Fields3{{c_ptr, w_ptr, nullptr}};
  if (row_pass(labels.data_ptr<L>(), s, num_classes, tc, tw, mu_f, channels, f))
    fail_label_range(labels, num_classes, "hmedn_fast::make_targets");
  if (s.spatial_dims == 3) {  // along H, each (n, d) plane is an (H, W) array
    for (int c = 0; c < channels; ++c) col_pass(f.f[c], f.f[c], N * s.d, s.h, s.w, c == 0 ? tc : tw, nullptr);
  }
  // last pass: along H (2D) or D (3D), each sample an (len, inner) array; the maxima of the B_all fields
  const int64_t len = s.spatial_dims == 3 ? s.d : s.h, inner = S / len;
  std::vector<float> max_c(N), max_w(N);
  col_pass(f.f[0], f.f[0], N, len, inner, tc, max_c.data());
  col_pass(f.f[1], channels == 2 ? f.f[1] : nullptr, N, len, inner, tw, max_w.data());
  if (channels == 3) col_pass(f.f[2], f.f[2], N, len, inner, tw, nullptr);

  const float scale = channels == 3 ? 1.f : static_cast<float>(mu[0]);
  const float base = static_cast<float>(mu0);
  constexpr int64_t kBlock = 16384;
  const int64_t blocks = (S + kBlock - 1) / kBlock;
  at::parallel_for(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / blocks, v0 = n * S + (item - n * blocks) * kBlock, v1 = std::min(v0 + kBlock, (n + 1) * S);
      const float inv_c = max_c[n] > 0.f ? 1.f / max_c[n] : 0.f;
      const float inv_w = max_w[n] > 0.f ? scale / max_w[n] : 0.f;
      for (int64_t v = v0; v < v1; ++v) {
        c_ptr[v] *= inv_c;
        w_ptr[v] = base + inv_w * w_ptr[v];
      }
    }
  });
}

template <typename L>
bool boundary_map_cpu_typed(const L* labels, const Shape& s, int num_classes, bool* out) {
  const int64_t rows = s.n * s.d * s.h, plane = s.d * s.h, S = s.spatial();
  std::atomic<bool> bad{false};
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / s.w), [&](int64_t begin, int64_t end) {
    bool local_bad = false;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / plane, dh = row - n * plane, d = dh / s.h, h = dh - d * s.h;
      bool* o = out + n * (num_classes - 1) * S + dh * s.w;
      for (int64_t w = 0; w < s.w; ++w) {
        const int k = boundary_class(labels + n * S, d, h, w, s.d, s.h, s.w, num_classes, &local_bad);
        for (int c = 1; c < num_classes; ++c) o[(c - 1) * S + w] = (k == c);
      }
    }
    if (local_bad) bad = true;
  });
  return bad;
}

std::vector<int64_t> boundary_sizes(const at::Tensor& labels, int64_t num_classes) {
  std::vector<int64_t> sizes(labels.sizes().begin(), labels.sizes().end());
  sizes.insert(sizes.begin() + 1, num_classes - 1);
  return sizes;
}

// ---- op implementations ----------------------------------------------------------------------------
constexpr const char* kBoundaryOp = "hmedn_fast::boundary_map";
constexpr const char* kTargetsOp = "hmedn_fast::make_targets";

at::Tensor boundary_map_cpu(const at::Tensor& labels_in, int64_t num_classes) {
  const Shape s = check_labels(labels_in, num_classes, kBoundaryOp);
  const at::Tensor labels = labels_in.contiguous();
  at::Tensor out = at::empty(boundary_sizes(labels, num_classes), labels.options().dtype(at::kBool));
  bool bad = false;
  const int k = static_cast<int>(num_classes);
  switch (labels.scalar_type()) {
    case at::kByte: bad = boundary_map_cpu_typed(labels.data_ptr<uint8_t>(), s, k, out.data_ptr<bool>()); break;
    case at::kShort: bad = boundary_map_cpu_typed(labels.data_ptr<int16_t>(), s, k, out.data_ptr<bool>()); break;
    case at::kInt: bad = boundary_map_cpu_typed(labels.data_ptr<int32_t>(), s, k, out.data_ptr<bool>()); break;
    default: bad = boundary_map_cpu_typed(labels.data_ptr<int64_t>(), s, k, out.data_ptr<bool>()); break;
  }
  if (bad) fail_label_range(labels, num_classes, kBoundaryOp);
  return out;
}

std::tuple<at::Tensor, at::Tensor> make_targets_cpu(const at::Tensor& labels_in, int64_t num_classes,
                                                    double sigma_contour, double sigma_weight, double mu0,
                                                    at::ArrayRef<double> mu, bool /*check_labels: always on*/) {
  const Shape s = check_labels(labels_in, num_classes, kTargetsOp);
  check_params(num_classes, sigma_contour, sigma_weight, mu0, mu, kTargetsOp);
  const at::Tensor labels = labels_in.contiguous();
  const auto opts = labels.options().dtype(at::kFloat);
  at::Tensor contour = at::empty(labels.sizes(), opts), weight = at::empty(labels.sizes(), opts);
  const Taps tc(sigma_contour), tw(sigma_weight);
  const int k = static_cast<int>(num_classes);
  switch (labels.scalar_type()) {
    case at::kByte: make_targets_cpu_typed<uint8_t>(labels, s, k, tc, tw, mu0, mu, contour, weight); break;
    case at::kShort: make_targets_cpu_typed<int16_t>(labels, s, k, tc, tw, mu0, mu, contour, weight); break;
    case at::kInt: make_targets_cpu_typed<int32_t>(labels, s, k, tc, tw, mu0, mu, contour, weight); break;
    default: make_targets_cpu_typed<int64_t>(labels, s, k, tc, tw, mu0, mu, contour, weight); break;
  }
  return {contour, weight};
}

at::Tensor boundary_map_meta(const at::Tensor& labels, int64_t num_classes) {
  check_labels_meta(labels, num_classes, kBoundaryOp);
  c10::SymDimVector sizes(labels.sym_sizes().begin(), labels.sym_sizes().end());
  sizes.insert(sizes.begin() + 1, c10::SymInt(num_classes - 1));
  return at::empty_symint(sizes, labels.options().dtype(at::kBool));
}

std::tuple<at::Tensor, at::Tensor> make_targets_meta(const at::Tensor& labels, int64_t num_classes,
                                                     double sigma_contour, double sigma_weight, double mu0,
                                                     at::ArrayRef<double> mu, bool /*check_labels*/) {
  check_labels_meta(labels, num_classes, kTargetsOp);
  check_params(num_classes, sigma_contour, sigma_weight, mu0, mu, kTargetsOp);
  const auto opts = labels.options().dtype(at::kFloat);
  return {at::empty_symint(labels.sym_sizes(), opts), at::empty_symint(labels.sym_sizes(), opts)};
}

#ifdef HMEDN_WITH_CUDA
int label_code(at::ScalarType t) {
  switch (t) {
    case at::kByte: return HMEDN_LABEL_U8;
    case at::kShort: return HMEDN_LABEL_I16;
    case at::kInt: return HMEDN_LABEL_I32;
    default: return HMEDN_LABEL_I64;
  }
}

void check_cuda(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

at::Tensor boundary_map_cuda(const at::Tensor& labels_in, int64_t num_classes) {
  const Shape s = check_labels(labels_in, num_classes, kBoundaryOp);
  TORCH_CHECK_VALUE(s.n <= 65535, kBoundaryOp, ": the CUDA kernel takes at most 65535 samples, got ", num(s.n));
  const c10::cuda::CUDAGuard guard(labels_in.device());
  const at::Tensor labels = labels_in.contiguous();
  at::Tensor out = at::empty(boundary_sizes(labels, num_classes), labels.options().dtype(at::kBool));
  at::Tensor flag = at::zeros({1}, labels.options().dtype(at::kInt));
  check_cuda(hmedn_boundary_map_cuda(labels.data_ptr(), label_code(labels.scalar_type()), s.n, s.d, s.h, s.w,
                                     static_cast<int>(num_classes), out.data_ptr<bool>(), flag.data_ptr<int>(),
                                     at::cuda::getCurrentCUDAStream()),
             kBoundaryOp);
  if (flag.item<int>() != 0) fail_label_range(labels, num_classes, kBoundaryOp);
  return out;
}

std::tuple<at::Tensor, at::Tensor> make_targets_cuda(const at::Tensor& labels_in, int64_t num_classes,
                                                     double sigma_contour, double sigma_weight, double mu0,
                                                     at::ArrayRef<double> mu, bool check_labels_flag) {
  const Shape s = check_labels(labels_in, num_classes, kTargetsOp);
  check_params(num_classes, sigma_contour, sigma_weight, mu0, mu, kTargetsOp);
  TORCH_CHECK_VALUE(s.n <= 65535, kTargetsOp, ": the CUDA kernels take at most 65535 samples, got ", num(s.n));
  TORCH_CHECK_VALUE(s.d * s.h * s.w <= INT32_MAX, kTargetsOp,
                    ": the CUDA kernels take samples of fewer than 2^31 voxels, got ", num(s.d * s.h * s.w),
                    "; use the cpu backend");
  const std::vector<float> tc = gaussian_half_taps(sigma_contour), tw = gaussian_half_taps(sigma_weight);
  const int max_radius = hmedn::targets::kMaxRadius;
  TORCH_CHECK_VALUE(static_cast<int>(std::max(tc.size(), tw.size())) - 1 <= max_radius, kTargetsOp,
                    ": the CUDA kernels take Gaussian radii int(4 sigma + 0.5) <= ", num(int64_t{max_radius}),
                    " (sigma < 32); got sigma_contour=", num(sigma_contour), ", sigma_weight=", num(sigma_weight),
                    "; use the cpu backend");
  const std::vector<float> mu_f(mu.begin(), mu.end());
  TORCH_CHECK_VALUE(num_channels(mu) == 2 || num_classes - 1 <= hmedn::targets::kMaxClassWeights, kTargetsOp,
                    ": the CUDA kernels take at most ", num(int64_t{hmedn::targets::kMaxClassWeights}),
                    " different per-class weights mu; got ", num(static_cast<int64_t>(mu.size())));

  const c10::cuda::CUDAGuard guard(labels_in.device());
  const at::Tensor labels = labels_in.contiguous();
  const auto opts = labels.options().dtype(at::kFloat);
  at::Tensor contour = at::empty(labels.sizes(), opts), weight = at::empty(labels.sizes(), opts);
  at::Tensor flag = check_labels_flag ? at::zeros({1}, labels.options().dtype(at::kInt)) : at::Tensor();
  hmedn_targets_args args{};
  args.labels = labels.data_ptr();
  args.label_dtype = label_code(labels.scalar_type());
  args.batch = s.n;
  args.depth = s.d;
  args.height = s.h;
  args.width = s.w;
  args.spatial_dims = s.spatial_dims;
  args.num_classes = static_cast<int>(num_classes);
  args.taps_contour = tc.data();
  args.radius_contour = static_cast<int>(tc.size()) - 1;
  args.taps_weight = tw.data();
  args.radius_weight = static_cast<int>(tw.size()) - 1;
  args.mu0 = static_cast<float>(mu0);
  args.mu = mu_f.data();
  args.contour = contour.data_ptr<float>();
  args.weight = weight.data_ptr<float>();
  const size_t bytes = hmedn_targets_cuda_workspace_bytes(&args);
  at::Tensor ws = at::empty({static_cast<int64_t>(bytes)}, labels.options().dtype(at::kByte));
  args.workspace = ws.data_ptr();
  args.error_flag = check_labels_flag ? flag.data_ptr<int>() : nullptr;
  const cudaError_t err = hmedn_targets_cuda(&args, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK_VALUE(err != cudaErrorInvalidValue, kTargetsOp,
                    ": arguments outside the CUDA kernels' limits (an axis too long for the launch grid, or a Gaussian "
                    "tile larger than the device's shared memory for sigma_contour=", num(sigma_contour),
                    ", sigma_weight=", num(sigma_weight), "); use the cpu backend");
  check_cuda(err, kTargetsOp);
  if (check_labels_flag && flag.item<int>() != 0) fail_label_range(labels, num_classes, kTargetsOp);
  return {contour, weight};
}
#endif

}  // namespace

TORCH_LIBRARY(hmedn_fast, m) {
  m.def("boundary_map(Tensor labels, int num_classes) -> Tensor");
  m.def(
      "make_targets(Tensor labels, int num_classes, float sigma_contour, float sigma_weight, float mu0, "
      "float[] mu, bool check_labels=True) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(hmedn_fast, CPU, m) {
  m.impl("boundary_map", &boundary_map_cpu);
  m.impl("make_targets", &make_targets_cpu);
}

TORCH_LIBRARY_IMPL(hmedn_fast, Meta, m) {
  m.impl("boundary_map", &boundary_map_meta);
  m.impl("make_targets", &make_targets_meta);
}

#ifdef HMEDN_WITH_CUDA
TORCH_LIBRARY_IMPL(hmedn_fast, CUDA, m) {
  m.impl("boundary_map", &boundary_map_cuda);
  m.impl("make_targets", &make_targets_cuda);
}
#endif
