// Internal to cortex_router: the host-side plan of one training minibatch, shared by the
// CPU and CUDA engines so both apply the same sums in the same order (deterministic).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cortex/gating.h"

namespace cortex::internal {

struct StepPlan {
  std::vector<int> rows;  // TrainSet row numbers in this minibatch
  std::vector<int> col;   // chosen expert column per batch position
  // Embedding gradient: for each unique Emb row, the (batch position, x value) pairs that
  // touch it, in ascending order. CSR: emb_rows[u] owns emb_src[emb_off[u]..emb_off[u+1]).
  std::vector<uint32_t> emb_rows;
  std::vector<int> emb_off;
  std::vector<int> emb_pos;
  std::vector<float> emb_val;
  // Wide part: the same for each unique wide index.
  std::vector<uint32_t> wide_idx;
  std::vector<int> wide_off;
  std::vector<int> wide_pos;
  std::vector<float> wide_val;
  // Per batch position: the wide indices and values it reads (for the forward pass).
  std::vector<int> x_off;
  std::vector<uint32_t> x_wide;
  std::vector<uint32_t> x_emb;
  std::vector<float> x_val;
};

StepPlan MakeStepPlan(const GatingModel& m, const TrainSet& data, const std::vector<int>& order,
                      size_t begin, size_t end, const std::vector<uint64_t>& expert_keys);

// The scoring inputs per expert column: head weights (E x H, zero for an untrained
// expert), head biases, and the keys of the hashed per-expert part.
struct HeadMatrix {
  std::vector<float> U, bias;
  std::vector<uint64_t> keys;
};
HeadMatrix Heads(const GatingModel& m, const std::vector<std::string>& experts);

// Runs fn(plan, n) for every minibatch of every epoch, in the seeded order both engines
// share; stops at the first error.
template <typename Fn>
Status ForEachMinibatch(const GatingModel& m, const TrainSet& data, const TrainOptions& opt,
                        const std::vector<uint64_t>& keys, Fn fn) {
  for (int epoch = 0; epoch < opt.epochs; ++epoch) {
    const std::vector<int> order =
        EpochOrder(data.rows.size(), m.shape().seed, opt.first_epoch + epoch, opt.shuffle);
    for (size_t begin = 0; begin < order.size(); begin += static_cast<size_t>(opt.batch)) {
      if (opt.cancel && opt.cancel->load()) return Status::Unavailable("training was cancelled");
      const size_t end = std::min(order.size(), begin + static_cast<size_t>(opt.batch));
      CORTEX_RETURN_IF_ERROR(
          fn(MakeStepPlan(m, data, order, begin, end, keys), static_cast<int>(end - begin)));
    }
  }
  return Status::OK();
}

inline float Sigmoid(float z) { return 1.0f / (1.0f + __builtin_expf(-z)); }

}  // namespace cortex::internal
