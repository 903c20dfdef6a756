// Checks the index math shared by the CPU and CUDA targets kernels (kernels/targets.cuh) against
// definitions written out here: scipy's 'reflect' extension, the face-neighbour boundary, scipy's taps.
// Built by CMakeLists.txt (no CUDA needed); exits non-zero on the first failure.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "targets.cuh"

namespace {

int failures = 0;

void expect(bool ok, const char* what, long long a, long long b) {
  if (!ok) {
    std::fprintf(stderr, "FAIL %s (%lld, %lld)\n", what, a, b);
    ++failures;
  }
}

// 'reflect' as repeated mirroring: walk from 0 to i, bouncing off -0.5 and n - 0.5.
int64_t reflect_by_walking(int64_t i, int64_t n) {
  int64_t pos = 0, dir = i >= 0 ? 1 : -1, steps = i >= 0 ? i : -i;
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t next = pos + dir;
    if (next < 0 || next >= n) dir = -dir;  // the mirror repeats the edge sample: stay, turn around
    else pos = next;
  }
  return pos;
}

void test_reflect() {
  for (int64_t n = 1; n <= 9; ++n)
    for (int64_t i = -70; i <= 70; ++i)
      expect(hmedn::targets::reflect_index(i, n) == reflect_by_walking(i, n), "reflect_index", i, n);
}

void test_boundary() {
  std::mt19937 rng(7);
  const int64_t D = 4, H = 5, W = 6;
  const int K = 3;
  std::vector<int32_t> lab(D * H * W);
  for (int trial = 0; trial < 50; ++trial) {
    for (auto& v : lab) v = static_cast<int32_t>(rng() % K);
    for (int64_t d = 0; d < D; ++d)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t w = 0; w < W; ++w) {
          const int32_t k = lab[(d * H + h) * W + w];
          bool edge = false;
          const int64_t nb[6][3] = {{d - 1, h, w}, {d + 1, h, w}, {d, h - 1, w},
                                    {d, h + 1, w}, {d, h, w - 1}, {d, h, w + 1}};
          for (const auto& q : nb)
            if (q[0] >= 0 && q[0] < D && q[1] >= 0 && q[1] < H && q[2] >= 0 && q[2] < W)
              edge = edge || lab[(q[0] * H + q[1]) * W + q[2]] != k;
          bool bad = false;
          const int got = hmedn::targets::boundary_class(lab.data(), d, h, w, D, H, W, K, &bad);
          expect(!bad && got == (k > 0 && edge ? k : 0), "boundary_class", got, k);
        }
  }
  bool bad = false;
  lab[0] = K;
  hmedn::targets::boundary_class(lab.data(), 0, 0, 0, D, H, W, K, &bad);
  expect(bad, "out-of-range label flagged", lab[0], K);
}

void test_taps() {
  for (const double sigma : {0.6, 2.0, 3.7, 8.0}) {
    const std::vector<float> taps = hmedn::targets::gaussian_half_taps(sigma);
    const int r = static_cast<int>(taps.size()) - 1;
    expect(r == static_cast<int>(4.0 * sigma + 0.5), "radius int(4 sigma + 0.5)", r, 0);
    double total = taps[0];
    for (int j = 1; j <= r; ++j) total += 2.0 * taps[j];
    expect(std::fabs(total - 1.0) < 1e-6, "taps sum to 1", static_cast<long long>(total * 1e9), 0);
    for (int j = 0; j <= r; ++j) {
      const double want = std::exp(-0.5 * j * j / (sigma * sigma));
      expect(std::fabs(taps[j] / taps[0] - want) < 1e-6, "Gaussian shape", j, r);
    }
  }
}

}  // namespace

int main() {
  test_reflect();
  test_boundary();
  test_taps();
  if (failures == 0) std::printf("test_targets_math: all passed\n");
  return failures == 0 ? 0 : 1;
}
