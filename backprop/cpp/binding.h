// The Python binding of the kernels: backprop/cpp/__init__.py (binding_source) generates a translation
// unit of its own, compiled beside the ops': each bound function declared as its .cpp file defines it,
// then this, then the module, with one bind<&fn>(m, "name") per m.impl("name", fn) line.
//
// Why: at the notebook's scale a call through torch.ops (its schema parse of the arguments, the
// dispatcher, the boxed stack) costs ~1 us more than the C++ function it ends in. The bound function
// calls that function straight away where torch.ops would call it with the same values: exactly typed
// arguments (a Tensor or Parameter, int, float, bool, or None for an optional), tensors that dispatch
// straight to the CompositeImplicitAutograd kernel (a CPU tensor; no Python, functorch, negative or
// conjugate key; no dispatch or torch function mode, no profiler or other RecordFunction callback),
// positional. Any other call is handed to torch.ops' own callable, so what a call answers or raises is
// torch.ops' by construction. Without the GIL, as torch.ops runs it: the large shapes run for seconds on
// torch's threads. Its own vectorcall function, not pybind11's m.def: its argument conversion cost
// ~0.8 us (py::args) or converts what torch.ops refuses (a bool to an int, None to a bool).
#pragma once

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/record_function.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/python_variable.h>  // THPVariable_*, torch's pybind11, casters and error macros

#include <optional>
#include <tuple>
#include <utility>

namespace backprop_cpp::binding {

namespace py = pybind11;

// ADInplaceOrView, BackendSelect and AutocastCPU fall through for every op: with only these keys the
// dispatcher runs the CPU (or AutogradCPU) kernel, the CompositeImplicitAutograd one, fn
inline const c10::DispatchKeySet kDirect({c10::DispatchKey::CPU, c10::DispatchKey::AutogradCPU,
                                          c10::DispatchKey::ADInplaceOrView, c10::DispatchKey::BackendSelect,
                                          c10::DispatchKey::AutocastCPU});

// From<T>::get(o, v): o as the C++ parameter type T in v, or false (torch.ops then converts or refuses it)
template <typename T>
struct From;

template <>
struct From<at::Tensor> {
  static bool get(PyObject* o, at::Tensor& v) {
    if (!THPVariable_CheckExact(o)) return false;  // a subclass may have a __torch_function__
    v = THPVariable_Unpack(o);
    const auto tls = c10::impl::tls_local_dispatch_key_set();
    return kDirect.isSupersetOf((v.key_set() | tls.included_) - tls.excluded_);
  }
};

template <>
struct From<int64_t> {
  static bool get(PyObject* o, int64_t& v) {
    int overflow = 0;
    return PyLong_CheckExact(o) && (v = PyLong_AsLongLongAndOverflow(o, &overflow), overflow == 0);
  }
};

template <>
struct From<double> {
  static bool get(PyObject* o, double& v) { return PyFloat_CheckExact(o) && (v = PyFloat_AS_DOUBLE(o), true); }
};

template <>
struct From<bool> {
  static bool get(PyObject* o, bool& v) { return (o == Py_True || o == Py_False) && (v = o == Py_True, true); }
};

template <typename T>
struct From<std::optional<T>> {
  static bool get(PyObject* o, std::optional<T>& v) {
    if (o == Py_None) return v.reset(), true;
    T value;
    return From<T>::get(o, value) && (v = std::move(value), true);
  }
};

template <typename R, typename... A>
constexpr size_t arity(R (*)(A...)) { return sizeof...(A); }

// torch's error handling as torch.ops': a c10 error raises its Python type, a TORCH_WARN warns
template <auto fn, typename R, typename... A, size_t... I>
PyObject* call(PyObject* dispatched, PyObject* const* args, Py_ssize_t n, PyObject* kwnames, R (*)(A...),
               std::index_sequence<I...>) {
  HANDLE_TH_ERRORS
  std::tuple<std::decay_t<A>...> values;
  if (kwnames == nullptr && n == Py_ssize_t(sizeof...(A)) && !at::impl::torch_function_mode_enabled() &&
      !at::hasCallbacks() && (From<std::decay_t<A>>::get(args[I], std::get<I>(values)) && ...)) {
    std::optional<R> found;
    {
      py::gil_scoped_release unlocked;
      found.emplace(fn(std::get<I>(values)...));
    }
    return py::cast(std::move(*found)).release().ptr();  // torch's casters: a list, a Tensor or None
  }
  return PyObject_Vectorcall(dispatched, args, n, kwnames);
  END_HANDLE_TH_ERRORS
}

template <auto fn>
PyObject* vectorcall(PyObject* dispatched, PyObject* const* args, Py_ssize_t n, PyObject* kwnames) {
  return call<fn>(dispatched, args, n, kwnames, fn, std::make_index_sequence<arity(fn)>{});
}

// m.<name>: fn, its self torch.ops.backprop_cpp.<name>.default's callable (the calls it hands on)
template <auto fn>
void bind(py::module_& m, const char* name) {
  static PyMethodDef def{name, reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&vectorcall<fn>)),
                         METH_FASTCALL | METH_KEYWORDS, nullptr};
  py::object dispatched = py::module_::import("torch").attr("ops").attr("backprop_cpp").attr(name)
                              .attr("default").attr("_op");
  PyObject* f = PyCFunction_NewEx(&def, dispatched.ptr(), m.attr("__name__").ptr());
  if (f == nullptr) throw py::error_already_set();
  m.add_object(name, py::reinterpret_steal<py::object>(f));
}

}  // namespace backprop_cpp::binding
