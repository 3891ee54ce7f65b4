// The batched scoring interface: B tasks x E experts -> a score matrix. The manifest
// prior implements it today; the learned gating model (CPU or cuBLAS) slots in beside it.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "cortex/features.h"
#include "cortex/status.h"

namespace cortex {

struct ExpertProfile {
  std::string name;
  SparseVector manifest;
};

class Scorer {
 public:
  virtual ~Scorer() = default;
  // Recorded with every decision this scorer takes part in.
  virtual std::string version() const = 0;
  // "cpu", or "cuda:<device>".
  virtual std::string backend() const = 0;
  // Fills `scores` (row-major, tasks.size() x experts.size()) with values in [0,1].
  virtual Status Score(const std::vector<SparseVector>& tasks,
                       const std::vector<ExpertProfile>& experts, std::vector<float>* scores) = 0;
};

// Zero-shot score: cosine similarity between the task's and the manifest's features.
std::unique_ptr<Scorer> MakeManifestPriorScorer();

}  // namespace cortex
