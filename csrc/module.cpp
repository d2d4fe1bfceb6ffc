// The Python module fusedaccum._C. Importing it loads this library, which registers the
// kernel ops (registration.cpp, cpu/, cuda/) and binds the accumulator's C++ hot path
// (window.cpp) and the optimizer's per-parameter checks before a step (reconcile.cpp).
#include <torch/extension.h>

#include "public_ops.h"

namespace fusedaccum {
void bind_window(pybind11::module_& m);
void bind_reconcile(pybind11::module_& m);
}

PYBIND11_MODULE(_C, m) {
  fusedaccum::bind_window(m);
  fusedaccum::bind_reconcile(m);
  m.def("_set_forced_backend", &fusedaccum::set_forced_backend,
        "fusedaccum.set_backend() tells the compiled entry of the public ops which backend is forced");
}
