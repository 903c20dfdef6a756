// Triton's specialisation of one kernel argument as a key byte, shared by FastLauncher's launch key
// (csrc/launch_key.cpp) and the fused loss's direct launches (csrc/fused_loss.cpp): two arguments with equal bytes
// run one compiled binary.
#pragma once

#include <ATen/core/Tensor.h>

#include <climits>
#include <cstdint>

namespace hmedn {

inline bool fits_int32(int64_t v) { return v >= INT_MIN && v <= INT_MAX; }

// ints: equal to 1 (a constexpr for Triton), divisible by 16, 32-bit
inline char int_key(int64_t v) {
  return static_cast<char>((v == 1) | (((v & 15) == 0) << 1) | (fits_int32(v) << 2));
}

// tensors (pointers): dtype and 16-byte alignment of the data pointer
inline char tensor_key(const at::Tensor& t) {
  const auto ptr = reinterpret_cast<std::uintptr_t>(t.data_ptr());
  return static_cast<char>(static_cast<int>(t.scalar_type()) * 2 + ((ptr & 15) == 0));
}

}  // namespace hmedn
