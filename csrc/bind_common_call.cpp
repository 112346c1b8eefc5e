// _C.common_elbo: klanneal.elbo_loss's common call (klanneal/_common_call.py)
// recognised and run in one C call.
//
// The common call is elbo_loss(recon_input, target, mu, logvar, beta,
// likelihood=...) with plain CPU tensors, a float or 0-d tensor beta and
// nothing else: what most training steps make. Per call it costs what its
// Python attribute reads, allocations and autograd attachment cost and
// nothing more: the admission rules (the same as klanneal._common_call's
// docstring states), the lane lookup, the allocation of the outputs, the
// launch and the attachment (ElboFunction's C apply) run here against the
// Python C API; no torch header is included (the tensors are Python objects
// read through their Python attributes, the kernel gets raw pointers).
//
// Anything else returns None and elbo_call takes the call: a call this
// does not recognise, valid or not, never raises here. The errors raised
// are those of the Python helpers it calls (the option checks of
// klanneal._layout.elbo_options, through make_lane; the kernel's invalid
// target, through invalid_target) and the kernel's ValueError.
//
// common_setup(config) hands over, once, the Python objects this needs (the
// Tensor type, dtypes, torch's allocation functions, the lane table and
// its builder, ...); common_lane(...) builds a lane for the builder
// (klanneal._common_call.make_lane: what a call with those options, dtypes
// and gradients asked for needs, kept in the lane table keyed by the
// arguments that decide it).
#include <Python.h>

#include <cstdint>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "bind.h"
#include "bind_common.h"
#include "klanneal/elbo_layout.h"

