// The Primitive classes: shapes, equivalence and gradients, independent of
// any backend. eval_cpu lives in cpu/, eval_gpu in metal/ or cuda/ (one file
// per primitive family, same names across backends).
#pragma once

#include "mlx/primitives.h"

namespace mlx_moe {

namespace mx = mlx::core;

// out[i] = a[lhs_indices[i]] @ b[rhs_indices[i]] for every position i of the
// (broadcast) index arrays. Inputs: a [..., M, K], b [..., K, N],
// lhs_indices and rhs_indices uint32 of one shape I (indices into a's and
// b's flattened batch dimensions). Output: [*I, M, N] in a's dtype.
class GatherMM : public mx::UnaryPrimitive {
 public:
  // sorted_indices: the caller promises the matrix indices are grouped
  // (as mx.gather_mm's flag); lhs_is_identity: lhs_indices is the default
  // arange over a's batch, with no broadcasting (gradient shortcut).
  GatherMM(mx::Stream stream, bool sorted_indices, bool lhs_is_identity)
      : mx::UnaryPrimitive(stream),
        sorted_indices_(sorted_indices),
        lhs_is_identity_(lhs_is_identity) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;

  std::vector<mx::array> vjp(
      const std::vector<mx::array>& primals,
      const std::vector<mx::array>& cotangents,
      const std::vector<int>& argnums,
      const std::vector<mx::array>& outputs) override;

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  bool is_equivalent(const mx::Primitive& other) const override;
  const char* name() const override {
    return "MoeGatherMM";
  }

 private:
  bool sorted_indices_;
  bool lhs_is_identity_;
};

} // namespace mlx_moe
