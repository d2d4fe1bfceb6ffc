// fusedaccum._C.Window: the per-gradient hot path of fa.GradAccumulator, in C++.
//
// One Window per arena whose gradients the accumulator takes over. It hooks each parameter's
// AccumulateGrad node (a C++ post hook, as Megatron-LM's DDP hooks the grad accumulator), so
// that filing a gradient into its bucket, releasing p.grad and launching the fold when the
// bucket is full run without Python and without the GIL. The fold calls the compiled kernel
// (fusedaccum_C::accumulate) straight through the dispatcher's unboxed path; only when a
// Python backend is chosen (triton, torch) does it go through the public op.
//
// Python (fusedaccum/accumulator.py) keeps the window's logic: it sets the mode before each
// backward, reads `touched` at the step, and asks for the folds that happen outside backward.
// This file is the mechanics: per-parameter flags, buckets, and the fold of a list of
// gradients (first contribution of the window overwrites, later ones add).
//
// Locking: hooks of parameters on different devices can run on different autograd threads,
// so every entry point takes the window's mutex. Methods called from Python release the GIL
// first, so the order is always mutex, then GIL (a Python backend or the error messages).
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/extension.h>

#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace fusedaccum {
namespace {

namespace py = pybind11;
using torch::autograd::Node;
using torch::autograd::variable_list;
// std::shared_ptr<Node> up to torch 2.13, c10::intrusive_ptr<Node> after.
using NodePtr = decltype(torch::autograd::impl::grad_accumulator(std::declval<const torch::autograd::Variable&>()));

using AccumulateFn = void(const at::Tensor&, at::TensorList, at::IntArrayRef, double, bool,
                          const std::optional<at::Tensor>&, const std::optional<at::Tensor>&);

c10::TypedOperatorHandle<AccumulateFn> accumulate_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<AccumulateFn>();
}

class Window;

// Runs after AccumulateGrad has put the gradient in p.grad.
struct FoldHook : torch::autograd::FunctionPostHook {
  FoldHook(std::weak_ptr<Window> window, int64_t index) : window(std::move(window)), index(index) {}
  variable_list operator()(const variable_list& outputs, const variable_list& /*inputs*/) override;
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& /*args*/) const override {
    TORCH_CHECK(false,
                "fusedaccum's GradAccumulator does not run under compiled autograd (torch._dynamo.compiled_autograd): "
                "its gradient hooks are C++ hooks of the eager engine. Run backward without compiled autograd, or use "
                "the fusedaccum optimizer without a GradAccumulator (its step reads p.grad).");
  }
  std::weak_ptr<Window> window;
  int64_t index;
};

class Window : public std::enable_shared_from_this<Window> {
 public:
  // explain(kind, i) -> str builds the error messages (Python owns their wording);
  // take_back(i) -> bool has the arena take back parameter i when its data was replaced
  // (Arena.take_back: the same dtype, device and shape; it then aliases its slice again, at
  // the recorded address);
  // on_deferred() is called once per backward when a hidden gradient is recorded (swap-in),
  // so that Python queues its end-of-backward fold.
  Window(at::Tensor grad, std::vector<at::Tensor> params, std::vector<int64_t> offsets, int64_t bucket_numel,
         bool full, at::Tensor sumsq, at::Tensor found_inf, py::object explain, py::object take_back,
         py::object on_deferred)
      : grad_(std::move(grad)),
        params_(std::move(params)),
        offsets_(std::move(offsets)),
        full_(full),
        sumsq_(std::move(sumsq)),
        found_inf_(std::move(found_inf)),
        explain_(std::move(explain)),
        take_back_(std::move(take_back)),
        on_deferred_(std::move(on_deferred)),
        native_op_(accumulate_op("fusedaccum_C::accumulate")),
        public_op_(accumulate_op("fusedaccum::accumulate")) {
    const size_t n = params_.size();
    TORCH_CHECK(offsets_.size() == n, "Window: one offset per parameter");
    dtype_ = n ? params_[0].scalar_type() : at::kFloat;
    device_ = grad_.device();
    data_ptrs_.reserve(n);
    for (const at::Tensor& p : params_) data_ptrs_.push_back(p.data_ptr());
    touched_.assign(n, 0);
    touched_last_.assign(n, 0);
    fused_now_.assign(n, 0);
    zeroed_.assign(n, 0);
    external_writer_.assign(n, 0);
    hooked_.assign(n, 0);
    nodes_.resize(n);
    hook_keys_.assign(n, 0);
    int64_t size = 0;
    for (const at::Tensor& p : params_) {
      if (bucket_size_.empty() || size + p.numel() > bucket_numel) {
        bucket_size_.push_back(0);
        size = 0;
      }
      bucket_of_.push_back(static_cast<int64_t>(bucket_size_.size()) - 1);
      size += p.numel();
    }
    pending_.resize(bucket_size_.size());
  }

