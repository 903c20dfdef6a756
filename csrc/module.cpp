// Python module entry of hmedn_fast._C. The ops themselves register with torch (TORCH_LIBRARY in the other
// csrc/*.cpp files) when this shared library is loaded; they are reached as torch.ops.hmedn_fast.*.
#include <pybind11/pybind11.h>

namespace hmedn {
void bind_launch_key(pybind11::module_& m);  // csrc/launch_key.cpp
#ifdef HMEDN_WITH_CUDA
void bind_fused_loss(pybind11::module_& m);  // csrc/fused_loss.cpp
void bind_conv3x3(pybind11::module_& m);     // csrc/conv3x3.cpp
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hmedn_fast compiled ops (registered under torch.ops.hmedn_fast)";
  m.def(
      "with_cuda",
      []() {
#ifdef HMEDN_WITH_CUDA
        return true;
#else
        return false;
#endif
      },
      "True when the extension was compiled with the CUDA kernels of kernels/.");
  hmedn::bind_launch_key(m);
#ifdef HMEDN_WITH_CUDA
  hmedn::bind_fused_loss(m);
  hmedn::bind_conv3x3(m);
#endif
}
