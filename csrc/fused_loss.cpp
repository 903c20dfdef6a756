// Eager fast path of the fused difficulty-guided loss (hmedn_fast/ops/triton/loss.py) on CUDA: the forward's
// argument handling, the launches of the Triton-compiled kernels and the backward node in C++, so that a
// loss.backward() costs the host about what a bare autograd round trip does (the Python path: an autograd.Function,
// ~40 launch arguments built in Python, and a Python backward run on the autograd thread under the GIL).
//
// fused_loss(logits, labels, weight, contour_logits, contour_target, alpha, class_weight, ignore_index, reduction,
// return_parts, check_values) serves the common case only: plain CUDA tensors on one device, fp32/fp16/bf16 logits
// whose spatial dims flatten to one stride, contiguous labels / maps / class weights that need no gradient, reduction
// "mean" (without ignore_index: that divisor is a device count) or "sum", outside CUDA-graph capture and without
// torch function / dispatch modes. Anything else returns None and the Python path (hmedn_fast.ops.loss) handles the
// call, including every error message, so this file reports no input errors of its own. With check_values the
// label range and NaN checks run here too (values_look_valid); if they find anything, the Python path takes the call
// and raises.
//
// Kernels: the first launch of each specialisation goes through a Python callback (fused_loss_setup) that launches
// it with Triton (compiling it once) and returns the compiled function's handle, block size, shared memory and
// parameter types; later launches with the same key (device, constexprs, and per argument Triton's specialisation:
// dtype and 16-byte alignment of pointers, ints equal to 1 / divisible by 16 / 32-bit) call cuLaunchKernel
// directly. A handle is only kept when its parameter list, read back from the driver (cuFuncGetParamInfo), is the
// one this file passes (the kernel's runtime arguments, then 8-byte scratch pointers Triton leaves null); otherwise
// every launch of that key goes through the callback, which is correct, only slower.
#ifdef HMEDN_WITH_CUDA
#include <ATen/PythonTorchFunctionTLS.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda.h>
#include <cuda_runtime_api.h>
#include <dlfcn.h>
#include <pybind11/pybind11.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/python_variable.h>

#include <climits>
#include <cmath>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <variant>
#include <vector>

#include "launch_key.h"

namespace py = pybind11;

namespace hmedn {
namespace {

// ------------------------------------------------------------------------------------------ driver and config
struct Driver {
  decltype(&cuLaunchKernel) launch = nullptr;
  decltype(&cuFuncGetParamInfo) param_info = nullptr;
  decltype(&cuGetErrorString) error_string = nullptr;
};

const Driver& driver() {  // the CUDA driver is loaded by torch already; no link-time dependency on libcuda
  static const Driver d = [] {
    Driver r;
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
    if (lib == nullptr) lib = dlopen("libcuda.so.1", RTLD_NOW);
    if (lib != nullptr) {
      r.launch = reinterpret_cast<decltype(r.launch)>(dlsym(lib, "cuLaunchKernel"));
      r.param_info = reinterpret_cast<decltype(r.param_info)>(dlsym(lib, "cuFuncGetParamInfo"));
      r.error_string = reinterpret_cast<decltype(r.error_string)>(dlsym(lib, "cuGetErrorString"));
    }
    return r;
  }();
  return d;
}

struct Config {  // hmedn_fast/ops/triton/loss.py's launch constants, handed over by fused_loss_setup
  PyObject* compile = nullptr;  // callback(kind, args, constexprs, grid) -> (function, threads, shared, codes)
  int64_t block = 0, num_warps = 0, programs_per_sm = 0, stats_block = 0, rescale_programs = 0;
};
Config config;

int multiprocessors(int device) {
  static std::mutex lock;
  static std::map<int, int> cache;
  std::lock_guard<std::mutex> guard(lock);
  auto it = cache.find(device);
  if (it != cache.end()) return it->second;
  int count = 0;
  if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || count <= 0) {
    throw std::runtime_error("hmedn_fast fused loss: cannot read the multiprocessor count of cuda:" +
                             std::to_string(device));
  }
  return cache[device] = count;
}

// ------------------------------------------------------------------------------------------ kernel arguments
using Arg = std::variant<at::Tensor, int64_t, double>;

struct Launch {
  int kind = 0;  // 0 the loss kernel, 1 the rescale kernel (index into the callback's kernel list)
  std::vector<Arg> args;
  struct Constexpr {
    const char* name;
    int64_t value;  // bools as 0 / 1
    bool is_bool;
  };
  std::vector<Constexpr> constexprs;
  int64_t grid = 1;

