// Binding of the tensor-core 3x3x3 convolution (kernels/conv3x3.cu) as hmedn_fast._C.conv3x3_mma_ (forward, input
// gradient) and conv3x3_mma_wgrad_ (weight gradient): checks the tensors against the kernels' contract, then launches
// them on the current stream. The Python wrapper (hmedn_fast/ops/conv_mma.py) packs the weight and allocates the
// outputs.
#ifdef HMEDN_WITH_CUDA
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/utils/pybind.h>  // at::Tensor <-> torch.Tensor casters

#include <optional>
#include <string>

#include "conv3x3.cuh"

namespace hmedn {
namespace {

// Numbers in messages go through std::to_string, never streamed (see csrc/targets.cpp: a wrong locale facet).
std::string shape_str(at::IntArrayRef sizes) {
  std::string out = "(";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + ")";
}

// Stride between consecutive voxels of an (N, 32, D, H, W) tensor with channels innermost and the voxels of
// each sample at one stride, else -1.
int64_t voxel_stride_of(const at::Tensor& t) {
  if (t.stride(1) != 1) return -1;
  const int64_t v = t.stride(4);
  if (t.stride(3) != v * t.size(4) || t.stride(2) != t.stride(3) * t.size(3)) return -1;
  return v;
}

void check_volume(const char* op, const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK_VALUE(t.dim() == 5 && t.size(1) == 32, op, ": ", name, " must be (N, 32, D, H, W), got ",
                    shape_str(t.sizes()));
  TORCH_CHECK_TYPE(t.scalar_type() == like.scalar_type(), op, ": ", name, " must have x's dtype");
  TORCH_CHECK_VALUE(t.device() == like.device(), op, ": ", name, " must be on x's device");
  TORCH_CHECK_VALUE(voxel_stride_of(t) >= 32, op, ": ", name,
                    " must have channels innermost (channels-last, or a channel slice of a channels-last tensor)");
}

// The checks both ops make: x (the volume read at shifted positions), a second volume of its shape (out / grad) and
// the dilation.
void check_volumes(const char* op, const at::Tensor& x, const at::Tensor& other, const char* other_name,
                   int64_t dilation) {
  TORCH_CHECK_VALUE(x.is_cuda(), op, ": x must be a CUDA tensor");
  TORCH_CHECK_TYPE(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf, op,
                   ": x must be bfloat16 or float16, got ", c10::toString(x.scalar_type()));
  check_volume(op, x, "x", x);
  check_volume(op, other, other_name, x);
  TORCH_CHECK_VALUE(other.sizes() == x.sizes(), op, ": ", other_name, " must have x's shape ", shape_str(x.sizes()),
                    ", got ", shape_str(other.sizes()));
  const int max_d = hmedn_conv3x3_max_dilation();
  TORCH_CHECK_VALUE(dilation >= 1 && dilation <= max_d, op, ": dilation must be in [1, ", std::to_string(max_d),
                    "], got ", std::to_string(dilation));
}

// The launch arguments both ops share, from x and the dilation.
template <typename Args>
void fill_volume(Args& a, const at::Tensor& x, int64_t dilation) {
  a.x = x.data_ptr();
  a.batch = x.size(0);
  a.depth = x.size(2);
  a.height = x.size(3);
  a.width = x.size(4);
  a.x_sample_stride = x.stride(0);
  a.x_voxel_stride = voxel_stride_of(x);
  a.dilation = static_cast<int>(dilation);
  a.dtype = x.scalar_type() == at::kBFloat16 ? HMEDN_CONV_BF16 : HMEDN_CONV_FP16;
}

void check_launch(const char* op, cudaError_t err, const char* contract) {
  TORCH_CHECK_VALUE(err != cudaErrorInvalidValue, op, ": tensors outside the kernel's contract (", contract, ")");
  TORCH_CHECK_VALUE(err != cudaErrorNoKernelImageForDevice, op, ": this build has no image of the kernel for this GPU (the "
                    "column kernel, tile_rows 8, exists in sm_90a images only)");
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

void conv3x3_mma_(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& out, int64_t dilation,
                  bool flip_taps, bool accumulate, const std::optional<at::Tensor>& stats, int64_t tile_rows) {
  constexpr const char* op = "conv3x3_mma_";
  check_volumes(op, x, out, "out", dilation);
  TORCH_CHECK_VALUE(weight.sizes() == at::IntArrayRef({27, 32, 32}) && weight.is_contiguous(), op,
                    ": weight must be the packed contiguous (27, 32, 32) weight");
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), op, ": weight must have x's dtype");
  TORCH_CHECK_VALUE(weight.device() == x.device(), op, ": weight must be on x's device");
  const c10::cuda::CUDAGuard guard(x.device());
  hmedn_conv3x3_args a{};
  fill_volume(a, x, dilation);
  a.weight = weight.data_ptr();
  a.y = out.data_ptr();
  a.y_sample_stride = out.stride(0);
  a.y_voxel_stride = voxel_stride_of(out);
  a.flip_taps = flip_taps ? 1 : 0;
  a.accumulate = accumulate ? 1 : 0;
  TORCH_CHECK_VALUE(tile_rows == 8 || tile_rows == 16 || tile_rows == 32, op, ": tile_rows must be 8, 16 or 32, got ",
                    std::to_string(tile_rows));
  a.tile_rows = static_cast<int>(tile_rows);
  a.multiprocessors = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;  // torch's cached properties
  if (stats.has_value()) {
    const int64_t tiles = x.size(2) * (x.size(3) / tile_rows) * (x.size(4) / 16);
    TORCH_CHECK_VALUE(!accumulate && x.size(3) % tile_rows == 0 && x.size(4) % 16 == 0, op,
                      ": stats need H a multiple of tile_rows, W a multiple of 16 and no accumulate");
    TORCH_CHECK_VALUE(stats->sizes() == at::IntArrayRef({x.size(0), tiles, 2, 32}) && stats->is_contiguous() &&
                          stats->scalar_type() == at::kFloat && stats->device() == x.device(),
                      op, ": stats must be a contiguous float32 (N, D * H / tile_rows * W / 16, 2, 32) tensor on "
                      "x's device");
    a.stats = stats->data_ptr<float>();
  }
  check_launch(op, hmedn_conv3x3_cuda(&a, c10::cuda::getCurrentCUDAStream()),
               "16-byte aligned x and weight, voxel strides multiples of 8 for x and 2 for out, batch and depth <= "
               "65535");
}

void conv3x3_mma_wgrad_(const at::Tensor& x, const at::Tensor& grad, const at::Tensor& part, int64_t dilation) {
  constexpr const char* op = "conv3x3_mma_wgrad_";
  check_volumes(op, x, grad, "grad", dilation);
  TORCH_CHECK_VALUE(part.dim() == 4 && part.size(0) >= 1 && part.size(0) <= 65535 && part.size(1) == 27 &&
                        part.size(2) == 32 && part.size(3) == 32 && part.is_contiguous() &&
                        part.scalar_type() == at::kFloat && part.device() == x.device(),
                    op, ": part must be a contiguous float32 (splits, 27, 32, 32) tensor on x's device, "
                    "1 <= splits <= 65535");
  const c10::cuda::CUDAGuard guard(x.device());
  hmedn_conv3x3_wgrad_args a{};
  fill_volume(a, x, dilation);
  a.grad = grad.data_ptr();
  a.part = part.data_ptr<float>();
  a.grad_sample_stride = grad.stride(0);
  a.grad_voxel_stride = voxel_stride_of(grad);
  a.splits = static_cast<int>(part.size(0));
  check_launch(op, hmedn_conv3x3_wgrad_cuda(&a, c10::cuda::getCurrentCUDAStream()),
               "16-byte aligned x and grad, voxel strides multiples of 8");
}

// query() != 0 with `device` current (the launcher's queries answer for the current device).
template <int (*query)()>
bool on_device(int64_t device) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  return query() != 0;
}

}  // namespace