  ~Window() {
    remove_hooks_locked();
    // The last reference can go on an autograd thread (a hook's weak_ptr::lock): take the
    // GIL to drop the Python callables.
    if (Py_IsInitialized()) {
      py::gil_scoped_acquire gil;
      explain_ = py::object();
      take_back_ = py::object();
      on_deferred_ = py::object();
      fold_listener_ = py::object();
    }
  }

  // -- hooks ---------------------------------------------------------------------------

  // Hooks parameter i if it requires grad and is not hooked yet; returns whether it is hooked.
  bool hook(int64_t i) {
    std::lock_guard<std::mutex> lock(mutex_);
    const at::Tensor& p = params_.at(i);
    if (hooked_[i]) return true;
    if (!p.requires_grad()) return false;
    NodePtr node = torch::autograd::impl::grad_accumulator(p);
    TORCH_CHECK(node, "fusedaccum: parameter ", i, " has no gradient accumulator (is it a leaf?)");
    hook_keys_[i] = node->add_post_hook(std::make_unique<FoldHook>(weak_from_this(), i));
    nodes_[i] = std::move(node);  // the tensor holds its accumulator weakly: keep it alive
    stream_.reset();  // a node made on another stream than the others: follow_current_stream() redoes all
    hooked_[i] = 1;
    bucket_size_[bucket_of_[i]] += 1;
    return true;
  }

  // Hooks every parameter that requires grad and is not hooked yet (one that starts requiring
  // grad later is hooked at the next call).
  void hook_all() {
    if (all_hooked()) return;
    for (size_t i = 0; i < params_.size(); ++i) hook(static_cast<int64_t>(i));
  }

  void remove_hooks() {
    std::lock_guard<std::mutex> lock(mutex_);
    remove_hooks_locked();
  }

  // The engine runs an AccumulateGrad node, and syncs its input with it, on the stream the node
  // recorded when it was made. torch makes a fresh node at each forward, on the forward's
  // stream; ours live on (they hold the hooks), so they would keep the stream current when the
  // accumulator was built: a backward on any other stream would sync with that one, and a
  // CUDA graph capture would fail when it is the legacy default stream ("operation would make
  // the legacy stream depend on a capturing blocking stream"). Called before each backward we
  // run (and after each swap-in backward), this re-records the device's current stream, as a
  // fresh node would; a no-op while that stream stays the same. Never during a backward.
  void follow_current_stream() {
    if (device_.type() == c10::DeviceType::CPU) return;
    std::lock_guard<std::mutex> lock(mutex_);
    const c10::Stream now = c10::impl::VirtualGuardImpl(device_.type()).getStream(device_);
    if (stream_ == now) return;
    for (size_t i = 0; i < nodes_.size(); ++i) {
      if (!nodes_[i]) continue;
      nodes_[i]->clear_input_metadata();  // what AccumulateGrad's constructor records, again
      nodes_[i]->add_input_metadata(params_[i]);
    }
    stream_ = now;
  }

  // -- per micro-batch -------------------------------------------------------------------

