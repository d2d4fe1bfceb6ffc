// fusedaccum._C.reconcile_probe: the per-parameter checks of FusedOptimizer._reconcile
// (fusedaccum/optim.py), one pass in C++ over an arena's parameters.
//
// Every step compares what torch shows the user (the parameters, optimizer.state) with the
// arena's copy. In Python that costs about 0.5 µs per parameter, which for thousands of small
// parameters is most of the boundary's host time; here it is a few tens of nanoseconds. The
// probe only says where to look: the Python side (_reconcile) runs its own checks on the
// indices named here and acts on them. Where the probe cannot be sure (a tensor subclass, a
// state that is not a dict or defaultdict) it answers None and Python probes itself
// (optim._probe_in_python, the reference this is tested against). It may name more state
// entries than have changed (an entry that is not a plain dict), never fewer.
#include <torch/csrc/Dtype.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include <cstdint>
#include <vector>

namespace fusedaccum {
namespace {

namespace py = pybind11;

// A plain tensor or nn.Parameter (not a subclass, whose data_ptr / _version Python may override).
const at::Tensor* plain_tensor(PyObject* obj) {
  return THPVariable_CheckExact(obj) ? &THPVariable_Unpack(obj) : nullptr;
}

// optimizer.state as torch.optim makes it (a defaultdict) or a plain dict, whose get() is the
// dict's own lookup (a subclass may override it: Python probes then).
bool plain_dict(PyObject* obj) {
  // Kept for the process's life (released: no teardown order to get wrong).
  static PyTypeObject* const defaultdict = reinterpret_cast<PyTypeObject*>(
      py::object(py::module_::import("collections").attr("defaultdict")).release().ptr());
  return PyDict_CheckExact(obj) || Py_TYPE(obj) == defaultdict;
}

// Whether optimizer.state[p] (`entry`, a dict) still holds every object the arena published
// for p (`published`, a dict), by identity: optim._shows.
bool shows(PyObject* entry, PyObject* published) {
  PyObject *key, *value;
  Py_ssize_t pos = 0;
  while (PyDict_Next(published, &pos, &key, &value)) {
    PyObject* now = PyDict_GetItemWithError(entry, key);  // borrowed
    if (now == nullptr && PyErr_Occurred()) throw py::error_already_set();
    if (now != value) return false;
  }
  return true;
}

// (params_in_place, changed_versions, changed_states), or None where Python must probe:
//  params_in_place   every parameter still has the data pointer and dtype the arena recorded
//  changed_versions  (versions given: the arena keeps fp32 masters) parameters whose _version moved
//  changed_states    parameters whose optimizer.state entry may differ from what was published
py::object reconcile_probe(const py::object& params, const py::object& data_ptrs, const py::object& dtype,
                           const py::object& versions, const py::object& state, const py::object& published) {
  const bool with_versions = !versions.is_none();
  auto list_of = [](const py::object& obj, Py_ssize_t n) {
    return PyList_Check(obj.ptr()) && PyList_GET_SIZE(obj.ptr()) == n;
  };
  if (!PyList_Check(params.ptr())) return py::none();
  const Py_ssize_t n = PyList_GET_SIZE(params.ptr());
  if (!THPDtype_Check(dtype.ptr()) || !plain_dict(state.ptr()) || !list_of(data_ptrs, n) || !list_of(published, n) ||
      (with_versions && !list_of(versions, n)))
    return py::none();
  const at::ScalarType want = reinterpret_cast<THPDtype*>(dtype.ptr())->scalar_type;
  std::vector<const at::Tensor*> tensors(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    tensors[i] = plain_tensor(PyList_GET_ITEM(params.ptr(), i));
    if (tensors[i] == nullptr) return py::none();
  }

  bool in_place = true;
  for (Py_ssize_t i = 0; i < n && in_place; ++i) {
    const at::Tensor& p = *tensors[i];
    void* recorded = PyLong_AsVoidPtr(PyList_GET_ITEM(data_ptrs.ptr(), i));
    if (recorded == nullptr && PyErr_Occurred()) throw py::error_already_set();
    in_place = p.scalar_type() == want && p.has_storage() && p.data_ptr() == recorded;
  }

  py::list changed_versions;
  if (with_versions) {
    for (Py_ssize_t i = 0; i < n; ++i) {
      const int64_t seen = PyLong_AsLongLong(PyList_GET_ITEM(versions.ptr(), i));
      if (seen == -1 && PyErr_Occurred()) throw py::error_already_set();
      if (static_cast<int64_t>(tensors[i]->_version()) != seen) changed_versions.append(i);
    }
  }

  py::list changed_states;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* entry = PyDict_GetItemWithError(state.ptr(), PyList_GET_ITEM(params.ptr(), i));  // borrowed
    if (entry == nullptr && PyErr_Occurred()) throw py::error_already_set();
    PyObject* pub = PyList_GET_ITEM(published.ptr(), i);
    bool same;
    if (entry != nullptr && !PyDict_CheckExact(entry)) {
      same = false;  // something else set by hand: Python decides
    } else if (pub == Py_None) {
      same = entry == nullptr || PyDict_GET_SIZE(entry) == 0;  // no state yet, none set by hand
    } else if (!PyDict_CheckExact(pub)) {
      same = false;
    } else if (entry == nullptr) {
      same = PyDict_GET_SIZE(pub) == 0;
    } else {
      same = shows(entry, pub);
    }
    if (!same) changed_states.append(i);
  }
  return py::make_tuple(in_place, changed_versions, changed_states);
}

}  // namespace

void bind_reconcile(py::module_& m) {
  m.def("reconcile_probe", &reconcile_probe, py::arg("params"), py::arg("data_ptrs"), py::arg("dtype"),
        py::arg("versions"), py::arg("state"), py::arg("published"),
        "FusedOptimizer._reconcile's per-parameter checks in one pass: (params_in_place, changed_versions, "
        "changed_states), or None where Python must check itself");
}

}  // namespace fusedaccum