void bind_conv3x3(pybind11::module_& m) {
  m.def("conv3x3_mma_", &conv3x3_mma_, pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("out"),
        pybind11::arg("dilation"), pybind11::arg("flip_taps"), pybind11::arg("accumulate") = false,
        pybind11::arg("stats") = pybind11::none(), pybind11::arg("tile_rows") = 16,
        "Tensor-core 3x3x3 'same' convolution of 32 -> 32 channels into out (kernels/conv3x3.cu); weight packed "
        "(27 taps, 32 out, 32 in); flip_taps: tap t uses packed tap 26 - t (the input gradient); accumulate: "
        "out += the convolution (one rounding of the float32 sum); stats: None or a float32 (N, D * H / tile_rows * "
        "W / 16, 2, 32) tensor receiving each tile_rows x 16 tile's per-channel mean and M2 of the rounded outputs; "
        "tile_rows: 8 (the column kernel, sm_90a), 16 or 32, the height of each block's output tile.");
  m.def("conv3x3_mma_wgrad_", &conv3x3_mma_wgrad_, pybind11::arg("x"), pybind11::arg("grad"), pybind11::arg("part"),
        pybind11::arg("dilation"),
        "Weight gradient of conv3x3_mma_'s convolution as per-split partial sums part (splits, 27 taps, 32 out, 32 in).");
  m.def("conv3x3_mma_max_dilation", &hmedn_conv3x3_max_dilation, "Largest dilation conv3x3_mma_ takes.");
  m.def("conv3x3_mma_column_runs_on", on_device<hmedn_conv3x3_column_runs_on_current_device>, pybind11::arg("device"),
        "Whether the build has the column kernel (tile_rows 8) for this CUDA device.");
  m.def("conv3x3_mma_runs_on", on_device<hmedn_conv3x3_runs_on_current_device>, pybind11::arg("device"),
        "Whether the build has kernel images this CUDA device can run.");
}

}  // namespace hmedn
#endif  // HMEDN_WITH_CUDA