  void set_mode(double scale, bool stats_now, bool in_backward, bool native) {
    std::lock_guard<std::mutex> lock(mutex_);
    scale_ = scale;
    stats_now_ = stats_now;
    in_backward_ = in_backward;
    native_ = native;
    std::fill(fused_now_.begin(), fused_now_.end(), 0);
  }

  void on_grad(int64_t i) {
    std::lock_guard<std::mutex> lock(mutex_);
    at::Tensor& p = params_[i];
    const at::Tensor& g = p.grad();
    const bool written = fused_now_[i];
    fused_now_[i] = 0;
    if (external_ && g.defined() && added_to_main_grad(p)) {
      // A layer wrote this gradient into p.main_grad itself (the Megatron-LM /
      // TransformerEngine convention) and handed autograd a placeholder: drop it.
      if (!in_backward_) fail("outside_backward", i, false);
      external_writer_[i] = 1;  // from now on its slice is zeroed at every window's start
      if (!touched_[i] && !zeroed_[i]) fail("stale_main_grad", i, false);
      unmeasure(i);
      touched_[i] = 1;
      zeroed_[i] = 0;
      p.mutable_grad() = at::Tensor();
      notify({i});
      return;
    }
    if (!g.defined()) {
      // The engine runs a parameter's AccumulateGrad node once per backward, after every
      // contribution to it, even when none returned a gradient: for a parameter that only fused
      // layers wrote, this is the moment its gradient is complete (data parallel counts it).
      if (written) notify({i});
      return;
    }
    if ((p.data_ptr() != data_ptrs_[i] || p.scalar_type() != dtype_) && !take_back(i)) fail("param", i, false);
    if (g.layout() != at::kStrided) fail("sparse", i, true);
    if (!full_) {
      deferred_.push_back(i);
      if (!deferred_signalled_) {
        deferred_signalled_ = true;
        py::gil_scoped_acquire gil;
        on_deferred_();
      }
      return;
    }
    if (!in_backward_) fail("outside_backward", i, false);
    const at::ScalarType t = g.scalar_type();
    if (!(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf) || g.device() != device_) fail("grad", i, true);
    at::Tensor taken = g;
    p.mutable_grad() = at::Tensor();
    const int64_t b = bucket_of_[i];
    pending_[b].emplace_back(i, std::move(taken));
    if (static_cast<int64_t>(pending_[b].size()) == bucket_size_[b]) flush(b);
  }

  // A fused layer (fusedaccum/modules.py) is about to write parameter i's gradient straight
  // into its slice of the arena: returns (whether it is the window's first contribution, so the
  // write overwrites; the fold scale). The parameter then steps, as if a gradient were folded.
  // The last micro-batch's norm cannot come from a kernel that writes without measuring, so the
  // parameter leaves the set measured by folds (touched_last) and the boundary's read pass
  // measures its final value; a square already counted by a fold of this micro-batch leaves the
  // sum first.
  std::tuple<bool, double> claim(int64_t i) {
    std::lock_guard<std::mutex> lock(mutex_);
    TORCH_CHECK(full_ && i >= 0 && i < static_cast<int64_t>(params_.size()), "Window.claim: not a full-path parameter");
    if (!in_backward_) fail("outside_backward", i, false);
    const bool first = !touched_[i];
    unmeasure(i);
    touched_[i] = 1;
    zeroed_[i] = 0;
    fused_now_[i] = 1;
    return {first, scale_};
  }

  // Megatron-LM / TransformerEngine interop (GradAccumulator(..., main_grad=True)): Python
  // points every p.main_grad at its slice and zeroes the arena once; such layers add into
  // main_grad (beta = 1 always), so a slice they write must start each window at zero.
  void set_external(bool on) {
    std::lock_guard<std::mutex> lock(mutex_);
    external_ = on;
    std::fill(zeroed_.begin(), zeroed_.end(), on ? 1 : 0);
  }

  void flush_all() {
    std::lock_guard<std::mutex> lock(mutex_);
    for (size_t b = 0; b < pending_.size(); ++b) {
      if (!pending_[b].empty()) flush(b);
    }
  }

