// CPU registration of the weighted cross-entropy family (docs/design/OPS.md, section 3). The
// drivers are device-generic (weighted_ce_driver.h, weighted_ce_linear_driver.h); the CPU row
// kernels live in weighted_ce_rows_cpu.cpp, and the chunk GEMMs run through ATen (MKL) in
// fp32/fp64.
#include <torch/library.h>

#include "weighted_ce_cpu.h"
#include "weighted_ce_div_driver.h"
#include "weighted_ce_linear_ce_driver.h"

namespace vsd_ext::wce {

TORCH_LIBRARY_IMPL(vsd_ext, CPU, m) {
  m.impl("weighted_cross_entropy_forward", &ce_forward<cpu::Kernels>);
  m.impl("weighted_cross_entropy_backward", &ce_backward<cpu::Kernels>);
  m.impl("weighted_linear_cross_entropy_forward", &linear_forward<cpu::Kernels>);
  m.impl("weighted_linear_cross_entropy_backward", &linear_backward<cpu::Kernels>);
  m.impl("weighted_linear_divergence_forward", &div_forward<cpu::Kernels>);
  m.impl("weighted_linear_divergence_backward", &div_backward<cpu::Kernels>);
}

}  // namespace vsd_ext::wce
