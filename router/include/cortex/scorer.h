// The batched scoring interface: B tasks x E experts -> a score matrix. The manifest
// prior and the learned gating model (CPU or cuBLAS, see learner.h) implement it.
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
  // Fills `scores` (row-major, tasks.size() x experts.size()) with values in [0,1], and
  // `version` with the model version that produced them (it can change between calls).
  virtual Status Score(const std::vector<SparseVector>& tasks,
                       const std::vector<ExpertProfile>& experts, std::vector<float>* scores,
                       std::string* version) = 0;
};

// Zero-shot score: cosine similarity between the task's and the manifest's features.
std::unique_ptr<Scorer> MakeManifestPriorScorer();

}  // namespace cortex