  void constexpr_int(const char* name, int64_t v) { constexprs.push_back({name, v, false}); }
  void constexpr_bool(const char* name, bool v) { constexprs.push_back({name, v ? 1 : 0, true}); }

  // Per runtime argument: Triton's parameter type ('p' pointer, 'i' int32, 'l' int64, 'f' fp32; an int equal to 1
  // is a constexpr, no parameter) and the key bytes of its specialisation.
  void describe(int device, std::string& key, std::string& codes) const {
    key.clear();
    key += static_cast<char>(kind);
    key += static_cast<char>(device);
    for (const Constexpr& c : constexprs) key.append(reinterpret_cast<const char*>(&c.value), sizeof c.value);
    for (const Arg& a : args) {
      if (const auto* t = std::get_if<at::Tensor>(&a)) {
        key += 't';
        key += tensor_key(*t);
        codes += 'p';
      } else if (const auto* i = std::get_if<int64_t>(&a)) {
        key += 'i';
        key += int_key(*i);
        if (*i != 1) codes += fits_int32(*i) ? 'i' : 'l';
      } else {
        key += 'f';
        codes += 'f';
      }
    }
  }
};

struct Compiled {
  bool direct = false;  // launch with cuLaunchKernel; else every launch goes through the callback
  CUfunction function = nullptr;
  unsigned threads = 0, shared = 0;
  int extra = 0;  // trailing scratch-pointer parameters, passed as null
};

std::mutex cache_lock;
std::unordered_map<std::string, Compiled> cache;

std::string error_name(CUresult r) {
  const char* s = nullptr;
  if (driver().error_string != nullptr) driver().error_string(r, &s);
  return s != nullptr ? s : "CUresult " + std::to_string(static_cast<int>(r));
}

// Is the driver's parameter list of `function` exactly `codes` followed by 8-byte pointers?
bool parameters_match(CUfunction function, const std::string& codes, int& extra) {
  if (driver().param_info == nullptr || driver().launch == nullptr) return false;
  size_t count = 0;
  for (;; ++count) {
    size_t offset = 0, size = 0;
    if (driver().param_info(function, count, &offset, &size) != CUDA_SUCCESS) break;
    const size_t want = count < codes.size() ? ((codes[count] == 'i' || codes[count] == 'f') ? 4 : 8) : 8;
    if (size != want) return false;
  }
  if (count < codes.size() || count > codes.size() + 2) return false;
  extra = static_cast<int>(count - codes.size());
  return true;
}

py::object to_python(const Arg& a) {
  if (const auto* t = std::get_if<at::Tensor>(&a)) return py::reinterpret_steal<py::object>(THPVariable_Wrap(*t));
  if (const auto* i = std::get_if<int64_t>(&a)) return py::int_(*i);
  return py::float_(std::get<double>(a));
}

// Launch through the Python callback (Triton's own launch); remember the compiled kernel when it can run directly.
void launch_via_callback(const Launch& l, const std::string& key, const std::string& codes, bool remember) {
  py::gil_scoped_acquire gil;
  py::tuple args(l.args.size());
  for (size_t i = 0; i < l.args.size(); ++i) args[i] = to_python(l.args[i]);
  py::dict constexprs;
  for (const Launch::Constexpr& c : l.constexprs) {
    constexprs[c.name] = c.is_bool ? py::object(py::bool_(c.value != 0)) : py::object(py::int_(c.value));
  }
  py::handle compile(config.compile);
  py::tuple info = compile(l.kind, args, constexprs, l.grid);
  if (!remember) return;
  Compiled c;
  const auto got = info[3].cast<std::string>();
  c.function = reinterpret_cast<CUfunction>(info[0].cast<std::uintptr_t>());
  c.threads = info[1].cast<unsigned>();
  c.shared = info[2].cast<unsigned>();
  c.direct = got == codes && c.threads > 0 && c.function != nullptr && parameters_match(c.function, codes, c.extra);
  std::lock_guard<std::mutex> guard(cache_lock);
  cache.emplace(key, c);
}

void run(const Launch& l, int device, CUstream stream) {
  std::string key, codes;
  l.describe(device, key, codes);
  Compiled c;
  bool found = false;
  {
    std::lock_guard<std::mutex> guard(cache_lock);
    auto it = cache.find(key);
    if (it != cache.end()) {
      c = it->second;
      found = true;
    }
  }
  if (!c.direct) {
    launch_via_callback(l, key, codes, !found);
    return;
  }
  std::vector<uint64_t> slots(codes.size() + c.extra, 0);  // scratch pointers stay null
  std::vector<void*> params(slots.size());
  size_t p = 0;
  for (const Arg& a : l.args) {
    if (const auto* t = std::get_if<at::Tensor>(&a)) {
      slots[p] = reinterpret_cast<std::uintptr_t>(t->data_ptr());
    } else if (const auto* i = std::get_if<int64_t>(&a)) {
      if (*i == 1) continue;  // a constexpr of the compiled kernel
      if (codes[p] == 'i') {
        const int32_t v = static_cast<int32_t>(*i);
        std::memcpy(&slots[p], &v, sizeof v);
      } else {
        std::memcpy(&slots[p], &*i, sizeof(int64_t));
      }
    } else {
      const float v = static_cast<float>(std::get<double>(a));
      std::memcpy(&slots[p], &v, sizeof v);
    }
    ++p;
  }
  for (size_t j = 0; j < slots.size(); ++j) params[j] = &slots[j];
  const CUresult r = driver().launch(c.function, static_cast<unsigned>(l.grid), 1, 1, c.threads, 1, 1, c.shared,
                                     stream, params.data(), nullptr);
  if (r != CUDA_SUCCESS) throw std::runtime_error("hmedn_fast fused loss: kernel launch failed: " + error_name(r));
}

// ------------------------------------------------------------------------------------------ tensor helpers
const at::Tensor* plain_tensor(py::handle h) {  // an exact torch.Tensor with storage (no subclass, no wrapper)
  if (!THPVariable_CheckExact(h.ptr())) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(h.ptr());
  return t.defined() && t.has_storage() && t.layout() == at::kStrided ? &t : nullptr;
}

// Stride of dims first.. flattened to one index, -1 when they do not flatten (hmedn_fast.ops.strides).
int64_t flat_spatial_stride(const at::Tensor& t, int64_t first) {
  if (t.is_contiguous()) return 1;
  int64_t last = -1;
  for (int64_t d = first; d < t.dim(); ++d) {
    if (t.size(d) == 1) continue;
    if (last >= 0 && t.stride(last) != t.stride(d) * t.size(d)) return -1;
    last = d;
  }
  return last >= 0 ? t.stride(last) : 1;
}

bool is_float(const at::Tensor& t, bool with_double) {
  const auto s = t.scalar_type();
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || (with_double && s == at::kDouble);
}

// A per-voxel map: (N, *full) or (N, 1, *full), contiguous, no gradient; nullptr when absent (None).
bool map_ok(const at::Tensor* t, const at::Device& device, int64_t n, at::IntArrayRef full) {
  if (t->device() != device || !is_float(*t, true) || t->requires_grad() || !t->is_contiguous()) return false;
  const auto s = t->sizes();
  const int64_t skip = static_cast<int64_t>(s.size()) - static_cast<int64_t>(full.size());
  if ((skip != 1 && skip != 2) || s[0] != n || (skip == 2 && s[1] != 1)) return false;
  return s.slice(skip).equals(full);
}

// The loss kernel's int32 ticket, reset to 0 by its last program: one per device and stream (launches on a stream run
// in order), made once and used with the GIL held. Never freed: no CUDA memory is released after the driver shuts down.
at::Tensor ticket_counter(const at::Tensor& like, CUstream stream) {
  static auto* counters = new std::map<std::pair<int, CUstream>, at::Tensor>();
  const auto key = std::make_pair(static_cast<int>(like.get_device()), stream);
  auto it = counters->find(key);
  if (it != counters->end()) return it->second;
  return (*counters)[key] = at::zeros({1}, like.options().dtype(at::kInt));
}

// ------------------------------------------------------------------------------------------ backward
// Autograd nodes are held by std::shared_ptr up to torch 2.12 and by c10::intrusive_ptr from torch 2.13 on.
using NodePtr = decltype(torch::autograd::Edge{}.function);

template <class T>
auto make_node() {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<torch::autograd::Node>>) {
    return std::make_shared<T>();
  } else {
    return c10::make_intrusive<T>();
  }
}