  // Swap-in with hidden gradients: folds every p.grad recorded in this backward, then sets it
  // to None (after every other end-of-backward callback has read it).
  void fold_deferred() {
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<Item> items;
    std::vector<char> seen(params_.size(), 0);
    for (int64_t i : deferred_) {
      if (seen[i]) continue;
      seen[i] = 1;
      const at::Tensor& g = params_[i].grad();
      if (g.defined()) items.emplace_back(i, g);
    }
    deferred_.clear();
    deferred_signalled_ = false;
    fold(items);
    for (const Item& it : items) params_[it.first].mutable_grad() = at::Tensor();
  }

  // Folds every p.grad there is, leaving it in place (swap-in: gradients set by hand after the
  // last backward join the window and stay, as in torch).
  void fold_grads() {
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<Item> items;
    for (size_t i = 0; i < params_.size(); ++i) {
      const at::Tensor& g = params_[i].grad();
      if (g.defined()) items.emplace_back(static_cast<int64_t>(i), g);
    }
    fold(items);
  }

  void drop_deferred() {
    std::lock_guard<std::mutex> lock(mutex_);
    for (int64_t i : deferred_) params_[i].mutable_grad() = at::Tensor();
    deferred_.clear();
    deferred_signalled_ = false;
  }

  // Index of the first parameter with a p.grad, or -1 (the full path's check for gradients
  // that did not come through acc.backward()).
  int64_t first_grad() const {
    for (size_t i = 0; i < params_.size(); ++i) {
      if (params_[i].grad().defined()) return static_cast<int64_t>(i);
    }
    return -1;
  }

  void clear_grads() {
    for (at::Tensor& p : params_) p.mutable_grad() = at::Tensor();
  }

  // -- window state ------------------------------------------------------------------------

  void restart() {
    std::lock_guard<std::mutex> lock(mutex_);
    for (size_t i = 0; i < params_.size(); ++i) {
      if (external_writer_[i] && (touched_[i] || !zeroed_[i])) {
        at::AutoDispatchBelowADInplaceOrView below_autograd;
        grad_.narrow(0, offsets_[i], params_[i].numel()).zero_();
        zeroed_[i] = 1;
      }
    }
    std::fill(touched_.begin(), touched_.end(), 0);
    std::fill(touched_last_.begin(), touched_last_.end(), 0);
    std::fill(fused_now_.begin(), fused_now_.end(), 0);
    for (auto& p : pending_) p.clear();
    deferred_.clear();
    deferred_signalled_ = false;
  }

  // listener(indices) is called after each fold with the parameters it folded (Python's data
  // parallel path counts them per reduction bucket); None: no calls.
  void set_fold_listener(py::object listener) {
    std::lock_guard<std::mutex> lock(mutex_);
    py::gil_scoped_acquire gil;
    fold_listener_ = std::move(listener);
    has_listener_ = !fold_listener_.is_none();
  }

  std::vector<bool> touched() const { return {touched_.begin(), touched_.end()}; }
  std::vector<bool> touched_last() const { return {touched_last_.begin(), touched_last_.end()}; }
  std::vector<bool> hooked() const { return {hooked_.begin(), hooked_.end()}; }
  bool any_touched() const { return std::find(touched_.begin(), touched_.end(), 1) != touched_.end(); }
  bool all_hooked() const { return std::find(hooked_.begin(), hooked_.end(), 0) == hooked_.end(); }

  // A window restored from a checkpoint (last = false), or reopened as if every touched
  // parameter had been folded in the last micro-batch (last = true; the benchmark's re-timing).
  void set_touched(const std::vector<bool>& touched, bool last) {
    std::lock_guard<std::mutex> lock(mutex_);
    TORCH_CHECK(touched.size() == touched_.size(), "this accumulator state was saved for another arena");
    for (size_t i = 0; i < touched.size(); ++i) {
      touched_[i] = touched[i];
      touched_last_[i] = last && touched[i];
    }
  }

 private:
  using Item = std::pair<int64_t, at::Tensor>;

  bool take_back(int64_t i) {
    py::gil_scoped_acquire gil;
    return take_back_(i).cast<bool>();
  }

