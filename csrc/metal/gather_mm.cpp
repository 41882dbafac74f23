// eval_gpu of GatherMM and GatherQMM in Metal builds. Their kernels
// (gather_mm.metal, gather_qmm.metal) take rows already grouped by expert;
// the general gather (any lhs/rhs indices, M rows per index, b in either
// layout) has no Metal dispatch yet, so ops.cpp sends both ops on GPU
// streams to MLX's own gather_mm / gather_qmm and these are never reached.
#include <stdexcept>

#include "primitives.h"

namespace mlx_moe {

void GatherMM::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::logic_error(
      "[gather_mm] no Metal dispatch for the general gather_mm yet; ops.cpp should have used "
      "mx.gather_mm on this stream");
}

void GatherQMM::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::logic_error(
      "[gather_qmm] no Metal dispatch for gather_qmm yet; ops.cpp should have used "
      "mx.gather_qmm on this stream");
}

}  // namespace mlx_moe