struct FusedLossBackward : public torch::autograd::Node {
  at::Tensor grad_logits, grad_contour;  // the forward's gradients of L, rescaled in place here
  double alpha = 1.0;
  bool has_contour = false, used = false;

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    bool any = false;
    for (const auto& g : grads) any = any || g.defined();
    if (!any) return {at::Tensor(), at::Tensor()};
    if (used) {
      throw std::runtime_error(
          "the one-pass fused loss cannot be backpropagated twice (its gradients are rescaled in place); use "
          "one_pass=False with retain_graph");
    }
    used = true;
    const double base = alpha != 0.0 ? alpha : 1.0;  // the contour buffer holds base * d/dc L_r
    const at::Tensor& gl = grad_logits;
    const at::Tensor& gc = grad_contour;
    auto upstream = [&](size_t i) -> std::pair<bool, at::Tensor> {
      if (i < grads.size() && grads[i].defined()) return {true, grads[i].to(at::kFloat).contiguous()};
      return {false, gl};
    };
    const auto [has0, g0] = upstream(0);
    const auto [has1, g1] = upstream(1);
    const auto [has2, g2] = upstream(2);
    Launch l;
    l.kind = 1;
    const int64_t most = std::max(gl.numel(), gc.numel());
    l.grid = std::max<int64_t>(1, std::min((most + config.stats_block - 1) / config.stats_block,
                                           config.rescale_programs));
    l.args = {gl, gl.numel(), gc, gc.numel(), g0, g1, g2, alpha / base, 1.0 / base};
    l.constexpr_bool("HAS_G0", has0);
    l.constexpr_bool("HAS_G1", has1);
    l.constexpr_bool("HAS_G2", has2);
    l.constexpr_int("BLOCK", config.stats_block);
    const int device = static_cast<int>(gl.get_device());
    c10::cuda::CUDAGuard guard(device);
    run(l, device, c10::cuda::getCurrentCUDAStream(device).stream());
    torch::autograd::variable_list out{gl, has_contour ? gc : at::Tensor()};
    grad_logits.reset();
    grad_contour.reset();
    return out;
  }

  void release_variables() override {
    grad_logits.reset();
    grad_contour.reset();
  }

  std::string name() const override { return "FusedDifficultyGuidedLossBackward"; }
};