  [[noreturn]] void fail(const char* kind, int64_t i, bool value_error) {
    std::string message;
    {
      py::gil_scoped_acquire gil;
      message = explain_(kind, i).cast<std::string>();
    }
    if (value_error) TORCH_CHECK_VALUE(false, message);
    TORCH_CHECK(false, message);
  }

  void remove_hooks_locked() {
    for (size_t i = 0; i < nodes_.size(); ++i) {
      if (nodes_[i]) nodes_[i]->del_post_hook(hook_keys_[i]);
      nodes_[i] = nullptr;
      hooked_[i] = 0;
    }
  }

  void flush(size_t b) {
    std::vector<Item> items;
    items.swap(pending_[b]);
    // A parameter can contribute several times in one backward (a layer shared across
    // reentrant checkpoints): each later contribution is its own fold, never a second write
    // to the same slice within one launch.
    std::vector<char> seen(params_.size(), 0);
    while (!items.empty()) {
      std::vector<Item> now, later;
      for (Item& it : items) {
        (seen[it.first] ? later : now).push_back(std::move(it));
        seen[it.first] = 1;
      }
      fold(now);
      for (const Item& it : now) seen[it.first] = 0;
      items.swap(later);
    }
  }

  // First contribution of the window overwrites its slice, the others add.
  void fold(const std::vector<Item>& items) {
    if (items.empty()) return;
    // Straight to the CPU/CUDA kernel: an op without an autograd kernel otherwise goes through
    // the boxed autograd fallback, which packs every gradient into an IValue.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::optional<at::Tensor> sumsq, found_inf;
    if (stats_now_) {
      sumsq = sumsq_;
      found_inf = found_inf_;
      for (const Item& it : items) {
        if (touched_last_[it.first]) {  // folded before in this micro-batch: its old square leaves the sum
          const at::Tensor old = grad_.narrow(0, offsets_[it.first], params_[it.first].numel());
          sumsq_.sub_(old.to(at::kDouble).square().sum().to(at::kFloat));
        }
      }
    }
    for (const bool first : {true, false}) {
      std::vector<at::Tensor> grads;
      std::vector<int64_t> offsets;
      for (const Item& it : items) {
        if (static_cast<bool>(touched_[it.first]) == !first) {
          grads.push_back(it.second);
          offsets.push_back(offsets_[it.first]);
        }
      }
      if (grads.empty()) continue;
      const auto& op = native_ ? native_op_ : public_op_;
      op.call(grad_, grads, offsets, scale_, first, sumsq, found_inf);
    }
    for (const Item& it : items) {
      touched_[it.first] = 1;
      touched_last_[it.first] = stats_now_;
      zeroed_[it.first] = 0;
    }
    if (has_listener_) {
      std::vector<int64_t> indices;
      for (const Item& it : items) indices.push_back(it.first);
      notify(indices);
    }
  }

