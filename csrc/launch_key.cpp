// FastLauncher's per-launch key (hmedn_fast/ops/triton/launch.py), in C++: the Python loop over a kernel's ~40
// arguments cost ~13 us per launch on the development CPU (this: 0.5 us), about as much as Triton's own launcher call.
//
// launch_key(args) -> (key: bytes, run_args: tuple). Same classification as launch._python_args_key, whose
// docstring and the module's give the rules: per argument one or two bytes (None 'N', bools 'T'/'F', ints 'i' and
// a byte of flags {== 1, divisible by 16, 32-bit}, floats 'f', tensors 't' and a byte of dtype and 16-byte pointer
// alignment); run_args has every CUDA tensor replaced by its data pointer (an int), everything else unchanged.
#include <pybind11/pybind11.h>
#include <torch/csrc/autograd/python_variable.h>

#include <string>

#include "launch_key.h"

namespace py = pybind11;

namespace hmedn {

py::tuple launch_key(const py::tuple& args) {
  const Py_ssize_t n = PyTuple_GET_SIZE(args.ptr());
  std::string key;
  key.reserve(2 * static_cast<size_t>(n));
  py::tuple run(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* a = PyTuple_GET_ITEM(args.ptr(), i);
    PyObject* out = nullptr;  // a new reference when the argument is replaced
    if (a == Py_None) {
      key += 'N';
    } else if (PyBool_Check(a)) {
      key += a == Py_True ? 'T' : 'F';
    } else if (PyLong_CheckExact(a)) {
      int overflow = 0;
      const long long v = PyLong_AsLongLongAndOverflow(a, &overflow);
      if (overflow != 0) {
        throw py::value_error("FastLauncher: kernel argument " + std::to_string(i) + " does not fit in 64 bits");
      }
      key += 'i';
      key += int_key(v);
    } else if (PyFloat_CheckExact(a)) {
      key += 'f';
    } else if (THPVariable_Check(a)) {
      const at::Tensor& t = THPVariable_Unpack(a);
      key += 't';
      key += tensor_key(t);
      if (t.is_cuda()) {
        out = PyLong_FromUnsignedLongLong(reinterpret_cast<std::uintptr_t>(t.data_ptr()));
        if (out == nullptr) throw py::error_already_set();
      }
    } else {
      throw py::type_error(std::string("FastLauncher: unsupported kernel argument type ") + Py_TYPE(a)->tp_name);
    }
    if (out == nullptr) {
      Py_INCREF(a);
      out = a;
    }
    PyTuple_SET_ITEM(run.ptr(), i, out);  // steals the reference
  }
  return py::make_tuple(py::bytes(key), std::move(run));
}

void bind_launch_key(py::module_& m) {
  m.def("launch_key", &launch_key, py::arg("args"),
        "(key bytes, launch arguments) of a Triton kernel's runtime arguments for FastLauncher's cache.");
}

}  // namespace hmedn