// ------------------------------------------------------------------------------------------ forward
// check_values: every label in [0, K) and no NaN in the logits or contour logits (a NaN sum: also +inf with -inf),
// with one host synchronisation (the GIL released meanwhile). False sends the call to the Python path, whose checks
// raise the precise error (an ignore_index label, or an infinite-sum false alarm, passes there).
bool values_look_valid(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor* cl, int64_t k) {
  const auto [low, high] = at::aminmax(labels);
  at::Tensor bad = low.lt(0).logical_or_(high.ge(k)).logical_or_(at::isnan(logits.sum(at::kFloat)));
  if (cl != nullptr) bad.logical_or_(at::isnan(cl->sum(at::kFloat)));
  py::gil_scoped_release no_gil;
  return !bad.item<bool>();
}

py::object fused_loss(py::handle logits_h, py::handle labels_h, py::handle weight_h, py::handle cl_h,
                      py::handle ct_h, py::handle alpha_h, py::handle cw_h, py::handle ignore_h,
                      py::handle reduction_h, py::handle return_parts_h, py::handle check_values_h) {
  const py::object none = py::none();
  if (config.compile == nullptr) return none;
  const at::Tensor* logits_p = plain_tensor(logits_h);
  if (logits_p == nullptr || !logits_p->is_cuda()) return none;
  const at::Tensor& logits = *logits_p;
  if (at::impl::torch_function_mode_enabled() || c10::impl::TorchDispatchModeTLS::any_modes_set()) return none;

  // options
  bool mean;
  if (PyUnicode_Check(reduction_h.ptr()) && PyUnicode_CompareWithASCIIString(reduction_h.ptr(), "mean") == 0) {
    mean = true;
  } else if (PyUnicode_Check(reduction_h.ptr()) && PyUnicode_CompareWithASCIIString(reduction_h.ptr(), "sum") == 0) {
    mean = false;
  } else {
    return none;  // "none" (and anything invalid) takes the Python path
  }
  if (return_parts_h.ptr() != Py_True && return_parts_h.ptr() != Py_False) return none;
  if (check_values_h.ptr() != Py_True && check_values_h.ptr() != Py_False) return none;
  const bool return_parts = return_parts_h.ptr() == Py_True;
  double alpha;
  if (PyFloat_CheckExact(alpha_h.ptr())) {
    alpha = PyFloat_AS_DOUBLE(alpha_h.ptr());
  } else if (PyLong_CheckExact(alpha_h.ptr())) {
    int overflow = 0;
    const long long v = PyLong_AsLongLongAndOverflow(alpha_h.ptr(), &overflow);
    if (overflow != 0) return none;
    alpha = static_cast<double>(v);
  } else {
    return none;
  }
  if (!std::isfinite(alpha) || alpha < 0) return none;

  // logits and labels
  const at::Device device = logits.device();
  const int64_t nd = logits.dim();
  if ((nd != 4 && nd != 5) || !is_float(logits, false)) return none;
  const int64_t n = logits.size(0), k = logits.size(1);
  if (n < 1 || k < 2 || logits.numel() == 0) return none;
  const at::Tensor* labels_p = plain_tensor(labels_h);
  if (labels_p == nullptr) return none;
  const at::Tensor& labels = *labels_p;
  const auto ls = labels.scalar_type();
  if (labels.device() != device || labels.dim() != nd - 1 || labels.size(0) != n || !labels.is_contiguous() ||
      (ls != at::kByte && ls != at::kShort && ls != at::kInt && ls != at::kLong)) {
    return none;
  }
  const auto low = logits.sizes().slice(2);
  const auto full = labels.sizes().slice(1);
  int64_t factor[3] = {1, 1, 1}, lo[3] = {1, 1, 1}, fu[3] = {1, 1, 1};
  const int64_t pad = 3 - static_cast<int64_t>(low.size());
  for (size_t d = 0; d < low.size(); ++d) {
    if (full[d] < low[d] || full[d] % low[d] != 0) return none;
    lo[pad + d] = low[d];
    fu[pad + d] = full[d];
    factor[pad + d] = full[d] / low[d];
  }
  if (labels.numel() / n * k >= (int64_t{1} << 31)) return none;  // 32-bit indices within a sample
  const int64_t ls_stride = flat_spatial_stride(logits, 2);
  if (ls_stride < 0) return none;

  // optional inputs
  auto optional = [&](py::handle h, const at::Tensor*& out) {
    out = nullptr;
    if (h.is_none()) return true;
    out = plain_tensor(h);
    return out != nullptr;
  };
  const at::Tensor *weight, *cl, *ct, *cw;
  if (!optional(weight_h, weight) || !optional(cl_h, cl) || !optional(ct_h, ct) || !optional(cw_h, cw)) return none;
  if (weight != nullptr && !map_ok(weight, device, n, full)) return none;
  if ((cl == nullptr) != (ct == nullptr)) return none;
  int64_t c_first = 0;
  if (cl != nullptr) {
    if (!map_ok(ct, device, n, full)) return none;
    const auto s = cl->sizes();
    c_first = cl->dim() - static_cast<int64_t>(low.size());
    if (cl->device() != device || !is_float(*cl, true) || (c_first != 1 && c_first != 2) || s[0] != n ||
        (c_first == 2 && s[1] != 1) || !s.slice(c_first).equals(low) || flat_spatial_stride(*cl, c_first) < 0) {
      return none;
    }
  }
  if (cw != nullptr && (cw->device() != device || !is_float(*cw, true) || cw->requires_grad() || cw->dim() != 1 ||
                        cw->size(0) != k || !cw->is_contiguous())) {
    return none;
  }
  bool has_ignore = false;
  int64_t ignore = 0;
  if (!ignore_h.is_none()) {
    if (!PyLong_CheckExact(ignore_h.ptr())) return none;
    int overflow = 0;
    ignore = PyLong_AsLongLongAndOverflow(ignore_h.ptr(), &overflow);
    if (overflow != 0) return none;
    const int64_t lo_v = ls == at::kByte ? 0 : ls == at::kShort ? SHRT_MIN : ls == at::kInt ? INT_MIN : LLONG_MIN;
    const int64_t hi_v = ls == at::kByte ? 255 : ls == at::kShort ? SHRT_MAX : ls == at::kInt ? INT_MAX : LLONG_MAX;
    has_ignore = ignore >= lo_v && ignore <= hi_v;  // else no label can equal it
    if (!has_ignore) ignore = 0;
    if (has_ignore && mean) return none;  // the divisor is then a device count (Python path)
  }
  const bool has_contour = cl != nullptr;
  const bool write_grads =
      torch::autograd::GradMode::is_enabled() && (logits.requires_grad() || (has_contour && cl->requires_grad()));

  c10::cuda::CUDAGuard guard(device);
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) return none;
  const CUstream stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  if (check_values_h.ptr() == Py_True && !values_look_valid(logits, labels, cl, k)) return none;

  // buffers (as hmedn_fast/ops/triton/loss.py's _forward and _launch)
  at::Tensor out = at::empty({4}, logits.options().dtype(at::kFloat));
  at::Tensor gl, gc;
  if (write_grads) {
    gl = at::empty_like(logits);
    gc = has_contour ? at::empty_like(*cl) : at::empty({0}, logits.options());
  }
  const at::Tensor& glogits = write_grads ? gl : logits;
  const int64_t children = factor[0] * factor[1] * factor[2];
  int64_t kp2 = 1;
  while (kp2 < k) kp2 <<= 1;
  int64_t block = std::min(config.block, 4096 / kp2);
  if (children > 1) {
    int64_t cp2 = 1;
    while (cp2 < children) cp2 <<= 1;
    block = std::max<int64_t>(64, block / cp2);
  }
  const int64_t s_low = lo[0] * lo[1] * lo[2];
  const int64_t tiles_s = (s_low + block - 1) / block;
  Launch l;
  l.kind = 0;
  l.grid = std::min(tiles_s * n, config.programs_per_sm * multiprocessors(device.index()));
  at::Tensor partials = at::empty({2 * l.grid}, logits.options().dtype(at::kFloat));
  const at::Tensor& dummy = logits;
  const at::Tensor* gcl = write_grads ? (has_contour ? &gc : nullptr) : cl;
  l.args = {logits, labels, weight ? *weight : dummy, cw ? *cw : dummy, cl ? *cl : dummy, ct ? *ct : dummy,
            dummy, dummy, dummy, partials, ticket_counter(logits, stream), out, glogits, gcl ? *gcl : dummy,
            s_low, lo[1] * lo[2], lo[2], labels.numel() / n, fu[1], fu[2], tiles_s, tiles_s * n,
            logits.stride(0), logits.stride(1), ls_stride,
            glogits.stride(0), glogits.stride(1), flat_spatial_stride(glogits, 2)};
  if (has_contour) {
    l.args.insert(l.args.end(), {cl->stride(0), flat_spatial_stride(*cl, c_first), gcl->stride(0),
                                 flat_spatial_stride(*gcl, c_first)});
  } else {
    l.args.insert(l.args.end(), {int64_t{0}, int64_t{0}, int64_t{0}, int64_t{0}});
  }
  const double divisor = mean ? static_cast<double>(labels.numel()) : 1.0;
  l.args.insert(l.args.end(), {ignore, alpha, divisor, alpha != 0.0 ? alpha : 1.0});
  l.constexpr_int("K", k);
  l.constexpr_bool("FAST_EXP", true);
  l.constexpr_int("FD", factor[0]);
  l.constexpr_int("FH", factor[1]);
  l.constexpr_int("FW", factor[2]);
  l.constexpr_bool("HAS_WEIGHT", weight != nullptr);
  l.constexpr_bool("HAS_CW", cw != nullptr);
  l.constexpr_bool("HAS_IGNORE", has_ignore);
  l.constexpr_bool("HAS_CONTOUR", has_contour);
  l.constexpr_int("LOSS", 1);
  l.constexpr_bool("GRAD", write_grads);
  l.constexpr_bool("GOUT", false);
  l.constexpr_bool("NORM_PTR", false);
  l.constexpr_bool("GSCALE", false);
  l.constexpr_int("BLOCK", block);
  l.constexpr_int("num_warps", config.num_warps);
  run(l, device.index(), stream);

  // outputs: L (and L_s, L_r) as plain tensors on out's storage, with the backward node when gradients are wanted
  const int parts = return_parts ? 3 : 1;
  std::vector<at::Tensor> results(parts);
  {
    at::AutoDispatchBelowADInplaceOrView no_view_tracking;  // no autograd view bookkeeping: out stays internal
    for (int i = 0; i < parts; ++i) results[i] = out.select(0, i);
  }
  if (write_grads) {
    auto node = make_node<FusedLossBackward>();
    node->grad_logits = gl;
    node->grad_contour = gc;
    node->alpha = alpha;
    node->has_contour = has_contour;
    node->set_next_edges(torch::autograd::collect_next_edges(logits, cl ? *cl : at::Tensor()));
    const NodePtr base(node);
    for (auto& r : results) torch::autograd::set_history(r, base);
  }
  if (!return_parts) return py::reinterpret_steal<py::object>(THPVariable_Wrap(results[0]));
  return py::make_tuple(py::reinterpret_steal<py::object>(THPVariable_Wrap(results[0])),
                        py::reinterpret_steal<py::object>(THPVariable_Wrap(results[1])),
                        py::reinterpret_steal<py::object>(THPVariable_Wrap(results[2])));
}