namespace klanneal {
namespace {

namespace py = pybind11;

// Launches over fewer elements than this keep the GIL (the hand-over costs
// more than the launch; the kernel never calls back into Python).
constexpr int64_t kReleaseGilElems = int64_t{1} << 15;
// Gradients of at most this many bytes in all are kept on ElboFunction's
// ctx instead of saved (klanneal._autograd.saved_gradients): cheaper per
// call, and what they hold after the backward until the graph is freed is
// small.
constexpr int64_t kKeepGradBytes = int64_t{1} << 16;
// The lane table is cleared once it holds this many entries (one per
// combination of options, dtypes and gradients asked for).
constexpr Py_ssize_t kMaxLanes = 1024;

// A lane: the ElboParams of the options, decoded once; the 0-d template of
// the results' dtype (the 0-d outputs are empty_like of it), that dtype,
// the EagerPlan (ElboFunction's state) and which gradients to allocate.
struct CommonLane {
  ElboParams base;
  bool validate = false;
  bool float32_outputs = false;
  bool per_example = false;              // reduction "none": loss, recon and kl are [B]
  bool grads[3] = {false, false, false}; // recon_input, mu, logvar
  int64_t pool_numel = 0;                // recon_input's gradient from the pool from here on
  int64_t recon_itemsize = 4, latent_itemsize = 4;
  PyObject *zero_d = nullptr;
  PyObject *dtype = nullptr;
  PyObject *plan = nullptr;
  ~CommonLane() {
    Py_XDECREF(zero_d);
    Py_XDECREF(dtype);
    Py_XDECREF(plan);
  }
};

// What common_setup hands over (strong references, kept for the process).
struct Config {
  bool ready = false;
  PyObject *tensor_type, *strided, *float32, *float64, *elementwise, *empty_like, *empty,
      *default_dtype, *transforms_active, *function_mode, *forward_ad, *grad_enabled, *num_threads,
      *apply, *output_type, *make_lane, *lanes, *large_grad, *invalid_target, *env,
      *native_disabled, *dtype_kwnames;
};
Config cfg;

// Interned attribute names.
struct Names {
  PyObject *is_cpu, *layout, *dtype, *requires_grad, *shape, *ndim, *contiguous, *data_ptr, *numel,
      *item, *is_floating_point, *current_level, *env_key;
};
Names names;

py::object steal(PyObject *o) {
  if (o == nullptr)
    throw py::error_already_set();
  return py::reinterpret_steal<py::object>(o);
}
py::object attr(PyObject *o, PyObject *name) { return steal(PyObject_GetAttr(o, name)); }
bool attr_is(PyObject *o, PyObject *name, PyObject *value) { return attr(o, name).ptr() == value; }
py::object call0(PyObject *f) { return steal(PyObject_CallNoArgs(f)); }
py::object call1(PyObject *f, PyObject *a) { return steal(PyObject_CallOneArg(f, a)); }
py::object method0(PyObject *o, PyObject *name) {
  return steal(PyObject_CallMethodNoArgs(o, name));
}
PyObject *type_of(PyObject *o) { return reinterpret_cast<PyObject *>(Py_TYPE(o)); }
int64_t as_int(PyObject *o) {
  const long long v = PyLong_AsLongLong(o);
  if (v == -1 && PyErr_Occurred())
    throw py::error_already_set();
  return v;
}
uint64_t data_ptr(PyObject *t) {
  py::object p = method0(t, names.data_ptr);
  const unsigned long long v = PyLong_AsUnsignedLongLong(p.ptr());
  if (v == static_cast<unsigned long long>(-1) && PyErr_Occurred())
    throw py::error_already_set();
  return v;
}

// A torch.func transform, forward-mode AD or a torch function mode is
// active: elbo_call decides those calls. (torch.compile never gets here:
// Dynamo cannot trace a C function, and elbo_loss leaves its calls to
// elbo_call; other tracers pass tensor subclasses, which are not common.)
bool special_state() {
  if (call0(cfg.transforms_active).ptr() != Py_False)
    return true;
  if (as_int(attr(cfg.forward_ad, names.current_level).ptr()) >= 0)
    return true;
  return call0(cfg.function_mode).ptr() != Py_False;
}

// beta's value for a float or a 0-d floating CPU tensor that does not
// require grad, in [0, inf); false for anything else.
bool beta_value(PyObject *beta, double *value) {
  if (PyFloat_CheckExact(beta)) {
    *value = PyFloat_AS_DOUBLE(beta);
  } else if (Py_TYPE(beta) == reinterpret_cast<PyTypeObject *>(cfg.tensor_type)) {
    if (as_int(attr(beta, names.ndim).ptr()) != 0 || !attr_is(beta, names.is_cpu, Py_True) ||
        !attr_is(beta, names.requires_grad, Py_False))
      return false;
    py::object dtype = attr(beta, names.dtype);
    if (dtype.ptr() == cfg.float32 || dtype.ptr() == cfg.float64) {
      // A 0-d CPU tensor: its one element, read where item() would read it.
      const uint64_t p = data_ptr(beta);
      *value = dtype.ptr() == cfg.float32 ? static_cast<double>(*reinterpret_cast<float *>(p))
                                          : *reinterpret_cast<double *>(p);
    } else if (attr_is(dtype.ptr(), names.is_floating_point, Py_True)) {
      py::object v = method0(beta, names.item);
      *value = PyFloat_AsDouble(v.ptr());
      if (*value == -1.0 && PyErr_Occurred())
        throw py::error_already_set();
    } else {
      return false;
    }
  } else {
    return false;
  }
  return *value >= 0.0 && *value < std::numeric_limits<double>::infinity();
}

// The four tensors are plain CPU tensors (not subclasses) of strided layout
// and the target does not require grad.
bool plain_cpu_tensors(PyObject *const *tensors) {
  for (int k = 0; k < 4; ++k)
    if (Py_TYPE(tensors[k]) != reinterpret_cast<PyTypeObject *>(cfg.tensor_type))
      return false;
  for (int k = 0; k < 4; ++k)
    if (!attr_is(tensors[k], names.is_cpu, Py_True) ||
        !attr_is(tensors[k], names.layout, cfg.strided))
      return false;
  return attr_is(tensors[1], names.requires_grad, Py_False);
}

// The shapes elbo_call accepts: mu [B, D] with B > 0, logvar mu's shape,
// recon_input [B, ...] and target recon_input's shape. Sets B and D.
bool common_shapes(PyObject *const *tensors, int64_t *batch, int64_t *latent_dim) {
  py::object mu_shape = attr(tensors[2], names.shape);
  py::object recon_shape = attr(tensors[0], names.shape);
  if (PyTuple_GET_SIZE(mu_shape.ptr()) != 2 || PyTuple_GET_SIZE(recon_shape.ptr()) == 0)
    return false;
  py::object logvar_shape = attr(tensors[3], names.shape);
  py::object target_shape = attr(tensors[1], names.shape);
  const int same = PyObject_RichCompareBool(logvar_shape.ptr(), mu_shape.ptr(), Py_EQ);
  const int same_target = PyObject_RichCompareBool(target_shape.ptr(), recon_shape.ptr(), Py_EQ);
  if (same < 0 || same_target < 0)
    throw py::error_already_set();
  *batch = as_int(PyTuple_GET_ITEM(mu_shape.ptr(), 0));
  *latent_dim = as_int(PyTuple_GET_ITEM(mu_shape.ptr(), 1));
  return same && same_target && *batch > 0 &&
         as_int(PyTuple_GET_ITEM(recon_shape.ptr(), 0)) == *batch;
}

// KLANNEAL_DISABLE_NATIVE is off (read from os.environ's bytes dict when
// unset, the common case; otherwise klanneal._env decides).
bool native_enabled() {
  if (cfg.env != Py_None) {
    PyObject *value = PyDict_GetItemWithError(cfg.env, names.env_key);
    if (value == nullptr && !PyErr_Occurred())
      return true;
    if (value == nullptr)
      throw py::error_already_set();
  }
  return call0(cfg.native_disabled).ptr() == Py_False;
}

// The lane of these options, dtypes and gradients (None: not a common
// call), built by make_lane on first use. An unhashable argument is
// handed to make_lane uncached (it raises that argument's error).
py::object find_lane(PyObject *const *args, PyObject *const *tensors, bool grad) {
  py::object dtypes[4];
  for (int k = 0; k < 4; ++k)
    dtypes[k] = attr(tensors[k], names.dtype);
  bool flags[3] = {false, false, false};
  if (grad) {
    const int tracked[3] = {0, 2, 3};
    for (int k = 0; k < 3; ++k)
      flags[k] = attr_is(tensors[tracked[k]], names.requires_grad, Py_True);
  }
  auto boolean = [](bool b) { return b ? Py_True : Py_False; };
  // likelihood .. validate, the types of the four non-string options
  // (the option cache is typed: 0, 0.0 and False are three keys), the
  // dtypes, the gradients.
  py::object key = steal(PyTuple_Pack(
      18, args[5], args[6], args[7], args[8], args[9], args[10], args[11], type_of(args[7]),
      type_of(args[9]), type_of(args[10]), type_of(args[11]), dtypes[0].ptr(), dtypes[1].ptr(),
      dtypes[2].ptr(), dtypes[3].ptr(), boolean(flags[0]), boolean(flags[1]), boolean(flags[2])));
  PyObject *lane = PyDict_GetItemWithError(cfg.lanes, key.ptr());
  if (lane != nullptr)
    return py::reinterpret_borrow<py::object>(lane);
  bool hashable = true;
  if (PyErr_Occurred()) {
    if (!PyErr_ExceptionMatches(PyExc_TypeError))
      throw py::error_already_set();
    PyErr_Clear();
    hashable = false;
  }
  py::object built = steal(PyObject_Call(cfg.make_lane, key.ptr(), nullptr));
  if (hashable) {
    if (PyDict_GET_SIZE(cfg.lanes) >= kMaxLanes)
      PyDict_Clear(cfg.lanes);
    if (PyDict_SetItem(cfg.lanes, key.ptr(), built.ptr()) < 0)
      throw py::error_already_set();
  }
  return built;
}

py::object empty_like(PyObject *like) { return call1(cfg.empty_like, like); }

// A vector of n (kl_per_dim, or a per-example output) in the results' dtype (torch.empty's dtype
// keyword costs a few hundred ns: passed only when it is not the default dtype).
py::object empty_vector(const CommonLane &lane, int64_t n) {
  py::object size = steal(PyLong_FromLongLong(n));
  if (call0(cfg.default_dtype).ptr() == lane.dtype)
    return call1(cfg.empty, size.ptr());
  PyObject *args[2] = {size.ptr(), lane.dtype};
  return steal(PyObject_Vectorcall(cfg.empty, args, 1, cfg.dtype_kwnames));
}

// Allocates the outputs, launches the kernel and attaches the loss: the
// ELBOOutput(loss, recon, kl, kl_per_dim, beta) of the call.
PyObject *run(const CommonLane &lane, PyObject *const *args, PyObject *const *inputs, double value,
              int64_t batch, int64_t latent_dim) {
  py::object x = method0(inputs[0], names.contiguous);
  py::object target = method0(inputs[1], names.contiguous);
  py::object mu = method0(inputs[2], names.contiguous);
  py::object logvar = method0(inputs[3], names.contiguous);
  // A tensor without storage has no data pointer: a dead functorch wrapper
  // (one that escaped a finished torch.func transform), which elbo_call
  // unwraps. Read before anything is allocated.
  uint64_t input_ptrs[4];
  PyObject *const tensors[4] = {x.ptr(), target.ptr(), mu.ptr(), logvar.ptr()};
  for (int k = 0; k < 4; ++k) {
    PyObject *ptr = PyObject_CallMethodNoArgs(tensors[k], names.data_ptr);
    if (ptr == nullptr && PyErr_ExceptionMatches(PyExc_RuntimeError)) {
      PyErr_Clear();
      Py_RETURN_NONE;
    }
    input_ptrs[k] = PyLong_AsUnsignedLongLong(steal(ptr).ptr());
    if (input_ptrs[k] == static_cast<uint64_t>(-1) && PyErr_Occurred())
      throw py::error_already_set();
  }
  const int64_t numel = as_int(method0(x.ptr(), names.numel).ptr());
  // loss, recon, kl: 0-d, or [B] under reduction "none"; kl_per_dim [D]; beta 0-d.
  py::object out[5];
  for (int k = 0; k < 3; ++k)
    out[k] = lane.per_example ? empty_vector(lane, batch) : empty_like(lane.zero_d);
  out[3] = empty_vector(lane, latent_dim);
  out[4] = empty_like(lane.zero_d);
  py::object grads[3];
  if (lane.grads[0])
    grads[0] = numel < lane.pool_numel ? empty_like(x.ptr()) : call1(cfg.large_grad, x.ptr());
  if (lane.grads[1])
    grads[1] = empty_like(mu.ptr());
  if (lane.grads[2])
    grads[2] = empty_like(logvar.ptr());

  ElboParams p = lane.base;
  p.batch = p.n_rows = batch;
  p.row_len = numel / batch;
  p.latent_dim = latent_dim;
  const int64_t threads = as_int(call0(cfg.num_threads).ptr());
  p.n_threads = static_cast<int>(threads < 1 ? 1 : threads > 4096 ? 4096 : threads);
  p.beta.value = value;
  p.recon_input = reinterpret_cast<void *>(input_ptrs[0]);
  p.target = reinterpret_cast<void *>(input_ptrs[1]);
  p.mu = reinterpret_cast<void *>(input_ptrs[2]);
  p.logvar = reinterpret_cast<void *>(input_ptrs[3]);
  double **scalars[5] = {&p.loss, &p.recon, &p.kl, &p.kl_per_dim, &p.beta_out};
  for (int k = 0; k < 5; ++k)
    *scalars[k] = reinterpret_cast<double *>(data_ptr(out[k].ptr()));
  void **grad_ptrs[3] = {&p.grad_recon, &p.grad_mu, &p.grad_logvar};
  for (int k = 0; k < 3; ++k)
    *grad_ptrs[k] = grads[k] ? reinterpret_cast<void *>(data_ptr(grads[k].ptr())) : nullptr;
  const int64_t bad =
      run_elbo_cpu(p, lane.validate, lane.float32_outputs, numel >= kReleaseGilElems);
  if (bad >= 0) {
    py::object index = steal(PyLong_FromLongLong(bad));
    PyObject *call_args[5] = {x.ptr(), target.ptr(), args[5], args[9], index.ptr()};
    steal(PyObject_Vectorcall(cfg.invalid_target, call_args, 5, nullptr));
    throw std::runtime_error("klanneal: invalid_target returned");
  }

  // ElboFunction: (loss, the gradients computed, the plan, whether they are
  // small enough to be kept on ctx), then the inputs that get them.
  PyObject *tracked[4] = {nullptr, nullptr, nullptr, nullptr};
  PyObject *saved[3] = {nullptr, nullptr, nullptr};
  PyObject *const owners[3] = {x.ptr(), mu.ptr(), logvar.ptr()};
  Py_ssize_t n = 0;
  for (int k = 0; k < 3; ++k)
    if (grads[k]) {
      saved[n] = grads[k].ptr();
      tracked[++n] = owners[k];
    }
  if (n > 0) {
    py::object saved_tuple = steal(PyTuple_New(n));
    for (Py_ssize_t k = 0; k < n; ++k) {
      Py_INCREF(saved[k]);
      PyTuple_SET_ITEM(saved_tuple.ptr(), k, saved[k]);
    }
    const int64_t grad_bytes = (grads[0] ? numel * lane.recon_itemsize : 0) +
                               (grads[1] ? batch * latent_dim * lane.latent_itemsize : 0) +
                               (grads[2] ? batch * latent_dim * lane.latent_itemsize : 0);
    PyObject *keep = grad_bytes <= kKeepGradBytes ? Py_True : Py_False;
    py::object state = steal(PyTuple_Pack(4, out[0].ptr(), saved_tuple.ptr(), lane.plan, keep));
    tracked[0] = state.ptr();
    out[0] = steal(PyObject_Vectorcall(cfg.apply, tracked, static_cast<size_t>(n + 1), nullptr));
  }
  auto *type = reinterpret_cast<PyTypeObject *>(cfg.output_type);
  PyObject *result = type->tp_alloc(type, 5);
  if (result == nullptr)
    throw py::error_already_set();
  for (int k = 0; k < 5; ++k)
    PyTuple_SET_ITEM(result, k, out[k].release().ptr());
  return result;
}

PyObject *common_elbo(PyObject *, PyObject *const *args, Py_ssize_t nargs) {
  try {
    if (!cfg.ready)
      throw std::runtime_error("klanneal: _C.common_setup was not called");
    if (nargs != 12)
      throw std::invalid_argument("common_elbo: expected 12 arguments (elbo_loss's order)");
    PyObject *const *tensors = args; // recon_input, target, mu, logvar
    double value = 0.0;
    int64_t batch = 0, latent_dim = 0;
    if (!PyUnicode_CheckExact(args[5]))
      Py_RETURN_NONE;
    const int elementwise = PySet_Contains(cfg.elementwise, args[5]);
    if (elementwise < 0)
      throw py::error_already_set();
    if (!elementwise || !plain_cpu_tensors(tensors) || special_state() ||
        !beta_value(args[4], &value) || !common_shapes(tensors, &batch, &latent_dim) ||
        !native_enabled())
      Py_RETURN_NONE;
    const bool grad = call0(cfg.grad_enabled).ptr() == Py_True;
    py::object lane = find_lane(args, tensors, grad);
    if (lane.is_none())
      Py_RETURN_NONE;
    auto *l = static_cast<const CommonLane *>(PyCapsule_GetPointer(lane.ptr(), "CommonLane"));
    if (l == nullptr)
      throw py::error_already_set();
    return run(*l, args, tensors, value, batch, latent_dim);
  } catch (py::error_already_set &e) {
    e.restore();
  } catch (const std::invalid_argument &e) {
    PyErr_SetString(PyExc_ValueError, e.what());
  } catch (const std::exception &e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

PyMethodDef common_elbo_def = {
    "common_elbo", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&common_elbo)),
    METH_FASTCALL,
    "common_elbo(recon_input, target, mu, logvar, beta, likelihood, reduction, free_bits, "
    "free_bits_mode, ignore_index, gaussian_var, validate): elbo_loss's result for a common "
    "call, or None (klanneal/_common_call.py). common_setup must have run."};

void common_setup(const py::dict &config) {
  auto take = [&](const char *name) {
    PyObject *o = config[name].ptr();
    Py_INCREF(o);
    return o;
  };
  cfg.tensor_type = take("tensor_type");
  cfg.strided = take("strided");
  cfg.float32 = take("float32");
  cfg.float64 = take("float64");
  cfg.elementwise = take("elementwise");
  cfg.empty_like = take("empty_like");
  cfg.empty = take("empty");
  cfg.default_dtype = take("default_dtype");
  cfg.transforms_active = take("transforms_active");
  cfg.function_mode = take("function_mode");
  cfg.forward_ad = take("forward_ad");
  cfg.grad_enabled = take("grad_enabled");
  cfg.num_threads = take("num_threads");
  cfg.apply = take("apply");
  cfg.output_type = take("output_type");
  cfg.make_lane = take("make_lane");
  cfg.lanes = take("lanes");
  cfg.large_grad = take("large_grad");
  cfg.invalid_target = take("invalid_target");
  cfg.env = take("env");
  cfg.native_disabled = take("native_disabled");
  KLANNEAL_CHECK_ARG(PyType_Check(cfg.tensor_type) && PyType_Check(cfg.output_type) &&
                         PyDict_Check(cfg.lanes) && PyAnySet_Check(cfg.elementwise) &&
                         (cfg.env == Py_None || PyDict_Check(cfg.env)),
                     "common_setup: tensor_type, output_type, lanes, elementwise or env has "
                     "the wrong type");
  cfg.dtype_kwnames = steal(Py_BuildValue("(s)", "dtype")).release().ptr();
  auto intern = [](const char *s) { return PyUnicode_InternFromString(s); };
  names = {intern("is_cpu"),
           intern("layout"),
           intern("dtype"),
           intern("requires_grad"),
           intern("shape"),
           intern("ndim"),
           intern("contiguous"),
           intern("data_ptr"),
           intern("numel"),
           intern("item"),
           intern("is_floating_point"),
           intern("_current_level"),
           PyBytes_FromString("KLANNEAL_DISABLE_NATIVE")};
  cfg.ready = true;
}

py::capsule common_lane(const std::vector<int64_t> &sizes, const std::vector<double> &floats,
                        const std::vector<int64_t> &ints, const py::object &zero_d,
                        const py::object &dtype, const py::object &plan, bool grad_recon,
                        bool grad_mu, bool grad_logvar, int64_t pool_numel) {
  auto lane = std::make_unique<CommonLane>();
  const std::vector<uint64_t> no_pointers(static_cast<size_t>(PtrSlot::kCount), 0);
  lane->base = elbo_params_from_packed(sizes, no_pointers, floats, ints);
  lane->validate = ints[static_cast<size_t>(IntSlot::k_validate)] != 0;
  lane->float32_outputs = wants_float32_outputs(sizes);
  lane->per_example = lane->base.reduction == Reduction::kNone;
  auto itemsize = [](DType d) { return d == DType::kFloat64 ? 8 : 4; };
  lane->recon_itemsize = itemsize(lane->base.recon_dtype);
  lane->latent_itemsize = itemsize(lane->base.latent_dtype);
  lane->grads[0] = grad_recon;
  lane->grads[1] = grad_mu;
  lane->grads[2] = grad_logvar;
  lane->pool_numel = pool_numel;
  lane->zero_d = zero_d.inc_ref().ptr();
  lane->dtype = dtype.inc_ref().ptr();
  lane->plan = plan.inc_ref().ptr();
  return py::capsule(lane.release(), "CommonLane", [](PyObject *c) {
    delete static_cast<CommonLane *>(PyCapsule_GetPointer(c, "CommonLane"));
  });
}

} // namespace

void register_common_call(py::module_ &m) {
  m.def("common_setup", &common_setup, py::arg("config"),
        "Hands common_elbo the Python objects it uses (klanneal/_common_call.py), once.");
  m.def("common_lane", &common_lane, py::arg("sizes"), py::arg("floats"), py::arg("ints"),
        py::arg("zero_d"), py::arg("dtype"), py::arg("plan"), py::arg("grad_recon"),
        py::arg("grad_mu"), py::arg("grad_logvar"), py::arg("pool_numel"),
        "A lane of common_elbo: the packed call's sizes (dtype codes), floats and ints "
        "decoded once, the results' 0-d template and dtype, the EagerPlan, the gradients to "
        "allocate and the recon_input numel from which its gradient comes from the pool.");
  m.add_object("common_elbo",
               py::reinterpret_steal<py::object>(PyCFunction_New(&common_elbo_def, nullptr)));
}

} // namespace klanneal