  // Parameter i's gradient was written without being measured: if a fold of this micro-batch
  // counted its square, that leaves the sum, and the boundary's read pass measures it instead.
  void unmeasure(int64_t i) {
    if (stats_now_ && touched_last_[i]) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      const at::Tensor old = grad_.narrow(0, offsets_[i], params_[i].numel());
      sumsq_.sub_(old.to(at::kDouble).square().sum().to(at::kFloat));
    }
    touched_last_[i] = 0;
  }

  // p.grad_added_to_main_grad, set to False again when it was True.
  bool added_to_main_grad(const at::Tensor& p) {
    py::gil_scoped_acquire gil;
    py::object obj = py::cast(p);
    if (!py::hasattr(obj, "grad_added_to_main_grad") || !obj.attr("grad_added_to_main_grad").cast<bool>()) return false;
    obj.attr("grad_added_to_main_grad") = false;
    return true;
  }

  void notify(const std::vector<int64_t>& indices) {
    if (!has_listener_) return;
    py::gil_scoped_acquire gil;
    fold_listener_(indices);
  }

  at::Tensor grad_;
  std::vector<at::Tensor> params_;
  std::vector<int64_t> offsets_;
  std::vector<const void*> data_ptrs_;
  at::ScalarType dtype_;
  at::Device device_{at::kCPU};
  bool full_;
  at::Tensor sumsq_, found_inf_;
  py::object explain_, take_back_, on_deferred_, fold_listener_ = py::none();
  bool has_listener_ = false;
  c10::TypedOperatorHandle<AccumulateFn> native_op_, public_op_;

  std::mutex mutex_;
  // fused_now_: claimed by a fused layer in this backward, its AccumulateGrad node not run yet.
  // zeroed_: the slice holds zeros (no write since it was last zeroed); external_writer_: a
  // layer has written this parameter's gradient through p.main_grad.
  std::vector<char> touched_, touched_last_, fused_now_, zeroed_, external_writer_, hooked_;
  bool external_ = false;
  std::vector<NodePtr> nodes_;
  std::optional<c10::Stream> stream_;  // the stream every node in nodes_ records, when known
  std::vector<uintptr_t> hook_keys_;
  std::vector<int64_t> bucket_of_, bucket_size_;
  std::vector<std::vector<Item>> pending_;
  std::vector<int64_t> deferred_;
  bool deferred_signalled_ = false;
  double scale_ = 1.0;
  bool stats_now_ = false, in_backward_ = false, native_ = true;
};

variable_list FoldHook::operator()(const variable_list& outputs, const variable_list& /*inputs*/) {
  if (auto w = window.lock()) w->on_grad(index);
  return outputs;
}

// How many Window hooks the parameter's gradient accumulator carries (tests count them).
int64_t fold_hooks_on(const at::Tensor& param) {
  auto node = torch::autograd::impl::try_get_grad_accumulator(param);
  if (!node) return 0;
  int64_t n = 0;
  for (const auto& hook : node->post_hooks()) n += dynamic_cast<const FoldHook*>(hook.get()) != nullptr;
  return n;
}

}  // namespace

void bind_window(py::module_& m) {
  m.def("fold_hooks_on", &fold_hooks_on, "the number of GradAccumulator hooks on a parameter");
  using R = py::call_guard<py::gil_scoped_release>;
  // dynamic_attr: the accumulator keeps the window's arena and views on it.
  py::class_<Window, std::shared_ptr<Window>>(m, "Window", py::dynamic_attr())
      .def(py::init<at::Tensor, std::vector<at::Tensor>, std::vector<int64_t>, int64_t, bool, at::Tensor, at::Tensor,
                    py::object, py::object, py::object>(),
           py::arg("grad"), py::arg("params"), py::arg("offsets"), py::arg("bucket_numel"), py::arg("full"),
           py::arg("sumsq"), py::arg("found_inf"), py::arg("explain"), py::arg("take_back"),
           py::arg("on_deferred"))
      .def("hook", &Window::hook, R())
      .def("hook_all", &Window::hook_all, R())
      .def("remove_hooks", &Window::remove_hooks, R())
      .def("follow_current_stream", &Window::follow_current_stream, R())
      .def("set_mode", &Window::set_mode, R())
      .def("claim", &Window::claim, R())
      .def("set_external", &Window::set_external, R())
      .def("flush_all", &Window::flush_all, R())
      .def("fold_deferred", &Window::fold_deferred, R())
      .def("fold_grads", &Window::fold_grads, R())
      .def("drop_deferred", &Window::drop_deferred, R())
      .def("first_grad", &Window::first_grad, R())
      .def("clear_grads", &Window::clear_grads, R())
      .def("restart", &Window::restart, R())
      .def("set_fold_listener", &Window::set_fold_listener, R())
      .def("set_touched", &Window::set_touched, py::arg("touched"), py::arg("last") = false, R())
      .def_property_readonly("touched", &Window::touched)
      .def_property_readonly("touched_last", &Window::touched_last)
      .def_property_readonly("hooked", &Window::hooked)
      .def("any_touched", &Window::any_touched)
      .def("all_hooked", &Window::all_hooked);
}

}  // namespace fusedaccum