void fused_loss_setup(py::object compile, int64_t block, int64_t num_warps, int64_t programs_per_sm,
                      int64_t stats_block, int64_t rescale_programs) {
  if (config.compile == nullptr) config.compile = compile.release().ptr();  // kept for the process's lifetime
  config.block = block;
  config.num_warps = num_warps;
  config.programs_per_sm = programs_per_sm;
  config.stats_block = stats_block;
  config.rescale_programs = rescale_programs;
}

py::dict fused_loss_kernels() {  // for tests and benchmarks: how each remembered specialisation launches
  py::dict out;
  std::lock_guard<std::mutex> guard(cache_lock);
  for (const auto& [key, c] : cache) out[py::bytes(key)] = py::bool_(c.direct);
  return out;
}

}  // namespace

void bind_fused_loss(py::module_& m) {
  m.def("fused_loss", &fused_loss,
        "Eager CUDA fast path of the fused loss: the loss (or (L, L_s, L_r)), or None when the call needs the "
        "Python path (see csrc/fused_loss.cpp).");
  m.def("fused_loss_setup", &fused_loss_setup, py::arg("compile"), py::arg("block"), py::arg("num_warps"),
        py::arg("programs_per_sm"), py::arg("stats_block"), py::arg("rescale_programs"),
        "Register the callback that launches and compiles a kernel with Triton, and the launch constants.");
  m.def("fused_loss_kernels", &fused_loss_kernels,
        "{key: launched directly} for every kernel specialisation the fast path has seen.");
}

}  // namespace hmedn
#endif  // HMEDN_WITH_CUDA
