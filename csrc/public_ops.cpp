// The compiled entry of the public ops fusedaccum::<op> on CPU (and CUDA, in a CUDA build):
// when the backend chosen for the tensors' device is the extension's own (cpp on CPU, cuda on
// CUDA), the call goes straight to fusedaccum_C::<op>, with no Python on the way; otherwise
// to fusedaccum::_<op>_python, the Python kernel that picks triton or torch (and reads
// FUSEDACCUM_BACKEND). A refusal of the compiled kernel is explained by the op's Python checks
// (fusedaccum::_<op>_check), which raise the ValueError that says what is wrong.
//
// The choice mirrors fusedaccum.dispatch.backend_for: the backend set_backend() forced (pushed
// here) first, then FUSEDACCUM_BACKEND, then the default. Any other name goes to Python, which
// runs it or says why it cannot.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/stack.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>

#include "public_ops.h"

namespace fusedaccum {
namespace {

enum Backend : int { kNone = 0, kCpp = 1, kCuda = 2, kOther = 3 };
std::atomic<int> forced{kNone};

Backend backend_named(const std::string& name) {
  return name.empty() ? kNone : name == "cpp" ? kCpp : name == "cuda" ? kCuda : kOther;
}

bool compiled_kernel_chosen(c10::DeviceType device) {
  int b = forced.load(std::memory_order_relaxed);
  if (b == kNone) {
    const char* env = std::getenv("FUSEDACCUM_BACKEND");
    b = backend_named(env == nullptr ? "" : env);
  }
  if (b == kNone) return true;  // the default on CPU is cpp; on CUDA, cuda once this kernel exists
  return (b == kCpp && device == c10::DeviceType::CPU) || (b == kCuda && device == c10::DeviceType::CUDA);
}

struct Handles {
  c10::OperatorHandle compiled, python, check;
};

// Found once per op, on its first call (after Python registered its _python/_check ops).
const Handles& handles_of(const c10::OperatorHandle& op) {
  static std::mutex mutex;
  static std::map<std::string, Handles> found;
  const std::string& name = op.schema().name();  // fusedaccum::<op>
  std::lock_guard<std::mutex> lock(mutex);
  auto it = found.find(name);
  if (it == found.end()) {
    const std::string short_name = name.substr(name.find("::") + 2);
    auto& dispatcher = c10::Dispatcher::singleton();
    it = found.emplace(name, Handles{dispatcher.findSchemaOrThrow(("fusedaccum_C::" + short_name).c_str(), ""),
                                     dispatcher.findSchemaOrThrow(("fusedaccum::_" + short_name + "_python").c_str(), ""),
                                     dispatcher.findSchemaOrThrow(("fusedaccum::_" + short_name + "_check").c_str(), "")})
             .first;
  }
  return it->second;  // std::map never moves its elements
}

void public_op_entry(const c10::OperatorHandle& op, c10::DispatchKeySet /*keys*/, torch::jit::Stack* stack) {
  const size_t num_args = op.schema().arguments().size();
  const at::Tensor& first = (stack->end() - num_args)->toTensor();
  const Handles& h = handles_of(op);
  if (!compiled_kernel_chosen(first.device().type())) {
    h.python.callBoxed(stack);
    return;
  }
  // The arguments again, should the kernel refuse them (a list is one IValue: cheap to copy).
  torch::jit::Stack saved(stack->end() - num_args, stack->end());
  try {
    // Below autograd: the compiled op has no autograd kernel, and the boxed fallback would
    // walk every tensor again.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    h.compiled.callBoxed(stack);
  } catch (const c10::Error&) {
    h.check.callBoxed(&saved);  // raises the ValueError that says what is wrong
    throw;                      // the checks passed: the kernel's own message
  }
}

}  // namespace

torch::CppFunction public_op_kernel() { return torch::CppFunction::makeFromBoxedFunction<&public_op_entry>(); }

void set_forced_backend(const std::string& name) { forced.store(backend_named(name)); }

TORCH_LIBRARY_IMPL(fusedaccum, CPU, m) {
  for (const char* op : kPublicOps) m.impl(op, public_op_kernel());
}

}  // namespace fusedaccum
