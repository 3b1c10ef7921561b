// Argument checks shared by the CPU and CUDA adapters.
//
// Every failure names the argument and states expected vs actual, and is raised as a Python
// ValueError (TORCH_CHECK_VALUE) so that callers of torch.ops.vsd_ext.* directly get the same
// clear errors as the typed Python wrappers.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <sstream>
#include <string>

namespace vsd_ext {

#define VSD_CHECK(cond, arg, ...) \
  TORCH_CHECK_VALUE((cond), "vsd_ext: argument '", arg, "': ", __VA_ARGS__)

inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

inline std::string shape_str(std::initializer_list<int64_t> shape) {
  std::ostringstream s;
  s << "[";
  bool first = true;
  for (int64_t d : shape) {
    s << (first ? "" : ", ") << d;
    first = false;
  }
  s << "]";
  return s.str();
}

inline void check_dim(const at::Tensor& t, const char* name, int64_t dim) {
  VSD_CHECK(t.dim() == dim, name, "expected a ", dim, "-D tensor, got shape ", shape_str(t));
}

// Exact shape check: `expected` lists every dimension.
inline void check_shape(const at::Tensor& t, const char* name,
                        std::initializer_list<int64_t> expected) {
  bool ok = t.dim() == static_cast<int64_t>(expected.size());
  int64_t i = 0;
  for (int64_t d : expected) {
    ok = ok && t.size(i) == d;
    ++i;
  }
  VSD_CHECK(ok, name, "expected shape ", shape_str(expected), ", got ", shape_str(t));
}

inline void check_dtype(const at::Tensor& t, const char* name,
                        std::initializer_list<at::ScalarType> allowed) {
  bool ok = false;
  std::ostringstream s;
  for (auto dt : allowed) {
    ok = ok || t.scalar_type() == dt;
    s << (s.tellp() > 0 ? " or " : "") << dt;
  }
  VSD_CHECK(ok, name, "expected dtype ", s.str(), ", got ", t.scalar_type());
}

inline void check_same_dtype(const at::Tensor& t, const char* name, const at::Tensor& ref,
                             const char* ref_name) {
  VSD_CHECK(t.scalar_type() == ref.scalar_type(), name, "expected the dtype of '", ref_name, "' (",
            ref.scalar_type(), "), got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref,
                              const char* ref_name) {
  VSD_CHECK(t.device() == ref.device(), name, "expected device ", ref.device(), " (that of '",
            ref_name, "'), got ", t.device());
}

// An empty tensor passes: no element is read (an expanded empty gradient has stride 0).
inline void check_last_dim_contiguous(const at::Tensor& t, const char* name) {
  VSD_CHECK(t.dim() == 0 || t.numel() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, name,
            "expected a contiguous last dimension, got strides ", t.strides());
}

}  // namespace vsd_ext
